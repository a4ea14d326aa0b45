"""softmax(smoothing=0) (aliases logsoftmax, crossentropy): the classification loss, softmax
followed by cross-entropy against integer labels, averaged over the batch. Last layer only; its
input is a vector of class scores. forward() gives probabilities; loss() the loss and its
gradient. smoothing s (label smoothing, as Keras' and PyTorch's label_smoothing) trains toward
the target distribution (1 - s) * one_hot(label) + s / classes instead of one_hot(label)."""
import numpy as np

from ..jit import kernel, prange
from ..layers import register
from .base import Layer, LayerError, P, show_shape


@register("softmax", aliases=("logsoftmax", "crossentropy", "softmaxlogentropy"))
class Softmax(Layer):
    role = "loss"
    targets = "labels"
    params = (P("smoothing", "float", 0.0, lo=0.0, hi=1.0, hi_open=True),)

    def out_shape(self, s):
        if len(s) != 1:
            raise LayerError(f"needs a vector of class scores, but gets {show_shape(s)}; "
                             f"put dense(classes) before it")
        if s[0] < 2:
            raise LayerError(f"needs at least 2 classes, but gets {s[0]}; use squared for one output")
        return s

    def to_onnx(self, g, x, p, state, extras):
        return g.op("Softmax", [g.vector(x, self.name)], self.name, kind="vec", axis=1)   # probabilities

    def forward(self, z, p, ctx, training):
        """Probabilities: one kernel call (numpy's max, subtract, exp, sum and divide were five,
        3.4 us for one image's 10 scores, a twentieth of net B's whole single-image pass)."""
        z = np.ascontiguousarray(z, dtype=np.float32)
        e = np.empty_like(z)
        _probs(z, e)
        return e

    def _cross_entropy(self, logp, y):
        """Mean cross-entropy (in float64) of log-probabilities logp (N, classes) against the
        labels, smoothed toward s / classes when smoothing s > 0."""
        n, k = logp.shape
        loss = float(-logp[np.arange(n), y].astype(np.float64).mean())
        s = self.args["smoothing"]
        if s:
            loss = (1.0 - s) * loss - s / k * float(logp.sum(dtype=np.float64)) / n
        return loss

    def prob_loss(self, p, y):
        """The loss of given probabilities p (N, classes), e.g. averaged over test-time views."""
        return self._cross_entropy(np.log(np.maximum(p.astype(np.float64), 1e-30)), y)

    def loss(self, z, y):
        """(mean cross-entropy, d loss / d z, number of correct predictions)."""
        n = z.shape[0]
        m = z.max(axis=1, keepdims=True)
        sh = z - m
        lse = np.log(np.exp(sh).sum(axis=1, keepdims=True))
        logp = sh - lse
        rows = np.arange(n)
        s = self.args["smoothing"]
        loss = self._cross_entropy(logp, y)
        dz = np.exp(logp)
        correct = int((dz.argmax(axis=1) == y).sum())
        if s:
            dz -= np.float32(s / z.shape[1])
            dz[rows, y] -= np.float32(1.0 - s)
        else:
            dz[rows, y] -= np.float32(1.0)
        dz *= np.float32(1.0 / n)
        return loss, dz, correct


@kernel
def _probs(z, e):
    """e[i] = softmax(z[i]) for each row: exp(z - max) over its sum."""
    n, k = z.shape
    for i in prange(n):
        m = z[i, 0]
        for j in range(1, k):
            m = max(m, z[i, j])
        s = np.float32(0.0)
        for j in range(k):
            v = np.exp(z[i, j] - m)
            e[i, j] = v
            s += v
        for j in range(k):
            e[i, j] = e[i, j] / s
