"""batchnorm(momentum=0.9, eps=1e-5, trainable=true): normalise each channel (or feature) with the batch
statistics in training and running averages in evaluation, then scale and shift (2 learned
parameters per channel). Shape unchanged.

Channels are the last axis (maps are NHWC), so both maps and vectors are an (M, C) matrix with
statistics per column. Training normalises with the biased batch variance and updates the
running averages r = momentum*r + (1-momentum)*batch with the unbiased one (as PyTorch).

Kernels: the column sums are reductions over rows, so each parallel chunk of rows sums into its
own row of partials, merged serially (no races); partials are float64 because a chunk may hold
many thousand rows. Backward recomputes x-hat from x instead of keeping a second copy."""
import numpy as np

from ..jit import kernel, prange
from ..layers import register
from .base import TRAINABLE, Layer, P

CHUNKS = 64   # parallel row chunks for the column reductions


@register("batchnorm", aliases=("bn",))
class BatchNorm(Layer):
    params = (P("momentum", "float", 0.9, lo=0.0, hi=1.0, hi_open=True),
              P("eps", "float", 1e-5, lo=0.0, lo_open=True), TRAINABLE)
    has_weights = True

    def param_shapes(self, s):
        c = s[0]
        return {"gamma": (c,), "beta": (c,)}

    def new_state(self):
        c = self.in_shape[0]
        return {"mean": np.zeros(c, np.float32), "var": np.ones(c, np.float32)}

    def to_onnx(self, g, x, p, state, extras):
        ins = [x] + [g.const(f"{self.name}.{k}", v) for k, v in
                     (("gamma", p["gamma"]), ("beta", p["beta"]), ("mean", state["mean"]), ("var", state["var"]))]
        return g.op("BatchNormalization", ins, self.name, kind=g.kind[x], epsilon=float(self.args["eps"]))

    def forward(self, x, p, ctx, training):
        c = x.shape[-1]
        x2 = x.reshape(-1, c)
        m = x2.shape[0]
        st = ctx["state"]
        eps = self.args["eps"]
        world = ctx.get("world")
        if ctx.get("frozen"):   # gradients in evaluation mode (focus --gradcam): running statistics
            training = False
        if training and world is not None:   # data-parallel ranks: the global batch's statistics
            mean, var, m = _global_stats(world, x2)
            ctx["count"] = m
        if training and world is None:
            mean = np.empty(c, np.float64)
            var = np.empty(c, np.float64)
            _bn_stats(x2, mean, var, min(CHUNKS, m))
        if training:
            mom = self.args["momentum"]
            unbiased = var * (m / (m - 1)) if m > 1 else var
            st["mean"][...] = mom * st["mean"] + (1.0 - mom) * mean
            st["var"][...] = mom * st["var"] + (1.0 - mom) * unbiased
        else:
            mean = st["mean"].astype(np.float64)
            var = st["var"].astype(np.float64)
        inv = 1.0 / np.sqrt(var + eps)
        scale = (p["gamma"] * inv).astype(np.float32)
        shift = (p["beta"] - mean * scale).astype(np.float32)
        y = np.empty_like(x)
        _bn_affine(x2, scale, shift, y.reshape(-1, c))
        ctx["x"], ctx["training"] = x, training
        ctx["mean"], ctx["inv"] = mean.astype(np.float32), inv.astype(np.float32)
        return y

    def backward(self, dy, p, g, ctx, need_dx):
        x = ctx["x"]
        c = x.shape[-1]
        x2, dy2 = x.reshape(-1, c), dy.reshape(-1, c)
        m = x2.shape[0]
        mean, inv = ctx["mean"], ctx["inv"]
        sdy = np.empty(c, np.float64)
        sdyx = np.empty(c, np.float64)
        _bn_bwd_sums(x2, dy2, mean, inv, sdy, sdyx, min(CHUNKS, m))
        g["beta"][...] = sdy
        g["gamma"][...] = sdyx
        if not need_dx:
            return None
        dx = np.empty_like(x)
        scale = (p["gamma"] * inv).astype(np.float32)
        if ctx["training"]:
            # dx = gamma*inv * (dy - mean(dy) - xhat * mean(dy * xhat)), means over the batch
            # (over the global batch on data-parallel ranks: the sums are reduced first)
            if ctx.get("world") is not None:
                both = ctx["world"].allreduce(np.concatenate([sdy, sdyx]))
                sdy, sdyx, m = both[:c], both[c:], ctx["count"]
            _bn_dx(x2, dy2, mean, inv, scale, (sdy / m).astype(np.float32),
                   (sdyx / m).astype(np.float32), dx.reshape(-1, c))
        else:  # running statistics are constants
            np.multiply(dy, scale, out=dx)
        return dx


def _global_stats(world, x2):
    """(mean, biased variance, count) per column over every rank's rows, two passes as
    _bn_stats (float64 sums: the exact mean first, then the squared deviations from it)."""
    c = x2.shape[1]
    s = world.allreduce(np.concatenate([x2.sum(axis=0, dtype=np.float64), [float(x2.shape[0])]]))
    m = int(s[c])
    mean = s[:c] / m
    d = x2 - mean.astype(np.float32)
    var = world.allreduce(np.einsum("ij,ij->j", d, d, dtype=np.float64)) / m
    return mean, var, m


# ------------------------------------------------------------------------------------ kernels
@kernel
def _bn_stats(x, mean, var, chunks):
    """Column mean and biased variance of x (M, C), two passes, float64 partials per chunk."""
    m, c = x.shape
    part = np.zeros((chunks, c), np.float64)
    for t in prange(chunks):
        for r in range(m * t // chunks, m * (t + 1) // chunks):
            for k in range(c):
                part[t, k] += x[r, k]
    for k in range(c):
        acc = 0.0
        for t in range(chunks):
            acc += part[t, k]
        mean[k] = acc / m
    part[:, :] = 0.0
    for t in prange(chunks):
        for r in range(m * t // chunks, m * (t + 1) // chunks):
            for k in range(c):
                d = x[r, k] - mean[k]
                part[t, k] += d * d
    for k in range(c):
        acc = 0.0
        for t in range(chunks):
            acc += part[t, k]
        var[k] = acc / m


@kernel
def _bn_affine(x, scale, shift, y):
    """y = x * scale + shift, per column."""
    m, c = x.shape
    for r in prange(m):
        for k in range(c):
            y[r, k] = x[r, k] * scale[k] + shift[k]


@kernel
def _bn_bwd_sums(x, dy, mean, inv, sdy, sdyx, chunks):
    """Column sums of dy and of dy * xhat, xhat = (x - mean) * inv."""
    m, c = x.shape
    p1 = np.zeros((chunks, c), np.float64)
    p2 = np.zeros((chunks, c), np.float64)
    for t in prange(chunks):
        for r in range(m * t // chunks, m * (t + 1) // chunks):
            for k in range(c):
                d = dy[r, k]
                p1[t, k] += d
                p2[t, k] += d * ((x[r, k] - mean[k]) * inv[k])
    for k in range(c):
        a = 0.0
        b = 0.0
        for t in range(chunks):
            a += p1[t, k]
            b += p2[t, k]
        sdy[k] = a
        sdyx[k] = b


@kernel
def _bn_dx(x, dy, mean, inv, scale, mdy, mdyx, dx):
    m, c = x.shape
    for r in prange(m):
        for k in range(c):
            xh = (x[r, k] - mean[k]) * inv[k]
            dx[r, k] = scale[k] * (dy[r, k] - mdy[k] - xh * mdyx[k])
