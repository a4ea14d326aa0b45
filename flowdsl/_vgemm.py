"""flowdsl's own float32 matrix product, in numba with 16-wide vector registers: used instead of
numpy's BLAS on CPUs with AVX-512 (blas.own_products).

Why: OpenBLAS picks its kernels when it loads; `OPENBLAS_CORETYPE=Haswell` in the environment (a
Zen 5 here, 2026-12-07), or an OpenBLAS older than the CPU (before 0.3.22 a Zen 4 ran as a Zen,
that is Haswell kernels), makes it run AVX2 kernels on an AVX-512 CPU: 45-58 GMAC/s one thread
on the shapes of nets A and B's products, where this kernel ran 73-119. OpenBLAS's own SkylakeX
kernels ran them at 82-105, but whole passes still ran faster with this kernel (a Winograd stack
is one call here, 36 in numpy's loop; docs/internals.md).

The kernel: C (M, N) = A (M, K) @ B (K, N), C = 6 rows x 32 columns of accumulators held in
registers (12 vectors of 16 floats) over the whole inner dimension, each step one row of B as
two vector loads and six broadcasts of A's values, 12 fused multiply-adds. numba has no vector
type, so one is declared here (F32x16, an LLVM <16 x float>) with the few operations the kernel
needs as intrinsics (load, store, broadcast, fma); LLVM keeps the accumulators in registers and,
on a CPU without AVX-512, splits each into narrower ones (correct, slower: not used there).
A last vector of columns (N not a multiple of 32, at most 16 left) runs twelve rows at a time
(`_edge12`: 64 x 500 x 40, net B's conv2 at batch 1, 14.5 -> 14.0 us; 4096 x 501 x 40 964 ->
859). B's rows must be contiguous (`prepare` copies when not, a transposed B by register
tiles); A may be any 2-D view (a transposed one included); C is written whole, tails through
a small buffer.
Imported only once numba is configured (flowdsl.jit), by flowdsl.blas."""
import inspect

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

from .jit import FLAGS

W = 16                    # floats a vector
MR = 6                    # rows a block
_VT = ir.VectorType(ir.FloatType(), W)
_OPTS = dict(FLAGS, fastmath=False, _nrt=False)   # the arithmetic is spelled out (fma, in order);
# no reference counting: passing arrays to the helpers had cost atomic increments each block


class F32x16(types.Type):
    def __init__(self):
        super().__init__(name="F32x16")


f32x16 = F32x16()


@register_model(F32x16)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VT)


def _ptr(context, builder, aryty, ary, idx):
    a = context.make_array(aryty)(context, builder, ary)
    return cgutils.get_item_pointer(context, builder, aryty, a, [idx], wraparound=False)


@intrinsic
def _vload(typingctx, ary, idx):
    """The 16 floats ary[idx:idx + 16] (a 1-D contiguous float32 array; not checked)."""
    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(p, _VT.as_pointer()), align=4)
    return f32x16(ary, idx), codegen


@intrinsic
def _vstore(typingctx, ary, idx, v):
    """ary[idx:idx + 16] = v."""
    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(p, _VT.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.void(ary, idx, v), codegen


@intrinsic
def _vsplat(typingctx, x):
    """16 copies of the float32 x."""
    def codegen(context, builder, sig, args):
        v = builder.insert_element(ir.Constant(_VT, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), W), [0] * W)
        return builder.shuffle_vector(v, ir.Constant(_VT, ir.Undefined), zeros)
    return f32x16(types.float32), codegen


@intrinsic
def _vbroadcast(typingctx, ary, idx):
    """16 copies of ary[idx] (a 1-D float32 array; idx not checked, never wrapped around: a
    plain index's negative-index test cost four instructions a use in an inner loop)."""
    def codegen(context, builder, sig, args):
        x = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1]), align=4)
        v = builder.insert_element(ir.Constant(_VT, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), W), [0] * W)
        return builder.shuffle_vector(v, ir.Constant(_VT, ir.Undefined), zeros)
    return f32x16(ary, idx), codegen


