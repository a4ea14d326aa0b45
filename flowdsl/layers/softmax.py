"""softmax (aliases logsoftmax, crossentropy): the classification loss, softmax followed by
cross-entropy against integer labels. Last layer only; its input is a vector of class scores."""
from ..layers import register
from .base import Layer, LayerError, show_shape


@register("softmax", aliases=("logsoftmax", "crossentropy", "softmaxlogentropy"))
class Softmax(Layer):
    role = "loss"

    def out_shape(self, s):
        if len(s) != 1:
            raise LayerError(f"needs a vector of class scores, but gets {show_shape(s)}; "
                             f"put dense(classes) before it")
        if s[0] < 2:
            raise LayerError(f"needs at least 2 classes, but gets {s[0]}; use squared for one output")
        return s
