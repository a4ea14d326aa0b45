"""conv(WxHxC?, filters=1, field=3, stride=1, pad=0|same, act=linear)

Square `field` x `field` filters over all input channels, one learned bias per filter.
Shape rule: W' = (W + 2*pad - field) / stride + 1, which must be whole; same for H.

Weights are stored (field, field, C_in, filters) so that, with channels-last activations, a
convolution is one matrix product: im2col rows of length field*field*C_in times the weights.
Two algorithms, chosen by measurement (bench/README):
- many filters: numba im2col + one BLAS matmul (and the transposed products in backward);
- few filters (NeuroFlow's 1-filter convs on 400x400 images): direct loops, branch-free inner
  loop along the output row, no im2col buffer.
"""
import numpy as np

from ..jit import kernel, prange
from ..layers import activation_table, register
from .activations import act_backward, act_forward, act_spec
from .base import Layer, LayerError, P, need_map, show_shape

DIRECT_MAX_FILTERS = 4   # at or below this many filters the direct kernels win (bench/conv_algos.py)


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
                fits = [q for q in range(0, f) if (size + 2 * q - f) % st == 0]
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
    def direct(self):
        return self.args["filters"] <= DIRECT_MAX_FILTERS

    # --- engine -----------------------------------------------------------------------------
    def forward(self, x, p, ctx, training):
        n = x.shape[0]
        f, s, pad = self.args["field"], self.args["stride"], self.padding
        k, oh, ow = self.out
        w, b = p["w"], p["b"]
        if self.direct:
            z = np.empty((n, oh, ow, k), np.float32)
            _direct_fwd(x, w, b, z, s, pad)
        else:
            cols = np.empty((n * oh * ow, f * f * x.shape[3]), np.float32)
            _im2col(x, cols, f, s, pad, oh, ow)
            z = cols @ w.reshape(-1, k)
            z += b
            z = z.reshape(n, oh, ow, k)
            if training:
                ctx["cols"] = cols
        kind, alpha = act_spec(self)
        y = act_forward(kind, alpha, z)
        if training:
            ctx["x"], ctx["z"], ctx["y"] = x, z, y
        return y

    def backward(self, dy, p, g, ctx, need_dx):
        f, s, pad = self.args["field"], self.args["stride"], self.padding
        k = self.args["filters"]
        kind, alpha = act_spec(self)
        dz = act_backward(kind, alpha, ctx["z"], ctx["y"], dy)
        x = ctx["x"]
        dz2 = dz.reshape(-1, k)
        np.sum(dz2, axis=0, out=g["b"])
        if self.direct:
            _direct_dw(x, dz, g["w"], s, pad, 64)
            if not need_dx:
                return None
            dx = np.empty_like(x)
            _direct_dx(dz, p["w"], dx, s, pad)
            return dx
        cols = ctx["cols"]
        np.matmul(cols.T, dz2, out=g["w"].reshape(-1, k))
        if not need_dx:
            return None
        dcols = dz2 @ p["w"].reshape(-1, k).T
        dx = np.empty_like(x)
        _col2im(dcols, dx, f, s, pad, dz.shape[1], dz.shape[2])
        return dx