@intrinsic
def _vfma(typingctx, a, b, c):
    """a * b + c, each lane rounded once."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VT, [_VT] * 3), "llvm.fma.v16f32")
        return builder.call(fn, args)
    return f32x16(a, b, c), codegen


@intrinsic
def _vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_VT, [0.0] * W)
    return f32x16(), codegen


def _butterfly_masks():
    """The shuffles of a 16 x 16 transpose in four stages: at block size s (8, 4, 2, 1) rows r
    and r + s (r & s == 0) swap their off-diagonal s x s blocks. Each new row takes lanes of the
    pair (a, b) concatenated: (mask for the new row r, mask for the new row r + s)."""
    out = []
    for s in (8, 4, 2, 1):
        lo = [16 + e - s if e & s else e for e in range(W)]
        hi = [16 + e if e & s else e + s for e in range(W)]
        out.append((s, lo, hi))
    return out


_MASKS = [(s, ir.Constant(ir.VectorType(ir.IntType(32), W), lo), ir.Constant(ir.VectorType(ir.IntType(32), W), hi))
          for s, lo, hi in _butterfly_masks()]


@intrinsic
def _vtranspose16(typingctx, src, si, ss, dst, di, ds):
    """dst[di + j*ds + i] = src[si + i*ss + j] for i, j < 16 (1-D float32 arrays, not checked):
    a 16 x 16 tile transposed in registers, 16 vector loads, 64 shuffles, 16 stores. (numpy's
    transposing copy of a 576 x 128 matrix took 50 us here, a scalar numba loop 41: strides of
    a power of two map a column's reads onto few cache sets.)"""
    def codegen(context, builder, sig, args):
        srcty, _, _, dstty, _, _ = sig.args
        src_a, si_v, ss_v, dst_a, di_v, ds_v = args
        rows = []
        for i in range(W):
            idx = builder.add(si_v, builder.mul(ss_v, ir.Constant(si_v.type, i)))
            p = _ptr(context, builder, srcty, src_a, idx)
            rows.append(builder.load(builder.bitcast(p, _VT.as_pointer()), align=4))
        for s, lo, hi in _MASKS:
            for r in range(W):
                if r & s:
                    continue
                a, b = rows[r], rows[r + s]
                rows[r] = builder.shuffle_vector(a, b, lo)
                rows[r + s] = builder.shuffle_vector(a, b, hi)
        for j in range(W):
            idx = builder.add(di_v, builder.mul(ds_v, ir.Constant(di_v.type, j)))
            p = _ptr(context, builder, dstty, dst_a, idx)
            builder.store(rows[j], builder.bitcast(p, _VT.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.void(src, si, ss, dst, di, ds), codegen


@njit(**_OPTS)
def _transpose(a, out, r_, c_):
    """out (c_ x r_, flat) = the transpose of a (r_ x c_, flat): 16 x 16 tiles in registers,
    the edges element by element."""
    rfull = r_ // W * W
    cfull = c_ // W * W
    for i0 in range(0, rfull, W):
        for j0 in range(0, cfull, W):
            _vtranspose16(a, i0 * c_ + j0, c_, out, j0 * r_ + i0, r_)
    for i in range(rfull):
        for j in range(cfull, c_):
            out[j * r_ + i] = a[i * c_ + j]
    for i in range(rfull, r_):
        for j in range(c_):
            out[j * r_ + i] = a[i * c_ + j]


# The operations as kernels call them: in numba each is its intrinsic above (inlined); called
# as Python (the tests run every layer kernel's plain-Python version against the compiled one)
# a vector is a float32 array of 16, and loads and stores past an array's end are clipped.
def vload(ary, idx):
    v = np.zeros(W, np.float32)
    part = ary[idx:idx + W]
    v[:len(part)] = part
    return v


def vstore(ary, idx, v):
    m = max(0, min(W, ary.shape[0] - idx))
    ary[idx:idx + m] = v[:m]


def vsplat(x):
    return np.full(W, x, np.float32)


def vbroadcast(ary, idx):
    return np.full(W, ary[idx], np.float32)


def vfma(a, b, c):
    return (a.astype(np.float64) * b + c).astype(np.float32)


def vzero():
    return np.zeros(W, np.float32)


def _compiled_as(py, nb):
    """In numba, the Python operation py is its intrinsic nb (inlined): an overload whose
    arguments carry py's names, as numba requires."""
    args = ", ".join(inspect.signature(py).parameters)
    ns = {"nb": nb}
    exec(f"def typer({args}):\n    return lambda {args}: nb({args})", ns)
    overload(py, inline="always")(ns["typer"])


for _py, _nb in ((vload, _vload), (vstore, _vstore), (vsplat, _vsplat), (vbroadcast, _vbroadcast),
                 (vfma, _vfma), (vzero, _vzero)):
    _compiled_as(_py, _nb)


# A, the left operand, is a 2-D array (any strides), or a conv's input read as its im2col
# matrix without building it: (x, ra, ka), A[r, k] = x[ra[r] + ka[k]] (x flat, ra the offset of
# output position r's window, ka the offset of tap k inside a window; _vconv.conv_eval).
def _at(A, r, k):
    return A[r, k] if isinstance(A, np.ndarray) else A[0][A[1][r] + A[2][k]]


def _shape(A):
    return A.shape if isinstance(A, np.ndarray) else (A[1].shape[0], A[2].shape[0])


@intrinsic
def _get(typingctx, ary, idx):
    """ary[idx] (1-D, any dtype), the index never wrapped around (see _vbroadcast)."""
    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1]))
    return ary.dtype(ary, idx), codegen


