"""maxpool(size=2, stride=size, ceil=false), alias max2d: the maximum of each size x size window.
Shape rule: W' = floor((W - size) / stride) + 1, or with ceil=true the ceiling (a last partial
window is kept, as in hello-dl's 11 -> 6)."""
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
    pass
