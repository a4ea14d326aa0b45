"""dropout(p=0.5): in training, zero each value with probability p and scale the rest by 1/(1-p);
in evaluation, the identity. Shape unchanged.

The mask is drawn from ctx["rng"] (the Net's generator, so a seed fixes it) and kept, already
scaled, for backward: dx = dy * mask. Plain numpy: one draw and one multiply, memory-bound."""
import math

import numpy as np

from ..layers import register
from .base import Layer, P


@register("dropout")
class Dropout(Layer):
    params = (P("p", "float", 0.5, lo=0.0, hi=1.0, hi_open=True),)

    def to_onnx(self, g, x, p, state, extras):
        # the identity in evaluation (ONNX Runtime drops the node); kept so that an import has it
        ratio = g.const(f"{self.name}.p", np.array(self.args["p"], np.float32))
        return g.op("Dropout", [x, ratio], self.name, kind=g.kind[x])

    def forward(self, x, p, ctx, training):
        rate = self.args["p"]
        if not training or rate == 0.0 or ctx.get("frozen"):   # frozen: gradients in evaluation mode
            ctx["mask"] = None
            return x
        rows = ctx.get("rows")
        if rows is not None and rows[0] is not None:   # a rank's share: the global batch's mask, its rows
            keep = ctx["rng"].random((rows[1],) + x.shape[1:], dtype=np.float32)[rows[0]] >= np.float32(rate)
        else:
            keep = ctx["rng"].random(x.shape, dtype=np.float32) >= np.float32(rate)
        mask = keep.astype(np.float32)
        mask *= np.float32(1.0 / (1.0 - rate))
        ctx["mask"] = mask
        return x * mask

    def bytes_per_sample(self):
        return 4 * math.prod(self.out), 0, 0   # the scaled mask

    def backward(self, dy, p, g, ctx, need_dx):
        if not need_dx:
            return None
        mask = ctx.get("mask")
        return dy if mask is None else dy * mask
