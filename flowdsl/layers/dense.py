"""dense(units, act=linear, bias=true, trainable=true), alias linear(units): a fully connected
layer with a learned bias (none with bias=false).
It flattens its input (in channels-last order). Shape rule: anything -> (units,).

The products go to numpy's BLAS; bias and activation are fused into one numba pass."""
import math


from ..blas import colsum, mm
from ..layers import activation_table, register
from .activations import act_backward, act_forward, act_spec
from .base import BIAS, TRAINABLE, Layer, P


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
        z = mm(x2, p["w"])
        if "b" in p:
            z += p["b"]
        kind, alpha = act_spec(self)
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


def _nhwc(s):
    return (s[1], s[2], s[0]) if len(s) == 3 else s
