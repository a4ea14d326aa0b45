"""conv(WxHxC?, filters=1, field=3, stride=1, pad=0|same, act=linear)

Square `field` x `field` filters over all input channels, one learned bias per filter.
Shape rule: W' = (W + 2*pad - field) / stride + 1, which must be whole; same for H.

Weights are stored (field, field, C_in, filters) so that, with channels-last activations, a
convolution is one matrix product: im2col rows of length field*field*C_in times the weights.
Five algorithms, chosen by the filters, field, stride and input channels (measured: bench/
and README; `flowdsl bench` names the one each conv runs):
- "rows", few filters (NeuroFlow's 1-filter convs on 400x400 images): direct loops on a
  pre-padded input, a unit-stride multiply-add along each output row; no im2col buffer.
  (Direct loops vectorised across the filters, or along output rows, were also tried for first
  layers with few input taps; im2col + BLAS beat them. "planar" below, whole shifted planes in
  one pass per filter row, is the direct form that beats it.)
- "winograd", 3x3 stride-1 filters over at least WINO_MIN_C input channels: Winograd
  F(2x2, 3x3) (layers/_winograd.py), 2.25x fewer multiplications than im2col; from WINO4_MIN_C
  channels "winograd4", F(4x4, 3x3) (layers/_winograd4.py), 4x fewer.
- "planar", stride-1 filters over at most PLANAR_MAX_C input channels (first layers): direct
  multiply-adds of shifted, padded input planes (layers/_planar.py), no im2col buffer; in
  evaluation a maxpool that follows is applied before the output is written (Net fuses them).
- "gemm", otherwise: numba im2col with a trailing column of ones (so the bias rides in the
  product, and its gradient comes out of the weight-gradient product) and one BLAS product;
  in evaluation the batch is cut into chunks whose im2col buffer stays in cache.
"""
import numpy as np

from . import _planar as planar
from . import _winograd as wino
from ..blas import colsum, mm
from ..jit import kernel, prange
from ..layers import activation_table, register
from .activations import act_backward, act_forward, act_spec
from .base import Layer, LayerError, P, need_map, show_shape

DIRECT_MAX_FILTERS = 4   # at or below this many filters: "rows"
CHUNK_FLOATS = 1 << 20   # evaluation: im2col buffers of about this many floats (4 MB)
FLIP_DX = True
TALL_BELOW_C = 8         # fewer input channels: im2col columns stored as rows (_im2col_t)
WINO_MIN_C = 12          # 3x3 stride-1 convs with at least this many input channels: Winograd
                         # (a training step at batch 64, 28x28, 8 -> 16 channels: im2col 32 ms,
                         # Winograd 35; 12 -> 12: 38 and 33; 16 -> 32: 52 and 40),
PLANAR_MAX_C = 8         # stride-1 convs over at most this many input channels: "planar" (a
                         # forward and weight gradient at batch 64, 28x28: 1 -> 20 5x5 im2col
                         # 2.0 ms, planar 1.6; 1 -> 32 3x3 2.1 and 1.8; 3 -> 16 3.0 and 1.9;
                         # 8 -> 16 4.3 and 3.9; but 20 -> 40 5x5 at 12x12: 2.7 and 6.1)
WINO4_MIN_C = 32         # F(4x4, 3x3) from this many input channels (forward + backward at
                         # batch 64, against F(2x2): 24 -> 64 at 14x14 0.84x as fast, 32 -> 64
                         # at 13x13 1.16x, 64 -> 128 at 6x6 1.24x, 96 -> 96 at 7x7 1.45x)
WINO_TILE = {"winograd": 2, "winograd4": 4}   # Winograd algorithms -> output tile size
WINO_MIN_TILES = 128     # for batches of at least this many 2x2 output tiles (hello-dl net, a
                         # training step: at batch 1, 36 and 4 tiles, im2col 3.2 ms, Winograd
                         # 5.7; level at batch 8; Winograd ahead at 64, its conv3's 256 tiles too)


def _fix_pad(field, pad):
    return (field - 1) // 2 if pad == "same" else pad


