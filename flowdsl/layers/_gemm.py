"""conv's "gemm" algorithm, the general one: numba im2col and one BLAS product, each thread on
its own share of the images (`product`). In training a trailing column of ones carries the bias,
so its gradient comes out of the weight-gradient product; in evaluation each share goes through
cache-sized chunks, which add the bias and can apply a following maxpool. Its product-based input gradient (`dx`) also serves "planar" layers.
The strategy interface is described in _rows.py."""
import sys

import numpy as np

from ..blas import dot, mm, runs_own, shares
from .maxpool import _max_bwd, _max_eval, _max_fwd
from ..jit import kernel, prange

POOLS = True    # in evaluation, forward can apply a following max window chunk by chunk
TRAIN_POOLS = True   # in training too, recording each window's winner (conv.can_pool)
POOL_CHUNK_FLOATS = 1 << 18   # training's pooled forward: products of about this many floats,
                              # pooled while in cache (net A's conv1: 12 images a chunk)
EVAL_RELU = True   # in evaluation forward(..., relu=True) returns relu(z) (or relu(maxpool(z)))
FLIP_DX = True
TALL_BELOW_C = 8         # fewer input channels: im2col columns stored as rows (_im2col_t)


def forward(conv, x, w, b, training, ctx, pool=None, relu=False):
    f, s, pad = conv.args["field"], conv.args["stride"], conv.padding
    k, oh, ow = conv.out
    if not training:   # the bias is added to each chunk's product (no copy of the weights)
        wk = w.reshape(-1, k)
        if pool is not None:   # each chunk's output is pooled while it is in cache
            size, stride, ph, pw = pool
            y = np.empty((x.shape[0], ph, pw, k), np.float32)
            product(x, wk, None, f, s, pad, oh, ow, pool=(size, stride, y), bias=b, relu=relu)
            return y
        z = np.empty((x.shape[0], oh, ow, k), np.float32)
        product(x, wk, z.reshape(-1, k), f, s, pad, oh, ow, bias=b, relu=relu)
        return z
    # training: a column of ones carries the bias, whose gradient then comes out of the weight
    # gradient's product
    wb = np.concatenate([w.reshape(-1, k), b[None, :]])
    if pool is not None:   # the max windows of each chunk's product, their winners recorded
        size, stride, ph, pw = pool
        y = np.empty((x.shape[0], ph, pw, k), np.float32)
        arg = ctx["pool_arg"] = np.empty((x.shape[0], ph, pw, k), np.int32)
        ctx["pool"] = (size, stride)
        ctx["cols"], ctx["tall"] = product(x, wb, None, f, s, pad, oh, ow, keep=True, pool=(size, stride, y),
                                           arg=arg)
        return y
    z = np.empty((x.shape[0], oh, ow, k), np.float32)
    ctx["cols"], ctx["tall"] = product(x, wb, z.reshape(-1, k), f, s, pad, oh, ow, keep=True)
    return z


