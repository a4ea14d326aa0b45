"""Elementwise activations: relu, gelu, sigmoid, tanh, linear, leakyrelu(alpha), elu(alpha),
softplus. Usable as a layer (`:: relu`) or as `act=` of conv and dense. Shape unchanged.
(An activation in a file of its own, such as swish.py, subclasses Activation and brings its
own apply/derive kernels.)

They share one file (unlike other kinds) because each is one formula and its derivative: the
kernels are one parallel elementwise loop selected by a code. gelu is the tanh approximation
(PyTorch's GELU(approximate='tanh'), as in hello-dl)."""
import numpy as np

from ..jit import kernel, prange
from . import REGISTRY, register
from ..errors import FlowError
from .base import Layer, P

class Activation(Layer):
    """An elementwise activation. Capabilities the rest of flowdsl asks for:
    he_init   the layer before it defaults to he initialisation (relu-like), else glorot;
    monotone_for(alpha)   non-decreasing, so it commutes with max (flowdsl.plan may run it
              after a maxpool; only where that is exact in float32 too);
    apply / derive   y = act(z) and dz = dy * act'(z) (the kinds in this file share one
              kernel selected by `code`; a kind in its own file overrides both)."""
    role = "activation"
    code = 0              # this file's kernel code (the one activation numbering; 0: identity)
    he_init = False
    monotone = False

    @classmethod
    def monotone_for(cls, alpha):
        return cls.monotone

    @classmethod
    def apply(cls, z, alpha):
        if cls.code == 0:
            return z
        y = np.empty_like(z)
        _fwd(z.reshape(-1), y.reshape(-1), cls.code, np.float32(alpha))
        return y

    @classmethod
    def derive(cls, z, y, dy, alpha):
        if cls.code == 0:
            return dy
        dz = np.empty_like(dy)
        _bwd(z.reshape(-1), y.reshape(-1), dy.reshape(-1), dz.reshape(-1), cls.code, np.float32(alpha))
        return dz

    onnx_op = None        # the ONNX operator of y = act(x) (alpha: its attribute, where it has one)

    @classmethod
    def to_onnx_act(cls, g, x, alpha, name):
        """Nodes computing act(x) into the tensor `name` (flowdsl.onnx_export.Graph g)."""
        if cls.code == 0:
            return g.op("Identity", [x], name)
        if cls.onnx_op is None:
            raise FlowError(f"activation {cls.kind} has no ONNX mapping")
        attrs = {"alpha": alpha} if any(p.name == "alpha" for p in cls.params) else {}
        return g.op(cls.onnx_op, [x], name, **attrs)

    def to_onnx(self, g, x, p, state, extras):
        return g.act((self.kind, self.args.get("alpha", 0.0)), x, self.name)

    def as_post(self):
        return self.kind, self.args.get("alpha", 0.0)

    def forward(self, x, p, ctx, training):
        y = self.apply(x, self.args.get("alpha", 0.0))
        ctx["z"], ctx["y"] = x, y
        return y

    def backward(self, dy, p, g, ctx, need_dx):
        if not need_dx:
            return None
        return self.derive(ctx["z"], ctx["y"], dy, self.args.get("alpha", 0.0))


@register("relu")
class ReLU(Activation):
    code, he_init, monotone = 1, True, True
    onnx_op = "Relu"


@register("gelu")
class GELU(Activation):
    code, he_init = 2, True

    @classmethod
    def to_onnx_act(cls, g, x, alpha, name):
        # the tanh form written out (opset 20's Gelu(approximate="tanh") is newer than opset 17):
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        c = lambda v: g.const(f"{name}/c", np.array(v, np.float32))  # noqa: E731
        x3 = g.op("Mul", [g.op("Mul", [x, x], f"{name}/x2"), x], f"{name}/x3")
        inner = g.op("Add", [x, g.op("Mul", [x3, c(0.044715)], f"{name}/ax3")], f"{name}/inner")
        t = g.op("Tanh", [g.op("Mul", [inner, c(np.sqrt(2.0 / np.pi))], f"{name}/scaled")], f"{name}/tanh")
        half = g.op("Mul", [x, c(0.5)], f"{name}/half")
        return g.op("Mul", [half, g.op("Add", [t, c(1.0)], f"{name}/onept")], name)


@register("sigmoid")
class Sigmoid(Activation):
    code = 3
    onnx_op = "Sigmoid"


@register("tanh")
class Tanh(Activation):
    code = 4
    onnx_op = "Tanh"


@register("linear", aliases=("identity",))
class Linear(Activation):
    code = 0


