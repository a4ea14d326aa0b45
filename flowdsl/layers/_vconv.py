"""Evaluation's convs in one numba call each, with 16-wide vectors: conv_eval (gemm: the im2col
product in flowdsl's own kernel, flowdsl._vgemm, reading the input in place; the bias, an
optional max window and relu; chunk by chunk, for the images of one thread's share) and
planar_fwd (planar).

Why: at batch 1 a conv's kernels take a few microseconds each, and the Python around them
(buffers, views, the product's routing, the pool's and the bias's calls, relu's fresh array)
cost as much again: net B's conv2 (12x12x20 -> 40 5x5, pooled) 29 us, of which 18.5 kernels.
Imported on first use (it needs numba configured and _vgemm, which needs AVX-512 to be fast)."""
import numpy as np
from numba import njit

from .. import _vgemm
from .._vgemm import W, vbroadcast, vfma, vload, vsplat, vstore
from ..jit import FLAGS, kernel, prange
from . import _planar
from .maxpool import _max_eval as _max_eval_lazy

_max_eval = _max_eval_lazy.serial
_product = _vgemm._product   # numba dispatchers, called from the kernels below
KB = _vgemm.KB
_emit = _planar._emit.serial


@njit(**FLAGS)
def conv_eval(x, wk, b, y, f, s, pad, oh, ow, size, stride, relu, step):
    """y = act(maxpool(conv(x)) + b), or act(conv(x) + b) when size == 0 (y then (N, OH, OW, K));
    act: relu when relu, else none; b empty: no bias. The conv is im2col(x) @ wk with the
    im2col matrix never built: the own product reads it from x through two offset tables
    (A[r, k] = x[ra[r] + ka[k]]: r an output position, k a tap; 5-11% faster than im2col and the
    product, 2026-12-07), from a zero-padded copy of each chunk when pad > 0. x (N, H, W, C)
    C-contiguous; wk (f*f*C, K) C-contiguous; y (N, PH, PW, K) C-contiguous, maxpool's windows
    of size x size every stride clipped to OH x OW (max(z) + b = max(z + b): the bias goes on
    the pooled values). step: images a chunk."""
    n, h, wd, c = x.shape
    kk = wk.shape[1]
    r = oh * ow
    hp, wp = h + 2 * pad, wd + 2 * pad
    per = hp * wp * c                # floats an image (padded)
    m = min(step, n)
    ra = np.empty(m * r, np.int64)   # an output position's window, from its chunk's start
    q = 0
    for img in range(m):
        for i in range(oh):
            for j in range(ow):
                ra[q] = img * per + (i * s * wp + j * s) * c
                q += 1
    ka = np.empty(f * f * c, np.int64)   # a tap inside the window
    q = 0
    for a in range(f):
        for bb in range(f):
            for cc in range(c):
                ka[q] = (a * wp + bb) * c + cc
                q += 1
    xp = np.zeros(m * per if pad else 1, np.float32)
    xf = x.reshape(x.size)
    z = np.empty(m * r * kk if size else 16, np.float32)
    tmp = np.empty(16, np.float32)
    part = np.empty(m * r * kk if wk.shape[0] > KB else 1, np.float32)
    wf = wk.reshape(wk.size)
    yf = y.reshape(y.size)
    ph, pw = y.shape[1], y.shape[2]
    zero = np.float32(0.0)
    nb = b.shape[0] > 0   # else no bias
    for i in range(0, n, step):
        e = min(n, i + step)
        if pad:
            for row in range((e - i) * h):
                src = (i * h + row) * wd * c
                dst = ((row // h) * hp + row % h + pad) * wp * c + pad * c
                for q in range(wd * c):
                    xp[dst + q] = xf[src + q]
            a = (xp, ra[:(e - i) * r], ka)
        else:
            a = (xf[i * per:e * per], ra[:(e - i) * r], ka)
        if size == 0:   # y is the product's output (PH, PW = OH, OW)
            _product(a, wf, yf[i * r * kk:e * r * kk], kk, tmp, part, KB)
        else:
            _product(a, wf, z, kk, tmp, part, KB)
            _max_eval(z[:(e - i) * r * kk].reshape(e - i, oh, ow, kk), y[i:e], size, stride, 0)
        if nb or relu:
            for row in range(i * ph * pw, e * ph * pw):
                o = row * kk
                for k in range(kk):
                    v = yf[o + k] + (b[k] if nb else zero)
                    yf[o + k] = max(v, zero) if relu else v


GV = 8   # filters a task in planar_fwd: 8 vectors of accumulators


@kernel
def planar_fwd(x, w, b, out, pad, oh, ow, f, size, stride, relu):
    """_planar._fwd with 16-wide vectors: out (N, OH, OW, K) = conv(x, w) + b, stride 1, or
    (size > 0) its max windows (N, PH, PW, K); relu: then max(., 0). x (N, H, W, C); w (f, f, C,
    K) C-contiguous (x too); b (K,). One task per (image, group of GV filters): the image's channels
    zero-padded into planes of its own (Hp x Wp flat, with slack for the last vectors' reads),
    then for each 32 positions q of the padded-width grid 2 x GV accumulators held in registers
    over every channel and tap (two vector loads of the plane, GV broadcasts of the filters'
    weights, 2 x GV fused multiply-adds a tap: 10-35% faster than one vector of positions, whose
    loop overhead and broadcasts weighed on 3x3 filters), stored once; _planar._emit writes or
    pools them."""
    n_, h, wd, c_ = x.shape
    kk = w.shape[3]
    wf = w.reshape(w.size)
    xf = x.reshape(x.size)
    groups = (kk + GV - 1) // GV
    hp, wp = h + 2 * pad, wd + 2 * pad
    L = oh * wp
    nv = (L + W - 1) // W
    span = hp * wp + f + 2 * W   # a plane: the padded image, then slack past the last vectors' reads
    for task in prange(n_ * groups):
        n = task // groups
        k0 = task % groups * GV
        g_ = min(GV, kk - k0)
        xp = np.zeros(c_ * span, np.float32)
        for i in range(h):
            src = (n * h + i) * wd * c_
            for c in range(c_):
                dst = c * span + (i + pad) * wp + pad
                for j in range(wd):
                    xp[dst + j] = xf[src + j * c_ + c]
        # the filters' columns in w, the last repeated past g_ (computed, never written)
        q0_, q1_, q2_, q3_ = k0, k0 + min(1, g_ - 1), k0 + min(2, g_ - 1), k0 + min(3, g_ - 1)
        q4_, q5_, q6_, q7_ = k0 + min(4, g_ - 1), k0 + min(5, g_ - 1), k0 + min(6, g_ - 1), k0 + min(7, g_ - 1)
        nv2 = (nv + 1) // 2 * 2
        acc = np.empty((GV, nv2 * W), np.float32)
        af = acc.reshape(GV * nv2 * W)
        s = nv2 * W
        for v in range(0, nv2, 2):
            q = v * W
            a0 = vsplat(b[q0_]); a1 = vsplat(b[q1_]); a2 = vsplat(b[q2_]); a3 = vsplat(b[q3_])
            a4 = vsplat(b[q4_]); a5 = vsplat(b[q5_]); a6 = vsplat(b[q6_]); a7 = vsplat(b[q7_])
            e0 = a0; e1 = a1; e2 = a2; e3 = a3; e4 = a4; e5 = a5; e6 = a6; e7 = a7
            for c in range(c_):
                for a in range(f):
                    for bb in range(f):
                        o = c * span + a * wp + bb + q
                        xv = vload(xp, o)
                        yv = vload(xp, o + W)
                        t = ((a * f + bb) * c_ + c) * kk
                        w0 = vbroadcast(wf, t + q0_)
                        a0 = vfma(w0, xv, a0)
                        e0 = vfma(w0, yv, e0)
                        w0 = vbroadcast(wf, t + q1_)
                        a1 = vfma(w0, xv, a1)
                        e1 = vfma(w0, yv, e1)
                        w0 = vbroadcast(wf, t + q2_)
                        a2 = vfma(w0, xv, a2)
                        e2 = vfma(w0, yv, e2)
                        w0 = vbroadcast(wf, t + q3_)
                        a3 = vfma(w0, xv, a3)
                        e3 = vfma(w0, yv, e3)
                        w0 = vbroadcast(wf, t + q4_)
                        a4 = vfma(w0, xv, a4)
                        e4 = vfma(w0, yv, e4)
                        w0 = vbroadcast(wf, t + q5_)
                        a5 = vfma(w0, xv, a5)
                        e5 = vfma(w0, yv, e5)
                        w0 = vbroadcast(wf, t + q6_)
                        a6 = vfma(w0, xv, a6)
                        e6 = vfma(w0, yv, e6)
                        w0 = vbroadcast(wf, t + q7_)
                        a7 = vfma(w0, xv, a7)
                        e7 = vfma(w0, yv, e7)
            vstore(af, q, a0); vstore(af, q + W, e0)
            vstore(af, s + q, a1); vstore(af, s + q + W, e1)
            vstore(af, 2 * s + q, a2); vstore(af, 2 * s + q + W, e2)
            vstore(af, 3 * s + q, a3); vstore(af, 3 * s + q + W, e3)
            vstore(af, 4 * s + q, a4); vstore(af, 4 * s + q + W, e4)
            vstore(af, 5 * s + q, a5); vstore(af, 5 * s + q + W, e5)
            vstore(af, 6 * s + q, a6); vstore(af, 6 * s + q + W, e6)
            vstore(af, 7 * s + q, a7); vstore(af, 7 * s + q + W, e7)
        _emit(acc, out, n, k0, g_, wp, oh, ow, size, stride, relu)
