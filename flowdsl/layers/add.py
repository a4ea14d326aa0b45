"""add(from=name), alias shortcut: a skip connection. The output is this layer's input plus the
output of the earlier layer `name` (a bound layer or sub-chain, or any layer's automatic name);
the two must have the same shape. add(a, b, ...) after a layer adds each named output to it;
written first in a chain, it is the sum of the named outputs only (as concat joins them: the
branches not built yet are built there). This is how residual blocks are written:

    stem = conv(filters=32, pad=same) :: batchnorm :: relu
    network = input(28x28x1) :: stem
      :: conv(filters=32, pad=same) :: batchnorm :: relu :: conv(filters=32, pad=same) :: batchnorm
      :: add(stem) :: relu :: ...

The model resolves the names when it is built (`srcs`, the source layers). The Net keeps the sources'
outputs and hands them over as ctx["extras"]; backward returns dy as the input gradient and leaves the
same dy in ctx["dextras"], which the Net adds to the gradient of the source's output. Plain numpy:
one memory-bound sum."""
from ..layers import register
from .base import Layer, LayerError, P, show_shape


@register("add", aliases=("shortcut",))
class Add(Layer):
    params = (P("from", "layer", rest=True),)
    srcs = ()             # the source Layers, set by the model builder
    starts_chain = False  # True (written first in a chain): the sum of the named outputs only

    def describe(self):
        names = self.args["from"]
        return f"add(from={names[0]})" if len(names) == 1 else f"add({', '.join(names)})"

    def inputs(self):
        return list(self.srcs[1:]) if self.starts_chain else list(self.srcs)

    def out_shape(self, s):
        if self.starts_chain and len(self.srcs) < 2:
            raise LayerError("add first in a chain sums the outputs it names: name at least two, e.g. "
                             "add(a, b)", "from")
        names = list(self.args["from"])
        first = names[0] if self.starts_chain else "its input"
        for nm, src in zip(names[1:] if self.starts_chain else names, self.inputs()):
            if src.out != tuple(s):
                raise LayerError(f"cannot add the output of {nm} ({show_shape(src.out)}) to "
                                 f"{first} ({show_shape(s)}): the shapes must be equal", "from")
        return s

    def to_onnx(self, g, x, p, state, extras):
        for k, e in enumerate(extras):
            x = g.op("Add", [x, e], self.name if k == len(extras) - 1 else f"{self.name}/{k}", kind=g.kind[x])
        return x

    def forward(self, x, p, ctx, training):
        y = x + ctx["extras"][0]
        for e in ctx["extras"][1:]:
            y += e
        return y

    def backward(self, dy, p, g, ctx, need_dx):
        ctx["dextras"] = [dy] * len(ctx["extras"])
        return dy if need_dx else None
