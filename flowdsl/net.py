"""A built model with weights: forward, backward, predict, focus, save/load.

All parameters live in one flat float32 buffer (and gradients in another); each layer's
parameters are views into it, so an optimizer step is one pass over one array and a checkpoint
is a dict of named views."""
from __future__ import annotations

import math
import time

import numpy as np

from .errors import FlowError
from .layers.base import show_shape


class Net:
    def __init__(self, model, seed: int | None = None):
        from . import jit
        jit.numba()  # configure threads/cache before any kernel runs
        self.model = model
        self.layers = [l for l in model.layers if l.role != "input"]
        self.loss_layer = model.layers[-1]
        self._spec = []  # (layer, pname, shape, offset)
        off = 0
        for l in self.layers:
            for pname, shape in l.param_shapes(l.in_shape).items():
                self._spec.append((l, pname, tuple(shape), off))
                off += math.prod(shape)
        _check_room(model, self._spec, off)
        self.flat = np.zeros(off, np.float32)
        self.gflat = np.zeros(off, np.float32)
        self.params = {l.name: {} for l in self.layers}
        self.grads = {l.name: {} for l in self.layers}
        for l, pname, shape, o in self._spec:
            n = math.prod(shape)
            self.params[l.name][pname] = self.flat[o:o + n].reshape(shape)
            self.grads[l.name][pname] = self.gflat[o:o + n].reshape(shape)
        self.state = {l.name: l.new_state() for l in self.layers}
        # skip connections (add): layer index -> index of the layer whose output it adds (-1: the
        # network input); the forward pass keeps those outputs
        index = {id(l): k for k, l in enumerate(self.layers)}
        self._src = {k: (-1 if l.src.role == "input" else index[id(l.src)])
                     for k, l in enumerate(self.layers) if getattr(l, "src", None) is not None}
        self._tapped = set(self._src.values())
        self._defer = _deferred_acts(self.layers, self._tapped)
        self._pools = _fusable_pools(self.layers, self._tapped, self._defer)
        self.rng = np.random.default_rng()  # dropout masks; reseeded by initialise()
        self.timer = None  # {layer name: [forward seconds, backward seconds]} when profiling
        self.initialise(model.train["seed"] if seed is None else seed)

    # --- parameters ------------------------------------------------------------------------------
    def initialise(self, seed):
        rng = np.random.default_rng(seed)
        self.rng = np.random.default_rng([seed, 1])
        inits = self.model.init
        for i, l in enumerate(self.layers):
            if not l.param_shapes(l.in_shape):
                continue
            init = inits.get(l.name, inits.get("default"))
            he = _before_relu(self.layers, i)
            for pname, arr in l.init_params(rng, init, he).items():
                self.params[l.name][pname][...] = arr
            self.state[l.name] = l.new_state()

    def named_params(self):
        """{'layer.param': array view} for every learned parameter."""
        return {f"{l.name}.{p}": self.params[l.name][p] for l, p, _, _ in self._spec}

    def named_state(self):
        return {f"{ln}.{k}": v for ln, st in self.state.items() for k, v in st.items()}

    # --- input -----------------------------------------------------------------------------------
    def as_input(self, x) -> np.ndarray:
        """Accept (N,H,W,C) or (N,C,H,W) (or (H,W,C) for one image); return float32 NHWC."""
        s = self.model.input_shape
        x = np.asarray(x)
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / np.float32(255)
        if len(s) == 3:
            c, h, w = s
            if x.shape == (h, w, c) or x.shape == (c, h, w):
                x = x[None]
            if x.ndim == 4 and x.shape[1:] == (h, w, c):
                pass
            elif x.ndim == 4 and x.shape[1:] == (c, h, w):
                x = x.transpose(0, 2, 3, 1)
            elif x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
                x = x[..., None]
            else:
                raise FlowError(f"input of shape {x.shape} does not fit the network input {show_shape(s)} "
                                f"(give (N, {h}, {w}, {c}) or (N, {c}, {h}, {w}))")
        else:
            x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[None]
            if x.shape[1] != s[0]:
                raise FlowError(f"input of {x.shape[1]} values does not fit the network input {s[0]}")
        return np.ascontiguousarray(x, dtype=np.float32)

    # --- forward / backward ----------------------------------------------------------------------
    def forward(self, x, training=False, keep=None):
        """Run the network up to (not through) the loss. Returns the last output (class scores).
        keep: a set of layer names whose outputs to return as well, as a dict."""
        x = self.as_input(x)
        self._ctx = []
        kept = {}
        saved = {-1: x} if -1 in self._tapped else {}
        post = None
        fused = None  # the maxpool whose work the conv before it did (evaluation)
        for i, l in enumerate(self.layers[:-1]):
            if l is fused:
                if i in self._tapped:
                    saved[i] = x
                if keep and l.name in keep:
                    kept[l.name] = x
                continue
            ctx = {"state": self.state[l.name], "rng": self.rng}
            if i in self._src:
                ctx["skip"] = saved[self._src[i]]
            if post is not None:      # this maxpool applies the conv's deferred activation
                ctx["post_act"], post = post, None
            if not training and i in self._pools and not (keep and l.name in keep) \
                    and l.pools_for(x.shape[0]):   # the conv pools, then activates, itself
                ctx["pool"], fused = self._pools[i], self.layers[i + 1]
            elif i in self._defer and not (keep and l.name in keep):
                ctx["act"], post = ("linear", 0.0), self._defer[i]
            if self.timer is not None:
                t0 = time.perf_counter()
                x = l.forward(x, self.params[l.name], ctx, training)
                self.timer.setdefault(l.name, [0.0, 0.0])[0] += time.perf_counter() - t0
            else:
                x = l.forward(x, self.params[l.name], ctx, training)
            if i in self._tapped:
                saved[i] = x
            if training:
                self._ctx.append(ctx)
            if keep and l.name in keep:
                kept[l.name] = x
        return (x, kept) if keep is not None else x

    def loss_grad(self, x, y):
        """One training forward and backward pass: gradients land in self.grads.
        Returns (loss, number correct)."""
        z = self.forward(x, training=True)
        loss, dz, correct = self.loss_layer.loss(z, np.asarray(y))
        d = dz
        n = len(self.layers) - 1
        pending = {}  # layer index -> gradient reaching its output through skip connections
        for i in range(n - 1, -1, -1):
            l = self.layers[i]
            if i in pending:
                d = d + pending.pop(i)
            t0 = time.perf_counter()
            d = l.backward(d, self.params[l.name], self.grads[l.name], self._ctx[i], need_dx=i > 0)
            if self.timer is not None:
                self.timer.setdefault(l.name, [0.0, 0.0])[1] += time.perf_counter() - t0
            j = self._src.get(i, -1)
            if j >= 0:
                ds = self._ctx[i].pop("dskip")
                pending[j] = ds if j not in pending else pending[j] + ds
        self._ctx = []
        return loss, correct

    def predict(self, x, batch=256, tta=None):
        """Probabilities (softmax) or outputs (squared) for every sample, in evaluation mode.
        tta="hflip": test-time augmentation, the mean of the outputs for each image and its
        mirror image."""
        check_tta(tta, self.model.input_shape)
        x = self.as_input(x)
        outs = []
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch]
            out = self.loss_layer.forward(self.forward(xb), None, {}, False)
            if tta == "hflip":
                out = (out + self.loss_layer.forward(self.forward(xb[:, :, ::-1]), None, {}, False)) / np.float32(2)
            outs.append(out)
        return np.concatenate(outs) if outs else np.zeros((0,) + self.loss_layer.out, np.float32)

    def focus(self, name, x, png_dir=None, names=None):
        """Activations of the named layer for input x: (N, H, W, C) for maps, (N, D) for vectors.
        With png_dir, also write them as PNGs (flowdsl.focus); `names` label the inputs."""
        try:
            layer = self.model.layer(name)
        except KeyError:
            raise FlowError(f"no layer named '{name}'; layers: {', '.join(self.model.names())}") from None
        if layer.role == "input":
            acts = self.as_input(x)
        elif layer is self.loss_layer:
            acts = self.predict(x)
        else:
            _, kept = self.forward(x, keep={layer.name})
            acts = kept[layer.name]
        if png_dir is not None:
            from .focus import write_pngs
            write_pngs(layer, acts, png_dir, names)
        return acts

    def fit(self, x, y=None, epochs=None, batch=None, test=None, **kw):
        """Train on arrays (x: (N,H,W,C) or (N,C,H,W); y: int labels) or on a data source
        (x = a .flow source string such as 'fashion_mnist("train")', y = None). Settings not
        given come from the model's train block. Returns the History (history["test_acc"], ...)."""
        from .train import fit
        t = self.model.train
        if isinstance(x, str):
            from .jobs import base_dir, parse_source
            from .data import load_source
            ds = load_source(parse_source(x, self.model), base_dir(self.model), self.model.input_shape)
            x, y = ds.x, ds.y
            kw.setdefault("classes", ds.classes)
        x = self.as_input(x)
        if y is None:
            raise FlowError("fit needs labels y (or a data source string as x)")
        y = np.asarray(y)
        if test is not None:
            test = (self.as_input(test[0]), np.asarray(test[1]))
        defaults = dict(iterations=t["iterations"] if epochs is None else None, optimizer=t["optimizer"],
                        schedule=t["schedule"], l2=t["l2"], seed=t["seed"], augment=t["augment"],
                        patience=t["patience"], verbose=0)
        defaults.update(kw)
        if epochs is None and defaults["iterations"] is None:
            epochs = t["epochs"] or 1
        batch = batch or t["batch"]
        from .jobs import _check_memory
        _check_memory(self.model, max(1, min(int(batch), len(x))), option="batch=")
        return fit(self, x, y, test, epochs=epochs, batch=batch, **defaults)

    def evaluate(self, x, y, batch=256):
        """{'loss', 'acc', 'confusion'} on arrays."""
        from .train import evaluate
        return evaluate(self, self.as_input(x), np.asarray(y), batch)

    def summary(self):
        return self.model.summary()

    def __str__(self):
        return str(self.model)

    # --- weights ---------------------------------------------------------------------------------
    def save(self, path, extra=None):
        from .checkpoint import save
        save(self, path, extra or {})

    def load_weights(self, path):
        from .checkpoint import load_into
        return load_into(self, path)


