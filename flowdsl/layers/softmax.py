"""softmax (aliases logsoftmax, crossentropy): the classification loss, softmax followed by
cross-entropy against integer labels, averaged over the batch. Last layer only; its input is a
vector of class scores. forward() gives probabilities; loss() the loss and its gradient."""
import numpy as np

from ..layers import register
from .base import Layer, LayerError, show_shape


@register("softmax", aliases=("logsoftmax", "crossentropy", "softmaxlogentropy"))
class Softmax(Layer):
    role = "loss"
    targets = "labels"

    def out_shape(self, s):
        if len(s) != 1:
            raise LayerError(f"needs a vector of class scores, but gets {show_shape(s)}; "
                             f"put dense(classes) before it")
        if s[0] < 2:
            raise LayerError(f"needs at least 2 classes, but gets {s[0]}; use squared for one output")
        return s

    def forward(self, z, p, ctx, training):
        m = z.max(axis=1, keepdims=True)
        e = np.exp(z - m)
        e /= e.sum(axis=1, keepdims=True)
        return e

    def loss(self, z, y):
        """(mean cross-entropy, d loss / d z, number of correct predictions)."""
        n = z.shape[0]
        m = z.max(axis=1, keepdims=True)
        sh = z - m
        lse = np.log(np.exp(sh).sum(axis=1, keepdims=True))
        logp = sh - lse
        rows = np.arange(n)
        loss = float(-logp[rows, y].astype(np.float64).mean())
        dz = np.exp(logp)
        correct = int((dz.argmax(axis=1) == y).sum())
        dz[rows, y] -= np.float32(1.0)
        dz *= np.float32(1.0 / n)
        return loss, dz, correct
