"""The execution plan: the layer list turned into the steps a forward (and backward) pass runs.

Rewrites are decided here, once, from what layers say they can do, never from their kind names:
- a deferred activation: a layer that runs its own act= (`Layer.own_act()`) followed by a max
  window (`Layer.max_window()`) runs linear, and the activation runs after the max instead, when
  it is non-decreasing (`Activation.monotone`): max commutes with such a function, so the output
  is the same and the gradient reaches the same inputs (a window whose maximum is <= 0 passes no
  gradient either way), with the activation on a quarter of the values (measured on net B);
- a pooled layer: a layer that can apply the following max window itself (`Layer.can_pool`:
  conv's planar strategy in evaluation, its gemm strategy and batchnorm in training and
  evaluation) absorbs the
  maxpool step, so its full-size output is never written (in training, its backward takes the
  gradient at the pooled output); its deferred activation (if any) runs on the pooled output;
- an absorbed activation: an activation layer (`Layer.as_post()`) right after a step with no
  activation of its own to apply afterwards runs as that step's `post` (one step less to
  dispatch: net A at batch 1 1.02x, interleaved), unless the step's own output is read by
  another layer or kept;
- taps: the outputs a later layer reads (a branch's input, add(from=...), concat(...)) are saved.
Nothing is rewritten around a layer whose own output is needed: one a later layer reads, or one
the caller keeps (focus). The executor (Net.forward / Net.loss_grad) loops over the steps
through `run_forward` / `run_backward`; `Timer` wraps those two to time each layer (bench)."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

from . import layers as registry
from .layers.activations import act_backward, act_forward

LINEAR = ("linear", 0.0)


@dataclass(frozen=True)
class Step:
    index: int                 # the layer's position in Net.layers
    layer: object              # the Layer that runs
    act: tuple | None = None   # (kind, alpha) the layer runs instead of its own act= (LINEAR: deferred)
    pool: tuple | None = None  # (size, stride, PH, PW): the max window the layer applies itself
    absorbs: object = None     # the layer whose work `pool` does (it runs no step of its own)
    post: tuple | None = None  # (kind, alpha): an activation applied to this step's output
    feed: int | None = None    # index of the layer whose output is this step's input, when it is
                               # not the step before (a branch; -1: the network input)
    extras: tuple = ()         # indices of the layers whose outputs it also reads (add, concat)
    save: bool = False         # keep this step's output: a later step reads it (feed or extras)
    tail: object = None        # the activation layer whose work `post` does (no step of its own)

    @property
    def out_index(self):
        """The index of the layer whose output this step produces."""
        return self.index + (self.absorbs is not None) + (self.tail is not None)

    @property
    def out_name(self):
        return (self.tail or self.absorbs or self.layer).name

    @property
    def fused(self):
        return self.act is not None or self.pool is not None or self.post is not None

    def describe(self):
        """'conv1 + maxpool1 -> relu' style text: what this step does."""
        s = self.layer.name
        if self.act is not None:
            s += f" ({self.act[0]})"
        if self.absorbs is not None:
            s += f" + {self.absorbs.name}"
        if self.post is not None:
            s += f" -> {self.post[0]}"
        if self.tail is not None:
            s += f" ({self.tail.name})"
        return s


@dataclass(frozen=True)
class Plan:
    steps: tuple
    save_input: bool           # a later step reads the network input

    def deferred(self):
        """Names of the layers whose activation runs after the next step's max window."""
        return [s.layer.name for s in self.steps if s.act == LINEAR]

    def pooled(self):
        """{layer name: maxpool name} of the layers that apply the next maxpool themselves."""
        return {s.layer.name: s.absorbs.name for s in self.steps if s.absorbs is not None}

    def tails(self):
        """{layer name: activation layer name} of the steps that apply the next activation layer."""
        return {s.layer.name: s.tail.name for s in self.steps if s.tail is not None}

    def describe(self):
        return [s.describe() for s in self.steps]


def monotone(act):
    """Whether an activation (kind, alpha) is non-decreasing, so it commutes with max."""
    cls = registry.lookup(act[0], False)
    return bool(cls is not None and cls.monotone_for(act[1]))


