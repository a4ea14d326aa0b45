"""flowdsl/_vgemm.py, flowdsl's own 16-wide float32 product (used where the CPU has AVX-512 and
numpy's BLAS runs narrower kernels: blas.own_products), checked against float64 products on any
machine (LLVM splits its 16-wide vectors where the CPU has no AVX-512): every edge of its 6 x 32
blocks (and the twelve-row blocks of a last vector of columns), transposed and strided operands,
stacks, and no write outside its output."""
import numpy as np
import pytest

from flowdsl import blas, jit


@pytest.fixture(scope="module")
def vg():
    jit.numba()
    from flowdsl import _vgemm
    return _vgemm


SHAPES = [(1, 1, 1), (5, 3, 7), (6, 32, 32), (7, 33, 40), (13, 5, 16), (17, 9, 17), (12, 20, 20),
          (108, 32, 64), (121, 288, 64), (64, 500, 40), (3, 1, 100), (2, 7, 8), (6, 4, 48),
          (11, 16, 31), (19, 2, 65), (1, 129, 10),
          (30, 7, 20), (25, 3, 1), (24, 5, 48), (36, 4, 41),   # twelve-row edge blocks (_edge12)
          (7, 1300, 20), (13, 1025, 33)]                        # passes of KB over the inner dimension


