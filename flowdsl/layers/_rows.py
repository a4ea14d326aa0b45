"""conv's "rows" algorithm, for convs with few filters (NeuroFlow's 1-filter convs on 400x400
images): direct loops on a pre-padded input, a unit-stride multiply-add along each output row;
no im2col buffer. (Direct loops vectorised across the filters, or along output rows, were also
tried for first layers with few input taps; im2col + BLAS beat them. "planar" is the direct
form that beats it.)

The strategy interface every conv algorithm module shares (conv.py dispatches to it):
    forward(conv, x, w, b, training, ctx, pool=None) -> z    pre-activation output (N, OH, OW, K)
    backward(conv, dz, w, g, ctx, need_dx) -> dx or None     writes g["w"], g["b"]
    bytes_per_sample(conv) -> (kept, dx_transient)           training memory per sample
    POOLS                                                    whether forward applies `pool` itself
    eval_chunk(conv, n, chunk_floats) -> images per evaluation chunk (n: no chunking)"""
import numpy as np

from ..blas import colsum
from ..jit import kernel, prange

POOLS = False


def forward(conv, x, w, b, training, ctx, pool=None):
    n = x.shape[0]
    k, oh, ow = conv.out
    xp = _pad(x, conv.padding)
    z = np.empty((n, oh, ow, k), np.float32)
    _direct_fwd(xp.reshape(n, xp.shape[1], -1), _wrep(w, ow), w, b, z.reshape(n, oh, ow * k),
                conv.args["stride"], x.shape[3])
    if training:
        ctx["xp"] = xp
    return z


def backward(conv, dz, w, g, ctx, need_dx):
    s, pad, k = conv.args["stride"], conv.padding, conv.args["filters"]
    xp, x_shape = ctx["xp"], ctx["x"].shape
    n, oh, ow, _ = dz.shape
    colsum(dz.reshape(-1, k), g["b"])
    _direct_dw(xp.reshape(n, xp.shape[1], -1), dz, g["w"], s, x_shape[3], 32)
    if not need_dx:
        return None
    dxp = np.empty_like(xp)
    _direct_dx(dz, w, _wrep(w, ow), dxp.reshape(n, xp.shape[1], -1), s)
    return np.ascontiguousarray(dxp[:, pad:pad + x_shape[1], pad:pad + x_shape[2], :]) if pad else dxp


def bytes_per_sample(conv):
    """The padded input, kept; its gradient in backward."""
    c, h, w = conv.in_shape
    pad = conv.padding
    padded = 4 * c * (h + 2 * pad) * (w + 2 * pad) if pad else 0
    return padded, padded


def eval_chunk(conv, n, chunk_floats):
    return n


def _pad(x, pad):
    if pad == 0:
        return x
    n, h, w, c = x.shape
    xp = np.zeros((n, h + 2 * pad, w + 2 * pad, c), np.float32)
    xp[:, pad:pad + h, pad:pad + w, :] = x
    return xp


def _wrep(w, ow):
    """wrep[k, a, b, q] = w[a, b, q % C, k] for q < ow*C: a tap's weights repeated along a row,
    so the stride-1 direct kernels run unit-stride multiply-adds over (column, channel) pairs."""
    f, _, c, k = w.shape
    return np.ascontiguousarray(np.tile(w.transpose(3, 0, 1, 2), (1, 1, 1, ow)))


