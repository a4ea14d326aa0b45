"""maxpool(size=2, stride=size, ceil=false), alias max2d: the maximum of each size x size window.
Shape rule: W' = floor((W - size) / stride) + 1, or with ceil=true the ceiling (a last partial
window is kept, as in hello-dl's 11 -> 6; it is clipped to the input).

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
    k, st = layer.size, layer.stride
    if k > h or k > w:
        raise LayerError(f"window {k} does not fit the {show_shape(s)} input. "
                         f"Received: size={k}", "size")
    outs = []
    for n in (h, w):
        if layer.args["ceil"]:
            o = -(-(n - k) // st) + 1
            if (o - 1) * st >= n:  # the last window must start inside the input
                o -= 1
        else:
            o = (n - k) // st + 1
        outs.append(o)
    return (c, outs[0], outs[1])


class Pool(Layer):
    params = (P("size", "int", 2, lo=1), P("stride", "int", None, lo=1), P("ceil", "bool", False))

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        if self.args["stride"] is None:
            self.args["stride"] = self.args["size"]

    @property
    def size(self):
        return self.args["size"]

    @property
    def stride(self):
        return self.args["stride"]

    def out_shape(self, s):
        return pooled(self, s)


@register("maxpool", aliases=("max2d", "maxpool2d"))
class MaxPool(Pool):
    def max_window(self):
        return self.size, self.stride

    def bytes_per_sample(self):
        return 4 * math.prod(self.out), 0, 0   # the winners (int32)

    def forward(self, x, p, ctx, training):
        c, oh, ow = self.out
        y = np.empty((x.shape[0], oh, ow, c), np.float32)
        if not training:  # no winners to record
            _max_eval(x, y, self.size, self.stride)
            return y
        arg = np.empty((x.shape[0], oh, ow, c), np.int32)
        _max_fwd(x, y, arg, self.size, self.stride)
        ctx["arg"], ctx["in"] = arg, x.shape
        return y

    def backward(self, dy, p, g, ctx, need_dx):
        if not need_dx:
            return None
        n, h, w, c = ctx["in"]
        dx = np.empty((n, h * w, c), np.float32)
        _max_bwd(dy, ctx["arg"], dx, h, self.size, self.stride)
        return dx.reshape(n, h, w, c)


# ------------------------------------------------------------------------------------ kernels
@kernel
def _max_fwd(x, y, arg, k, s):
    """y[n,i,j,c] = max of x[n, i*s : i*s+k, j*s : j*s+k, c] (clipped to the input);
    arg[n,i,j,c] = y_in * W + x_in of the first maximum. The running maximum lives in a
    C-long local buffer updated with selects, which vectorises (2.5x faster than branching on
    the output arrays, measured on one thread)."""
    n_, h, w, c = x.shape
    _, oh, ow, _ = y.shape
    for row in prange(n_ * oh):
        n = row // oh
        i = row % oh
        y0 = i * s
        y1 = min(y0 + k, h)
        best = np.empty(c, np.float32)
        where = np.empty(c, np.int32)
        for j in range(ow):
            x0 = j * s
            x1 = min(x0 + k, w)
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
def _max_eval(x, y, k, s):
    """_max_fwd without the winners (evaluation): y[n,i,j,c] = the window's maximum."""
    n_, h, w, c = x.shape
    _, oh, ow, _ = y.shape
    for row in prange(n_ * oh):
        n = row // oh
        i = row % oh
        y0 = i * s
        y1 = min(y0 + k, h)
        best = np.empty(c, np.float32)
        for j in range(ow):
            x0 = j * s
            x1 = min(x0 + k, w)
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
def _max_bwd(dy, arg, dx, h, k, s):
    """dx[n, q, c] (q = y_in * W + x_in) = sum of dy[n,i,j,c] over the windows whose maximum was q.
    A scatter whose tasks own disjoint parts of dx: without overlap (s >= k) output row i owns
    input rows [i*s, (i+1)*s) (the last one through the bottom); with overlap a task is a
    whole sample (batches of one then run on one core)."""
    n_, hw, c = dx.shape
    _, oh, ow, _ = dy.shape
    w = hw // h
    zero = np.float32(0.0)
    per = 1 if s >= k else oh      # output rows per task
    for t in prange(n_ * oh // per):
        n = t * per // oh
        i0 = t * per % oh
        i1 = i0 + per
        r0 = i0 * s
        r1 = h if i1 == oh else min(i1 * s, h)
        for q in range(r0 * w, r1 * w):
            for cc in range(c):
                dx[n, q, cc] = zero
        for i in range(i0, i1):
            for j in range(ow):
                for cc in range(c):
                    dx[n, arg[n, i, j, cc], cc] += dy[n, i, j, cc]