@overload(_at, inline="always")
def _ol_at(A, r, k):
    if isinstance(A, types.Array):
        return lambda A, r, k: A[r, k]
    return lambda A, r, k: _get(A[0], _get(A[1], r) + _get(A[2], k))


@overload(_shape, inline="always")
def _ol_shape(A):
    if isinstance(A, types.Array):
        return lambda A: A.shape
    return lambda A: (A[1].shape[0], A[2].shape[0])


@njit(inline="always", **_OPTS)
def _put(c, ci, v, cols, tmp):
    """c[ci:ci + cols] = the first cols lanes of v: all 16 stored at once while they stay inside
    c (the lanes past cols land on later rows' first columns, which later stores write: _mm
    stores each row block's column blocks last to first, rows in order), else through tmp."""
    if cols >= W or ci + W <= c.shape[0]:
        vstore(c, ci, v)
    elif cols > 0:
        vstore(tmp, 0, v)
        for j in range(cols):
            c[ci + j] = tmp[j]


@njit(inline="always", **_OPTS)
def _load_end(b, i, tmp):
    """b[i:i + 16] as a vector where it runs past the end of b: the lanes past it are 0 (the
    last row of a B whose rows are not a multiple of 16 long; earlier rows' tails read the next
    row's first values, whose lanes are dropped)."""
    end = b.shape[0]
    for j in range(W):
        tmp[j] = b[i + j] if i + j < end else np.float32(0.0)
    return vload(tmp, 0)