# ------------------------------------------------------------------------------------ kernels
@kernel
def _im2col(x, cols, f, s, pad, oh, ow):
    """cols[(n, i, j), (a, b, c)] = x[n, i*s + a - pad, j*s + b - pad, c] (0 outside)."""
    n_, h, w, c = x.shape
    zero = np.float32(0.0)
    for row in prange(n_ * oh):
        n = row // oh
        i = row % oh
        for j in range(ow):
            r = (n * oh + i) * ow + j
            for a in range(f):
                y = i * s + a - pad
                base = a * f * c
                if y < 0 or y >= h:
                    for q in range(f * c):
                        cols[r, base + q] = zero
                    continue
                x0 = j * s - pad
                if x0 >= 0 and x0 + f <= w:
                    for q in range(f * c):
                        cols[r, base + q] = x[n, y, x0 + q // c, q % c]
                else:
                    for bb in range(f):
                        xx = x0 + bb
                        if xx < 0 or xx >= w:
                            for cc in range(c):
                                cols[r, base + bb * c + cc] = zero
                        else:
                            for cc in range(c):
                                cols[r, base + bb * c + cc] = x[n, y, xx, cc]


@kernel
def _col2im(dcols, dx, f, s, pad, oh, ow):
    """The adjoint of _im2col, as a gather: each input row is written by one iteration."""
    n_, h, w, c = dx.shape
    zero = np.float32(0.0)
    for row in prange(n_ * h):
        n = row // h
        y = row % h
        for q in range(w * c):
            dx[n, y, q // c, q % c] = zero
        for a in range(f):
            t = y + pad - a
            if t < 0 or t % s != 0:
                continue
            i = t // s
            if i >= oh:
                continue
            for j in range(ow):
                r = (n * oh + i) * ow + j
                x0 = j * s - pad
                for bb in range(f):
                    xx = x0 + bb
                    if xx < 0 or xx >= w:
                        continue
                    base = (a * f + bb) * c
                    for cc in range(c):
                        dx[n, y, xx, cc] += dcols[r, base + cc]


@kernel
def _direct_fwd(x, w, b, z, s, pad):
    """z[n,i,j,k] = b[k] + sum_{a,bb,c} x[n, i*s+a-pad, j*s+bb-pad, c] * w[a,bb,c,k].
    The inner loop runs along the output row with the tap fixed: no branches inside."""
    n_, h, wd, c = x.shape
    f = w.shape[0]
    kk = w.shape[3]
    _, oh, ow, _ = z.shape
    for row in prange(n_ * oh):
        n = row // oh
        i = row % oh
        for k in range(kk):
            for j in range(ow):
                z[n, i, j, k] = b[k]
        for a in range(f):
            y = i * s + a - pad
            if y < 0 or y >= h:
                continue
            for bb in range(f):
                # output columns j whose input column j*s+bb-pad is inside [0, wd)
                lo = 0
                while lo < ow and lo * s + bb - pad < 0:
                    lo += 1
                hi = ow
                while hi > lo and (hi - 1) * s + bb - pad >= wd:
                    hi -= 1
                for cc in range(c):
                    for k in range(kk):
                        wv = w[a, bb, cc, k]
                        for j in range(lo, hi):
                            z[n, i, j, k] += wv * x[n, y, j * s + bb - pad, cc]


@kernel
def _direct_dw(x, dz, dw, s, pad, chunks):
    """dw[a,bb,c,k] = sum over n,i,j of dz[n,i,j,k] * x[n, i*s+a-pad, j*s+bb-pad, c].
    Rows are split into chunks with their own partial sums, merged serially (no races)."""
    n_, h, wd, c = x.shape
    f = dw.shape[0]
    kk = dw.shape[3]
    _, oh, ow, _ = dz.shape
    rows = n_ * oh
    chunks = min(chunks, rows)
    part = np.zeros((chunks, f, f, c, kk), np.float32)
    for t in prange(chunks):
        r0 = rows * t // chunks
        r1 = rows * (t + 1) // chunks
        for row in range(r0, r1):
            n = row // oh
            i = row % oh
            for a in range(f):
                y = i * s + a - pad
                if y < 0 or y >= h:
                    continue
                for bb in range(f):
                    lo = 0
                    while lo < ow and lo * s + bb - pad < 0:
                        lo += 1
                    hi = ow
                    while hi > lo and (hi - 1) * s + bb - pad >= wd:
                        hi -= 1
                    for cc in range(c):
                        for k in range(kk):
                            acc = np.float32(0.0)
                            for j in range(lo, hi):
                                acc += dz[n, i, j, k] * x[n, y, j * s + bb - pad, cc]
                            part[t, a, bb, cc, k] += acc
    for a in range(f):
        for bb in range(f):
            for cc in range(c):
                for k in range(kk):
                    acc = np.float32(0.0)
                    for t in range(chunks):
                        acc += part[t, a, bb, cc, k]
                    dw[a, bb, cc, k] = acc


@kernel
def _direct_dx(dz, w, dx, s, pad):
    """dx[n,y,xx,c] = sum of dz[n,i,j,k] * w[a,bb,c,k] over taps with i*s+a-pad = y and
    j*s+bb-pad = xx. One iteration per input row: disjoint writes."""
    n_, h, wd, c = dx.shape
    f = w.shape[0]
    kk = w.shape[3]
    _, oh, ow, _ = dz.shape
    zero = np.float32(0.0)
    for row in prange(n_ * h):
        n = row // h
        y = row % h
        for xx in range(wd):
            for cc in range(c):
                dx[n, y, xx, cc] = zero
        for a in range(f):
            t = y + pad - a
            if t < 0 or t % s != 0:
                continue
            i = t // s
            if i >= oh:
                continue
            for bb in range(f):
                lo = 0
                while lo < ow and lo * s + bb - pad < 0:
                    lo += 1
                hi = ow
                while hi > lo and (hi - 1) * s + bb - pad >= wd:
                    hi -= 1
                for cc in range(c):
                    for k in range(kk):
                        wv = w[a, bb, cc, k]
                        for j in range(lo, hi):
                            dx[n, y, j * s + bb - pad, cc] += wv * dz[n, i, j, k]
