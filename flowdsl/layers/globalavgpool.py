"""globalavgpool, alias gap: the mean of each channel over the whole map, WxHxC -> C (the
classifier head of NiN, GoogLeNet and ResNet, in place of flatten + a large dense layer).

Plain numpy: one memory-bound reduction each way."""
import numpy as np

from ..layers import register
from .base import Layer, need_map


@register("globalavgpool", aliases=("gap", "globalavgpool2d"))
class GlobalAvgPool(Layer):
    def out_shape(self, s):
        need_map(self, s)
        return (s[0],)

    def to_onnx(self, g, x, p, state, extras):
        m = g.op("GlobalAveragePool", [x], f"{self.name}/map")
        return g.op("Flatten", [m], self.name, kind="vec", axis=1)

    def forward(self, x, p, ctx, training):
        n, h, w, c = x.shape
        if training:
            ctx["in"] = x.shape
        return np.ascontiguousarray(x.reshape(n, h * w, c).mean(axis=1, dtype=np.float32))

    def backward(self, dy, p, g, ctx, need_dx):
        if not need_dx:
            return None
        n, h, w, c = ctx["in"]
        dx = np.empty((n, h * w, c), np.float32)
        dx[...] = (dy / np.float32(h * w))[:, None, :]
        return dx.reshape(n, h, w, c)