def check(got, a, b):
    want = a.astype(np.float64) @ b.astype(np.float64)
    k = a.shape[-1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.sqrt(k) * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matmul_is_the_product_for_every_edge(vg, m, k, n):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    for ta, tb in [(False, False), (True, False), (False, True), (True, True)]:
        a = rng.standard_normal((k, m)).astype(np.float32).T if ta else rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((n, k)).astype(np.float32).T if tb else rng.standard_normal((k, n)).astype(np.float32)
        got = vg.matmul(a, b)
        assert got.shape == (m, n) and got.dtype == np.float32
        check(got, a, b)


@pytest.mark.parametrize("m,k,n", [(1, 3, 1), (7, 5, 3), (13, 9, 40), (6, 2, 16), (5, 4, 33), (24, 3, 9), (12, 2, 5)])
def test_matmul_writes_only_its_output(vg, m, k, n):
    """Stores that spill past a row's end land only on later rows of the output: the values after
    it in the same buffer (and before it) keep theirs."""
    rng = np.random.default_rng(m + k + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    buf = np.full(m * n + 64, 7.5, np.float32)
    out = buf[16:16 + m * n].reshape(m, n)
    assert vg.matmul(a, b, out) is out
    check(out, a, b)
    assert (buf[:16] == 7.5).all() and (buf[16 + m * n:] == 7.5).all()


@pytest.mark.parametrize("r,c", [(576, 128), (16, 16), (17, 33), (64, 300), (250, 40), (33, 130), (4096, 1)])
def test_transposed_operands_are_copied_by_tiles(vg, r, c):
    """prepare copies a transposed B (W.T in input gradients) by 16 x 16 tiles in registers
    (large ones; TRANSPOSE_MIN) or numpy (small ones): the same values either way, every edge,
    nothing written outside the copy."""
    a = np.random.default_rng(r + c).standard_normal((r, c)).astype(np.float32)
    got = vg.prepare(a.T)
    assert got.shape == (r * c,) and np.array_equal(got.reshape(c, r), a.T)
    buf = np.full(r * c + 48, 3.25, np.float32)
    vg._transpose(a.reshape(-1), buf[16:16 + r * c], r, c)
    assert np.array_equal(buf[16:16 + r * c].reshape(c, r), a.T)
    assert (buf[:16] == 3.25).all() and (buf[16 + r * c:] == 3.25).all()


@pytest.mark.parametrize("n,h,c,f,s,k", [(1, 12, 20, 5, 1, 40), (3, 9, 3, 3, 2, 17), (2, 7, 1, 2, 1, 33)])
def test_a_conv_input_read_as_its_im2col_matrix(vg, n, h, c, f, s, k):
    """The left operand as (x, ra, ka), A[r, k] = x[ra[r] + ka[k]]: a conv's input read in place
    as its im2col matrix (_vconv.conv_eval) gives the product of the built matrix."""
    rng = np.random.default_rng(n + h + c)
    x = rng.standard_normal((n, h, h, c)).astype(np.float32)
    w = rng.standard_normal((f * f * c, k)).astype(np.float32)
    o = (h - f) // s + 1
    img, i, j = np.meshgrid(np.arange(n), np.arange(o), np.arange(o), indexing="ij")
    ra = (((img * h + i * s) * h + j * s) * c).reshape(-1).astype(np.int64)
    a, b, cc = np.meshgrid(np.arange(f), np.arange(f), np.arange(c), indexing="ij")
    ka = ((a * h + b) * c + cc).reshape(-1).astype(np.int64)
    cols = x.reshape(-1)[ra[:, None] + ka[None, :]]   # the im2col matrix, built by numpy
    out = np.full(n * o * o * k + 16, 7.5, np.float32)
    vg._product((x.reshape(-1), ra, ka), w.reshape(-1), out[:n * o * o * k], k, np.empty(16, np.float32),
                np.empty(n * o * o * k, np.float32), 7)   # passes of 7 taps
    check(out[:n * o * o * k].reshape(-1, k), cols, w)
    assert (out[n * o * o * k:] == 7.5).all()


def test_long_sums_run_in_passes(vg):
    """An inner dimension longer than KB runs in passes whose sums are added (_product): a weight
    gradient's product over 43,264 positions stays within 1.5e-6 of the scale of its float64
    value (one sum of 43,264 in order erred by 6e-6 here), the same in a stack."""
    rng = np.random.default_rng(5)
    a = rng.random((43264, 10), dtype=np.float32).T     # cols.T, as conv's weight gradient reads it
    b = rng.standard_normal((43264, 32), dtype=np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(want).max()
    assert a.shape[1] > 8 * vg.KB
    assert np.abs(vg.matmul(a, b) - want).max() < 1.5e-6 * scale
    got = vg.matmul_stack(np.stack([a, a[::-1]]), np.stack([b, b]))
    assert np.abs(got[0] - want).max() < 1.5e-6 * scale
    assert np.abs(got[1] - want[::-1]).max() < 1.5e-6 * scale


def test_matmul_stack_and_empty_products(vg):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((7, 33, 19)).astype(np.float32)
    b = rng.standard_normal((7, 19, 12)).astype(np.float32)
    check(vg.matmul_stack(a, b), a, b)
    at = np.ascontiguousarray(a.transpose(0, 2, 1)).transpose(0, 2, 1)   # Winograd's V^T
    check(vg.matmul_stack(at, b), at, b)
    assert vg.matmul(np.zeros((0, 4), np.float32), np.ones((4, 3), np.float32)).shape == (0, 3)
    z = vg.matmul(np.ones((3, 0), np.float32), np.ones((0, 5), np.float32))
    assert z.shape == (3, 5) and (z == 0).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_blas_products_with_the_own_kernel(monkeypatch, threads):
    """With own_products on (as on an AVX-512 CPU whose OpenBLAS runs AVX2 kernels), blas.mm,
    mm_stack and dot give the products: large ones through the kernel, small ones (below
    OWN_MIN_WORK) through numpy."""
    jit.numba()
    monkeypatch.setattr(blas, "OWN", True)
    rng = np.random.default_rng(threads)
    old = blas._threads
    try:
        blas.set_threads(threads)
        for m, k, n in [(9000, 13, 7), (26, 20000, 20), (700, 90, 33), (5, 7, 3), (1, 512, 64)]:
            a = rng.standard_normal((m, k)).astype(np.float32)
            b = rng.standard_normal((k, n)).astype(np.float32)
            check(blas.mm(a, b), a, b)
            check(blas.dot(a.T.copy().T, b), a, b)
        a = rng.standard_normal((16, 300, 24)).astype(np.float32)
        b = rng.standard_normal((16, 24, 40)).astype(np.float32)
        check(blas.mm_stack(a, b), a, b)
    finally:
        blas.set_threads(old)


def test_own_products_on_avx512_cpus_and_the_override(monkeypatch):
    monkeypatch.setattr(blas, "OWN", None)
    monkeypatch.setenv("FLOWDSL_OWN_GEMM", "1")
    assert blas.own_products() is True
    monkeypatch.setattr(blas, "OWN", None)
    monkeypatch.setenv("FLOWDSL_OWN_GEMM", "0")
    assert blas.own_products() is False
    monkeypatch.delenv("FLOWDSL_OWN_GEMM")
    for avx512 in (True, False):   # AVX-512 CPUs run it, whatever the BLAS's kernels
        monkeypatch.setattr(blas, "OWN", None)
        monkeypatch.setattr(blas, "has_avx512", lambda: avx512)
        assert blas.own_products() is avx512
    monkeypatch.setattr(blas, "OWN", None)


def test_wide_rules_only_where_a_wide_blas_runs_the_products(monkeypatch):
    """conv.wide_vectors (evaluation's gemm-first rules) holds where numpy's BLAS runs AVX-512
    kernels and runs the products, not where flowdsl's own kernel does."""
    import flowdsl.layers.conv as convmod
    monkeypatch.delenv("FLOWDSL_WIDE", raising=False)
    for wide, own, want in [(True, False, True), (True, True, False), (False, False, False)]:
        monkeypatch.setattr(convmod, "WIDE", None)
        monkeypatch.setattr(blas, "wide_kernels", lambda: wide)
        monkeypatch.setattr(blas, "own_products", lambda: own)
        assert convmod.wide_vectors() is want
    monkeypatch.setattr(convmod, "WIDE", None)


def test_a_training_step_is_the_same_with_either_product(monkeypatch):
    """A conv net's loss and gradients (gemm, Winograd F(2x2) and F(4x4) convs, dense) with the
    own kernel and with numpy's BLAS agree to float32 rounding."""
    from flowdsl.model import build_text
    text = ("network = input(16x16x3) :: conv(filters=16, field=3, stride=2, pad=1, act=relu)"
            " :: conv(filters=32, field=3, pad=1, act=relu) :: conv(filters=40, field=3) :: maxpool"
            " :: dense(24, act=relu) :: dense(10) :: softmax\n")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 16, 16, 3)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    out = {}
    for own in (False, True):
        monkeypatch.setattr(blas, "OWN", own)
        from flowdsl.net import Net
        net = Net(build_text(text, "t.flow"), seed=1)
        loss = net.loss_grad(x, y)
        out[own] = (loss, {k: {n: g.copy() for n, g in v.items()} for k, v in net.grads.items()},
                    net.predict(x))
    assert [l.algo_for(40) for l in net.layers if l.__class__.__name__ == "Conv"] == ["gemm", "winograd", "winograd4"]
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-5)
    for layer, gs in out[False][1].items():
        for name, g in gs.items():
            np.testing.assert_allclose(out[True][1][layer][name], g, rtol=2e-4,
                                       atol=2e-5 * max(1e-3, np.abs(g).max()))
    np.testing.assert_allclose(out[True][2], out[False][2], rtol=1e-4, atol=1e-6)


def test_matmul_reads_nothing_past_b(vg):
    """B's rows need not be a multiple of 16 long: the last row's tail is read through a buffer.
    B here ends exactly where an unreadable page begins, so a vector load past its end would
    crash the test process."""
    import ctypes
    import mmap
    page = mmap.PAGESIZE
    region = mmap.mmap(-1, 2 * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    libc = ctypes.CDLL(None, use_errno=True)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert libc.mprotect(ctypes.c_void_p(addr + page), ctypes.c_size_t(page), 0) == 0   # PROT_NONE
    rng = np.random.default_rng(5)
    try:
        for k, n in [(7, 40), (3, 20), (5, 8), (2, 33), (9, 17)]:
            floats = 3 * k * n
            b3 = np.frombuffer(region, np.float32, count=floats, offset=page - 4 * floats).reshape(3, k, n)
            b3[...] = rng.standard_normal((3, k, n))
            b = b3[2]
            for m in (1, 6, 7, 13):
                a = rng.standard_normal((m, k)).astype(np.float32)
                check(vg.matmul(a, b), a, b)
            st = rng.standard_normal((3, 5, k)).astype(np.float32)
            check(vg.matmul_stack(st, b3), st, b3)
    finally:
        libc.mprotect(ctypes.c_void_p(addr + page), ctypes.c_size_t(page), 3)


def test_dot_into_a_strided_output_leaves_the_own_kernel_alone(vg, monkeypatch):
    """The kernel writes C-contiguous outputs only: blas.dot gives a strided `out` to numpy,
    and _vgemm.matmul refuses one rather than write into a copy."""
    monkeypatch.setattr(blas, "OWN", True)
    rng = np.random.default_rng(9)
    a = rng.standard_normal((300, 40)).astype(np.float32)
    b = rng.standard_normal((40, 64)).astype(np.float32)
    big = np.zeros((300, 128), np.float32)
    out = big[:, ::2]
    assert blas.dot(a, b, out=out) is out
    check(out, a, b)
    with pytest.raises(ValueError):
        vg.matmul(a, b, out)
