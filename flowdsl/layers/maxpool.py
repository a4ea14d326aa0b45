"""maxpool(size=2, stride=size, ceil=false, pad=0), alias max2d: the maximum of each size x size window.
Shape rule: W' = floor((W + 2*pad - size) / stride) + 1, or with ceil=true the ceiling (a last
partial window is kept, as in hello-dl's 11 -> 6; it is clipped to the input), as PyTorch.
pad (at most size // 2) pads with -inf: `maxpool(3, stride=1, pad=1)` keeps the size (an
Inception pool branch).

Forward records, per output value, the flat index y*W + x of the input pixel that won (int32;
the first one on ties). Backward scatters the gradient to those pixels; the parallel tasks own
disjoint parts of dx (an output row's band of input rows, or a whole sample when windows
overlap, stride < size), so nothing races."""
import math

import numpy as np

from ..jit import kernel, prange
from ..layers import register
from .base import Layer, LayerError, P, need_map, show_shape


def pooled(layer, s):
    need_map(layer, s)
    c, h, w = s
    k, st, pad = layer.size, layer.stride, layer.pad
    if k > h + 2 * pad or k > w + 2 * pad:
        raise LayerError(f"window {k} does not fit the {show_shape(s)} input. "
                         f"Received: size={k}", "size")
    outs = []
    for n in (h, w):
        if layer.args["ceil"]:
            o = -(-(n + 2 * pad - k) // st) + 1
            if (o - 1) * st >= n + pad:  # the last window must start inside the input (or left pad)
                o -= 1
        else:
            o = (n + 2 * pad - k) // st + 1
        outs.append(o)
    return (c, outs[0], outs[1])


class Pool(Layer):
    params = (P("size", "int", 2, lo=1), P("stride", "int", None, lo=1), P("ceil", "bool", False),
              P("pad", "int", None, lo=0))

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        if self.args["stride"] is None:
            self.args["stride"] = self.args["size"]
        if self.pad > self.size // 2:
            raise LayerError(f"pad may be at most half the window ({self.size // 2} for size {self.size}), so "
                             f"every window holds an input pixel. Received: pad={self.pad}", "pad")

    @property
    def size(self):
        return self.args["size"]

    @property
    def stride(self):
        return self.args["stride"]

    @property
    def pad(self):
        return self.args.get("pad") or 0

    def out_shape(self, s):
        return pooled(self, s)

    onnx_op, onnx_attrs = None, {}

    def to_onnx(self, g, x, p, state, extras):
        from ..onnx_export import pool_pads
        _, h, w = self.in_shape
        _, oh, ow = self.out
        return g.op(self.onnx_op, [x], self.name, kind="map", kernel_shape=[self.size] * 2,
                    strides=[self.stride] * 2, pads=pool_pads(self, h, w, oh, ow), **self.onnx_attrs)


@register("maxpool", aliases=("max2d", "maxpool2d"))
class MaxPool(Pool):
    onnx_op = "MaxPool"
    def max_window(self):
        return (self.size, self.stride) if not self.pad else None   # fusions assume unpadded windows

    def bytes_per_sample(self):
        return 4 * math.prod(self.out), 0, 0   # the winners (int32)

    def forward(self, x, p, ctx, training):
        c, oh, ow = self.out
        y = np.empty((x.shape[0], oh, ow, c), np.float32)
        if not training:  # no winners to record
            _max_eval(x, y, self.size, self.stride, self.pad)
            return y
        arg = np.empty((x.shape[0], oh, ow, c), np.int32)
        _max_fwd(x, y, arg, self.size, self.stride, self.pad)
        ctx["arg"], ctx["in"] = arg, x.shape
        return y

    def backward(self, dy, p, g, ctx, need_dx):
        if not need_dx:
            return None
        n, h, w, c = ctx["in"]
        dx = np.empty((n, h * w, c), np.float32)
        _max_bwd(dy, ctx["arg"], dx, h, self.size, self.stride, self.pad)
        return dx.reshape(n, h, w, c)


# ------------------------------------------------------------------------------------ kernels
@kernel
def _max_fwd(x, y, arg, k, s, p):
    """y[n,i,j,c] = max of x[n, i*s-p : i*s-p+k, j*s-p : j*s-p+k, c] (clipped to the input: padding
    is -inf);
    arg[n,i,j,c] = y_in * W + x_in of the first maximum. The running maximum lives in a
    C-long local buffer updated with selects, which vectorises (2.5x faster than branching on
    the output arrays, measured on one thread)."""
    n_, h, w, c = x.shape
    _, oh, ow, _ = y.shape
    if k == 2 and s == 2 and p == 0 and 2 * oh <= h and 2 * ow <= w:
        # 2x2 windows inside the input (every first pool of the examples): the four candidates
        # in one pass over the channels (the general loop below makes six: net B's first pool at
        # 32 images 0.44 ms, this 0.06)
        for row in prange(n_ * oh):
            n = row // oh
            i = row % oh
            for j in range(ow):
                q = np.int32(2 * i * w + 2 * j)
                for cc in range(c):
                    bv = x[n, 2 * i, 2 * j, cc]
                    bq = q
                    v = x[n, 2 * i, 2 * j + 1, cc]
                    up = v > bv
                    bv = v if up else bv
                    bq = q + 1 if up else bq
                    v = x[n, 2 * i + 1, 2 * j, cc]
                    up = v > bv
                    bv = v if up else bv
                    bq = q + w if up else bq
                    v = x[n, 2 * i + 1, 2 * j + 1, cc]
                    up = v > bv
                    bv = v if up else bv
                    bq = q + w + 1 if up else bq
                    y[n, i, j, cc] = bv
                    arg[n, i, j, cc] = bq
        return
    for row in prange(n_ * oh):
        n = row // oh
        i = row % oh
        y0 = max(i * s - p, 0)
        y1 = min(i * s - p + k, h)
        best = np.empty(c, np.float32)
        where = np.empty(c, np.int32)
        for j in range(ow):
            x0 = max(j * s - p, 0)
            x1 = min(j * s - p + k, w)
            for cc in range(c):
                best[cc] = x[n, y0, x0, cc]
                where[cc] = y0 * w + x0
            for yy in range(y0, y1):
                for xx in range(x0, x1):
                    q = np.int32(yy * w + xx)
                    for cc in range(c):
                        v = x[n, yy, xx, cc]
                        up = v > best[cc]
                        best[cc] = v if up else best[cc]
                        where[cc] = q if up else where[cc]
            for cc in range(c):
                y[n, i, j, cc] = best[cc]
                arg[n, i, j, cc] = where[cc]


@kernel
def _max_eval(x, y, k, s, p):
    """_max_fwd without the winners (evaluation): y[n,i,j,c] = the window's maximum."""
    n_, h, w, c = x.shape
    _, oh, ow, _ = y.shape
    if k == 2 and s == 2 and p == 0 and 2 * oh <= h and 2 * ow <= w:   # as _max_fwd
        for row in prange(n_ * oh):
            n = row // oh
            i = row % oh
            for j in range(ow):
                for cc in range(c):
                    y[n, i, j, cc] = max(max(x[n, 2 * i, 2 * j, cc], x[n, 2 * i, 2 * j + 1, cc]),
                                         max(x[n, 2 * i + 1, 2 * j, cc], x[n, 2 * i + 1, 2 * j + 1, cc]))
        return
    for row in prange(n_ * oh):
        n = row // oh
        i = row % oh
        y0 = max(i * s - p, 0)
        y1 = min(i * s - p + k, h)
        best = np.empty(c, np.float32)
        for j in range(ow):
            x0 = max(j * s - p, 0)
            x1 = min(j * s - p + k, w)
            for cc in range(c):
                best[cc] = x[n, y0, x0, cc]
            for yy in range(y0, y1):
                for xx in range(x0, x1):
                    for cc in range(c):
                        v = x[n, yy, xx, cc]
                        best[cc] = v if v > best[cc] else best[cc]
            for cc in range(c):
                y[n, i, j, cc] = best[cc]


@kernel
def _max_bwd(dy, arg, dx, h, k, s, p):
    """dx[n, q, c] (q = y_in * W + x_in) = sum of dy[n,i,j,c] over the windows whose maximum was q.
    A scatter whose tasks own disjoint parts of dx: without overlap (s >= k) output row i owns
    input rows [i*s-p, (i+1)*s-p) (the first from the top, the last through the bottom); with overlap a task is a
    whole sample (batches of one then run on one core)."""
    n_, hw, c = dx.shape
    _, oh, ow, _ = dy.shape
    w = hw // h
    zero = np.float32(0.0)
    if k == 2 and s == 2 and p == 0 and h == 2 * oh and w == 2 * ow:
        # 2x2 windows tiling the input: each window's four values written once (the winner's
        # gradient, zeros), no zeroing pass and no scatter
        for row in prange(n_ * oh):
            n = row // oh
            i = row % oh
            for j in range(ow):
                q = 2 * i * w + 2 * j
                for cc in range(c):
                    g = dy[n, i, j, cc]
                    a = arg[n, i, j, cc]
                    dx[n, q, cc] = g if a == q else zero
                    dx[n, q + 1, cc] = g if a == q + 1 else zero
                    dx[n, q + w, cc] = g if a == q + w else zero
                    dx[n, q + w + 1, cc] = g if a == q + w + 1 else zero
        return
    per = 1 if s >= k else oh      # output rows per task
    for t in prange(n_ * oh // per):
        n = t * per // oh
        i0 = t * per % oh
        i1 = i0 + per
        r0 = 0 if i0 == 0 else min(max(i0 * s - p, 0), h)
        r1 = h if i1 == oh else min(max(i1 * s - p, 0), h)
        for q in range(r0 * w, r1 * w):
            for cc in range(c):
                dx[n, q, cc] = zero
        for i in range(i0, i1):
            for j in range(ow):
                for cc in range(c):
                    dx[n, arg[n, i, j, cc], cc] += dy[n, i, j, cc]
