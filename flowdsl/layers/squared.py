"""squared (alias mse): the regression loss, mean squared error against target vectors.
Last layer only. Shape unchanged."""
from ..layers import register
from .base import Layer


@register("squared", aliases=("mse",))
class Squared(Layer):
    role = "loss"
