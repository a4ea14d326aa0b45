"""Direct ("planar") convolution for conv's stride-1 layers over few input channels (see
conv.PLANAR_MAX_C): first layers such as 28x28x1 -> 20 filters, where im2col's columns are as
large as the output and BLAS runs a product with a 26-long inner dimension at a fraction of
its speed.

Each input channel c of an image, zero-padded to Hp x Wp and flattened, is a plane P_c (with
f - 1 floats of slack at the end). On the padded-width grid q = i*Wp + j (i < OH, j < Wp) the
convolution is a sum of shifted planes:
    acc_k[q] = b[k] + sum_{c, a, bb} w[a, bb, c, k] * P_c[a*Wp + bb + q]
so a tap is one unit-stride multiply-add over OH*Wp values, and a 3x3 (or a 5-wide row of a
5x5) filter one pass that reads each plane value from cache several times and writes acc once.
Columns j >= OW are computed and dropped (Wp/OW more work; no buffer as large as the output).
- forward: one parallel task per (image, group of G filters), four filters a pass (_plane4: each
  input value loaded once for four multiply-adds); the task's acc is written out as
  z[n, :, :, k0:k0+G] or, in evaluation, pooled at once (`pool`: the window of a maxpool that follows
  the conv; flowdsl.plan decides it, and applies the conv's activation after it), so the conv's
  full-size output is never written (net B: 11 -> 4 ms).
- weight gradient: dw[k, c, tap] = sum over images of dot(dz_k on the grid, P_c shifted), the
  f dots of a filter row in one pass; per-task partial sums over disjoint image ranges, added
  up serially (no race).
The input gradient (needed only when such a layer is not the first) is _gemm's product-based one.
conv's "planar" strategy (interface in _rows.py).
Arrays outside are NHWC, as everywhere in flowdsl."""
import numpy as np

from . import _gemm, _rows
from ..blas import colsum, own_products
from ..jit import kernel, prange

G = 8        # filters per task: their outputs are G contiguous floats at each position
CHUNKS = 16  # weight gradient: image ranges with their own partial sums


def planes(x, pad, f):
    """(P (N, C, Hp*Wp + f - 1), Wp) from x (N, H, W, C): each channel zero-padded by pad."""
    n, h, w, c = x.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    xf = np.zeros((n, c, hp * wp + f - 1), np.float32)
    xf[:, :, :hp * wp].reshape(n, c, hp, wp)[:, :, pad:pad + h, pad:pad + w] = x.transpose(0, 3, 1, 2)
    return xf, wp


def taps(w):
    """wt (K, C, f*f) from conv weights (f, f, C, K)."""
    f, _, c, k = w.shape
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1).reshape(k, c, f * f))


POOLS = True   # in evaluation, forward can apply a following max window itself
EVAL_RELU = True   # in evaluation forward(..., relu=True) returns relu(z) (or relu(maxpool(z)))


def forward(conv, x, w, b, training, ctx, pool=None, relu=False):
    """z (N, OH, OW, K) = conv(x, w) + b, stride 1. pool = (size, stride, PH, PW) (evaluation
    only): return maxpool(z) (N, PH, PW, K) instead, windows clipped to OH x OW; relu
    (evaluation only): relu of that. Where products run in flowdsl's own kernel (AVX-512),
    _vconv.planar_fwd: accumulators in vector registers, the padding, weights' order, pool and
    relu inside one call (net B's first conv at batch 1: 17 -> 11 us)."""
    k, oh, ow = conv.out
    f = w.shape[0]
    n = x.shape[0]
    size, stride, ph, pw = pool if pool is not None else (0, 0, oh, ow)
    y = np.empty((n, ph, pw, k), np.float32)
    if own_products():
        _gemm.vconv().planar_fwd(np.ascontiguousarray(x), w, b, y, conv.padding, oh, ow, f, size, stride, relu)
        return y
    xf, wp = planes(x, conv.padding, f)
    _fwd(xf, taps(w), b, y, wp, oh, ow, f, size, stride)
    if relu:
        np.maximum(y, 0, out=y)
    return y


def backward(conv, dz, w, g, ctx, need_dx):
    x = ctx["x"]
    g["w"][...] = dw(dz, x, conv.args["field"], conv.padding)
    colsum(dz.reshape(-1, conv.args["filters"]), g["b"])
    return _gemm.dx(conv, dz, w, x.shape) if need_dx else None


