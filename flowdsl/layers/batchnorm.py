"""batchnorm(momentum=0.9, eps=1e-5): normalise each channel (or feature) with the batch
statistics in training and running averages in evaluation, then scale and shift (2 learned
parameters per channel). Shape unchanged."""
from ..layers import register
from .base import Layer, P


@register("batchnorm", aliases=("bn",))
class BatchNorm(Layer):
    params = (P("momentum", "float", 0.9, lo=0.0, hi=1.0, hi_open=True),
              P("eps", "float", 1e-5, lo=0.0, lo_open=True))
    has_weights = True

    def param_shapes(self, s):
        c = s[0]
        return {"gamma": (c,), "beta": (c,)}
