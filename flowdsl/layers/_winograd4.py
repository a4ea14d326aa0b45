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
these kernels (M=4). conv's "winograd4" strategy (interface in _rows.py). Each kernel applies
the 1-D transform down the patch's columns and then along its rows."""
import sys

import numpy as np

from . import _gemm
from . import _winograd as _w
from ..jit import kernel, prange

M = 4                                      # output tile size
R = 3                                      # filter size
POOLS = False

_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
_GG = np.kron(_G, _G).astype(np.float32)   # (36, 9): U = GG @ w
_GGT = np.ascontiguousarray(_GG.T)         # (9, 36): dw = GG^T @ dU
_G32 = _G.astype(np.float32)               # for _winograd._transform (weights)
_self = sys.modules[__name__]


def forward(conv, x, w, b, training, ctx, pool=None):
    return _w.strategy_forward(conv, x, w, b, training, ctx, _self)


def backward(conv, dz, w, g, ctx, need_dx):
    return _w.strategy_backward(conv, dz, w, g, ctx, need_dx, _self)


def eval_chunk(conv, n, chunk_floats):
    return _w.strategy_chunk(conv, chunk_floats, _self)


bytes_per_sample = _gemm.bytes_per_sample   # counted as im2col, as F(2x2)


# ------------------------------------------------------------------------------------ kernels
# Each kernel writes its transforms out as scalar expressions over a channel loop, indexing the
# arrays directly: the earlier form, one helper per 1-D transform called on six channel-long row
# views, ran 2-6x slower (numba did not inline the twelve-array calls; 2026-12-03, net A's
# conv2 13x13x32 -> 64 at batch 64, 2 threads: _in 1.29 -> 0.22 ms, _out 0.90 -> 0.31, _dout
# 1.37 -> 0.44, _din 1.69 -> 0.44).
@kernel
def _in(x, V, pad, th, tw, m):
    """V[e, t, :] = (B^T d B)[e] for the 6x6 input patch d of tile t = (n, ty, tx), whose
    top-left is input pixel (m ty - pad, m tx - pad); zero outside the image: B^T down each
    column of the patch, then along each row. m: the tile step, 4 here, 2 for F(2x2, 5x5)
    (_winograd25.py: the same six points, so the same B)."""
    n_, h, w, c = x.shape
    zero, two, four, five = np.float32(0.0), np.float32(2.0), np.float32(4.0), np.float32(5.0)
    for task in prange(n_ * th):
        n = task // th
        ty = task % th
        d = np.empty((6, 6, c), np.float32)
        r = np.empty((6, 6, c), np.float32)
        for tx in range(tw):
            t = (n * th + ty) * tw + tx
            for i in range(6):
                y = m * ty + i - pad
                for j in range(6):
                    xx = m * tx + j - pad
                    if y < 0 or y >= h or xx < 0 or xx >= w:
                        for q in range(c):
                            d[i, j, q] = zero
                    else:
                        for q in range(c):
                            d[i, j, q] = x[n, y, xx, q]
            for j in range(6):
                for q in range(c):
                    a, b, g, e, f, u = d[0, j, q], d[1, j, q], d[2, j, q], d[3, j, q], d[4, j, q], d[5, j, q]
                    r[0, j, q] = four * a - five * g + f
                    r[1, j, q] = f + e - four * (b + g)
                    r[2, j, q] = f - e + four * (b - g)
                    r[3, j, q] = f - g + two * (e - b)
                    r[4, j, q] = f - g - two * (e - b)
                    r[5, j, q] = four * b - five * e + u
            for i in range(6):
                o = 6 * i
                for q in range(c):
                    a, b, g, e, f, u = r[i, 0, q], r[i, 1, q], r[i, 2, q], r[i, 3, q], r[i, 4, q], r[i, 5, q]
                    V[o, t, q] = four * a - five * g + f
                    V[o + 1, t, q] = f + e - four * (b + g)
                    V[o + 2, t, q] = f - e + four * (b - g)
                    V[o + 3, t, q] = f - g + two * (e - b)
                    V[o + 4, t, q] = f - g - two * (e - b)
                    V[o + 5, t, q] = four * b - five * e + u

@kernel
def _out(M, bias, z, th, tw):
    """z[n, 4ty + i, 4tx + j, :] = (A^T m A)[i, j] + bias for the tile's m = M[:, t, :], clipped
    at the bottom and right edges."""
    n_, oh, ow, k = z.shape
    two, four, eight = np.float32(2.0), np.float32(4.0), np.float32(8.0)
    for task in prange(n_ * th):
        n = task // th
        ty = task % th
        y0 = 4 * ty
        s = np.empty((4, 6, k), np.float32)
        o = np.empty((4, k), np.float32)
        for tx in range(tw):
            t = (n * th + ty) * tw + tx
            x0 = 4 * tx
            jn = min(4, ow - x0)
            for j in range(6):
                for q in range(k):
                    a, b, g, e, f, u = M[j, t, q], M[6 + j, t, q], M[12 + j, t, q], M[18 + j, t, q], M[24 + j, t, q], M[30 + j, t, q]
                    s[0, j, q] = a + b + g + e + f
                    s[1, j, q] = b - g + two * (e - f)
                    s[2, j, q] = b + g + four * (e + f)
                    s[3, j, q] = b - g + eight * (e - f) + u
            for i in range(min(4, oh - y0)):
                if jn == 4:
                    for q in range(k):
                        a, b, g, e, f, u = s[i, 0, q], s[i, 1, q], s[i, 2, q], s[i, 3, q], s[i, 4, q], s[i, 5, q]
                        z[n, y0 + i, x0, q] = a + b + g + e + f + bias[q]
                        z[n, y0 + i, x0 + 1, q] = b - g + two * (e - f) + bias[q]
                        z[n, y0 + i, x0 + 2, q] = b + g + four * (e + f) + bias[q]
                        z[n, y0 + i, x0 + 3, q] = b - g + eight * (e - f) + u + bias[q]
                else:
                    for q in range(k):
                        a, b, g, e, f, u = s[i, 0, q], s[i, 1, q], s[i, 2, q], s[i, 3, q], s[i, 4, q], s[i, 5, q]
                        o[0, q] = a + b + g + e + f + bias[q]
                        o[1, q] = b - g + two * (e - f) + bias[q]
                        o[2, q] = b + g + four * (e + f) + bias[q]
                        o[3, q] = b - g + eight * (e - f) + u + bias[q]
                    for j in range(jn):
                        for q in range(k):
                            z[n, y0 + i, x0 + j, q] = o[j, q]

