"""Winograd F(4x4, 3x3): the larger-tile sibling of _winograd.py's F(2x2, 3x3). A 4x4 output
tile reads a 6x6 input patch and needs 36 multiplications per channel pair instead of 144
(F(2x2): 16 instead of 36), so the matrix products shrink 4x against im2col, 1.8x against
F(2x2); its transforms have more terms, and float32 rounding grows (~1e-5 relative; tests).

    V[e, t, c] = (B^T d B)[e]     U[e, c, k] = (G g G^T)[e]     M[e] = V[e] @ U[e]
    z[tile t, filter k] = A^T M[:, t, k] A + b[k]                (e: the 36 tile positions)
with (Lavin & Gray 2015, interpolation points 0, +-1, +-2, infinity)
    B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
           [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    G   = [[1/4, 0, 0], [-1/6, -1/6, -1/6], [-1/6, 1/6, -1/6],
           [1/24, 1/12, 1/6], [1/24, -1/12, 1/6], [0, 0, 1]]
    A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
Backward is the adjoint of each step, as in _winograd.py, whose run/run_backward wrappers run
these kernels (M=4). conv's "winograd4" strategy (interface in _rows.py). Each 1-D transform is one helper over six (or four) channel-long rows,
applied to the patch's columns and then its rows."""
import sys

import numpy as np

from . import _gemm
from . import _winograd as _w
from ..jit import kernel, prange

M = 4                                      # output tile size
POOLS = False

_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
_GG = np.kron(_G, _G).astype(np.float32)   # (36, 9): U = GG @ w
_GGT = np.ascontiguousarray(_GG.T)         # (9, 36): dw = GG^T @ dU
_self = sys.modules[__name__]


def forward(conv, x, w, b, training, ctx, pool=None):
    return _w.strategy_forward(conv, x, w, b, training, ctx, _self)


def backward(conv, dz, w, g, ctx, need_dx):
    return _w.strategy_backward(conv, dz, w, g, ctx, need_dx, _self)


def eval_chunk(conv, n, chunk_floats):
    return _w.strategy_chunk(conv, chunk_floats, _self)


bytes_per_sample = _gemm.bytes_per_sample   # counted as im2col, as F(2x2)


# ------------------------------------------------------------------------------------ kernels
@kernel(parallel=False)
def _bt(d0, d1, d2, d3, d4, d5, o0, o1, o2, o3, o4, o5):
    """o = B^T d over six rows."""
    four, five, two = np.float32(4.0), np.float32(5.0), np.float32(2.0)
    for q in range(d0.shape[0]):
        a, b, c, d, e, f = d0[q], d1[q], d2[q], d3[q], d4[q], d5[q]
        o0[q] = four * a - five * c + e
        o1[q] = e + d - four * (b + c)
        o2[q] = e - d + four * (b - c)
        o3[q] = e - c + two * (d - b)
        o4[q] = e - c - two * (d - b)
        o5[q] = four * b - five * d + f


@kernel(parallel=False)
def _b(v0, v1, v2, v3, v4, v5, o0, o1, o2, o3, o4, o5):
    """o = B v over six rows: the adjoint of _bt."""
    four, five, two = np.float32(4.0), np.float32(5.0), np.float32(2.0)
    for q in range(v0.shape[0]):
        a, b, c, d, e, f = v0[q], v1[q], v2[q], v3[q], v4[q], v5[q]
        o0[q] = four * a
        o1[q] = four * (c - b + f) + two * (e - d)
        o2[q] = -five * a - four * (b + c) - d - e
        o3[q] = b - c + two * (d - e) - five * f
        o4[q] = a + b + c + d + e
        o5[q] = f


@kernel(parallel=False)
def _at(m0, m1, m2, m3, m4, m5, y0, y1, y2, y3):
    """y = A^T m: four rows from six."""
    two, four, eight = np.float32(2.0), np.float32(4.0), np.float32(8.0)
    for q in range(m0.shape[0]):
        a, b, c, d, e, f = m0[q], m1[q], m2[q], m3[q], m4[q], m5[q]
        y0[q] = a + b + c + d + e
        y1[q] = b - c + two * (d - e)
        y2[q] = b + c + four * (d + e)
        y3[q] = b - c + eight * (d - e) + f


@kernel(parallel=False)
def _a(g0, g1, g2, g3, m0, m1, m2, m3, m4, m5):
    """m = A g: six rows from four (the adjoint of _at)."""
    two, four, eight = np.float32(2.0), np.float32(4.0), np.float32(8.0)
    for q in range(g0.shape[0]):
        a, b, c, d = g0[q], g1[q], g2[q], g3[q]
        m0[q] = a
        m1[q] = a + b + c + d
        m2[q] = a - b + c - d
        m3[q] = a + two * b + four * c + eight * d
        m4[q] = a - two * b + four * c - eight * d
        m5[q] = d


