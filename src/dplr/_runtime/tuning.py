"""Every tuning threshold of dplr, with the measurement behind it.

Each value below was chosen by timing on a 2-core development machine
(OpenBLAS, float64 unless stated): an AMD EPYC until late November 2026, an
Intel Xeon with AVX-512 since (older comments do not always say which); the
comment says what was measured.  None of them changes a result, only how fast it arrives: the
tests pin them to extreme values to reach every code path.

The modules that use a value import it from here (under the same or a
local name), so this file is the one place to read or change them.  Values
read inside Numba-compiled code (``RANK1_GROUP_ROWS``, ``RANK1_SMALL_ORDER``)
are frozen into the on-disk compilation cache, which tracks only the file
that defines the compiled function: after changing one of them, delete the
``__pycache__`` folder of ``dplr/cholesky`` (or touch ``_rank1.py``).
"""

from __future__ import annotations

# ------------------------------------------------------------------ core solve
#: Rows per chunk of the core's chunked product, solve and inverse (the
#: default ``chunk_size``).  The chunk sweep of ``benchmarks/core.py`` and
#: sweeps over d in 16..128, batches and dtypes measured 32 fastest or within
#: noise of the fastest (64 was up to 15% slower, 128 up to 60%).  The delta
#: rules' fused chunked forward (K = V = 128, float32, B = 1, T = 4096,
#: H = 32, under load): 16 took 1.32 s, 32 1.20 s, 64 1.24 s, 128 1.41 s;
#: one thread, H = 4: 53 ms at 32 and 57 ms at 64 (KDA 76 and 89 ms).
#: Re-measured after the solve's state pass moved to BLAS gemm calls (2-core
#: Intel machine, n = 16384, d = m = 64, float64, medians of 25 interleaved
#: solves, another process running): 16 13.3 ms, 32 12.9 ms, 48 25.3 ms,
#: 64 17.2 ms, 96 29.8 ms, 128 23.0 ms.
CHUNK_ROWS = 32

#: Rows per block of the transposed block substitution
#: (:func:`dplr.core._jit.back_substitute`): the rows below a block enter it
#: through one gemm.  The delta rules' backward at c = 32, V = 128, float32,
#: one block in cache: 9.5 us row by row, 7.4 us by blocks of 16, 6.8 us by
#: blocks of 8 (16 keeps the calls few at c = 64).
SUBSTITUTION_BLOCK_ROWS = 16

#: Below this many flops a stacked product is not worth splitting over
#: threads (set with the first thread lanes; no sweep was recorded).
PARALLEL_MIN_FLOPS = 4e6

#: Below this many flops the compiled loops of the solve run on the calling
#: thread: handing them to the pool and waiting cost more than it saved up to
#: n = 1024 (d = m = 64: 0.94 ms on one thread, 1.3 ms split over two) and
#: broke even at n = 2048 (34 MFLOP in the state pass).
LOOP_MIN_FLOPS = 3e7

#: Narrowest column range worth a thread of its own in the state pass: the
#: products of narrower ranges run too far below the compiled kernel's peak
#: (its 4 x 4 tiles need several tiles per row of the state) to gain.
MIN_LANE_COLUMNS = 16

#: Parts per thread when a batch of independent problems is split: a thread
#: slowed by another process then holds back less of the batch (a two-way
#: split of 10000 rank-1 sweeps measured 11 or 18 ms, bimodal, on the shared
#: machine; four parts per thread removed the slow mode).
PARTS_PER_THREAD = 4

#: Largest rank d for which the core product and solve run row by row
#: (:mod:`dplr.core._rowwise`) instead of by chunks, when no per-chunk
#: states are asked for.  n = 10^6, m = 1, float64: row by row 58, 77 and
#: 100 ms at d = 1, 4, 8 against 450-510 ms chunked (a plain compiled loop:
#: 33-66 ms); d = 8, m = 64: both about equal.
RECURRENT_MAX_RANK = 8

# ----------------------------------------------------------- attention (delta)
#: Rows (batch x heads x tokens) per pass over the sequence in the delta
#: rule's forward and backward.  Longer inputs run in consecutive passes of
#: whole chunks with the state carried between them, so the per-pass arrays
#: stay a few MiB: a single pass over T = 65536 ran at half the tokens per
#: second of T = 4096.
DELTA_PASS_ROWS = 16384

#: Longest sequence (tokens) that the delta rules run by the compiled token
#: recurrence (``attention/_recurrent.py``) when no ``chunk_size`` is given
#: and no gradient is needed; longer ones run the fused chunked loop
#: (``attention/_chunked.py``).  Measured with the direct entry (B = 1,
#: H = 32, K = V = 128, float32, torch, with a state, medians of 40 calls,
#: idle 2-core Intel machine): the recurrence took 0.55 ms at T = 2 against
#: 1.4 ms for the chunked loop, 0.85 against 1.6 ms at T = 4 and 1.55
#: against 1.70 ms at T = 8; the chunked loop won from T = 16 (2.2 against
#: 3.3 ms) and was 2x faster at T = 32.  ``docs/delta.md`` section 7.
RECURRENT_MAX_T = 8

#: Below this many state entries times tokens (about 6 flops each) the
#: recurrence stays on the calling thread.  Handing half the heads to a pool
#: thread costs that thread's wake-up, which on the 2-core Intel machine
#: (B = 1, H = 32, K = V = 128, float32, medians of 200 calls) cost more than
#: it saved up to T = 4: one thread 290-350 us per decode step against
#: 560-680 us split in two, 630 against 700-860 us at T = 4; at T = 64 the
#: split ran in 7 ms against 13 ms.
RECURRENT_PARALLEL_MIN_WORK = 1 << 23

