"""The runtime under the algorithms; it imports nothing of them.

- :mod:`.backend`: the array operations that differ between NumPy and torch;
- :mod:`.threads`: dplr's thread pool and the split of work into lanes;
- :mod:`.blas`: the process-wide, reference-counted limit on BLAS threads;
- :mod:`.workspace`: per-thread scratch memory kept between calls;
- :mod:`.tuning`: every tuning threshold, with the measurement behind it;
- :mod:`.jit`: the decorator of the compiled (Numba) loops.

Pools, scratch memory and BLAS limits start afresh in a process made by
``os.fork`` (the parent's threads do not exist there).
"""