@njit(**_OPTS)
def _block(A, b, c, n_, m0, n0, tmp, k0, k1):
    """The block of rows m0.. (up to 6; rows past M repeat row M - 1 and are not stored) and
    columns n0.. (two vectors when more than one vector of columns is left, else one) of
    c = A @ B, any edge: the whole-block stores of _mm's main loop where the block is whole,
    _put's where not."""
    m_ = _shape(A)[0]
    last = m_ - 1
    r0, r1, r2 = m0, min(m0 + 1, last), min(m0 + 2, last)
    r3, r4, r5 = min(m0 + 3, last), min(m0 + 4, last), min(m0 + 5, last)
    rows = min(MR, m_ - m0)
    end = b.shape[0]
    if n0 + W < n_:   # two vectors of columns
        c00 = vzero(); c01 = vzero(); c10 = vzero(); c11 = vzero(); c20 = vzero(); c21 = vzero()
        c30 = vzero(); c31 = vzero(); c40 = vzero(); c41 = vzero(); c50 = vzero(); c51 = vzero()
        bi = k0 * n_ + n0
        for k in range(k0, k1):
            b0 = vload(b, bi)
            b1 = vload(b, bi + W) if bi + 2 * W <= end else _load_end(b, bi + W, tmp)
            bi += n_
            x = vsplat(_at(A, r0, k))
            c00 = vfma(x, b0, c00)
            c01 = vfma(x, b1, c01)
            x = vsplat(_at(A, r1, k))
            c10 = vfma(x, b0, c10)
            c11 = vfma(x, b1, c11)
            x = vsplat(_at(A, r2, k))
            c20 = vfma(x, b0, c20)
            c21 = vfma(x, b1, c21)
            x = vsplat(_at(A, r3, k))
            c30 = vfma(x, b0, c30)
            c31 = vfma(x, b1, c31)
            x = vsplat(_at(A, r4, k))
            c40 = vfma(x, b0, c40)
            c41 = vfma(x, b1, c41)
            x = vsplat(_at(A, r5, k))
            c50 = vfma(x, b0, c50)
            c51 = vfma(x, b1, c51)
        cols0, cols1 = W, min(W, n_ - n0 - W)
        ci = m0 * n_ + n0
        if rows == MR and cols1 == W:   # the whole block
            vstore(c, ci, c00)
            vstore(c, ci + W, c01)
            vstore(c, ci + n_, c10)
            vstore(c, ci + n_ + W, c11)
            vstore(c, ci + 2 * n_, c20)
            vstore(c, ci + 2 * n_ + W, c21)
            vstore(c, ci + 3 * n_, c30)
            vstore(c, ci + 3 * n_ + W, c31)
            vstore(c, ci + 4 * n_, c40)
            vstore(c, ci + 4 * n_ + W, c41)
            vstore(c, ci + 5 * n_, c50)
            vstore(c, ci + 5 * n_ + W, c51)
            return
        _put(c, ci, c00, cols0, tmp)
        _put(c, ci + W, c01, cols1, tmp)
        if rows > 1:
            _put(c, ci + n_, c10, cols0, tmp)
            _put(c, ci + n_ + W, c11, cols1, tmp)
        if rows > 2:
            _put(c, ci + 2 * n_, c20, cols0, tmp)
            _put(c, ci + 2 * n_ + W, c21, cols1, tmp)
        if rows > 3:
            _put(c, ci + 3 * n_, c30, cols0, tmp)
            _put(c, ci + 3 * n_ + W, c31, cols1, tmp)
        if rows > 4:
            _put(c, ci + 4 * n_, c40, cols0, tmp)
            _put(c, ci + 4 * n_ + W, c41, cols1, tmp)
        if rows > 5:
            _put(c, ci + 5 * n_, c50, cols0, tmp)
            _put(c, ci + 5 * n_ + W, c51, cols1, tmp)
        return
    # one vector of columns
    c00 = vzero(); c10 = vzero(); c20 = vzero(); c30 = vzero(); c40 = vzero(); c50 = vzero()
    bi = k0 * n_ + n0
    for k in range(k0, k1):
        b0 = vload(b, bi) if bi + W <= end else _load_end(b, bi, tmp)
        bi += n_
        x0 = _at(A, r0, k)
        x1 = _at(A, r1, k)
        x2 = _at(A, r2, k)
        x3 = _at(A, r3, k)
        x4 = _at(A, r4, k)
        x5 = _at(A, r5, k)
        c00 = vfma(vsplat(x0), b0, c00)
        c10 = vfma(vsplat(x1), b0, c10)
        c20 = vfma(vsplat(x2), b0, c20)
        c30 = vfma(vsplat(x3), b0, c30)
        c40 = vfma(vsplat(x4), b0, c40)
        c50 = vfma(vsplat(x5), b0, c50)
    cols0 = n_ - n0
    ci = m0 * n_ + n0
    _put(c, ci, c00, cols0, tmp)
    if rows > 1:
        _put(c, ci + n_, c10, cols0, tmp)
    if rows > 2:
        _put(c, ci + 2 * n_, c20, cols0, tmp)
    if rows > 3:
        _put(c, ci + 3 * n_, c30, cols0, tmp)
    if rows > 4:
        _put(c, ci + 4 * n_, c40, cols0, tmp)
    if rows > 5:
        _put(c, ci + 5 * n_, c50, cols0, tmp)


