"""`flowdsl bench`: training and inference images/s, and where the time goes per layer.

Numbers are medians over several timed runs after warm-up, on random data of the model's input
shape. The first step's time is the numba compile (cold cache) or cache load (warm)."""
from __future__ import annotations

import os
import statistics
import sys
import time


def run(model, batch=None, threads=None, infer_batch=256, repeats=7, steps=None, out=None):
    import numpy as np

    from . import jit
    from .args import CallValue
    from .net import Net
    from .optim import Optimizer
    from .plan import Timer
    from .settings import OPTIMIZERS

    out = out or sys.stdout   # at call time: a default of sys.stdout would keep the stream of import time
    t_import = time.perf_counter()
    n_threads = jit.threads(threads)
    batch = batch or model.train["batch"]
    net = Net(model, seed=0)
    opt_call = model.train["optimizer"] or CallValue("adam", tuple((p.name, p.default) for p in OPTIMIZERS["adam"]))
    opt = Optimizer(net, opt_call, model.train["l2"])
    rng = np.random.default_rng(0)
    ishape = _nhwc(model.input_shape)
    loss_layer = net.loss_layer

    def data(n):
        x = rng.random((n,) + ishape, dtype=np.float32)
        if getattr(loss_layer, "targets", "labels") == "labels":
            y = rng.integers(0, loss_layer.out[0], n)
        else:
            y = rng.random((n,) + _nhwc(loss_layer.out), dtype=np.float32)
        return x, y

    x, y = data(batch)
    t0 = time.perf_counter()
    net.loss_grad(x, y)
    opt.step()
    net.predict(x[:2])
    first = time.perf_counter() - t0
    print(f"threads: {n_threads}   batch: {batch}   first step (numba compile or cache load): {first:.2f} s",
          file=out)
    from .blas import describe
    print(describe(), file=out)

    # size the timed runs to ~0.3 s each
    t0 = time.perf_counter()
    net.loss_grad(x, y)
    opt.step()
    one = max(time.perf_counter() - t0, 1e-6)
    steps = steps or max(1, min(200, int(0.3 / one)))
    for _ in range(2):
        net.loss_grad(x, y)
        opt.step()
    train = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            net.loss_grad(x, y)
            opt.step()
        train.append(steps * batch / (time.perf_counter() - t0))

    xi, _ = data(infer_batch)
    net.predict(xi)
    t0 = time.perf_counter()
    net.predict(xi)
    one = max(time.perf_counter() - t0, 1e-6)
    isteps = max(1, min(100, int(0.3 / one)))
    infer = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(isteps):
            net.predict(xi, batch=infer_batch)
        infer.append(isteps * infer_batch / (time.perf_counter() - t0))

    # per-layer profile: medians over several steps
    per = {}
    for _ in range(max(3, min(repeats, steps))):
        with Timer(net) as t:
            net.loss_grad(x, y)
        for k, (f, b) in t.times.items():
            per.setdefault(k, []).append((f, b))
    shares = net.train_shares(batch)
    if net.in_helpers():   # (flowdsl/forked.py)
        who = f"this process and {shares - 1} forked helper{'s' if shares > 2 else ''} each run"
    else:
        who = "each thread runs"
    split = f", split {shares} ways ({who} the whole pass on its share)" if shares > 1 else ""
    print(f"train: {statistics.median(train):,.0f} img/s   (forward + backward + {opt.kind} step, batch {batch}"
          f"{split}; median of {repeats} runs of {steps} steps)", file=out)
    print(f"infer: {statistics.median(infer):,.0f} img/s   (batch {infer_batch}; median of {repeats} runs)", file=out)
    if shares > 1:
        print("per layer, the same step run layer by layer (each layer's work shared by the threads):", file=out)
    rows = [("layer", "forward ms", "backward ms")]
    tot_f = tot_b = 0.0
    plan = net.plan(True, batch)
    pooled, tails = plan.pooled(), plan.tails()   # a layer that applies the next maxpool, activation
    for l in net.layers[:-1]:
        v = per.get(l.name)
        if not v:
            continue
        f = statistics.median(a for a, _ in v) * 1e3
        b = statistics.median(b for _, b in v) * 1e3
        tot_f += f
        tot_b += b
        kind = f"{l.kind}, {l.algo_for(batch)}" if hasattr(l, "algo_for") else l.kind
        also = (f" + {pooled[l.name]}" if l.name in pooled else "") + (f" -> {tails[l.name]}" if l.name in tails else "")
        rows.append((f"{l.name} ({kind}){also}", f"{f:.2f}", f"{b:.2f}"))
    rows.append(("total", f"{tot_f:.2f}", f"{tot_b:.2f}"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, r in enumerate(rows):
        print(f"  {r[0].ljust(w[0])}  {r[1].rjust(w[1])}  {r[2].rjust(w[2])}", file=out)
    return {"train": statistics.median(train), "infer": statistics.median(infer), "first": first,
            "threads": n_threads, "batch": batch}


def _nhwc(s):
    return (s[1], s[2], s[0]) if len(s) == 3 else tuple(s)
