"""conv(WxHxC?, filters=1, field=3, stride=1, pad=0|same, act=linear)

Square `field` x `field` filters over all input channels, one learned bias per filter.
Shape rule: W' = (W + 2*pad - field) / stride + 1, which must be whole; same for H.
"""
from ..layers import activation_table, register
from .base import Layer, LayerError, P, need_map, show_shape


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
        return {"w": (k, s[0], f, f), "b": (k,)}
