"""Elementwise activations: relu, gelu, sigmoid, tanh, linear, leakyrelu(alpha), elu(alpha),
softplus. Usable as a layer (`:: relu`) or as `act=` of conv and dense. Shape unchanged.

They share one file (unlike other kinds) because each is a single formula and its derivative;
the kernels are one elementwise loop parametrised by the activation."""
from ..layers import register
from .base import Layer, P


class Activation(Layer):
    role = "activation"


@register("relu")
class ReLU(Activation):
    pass


@register("gelu")
class GELU(Activation):
    pass


@register("sigmoid")
class Sigmoid(Activation):
    pass


@register("tanh")
class Tanh(Activation):
    pass


@register("linear", aliases=("identity",))
class Linear(Activation):
    pass


@register("leakyrelu", aliases=("leaky_relu",))
class LeakyReLU(Activation):
    params = (P("alpha", "float", 0.01, lo=0.0),)


@register("elu")
class ELU(Activation):
    params = (P("alpha", "float", 1.0, lo=0.0),)


@register("softplus")
class Softplus(Activation):
    pass