def _check_room(model, spec, n):
    """Refuse, before allocating, parameters that cannot fit in memory: a dense layer after a
    large map can hold billions of weights. Needs the parameter and gradient buffers (float32)
    and, while initialising, the largest parameter in float64."""
    from .errors import size_text
    from .jobs import available_memory
    largest = max(spec, key=lambda t: math.prod(t[2]), default=None)
    need = 8 * n + (8 * math.prod(largest[2]) if largest else 0)
    avail = available_memory()
    if avail and need > avail:
        l, pname = largest[0], largest[1]
        raise FlowError(f"the model has {n:,} weights: its parameters and gradients need {size_text(8 * n)} "
                        f"({size_text(need)} while initialising), but only {size_text(avail)} of memory is available. "
                        f"The largest is {l.name}.{pname} with {math.prod(largest[2]):,} weights "
                        f"({l.describe()} after {show_shape(l.in_shape)}); make it smaller", model.file)


TTA = ("hflip",)


def check_tta(tta, input_shape):
    """Refuse an unknown test-time augmentation, or hflip for vector input."""
    if tta is None:
        return
    if tta not in TTA:
        raise FlowError(f"unknown test-time augmentation '{tta}' (choose from {', '.join(TTA)})")
    if len(input_shape) != 3:
        raise FlowError(f"test-time augmentation {tta} needs image input; the model input is a vector "
                        f"of {input_shape[0]}")