@register("leakyrelu", aliases=("leaky_relu",))
class LeakyReLU(Activation):
    params = (P("alpha", "float", 0.01, lo=0.0),)
    code, he_init = 5, True
    onnx_op = "LeakyRelu"

    @classmethod
    def monotone_for(cls, alpha):
        return alpha >= 0


@register("elu")
class ELU(Activation):
    params = (P("alpha", "float", 1.0, lo=0.0),)
    code, he_init = 6, True
    onnx_op = "Elu"


@register("softplus")
class Softplus(Activation):
    code = 7
    onnx_op = "Softplus"


# ------------------------------------------------------------------------------ entry points
def act_class(kind):
    """The Activation class of a kind name (act= values are normalised to kind names)."""
    return REGISTRY[kind]


def act_forward(kind, alpha, z):
    """y = act(z) into a fresh array (for linear, z itself, no copy). Never in place: y[i] =
    f(z[i]) over one array took LLVM's scalar fallback loop (its run-time check finds the two
    ranges overlapping), 3x (relu) to 10x (gelu) slower (692k values, one thread: gelu 2.57 ms
    against 0.26)."""
    return REGISTRY[kind].apply(z, alpha)


def act_backward(kind, alpha, z, y, dy):
    """dz = dy * act'(z) (some derivatives are computed from y, which is cheaper)."""
    return REGISTRY[kind].derive(z, y, dy, alpha)


def act_spec(layer):
    """(kind, alpha) of a conv/dense layer's act= argument."""
    a = layer.args["act"]
    return a.name, float(a.get("alpha", 0.0) or 0.0)


# ------------------------------------------------------------------------------ kernels
@kernel(parallel=False)
def _tanh(x):
    """tanh as a clamped rational polynomial (Eigen's float32 fast tanh, error ~1e-7): unlike
    libm's tanhf it vectorises, which made gelu 20x faster here."""
    x = min(max(x, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
    x2 = x * x
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return x * p / q


@kernel
def _fwd(z, y, code, alpha):
    n = z.shape[0]
    one, half, zero = np.float32(1.0), np.float32(0.5), np.float32(0.0)
    k, c = np.float32(0.7978845608028654), np.float32(0.044715)
    if code == 1:
        for i in prange(n):
            v = z[i]
            y[i] = v if v > zero else zero
    elif code == 2:
        for i in prange(n):
            v = z[i]
            y[i] = half * v * (one + _tanh(k * (v + c * v * v * v)))
    elif code == 3:
        for i in prange(n):
            v = z[i]
            if v >= zero:
                y[i] = one / (one + np.exp(-v))
            else:
                e = np.exp(v)
                y[i] = e / (one + e)
    elif code == 4:
        for i in prange(n):
            y[i] = _tanh(z[i])
    elif code == 5:
        for i in prange(n):
            v = z[i]
            y[i] = v if v > zero else alpha * v
    elif code == 6:
        for i in prange(n):
            v = z[i]
            y[i] = v if v > zero else alpha * (np.exp(v) - one)
    elif code == 7:
        for i in prange(n):
            v = z[i]
            # log(1 + e^v) without overflow
            y[i] = (v if v > zero else zero) + np.log1p(np.exp(-abs(v)))
    else:
        for i in prange(n):
            y[i] = z[i]


@kernel
def _bwd(z, y, dy, dz, code, alpha):
    n = z.shape[0]
    one, half, zero, three = np.float32(1.0), np.float32(0.5), np.float32(0.0), np.float32(3.0)
    k, c = np.float32(0.7978845608028654), np.float32(0.044715)
    if code == 1:
        for i in prange(n):
            dz[i] = dy[i] if z[i] > zero else zero
    elif code == 2:
        for i in prange(n):
            v = z[i]
            t = _tanh(k * (v + c * v * v * v))
            d = half * (one + t) + half * v * (one - t * t) * k * (one + three * c * v * v)
            dz[i] = dy[i] * d
    elif code == 3:
        for i in prange(n):
            s = y[i]
            dz[i] = dy[i] * s * (one - s)
    elif code == 4:
        for i in prange(n):
            t = y[i]
            dz[i] = dy[i] * (one - t * t)
    elif code == 5:
        for i in prange(n):
            dz[i] = dy[i] if z[i] > zero else alpha * dy[i]
    elif code == 6:
        for i in prange(n):
            dz[i] = dy[i] if z[i] > zero else dy[i] * (y[i] + alpha)
    elif code == 7:
        for i in prange(n):
            v = z[i]
            if v >= zero:
                dz[i] = dy[i] / (one + np.exp(-v))
            else:
                e = np.exp(v)
                dz[i] = dy[i] * e / (one + e)
    else:
        for i in prange(n):
            dz[i] = dy[i]
