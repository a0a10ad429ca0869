"""The runtime under the algorithms: array shim, threads, BLAS limits, scratch memory."""
