"""squared (alias mse): the regression loss, 0.5 * squared error summed over outputs and
averaged over the batch. Last layer only; the targets have the network output's shape."""
import numpy as np

from ..layers import register
from .base import Layer


@register("squared", aliases=("mse",))
class Squared(Layer):
    role = "loss"
    targets = "values"

    def to_onnx(self, g, x, p, state, extras):
        return x   # the values (the exporter names the graph's output after this layer)

    def loss(self, z, y):
        n = z.shape[0]
        d = z - y.reshape(z.shape).astype(np.float32)
        loss = float(0.5 * np.square(d, dtype=np.float64).sum() / n)
        return loss, d * np.float32(1.0 / n), 0