def build(layers, training, n, keep=(), fuse=True):
    """The plan for running `layers` (the loss layer excluded) on a batch of n samples.
    keep: names of layers whose own outputs the caller wants whole (no rewrite may hide them)."""
    def at(layer):
        return -1 if layer.role == "input" else layers.index(layer)

    feeds = {k: at(l.feed) for k, l in enumerate(layers) if l.feed is not None}
    extras = {k: tuple(at(m) for m in l.inputs()) for k, l in enumerate(layers) if l.inputs()}
    tapped = set(feeds.values()) | {e for es in extras.values() for e in es}
    keep = set(keep or ())
    steps = []
    post = None   # an activation deferred by the step before, for this one

    def absorb(step):
        """The step with the activation layer after its output as its post, if it can take it."""
        j = step.out_index + 1
        tail = layers[j] if fuse and step.post is None and j < len(layers) else None
        act = tail.as_post() if tail is not None else None
        if act is None or step.out_index in tapped or step.out_name in keep or j in feeds or j in extras:
            return step
        return replace(step, post=act, tail=tail, save=j in tapped)

    i = 0
    while i < len(layers):
        l = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        act = l.own_act()
        window = nxt.max_window() if nxt is not None else None
        free = (fuse and window is not None and i not in tapped and l.name not in keep
                and i + 1 not in feeds)   # the next layer reads this one
        defer = free and act is not None and act != LINEAR and monotone(act)
        if free and (defer or act is None or act == LINEAR) and l.can_pool(n, training, window):
            _, ph, pw = nxt.out
            steps.append(absorb(Step(i, l, act=None if act is None else LINEAR, pool=(window[0], window[1], ph, pw),
                                     absorbs=nxt, post=act if defer else None, feed=feeds.get(i),
                                     extras=extras.get(i, ()), save=i + 1 in tapped)))
            i = steps[-1].out_index + 1
            post = None
            continue
        step = Step(i, l, act=LINEAR if defer else None, post=post, feed=feeds.get(i),
                    extras=extras.get(i, ()), save=i in tapped)
        steps.append(step if defer else absorb(step))
        post = act if defer else None
        i = steps[-1].out_index + 1
    return Plan(tuple(steps), -1 in tapped)


# ------------------------------------------------------------------------------------ executor
def run_forward(step, x, params, ctx, post, training):
    """One step forward. `post` is the executor's dict for this step's deferred activation."""
    l = step.layer
    if step.act is None and step.pool is None:
        y = l.forward(x, params, ctx, training)
    elif not training and step.act == LINEAR and step.pool is not None and step.post is not None:
        # evaluation: the deferred activation goes back to the layer, which applies it after
        # its max window all the same (conv: in the same kernel where it can); one call less
        return l.forward_fused(x, params, ctx, False, step.post, step.pool)
    else:
        y = l.forward_fused(x, params, ctx, training, step.act or l.own_act(), step.pool)
    if step.post is not None:
        kind, alpha = step.post
        z, y = y, act_forward(kind, alpha, y)   # a fresh output (see activations.act_forward)
        if training:
            post["z"], post["y"] = z, y
    return y


def run_backward(step, dy, params, grads, ctx, post, need_dx):
    if step.post is not None:
        dy = act_backward(step.post[0], step.post[1], post["z"], post["y"], dy)
    return step.layer.backward(dy, params, grads, ctx, need_dx)


class Timer:
    """Times each layer's forward and backward while installed on a Net:
        with Timer(net) as t: net.loss_grad(x, y)
        t.times  # {layer name: [forward seconds, backward seconds]}"""

    def __init__(self, net):
        self.net = net
        self.times = {}

    def __enter__(self):
        net, times = self.net, self.times
        fwd, bwd = net.run_forward, net.run_backward

        def timed_forward(step, *a):
            t0 = time.perf_counter()
            y = fwd(step, *a)
            times.setdefault(step.layer.name, [0.0, 0.0])[0] += time.perf_counter() - t0
            return y

        def timed_backward(step, *a):
            t0 = time.perf_counter()
            d = bwd(step, *a)
            times.setdefault(step.layer.name, [0.0, 0.0])[1] += time.perf_counter() - t0
            return d

        self._old = (fwd, bwd)
        net.run_forward, net.run_backward = timed_forward, timed_backward
        return self

    def __exit__(self, *exc):
        self.net.run_forward, self.net.run_backward = self._old