def bytes_per_sample(conv):
    """The padded planes, kept; their gradient in backward."""
    c, h, w = conv.in_shape
    pad = conv.padding
    padded = 4 * c * (h + 2 * pad) * (w + 2 * pad) if pad else 0
    return padded, padded


eval_chunk = _rows.eval_chunk               # no chunks


def dw(dz, x, f, pad):
    """The weight gradient (f, f, C, K) from dz (N, OH, OW, K) and the layer's input x."""
    c, k = x.shape[3], dz.shape[3]
    xf, wp = planes(x, pad, f)
    part = np.zeros((max(1, min(x.shape[0], CHUNKS)), k, c, f * f), np.float32)
    _dw(xf, dz, part, wp, f)
    return part.sum(axis=0).reshape(k, c, f, f).transpose(2, 3, 1, 0)


# ------------------------------------------------------------------------------------ kernels
@kernel(parallel=False)
def _plane(x, wt, acc, wp, f, L):
    """acc[q] += sum_{a, bb} wt[a*f + bb] * x[a*Wp + bb + q] for q < L (one channel)."""
    if f == 3:
        w0, w1, w2, w3, w4, w5, w6, w7, w8 = wt[0], wt[1], wt[2], wt[3], wt[4], wt[5], wt[6], wt[7], wt[8]
        x0 = x[0:L + 2]
        x1 = x[wp:wp + L + 2]
        x2 = x[2 * wp:2 * wp + L + 2]
        for q in range(L):
            acc[q] += (w0 * x0[q] + w1 * x0[q + 1] + w2 * x0[q + 2] + w3 * x1[q] + w4 * x1[q + 1]
                       + w5 * x1[q + 2] + w6 * x2[q] + w7 * x2[q + 1] + w8 * x2[q + 2])
    elif f == 5:
        for a in range(5):
            r = a * 5
            w0, w1, w2, w3, w4 = wt[r], wt[r + 1], wt[r + 2], wt[r + 3], wt[r + 4]
            xr = x[a * wp:a * wp + L + 4]
            for q in range(L):
                acc[q] += w0 * xr[q] + w1 * xr[q + 1] + w2 * xr[q + 2] + w3 * xr[q + 3] + w4 * xr[q + 4]
    else:
        for a in range(f):
            for bb in range(f):
                wv = wt[a * f + bb]
                xs = x[a * wp + bb:a * wp + bb + L]
                for q in range(L):
                    acc[q] += wv * xs[q]


