"""Winograd F(2x2, 5x5): 5x5 stride-1 convs (net B's second layer). A 2x2 output tile reads a
6x6 input patch and needs 36 multiplications per channel pair instead of 100, so the matrix
products shrink 2.8x against im2col. It interpolates at the same six points as F(4x4, 3x3)
(0, +-1, +-2, infinity), so the input transform B^T is the same and _winograd4's _in and _din
serve it with a tile step of 2; G is 6x5 and A^T 2x6 (derived from B^T: for each point l the
2x5 matrix B^-T[i + k, l] has rank one, A^T[:, l] its column and G[l] its row):
    G   = [[1/4, 0, 0, 0, 0], [-1/6] * 5, [-1/6, 1/6, -1/6, 1/6, -1/6],
           [1/24, 1/12, 1/6, 1/3, 2/3], [1/24, -1/12, 1/6, -1/3, 2/3], [0, 0, 0, 0, 1]]
    A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 1]]
float32 rounding as F(4x4)'s (~1e-5 relative of the output scale; docs/internals.md).
conv's "winograd25" strategy (interface in _rows.py); _winograd.py's run/run_backward run it."""
import sys

import numpy as np

from . import _gemm
from . import _winograd as _w
from ._winograd4 import _din, _in  # noqa: F401  (the six-point transforms, tile step M)
from ..jit import kernel, prange

M = 2                                      # output tile size
R = 5                                      # filter size
POOLS = False

_G = np.array([[1 / 4, 0, 0, 0, 0], [-1 / 6] * 5, [-1 / 6, 1 / 6, -1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6, 1 / 3, 2 / 3], [1 / 24, -1 / 12, 1 / 6, -1 / 3, 2 / 3],
               [0, 0, 0, 0, 1]], np.float64)
_GG = np.kron(_G, _G).astype(np.float32)   # (36, 25): U = GG @ w
_GGT = np.ascontiguousarray(_GG.T)         # (25, 36): dw = GG^T @ dU
_G32 = _G.astype(np.float32)               # for _winograd._transform (weights)
_self = sys.modules[__name__]


def forward(conv, x, w, b, training, ctx, pool=None):
    return _w.strategy_forward(conv, x, w, b, training, ctx, _self)


def backward(conv, dz, w, g, ctx, need_dx):
    return _w.strategy_backward(conv, dz, w, g, ctx, need_dx, _self)


def eval_chunk(conv, n, chunk_floats):
    return _w.strategy_chunk(conv, chunk_floats, _self)


bytes_per_sample = _gemm.bytes_per_sample   # counted as im2col, as the other schemes


# ------------------------------------------------------------------------------------ kernels
# As _winograd4's: scalar expressions over an innermost channel loop, arrays indexed directly.
@kernel
def _out(M, bias, z, th, tw):
    """z[n, 2ty + i, 2tx + j, :] = (A^T m A)[i, j] + bias for the tile's m = M[:, t, :], clipped
    at the bottom and right edges."""
    n_, oh, ow, k = z.shape
    two = np.float32(2.0)
    for task in prange(n_ * th):
        n = task // th
        ty = task % th
        y0 = 2 * ty
        s = np.empty((2, 6, k), np.float32)
        for tx in range(tw):
            t = (n * th + ty) * tw + tx
            x0 = 2 * tx
            for j in range(6):      # down each column
                for q in range(k):
                    a, b, g, e, f, u = (M[j, t, q], M[6 + j, t, q], M[12 + j, t, q], M[18 + j, t, q],
                                        M[24 + j, t, q], M[30 + j, t, q])
                    s[0, j, q] = a + b + g + e + f
                    s[1, j, q] = b - g + two * (e - f) + u
            for i in range(min(2, oh - y0)):   # along each row, plus the bias
                if x0 + 1 < ow:
                    for q in range(k):
                        a, b, g, e, f, u = s[i, 0, q], s[i, 1, q], s[i, 2, q], s[i, 3, q], s[i, 4, q], s[i, 5, q]
                        z[n, y0 + i, x0, q] = a + b + g + e + f + bias[q]
                        z[n, y0 + i, x0 + 1, q] = b - g + two * (e - f) + u + bias[q]
                else:
                    for q in range(k):
                        z[n, y0 + i, x0, q] = (s[i, 0, q] + s[i, 1, q] + s[i, 2, q] + s[i, 3, q]
                                               + s[i, 4, q] + bias[q])


@kernel
def _dout(dz, dM, th, tw):
    """dM[:, t, :] = A dY A^T for the 2x2 tile dY of dz (zero past the edges): the adjoint of
    _out (A's columns: 1, 1, 1, 1, 1, 0 and 0, 1, -1, 2, -2, 1)."""
    n_, oh, ow, k = dz.shape
    zero, two = np.float32(0.0), np.float32(2.0)
    for task in prange(n_ * th):
        n = task // th
        ty = task % th
        y0 = 2 * ty
        g = np.empty((2, 2, k), np.float32)
        r = np.empty((6, 2, k), np.float32)
        for tx in range(tw):
            t = (n * th + ty) * tw + tx
            x0 = 2 * tx
            for i in range(2):
                for j in range(2):
                    if y0 + i < oh and x0 + j < ow:
                        for q in range(k):
                            g[i, j, q] = dz[n, y0 + i, x0 + j, q]
                    else:
                        for q in range(k):
                            g[i, j, q] = zero
            for j in range(2):      # down each column
                for q in range(k):
                    p, v = g[0, j, q], g[1, j, q]
                    r[0, j, q] = p
                    r[1, j, q] = p + v
                    r[2, j, q] = p - v
                    r[3, j, q] = p + two * v
                    r[4, j, q] = p - two * v
                    r[5, j, q] = v
            for i in range(6):      # along each row
                e = 6 * i
                for q in range(k):
                    p, v = r[i, 0, q], r[i, 1, q]
                    dM[e, t, q] = p
                    dM[e + 1, t, q] = p + v
                    dM[e + 2, t, q] = p - v
                    dM[e + 3, t, q] = p + two * v
                    dM[e + 4, t, q] = p - two * v
                    dM[e + 5, t, q] = v
