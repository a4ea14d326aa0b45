"""swish, alias silu: y = x * sigmoid(x) (Ramachandran et al. 2017; SiLU in PyTorch).
Usable as a layer (`:: swish`) or as `act=swish` of conv and dense. Shape unchanged.
dy/dx = s + x * s * (1 - s) with s = sigmoid(x). Not monotone (a dip to -0.28 near x = -1.28),
so the plan never moves it past a maxpool; relu-like, so the layer before it gets he init.

A kind in its own file: an Activation with its own kernels (the built-in ones share a kernel
in activations.py)."""
import numpy as np

from ..jit import kernel, prange
from . import register
from .activations import Activation


@register("swish", aliases=("silu",))
class Swish(Activation):
    he_init = True

    @classmethod
    def to_onnx_act(cls, g, x, alpha, name):
        return g.op("Mul", [x, g.op("Sigmoid", [x], f"{name}/sigmoid")], name)

    @classmethod
    def apply(cls, z, alpha):
        y = np.empty_like(z)
        _fwd(z.reshape(-1), y.reshape(-1))
        return y

    @classmethod
    def derive(cls, z, y, dy, alpha):
        dz = np.empty_like(dy)
        _bwd(z.reshape(-1), dy.reshape(-1), dz.reshape(-1))
        return dz


@kernel(parallel=False)
def _sigmoid(v):
    one = np.float32(1.0)
    if v >= np.float32(0.0):
        return one / (one + np.exp(-v))
    e = np.exp(v)
    return e / (one + e)


@kernel
def _fwd(z, y):
    for i in prange(z.shape[0]):
        v = z[i]
        y[i] = v * _sigmoid(v)


@kernel
def _bwd(z, dy, dz):
    one = np.float32(1.0)
    for i in prange(z.shape[0]):
        v = z[i]
        s = _sigmoid(v)
        dz[i] = dy[i] * (s + v * s * (one - s))