# ---------------------------------------------------------------- Cholesky
#: Rows per block of the Cholesky path's dense-panel orthogonal reductions
#: (the downdate; the update on torch tensors): a block of b rows costs
#: ((b + M)^2 + b^2) / b * N^2 flops in products, least near b = M..2M for
#: the M = 16..64 of the benchmarks.
CHOLESKY_CHUNK_ROWS = 64

#: Block size ``nb`` of LAPACK's ?tpqrt in the blocked update: at N = 3000,
#: M = 32, one thread, nb = 16 and 32 measured within noise of each other,
#: 64 about 15% slower and 128 about 60% slower.
CHOLESKY_TPQRT_BLOCK = 32

#: Columns per panel of the blocked update's ?tpqrt, whose reflectors are
#: applied to the columns right of it by all of dplr's threads.  Against one
#: SciPy dtpqrt call over all columns (same process, minimum of 21, 2 cores,
#: 2026-12-01): panels of 128 / 256 / 384 / 512 columns ran N = 3000, M = 32
#: at 1.09x / 1.18x / 1.44x / 1.49x, N = 3000, M = 8 at 1.10x / 1.03x / 1.22x /
#: 1.48x, N = 5000, M = 64 at 1.05x / 1.41x / 1.55x / 1.43x; below N = 1000
#: every width was within noise of the single call (which is what runs when
#: N <= 512 here).  Narrow panels lose to their ?tpqrt calls' overhead.
CHOLESKY_TPQRT_PANEL = 512

#: Smallest order N whose triangle copy (the LAPACK update's first pass) is
#: split over dplr's threads.  Into new memory the copy is bound by first-touch
#: page faults, which two threads take in parallel: N = 3000 copied in 9.4 ms
#: (two threads, zero-filled target, upper pages untouched) against 12.3 ms
#: (one thread into np.empty) and 16-17 ms for np.copy; at N = 512 (2 MiB)
#: the pool's hand-off (~50 us) is a few percent of the copy.
CHOLESKY_PARALLEL_COPY_MIN_ORDER = 512

#: Rows of a lower factor that the row-order rank-1 update advances together,
#: so that this many independent rotation chains overlap in the floating-point
#: units (set with the first compiled sweeps; no sweep over it was recorded).
#: Read inside compiled code.
RANK1_GROUP_ROWS = 8

#: Largest order N for which the row-order rank-1 update runs on an L1 scratch
#: copy, column by column (64 x 64 float64 is 32 KiB, the L1 data cache): for
#: 10000 factors of 32 x 32 it runs in about 1 us per factor and thread.
#: Read inside compiled code.
RANK1_SMALL_ORDER = 64

#: Batch size from which the rank-1 sweeps are split over dplr's threads;
#: smaller batches stay on the calling thread, where a split's hand-off cost
#: more than it saved.
RANK1_PARALLEL_BATCH = 64

#: Fewest factors per part when a batch of rank-1 sweeps is split
#: (``count // 16`` parts at most), so that each hand-off carries enough work
#: (set with the split; no sweep was recorded).
RANK1_MIN_FACTORS_PER_PART = 16

#: Order N from which the Cholesky paths use the BLAS library's thread count
#: for their large products (the blocked update's panels, the refactorised
#: product and factorisation); below it they run in one thread.  Blocked
#: panels measured N = 3000, M = 32 at 29-35 ms threaded against 40-41 ms in
#: one thread, and N = 4000, M = 64 at 61 ms against 92 ms; below N = 1000 the
#: products are small and one thread is as fast.
THREADED_BLAS_MIN_ORDER = 1000

# ---- method="auto" of the Cholesky update (benchmarks/cholesky.py grid,
# docs/cholesky.md section 5: N in 100..4000, M in 1..256, one factor)

#: Rank up to which rank-1 sweeps win at every N.
AUTO_RANK1_MAX_RANK = 2

#: Rank up to which rank-1 sweeps win for a batch of factors (the sweeps then
#: run in parallel over the batch).
AUTO_RANK1_BATCHED_MAX_RANK = 8

#: Order up to which a new factorisation (about 0.15 ms at N = 100) beats M
#: sweeps from ``AUTO_SMALL_REFACTOR_MIN_RANK`` columns on.
AUTO_SMALL_ORDER = 128
AUTO_SMALL_REFACTOR_MIN_RANK = 8

#: Rank-1 sweeps win up to M = 4 for N <= 1000 (rank1 ≈ blocked at N = 2000).
AUTO_RANK1_MEDIUM_MAX_RANK = 4
AUTO_RANK1_MEDIUM_MAX_ORDER = 1000

#: With at least as many columns as rows a new factorisation beats the
#: blocked update at N = 200 (M = 256: 1.27 against 1.49 ms) and loses from
#: N = 300 on (M = 256: 4.1 against 2.8 ms; N = 500, M = 512: 14.7 against
#: 11.3 ms), idle Intel machine, 2026-12-01.
AUTO_REFACTOR_WIDE_MAX_ORDER = 256

#: Torch tensors (no rank-1 path): refactorise up to this order.
AUTO_TORCH_REFACTOR_MAX_ORDER = 64