def product(x, wmat, out, f, s, pad, oh, ow, keep=False, pool=None, bias=None, arg=None, relu=False):
    """out (N*OH*OW, K) = im2col(x) @ wmat, where wmat has f*f*C rows, or one more (then im2col
    adds a column of ones: the bias row). Each thread takes a contiguous share of the images
    and runs im2col and its product itself (one hand-over per call; net A's conv2 in evaluation
    at batch 256: 8.3 ms with a parallel im2col and a split product per chunk, 5.7 so), through
    a buffer of about conv.CHUNK_FLOATS floats that stays in cache, or, keep=True (training's
    forward), into the whole column matrix, returned for the weight gradient with whether it is
    stored transposed: (cols or None, tall). pool = (size, stride, y): out is None, and each
    chunk's product goes to a buffer whose max windows (clipped to OH x OW) are written to y
    (N, PH, PW, K): the conv's full-size output is never written; with arg (N, PH, PW, K) int32
    as well (training, keep=True) each window's winner is recorded as maxpool's forward does,
    chunk by chunk (POOL_CHUNK_FLOATS of output). bias: a K-vector added to each chunk's
    product; relu (keep=False): the output's relu. Without keep, where the product runs in
    flowdsl's own kernel, each share is one numba call (_vconv)."""
    width = wmat.shape[0]
    n = x.shape[0]
    r = oh * ow                       # rows (output positions) per image
    tall = x.shape[3] < TALL_BELOW_C  # columns as rows: few channels make short NHWC segments
    cols = np.empty((width, n * r) if tall else (n * r, width), np.float32) if keep else None
    kk = wmat.shape[1]
    if keep and pool is not None:
        step = max(1, POOL_CHUNK_FLOATS // max(1, r * kk))
    elif keep:
        step = n
    else:
        step = max(1, sys.modules["flowdsl.layers.conv"].CHUNK_FLOATS // max(1, r * width))
    if not keep and wmat.flags.c_contiguous and runs_own(min(step, n) * r * width, kk):
        ev = vconv().conv_eval
        x = np.ascontiguousarray(x)
        b = np.zeros(0, np.float32) if bias is None else bias
        size, stride, y = pool if pool is not None else (0, 1, out.reshape(n, oh, ow, kk))
        shares(n, lambda lo, hi: ev(x[lo:hi], wmat, b, y[lo:hi], f, s, pad, oh, ow, size, stride, relu, step),
               n * r * width * kk)
        return None, tall
    im2col = _im2col_t.serial if tall else _im2col.serial

    def run(lo, hi):
        buf = cols if keep else np.empty((width, min(step, hi - lo) * r) if tall else
                                         (min(step, hi - lo) * r, width), np.float32)
        zbuf = np.empty((min(step, hi - lo) * r, kk), np.float32) if pool is not None else None
        for i in range(lo, hi, step):
            e = min(hi, i + step)
            a, b = (i * r, e * r) if keep else (0, (e - i) * r)
            dst = zbuf[:(e - i) * r] if pool is not None else out[i * r:e * r]
            if tall:
                part = buf[:, a:b]
                im2col(x[i:e].reshape(e - i, x.shape[1], -1), part, f, s, pad, oh, ow, x.shape[3])
                dot(part.T, wmat, out=dst)
            else:
                part = buf[a:b]
                im2col(x[i:e], part, f, s, pad, oh, ow)
                dot(part, wmat, out=dst)
            if arg is not None:   # training: the bias is in the product (its row of ones)
                _max_fwd.serial(dst.reshape(e - i, oh, ow, kk), pool[2][i:e], arg[i:e], pool[0], pool[1], 0)
            elif pool is not None:   # max(z + b) = max(z) + b: the bias goes on the pooled values
                _max_eval.serial(dst.reshape(e - i, oh, ow, kk), pool[2][i:e], pool[0], pool[1], 0)
                if bias is not None:
                    pool[2][i:e] += bias
                if relu:
                    np.maximum(pool[2][i:e], 0, out=pool[2][i:e])
            else:
                if bias is not None:
                    dst += bias
                if relu:
                    np.maximum(dst, 0, out=dst)

    shares(n, run, n * r * width * kk)
    return cols, tall


def backward(conv, dz, w, g, ctx, need_dx):
    k = conv.args["filters"]
    cols = ctx.pop("cols")
    if "pool_arg" in ctx:   # dz is the gradient at the pooled output: to the windows' winners
        _, oh, ow = conv.out
        full = np.empty((dz.shape[0], oh * ow, k), np.float32)
        _max_bwd(dz, ctx.pop("pool_arg"), full, oh, *ctx["pool"], 0)
        dz = full.reshape(dz.shape[0], oh, ow, k)
    dz2 = dz.reshape(-1, k)
    gwb = mm(cols, dz2) if ctx["tall"] else mm(cols.T, dz2)  # ones give the bias gradient
    g["w"].reshape(-1, k)[...] = gwb[:-1]
    g["b"][...] = gwb[-1]
    del cols
    return dx(conv, dz, w, ctx["x"].shape) if need_dx else None


def bytes_per_sample(conv):
    """im2col rows kept; their gradient in backward (Winograd keeps less, 4 or 2.25 floats per
    output and channel, but small batches use im2col: counted the same)."""
    c = conv.in_shape[0]
    _, oh, ow = conv.out
    f = conv.args["field"]
    rows = 4 * oh * ow * (f * f * c + 1)
    return rows, rows


def eval_chunk(conv, n, chunk_floats):
    """No outer chunks: forward cuts each thread's share into cache-sized chunks itself."""
    return n


def dx(conv, dz, w, x_shape):
    """The input gradient by products (gemm and planar layers)."""
    f, s, pad = conv.args["field"], conv.args["stride"], conv.padding
    k = conv.args["filters"]
    n, oh, ow, _ = dz.shape
    dz2 = dz.reshape(-1, k)
    c = x_shape[3]
    if FLIP_DX and s == 1 and pad <= f - 1 and k <= c:
        # dx is the convolution of dz (padded by f-1-pad) with the flipped filters, inputs
        # and outputs swapped: one more im2col and product, no scatter of f*f*C columns
        wf = np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2)).reshape(-1, c)
        out = np.empty(x_shape, np.float32)
        product(dz, wf, out.reshape(-1, c), f, 1, f - 1 - pad, x_shape[1], x_shape[2])
        return out
    dcols = mm(dz2, w.reshape(-1, k).T)  # BLAS reads the view as it is (a copy first: level at batch 32,
    #                                      1.3x slower at batch 1, where it is most of the product)
    out = np.empty(x_shape, np.float32)
    _col2im(dcols, out, f, s, pad, oh, ow)
    return out