@kernel
def _direct_fwd(xp, wrep, w, b, z, s, c):
    """z[n, i, j*K + k] = b[k] + sum_{a,bb,cc} xp[n, i*s + a, (j*s + bb)*C + cc] * w[a,bb,cc,k]
    on a pre-padded input with rows flattened to (width*C). Stride 1: per tap, one unit-stride
    multiply-add over the row into a (column, channel) buffer, then a sum over channels."""
    n_ = xp.shape[0]
    f = w.shape[0]
    kk = w.shape[3]
    oh = z.shape[1]
    ow = z.shape[2] // kk
    m = ow * c
    for row in prange(n_ * oh):
        n = row // oh
        i = row % oh
        if s == 1:
            tmp = np.empty(m, np.float32)
            for k in range(kk):
                tmp[:] = np.float32(0.0)
                for a in range(f):
                    xr = xp[n, i + a]
                    for bb in range(f):
                        wr = wrep[k, a, bb]
                        xs = xr[bb * c: bb * c + m]
                        for q in range(m):
                            tmp[q] += wr[q] * xs[q]
                for j in range(ow):
                    acc = b[k]
                    for cc in range(c):
                        acc += tmp[j * c + cc]
                    z[n, i, j * kk + k] = acc
        else:
            acc = np.empty(ow, np.float32)
            for k in range(kk):
                acc[:] = b[k]
                for a in range(f):
                    xr = xp[n, i * s + a]
                    for bb in range(f):
                        for cc in range(c):
                            wv = w[a, bb, cc, k]
                            xs = xr[bb * c + cc:: s * c]
                            for j in range(ow):
                                acc[j] += wv * xs[j]
                for j in range(ow):
                    z[n, i, j * kk + k] = acc[j]


@kernel
def _direct_dw(xp, dz, dw, s, c, chunks):
    """dw[a,bb,cc,k] = sum_{n,i,j} dz[n,i,j,k] * xp[n, i*s+a, (j*s+bb)*C + cc]. Rows are split
    into chunks, each with its own partial sums (per row position), merged serially: no races."""
    n_, oh, ow, kk = dz.shape
    f = dw.shape[0]
    m = ow * c
    rows = n_ * oh
    chunks = max(1, min(chunks, rows))
    part = np.zeros((chunks, kk, f, f, m), np.float32)
    for t in prange(chunks):
        dzr = np.empty(m, np.float32)
        for row in range(rows * t // chunks, rows * (t + 1) // chunks):
            n = row // oh
            i = row % oh
            for k in range(kk):
                for j in range(ow):
                    v = dz[n, i, j, k]
                    for cc in range(c):
                        dzr[j * c + cc] = v
                for a in range(f):
                    xr = xp[n, i * s + a]
                    for bb in range(f):
                        pr = part[t, k, a, bb]
                        if s == 1:
                            xs = xr[bb * c: bb * c + m]
                            for q in range(m):
                                pr[q] += dzr[q] * xs[q]
                        else:
                            for cc in range(c):
                                xs = xr[bb * c + cc:: s * c]
                                ps = pr[cc::c]
                                ds = dzr[cc::c]
                                for j in range(ow):
                                    ps[j] += ds[j] * xs[j]
    for a in range(f):
        for bb in range(f):
            for cc in range(c):
                for k in range(kk):
                    acc = np.float32(0.0)
                    for t in range(chunks):
                        pr = part[t, k, a, bb]
                        for j in range(ow):
                            acc += pr[j * c + cc]
                    dw[a, bb, cc, k] = acc


@kernel
def _direct_dx(dz, w, wrep, dxp, s):
    """Gradient w.r.t. the padded input, one padded row per iteration (disjoint writes):
    dxp[n, y, (j*s+bb)*C + cc] += dz[n,i,j,k] * w[a,bb,cc,k] for every tap with i*s + a = y."""
    n_, oh, ow, kk = dz.shape
    f = w.shape[0]
    c = w.shape[2]
    hp = dxp.shape[1]
    m = ow * c
    for row in prange(n_ * hp):
        n = row // hp
        y = row % hp
        dr = dxp[n, y]
        dr[:] = np.float32(0.0)
        dzr = np.empty(m, np.float32)
        for a in range(f):
            t = y - a
            if t < 0 or t % s != 0:
                continue
            i = t // s
            if i >= oh:
                continue
            for k in range(kk):
                if s == 1:
                    for j in range(ow):
                        v = dz[n, i, j, k]
                        for cc in range(c):
                            dzr[j * c + cc] = v
                    for bb in range(f):
                        wr = wrep[k, a, bb]
                        ds = dr[bb * c: bb * c + m]
                        for q in range(m):
                            ds[q] += dzr[q] * wr[q]
                else:
                    dzk = dz[n, i, :, k]
                    for bb in range(f):
                        for cc in range(c):
                            wv = w[a, bb, cc, k]
                            ds = dr[bb * c + cc:: s * c]
                            for j in range(ow):
                                ds[j] += wv * dzk[j]