@njit(**_OPTS)
def _edge12(A, b, c, n_, m0, n0, tmp, k0, k1):
    """Rows m0 .. m0 + 11 (all inside A) and the last columns n0 .. n_ - 1 (at most 16) of c =
    A @ B: one vector of columns for twelve rows, twelve accumulators. _block's one-vector
    path has six, each multiply-add waiting on the one before it in its chain (four cycles):
    half the rate of the whole blocks."""
    end = b.shape[0]
    c0 = vzero(); c1 = vzero(); c2 = vzero(); c3 = vzero(); c4 = vzero(); c5 = vzero()
    c6 = vzero(); c7 = vzero(); c8 = vzero(); c9 = vzero(); c10 = vzero(); c11 = vzero()
    bi = k0 * n_ + n0
    for k in range(k0, k1):
        b0 = vload(b, bi) if bi + W <= end else _load_end(b, bi, tmp)
        bi += n_
        c0 = vfma(vsplat(_at(A, m0, k)), b0, c0)
        c1 = vfma(vsplat(_at(A, m0 + 1, k)), b0, c1)
        c2 = vfma(vsplat(_at(A, m0 + 2, k)), b0, c2)
        c3 = vfma(vsplat(_at(A, m0 + 3, k)), b0, c3)
        c4 = vfma(vsplat(_at(A, m0 + 4, k)), b0, c4)
        c5 = vfma(vsplat(_at(A, m0 + 5, k)), b0, c5)
        c6 = vfma(vsplat(_at(A, m0 + 6, k)), b0, c6)
        c7 = vfma(vsplat(_at(A, m0 + 7, k)), b0, c7)
        c8 = vfma(vsplat(_at(A, m0 + 8, k)), b0, c8)
        c9 = vfma(vsplat(_at(A, m0 + 9, k)), b0, c9)
        c10 = vfma(vsplat(_at(A, m0 + 10, k)), b0, c10)
        c11 = vfma(vsplat(_at(A, m0 + 11, k)), b0, c11)
    cols = n_ - n0
    ci = m0 * n_ + n0
    _put(c, ci, c0, cols, tmp)
    _put(c, ci + n_, c1, cols, tmp)
    _put(c, ci + 2 * n_, c2, cols, tmp)
    _put(c, ci + 3 * n_, c3, cols, tmp)
    _put(c, ci + 4 * n_, c4, cols, tmp)
    _put(c, ci + 5 * n_, c5, cols, tmp)
    _put(c, ci + 6 * n_, c6, cols, tmp)
    _put(c, ci + 7 * n_, c7, cols, tmp)
    _put(c, ci + 8 * n_, c8, cols, tmp)
    _put(c, ci + 9 * n_, c9, cols, tmp)
    _put(c, ci + 10 * n_, c10, cols, tmp)
    _put(c, ci + 11 * n_, c11, cols, tmp)


