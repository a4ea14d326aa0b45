"""avgpool(size=2, stride=size, ceil=false, pad=0): the mean of each window (a partial window at
the edge with ceil=true, or one that overlaps the padding, averages only the input pixels it
covers: PyTorch's count_include_pad=False). Shape rule as maxpool.

Backward is a gather over input rows (each (sample, input row) written by one parallel
iteration), so overlapping windows need no atomics."""
import numpy as np

from ..jit import kernel, prange
from ..layers import register
from .maxpool import Pool


@register("avgpool", aliases=("avg2d", "avgpool2d"))
class AvgPool(Pool):
    onnx_op, onnx_attrs = "AveragePool", {"count_include_pad": 0}   # windows average input pixels only
    def forward(self, x, p, ctx, training):
        c, oh, ow = self.out
        y = np.empty((x.shape[0], oh, ow, c), np.float32)
        _avg_fwd(x, y, self.size, self.stride, self.pad)
        if training:
            ctx["in"] = x.shape
        return y

    def backward(self, dy, p, g, ctx, need_dx):
        if not need_dx:
            return None
        dx = np.empty(ctx["in"], np.float32)
        _avg_bwd(dy, dx, self.size, self.stride, self.pad)
        return dx


# ------------------------------------------------------------------------------------ kernels
@kernel
def _avg_fwd(x, y, k, s, p):
    """y[n,i,j,c] = mean of x[n, i*s-p : i*s-p+k, j*s-p : j*s-p+k, c], clipped to the input."""
    n_, h, w, c = x.shape
    _, oh, ow, _ = y.shape
    zero, one = np.float32(0.0), np.float32(1.0)
    for row in prange(n_ * oh):
        n = row // oh
        i = row % oh
        y0 = max(i * s - p, 0)
        y1 = min(i * s - p + k, h)
        for j in range(ow):
            x0 = max(j * s - p, 0)
            x1 = min(j * s - p + k, w)
            inv = one / np.float32((y1 - y0) * (x1 - x0))
            for cc in range(c):
                y[n, i, j, cc] = zero
            for yy in range(y0, y1):
                for xx in range(x0, x1):
                    for cc in range(c):
                        y[n, i, j, cc] += x[n, yy, xx, cc]
            for cc in range(c):
                y[n, i, j, cc] *= inv


@kernel
def _avg_bwd(dy, dx, k, s, p):
    """dx[n,yy,xx,c] = sum over the windows (i, j) holding (yy, xx) of dy[n,i,j,c] / their size."""
    n_, h, w, c = dx.shape
    _, oh, ow, _ = dy.shape
    zero, one = np.float32(0.0), np.float32(1.0)
    for row in prange(n_ * h):
        n = row // h
        yy = row % h
        for xx in range(w):
            for cc in range(c):
                dx[n, yy, xx, cc] = zero
        # the windows i whose rows [i*s - p, i*s - p + k) hold yy
        i0 = 0 if yy + p < k else (yy + p - k) // s + 1
        i1 = min((yy + p) // s, oh - 1)
        for i in range(i0, i1 + 1):
            rows = min(i * s - p + k, h) - max(i * s - p, 0)
            for j in range(ow):
                x0 = max(j * s - p, 0)
                x1 = min(j * s - p + k, w)
                g = one / np.float32(rows * (x1 - x0))
                for xx in range(x0, x1):
                    for cc in range(c):
                        dx[n, yy, xx, cc] += g * dy[n, i, j, cc]