@kernel(parallel=False)
def _plane4(x, wt, acc, g0, wp, f, L):
    """acc[g0 + i][q] += sum_{a, bb} wt[i, a*f + bb] * x[a*Wp + bb + q] for the four filters i < 4
    and q < L (one channel): _plane for four filters at once, each x value loaded once for four
    multiply-adds (f = 3 and 5; others filter by filter)."""
    a0 = acc[g0]
    a1 = acc[g0 + 1]
    a2 = acc[g0 + 2]
    a3 = acc[g0 + 3]
    if f == 3:
        w00, w01, w02, w03, w04, w05, w06, w07, w08 = (
            wt[0, 0], wt[0, 1], wt[0, 2], wt[0, 3], wt[0, 4],
            wt[0, 5], wt[0, 6], wt[0, 7], wt[0, 8])
        w10, w11, w12, w13, w14, w15, w16, w17, w18 = (
            wt[1, 0], wt[1, 1], wt[1, 2], wt[1, 3], wt[1, 4],
            wt[1, 5], wt[1, 6], wt[1, 7], wt[1, 8])
        w20, w21, w22, w23, w24, w25, w26, w27, w28 = (
            wt[2, 0], wt[2, 1], wt[2, 2], wt[2, 3], wt[2, 4],
            wt[2, 5], wt[2, 6], wt[2, 7], wt[2, 8])
        w30, w31, w32, w33, w34, w35, w36, w37, w38 = (
            wt[3, 0], wt[3, 1], wt[3, 2], wt[3, 3], wt[3, 4],
            wt[3, 5], wt[3, 6], wt[3, 7], wt[3, 8])
        x0 = x[0:L + 2]
        x1 = x[wp:wp + L + 2]
        x2 = x[2 * wp:2 * wp + L + 2]
        for q in range(L):
            p0, p1, p2 = x0[q], x0[q + 1], x0[q + 2]
            p3, p4, p5 = x1[q], x1[q + 1], x1[q + 2]
            p6, p7, p8 = x2[q], x2[q + 1], x2[q + 2]
            a0[q] += (w00 * p0 + w01 * p1 + w02 * p2 + w03 * p3 + w04 * p4 + w05 * p5 + w06 * p6 + w07 * p7 + w08 * p8)
            a1[q] += (w10 * p0 + w11 * p1 + w12 * p2 + w13 * p3 + w14 * p4 + w15 * p5 + w16 * p6 + w17 * p7 + w18 * p8)
            a2[q] += (w20 * p0 + w21 * p1 + w22 * p2 + w23 * p3 + w24 * p4 + w25 * p5 + w26 * p6 + w27 * p7 + w28 * p8)
            a3[q] += (w30 * p0 + w31 * p1 + w32 * p2 + w33 * p3 + w34 * p4 + w35 * p5 + w36 * p6 + w37 * p7 + w38 * p8)
    elif f == 5:
        for a in range(5):
            r = a * 5
            w00, w01, w02, w03, w04 = wt[0, r + 0], wt[0, r + 1], wt[0, r + 2], wt[0, r + 3], wt[0, r + 4]
            w10, w11, w12, w13, w14 = wt[1, r + 0], wt[1, r + 1], wt[1, r + 2], wt[1, r + 3], wt[1, r + 4]
            w20, w21, w22, w23, w24 = wt[2, r + 0], wt[2, r + 1], wt[2, r + 2], wt[2, r + 3], wt[2, r + 4]
            w30, w31, w32, w33, w34 = wt[3, r + 0], wt[3, r + 1], wt[3, r + 2], wt[3, r + 3], wt[3, r + 4]
            xr = x[a * wp:a * wp + L + 4]
            for q in range(L):
                p0, p1, p2, p3, p4 = xr[q], xr[q + 1], xr[q + 2], xr[q + 3], xr[q + 4]
                a0[q] += w00 * p0 + w01 * p1 + w02 * p2 + w03 * p3 + w04 * p4
                a1[q] += w10 * p0 + w11 * p1 + w12 * p2 + w13 * p3 + w14 * p4
                a2[q] += w20 * p0 + w21 * p1 + w22 * p2 + w23 * p3 + w24 * p4
                a3[q] += w30 * p0 + w31 * p1 + w32 * p2 + w33 * p3 + w34 * p4
    else:
        for i in range(4):
            _plane(x, wt[i], acc[g0 + i], wp, f, L)


@kernel(parallel=False)
def _rowdots(d, x, wp, f, L, out):
    """out[a*f + bb] += dot(d[:L], x[a*Wp + bb:][:L]) for every tap: the f dots of a filter row
    in one pass over d (each d value loaded once for f multiply-adds)."""
    zero = np.float32(0.0)
    for a in range(f):
        xr = x[a * wp:a * wp + L + f - 1]
        if f == 3:
            s0 = s1 = s2 = zero
            for q in range(L):
                v = d[q]
                s0 += v * xr[q]
                s1 += v * xr[q + 1]
                s2 += v * xr[q + 2]
            out[a * 3] += s0
            out[a * 3 + 1] += s1
            out[a * 3 + 2] += s2
        elif f == 5:
            s0 = s1 = s2 = s3 = s4 = zero
            for q in range(L):
                v = d[q]
                s0 += v * xr[q]
                s1 += v * xr[q + 1]
                s2 += v * xr[q + 2]
                s3 += v * xr[q + 3]
                s4 += v * xr[q + 4]
            out[a * 5] += s0
            out[a * 5 + 1] += s1
            out[a * 5 + 2] += s2
            out[a * 5 + 3] += s3
            out[a * 5 + 4] += s4
        else:
            for bb in range(f):
                s = zero
                for q in range(L):
                    s += d[q] * xr[bb + q]
                out[a * f + bb] += s


