"""concat(a, b, ...): join feature maps (or vectors) along channels. Written first in a chain it
joins the named branches (a bound layer or sub-chain each, or any layer's automatic name):

    stem = input(28x28x1) :: conv(filters=32, pad=same) :: relu
    a = stem :: conv(filters=16, field=1)                  # a branch from stem's output
    b = stem :: conv(filters=8, field=1) :: conv(filters=16, field=3, pad=1)
    network = concat(a, b) :: maxpool :: dense(10) :: softmax

Written after a layer (`... :: concat(a)`), it joins that layer's output with the named ones,
in that order (as add(from=...) adds to its input). Every input must have the same width and
height (maps) or be a vector; the output has the sum of their channels. A name several
chains start from is one layer, not a copy: its gradient is the sum over its consumers.

The Net hands the named outputs over as ctx["extras"]; backward returns the input's slice of
dy and leaves the others' slices in ctx["dextras"]. Plain numpy: a copy each way."""
import numpy as np

from ..args import P
from ..layers import register
from .base import Layer, LayerError, show_shape


@register("concat", aliases=("concatenate",))
class Concat(Layer):
    params = (P("from", "layer", rest=True),)
    srcs = ()            # the source Layers, set by the model builder
    starts_chain = False  # True: joins only the named outputs (the first is its input)

    def describe(self):
        return f"concat({', '.join(self.args['from'])})"

    def inputs(self):
        """The source layers whose outputs this layer reads besides its input."""
        return list(self.srcs[1:]) if self.starts_chain else list(self.srcs)

    def out_shape(self, s):
        shapes = [tuple(s)] + [tuple(l.out) for l in self.inputs()]
        names = (list(self.args["from"]) if self.starts_chain else ["its input"] + list(self.args["from"]))
        if len(shapes) < 2:
            raise LayerError("concat needs at least two inputs: name the branches to join, e.g. "
                             "concat(a, b)", "from")
        first = shapes[0]
        for nm, sh in zip(names[1:], shapes[1:]):
            if len(sh) != len(first) or sh[1:] != first[1:]:
                what = "width and height" if len(first) == 3 and len(sh) == 3 else "kind (map or vector)"
                raise LayerError(f"cannot join {nm} ({show_shape(sh)}) to {names[0]} ({show_shape(first)}): "
                                 f"the {what} must be equal", "from")
        return (sum(sh[0] for sh in shapes),) + first[1:]

    def to_onnx(self, g, x, p, state, extras):
        return g.op("Concat", [x] + list(extras), self.name, kind=g.kind[x], axis=1)

    def forward(self, x, p, ctx, training):
        parts = [x] + list(ctx["extras"])
        if training:
            ctx["widths"] = [a.shape[-1] for a in parts]
        return np.ascontiguousarray(np.concatenate(parts, axis=-1))

    def backward(self, dy, p, g, ctx, need_dx):
        cuts = np.cumsum(ctx["widths"])[:-1]
        pieces = [np.ascontiguousarray(d) for d in np.split(dy, cuts, axis=-1)]
        ctx["dextras"] = pieces[1:]
        return pieces[0] if need_dx else None