@kernel
def _in(x, V, pad, th, tw):
    """V[e, t, :] = (B^T d B)[e] for the 6x6 input patch d of tile t = (n, ty, tx), whose
    top-left is input pixel (4 ty - pad, 4 tx - pad); zero outside the image."""
    n_, h, w, c = x.shape
    zero = np.float32(0.0)
    for task in prange(n_ * th):
        n = task // th
        ty = task % th
        d = np.empty((36, c), np.float32)   # the patch, row-major
        r = np.empty((36, c), np.float32)   # B^T d
        for tx in range(tw):
            t = (n * th + ty) * tw + tx
            for i in range(6):
                y = 4 * ty + i - pad
                for j in range(6):
                    xx = 4 * tx + j - pad
                    if y < 0 or y >= h or xx < 0 or xx >= w:
                        d[6 * i + j, :] = zero
                    else:
                        d[6 * i + j, :] = x[n, y, xx, :]
            for j in range(6):      # along each column
                _bt(d[j], d[6 + j], d[12 + j], d[18 + j], d[24 + j], d[30 + j],
                    r[j], r[6 + j], r[12 + j], r[18 + j], r[24 + j], r[30 + j])
            for i in range(6):      # along each row
                e = 6 * i
                _bt(r[e], r[e + 1], r[e + 2], r[e + 3], r[e + 4], r[e + 5],
                    V[e, t], V[e + 1, t], V[e + 2, t], V[e + 3, t], V[e + 4, t], V[e + 5, t])


@kernel
def _out(M, b, z, th, tw):
    """z[n, 4ty + i, 4tx + j, :] = (A^T m A)[i, j] + b for the tile's m = M[:, t, :], clipped at
    the bottom and right edges."""
    n_, oh, ow, k = z.shape
    for task in prange(n_ * th):
        n = task // th
        ty = task % th
        y0 = 4 * ty
        s = np.empty((24, k), np.float32)   # A^T m: four rows of six
        o = np.empty((16, k), np.float32)   # the tile, row-major
        for tx in range(tw):
            t = (n * th + ty) * tw + tx
            x0 = 4 * tx
            for j in range(6):
                _at(M[j, t], M[6 + j, t], M[12 + j, t], M[18 + j, t], M[24 + j, t], M[30 + j, t],
                    s[j], s[6 + j], s[12 + j], s[18 + j])
            for i in range(4):
                e = 6 * i
                _at(s[e], s[e + 1], s[e + 2], s[e + 3], s[e + 4], s[e + 5],
                    o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3])
            for i in range(min(4, oh - y0)):
                for j in range(min(4, ow - x0)):
                    src = o[4 * i + j]
                    dst = z[n, y0 + i, x0 + j]
                    for q in range(k):
                        dst[q] = src[q] + b[q]


@kernel
def _dout(dz, dM, th, tw):
    """dM[:, t, :] = A dY A^T for the 4x4 tile dY of dz (zero past the edges): the adjoint of
    _out."""
    n_, oh, ow, k = dz.shape
    zero = np.float32(0.0)
    for task in prange(n_ * th):
        n = task // th
        ty = task % th
        y0 = 4 * ty
        g = np.empty((16, k), np.float32)   # the tile, row-major
        r = np.empty((24, k), np.float32)   # A dY: six rows of four
        for tx in range(tw):
            t = (n * th + ty) * tw + tx
            x0 = 4 * tx
            for i in range(4):
                for j in range(4):
                    if y0 + i < oh and x0 + j < ow:
                        g[4 * i + j, :] = dz[n, y0 + i, x0 + j, :]
                    else:
                        g[4 * i + j, :] = zero
            for j in range(4):
                _a(g[j], g[4 + j], g[8 + j], g[12 + j],
                   r[j], r[4 + j], r[8 + j], r[12 + j], r[16 + j], r[20 + j])
            for i in range(6):
                e = 4 * i
                _a(r[e], r[e + 1], r[e + 2], r[e + 3],
                   dM[6 * i, t], dM[6 * i + 1, t], dM[6 * i + 2, t], dM[6 * i + 3, t],
                   dM[6 * i + 4, t], dM[6 * i + 5, t])


@kernel
def _din(dV, dx, pad, th, tw):
    """dx = the sum over tiles of B dV B^T, each added back onto its 6x6 patch (the adjoint of
    _in). Patches overlap, so each parallel task owns a whole image."""
    n_, h, w, c = dx.shape
    zero = np.float32(0.0)
    for n in prange(n_):
        dx[n] = zero
        r = np.empty((36, c), np.float32)
        q = np.empty((36, c), np.float32)
        for ty in range(th):
            for tx in range(tw):
                t = (n * th + ty) * tw + tx
                for j in range(6):
                    _b(dV[j, t], dV[6 + j, t], dV[12 + j, t], dV[18 + j, t], dV[24 + j, t], dV[30 + j, t],
                       r[j], r[6 + j], r[12 + j], r[18 + j], r[24 + j], r[30 + j])
                for i in range(6):
                    e = 6 * i
                    _b(r[e], r[e + 1], r[e + 2], r[e + 3], r[e + 4], r[e + 5],
                       q[e], q[e + 1], q[e + 2], q[e + 3], q[e + 4], q[e + 5])
                for i in range(6):
                    y = 4 * ty + i - pad
                    if y < 0 or y >= h:
                        continue
                    for j in range(6):
                        xx = 4 * tx + j - pad
                        if xx < 0 or xx >= w:
                            continue
                        src = q[6 * i + j]
                        dst = dx[n, y, xx]
                        for cc in range(c):
                            dst[cc] += src[cc]