@kernel
def _fwd(xf, wt, b, out, wp, oh, ow, f, size, stride):
    """One task per (image, group of G filters): acc[g] on the padded-width grid, then either
    out[n, :, :, k] = acc (size 0) or out[n, pi, pj, k] = the max of acc over the pool window,
    clipped to OH x OW. Grouping filters writes G contiguous floats per output position."""
    n_, c_, _ = xf.shape
    kk = wt.shape[0]
    groups = (kk + G - 1) // G
    L = oh * wp
    for task in prange(n_ * groups):
        n = task // groups
        k0 = task % groups * G
        g_ = min(G, kk - k0)
        acc = np.empty((g_, L), np.float32)
        for g in range(g_):
            acc[g, :] = b[k0 + g]
        for c in range(c_):
            g = 0
            while g + 4 <= g_:
                _plane4(xf[n, c], wt[k0 + g:k0 + g + 4, c], acc, g, wp, f, L)
                g += 4
            for g in range(g, g_):
                _plane(xf[n, c], wt[k0 + g, c], acc[g], wp, f, L)
        _emit(acc, out, n, k0, g_, wp, oh, ow, size, stride, False)


@kernel(parallel=False)
def _emit(acc, out, n, k0, g_, wp, oh, ow, size, stride, relu):
    """Filters k0 .. k0 + g_ of image n from acc[g, q] on the padded-width grid (q = i*Wp + j):
    out[n, :, :, k0 + g] = acc (size 0) or out[n, pi, pj, k0 + g] = the max of acc over the pool
    window, clipped to OH x OW; relu: max(v, 0) of what is written."""
    zero = np.float32(0.0)
    if size == 0:
        for i in range(oh):
            for j in range(ow):
                q = i * wp + j
                for g in range(g_):
                    v = acc[g, q]
                    out[n, i, j, k0 + g] = max(v, zero) if relu else v
        return
    ph = out.shape[1]
    pw = out.shape[2]
    if size == 2 and stride == 2:
        # the common 2x2 window: each pair of grid rows' maximum in one vectorised pass, then
        # the pairs of columns (2.0-2.2x faster than the general loop below on nets A and B's
        # first layers; a window clipped by ceil=true repeats its last row or column)
        pair = np.empty(ow, np.float32)
        for g in range(g_):
            for i in range(ph):
                y0 = 2 * i
                y1 = min(y0 + 1, oh - 1)
                a0 = acc[g, y0 * wp:y0 * wp + ow]
                a1 = acc[g, y1 * wp:y1 * wp + ow]
                for xx in range(ow):
                    pair[xx] = max(a0[xx], a1[xx])
                for j in range(pw):
                    v = max(pair[2 * j], pair[min(2 * j + 1, ow - 1)])
                    out[n, i, j, k0 + g] = max(v, zero) if relu else v
        return
    for i in range(ph):
        y0 = i * stride
        y1 = min(y0 + size, oh)
        for j in range(pw):
            x0 = j * stride
            x1 = min(x0 + size, ow)
            for g in range(g_):
                m = acc[g, y0 * wp + x0]
                for yy in range(y0, y1):
                    for xx in range(x0, x1):
                        v = acc[g, yy * wp + xx]
                        m = v if v > m else m
                out[n, i, j, k0 + g] = max(m, zero) if relu else m


@kernel
def _dw(xf, dz, part, wp, f):
    """part[t, k, c, a*f + bb] = sum over chunk t's images of sum_{i, j} dz[n, i, j, k] *
    P_c[a*Wp + bb + i*Wp + j]; one task per (chunk, group of G filters) owns its partial sums."""
    n_, oh, ow, kk = dz.shape
    c_ = xf.shape[1]
    chunks = part.shape[0]
    groups = (kk + G - 1) // G
    L = oh * wp
    for task in prange(chunks * groups):
        t = task // groups
        k0 = task % groups * G
        g_ = min(G, kk - k0)
        d = np.zeros((g_, L), np.float32)     # dz on the grid; columns j >= OW stay 0
        for n in range(n_ * t // chunks, n_ * (t + 1) // chunks):
            for i in range(oh):
                for j in range(ow):
                    q = i * wp + j
                    for g in range(g_):
                        d[g, q] = dz[n, i, j, k0 + g]
            for g in range(g_):
                for c in range(c_):
                    _rowdots(d[g], xf[n, c], wp, f, L, part[t, k0 + g, c])
