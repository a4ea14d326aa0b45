"""flowdsl.blas.mm: the split products (row blocks, partial sums over the inner dimension, one
call when small) give a @ b for any thread count and for transposed views."""
import numpy as np
import pytest

from flowdsl import blas, jit


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m,k,n", [
    (9000, 13, 7),      # many rows: row blocks (more than one per thread, uneven cuts)
    (26, 20000, 20),    # few rows, long inner dimension: partial sums over k
    (501, 4096, 40),    # inner dimension >= 4x the rows: partial sums
    (700, 90, 33),      # row blocks, one per thread
    (5, 7, 3),          # below MIN_WORK: one call
])
def test_mm_matches_float64_product(threads, m, k, n):
    jit.numba()
    rng = np.random.default_rng(m + k + n)
    old = blas._threads
    try:
        blas.set_threads(threads)
        for ta in (False, True):
            a = (rng.standard_normal((k, m)).astype(np.float32).T if ta
                 else rng.standard_normal((m, k)).astype(np.float32))
            b = rng.standard_normal((k, n)).astype(np.float32)
            want = a.astype(np.float64) @ b.astype(np.float64)
            got = blas.mm(a, b)
            assert got.shape == (m, n) and got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    finally:
        blas.set_threads(old)


@pytest.mark.parametrize("m,k", [(36864, 20), (3, 5), (1, 7)])
def test_colsum_is_the_column_sums(m, k):
    """blas.colsum (bias gradients) writes the column sums into `out` and returns it."""
    a = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    out = np.full(k, np.nan, np.float32)
    got = blas.colsum(a, out)
    assert got is out and out.dtype == np.float32
    np.testing.assert_allclose(out, a.astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-6 * np.sqrt(m))


@pytest.mark.parametrize("threads,solo", [(1, False), (2, False), (3, False), (2, True)])
def test_mm_stack_is_each_product(threads, solo, monkeypatch):
    """mm_stack: one product per stack entry, shared out among the threads or (one thread, inside a
    split pass) as one stacked call; either operand may be a transposed view (Winograd's V^T and
    U^T), and the result is a fresh float32 array."""
    jit.numba()
    rng = np.random.default_rng(threads)
    old = blas._threads
    try:
        blas.set_threads(threads)
        monkeypatch.setattr(blas, "_solo", solo)
        for ta, tb in [(False, False), (True, False), (False, True)]:
            a = rng.standard_normal((7, 33, 19)).astype(np.float32)
            b = rng.standard_normal((7, 19, 12)).astype(np.float32)
            a = np.ascontiguousarray(a.transpose(0, 2, 1)).transpose(0, 2, 1) if ta else a
            b = np.ascontiguousarray(b.transpose(0, 2, 1)).transpose(0, 2, 1) if tb else b
            got = blas.mm_stack(a, b)
            assert got.shape == (7, 33, 12) and got.dtype == np.float32 and got.flags.c_contiguous
            for e in range(7):
                want = a[e].astype(np.float64) @ b[e].astype(np.float64)
                np.testing.assert_allclose(got[e], want, rtol=1e-4, atol=1e-4 * np.sqrt(19))
    finally:
        blas.set_threads(old)


def test_describe_names_the_kernels_and_a_forced_avx2_core(monkeypatch):
    """`flowdsl bench` and the bench scripts print the BLAS numpy runs in; OPENBLAS_CORETYPE
    forcing AVX2 kernels on an AVX-512 CPU (as one machine's environment did: products at half
    speed) is said, and only then."""
    import threadpoolctl
    from flowdsl import blas
    info = [{"user_api": "blas", "internal_api": "openblas", "version": "0.3.31", "architecture": "Haswell"}]
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: info)
    monkeypatch.setattr(blas, "has_avx512", lambda: True)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    line = blas.describe()
    assert line.startswith("BLAS: openblas 0.3.31, Haswell kernels") and "OPENBLAS_CORETYPE=Haswell" in line
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert blas.describe() == "BLAS: openblas 0.3.31, Haswell kernels"   # picked by OpenBLAS itself
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setattr(blas, "has_avx512", lambda: False)              # an AVX2 CPU: nothing to say
    assert blas.describe() == "BLAS: openblas 0.3.31, Haswell kernels"
    info[0]["architecture"] = "SkylakeX"
    monkeypatch.setattr(blas, "has_avx512", lambda: True)
    assert blas.describe() == "BLAS: openblas 0.3.31, SkylakeX kernels"


def test_numpy_blas_is_the_one_in_numpys_folder(monkeypatch):
    """Another library's BLAS listed first (numba imports scipy, whose OpenBLAS is older) is not
    taken for numpy's: describe and wide_kernels read the one inside numpy's folder."""
    import os
    import threadpoolctl
    home = os.path.dirname(os.path.abspath(np.__file__))
    scipy_one = {"user_api": "blas", "internal_api": "openblas", "version": "0.3.30",
                 "architecture": "SkylakeX", "filepath": "/site-packages/scipy.libs/libscipy_openblas.so"}
    numpy_one = {"user_api": "blas", "internal_api": "openblas", "version": "0.3.31",
                 "architecture": "Haswell", "filepath": home + ".libs/libscipy_openblas64_.so"}
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: [scipy_one, numpy_one])
    assert blas.numpy_blas() is numpy_one
    assert blas.describe().startswith("BLAS: openblas 0.3.31, Haswell kernels")
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: [scipy_one])   # numpy's unknown
    assert blas.numpy_blas() is scipy_one
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: [])
    assert blas.numpy_blas() is None and blas.describe() == "BLAS: unknown (threadpoolctl sees none)"


@pytest.mark.parametrize("api,arch,avx512,wide", [
    ("openblas", "Haswell", True, False),     # OPENBLAS_CORETYPE=Haswell on an AVX-512 CPU
    ("openblas", "SkylakeX", True, True),
    ("openblas", "Cooperlake", True, True),
    ("openblas", "SapphireRapids", True, True),
    ("openblas", "Zen", True, False),
    ("openblas", "Haswell", False, False),    # an AVX2 CPU
    ("openblas", "", True, True),             # no kernel set named: what the CPU has
    ("mkl", None, True, True),
    ("mkl", None, False, False),
])
def test_wide_kernels_reads_the_blas_kernel_set(monkeypatch, api, arch, avx512, wide):
    """conv.wide_vectors' question: AVX-512 products only where the CPU has AVX-512 and
    OpenBLAS runs one of its AVX-512 kernel sets."""
    import threadpoolctl
    info = [{"user_api": "blas", "internal_api": api, "version": "x", "architecture": arch,
             "filepath": "/x/libblas.so"}]
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: info)
    monkeypatch.setattr(blas, "has_avx512", lambda: avx512)
    assert blas.wide_kernels() is wide
