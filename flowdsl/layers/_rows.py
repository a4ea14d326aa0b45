"""conv's "rows" algorithm, for convs with few filters (NeuroFlow's 1-filter convs on 400x400
images): direct loops on the unpadded input (each tap's columns clipped to the image, so no
padded copy and no padded gradient to cut down), a unit-stride multiply-add along each output
row; no im2col buffer. (Direct loops vectorised across the filters, or along output rows, were also
tried for first layers with few input taps; im2col + BLAS beat them. "planar" is the direct
form that beats it.)

The strategy interface every conv algorithm module shares (conv.py dispatches to it):
    forward(conv, x, w, b, training, ctx, pool=None) -> z    pre-activation output (N, OH, OW, K)
    backward(conv, dz, w, g, ctx, need_dx) -> dx or None     writes g["w"], g["b"]
    bytes_per_sample(conv) -> (kept, dx_transient)           training memory per sample
    POOLS                                                    whether forward applies `pool` itself
    RELU (optional)                   whether forward(..., relu=True) returns relu(z) itself
                                      and backward takes dy with ctx["mask"] (relu's too)
    eval_chunk(conv, n, chunk_floats) -> images per evaluation chunk (n: no chunking)"""
import numpy as np

from ..jit import kernel, prange

POOLS = False


RELU = True    # forward(..., relu=True) returns relu(z), backward masks dy itself: one pass
               # over the output and one over its gradient, not two each


def forward(conv, x, w, b, training, ctx, pool=None, relu=False):
    n, h, wd, c = x.shape
    k, oh, ow = conv.out
    z = np.empty((n, oh, ow, k), np.float32)
    _direct_fwd(x.reshape(n, h, -1), _wrep(w, ow), w, b, z.reshape(n, oh, ow * k),
                conv.args["stride"], conv.padding, c, relu)
    return z


def backward(conv, dz, w, g, ctx, need_dx):
    """ctx["mask"] (set by conv when forward applied relu): dz is dy, and the kernels take
    dy where mask > 0 and 0 elsewhere as they read it (relu's backward pass fused)."""
    s, pad = conv.args["stride"], conv.padding
    x = ctx["x"]
    n, h, wd, c = x.shape
    mask = ctx.get("mask")
    masked = mask is not None
    dz3 = dz.reshape(n, dz.shape[1], -1)
    m3 = mask.reshape(dz3.shape) if masked else dz3
    _direct_dw(x.reshape(n, h, -1), dz3, m3, masked, g["w"], g["b"], s, pad, c, 32)
    if not need_dx:
        return None
    dx = np.empty_like(x)
    _direct_dx(dz3, m3, masked, w, _wrep(w, dz.shape[2]), dx.reshape(n, h, -1), s, pad)
    return dx


def bytes_per_sample(conv):
    """Nothing beyond the input conv keeps anyway: the kernels read it unpadded."""
    return 0, 0


def eval_chunk(conv, n, chunk_floats):
    return n


def _wrep(w, ow):
    """wrep[k, a, b, q] = w[a, b, q % C, k] for q < ow*C: a tap's weights repeated along a row,
    so the stride-1 direct kernels run unit-stride multiply-adds over (column, channel) pairs."""
    f, _, c, k = w.shape
    return np.ascontiguousarray(np.tile(w.transpose(3, 0, 1, 2), (1, 1, 1, ow)))


