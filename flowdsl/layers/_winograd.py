"""Winograd F(2x2, 3x3) for conv's 3x3 stride-1 layers with enough input channels (see
conv.WINO_MIN_C): 16 multiplications per 2x2 output tile and channel pair instead of 36, so the
matrix products, most of a conv net's training step, shrink 2.25x (Lavin & Gray 2015).

With the output cut into 2x2 tiles t, each reading a 4x4 input patch d (zero outside the image):
    V[e, t, c] = (B^T d B)[e]     U[e, c, k] = (G g G^T)[e]     M[e] = V[e] @ U[e]
    z[tile t, filter k] = A^T M[:, t, k] A + b[k]                (e: the 16 tile positions)
Backward is the adjoint of each step, in reverse: dM = A dz A^T, then dU[e] = V[e]^T dM[e]
(dw = G^T dU G) and dV[e] = dM[e] U[e]^T (dx = B dV B^T, scattered back over overlapping
patches). Exact in real arithmetic; in float32 within ~1e-6 relative of im2col (tests).

Arrays are NHWC; kernels run a parallel loop over (image, tile row), or over images where
overlapping patches are summed into dx.
F(4x4, 3x3) (_winograd4.py) has the same steps with 4x4 tiles; `run`/`run_backward` below serve
both, given the module (`scheme`) that holds the tile size M, the matrices and the kernels.
This module is conv's "winograd" strategy (interface in _rows.py); _winograd4 is "winograd4"."""
import sys

import numpy as np

from . import _gemm
from ..blas import colsum, mm_stack, solo
from ..jit import kernel, prange

M = 2                               # output tile size
R = 3                               # filter size
POOLS = False
CHUNK_FLOATS = 1 << 18      # see chunks()
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
_GG = np.kron(_G, _G)              # (16, 9): U = GG @ w, row e = (i, j), column (a, b)
_GGT = np.ascontiguousarray(_GG.T)  # (9, 16): dw = GG^T @ dU
_G32 = _G                           # for _transform (weights)
BLK = 256                           # _transform's columns a block (its float64 rows stay in L1)


def values(scheme):
    """Transformed values per tile: (M + R - 1)^2."""
    return (scheme.M + scheme.R - 1) ** 2


def tiles(oh, ow, m=2):
    return (oh + m - 1) // m, (ow + m - 1) // m


def weights(w, scheme):
    """U (E, C, K) from conv weights w (R, R, C, K): U = (G kron G) w, as G w G^T filter by filter
    (_transform: separable). As one product `GG @ w` (9 or 25 long) BLAS ran it at
    ~12 GFLOP/s: 0.26 ms for a 96 -> 96 F(4x4) conv, each step and share (fashion_res: three
    such convs, forward and the adjoint in backward, ~6% of a step)."""
    c, k = w.shape[2], w.shape[3]
    U = np.empty((values(scheme), c * k), np.float32)
    _transform(scheme._G32, w.reshape(scheme.R ** 2, c * k), U)
    return U.reshape(values(scheme), c, k)


def weights_grad(dU, scheme):
    """dw (R, R, C, K) from dU (E, C, K): the adjoint of weights, (G kron G)^T dU."""
    e, c, k = dU.shape
    r = scheme.R
    dw = np.empty((r * r, c * k), np.float32)
    _transform_t(scheme._G32, dU.reshape(e, c * k), dw)
    return dw.reshape(r, r, c, k)


