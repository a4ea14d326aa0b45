"""The Layer base class: what every registered kind declares.

Spec shapes are tuples (C, H, W) for feature maps and (N,) for vectors; the DSL writes maps as
WxHxC and `show_shape` converts for people.

Engine arrays are float32, C-contiguous, batch first, channels LAST: (N, H, W, C) for maps,
(N, D) for vectors. Channels-last makes a convolution one large matrix product over contiguous
rows (im2col copies C-long runs) and needs no transposes around the BLAS call; it is also the
layout images arrive in. The user API accepts NCHW too and converts once at the boundary.
"""
from __future__ import annotations

import math

import numpy as np

from ..args import P, fmt


class LayerError(Exception):
    """A layer's complaint about its input shape or arguments; `key` names the argument to
    point at (None: point at the layer)."""

    def __init__(self, message, key=None):
        super().__init__(message)
        self.key = key


def show_shape(s) -> str:
    if len(s) == 3:
        c, h, w = s
        return f"{w}x{h}x{c}"
    return "x".join(str(d) for d in s)


def from_written(dims) -> tuple:
    """DSL order (W, H, C) or (N,) -> internal (C, H, W) or (N,)."""
    if len(dims) == 3:
        w, h, c = dims
        return (c, h, w)
    return tuple(dims)