@kernel
def _dout(dz, dM, th, tw):
    """dM[:, t, :] = A dY A^T for the 4x4 tile dY of dz (zero past the edges): the adjoint of
    _out."""
    n_, oh, ow, k = dz.shape
    zero, two, four, eight = np.float32(0.0), np.float32(2.0), np.float32(4.0), np.float32(8.0)
    for task in prange(n_ * th):
        n = task // th
        ty = task % th
        y0 = 4 * ty
        g = np.empty((4, 4, k), np.float32)
        r = np.empty((6, 4, k), np.float32)
        for tx in range(tw):
            t = (n * th + ty) * tw + tx
            x0 = 4 * tx
            for i in range(4):
                for j in range(4):
                    if y0 + i < oh and x0 + j < ow:
                        for q in range(k):
                            g[i, j, q] = dz[n, y0 + i, x0 + j, q]
                    else:
                        for q in range(k):
                            g[i, j, q] = zero
            for j in range(4):
                for q in range(k):
                    a, b, c, d = g[0, j, q], g[1, j, q], g[2, j, q], g[3, j, q]
                    r[0, j, q] = a
                    r[1, j, q] = a + b + c + d
                    r[2, j, q] = a - b + c - d
                    r[3, j, q] = a + two * b + four * c + eight * d
                    r[4, j, q] = a - two * b + four * c - eight * d
                    r[5, j, q] = d
            for i in range(6):
                e = 6 * i
                for q in range(k):
                    a, b, c, d = r[i, 0, q], r[i, 1, q], r[i, 2, q], r[i, 3, q]
                    dM[e, t, q] = a
                    dM[e + 1, t, q] = a + b + c + d
                    dM[e + 2, t, q] = a - b + c - d
                    dM[e + 3, t, q] = a + two * b + four * c + eight * d
                    dM[e + 4, t, q] = a - two * b + four * c - eight * d
                    dM[e + 5, t, q] = d

@kernel
def _din(dV, dx, pad, th, tw, m):
    """dx = the sum over tiles of B dV B^T, each added back onto its 6x6 patch (the adjoint of
    _in, tile step m); a patch wholly inside the image row is added directly, others through a
    buffer.
    Patches overlap, so each parallel task owns a whole image."""
    n_, h, w, c = dx.shape
    zero, two, four, five = np.float32(0.0), np.float32(2.0), np.float32(4.0), np.float32(5.0)
    for n in prange(n_):
        dx[n] = zero
        r = np.empty((6, 6, c), np.float32)
        o = np.empty((6, c), np.float32)
        for ty in range(th):
            for tx in range(tw):
                t = (n * th + ty) * tw + tx
                x0 = m * tx - pad
                for j in range(6):
                    for q in range(c):
                        a, b, g, d, e, f = dV[j, t, q], dV[6 + j, t, q], dV[12 + j, t, q], dV[18 + j, t, q], dV[24 + j, t, q], dV[30 + j, t, q]
                        r[0, j, q] = four * a
                        r[1, j, q] = four * (g - b + f) + two * (e - d)
                        r[2, j, q] = -five * a - four * (b + g) - d - e
                        r[3, j, q] = b - g + two * (d - e) - five * f
                        r[4, j, q] = a + b + g + d + e
                        r[5, j, q] = f
                for i in range(6):
                    y = m * ty + i - pad
                    if y < 0 or y >= h:
                        continue
                    if x0 >= 0 and x0 + 6 <= w:
                        for q in range(c):
                            a, b, g, d, e, f = r[i, 0, q], r[i, 1, q], r[i, 2, q], r[i, 3, q], r[i, 4, q], r[i, 5, q]
                            dx[n, y, x0, q] += four * a
                            dx[n, y, x0 + 1, q] += four * (g - b + f) + two * (e - d)
                            dx[n, y, x0 + 2, q] += -five * a - four * (b + g) - d - e
                            dx[n, y, x0 + 3, q] += b - g + two * (d - e) - five * f
                            dx[n, y, x0 + 4, q] += a + b + g + d + e
                            dx[n, y, x0 + 5, q] += f
                    else:
                        for q in range(c):
                            a, b, g, d, e, f = r[i, 0, q], r[i, 1, q], r[i, 2, q], r[i, 3, q], r[i, 4, q], r[i, 5, q]
                            o[0, q] = four * a
                            o[1, q] = four * (g - b + f) + two * (e - d)
                            o[2, q] = -five * a - four * (b + g) - d - e
                            o[3, q] = b - g + two * (d - e) - five * f
                            o[4, q] = a + b + g + d + e
                            o[5, q] = f
                        for s in range(6):
                            xx = x0 + s
                            if xx >= 0 and xx < w:
                                for q in range(c):
                                    dx[n, y, xx, q] += o[s, q]