@register("conv", aliases=("convolution", "conv2d"))
class Conv(Layer):
    params = (
        P("shape", "shape", None),
        P("filters", "int", 1, lo=1),
        P("field", "int", 3, lo=1),
        P("stride", "int", 1, lo=1),
        P("pad", "pad", 0),
        P("act", "call", "linear", table=activation_table),
    )
    has_weights = True

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        if self.args["pad"] == "same" and self.args["field"] % 2 == 0:
            raise LayerError(f"pad=same needs an odd field, so the padding is equal on both sides. "
                             f"Received: field={self.args['field']}", "pad")

    @property
    def padding(self):
        return _fix_pad(self.args["field"], self.args["pad"])

    def out_shape(self, s):
        need_map(self, s)
        c, h, w = s
        f, st, p = self.args["field"], self.args["stride"], self.padding
        if f > w + 2 * p or f > h + 2 * p:
            raise LayerError(f"field {f} does not fit the {show_shape(s)} input (pad {p}). "
                             f"Received: field={f}", "field")
        outs = []
        for size in (h, w):
            if (size + 2 * p - f) % st:
                fits = [q for q in range(0, min(f, st)) if (size + 2 * q - f) % st == 0]
                hint = f"; pad={fits[0]} would fit" if fits else ""
                raise LayerError(
                    f"({size} + 2*{p} - {f})/{st} + 1 is not a whole number, so stride {st} "
                    f"does not tile the {show_shape(s)} input{hint}. Received: stride={st}", "stride")
            outs.append((size + 2 * p - f) // st + 1)
        return (self.args["filters"], outs[0], outs[1])

    def param_shapes(self, s):
        f, k = self.args["field"], self.args["filters"]
        return {"w": (f, f, s[0], k), "b": (k,)}

    def fans(self):
        f, k, c = self.args["field"], self.args["filters"], self.in_shape[0]
        return (f * f * c, f * f * k)

    @property
    def algo(self):
        a = self.args
        if a["filters"] <= DIRECT_MAX_FILTERS:
            return "rows"
        if a["field"] == 3 and a["stride"] == 1 and self.in_shape[0] >= WINO_MIN_C:
            return "winograd4" if self.in_shape[0] >= WINO4_MIN_C else "winograd"
        if a["stride"] == 1 and self.in_shape[0] <= PLANAR_MAX_C and self.padding <= a["field"] - 1:
            return "planar"
        return "gemm"

    def algo_for(self, n):
        """The algorithm a batch of n images runs: Winograd waits for WINO_MIN_TILES tiles."""
        algo = self.algo
        th, tw = wino.tiles(self.out[1], self.out[2])
        return "gemm" if algo in WINO_TILE and n * th * tw < WINO_MIN_TILES else algo

    def pools_for(self, n):
        """Whether evaluation of n images can apply a following maxpool itself (ctx["pool"])."""
        return self.algo_for(n) == "planar"

    # --- engine -----------------------------------------------------------------------------
    def forward(self, x, p, ctx, training):
        n = x.shape[0]
        f, s, pad = self.args["field"], self.args["stride"], self.padding
        k, oh, ow = self.out
        w, b = p["w"], p["b"]
        algo = ctx["algo"] = self.algo_for(n)
        if algo == "rows":
            xp = _pad(x, pad)
            z = np.empty((n, oh, ow, k), np.float32)
            c = x.shape[3]
            _direct_fwd(xp.reshape(n, xp.shape[1], -1), _wrep(w, ow), w, b, z.reshape(n, oh, ow * k), s, c)
            if training:
                ctx["xp"] = xp
        elif algo == "planar":
            pool = None if training else ctx.get("pool")
            z = planar.forward(x, w, b, pad, oh, ow, pool)
            if pool is not None:   # act(maxpool(z)) for the Net, which skips the maxpool
                return z
        elif algo in WINO_TILE:
            m = WINO_TILE[algo]
            if training:
                z, ctx["V"], ctx["U"] = wino.forward(x, w, b, pad, oh, ow, True, m)
            else:  # in chunks whose transformed tiles stay within CHUNK_FLOATS
                th, tw = wino.tiles(oh, ow, m)
                step = max(1, CHUNK_FLOATS // (wino.values(m) * th * tw * max(x.shape[3], k)))
                z = _in_chunks(x, step, lambda xi: wino.forward(xi, w, b, pad, oh, ow, False, m))
        else:
            wb = np.concatenate([w.reshape(-1, k), b[None, :]])
            width = wb.shape[0]
            step = n if training else max(1, CHUNK_FLOATS // max(1, oh * ow * width))
            tall = x.shape[3] < TALL_BELOW_C

            def product(xi):
                m = xi.shape[0] * oh * ow
                if tall:   # columns as rows: few channels make short NHWC segments
                    cols = np.empty((width, m), np.float32)
                    im2col_t(xi, cols, f, s, pad, oh, ow)
                    zi = mm(cols.T, wb)
                else:
                    cols = np.empty((m, width), np.float32)
                    _im2col(xi, cols, f, s, pad, oh, ow)
                    zi = mm(cols, wb)
                if training:
                    ctx["cols"], ctx["tall"] = cols, tall
                return zi.reshape(xi.shape[0], oh, ow, k)

            z = _in_chunks(x, step, product)
        kind, alpha = ctx.get("act") or act_spec(self)   # ctx["act"]: the net moved it after a maxpool
        y = act_forward(kind, alpha, z, out=None if training else z)  # z is ours: in place
        if training:
            ctx["x"], ctx["z"], ctx["y"] = x, z, y
        return y

    def backward(self, dy, p, g, ctx, need_dx):
        f, s, pad = self.args["field"], self.args["stride"], self.padding
        k = self.args["filters"]
        kind, alpha = ctx.get("act") or act_spec(self)
        dz = act_backward(kind, alpha, ctx["z"], ctx["y"], dy)
        x = ctx["x"]
        n, oh, ow, _ = dz.shape
        algo = ctx["algo"]
        if algo in WINO_TILE:
            m = WINO_TILE[algo]
            g["w"][...], dx = wino.backward(dz, ctx.pop("V"), ctx["U"], x.shape, pad, need_dx, m)
            colsum(dz.reshape(-1, k), g["b"])
            return dx
        if algo == "planar":
            g["w"][...] = planar.dw(dz, x, f, pad)
            colsum(dz.reshape(-1, k), g["b"])
            return self._dx(dz, p["w"], x.shape) if need_dx else None
        if algo == "gemm":
            cols = ctx["cols"]
            dz2 = dz.reshape(-1, k)
            gwb = mm(cols, dz2) if ctx["tall"] else mm(cols.T, dz2)  # ones give the bias gradient
            g["w"].reshape(-1, k)[...] = gwb[:-1]
            g["b"][...] = gwb[-1]
            if not need_dx:
                return None
            del ctx["cols"], cols
            return self._dx(dz, p["w"], x.shape)
        xp = ctx["xp"]
        colsum(dz.reshape(-1, k), g["b"])
        _direct_dw(xp.reshape(n, xp.shape[1], -1), dz, g["w"], s, x.shape[3], 32)
        if not need_dx:
            return None
        dxp = np.empty_like(xp)
        _direct_dx(dz, p["w"], _wrep(p["w"], ow), dxp.reshape(n, xp.shape[1], -1), s)
        return np.ascontiguousarray(dxp[:, pad:pad + x.shape[1], pad:pad + x.shape[2], :]) if pad else dxp

    def _dx(self, dz, w, x_shape):
        """The input gradient by products (gemm and planar layers)."""
        f, s, pad = self.args["field"], self.args["stride"], self.padding
        k = self.args["filters"]
        n, oh, ow, _ = dz.shape
        dz2 = dz.reshape(-1, k)
        c = x_shape[3]
        if FLIP_DX and s == 1 and pad <= f - 1 and k <= c:
            # dx is the convolution of dz (padded by f-1-pad) with the flipped filters, inputs
            # and outputs swapped: one more im2col and product, no scatter of f*f*C columns
            wf = np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2)).reshape(-1, c)
            h, wd = x_shape[1], x_shape[2]
            if k < TALL_BELOW_C:
                dcols = np.empty((f * f * k, n * h * wd), np.float32)
                im2col_t(dz, dcols, f, 1, f - 1 - pad, h, wd)
                return mm(dcols.T, wf).reshape(x_shape)
            dcols = np.empty((n * h * wd, f * f * k), np.float32)
            _im2col(dz, dcols, f, 1, f - 1 - pad, h, wd)
            return mm(dcols, wf).reshape(x_shape)
        dcols = mm(dz2, np.ascontiguousarray(w.reshape(-1, k).T))  # (a transposed view: 10-25% slower)
        dx = np.empty(x_shape, np.float32)
        _col2im(dcols, dx, f, s, pad, oh, ow)
        return dx


def _in_chunks(x, step, run):
    """run(xi) -> the (n_i, OH, OW, K) output of each chunk of `step` images of x, gathered; a
    single chunk's output is returned as it is (no copy)."""
    n = x.shape[0]
    if step >= n:
        return run(x)
    z = None
    for i in range(0, n, step):
        zi = run(x[i:i + step])
        if z is None:
            z = np.empty((n,) + zi.shape[1:], np.float32)
        z[i:i + step] = zi
    return z


# ------------------------------------------------------------------------------------ kernels
@kernel
def _im2col(x, cols, f, s, pad, oh, ow):
    """cols[(n, i, j), (a, b, c)] = x[n, i*s + a - pad, j*s + b - pad, c] (0 outside).
    With channels last, the f*C values of one window row are contiguous: one slice copy."""
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
            base = a * fc
            if y < 0 or y >= h:
                for j in range(ow):
                    cols[(n * oh + i) * ow + j, base:base + fc] = zero
                continue
            xr = x[n, y].reshape(w * c)
            for j in range(ow):
                r = (n * oh + i) * ow + j
                x0 = j * s - pad
                if x0 >= 0 and x0 + f <= w:
                    cols[r, base:base + fc] = xr[x0 * c:x0 * c + fc]
                else:
                    for bb in range(f):
                        xx = x0 + bb
                        if xx < 0 or xx >= w:
                            cols[r, base + bb * c:base + bb * c + c] = zero
                        else:
                            cols[r, base + bb * c:base + bb * c + c] = xr[xx * c:xx * c + c]


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


def im2col_t(x, cols, f, s, pad, oh, ow):
    """_im2col_t of an NHWC array."""
    _im2col_t(x.reshape(x.shape[0], x.shape[1], -1), cols, f, s, pad, oh, ow, x.shape[3])


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
        dr[:] = zero
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
