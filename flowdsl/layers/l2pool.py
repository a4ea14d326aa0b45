"""l2pool(size=2, stride=size, ceil=false, pad=0): the square root of the sum of squares of each
window, as Nielsen's chapter 6 defines L2 pooling. Shape rule as maxpool; padding adds nothing.

Backward: d sqrt(sum x^2) / dx = x / y (0 where a window is all zeros), gathered per input row
as avgpool's backward is (each (sample, input row) written by one parallel iteration)."""
import numpy as np

from ..jit import kernel, prange
from ..layers import register
from .maxpool import Pool


@register("l2pool", aliases=("l2pool2d",))
class L2Pool(Pool):
    onnx_op, onnx_attrs = "LpPool", {"p": 2}
    def bytes_per_sample(self):
        return 0, 0, 0    # keeps its input and output, both held anyway

    def forward(self, x, p, ctx, training):
        c, oh, ow = self.out
        y = np.empty((x.shape[0], oh, ow, c), np.float32)
        _l2_fwd(x, y, self.size, self.stride, self.pad)
        if training:
            ctx["x"], ctx["y"] = x, y
        return y

    def backward(self, dy, p, g, ctx, need_dx):
        if not need_dx:
            return None
        x = ctx["x"]
        dx = np.empty_like(x)
        _l2_bwd(x, ctx["y"], dy, dx, self.size, self.stride, self.pad)
        return dx


@kernel
def _l2_fwd(x, y, k, s, p):
    """y[n,i,j,c] = sqrt(sum of x^2 over x[n, i*s-p : i*s-p+k, j*s-p : j*s-p+k, c]), clipped to the
    input (the sum in float32, as the other kernels)."""
    n_, h, w, c = x.shape
    _, oh, ow, _ = y.shape
    zero = np.float32(0.0)
    for row in prange(n_ * oh):
        n = row // oh
        i = row % oh
        y0 = max(i * s - p, 0)
        y1 = min(i * s - p + k, h)
        acc = np.empty(c, np.float32)
        for j in range(ow):
            x0 = max(j * s - p, 0)
            x1 = min(j * s - p + k, w)
            for cc in range(c):
                acc[cc] = zero
            for yy in range(y0, y1):
                for xx in range(x0, x1):
                    for cc in range(c):
                        v = x[n, yy, xx, cc]
                        acc[cc] += v * v
            for cc in range(c):
                y[n, i, j, cc] = np.sqrt(acc[cc])


@kernel
def _l2_bwd(x, y, dy, dx, k, s, p):
    """dx[n,yy,xx,c] = x[n,yy,xx,c] * sum over the windows (i, j) holding (yy, xx) of
    dy[n,i,j,c] / y[n,i,j,c] (windows with y = 0 pass nothing: their inputs are all 0)."""
    n_, h, w, c = dx.shape
    _, oh, ow, _ = dy.shape
    zero = np.float32(0.0)
    for row in prange(n_ * h):
        n = row // h
        yy = row % h
        for xx in range(w):
            for cc in range(c):
                dx[n, yy, xx, cc] = zero
        i0 = 0 if yy + p < k else (yy + p - k) // s + 1
        i1 = min((yy + p) // s, oh - 1)
        for i in range(i0, i1 + 1):
            for j in range(ow):
                x0 = max(j * s - p, 0)
                x1 = min(j * s - p + k, w)
                for xx in range(x0, x1):
                    for cc in range(c):
                        v = y[n, i, j, cc]
                        if v > zero:
                            dx[n, yy, xx, cc] += dy[n, i, j, cc] / v
        for xx in range(w):
            for cc in range(c):
                dx[n, yy, xx, cc] *= x[n, yy, xx, cc]
