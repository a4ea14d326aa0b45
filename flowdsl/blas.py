"""Matrix products for the kernels: numpy's BLAS, single-threaded, split across our own threads.

OpenBLAS's worker threads spin after each call and fight numba's workers (and any other busy
process) for the cores: measured here, a 2 ms product sometimes took 100-250 ms. So BLAS is
capped at one thread and `mm` splits a large product into row blocks (or, for a long inner
dimension, into partial sums) computed by a small pool of Python threads; numpy releases the
GIL inside BLAS, so the blocks run in parallel, and idle pool threads sleep instead of spinning.

The GIL, measured (numpy 2.4, 2026-12-07): np.matmul (`a @ b`) lets it go only for products with
more than ~500 outputs; np.dot always does. A weight gradient of few outputs and a long inner
dimension (net A's first conv: 10 x 21632 by 21632 x 32, 0.27 ms; a bias gradient's row of ones)
held the GIL throughout, so two threads running it ran one after the other (0.95x the rate of
one), and in a split training pass the other thread, returning from each of its own kernels,
slept until it was done. So the 2-D products here are np.dot (the same BLAS call, as fast);
stacked and row-block products keep np.matmul, which writes into `out` (their outputs are large).
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_pool = None
_threads = 1
_lock = threading.Lock()
_solo = False       # True while `split` runs a pass on every thread at once: each thread then
                    # computes its products and kernels itself (jit.Parallel reads it too)
MIN_WORK = 12 << 20  # multiply-adds below which one thread is faster than splitting: handing a
                     # block to a sleeping pool thread and getting it back costs ~90 us here (a
                     # virtual machine's wake-up), a product of 12 M multiply-adds ~180 us
                     # (121x289x64: 32 us on the calling thread, 111 split; 1936x289x64: 536
                     # and 398)
SPLIT_MIN = 2 * MIN_WORK  # a whole evaluation pass below this runs on one thread (split): measured
                          # on A and B (2 threads), passes of 13-15 M multiply-adds split ran at
                          # 0.5-1.0x, of 25 M and more at 1.15-1.6x
SPLIT_TRAIN_MIN = 2 * SPLIT_MIN  # a training pass splits when each thread's share of the forward
                                 # work reaches this (Net._split_loss_grad; measured on 2 threads
                                 # in a fast hour: A and B at batch 16, shares of 30 and 13 M,
                                 # 0.94x and 0.87x; at batch 64, 119 and 53 M, 0.99x and 0.93x)
ROWS = 4096         # rows per block of a row-split product
KSPLIT = 4          # split the inner dimension instead when it is this many times the rows


AVX2_CORES = ("haswell", "zen", "excavator", "steamroller", "piledriver", "bulldozer", "sandybridge")
AVX512_CORES = ("skylakex", "cooperlake", "sapphirerapids")   # OpenBLAS's 16-wide kernel sets


def numpy_blas():
    """threadpoolctl's entry for the BLAS numpy's products run in, or None. Other libraries may
    load a BLAS of their own (numba imports scipy, whose OpenBLAS 0.3.30 sat first in the list
    beside numpy's 0.3.31 on 2026-12-07): the one inside numpy's own folder (numpy.libs for
    pip's wheels) is numpy's; otherwise the first."""
    try:
        from threadpoolctl import threadpool_info
        info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        return None
    if not info:
        return None
    home = os.path.dirname(os.path.abspath(np.__file__))
    own = [i for i in info if os.path.abspath(i.get("filepath") or "").startswith(home)]
    return (own or info)[0]


def describe() -> str:
    """One line on the BLAS numpy's products run in: library, version and OpenBLAS's kernel set,
    and a warning when OPENBLAS_CORETYPE forces AVX2 kernels on a CPU with AVX-512 (measured on
    a Zen 5 whose environment set OPENBLAS_CORETYPE=Haswell: single-thread products 110-128
    GFLOP/s against 153-249 with the SkylakeX kernels OpenBLAS picks itself)."""
    i = numpy_blas()
    if i is None:
        return "BLAS: unknown (threadpoolctl sees none)"
    arch = i.get("architecture") or ""
    line = f"BLAS: {i.get('internal_api')} {i.get('version') or ''}" + (f", {arch} kernels" if arch else "")
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if forced and arch.lower() in AVX2_CORES and has_avx512():
        line += (f" (forced by OPENBLAS_CORETYPE={forced}: this CPU has AVX-512; without the variable"
                 " OpenBLAS picks faster kernels)")
    return line


def wide_kernels() -> bool:
    """Whether numpy's BLAS runs AVX-512 (16-wide) kernels: the CPU has AVX-512 and, where the
    BLAS is an OpenBLAS that names its kernel set, that set is one of AVX512_CORES (an
    OPENBLAS_CORETYPE=Haswell in the environment makes it run AVX2 kernels on an AVX-512 CPU).
    Other BLASes (MKL) are taken to use what the CPU has. conv.wide_vectors asks this."""
    if not has_avx512():
        return False
    i = numpy_blas() or {}
    arch = (i.get("architecture") or "").lower()
    if i.get("internal_api") == "openblas" and arch:
        return arch in AVX512_CORES
    return True


def has_avx512() -> bool:
    """Whether this machine's cores have AVX-512 (Linux: /proc/cpuinfo; elsewhere: no)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512f" in line.split() for line in f)
    except OSError:
        return False


OWN = None          # whether products run in flowdsl's own kernel (see own_products)
OWN_MIN_WORK = 1 << 16  # ... for products (or stacks of them) of at least this many multiply-adds:
                        # below, a BLAS call costs less than the kernel's own call (1 x 512 x 64
                        # at batch 1: 3.2 us against 1.9; 4 x 512 x 64: 3.3 against 5.2)


def own_products() -> bool:
    """Whether the products run in flowdsl's own 16-wide kernel (flowdsl/_vgemm.py) instead of
    numpy's BLAS: on CPUs with AVX-512. Measured on a Zen 5 (2026-12-07, 2 threads, interleaved
    against ONNX Runtime and PyTorch): with OpenBLAS forced to its Haswell kernels by the
    environment, the bench nets' products ran 1.2-2.3x faster in it (one thread), inference at
    batch 256 A 1.58x and B 1.32x; with OpenBLAS's own SkylakeX kernels still A 1.29x and B
    1.07x (42,078 against 32,537 img/s; 59,385 against 55,638), B's training 1.24x, A's level
    (its kernel runs the shapes at 73-119 GMAC/s, SkylakeX at 82-105, and a Winograd stack is
    one call instead of numpy's loop of 36). Elsewhere numpy's BLAS: its AVX2 kernels are what
    this kernel would become without AVX-512. FLOWDSL_OWN_GEMM=0 or 1 overrides."""
    global OWN
    if OWN is None:
        env = os.environ.get("FLOWDSL_OWN_GEMM")
        OWN = env == "1" if env in ("0", "1") else has_avx512()
    return OWN


def _own(a, b):
    """Whether a @ b (2-D, or stacks) runs in flowdsl's own kernel: own_products(), at least
    OWN_MIN_WORK multiply-adds, and at least one vector (16) of columns: narrower products
    waste most of each vector and its edge path stores through a buffer (net C's dense(2)
    weight gradient, 40000 x 20 x 2: 553 us against BLAS's 149; the glasses net trained at
    0.71x)."""
    return runs_own(a.size, b.shape[-1])


def runs_own(a_size, cols):
    """_own for a product whose A holds a_size values and whose B has cols columns."""
    return (OWN if OWN is not None else own_products()) and cols >= 16 and a_size * cols >= OWN_MIN_WORK


def dot(a, b, out=None):
    """a @ b for 2-D float32 arrays (either may be a view), into out (C-contiguous) if given:
    flowdsl's own kernel where _own says so (and out, if given, is C-contiguous), else numpy's
    (np.dot lets the GIL go for any size; see the module's note)."""
    if _own(a, b) and (out is None or out.flags.c_contiguous):
        return _vgemm().matmul(a, b, out)
    if out is None:
        return np.dot(a, b)
    return np.matmul(a, b, out=out)


_VG = None


def _vgemm():
    """flowdsl._vgemm, imported on first use (it needs numba configured)."""
    global _VG
    if _VG is None:
        from . import _vgemm as vg
        _VG = vg
    return _VG


def set_threads(n: int):
    """Use n threads for products (and cap BLAS's own pool at one)."""
    global _pool, _threads
    with _lock:
        try:
            from threadpoolctl import threadpool_limits
            threadpool_limits(1, user_api="blas")
        except ImportError:  # threadpoolctl is a dependency; without it BLAS keeps its threads
            pass
        if n != _threads or (_pool is None and n > 1):
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(n - 1, thread_name_prefix="flowdsl-mm",
                                       initializer=_init_thread) if n > 1 else None
            _threads = n


def _init_thread():
    from .jit import flush_thread   # denormals as zero in the products (flowdsl/_fpmode.py)
    flush_thread()


def _team():
    """The threads a call may use: one inside a split pass (each thread on its own share)."""
    return _threads if _pool is not None and not _solo else 1


def solo():
    """Whether a call runs on the calling thread alone: one thread, or inside a split pass."""
    return _team() == 1


def cuts(n, t):
    """The bounds of t contiguous shares of range(n)."""
    return [n * i // t for i in range(t + 1)]


def mm(a, b):
    """a @ b for 2-D float32 arrays (either may be a transposed view)."""
    m, k = a.shape
    n = b.shape[1]
    t = _team()
    if t <= 1 or m * k * n < MIN_WORK:
        return dot(a, b)   # (not a @ b: see the module's note on the GIL)
    if m >= 8 * t and k < KSPLIT * m:
        # row blocks of about ROWS rows, a contiguous run of them per thread: products with a
        # short inner dimension and a wide output (input-gradient columns) ran 40% faster in
        # blocks than in one half per thread (the output block stays in cache)
        nb = max(t, -(-m // ROWS))
        nb = -(-nb // t) * t
        rc = cuts(m, nb)
        out = np.empty((m, n), np.float32)

        def run(j):
            for i in range(nb * j // t, nb * (j + 1) // t):
                dot(a[rc[i]:rc[i + 1]], b, out=out[rc[i]:rc[i + 1]])   # no temporary

        futs = [_pool.submit(run, j) for j in range(1, t)]
        run(0)
        for f in futs:
            f.result()
        return out
    # few rows, long inner dimension (weight gradients): partial sums over k. (Splitting rows
    # there makes every thread read all of b: a 26 x 36864 x 20 product took 1.7 ms so, 0.6 split
    # over k.)
    kc = cuts(k, t)
    futs = [_pool.submit(dot, a[:, kc[i]:kc[i + 1]], b[kc[i]:kc[i + 1]]) for i in range(1, t)]
    out = dot(a[:, :kc[1]], b[:kc[1]])
    for f in futs:
        out += f.result()
    return out


def shares(n, run, work):
    """run(lo, hi) over contiguous shares of range(n), one per thread, the calling thread taking
    the first: one hand-over per call, however many steps each share takes (a conv's im2col and
    product chunk by chunk, its cache-sized buffers its own). work: multiply-adds in all; below
    MIN_WORK the calling thread runs run(0, n) alone."""
    t = max(1, min(_team(), n))
    if t == 1 or work < MIN_WORK:
        run(0, n)
        return
    c = cuts(n, t)
    futs = [_pool.submit(run, c[i], c[i + 1]) for i in range(1, t)]
    try:
        run(0, c[1])
    finally:
        for f in futs:
            f.result()


def split(n, run, work):
    """run(lo, hi) over contiguous shares of range(n), one per thread, each thread running
    everything inside on its own: products, kernels (their serial twins), chunking. An
    evaluation pass goes through this once instead of handing each layer's work over (two
    wake-ups a layer; see flowdsl.net). Returns the runs' results in order, or None when the
    work (multiply-adds) is too small to split (below SPLIT_MIN) or there is one thread: the
    caller then runs the pass itself. The shares are cuts(n, split_threads(n))."""
    t = split_threads(n)
    if t <= 1 or work < SPLIT_MIN:
        return None
    c = cuts(n, t)
    with alone():
        futs = [_pool.submit(run, c[i], c[i + 1]) for i in range(1, t)]
        try:
            first = run(0, c[1])
        finally:
            rest = [f.result() for f in futs]
    return [first] + rest


@contextmanager
def alone():
    """Every thread computes its own products and kernels (their serial twins) while inside:
    the shares of `split`, and the caller's share of a split training step whose other shares
    run in helper processes (flowdsl/forked.py)."""
    global _solo
    with _lock:
        _solo = True
        try:
            yield
        finally:
            _solo = False


def split_threads(n):
    """How many shares split would cut n samples into (1: it would not split)."""
    return min(_team(), n)


def mm_stack(a, b):
    """a[e] @ b[e] for stacks of 2-D float32 matrices (either may be transposed views): the
    products are shared out among the threads whole, one single-threaded BLAS call each
    (Winograd's 16 or 36 per conv), each written straight into its slice of the result (`out[i] =
    a[i] @ b[i]` wrote a temporary and copied it: 36 products of 576x32 by 32x64, one thread,
    2.03 -> 1.55 ms). On one thread, or inside a split pass, the stack is one np.matmul: numpy
    loops over the products in C and takes the GIL back once, not once a product. In a split
    training pass the other thread is often holding the GIL, and each taking-back then waited
    for it, asleep, and a wake-up (~0.1 ms here): net A's step (2 threads, batch 64) went from
    ~50 to ~15 sleeps per thread and 1.21x faster (B 1.10x, fashion.flow 1.04x; one thread
    1.04x), interleaved in one process, 2026-12-07."""
    e = a.shape[0]
    out = np.empty((e, a.shape[1], b.shape[2]), np.float32)
    t = max(1, min(_team(), e))
    own = _own(a, b)
    if own:
        matmul, matmul_stack = _vgemm().matmul, _vgemm().matmul_stack
    if t == 1:   # one call, one release of the GIL for the whole stack (see below)
        if own:
            return matmul_stack(a, b, out)
        np.matmul(a, b, out=out)
        return out

    def run(j):
        for i in range(e * j // t, e * (j + 1) // t):
            if own:
                matmul(a[i], b[i], out[i])
            else:
                np.matmul(a[i], b[i], out=out[i])

    futs = [_pool.submit(run, j) for j in range(1, t)]
    run(0)
    for f in futs:
        f.result()
    return out


def colsum(a, out):
    """out[j] = sum_i a[i, j] for a 2-D float32 array (bias gradients), as one product with a row
    of ones: numpy's sum over axis 0 of a tall, narrow array ran 3-11x slower here (36864 x 20:
    0.85 ms against 0.08)."""
    out[...] = np.dot(np.ones((1, a.shape[0]), np.float32), a)[0]
    return out