def chunks(n, th, tw, c, k, scheme):
    """Image ranges [(i0, i1)] for run and run_backward: each range's transformed tiles (the
    larger of its V and M, E x tiles x max(C, K)) within CHUNK_FLOATS when the pass runs on
    one thread (blas.solo: one thread, or a share of a split pass), so that the product's output
    is still in cache when the inverse transform reads it; one range otherwise (the kernels and
    products are then shared by the threads, each call a hand-over)."""
    if not solo():
        return [(0, n)]
    step = max(1, CHUNK_FLOATS // (values(scheme) * th * tw * max(c, k)))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def run(x, w, b, pad, oh, ow, keep, scheme):
    """z (N, OH, OW, K) = conv(x, w) + b. keep: also return ([V of each chunk], U) for backward."""
    m = scheme.M
    n, c, k = x.shape[0], x.shape[3], w.shape[3]
    th, tw = tiles(oh, ow, m)
    U = weights(w, scheme)
    z = np.empty((n, oh, ow, k), np.float32)
    Vs = []
    for i0, i1 in chunks(n, th, tw, c, k, scheme):
        V = np.empty((values(scheme), (i1 - i0) * th * tw, c), np.float32)
        scheme._in(x[i0:i1], V, pad, th, tw, m)
        scheme._out(mm_stack(V, U), b, z[i0:i1], th, tw)
        Vs.append(V)
    return (z, Vs, U) if keep else z


def run_backward(dz, Vs, U, x_shape, pad, need_dx, scheme):
    """(dw (R, R, C, K), dx or None) from dz (N, OH, OW, K) and forward's V chunks and U; chunk
    by chunk as forward (dU summed over them)."""
    m, r = scheme.M, scheme.R
    n, oh, ow, k = dz.shape
    c, e = U.shape[1], values(scheme)
    th, tw = tiles(oh, ow, m)
    dx = np.empty(x_shape, np.float32) if need_dx else None
    Ut = np.ascontiguousarray(U.transpose(0, 2, 1)) if need_dx else None
    dU, i0 = None, 0
    for V in Vs:
        i1 = i0 + V.shape[1] // (th * tw)
        dM = np.empty((e, V.shape[1], k), np.float32)
        scheme._dout(dz[i0:i1], dM, th, tw)
        part = mm_stack(V.transpose(0, 2, 1), dM)
        dU = part if dU is None else np.add(dU, part, out=dU)
        if need_dx:
            scheme._din(mm_stack(dM, Ut), dx[i0:i1], pad, th, tw, m)
        i0 = i1
    return weights_grad(dU, scheme), dx


# --- the strategy interface, for both schemes ---------------------------------------------------
def strategy_forward(conv, x, w, b, training, ctx, scheme):
    k, oh, ow = conv.out
    if training:
        z, ctx["V"], ctx["U"] = run(x, w, b, conv.padding, oh, ow, True, scheme)
        return z
    return run(x, w, b, conv.padding, oh, ow, False, scheme)


def strategy_backward(conv, dz, w, g, ctx, need_dx, scheme):
    g["w"][...], dx = run_backward(dz, ctx.pop("V"), ctx["U"], ctx["x"].shape, conv.padding, need_dx, scheme)
    colsum(dz.reshape(-1, conv.args["filters"]), g["b"])
    return dx


def strategy_chunk(conv, chunk_floats, scheme):
    """Evaluation chunks whose transformed tiles stay within chunk_floats."""
    k, oh, ow = conv.out
    th, tw = tiles(oh, ow, scheme.M)
    return max(1, chunk_floats // (values(scheme) * th * tw * max(conv.in_shape[0], k)))


_self = sys.modules[__name__]


def forward(conv, x, w, b, training, ctx, pool=None):
    return strategy_forward(conv, x, w, b, training, ctx, _self)


def backward(conv, dz, w, g, ctx, need_dx):
    return strategy_backward(conv, dz, w, g, ctx, need_dx, _self)


def eval_chunk(conv, n, chunk_floats):
    return strategy_chunk(conv, chunk_floats, _self)


bytes_per_sample = _gemm.bytes_per_sample   # counted as im2col: batches below conv.WINO_MIN_TILES run it


# ------------------------------------------------------------------------------------ kernels
@kernel
def _in(x, V, pad, th, tw, m):
    """V[e, t, :] = (B^T d B)[e] for the 4x4 input patch d of tile t = (n, ty, tx), whose
    top-left is input pixel (m ty - pad, m tx - pad), m = 2; zero outside the image.
    B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]. Every step is a loop over the
    channels, innermost, indexing the arrays directly (the form numba vectorises: a loop over
    the 16 positions e innermost ran 2-4x slower; the same loops over row views d[j], V[e, t]
    1.3-2x slower, 2026-12-03, as _winograd4's kernels)."""
    n_, h, w, c = x.shape
    zero = np.float32(0.0)
    for task in prange(n_ * th):
        n = task // th
        ty = task % th
        d = np.empty((4, 4, c), np.float32)
        r = np.empty((4, 4, c), np.float32)
        for tx in range(tw):
            t = (n * th + ty) * tw + tx
            for i in range(4):
                y = m * ty + i - pad
                for j in range(4):
                    xx = m * tx + j - pad
                    if y < 0 or y >= h or xx < 0 or xx >= w:
                        for q in range(c):
                            d[i, j, q] = zero
                    else:
                        for q in range(c):
                            d[i, j, q] = x[n, y, xx, q]
            for j in range(4):
                for q in range(c):
                    a, b, g, e = d[0, j, q], d[1, j, q], d[2, j, q], d[3, j, q]
                    r[0, j, q] = a - g
                    r[1, j, q] = b + g
                    r[2, j, q] = g - b
                    r[3, j, q] = b - e
            for i in range(4):
                o = 4 * i
                for q in range(c):
                    a, b, g, e = r[i, 0, q], r[i, 1, q], r[i, 2, q], r[i, 3, q]
                    V[o, t, q] = a - g
                    V[o + 1, t, q] = b + g
                    V[o + 2, t, q] = g - b
                    V[o + 3, t, q] = b - e


@kernel
def _out(M, bias, z, th, tw):
    """z[n, 2ty + i, 2tx + j, :] = (A^T m A)[i, j] + bias for the tile's m = M[:, t, :], clipped at
    the bottom and right edges. A^T = [[1,1,1,0],[0,1,-1,-1]]."""
    n_, oh, ow, k = z.shape
    for task in prange(n_ * th):
        n = task // th
        ty = task % th
        y0 = 2 * ty
        s = np.empty((2, 4, k), np.float32)
        for tx in range(tw):
            t = (n * th + ty) * tw + tx
            x0 = 2 * tx
            for j in range(4):
                for q in range(k):
                    a, g, u, e = M[j, t, q], M[4 + j, t, q], M[8 + j, t, q], M[12 + j, t, q]
                    s[0, j, q] = a + g + u
                    s[1, j, q] = g - u - e
            for i in range(min(2, oh - y0)):
                if x0 + 1 < ow:
                    for q in range(k):
                        a, g, u, e = s[i, 0, q], s[i, 1, q], s[i, 2, q], s[i, 3, q]
                        z[n, y0 + i, x0, q] = a + g + u + bias[q]
                        z[n, y0 + i, x0 + 1, q] = g - u - e + bias[q]
                else:
                    for q in range(k):
                        z[n, y0 + i, x0, q] = s[i, 0, q] + s[i, 1, q] + s[i, 2, q] + bias[q]


@kernel
def _dout(dz, dM, th, tw):
    """dM[:, t, :] = A dY A^T for the 2x2 tile dY of dz (zero past the edges): the adjoint of
    _out."""
    n_, oh, ow, k = dz.shape
    zero = np.float32(0.0)
    for task in prange(n_ * th):
        n = task // th
        ty = task % th
        y0 = 2 * ty
        g = np.empty((2, 2, k), np.float32)
        r = np.empty((4, 2, k), np.float32)
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
            for j in range(2):
                for q in range(k):
                    p, u = g[0, j, q], g[1, j, q]
                    r[0, j, q] = p
                    r[1, j, q] = p + u
                    r[2, j, q] = p - u
                    r[3, j, q] = -u
            for i in range(4):
                e = 4 * i
                for q in range(k):
                    p, u = r[i, 0, q], r[i, 1, q]
                    dM[e, t, q] = p
                    dM[e + 1, t, q] = p + u
                    dM[e + 2, t, q] = p - u
                    dM[e + 3, t, q] = -u


@kernel
def _din(dV, dx, pad, th, tw, m):
    """dx = the sum over tiles of B dV B^T, each added back onto its 4x4 patch (the adjoint of
    _in). Patches overlap, so each parallel task owns a whole image."""
    n_, h, w, c = dx.shape
    zero = np.float32(0.0)
    for n in prange(n_):
        dx[n] = zero
        q = np.empty((4, 4, c), np.float32)
        for ty in range(th):
            for tx in range(tw):
                t = (n * th + ty) * tw + tx
                for cc in range(c):
                    # B dV (rows): v0., v1. - v2. + v3., v1. + v2. - v0., -v3.; then the columns
                    a0 = dV[0, t, cc]
                    a1 = dV[1, t, cc]
                    a2 = dV[2, t, cc]
                    a3 = dV[3, t, cc]
                    b0 = dV[4, t, cc] - dV[8, t, cc] + dV[12, t, cc]
                    b1 = dV[5, t, cc] - dV[9, t, cc] + dV[13, t, cc]
                    b2 = dV[6, t, cc] - dV[10, t, cc] + dV[14, t, cc]
                    b3 = dV[7, t, cc] - dV[11, t, cc] + dV[15, t, cc]
                    c0 = dV[4, t, cc] + dV[8, t, cc] - a0
                    c1 = dV[5, t, cc] + dV[9, t, cc] - a1
                    c2 = dV[6, t, cc] + dV[10, t, cc] - a2
                    c3 = dV[7, t, cc] + dV[11, t, cc] - a3
                    e0 = -dV[12, t, cc]
                    e1 = -dV[13, t, cc]
                    e2 = -dV[14, t, cc]
                    e3 = -dV[15, t, cc]
                    q[0, 0, cc] = a0
                    q[0, 1, cc] = a1 - a2 + a3
                    q[0, 2, cc] = a1 + a2 - a0
                    q[0, 3, cc] = -a3
                    q[1, 0, cc] = b0
                    q[1, 1, cc] = b1 - b2 + b3
                    q[1, 2, cc] = b1 + b2 - b0
                    q[1, 3, cc] = -b3
                    q[2, 0, cc] = c0
                    q[2, 1, cc] = c1 - c2 + c3
                    q[2, 2, cc] = c1 + c2 - c0
                    q[2, 3, cc] = -c3
                    q[3, 0, cc] = e0
                    q[3, 1, cc] = e1 - e2 + e3
                    q[3, 2, cc] = e1 + e2 - e0
                    q[3, 3, cc] = -e3
                for r in range(4):
                    y = m * ty + r - pad
                    if y < 0 or y >= h:
                        continue
                    for s in range(4):
                        xx = m * tx + s - pad
                        if xx < 0 or xx >= w:
                            continue
                        for cc in range(c):
                            dx[n, y, xx, cc] += q[r, s, cc]


@kernel
def _transform(G, w, U):
    """U[i*A + j, q] = sum_{a, b} G[i, a] w[a*R + b, q] G[j, b] for G (A, R), w (R*R, Q),
    U (A*A, Q): T = G w, then T G^T, each column q a filter's (c, k); blocks of BLK columns, the
    column the inner (vectorised) loop, each row written once. A*R*(R + A) multiply-adds a column
    instead of (G kron G)'s A*A*R*R (error as the product's: tests/test_winograd.py). 3x3
    and 5x5 filters spelled out (sums of array views, or a loop over R, ran 1.6-1.9x slower)."""
    A, R = G.shape
    Q = w.shape[1]
    for blk in prange((Q + BLK - 1) // BLK):
        q0 = blk * BLK
        L = min(Q, q0 + BLK) - q0
        T = np.empty((R, L), np.float32)
        for i in range(A):
            if R == 3:
                g0, g1, g2 = G[i, 0], G[i, 1], G[i, 2]
                for b in range(3):
                    for q in range(L):
                        T[b, q] = g0 * w[b, q0 + q] + g1 * w[3 + b, q0 + q] + g2 * w[6 + b, q0 + q]
                for j in range(A):
                    h0, h1, h2 = G[j, 0], G[j, 1], G[j, 2]
                    e = i * A + j
                    for q in range(L):
                        U[e, q0 + q] = h0 * T[0, q] + h1 * T[1, q] + h2 * T[2, q]
            elif R == 5:
                g0, g1, g2, g3, g4 = G[i, 0], G[i, 1], G[i, 2], G[i, 3], G[i, 4]
                for b in range(5):
                    for q in range(L):
                        T[b, q] = (g0 * w[b, q0 + q] + g1 * w[5 + b, q0 + q] + g2 * w[10 + b, q0 + q]
                                   + g3 * w[15 + b, q0 + q] + g4 * w[20 + b, q0 + q])
                for j in range(A):
                    h0, h1, h2, h3, h4 = G[j, 0], G[j, 1], G[j, 2], G[j, 3], G[j, 4]
                    e = i * A + j
                    for q in range(L):
                        U[e, q0 + q] = h0 * T[0, q] + h1 * T[1, q] + h2 * T[2, q] + h3 * T[3, q] + h4 * T[4, q]
            else:
                for b in range(R):
                    for q in range(L):
                        T[b, q] = 0
                    for a in range(R):
                        g = G[i, a]
                        for q in range(L):
                            T[b, q] += g * w[a * R + b, q0 + q]
                for j in range(A):
                    e = i * A + j
                    for q in range(L):
                        U[e, q0 + q] = 0
                    for b in range(R):
                        h = G[j, b]
                        for q in range(L):
                            U[e, q0 + q] += h * T[b, q]


@kernel
def _transform_t(G, dU, dw):
    """The adjoint of _transform: dw[a*R + b, q] = sum_{i, j} G[i, a] dU[i*A + j, q] G[j, b]
    (T[i*R + b] = sum_j G[j, b] dU[i*A + j], then dw[a*R + b] = sum_i G[i, a] T[i*R + b]);
    G's four or six rows spelled out."""
    A, R = G.shape
    Q = dU.shape[1]
    for blk in prange((Q + BLK - 1) // BLK):
        q0 = blk * BLK
        L = min(Q, q0 + BLK) - q0
        T = np.empty((A * R, L), np.float32)
        if A == 6:
            for b in range(R):
                g0, g1, g2, g3, g4, g5 = G[0, b], G[1, b], G[2, b], G[3, b], G[4, b], G[5, b]
                for i in range(6):
                    r = i * 6
                    t = i * R + b
                    for q in range(L):
                        T[t, q] = (g0 * dU[r, q0 + q] + g1 * dU[r + 1, q0 + q] + g2 * dU[r + 2, q0 + q]
                                   + g3 * dU[r + 3, q0 + q] + g4 * dU[r + 4, q0 + q] + g5 * dU[r + 5, q0 + q])
            for a in range(R):
                g0, g1, g2, g3, g4, g5 = G[0, a], G[1, a], G[2, a], G[3, a], G[4, a], G[5, a]
                for b in range(R):
                    d = a * R + b
                    for q in range(L):
                        dw[d, q0 + q] = (g0 * T[b, q] + g1 * T[R + b, q] + g2 * T[2 * R + b, q]
                                         + g3 * T[3 * R + b, q] + g4 * T[4 * R + b, q] + g5 * T[5 * R + b, q])
        elif A == 4:
            for b in range(R):
                g0, g1, g2, g3 = G[0, b], G[1, b], G[2, b], G[3, b]
                for i in range(4):
                    r = i * 4
                    t = i * R + b
                    for q in range(L):
                        T[t, q] = (g0 * dU[r, q0 + q] + g1 * dU[r + 1, q0 + q] + g2 * dU[r + 2, q0 + q]
                                   + g3 * dU[r + 3, q0 + q])
            for a in range(R):
                g0, g1, g2, g3 = G[0, a], G[1, a], G[2, a], G[3, a]
                for b in range(R):
                    d = a * R + b
                    for q in range(L):
                        dw[d, q0 + q] = g0 * T[b, q] + g1 * T[R + b, q] + g2 * T[2 * R + b, q] + g3 * T[3 * R + b, q]
        else:
            for i in range(A):
                for b in range(R):
                    t = i * R + b
                    for q in range(L):
                        T[t, q] = 0
                    for j in range(A):
                        g = G[j, b]
                        for q in range(L):
                            T[t, q] += g * dU[i * A + j, q0 + q]
            for a in range(R):
                for b in range(R):
                    d = a * R + b
                    for q in range(L):
                        dw[d, q0 + q] = 0
                    for i in range(A):
                        g = G[i, a]
                        for q in range(L):
                            dw[d, q0 + q] += g * T[i * R + b, q]
