"""A built model with weights: forward, backward, predict, focus, save/load.

All parameters live in one flat float32 buffer (and gradients in another); each layer's
parameters are views into it, so an optimizer step is one pass over one array and a checkpoint
is a dict of named views."""
from __future__ import annotations

import copy
import math
import pickle
import threading

import numpy as np

from . import forked, plan
from .errors import FlowError
from .jit import flushed
from .layers import lookup
from .layers.base import show_shape
from .memory import check_parameters, check_training, data_budget


SPLIT_EVAL = True   # evaluation passes: each thread runs the whole net on its share (_split_forward)
SPLIT_TRAIN = True  # training passes: each thread (on Linux, helper process: flowdsl/forked.py)
                    # runs forward, loss and backward on its share (_split_loss_grad)


def _same_generator(g):
    """A numpy Generator in g's state (copy.deepcopy took 80 us here, this 30)."""
    return generator_from_state(g.bit_generator.state)


def generator_from_state(state):
    """A numpy Generator whose bit generator has this state (a bit_generator.state dict)."""
    bits = getattr(np.random, state["bit_generator"])(0)
    bits.state = state
    return np.random.Generator(bits)


class Net:
    def __init__(self, model, seed: int | None = None, fuse: bool = True):
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
        check_parameters(model, self._spec, off)
        # in shared memory: split training's helper processes read the one and add into the
        # other (flowdsl/forked.py)
        self.flat = forked.shared_zeros(off)
        self.gflat = forked.shared_zeros(off)
        self.params = self._views(self.flat)
        self.grads = self._views(self.gflat)
        self._shares, self._states, self._fits = [None], [], {}   # split training's (lazily made)
        self._crew = None          # split training's helper processes (forked.Crew), when forked
        self._no_fork = False      # set when forking them failed: the shares run in threads
        self.state = {l.name: l.new_state() for l in self.layers}
        self.fuse = fuse           # False: run every layer as written (a reference for tests)
        self._plans = {}
        self.run_forward, self.run_backward = plan.run_forward, plan.run_backward  # Timer wraps them
        self.rng = np.random.default_rng()  # dropout masks; reseeded by initialise()
        self.world = None          # flowdsl.dist world while training on several ranks
        self.batch_rows = None     # (positions of this rank's samples in the global batch, its size)
        self.initialise(model.train["seed"] if seed is None else seed)

    # --- parameters ------------------------------------------------------------------------------
    def _views(self, flat):
        """{layer: {param: view of flat}}, laid out as self._spec says."""
        views = {l.name: {} for l in self.layers}
        for l, pname, shape, o in self._spec:
            views[l.name][pname] = flat[o:o + math.prod(shape)].reshape(shape)
        return views

    def initialise(self, seed):
        rng = np.random.default_rng(seed)
        self.rng = np.random.default_rng([seed, 1])
        inits = self.model.init
        for i, l in enumerate(self.layers):
            if not l.param_shapes(l.in_shape):
                continue
            init = inits.get(l.name, inits.get("default"))
            he = _he_default(self.layers, i)
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
        """Accept (N,H,W,C) or (N,C,H,W) (or (H,W,C) for one image); return float32 NHWC,
        checked to be finite."""
        x = self._layout(x)
        from .data import check_finite
        check_finite(x)
        return x

    def _layout(self, x) -> np.ndarray:
        """as_input without the finite check: the input as C-contiguous float32 NHWC, or a
        FlowError naming the shapes it takes. The kernels index by the network's shapes and
        trust them: an input of another shape would write outside their buffers."""
        s = self.model.input_shape
        if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == len(s) + 1 \
                and x.shape[1:] == (tuple(s[1:]) + s[:1] if len(s) == 3 else tuple(s)):
            return x   # already as the kernels want it (every training step's batch)
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

    def _targets(self, y, n):
        """loss_grad's targets checked against the loss: n labels in 0..classes-1 (or, for a
        regression loss, n outputs' values), else a FlowError (a stray label would index past
        the loss's rows)."""
        y = np.asarray(y)
        out = self.loss_layer.out
        if getattr(self.loss_layer, "targets", "labels") != "labels":
            if y.size != n * math.prod(out):
                raise FlowError(f"targets of shape {y.shape} do not fit {n} samples of {show_shape(out)} outputs")
            return y
        if y.shape != (n,) or y.dtype.kind not in "iu":
            raise FlowError(f"labels must be {n} integers (one per sample); received an array of shape {y.shape} "
                            f"and type {y.dtype}")
        if n and (int(y.min()) < 0 or int(y.max()) >= out[0]):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise FlowError(f"label {bad} is out of range for a model with {out[0]} classes (labels must be "
                            f"0..{out[0] - 1})")
        return y

    # --- forward / backward ----------------------------------------------------------------------
    def plan(self, training, n, keep=()):
        """The execution plan (flowdsl.plan) for a batch of n samples."""
        key = (training, n, frozenset(keep or ()))
        p = self._plans.get(key)
        if p is None:
            if len(self._plans) > 64:
                self._plans.clear()
            p = self._plans[key] = plan.build(self.layers[:-1], training, n, keep, self.fuse)
        return p

    def forward(self, x, training=False, keep=None):
        """Run the network up to (not through) the loss. Returns the last output (class scores).
        keep: a set of layer names whose outputs to return as well, as a dict."""
        return self._forward(self.as_input(x), training, keep)

    def _forward(self, x, training=False, keep=None):
        """forward of an input as_input has already checked and converted."""
        if not training and not keep and x.shape[0] > 1 and SPLIT_EVAL:
            y = self._split_forward(x)
            if y is not None:
                self._trace = []
                return (y, {}) if keep is not None else y
        steps = self.plan(training, x.shape[0], keep).steps
        dist = self.world if training and self.world is not None and self.world.size > 1 else None
        # batchnorm's statistics and dropout's masks span the global batch on data-parallel ranks
        extra = {"world": dist, "rows": self.batch_rows} if dist is not None else {}
        y, kept, trace = self._run(steps, x, training, extra, keep)
        self._trace = trace if training else []
        return (y, kept) if keep is not None else y

    def _split_forward(self, x):
        """An evaluation pass with each thread running the whole network on its own share of
        the batch (blas.split), or None when the batch is too small for it. Every layer in
        evaluation treats samples independently, so the shares' outputs are the batch's."""
        from . import blas
        n = x.shape[0]
        work = n * self.macs_per_sample()
        t = blas.split_threads(n)
        # a Timer (per-layer times) keeps the pass on one thread
        if t <= 1 or work < blas.SPLIT_MIN or self.run_forward is not plan.run_forward:
            return None
        c = blas.cuts(n, t)   # the plans are built here, not on the pool's threads
        plans = {hi - lo: self.plan(False, hi - lo).steps for lo, hi in zip(c, c[1:])}
        outs = blas.split(n, lambda lo, hi: self._run(plans[hi - lo], x[lo:hi], False)[0], work)
        return None if outs is None else np.concatenate(outs)

    def macs_per_sample(self):
        """About how many multiply-adds one sample's forward pass takes: each layer's parameters
        times its output positions, plus its output values (elementwise work)."""
        m = getattr(self, "_macs", None)
        if m is None:
            m = 0
            for l in self.layers:
                out = getattr(l, "out", None) or ()
                size = math.prod(out) if out else 0
                positions = math.prod(out[1:]) if len(out) == 3 else 1
                m += sum(math.prod(sh) for sh in l.param_shapes(l.in_shape).values()) * positions + size
            self._macs = m
        return m

    def _run(self, steps, x, training, extra=None, keep=None, stop_after=None, states=None):
        """The forward loop over a plan's steps: (last output, {kept name: output}, trace of
        (step, ctx, post) for the backward loop). extra: entries every step's ctx gets;
        stop_after: the name of the step to end at; states: the layers' running state to use
        (default self.state)."""
        with flushed():   # denormals as zero while flowdsl computes (jit.flushed)
            return self._run_steps(steps, x, training, extra, keep, stop_after, states or self.state)

    def _run_steps(self, steps, x, training, extra, keep, stop_after, states):
        saved, kept, trace = {-1: x}, {}, []
        for st in steps:
            ctx = {"state": states[st.layer.name], "rng": self.rng, **(extra or {})}
            if st.feed is not None:   # a branch: its input is an earlier output
                x = saved[st.feed]
            if st.extras:
                ctx["extras"] = [saved[e] for e in st.extras]
            post = {}
            x = self.run_forward(st, x, self.params[st.layer.name], ctx, post, training)
            if st.save:
                saved[st.out_index] = x
            if keep and st.out_name in keep:
                kept[st.out_name] = x
            if training:
                trace.append((st, ctx, post))
            if stop_after is not None and st.out_name == stop_after:
                break
        return x, kept, trace

    def _back(self, trace, d, grads, seen=(), dinput=None):
        """The backward loop over a forward trace from d, the gradient at its last output.
        grads(layer name) -> the dict the layer writes its parameter gradients into. Returns
        {name in seen: the gradient reaching that step's output}; with dinput (an array the
        input's shape), the input's gradient is added into it (else it is never computed)."""
        with flushed():
            return self._back_steps(trace, d, grads, seen, dinput)

    def _back_steps(self, trace, d, grads, seen, dinput):
        # pending: layer index -> the gradient reaching its output so far (from the step after
        # it, from branches that start from it, from the layers that add or join it); -1 is the
        # network input
        pending, got = ({trace[-1][0].out_index: d} if trace else {}), {}
        for k in range(len(trace) - 1, -1, -1):
            st, ctx, post = trace[k]
            d = pending.pop(st.out_index)
            if st.out_name in seen:
                got[st.out_name] = d
            src = st.feed if st.feed is not None else (trace[k - 1][0].out_index if k > 0 else -1)
            name = st.layer.name
            dx = self.run_backward(st, d, self.params[name], grads(name), ctx, post,
                                   src >= 0 or dinput is not None)
            for i, g in [(src, dx)] + list(zip(st.extras, ctx.pop("dextras", ()))):
                if i >= 0:
                    pending[i] = g if i not in pending else pending[i] + g
                elif dinput is not None:
                    dinput += g
        return got

    def loss_grad(self, x, y, total=None):
        """One training forward and backward pass: gradients land in self.grads.
        Returns (loss, number correct). total: the global batch this batch is part of (data-
        parallel ranks): the gradients are then this batch's share of the global mean, so that
        summing them over the ranks gives one process's gradient. x: as forward takes it; not
        checked to be finite (fit checks its data once; a NaN input gives a NaN loss)."""
        x = self._layout(x)
        y = self._targets(y, x.shape[0])
        got = self._split_loss_grad(x, y, total) if SPLIT_TRAIN else None
        if got is not None:
            return got
        z = self._forward(x, training=True)
        loss, d, correct = self.loss_layer.loss(z, y)
        if total is not None and total != len(z):
            d = d * np.float32(len(z) / total)
        trace, self._trace = self._trace, []
        self._back(trace, d, self.grads.__getitem__)
        return loss, correct

    def _split_loss_grad(self, x, y, total):
        """loss_grad with each thread running the whole pass on its own share of the batch
        (blas.split), or None when the batch is too small for it (or a Timer, or MPI ranks,
        are in play). The threads meet only in batchnorm's statistics (a dist.Team: the same
        collectives as data-parallel ranks, so each share normalises with the whole batch's
        statistics) and at the end, where each thread sums its slice of the flat gradient over
        the shares. Dropout draws the whole batch's mask from a copy of the same generator and
        takes its rows, as a rank does; the running statistics are updated once (share 0; the
        others update copies). The result is the one-thread pass's up to float32 rounding: the
        parameter gradients are sums of the shares' partial sums. Against handing every
        layer's work to the threads (two wake-ups a layer), this waits only at the
        collectives, which matters where waking a thread is slow (measurements in
        docs/internals.md, "Split training"). On Linux the shares other than the caller's run
        in forked helper processes (_forked_loss_grad, flowdsl/forked.py) rather than threads:
        the same collectives and sums in the same order, so the same bits, without the two
        threads' contention for the GIL; FLOWDSL_SPLIT=threads keeps threads."""
        from . import blas
        n = x.shape[0]
        t = self.train_shares(n)
        if t <= 1:
            return None
        y = np.asarray(y)
        if self.in_helpers():
            got = self._forked_loss_grad(x, y, total, t)
            if got is not None:   # (None: fork was refused, and the shares run in threads)
                return got
        from .dist import Team
        c = blas.cuts(n, t)
        for lo, hi in zip(c, c[1:]):
            self.plan(True, hi - lo)   # the plans are built here, not on the pool's threads
        grads = self._share_grads(t)
        flats = [self.gflat] + [f for f, _ in grads[1:]]
        dicts = [self.grads] + [d for _, d in grads[1:]]
        rngs = [self.rng] + [_same_generator(self.rng) for _ in range(1, t)]
        states = [self.state] + self._share_states(t)
        gcut = blas.cuts(self.gflat.size, t)
        team = Team(t)
        whole = total or n
        errs = np.geterr()   # (numpy's error state is per thread)

        def run(lo, hi):
            j = c.index(lo)
            try:
                with np.errstate(**errs):
                    return self._share_pass(j, lo, hi, n, whole, x[lo:hi], y[lo:hi], team.member(j),
                                            rngs[j], states[j], dicts[j], flats, gcut)
            except threading.BrokenBarrierError:   # another share failed: its error is raised
                return None
            except BaseException:
                team.abort()
                raise

        outs = blas.split(n, run, n * self.macs_per_sample())
        if outs is None:
            return None
        self._trace = []
        return sum(o[0] for o in outs) / n, sum(o[1] for o in outs)

    def _share_pass(self, j, lo, hi, n, whole, x, y, world, rng, states, grads, flats, gcut):
        """Share j (rows lo:hi of a batch of n, part of a global batch of `whole`) of a split
        training step: forward, loss and backward on x (its rows), the gradient into grads
        (share j's {layer: {param: view}}), then, once every share has written its own, this
        share's slice gcut[j]:gcut[j + 1] of the sum over the shares' flat gradients (flats, in
        rank order) into flats[0]. Returns (loss times rows, correct)."""
        extra = {"world": world, "rows": (np.arange(lo, hi), n), "rng": rng}
        z, _, trace = self._run(self.plan(True, hi - lo).steps, x, True, extra, states=states)
        loss, d, correct = self.loss_layer.loss(z, y)
        d *= np.float32((hi - lo) / whole)
        self._back(trace, d, grads.__getitem__)
        world.barrier()      # every share's gradients are written
        s = slice(gcut[j], gcut[j + 1])
        for f in flats[1:]:
            flats[0][s] += f[s]
        return loss * (hi - lo), correct

    def fork_helpers(self, n):
        """Fork split training's helper processes for batches of n now, if a training step of n
        samples would run in them (fit calls this before its prefetch thread starts: a fork
        copies the calling thread only, and a lock another thread held at that moment would
        stay held in the helper for good)."""
        t = self.train_shares(n)
        if SPLIT_TRAIN and t > 1 and self.in_helpers():
            self._crew_for(n, t)

    def in_helpers(self):
        """Whether split training steps run their shares in helper processes (FLOWDSL_SPLIT, and
        fork not refused before) rather than threads."""
        return forked.wanted() and not self._no_fork

    def _crew_for(self, n, t):
        """The helpers for t shares of n samples (forked, or re-forked for larger shares or
        after one died), or None when fork was refused. (Whether their gradient buffers fit in
        memory, train_shares has decided.)"""
        from . import blas
        c = blas.cuts(n, t)
        rows = max(hi - lo for lo, hi in zip(c, c[1:]))
        crew = self._crew
        if crew is not None and (crew.t != t or crew.rows < rows or not crew.alive()):
            self.release()
            crew = None
        if crew is None:
            self.plan(True, c[1] - c[0])
            try:
                crew = self._crew = forked.Crew(self, t, rows)
            except OSError:     # no fork (a process limit, no memory to map): threads then
                self._no_fork = True
                return None
        return crew

    def _forked_loss_grad(self, x, y, total, t):
        """_split_loss_grad with shares 1..t-1 in helper processes (flowdsl/forked.py)."""
        from . import blas
        n = x.shape[0]
        c = blas.cuts(n, t)
        crew = self._crew_for(n, t)
        if crew is None:
            return None
        gcut = blas.cuts(self.gflat.size, t)
        whole = total or n
        errs = np.geterr()
        state = self.rng.bit_generator.state
        try:
            msgs = []
            for j in range(1, t):
                lo, hi = c[j], c[j + 1]
                crew.xs[j][:hi - lo] = x[lo:hi]
                msgs.append(pickle.dumps((lo, hi, n, whole, state, y[lo:hi], errs, gcut), protocol=5))
            crew.send(msgs)
            with blas.alone():
                got = self._share_pass(0, 0, c[1], n, whole, x[:c[1]], y[:c[1]], crew.member,
                                       self.rng, self.state, self.grads, crew.grads, gcut)
                crew.member.barrier()   # every helper is done
        except forked.BrokenCrew:
            err = crew.failure()
            self.release()
            raise err from None
        except BaseException:
            crew.abort()
            self.release()
            raise
        self._trace = []
        outs = [got] + [(float(crew.outs[j, 0]), int(crew.outs[j, 1])) for j in range(1, t)]
        return sum(o[0] for o in outs) / n, sum(o[1] for o in outs)

    def release(self):
        """End split training's helper processes (fit does when it returns): an idle helper
        keeps the memory of its last step. The next split step forks new ones."""
        if self._crew is not None:
            self._crew.close()
            self._crew = None

    def _sample_shape(self):
        """One sample's shape as the kernels take it (NHWC's HWC)."""
        s = tuple(self.model.input_shape)
        return s[1:] + s[:1] if len(s) == 3 else s

    def train_shares(self, n):
        """Into how many shares a training pass of n samples splits (_split_loss_grad; 1: it
        runs layer by layer)."""
        from . import blas
        t = blas.split_threads(n)
        if (t <= 1 or self.run_forward is not plan.run_forward
                or (self.world is not None and self.world.size > 1)
                or n // t * self.macs_per_sample() < blas.SPLIT_TRAIN_MIN
                or not self._shares_fit(t)):
            return 1
        return t

    def _shares_fit(self, t):
        """Whether the other shares' gradient buffers (t - 1 copies of the parameters) fit in a
        quarter of the memory available when first asked; decided once per net and thread
        count. A model too large for them trains layer by layer instead of risking the kernel's
        out-of-memory killer."""
        if t not in self._fits:
            from .memory import available_memory
            avail = available_memory()
            more = max(0, t - len(self._shares))   # buffers not made yet
            self._fits[t] = not avail or 4 * more * self.gflat.size <= avail // 4
        return self._fits[t]

    def _share_states(self, t):
        """Copies of the running state for shares 1 .. t-1 (their updates are discarded)."""
        while len(self._states) < t - 1:
            self._states.append(copy.deepcopy(self.state))
        got = self._states[:t - 1]
        for st in got:
            for name, d in self.state.items():
                for k, v in d.items():
                    st[name][k][...] = v
        return got

    def _share_grads(self, t):
        """Gradient buffers for shares 1 .. t-1 of _split_loss_grad: [(flat, {layer: {param:
        view}})], index 0 unused (share 0 writes self.grads)."""
        while len(self._shares) < t:
            flat = np.zeros_like(self.gflat)
            self._shares.append((flat, self._views(flat)))
        return self._shares[:t]

    def backprop(self, x, seed, upto=None, wrt=()):
        """Gradients in evaluation mode that touch no parameter gradient and no batchnorm
        statistic (Grad-CAM, saliency, filter images): the forward pass runs as in evaluation
        (batchnorm's running statistics, no dropout) up to layer `upto` (None: the class scores
        the loss reads, pre-softmax), then backward from seed(out), the gradient of the quantity
        of interest with respect to that output (an array of its shape).
        Returns (out, {name: (activation, gradient)} for the layers named in wrt, the gradient
        with respect to the input x (N, H, W, C))."""
        x = self.as_input(x)
        names = {n: self.model.layer(n).name for n in set(wrt) | ({upto} if upto else set())}
        steps = self.plan(True, x.shape[0], frozenset(names.values())).steps
        y, acts, trace = self._run(steps, x, True, {"frozen": True}, set(names.values()),
                                   names[upto] if upto else None)
        dinput = np.zeros_like(x)
        scratch = {l.name: {p: np.empty_like(v) for p, v in self.params[l.name].items()} for l in self.layers}
        got = self._back(trace, np.ascontiguousarray(seed(y), dtype=np.float32), scratch.__getitem__,
                         set(acts), dinput)
        return y, {n: (acts[names[n]], got[names[n]]) for n in wrt}, dinput

    def _class_seed(self, cls):
        """seed() for backprop: one-hot rows selecting each sample's class (None: the predicted
        one; an int, or a list of one per sample)."""
        def seed(z):
            k = z.shape[1]
            c = z.argmax(axis=1) if cls is None else np.broadcast_to(np.asarray(cls), (z.shape[0],))
            if np.any((c < 0) | (c >= k)):
                raise FlowError(f"class {c.tolist()} is out of range: the network has {k} classes (0..{k - 1})")
            out = np.zeros_like(z)
            out[np.arange(z.shape[0]), c] = 1
            return out
        return seed

    def gradcam(self, x, layer=None, cls=None, method="gradcam"):
        """Grad-CAM (Selvaraju et al. 2017) maps (N, H, W) at the input's size: ReLU of the
        layer's channels weighted by the spatial means of the class logit's gradient, bilinearly
        upsampled. method="hirescam" (Draelos & Carin 2020): ReLU of the element-wise product of
        gradient and activation summed over channels (exact for layers with few channels).
        layer: default, the last layer whose output is still a map larger than 1x1; cls: the
        class (default: the predicted one)."""
        from .focus import upsample
        if method not in ("gradcam", "hirescam"):
            raise FlowError(f"method must be gradcam or hirescam. Received: {method}")
        layer = layer or self.default_cam_layer()
        l = self.model.layer(layer)
        if len(l.out) != 3:
            raise FlowError(f"Grad-CAM needs a layer with a map output; {layer} gives a vector of {l.out[0]}")
        _, got, _ = self.backprop(x, self._class_seed(cls), wrt=[layer])
        a, g = got[layer]
        if method == "gradcam":
            cam = np.einsum("nhwc,nc->nhw", a, g.mean(axis=(1, 2)))
        else:
            cam = (a * g).sum(axis=3)
        cam = np.maximum(cam, 0).astype(np.float32)
        return upsample(cam, self.model.input_shape[1], self.model.input_shape[2])

    def default_cam_layer(self):
        """The last layer whose output is a map larger than 1x1 (Grad-CAM's usual choice)."""
        for l in reversed(self.model.layers):
            if l.role != "input" and len(l.out) == 3 and l.out[1] * l.out[2] > 1:
                return l.name
        raise FlowError("no layer of this network outputs a map larger than 1x1: Grad-CAM needs one")

    def saliency(self, x, cls=None):
        """Gradient saliency (Simonyan et al. 2013): |d class logit / d pixel|, maximum over
        channels, (N, H, W)."""
        if len(self.model.input_shape) != 3:
            raise FlowError("saliency needs image input")
        _, _, dx = self.backprop(x, self._class_seed(cls))
        return np.abs(dx).max(axis=3)

    def filter_images(self, layer, steps=30, seed=0, step_size=0.05, filters=None):
        """For each filter of a conv layer, the input that maximises its mean activation, by
        gradient ascent from gray plus noise (normalised gradient, as keras-io's "visualizing
        what convnets learn"), clipped to [0, 1]: (K, H, W, C). Deterministic with the seed."""
        l = self.model.layer(layer)
        if not l.spatial_filters or len(self.model.input_shape) != 3:
            raise FlowError(f"--filters draws the filters of a conv layer; {layer} is {l.kind}")
        k = l.out[0] if filters is None else min(filters, l.out[0])
        c, h, w = self.model.input_shape
        rng = np.random.default_rng([seed, 5])
        x = (0.5 + 0.1 * rng.standard_normal((k, h, w, c))).astype(np.float32)

        def pick(z):   # sample i: the mean of filter i's map
            s = np.zeros_like(z)
            s[np.arange(k), :, :, np.arange(k)] = 1.0 / (z.shape[1] * z.shape[2])
            return s
        for _ in range(steps):
            _, _, g = self.backprop(x, pick, upto=layer)
            norm = np.sqrt((g.reshape(k, -1) ** 2).mean(axis=1)) + np.float32(1e-5)
            x = np.clip(x + np.float32(step_size) * g / norm[:, None, None, None], 0, 1).astype(np.float32)
        return x

    def predict(self, x, batch=256, tta=None, weights=None):
        """Probabilities (softmax) or outputs (squared) for every sample, in evaluation mode.
        tta="hflip": test-time augmentation, the mean of the outputs for each image and its
        mirror image. weights: a list of checkpoints (or Nets) of this model: an ensemble, the
        mean of their outputs (this Net's own weights take no part)."""
        if weights is not None:
            members = self.members(weights)
            x = self.as_input(x)
            return sum(m.predict(x, batch, tta) for m in members) / np.float32(len(members))
        check_tta(tta, self.model.input_shape)
        x = self.as_input(x)
        if tta is None and 0 < x.shape[0] <= batch:   # one chunk: no list, no copy
            return self.loss_layer.forward(self._forward(x), None, {}, False)
        outs = []
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch]
            out = self.loss_layer.forward(self._forward(xb), None, {}, False)
            if tta == "hflip":
                flip = np.ascontiguousarray(xb[:, :, ::-1])
                out = (out + self.loss_layer.forward(self._forward(flip), None, {}, False)) / np.float32(2)
            outs.append(out)
        return np.concatenate(outs) if outs else np.zeros((0,) + self.loss_layer.out, np.float32)

    def members(self, weights):
        """Nets of this model, one per checkpoint path (a Net is taken as it is)."""
        if isinstance(weights, (str, bytes)) or not len(weights):
            raise FlowError("weights= takes a list of checkpoints, e.g. weights=['a.npz', 'b.npz']")
        out = []
        for w in weights:
            if isinstance(w, Net):
                out.append(w)
                continue
            m = Net(self.model, seed=0)
            m.load_weights(w)
            out.append(m)
        return out

    def focus(self, name, x, png_dir=None, names=None, scale="minmax"):
        """Activations of the named layer for input x: (N, H, W, C) for maps, (N, D) for vectors.
        With png_dir, also write them as PNGs (flowdsl.focus); `names` label the inputs; scale:
        "minmax" or "percentile" (1st..99th, for deep layers' maps)."""
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
            write_pngs(layer, acts, png_dir, names, scale)
        return acts

    def fit(self, x, y=None, epochs=None, batch=None, test=None, **kw):
        """Train on arrays (x: (N,H,W,C) or (N,C,H,W); y: int labels) or on a data source
        (x = a .flow source string such as 'fashion_mnist("train")', y = None). Settings not
        given come from the model's train block. Returns the History (history["test_acc"], ...).
        test=(xt, yt) evaluates after each epoch; verbose=1 (the default) shows progress (a bar
        on a terminal, else a line per epoch), verbose=0 nothing."""
        from .data import as_dataset
        from .train import fit
        t = self.model.train
        batch = batch or t["batch"]
        if isinstance(x, str):
            from .data import base_dir, load_source, parse_source
            ds = load_source(parse_source(x, self.model), base_dir(self.model), self.model.input_shape,
                             budget=data_budget(self.model, int(batch)))
            kw.setdefault("classes", ds.classes)
        else:
            if y is None:
                raise FlowError("fit needs labels y (or a data source string as x)")
            ds = as_dataset(self.as_input(x), np.asarray(y))
        if test is not None:
            test = as_dataset(self.as_input(test[0]), np.asarray(test[1]))
        defaults = dict(iterations=t["iterations"] if epochs is None else None, optimizer=t["optimizer"],
                        schedule=t["schedule"], l2=t["l2"], seed=t["seed"], augment=t["augment"],
                        patience=t["patience"], verbose=1)
        defaults.update(kw)
        if epochs is None and defaults["iterations"] is None:
            epochs = t["epochs"] or 1
        # the data is loaded already: available memory counts it
        check_training(self.model, max(1, min(int(batch), len(ds))), option="batch=")
        return fit(self, ds, None, test, epochs=epochs, batch=batch, **defaults)

    def evaluate(self, x, y, batch=256):
        """{'loss', 'acc', 'confusion'} on arrays."""
        from .train import evaluate
        return evaluate(self, self.as_input(x), np.asarray(y), batch)

    def export_onnx(self, path, layout="nhwc"):
        """Write this net (its current weights) as an ONNX file: NHWC input by default (layout=
        "nchw" for NCHW), probabilities or values out (flowdsl.onnx_export). Needs flowdsl[onnx]."""
        from .onnx_export import export
        return export(self, path, layout)

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


def _he_default(layers, i):
    """he init before a relu-like activation (the layer's own act= or the next layer, as the
    activation says: `he_init`), glorot otherwise."""
    act = layers[i].args.get("act")
    if act is not None and lookup(act.name, False).he_init:
        return True
    return i + 1 < len(layers) and layers[i + 1].he_init