# ------------------------------------------------------------------------------------ kernels
@kernel
def _im2col(x, cols, f, s, pad, oh, ow):
    """cols[(n, i, j), (a, b, c)] = x[n, i*s + a - pad, j*s + b - pad, c] (0 outside).
    With channels last, the f*C values of one window row are contiguous: one run copied.
    (Copies are loops over zero-based slices: numba's slice assignment cost 2-3x more here,
    net B's conv2 at batch 1: 16 -> 6 us, with the row reshaped once.)"""
    n_, h, w, c = x.shape
    fc = f * c
    zero = np.float32(0.0)
    ones = cols.shape[1] > f * fc  # a trailing column of ones carries the bias
    for row in prange(n_ * oh):
        n = row // oh
        i = row % oh
        if ones:
            for j in range(ow):
                cols[(n * oh + i) * ow + j, f * fc] = np.float32(1.0)
        for a in range(f):
            y = i * s + a - pad
            if y < 0 or y >= h:
                for j in range(ow):
                    dst = cols[(n * oh + i) * ow + j, a * fc:(a + 1) * fc]
                    for q in range(fc):
                        dst[q] = zero
                continue
            xr = x[n, y].reshape(w * c)   # once per input row: a reshape per window cost 3x
            for j in range(ow):
                dst = cols[(n * oh + i) * ow + j, a * fc:(a + 1) * fc]
                x0 = j * s - pad
                if x0 >= 0 and x0 + f <= w:
                    src = xr[x0 * c:x0 * c + fc]
                    for q in range(fc):
                        dst[q] = src[q]
                else:
                    for bb in range(f):
                        xx = x0 + bb
                        d = dst[bb * c:(bb + 1) * c]
                        if xx < 0 or xx >= w:
                            for q in range(c):
                                d[q] = zero
                        else:
                            src = xr[xx * c:(xx + 1) * c]
                            for q in range(c):
                                d[q] = src[q]


@kernel
def _im2col_t(x, cols, f, s, pad, oh, ow, c):
    """The transpose of _im2col: cols[(a, b, c), (n, i, j)] = x[n, i*s + a - pad, j*s + b - pad, c]
    (0 outside), plus a last row of ones when cols has one more row than f*f*C; x is given as
    (N, H, W*C). With few channels an output row's worth of one tap is a (strided) run of one
    input row: long writes instead of _im2col's f*C-float segments (3x faster for C = 1 here);
    with one channel and stride 1 the run is contiguous and copied as a block (net B's first
    layer at batch 256: 5.1 -> 3.4 ms)."""
    n_, h, wc = x.shape
    w = wc // c
    taps = f * f * c
    m = oh * ow
    zero = np.float32(0.0)
    if cols.shape[0] > taps:
        for n in prange(n_):
            cols[taps, n * m:(n + 1) * m] = np.float32(1.0)
    for task in prange(taps * n_):
        t = task // n_
        n = task % n_
        a = t // (f * c)
        bb = (t // c) % f
        cc = t % c
        # output columns j whose input column j*s + bb - pad lies inside [0, w)
        j0 = 0
        while j0 < ow and j0 * s + bb - pad < 0:
            j0 += 1
        j1 = ow
        while j1 > j0 and (j1 - 1) * s + bb - pad >= w:
            j1 -= 1
        for i in range(oh):
            base = n * m + i * ow
            y = i * s + a - pad
            if y < 0 or y >= h:
                cols[t, base:base + ow] = zero
                continue
            xr = x[n, y]
            cols[t, base:base + j0] = zero
            if s * c == 1:
                cols[t, base + j0:base + j1] = xr[j0 + bb - pad:j1 + bb - pad]
            else:
                for j in range(j0, j1):
                    cols[t, base + j] = xr[(j * s + bb - pad) * c + cc]
            cols[t, base + j1:base + ow] = zero


@kernel
def _col2im(dcols, dx, f, s, pad, oh, ow):
    """The adjoint of _im2col, as a gather: each input row is written by one iteration."""
    n_, h, w, c = dx.shape
    fc = f * c
    zero = np.float32(0.0)
    for row in prange(n_ * h):
        n = row // h
        y = row % h
        dr = dx[n, y].reshape(w * c)
        for q in range(w * c):
            dr[q] = zero
        for a in range(f):
            t = y + pad - a
            if t < 0 or t % s != 0:
                continue
            i = t // s
            if i >= oh:
                continue
            base = a * fc
            for j in range(ow):
                r = (n * oh + i) * ow + j
                x0 = j * s - pad
                src = dcols[r, base:base + fc]
                if x0 >= 0 and x0 + f <= w:
                    d = dr[x0 * c:x0 * c + fc]
                    for q in range(fc):
                        d[q] += src[q]
                else:
                    for bb in range(f):
                        xx = x0 + bb
                        if 0 <= xx < w:
                            for cc in range(c):
                                dr[xx * c + cc] += src[bb * c + cc]


_VC = None


def vconv():
    """flowdsl.layers._vconv (the evaluation kernels with 16-wide vectors), imported on first
    use: it needs numba configured."""
    global _VC
    if _VC is None:
        from . import _vconv as vc
        _VC = vc
    return _VC