@njit(**_OPTS)
def _mm(A, b, c, n_, tmp, k0, k1):
    """c (M x n_, flat, row-major) = A[:, k0:k1] @ B[k0:k1], B (K x n_, flat, row-major; a
    vector's lanes past n_ read the next row, or 0 past B's end, and their results are
    dropped). Whole 6 x 32 blocks run in the main loop below, spelled out: _block there, with
    its clamped rows and edge tests, ran 7-15% slower on short inner dimensions (one thread,
    2304 x 20 x 64 and a 36 x (108 x 32 x 64) Winograd stack, 2026-12-07; 1.5-2x while it still
    counted references, see _OPTS); the edges run _block (and _edge12), first the right-hand
    columns of the whole row blocks, last the bottom rows (their column blocks last to first),
    so that a store spilling past its row's end (_put) lands on columns a later store writes."""
    m_ = _shape(A)[0]
    mfull = m_ // MR * MR
    nfull = n_ // (2 * W) * (2 * W)
    if nfull < n_:
        m0 = 0
        if n_ - nfull <= W:   # one vector of columns left: twelve rows at a time
            while m0 + 2 * MR <= mfull:
                _edge12(A, b, c, n_, m0, nfull, tmp, k0, k1)
                m0 += 2 * MR
        for m0 in range(m0, mfull, MR):
            _block(A, b, c, n_, m0, nfull, tmp, k0, k1)
    for m0 in range(0, mfull, MR):
        for n0 in range(0, nfull, 2 * W):
            c00 = vzero(); c01 = vzero(); c10 = vzero(); c11 = vzero(); c20 = vzero(); c21 = vzero()
            c30 = vzero(); c31 = vzero(); c40 = vzero(); c41 = vzero(); c50 = vzero(); c51 = vzero()
            bi = k0 * n_ + n0
            for k in range(k0, k1):
                b0 = vload(b, bi)
                b1 = vload(b, bi + W)
                bi += n_
                x = vsplat(_at(A, m0, k))
                c00 = vfma(x, b0, c00)
                c01 = vfma(x, b1, c01)
                x = vsplat(_at(A, m0 + 1, k))
                c10 = vfma(x, b0, c10)
                c11 = vfma(x, b1, c11)
                x = vsplat(_at(A, m0 + 2, k))
                c20 = vfma(x, b0, c20)
                c21 = vfma(x, b1, c21)
                x = vsplat(_at(A, m0 + 3, k))
                c30 = vfma(x, b0, c30)
                c31 = vfma(x, b1, c31)
                x = vsplat(_at(A, m0 + 4, k))
                c40 = vfma(x, b0, c40)
                c41 = vfma(x, b1, c41)
                x = vsplat(_at(A, m0 + 5, k))
                c50 = vfma(x, b0, c50)
                c51 = vfma(x, b1, c51)
            ci = m0 * n_ + n0
            vstore(c, ci, c00)
            vstore(c, ci + W, c01)
            vstore(c, ci + n_, c10)
            vstore(c, ci + n_ + W, c11)
            vstore(c, ci + 2 * n_, c20)
            vstore(c, ci + 2 * n_ + W, c21)
            vstore(c, ci + 3 * n_, c30)
            vstore(c, ci + 3 * n_ + W, c31)
            vstore(c, ci + 4 * n_, c40)
            vstore(c, ci + 4 * n_ + W, c41)
            vstore(c, ci + 5 * n_, c50)
            vstore(c, ci + 5 * n_ + W, c51)
    if mfull < m_:
        n0 = (n_ - 1) // (2 * W) * (2 * W)   # column blocks from the last to the first
        while n0 >= 0:
            _block(A, b, c, n_, mfull, n0, tmp, k0, k1)
            n0 -= 2 * W


KB = 512   # inner dimension a pass (_product)


