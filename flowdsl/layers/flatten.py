"""flatten: WxHxC -> (W*H*C,) in channel-major (C, H, W) order."""
import math

from ..layers import register
from .base import Layer


@register("flatten")
class Flatten(Layer):
    def out_shape(self, s):
        return (math.prod(s),)
