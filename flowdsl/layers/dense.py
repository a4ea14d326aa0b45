"""dense(units, act=linear, bias=true, trainable=true), alias linear(units): a fully connected
layer with a learned bias (none with bias=false).
It flattens its input (in channels-last order). Shape rule: anything -> (units,).

The products go to numpy's BLAS (flowdsl's own kernel where blas says so), then the bias and the
activation; in evaluation at most SMALL_ROWS samples go through one numba kernel instead."""
import math

import numpy as np

from ..blas import colsum, mm
from ..layers import activation_table, register
from .activations import act_backward, act_forward, act_spec
from .base import BIAS, TRAINABLE, Layer, P
from ..jit import kernel


@register("dense", aliases=("fc",), call_aliases=("linear",))
class Dense(Layer):
    params = (
        P("units", "int", lo=1),
        P("act", "call", "linear", table=activation_table),
        BIAS,
        TRAINABLE,
    )
    has_weights = True

    def out_shape(self, s):
        return (self.args["units"],)

    def param_shapes(self, s):
        shapes = {"w": (math.prod(s), self.args["units"]), "b": (self.args["units"],)}
        if self.args.get("bias") is False:
            del shapes["b"]
        return shapes

    def fans(self):
        return (math.prod(self.in_shape), self.args["units"])

    def forward(self, x, p, ctx, training):
        x2 = x.reshape(x.shape[0], -1)
        kind, alpha = act_spec(self)
        w = p["w"]
        if not training and x2.shape[0] <= SMALL_ROWS and x2.flags.c_contiguous and (
                w.shape[1] >= 16 or w.size <= SMALL_NARROW):
            y = np.empty((x2.shape[0], w.shape[1]), np.float32)
            _small(x2, w, p.get("b", _NO_BIAS), y, kind == "relu")
            return y if kind in ("relu", "linear") else act_forward(kind, alpha, y)
        z = mm(x2, w)
        if "b" in p:
            z += p["b"]
        y = act_forward(kind, alpha, z)   # a fresh output: see activations.act_forward
        if training:
            ctx["x"], ctx["z"], ctx["y"] = x2, z, y
        return y

    def to_onnx(self, g, x, p, state, extras):
        xv = g.vector(x, self.name)
        w = g.const(f"{self.name}.w", p["w"])
        act = act_spec(self)
        linear = act[0] == "linear"
        out = self.name if linear else f"{self.name}/z"
        if "b" in p:
            z = g.op("Gemm", [xv, w, g.const(f"{self.name}.b", p["b"])], out, kind="vec")
        else:
            z = g.op("MatMul", [xv, w], out, kind="vec")
        return z if linear else g.act(act, z, self.name)

    def backward(self, dy, p, g, ctx, need_dx):
        kind, alpha = act_spec(self)
        dz = act_backward(kind, alpha, ctx["z"], ctx["y"], dy)
        g["w"][...] = mm(ctx["x"].T, dz)  # (not matmul(out=...): that path skips BLAS, 40x slower)
        if "b" in g:
            colsum(dz, g["b"])
        if not need_dx:
            return None
        return mm(dz, p["w"].T).reshape(ctx["x"].shape[0], *_nhwc(self.in_shape))


SMALL_ROWS = 4   # evaluation of at most this many samples: one numba call (_small) instead of
                # BLAS, the bias and the activation (net B at batch 1: its two dense layers 8 -> 6 us)
SMALL_NARROW = 1 << 16   # ... and at least 16 units, or weights of at most this many values (a
                        # few units over a long input, net C's dense(2) over 120,000, stay in BLAS:
                        # its rows would not fill a vector)
_NO_BIAS = np.zeros(0, np.float32)


@kernel(parallel=False)
def _small(x, w, b, y, relu):
    """y = x @ w + b (b empty: no bias), then relu when relu: row by row, each input value
    that is not 0 adding its weight row (after a relu, about half are 0). w C-contiguous."""
    n, k_ = x.shape
    u = w.shape[1]
    wf = w.reshape(w.size)
    yf = y.reshape(y.size)
    zero = np.float32(0.0)
    nb = b.shape[0]
    for i in range(n):
        o = i * u
        for j in range(u):
            yf[o + j] = b[j] if nb else zero
        for k in range(k_):
            v = x[i, k]
            if v != zero:
                r = k * u
                for j in range(u):
                    yf[o + j] += v * wf[r + j]
        if relu:
            for j in range(u):
                yf[o + j] = max(yf[o + j], zero)


def _nhwc(s):
    return (s[1], s[2], s[0]) if len(s) == 3 else s