def _deferred_acts(layers, tapped=()):
    """{i: (kind, alpha)} for conv layers whose relu (or leakyrelu with alpha >= 0) can run after
    the maxpool that follows them: max commutes with a non-decreasing function, so the output is
    the same and the gradient reaches the same inputs (a window whose maximum is <= 0 passes no
    gradient either way), with the activation on a quarter of the values. Measured on net B.
    The conv's own output is then pre-activation, so forward(keep=...) keeps kept layers whole,
    and a conv whose output a skip connection adds (tapped) is left alone."""
    from .layers.activations import act_spec
    out = {}
    for i, l in enumerate(layers[:-1]):
        if l.kind != "conv" or layers[i + 1].kind != "maxpool" or i in tapped:
            continue
        kind, alpha = act_spec(l)
        if kind == "relu" or (kind == "leakyrelu" and alpha >= 0):
            out[i] = (kind, alpha)
    return out


def _fusable_pools(layers, tapped, defer):
    """{i: (size, stride, act, alpha, PH, PW)} for convs that can pool their own output in
    evaluation (Conv.pools_for): the maxpool that follows runs inside the conv's kernel, then
    the conv's activation if it is deferred (act 1: relu, 2: leakyrelu) or none; the full-size
    output is never written. Not when something else reads the conv's output (a skip
    connection) or the activation does not commute with max."""
    from .layers.activations import act_spec
    out = {}
    for i, l in enumerate(layers[:-1]):
        if not hasattr(l, "pools_for") or layers[i + 1].kind != "maxpool" or i in tapped:
            continue
        kind, alpha = act_spec(l)
        if i in defer:
            act = 1 if kind == "relu" else 2
        elif kind == "linear":
            act = 0
        else:
            continue
        m = layers[i + 1]
        out[i] = (m.size, m.stride, act, alpha, m.out[1], m.out[2])
    return out


def _before_relu(layers, i):
    """he init before relu/gelu (the layer's own act= or the next layer), glorot otherwise."""
    l = layers[i]
    act = l.args.get("act")
    if act is not None and act.name in ("relu", "gelu", "leakyrelu", "elu"):
        return True
    nxt = layers[i + 1] if i + 1 < len(layers) else None
    return nxt is not None and nxt.kind in ("relu", "gelu", "leakyrelu", "elu")