@njit(**_OPTS)
def _product(A, b, c, n_, tmp, part, kb):
    """c = A @ B (as _mm), an inner dimension longer than kb in passes of kb (A's columns, B's
    rows), each pass's product added to c through part (M x n_ floats; unused when K <= kb). A
    pass's rows of B stay in cache for every block of A's rows (a whole B of 7744 x 64 did not:
    289 x 7744 x 64 2.02 -> 1.22 ms, one thread), and each output is a sum of kb multiply-adds in
    order, those sums then added, instead of one sum of K in order, whose rounding grew with K
    (that product: 3.1e-6 of the scale against float64 -> 5.3e-7; BLAS, which blocks its sums
    too, ~4e-7)."""
    k_ = _shape(A)[1]
    size = c.shape[0]
    for k0 in range(0, max(k_, 1), kb):   # one call site: the compiled _mm is inlined once
        _mm(A, b, c if k0 == 0 else part, n_, tmp, k0, min(k0 + kb, k_))
        if k0 > 0:
            for q in range(size):
                c[q] += part[q]


@njit(**_OPTS)
def _mm_stack(A, B, C, n_, tmp, part, kb):
    """C[e] = A[e] @ B[e] for each e: A (E, M, K) any strides, B (E, K * n_) and C (E, M * n_)
    flat; part: M * n_ floats (_product's, when K > kb)."""
    for e in range(A.shape[0]):
        _product(A[e], B[e], C[e], n_, tmp, part, kb)


TRANSPOSE_MIN = 1 << 12   # prepare transposes by tiles from this many values (numpy's copy below:
                         # 0.3-0.5 us against 0.8 for a 17 x 33 matrix; 2.2 and 1.5 for 64 x 128)


def prepare(b):
    """b (..., K, N) flat per matrix, as the kernel reads it: a view when C-contiguous, a
    transposed copy by 16 x 16 tiles (_transpose) when b is a transposed matrix (a weight
    gradient's or input gradient's W.T: net A's conv3, 128 x 576, 50 -> 5.8 us), else a
    contiguous copy. (A copy padded to a multiple of 16 columns, the form before, cost 3-4 us a
    call at batch 1: net B's conv2, 500 x 40.)"""
    if b.flags.c_contiguous:
        return b.reshape(b.shape[:-2] + (-1,))
    if b.ndim == 2 and b.flags.f_contiguous and b.size >= TRANSPOSE_MIN:
        k, n = b.shape
        out = np.empty(k * n, np.float32)
        _transpose(b.T.reshape(-1), out, n, k)
        return out
    return np.ascontiguousarray(b).reshape(b.shape[:-2] + (-1,))


def matmul(a, b, out=None):
    """a @ b for 2-D float32 arrays (a any view; b copied when not C-contiguous); out: a
    C-contiguous (M, N) float32 array to write into."""
    m, n = a.shape[0], b.shape[1]
    if out is None:
        out = np.empty((m, n), np.float32)
    elif not out.flags.c_contiguous or out.shape != (m, n) or out.dtype != np.float32:
        raise ValueError("matmul: out must be a C-contiguous float32 array of the product's "
                         "shape")
    if m == 0 or n == 0:
        return out
    if a.shape[1] == 0:
        out[...] = 0
        return out
    part = np.empty(m * n if a.shape[1] > KB else 1, np.float32)
    _product(a, prepare(b), out.reshape(-1), n, np.empty(W, np.float32), part, KB)
    return out


def matmul_stack(a, b, out=None):
    """a[e] @ b[e] for 3-D float32 stacks, into out (E, M, N) C-contiguous (fresh if None)."""
    e, m, n = a.shape[0], a.shape[1], b.shape[2]
    if out is None:
        out = np.empty((e, m, n), np.float32)
    if e == 0 or m == 0 or n == 0:
        return out
    if a.shape[2] == 0:
        out[...] = 0
        return out
    part = np.empty(m * n if a.shape[2] > KB else 1, np.float32)
    _mm_stack(a, prepare(b), out.reshape(e, m * n), n, np.empty(W, np.float32), part, KB)
    return out
