"""flatten: WxHxC -> (W*H*C,). Arrays are channels-last, so this is a free reshape."""
import math

from ..layers import register
from .base import Layer


@register("flatten")
class Flatten(Layer):
    def out_shape(self, s):
        return (math.prod(s),)

    def to_onnx(self, g, x, p, state, extras):
        return g.vector(x, self.name, out=self.name)

    def forward(self, x, p, ctx, training):
        ctx["shape"] = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy, p, g, ctx, need_dx):
        return dy.reshape(ctx["shape"]) if need_dx else None