class Layer:
    kind: str = "?"          # set by @register
    params: tuple = ()       # tuple of P
    role: str = "layer"      # input | layer | activation | loss
    has_weights = False
    he_init = False          # activations: the layer before defaults to he init (else glorot)
    spatial_filters = False  # its "w" is (F, F, C, K) filters that focus --kernels can draw

    @property
    def trainable(self):
        """False for a layer written with trainable=false: the optimizer never moves its
        parameters (and L2 leaves them alone), while gradients still pass through it."""
        return self.args.get("trainable") is not False

    def __init__(self, args: dict, name: str | None = None, pos=None, where=None):
        self.args = args
        self.name = name
        self.pos = pos
        self.where = where or {}
        self.in_shape = None
        self.out = None

    # --- spec: pure Python, used by `check` -------------------------------------------------
    def out_shape(self, s: tuple) -> tuple:
        return s

    def param_shapes(self, s: tuple) -> dict:
        """{parameter name: shape} for input shape s (learned parameters only)."""
        return {}

    def n_params(self, s: tuple) -> int:
        return sum(math.prod(v) for v in self.param_shapes(s).values())

    feed = None          # the Layer whose output is this layer's input, when it is not the one
                         # before it in Model.layers (a branch's first layer; set by the model)
    feed_name = None     # how the .flow file named that layer (`b = stem :: ...`: "stem")
    feed_pos = None      # and where

    def inputs(self) -> list:
        """The layers whose outputs this layer reads besides its input (add's source, concat's
        branches): the Net hands them over as ctx["extras"] and takes their gradients from
        ctx["dextras"]."""
        return []

    def notes(self) -> list:
        """Remarks on the built layer that are not errors (flowdsl check prints them)."""
        return []

    def describe(self) -> str:
        """Canonical .flow text of this layer: every argument spelled out."""
        shown = [(k, v) for k, v in self.args.items() if k != "shape" and v is not None]
        if not self.params:
            return self.kind
        inner = ", ".join(f"{k}={fmt(v)}" for k, v in shown)
        if self.args.get("shape") is not None:
            inner = self.args["shape"].text + (", " + inner if inner else "")
        return f"{self.kind}({inner})"

    def spec_key(self):
        return (self.kind, tuple((k, str(v)) for k, v in self.args.items()))

    def act_kind(self):
        """For layers with act=: the activation's CallValue."""
        return self.args.get("act")

    # --- capabilities flowdsl.plan asks for -----------------------------------------------------
    def own_act(self):
        """(kind, alpha) of the act= this layer runs and could hand over to a later step (then
        forward_fused runs it with another), or None."""
        return None

    def as_post(self):
        """(kind, alpha) if this layer is an activation and nothing else, which the step before
        it may apply to its own output (flowdsl.plan), else None."""
        return None

    def max_window(self):
        """(size, stride) if this layer takes the maximum over windows (a deferred monotone
        activation may run after it), else None."""
        return None

    def can_pool(self, n, training, window):
        """Whether, for a batch of n samples (in training or evaluation), forward_fused can apply
        the next layer's max window (size, stride) itself (and then backward takes the gradient
        at the pooled output)."""
        return False

    def forward_fused(self, x, p, ctx, training, act, pool):
        """forward with the activation `act` (kind, alpha) instead of its own act=, and (pool:
        (size, stride, PH, PW)) the next layer's max window applied to the output before the
        activation. Only for layers whose own_act / can_pool offer it."""
        raise NotImplementedError(f"{self.kind} cannot run fused")

    # --- engine ---------------------------------------------------------------------------------
    # Subclasses override forward/backward; the defaults are the identity (input, flatten-like).
    def fans(self):
        """(fan_in, fan_out) of the weights, for he/glorot initialisation."""
        return (1, 1)

    def init_params(self, rng, init, he_default: bool) -> dict:
        """Fresh parameters {name: float32 array}. `init` is the init block's CallValue for this
        layer (or None); weights follow it, biases start at zero, scales at one."""
        from ..init import initialise
        out = {}
        for pname, shape in self.param_shapes(self.in_shape).items():
            out[pname] = initialise(rng, pname, shape, init, self.fans(), he_default)
        return out

    def new_state(self) -> dict:
        """Buffers that are not learned but saved (batchnorm's running statistics)."""
        return {}

    def forward(self, x, p: dict, ctx: dict, training: bool):
        """x: (N, ...) float32 -> output. Store in ctx what backward needs. Never write into x:
        a skip connection (add) may read the same array later."""
        return x

    def backward(self, dy, p: dict, g: dict, ctx: dict, need_dx: bool):
        """dy: gradient of the loss w.r.t. the output. Write parameter gradients into the
        preallocated arrays g[name] (overwrite, do not accumulate); return dx (None if not
        need_dx). Never write into dy: add hands the same array to two branches."""
        return dy if need_dx else None

    def to_onnx(self, g, x, p, state, extras):
        """Write this layer's nodes into g (flowdsl.onnx_export.Graph) reading tensor x (and the
        outputs of inputs() as extras); return the output tensor's name (the layer's name)."""
        raise g.unsupported(self, "no ONNX mapping for this kind")

    def bytes_per_sample(self):
        """Training memory per sample besides this layer's output, as three byte counts: what
        forward keeps for backward, what backward allocates before the input gradient, and
        what it allocates for the input gradient (flowdsl.memory adds them up). By default:
        a layer with a non-linear act= keeps z beside y = act(z) and makes dz = dy * act'(z)."""
        act = self.args.get("act")
        nonlinear = act is not None and getattr(act, "name", "linear") != "linear"
        out = 4 * math.prod(self.out) if nonlinear else 0
        return out, out, 0


# keyword-only arguments of layers with weights (None: the default, not printed, so a model
# written before they existed prints as it did)
TRAINABLE = P("trainable", "bool", None, positional=False)
BIAS = P("bias", "bool", None, positional=False)


def biased(layer, p, g=None):
    """(p, g) with a bias entry for a layer built with bias=false: zeros in p, a scratch array in
    g (the kernels add a bias and sum its gradient either way; with bias=false there is nothing
    to learn, so nothing is stored or saved)."""
    if "b" in p:
        return p, g
    zero = getattr(layer, "_no_bias", None)
    k = p["w"].shape[-1]
    if zero is None or zero.shape[0] != k:
        zero = layer._no_bias = np.zeros(k, np.float32)
    p = dict(p, b=zero)
    if g is not None:
        g = dict(g, b=np.empty(k, np.float32))
    return p, g


def need_map(layer, s, what="an image input (WxHxC)"):
    if len(s) != 3:
        raise LayerError(f"needs {what}, but gets a vector of {show_shape(s)} "
                         f"(put it before dense/flatten)")


__all__ = ["Layer", "LayerError", "P", "show_shape", "from_written", "need_map", "TRAINABLE", "BIAS", "biased"]