@kernel(parallel=False)
def _span(d, s, ow, width):
    """The output columns j in [j0, j1) whose tap column j*s + d lies inside 0..width-1 (d: the
    tap's offset minus the padding): the columns that read padding are left out, not padded."""
    j0 = 0 if d >= 0 else (-d + s - 1) // s
    last = width - 1 - d
    j1 = 0 if last < 0 else min(ow, last // s + 1)
    return j0, max(j0, j1)


@kernel(parallel=False)
def _phases(xr, ph, s, c):
    """ph[p, jj*C + cc] = xr[(jj*s + p)*C + cc]: a row's columns dealt into s phases, so that a
    strided tap reads one contiguous run (column j*s + d is phase d % s, column j + d // s)."""
    width = xr.shape[0] // c
    for p in range(s):
        for jj in range((width - p + s - 1) // s):
            src = (jj * s + p) * c
            for cc in range(c):
                ph[p, jj * c + cc] = xr[src + cc]


@kernel(parallel=False)
def _unphase(ph, xr, s, c):
    width = xr.shape[0] // c
    for p in range(s):
        for jj in range((width - p + s - 1) // s):
            dst = (jj * s + p) * c
            for cc in range(c):
                xr[dst + cc] = ph[p, jj * c + cc]


@kernel(parallel=False)
def _channel_sums(tmp, bias, zr, k, kk, c, relu):
    """zr[j*K + k] = bias + sum_cc tmp[j*C + cc] (then relu), with the common shapes (one
    filter; one or three channels) spelled out so that they vectorise."""
    ow = tmp.shape[0] // c
    zero = np.float32(0.0)
    if kk == 1 and c == 1:
        for j in range(ow):
            v = bias + tmp[j]
            zr[j] = v if (v > zero or not relu) else zero
    elif kk == 1 and c == 3:
        for j in range(ow):
            v = bias + tmp[3 * j] + tmp[3 * j + 1] + tmp[3 * j + 2]
            zr[j] = v if (v > zero or not relu) else zero
    else:
        for j in range(ow):
            v = bias
            for cc in range(c):
                v += tmp[j * c + cc]
            zr[j * kk + k] = v if (v > zero or not relu) else zero


@kernel
def _direct_fwd(x, wrep, w, b, z, s, pad, c, relu):
    """z[n, i, j*K + k] = b[k] + sum_{a,bb,cc} x[n, i*s + a - pad, (j*s + bb - pad)*C + cc] * w[a,bb,cc,k]
    over the taps inside the image (the unpadded input, rows flattened to width*C). Per tap,
    one unit-stride multiply-add over the (column, channel) pairs of the output row into a
    buffer (strided convs read the input row dealt into phases), then a sum over channels;
    relu: max(z, 0) instead."""
    n_, hh, wc = x.shape
    width = wc // c
    f = w.shape[0]
    kk = w.shape[3]
    oh = z.shape[1]
    ow = z.shape[2] // kk
    m = ow * c
    pw = (width + s - 1) // s
    for row in prange(n_ * oh):
        n = row // oh
        i = row % oh
        tmp = np.empty(m, np.float32)
        ph = np.empty((s, pw * c) if s > 1 else (1, 0), np.float32)   # strided only
        for k in range(kk):
            tmp[:] = np.float32(0.0)
            for a in range(f):
                y = i * s + a - pad
                if y < 0 or y >= hh:
                    continue
                if s > 1:
                    _phases(x[n, y], ph, s, c)
                for bb in range(f):
                    d = bb - pad
                    j0, j1 = _span(d, s, ow, width)
                    src = x[n, y] if s == 1 else ph[d % s]
                    off = d // s
                    ts = tmp[j0 * c:j1 * c]   # slices, so indices start at 0: no
                    ws = wrep[k, a, bb, j0 * c:j1 * c]   # negative-index checks, vectorised
                    xs = src[(j0 + off) * c:(j1 + off) * c]   # (a helper call for these three
                    # lines, shared with _direct_dw, cost 15-25% on 200-wide rows: not inlined)
                    for q in range(ts.shape[0]):
                        ts[q] += ws[q] * xs[q]
            _channel_sums(tmp, b[k], z[n, i], k, kk, c, relu)


@kernel(parallel=False)
def _spread(dzrow, mrow, masked, dzr, k, kk, c):
    """Filter k's gradient row (dzrow: (OW*K,); masked: 0 where mrow <= 0) with each value
    repeated C times, matching the (column, channel) pairs of an input row, and its sum:
    (dzr, sum), or (dzrow itself, sum) for one filter, one channel and no mask (no copy)."""
    ow = dzrow.shape[0] // kk
    zero = np.float32(0.0)
    total = zero
    if kk == 1 and c == 1 and not masked:
        for j in range(ow):
            total += dzrow[j]
        return dzrow, total
    if kk == 1 and c == 1:
        for j in range(ow):
            v = dzrow[j] if mrow[j] > zero else zero
            dzr[j] = v
            total += v
    elif kk == 1 and c == 3:
        for j in range(ow):
            v = dzrow[j] if (not masked or mrow[j] > zero) else zero
            dzr[3 * j] = v
            dzr[3 * j + 1] = v
            dzr[3 * j + 2] = v
            total += v
    else:
        for j in range(ow):
            v = dzrow[j * kk + k] if (not masked or mrow[j * kk + k] > zero) else zero
            total += v
            for cc in range(c):
                dzr[j * c + cc] = v
    return dzr, total


@kernel
def _direct_dw(x, dz, mask, masked, dw, db, s, pad, c, chunks):
    """dw[a,bb,cc,k] = sum_{n,i,j} dz[n,i,j,k] * x[n, i*s+a-pad, (j*s+bb-pad)*C + cc] over the taps
    inside the image, and db[k] = sum dz[..., k] (dz given as (N, OH, OW*K)). Rows are split
    into chunks, each with its own partial sums (per row position), merged serially: no races."""
    kk = dw.shape[3]
    n_, oh, ow = dz.shape[0], dz.shape[1], dz.shape[2] // kk
    hh = x.shape[1]
    width = x.shape[2] // c
    f = dw.shape[0]
    m = ow * c
    pw = (width + s - 1) // s
    rows = n_ * oh
    chunks = max(1, min(chunks, rows))
    part = np.zeros((chunks, kk, f, f, m), np.float32)
    pb = np.zeros((chunks, kk), np.float32)
    for t in prange(chunks):
        dzr = np.empty(m, np.float32)
        ph = np.empty((s, pw * c) if s > 1 else (1, 0), np.float32)   # strided only
        for row in range(rows * t // chunks, rows * (t + 1) // chunks):
            n = row // oh
            i = row % oh
            for k in range(kk):
                src_dz, bs = _spread(dz[n, i], mask[n, i], masked, dzr, k, kk, c)
                pb[t, k] += bs
                for a in range(f):
                    y = i * s + a - pad
                    if y < 0 or y >= hh:
                        continue
                    if s > 1:
                        _phases(x[n, y], ph, s, c)
                    for bb in range(f):
                        d = bb - pad
                        j0, j1 = _span(d, s, ow, width)
                        src = x[n, y] if s == 1 else ph[d % s]
                        off = d // s
                        ps = part[t, k, a, bb, j0 * c:j1 * c]
                        ds = src_dz[j0 * c:j1 * c]
                        xs = src[(j0 + off) * c:(j1 + off) * c]
                        for q in range(ps.shape[0]):
                            ps[q] += ds[q] * xs[q]
    for k in range(kk):
        acc = np.float32(0.0)
        for t in range(chunks):
            acc += pb[t, k]
        db[k] = acc
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
def _direct_dx(dz, mask, masked, w, wrep, dx, s, pad):
    """Gradient w.r.t. the (unpadded) input, one input row per iteration (disjoint writes):
    dx[n, y, (j*s+bb-pad)*C + cc] += dz[n,i,j,k] * w[a,bb,cc,k] for every tap with
    i*s + a - pad = y that lands inside the image (dz given as (N, OH, OW*K); strided convs:
    into the row's phases, dealt back at the end)."""
    kk = w.shape[3]
    n_, oh, ow = dz.shape[0], dz.shape[1], dz.shape[2] // kk
    f = w.shape[0]
    c = w.shape[2]
    hh = dx.shape[1]
    width = dx.shape[2] // c
    m = ow * c
    pw = (width + s - 1) // s
    for row in prange(n_ * hh):
        n = row // hh
        y = row % hh
        dr = dx[n, y]
        dr[:] = np.float32(0.0)
        ph = np.zeros((s, pw * c) if s > 1 else (1, 0), np.float32)   # strided only
        dzr = np.empty(m, np.float32)
        for a in range(f):
            t = y + pad - a
            if t < 0 or t % s != 0:
                continue
            i = t // s
            if i >= oh:
                continue
            for k in range(kk):
                src_dz, _ = _spread(dz[n, i], mask[n, i], masked, dzr, k, kk, c)
                for bb in range(f):
                    d = bb - pad
                    j0, j1 = _span(d, s, ow, width)
                    dst = dr if s == 1 else ph[d % s]
                    off = d // s
                    rs = dst[(j0 + off) * c:(j1 + off) * c]
                    ds = src_dz[j0 * c:j1 * c]
                    ws = wrep[k, a, bb, j0 * c:j1 * c]
                    for q in range(rs.shape[0]):
                        rs[q] += ds[q] * ws[q]
        if s > 1:
            _unphase(ph, dr, s, c)
