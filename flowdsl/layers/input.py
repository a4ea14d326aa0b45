"""input(WxHxC) or input(N): declares the network's input shape; it computes nothing."""
from . import register
from .base import Layer, P


@register("input")
class Input(Layer):
    params = (P("shape", "shape"),)
    role = "input"

    def describe(self):
        return f"input({self.args['shape'].text})"
