"""Optimizers: one class, configured by the train block's optimizer call (sgd, momentum, adam,
adamw, rmsprop), stepping the network's flat parameter buffer in one parallel pass. L2 decay
(added to the gradient) and adamw's decoupled weight_decay (w -= lr * weight_decay * w before
the Adam step, as PyTorch's AdamW) apply to weights only (not biases or batchnorm parameters);
a trainable=false layer's parameters are never moved."""
from __future__ import annotations

import numpy as np

from .jit import flushed, kernel, prange

KINDS = {"sgd": 0, "momentum": 1, "adam": 2, "rmsprop": 3, "adamw": 4}
SERIAL_PARAMS = 1 << 20   # see Optimizer._apply


class Optimizer:
    def __init__(self, net, call, l2=0.0):
        self.net = net
        self.kind = call.name
        self.hyper = dict(call.args)
        self.lr = float(self.hyper["lr"])
        self.l2 = float(l2)
        n = net.flat.size
        self.m = np.zeros(n, np.float32)
        self.v = np.zeros(n, np.float32) if self.kind in ("adam", "adamw", "rmsprop") else np.zeros(1, np.float32)
        self.t = 0
        self.decay = np.zeros(n, np.float32)
        self.live = np.ones(n, np.uint8)   # 0: a trainable=false layer's parameter, never moved
        for l, pname, shape, off in net._spec:
            size = int(np.prod(shape))
            if pname == "w":
                self.decay[off:off + size] = 1.0
            if not getattr(l, "trainable", True):
                self.live[off:off + size] = 0
        self.mask_any = bool(self.decay.any())

    def step(self, lr=None):
        self.t += 1
        lr = self.lr if lr is None else lr
        h = self.hyper
        with flushed():
            self._apply(lr, h)

    def _apply(self, lr, h):
        # below SERIAL_PARAMS the calling thread alone is faster (memory-bound; waking a worker
        # costs more than it saves: Adam over 135k parameters 59 us serial, 107 on 2 threads;
        # 616k 206 / 270; 2M 1,449 / 987)
        step = _step.serial if self.net.flat.size < SERIAL_PARAMS else _step
        step(KINDS[self.kind], self.net.flat, self.net.gflat, self.m, self.v, self.decay, self.live,
              np.float32(lr), np.float32(h.get("mu", 0.0)), np.float32(h.get("beta1", 0.0)),
              np.float32(h.get("beta2", h.get("rho", 0.0))), np.float32(h.get("eps", 1e-8)),
              np.float32(self.l2), np.float32(h.get("weight_decay", 0.0)), self.t)

    def state(self):
        return {"m": self.m, "v": self.v, "t": np.array(self.t, np.int64)}

    def load_state(self, d):
        self.m[...] = d["m"]
        if self.v.size == d["v"].size:
            self.v[...] = d["v"]
        self.t = int(d["t"])


@kernel
def _step(kind, w, g, m, v, decay, live, lr, mu, b1, b2, eps, l2, wd, t):
    """One loop per kind, each without branches (a frozen parameter's new values are selected
    away): the loop with the kind tested and `live` skipped per element did not vectorise (Adam
    over net A's 135k parameters, one thread: 120 -> 51 us)."""
    n = w.shape[0]
    one = np.float32(1.0)
    if kind == 0:
        for i in prange(n):
            on = live[i] != 0
            gi = g[i] + l2 * decay[i] * w[i]
            w[i] = w[i] - lr * gi if on else w[i]
    elif kind == 1:
        for i in prange(n):
            on = live[i] != 0
            gi = g[i] + l2 * decay[i] * w[i]
            mi = mu * m[i] - lr * gi
            m[i] = mi if on else m[i]
            w[i] = w[i] + mi if on else w[i]
    elif kind == 2 or kind == 4:
        # adamw (4): wd = its decoupled weight_decay; adam (2): wd = 0, so the shrink factor is 1
        c1 = one / (one - b1 ** t)
        c2 = one / (one - b2 ** t)
        for i in prange(n):
            on = live[i] != 0
            gi = g[i] + l2 * decay[i] * w[i]
            wi = w[i] * (one - lr * wd * decay[i])
            mi = b1 * m[i] + (one - b1) * gi
            vi = b2 * v[i] + (one - b2) * gi * gi
            m[i] = mi if on else m[i]
            v[i] = vi if on else v[i]
            w[i] = wi - lr * (mi * c1) / (np.sqrt(vi * c2) + eps) if on else w[i]
    else:
        for i in prange(n):
            on = live[i] != 0
            gi = g[i] + l2 * decay[i] * w[i]
            vi = b2 * v[i] + (one - b2) * gi * gi
            v[i] = vi if on else v[i]
            w[i] = w[i] - lr * gi / (np.sqrt(vi) + eps) if on else w[i]


def lr_at(schedule, base_lr: float, step: int, total: int, per_epoch: int) -> float:
    """Learning rate for 0-based `step` of `total`. `schedule` is the train block's CallValue
    (None: constant). warmup counts steps, rising linearly from base/warmup to base; step()'s
    `every` counts epochs; onecycle's learning rate follows PyTorch's OneCycleLR (cosine up from
    max_lr/25 over pct of the steps, cosine down to max_lr/1e4); unlike PyTorch's default, momentum
    and beta1 stay fixed (not cycled)."""
    import math
    if schedule is None:
        return base_lr
    name = schedule.name
    if name == "onecycle":
        peak = schedule["max_lr"] or base_lr
        up = max(1, int(schedule["pct"] * total))
        start, end = peak / 25.0, peak / 1e4
        if step < up:
            return start + (peak - start) * (1 - math.cos(math.pi * step / up)) / 2
        t = (step - up) / max(1, total - up)
        return end + (peak - end) * (1 + math.cos(math.pi * min(1.0, t))) / 2
    warm = schedule.get("warmup", 0) or 0
    if step < warm:
        return base_lr * (step + 1) / warm
    if name == "constant":
        return base_lr
    if name == "step":
        return base_lr * schedule["gamma"] ** (step // (schedule["every"] * max(1, per_epoch)))
    if name == "cosine":
        lo = schedule["min_lr"]
        t = (step - warm) / max(1, total - warm)
        return lo + (base_lr - lo) * (1 + math.cos(math.pi * min(1.0, t))) / 2
    raise AssertionError(name)
