"""dense(units, act=linear), alias linear(units): a fully connected layer with a learned bias.
It flattens its input. Shape rule: anything -> (units,)."""
import math

from ..layers import activation_table, register
from .base import Layer, P


@register("dense", aliases=("fc",), call_aliases=("linear",))
class Dense(Layer):
    params = (
        P("units", "int", lo=1),
        P("act", "call", "linear", table=activation_table),
    )
    has_weights = True

    def out_shape(self, s):
        return (self.args["units"],)

    def param_shapes(self, s):
        return {"w": (math.prod(s), self.args["units"]), "b": (self.args["units"],)}
