"""dropout(p=0.5): in training, zero each value with probability p and scale the rest by 1/(1-p);
in evaluation, the identity. Shape unchanged."""
from ..layers import register
from .base import Layer, P


@register("dropout")
class Dropout(Layer):
    params = (P("p", "float", 0.5, lo=0.0, hi=1.0, hi_open=True),)
