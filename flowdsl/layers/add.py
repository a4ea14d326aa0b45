"""add(from=name), alias shortcut: a skip connection. The output is this layer's input plus the
output of the earlier layer `name` (a bound layer or sub-chain, or any layer's automatic name);
the two must have the same shape. This is how residual blocks are written:

    stem = conv(filters=32, pad=same) :: batchnorm :: relu
    network = input(28x28x1) :: stem
      :: conv(filters=32, pad=same) :: batchnorm :: relu :: conv(filters=32, pad=same) :: batchnorm
      :: add(stem) :: relu :: ...

The model resolves the name when it is built (`src`, the source layer). The Net keeps the source's
output and hands it over as ctx["extras"]; backward returns dy as the input gradient and leaves the
same dy in ctx["dextras"], which the Net adds to the gradient of the source's output. Plain numpy:
one memory-bound sum."""
from ..layers import register
from .base import Layer, LayerError, P, show_shape


@register("add", aliases=("shortcut",))
class Add(Layer):
    params = (P("from", "layer"),)
    src = None  # the source Layer, set by the model builder

    def inputs(self):
        return [self.src]

    def out_shape(self, s):
        src = self.src
        if src.out != tuple(s):
            raise LayerError(f"cannot add the output of {self.args['from']} ({show_shape(src.out)}) to "
                             f"its input ({show_shape(s)}): the shapes must be equal", "from")
        return s

    def to_onnx(self, g, x, p, state, extras):
        return g.op("Add", [x, extras[0]], self.name, kind=g.kind[x])

    def forward(self, x, p, ctx, training):
        return x + ctx["extras"][0]

    def backward(self, dy, p, g, ctx, need_dx):
        ctx["dextras"] = [dy]
        return dy if need_dx else None
