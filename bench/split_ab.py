"""Split training in threads against helper processes (FLOWDSL_SPLIT), interleaved in one process.

    python bench/split_ab.py FILE [--batch 64] [--pairs 10] [--threads 2]

One net and one optimizer; the setting is switched between runs of k training steps (about
0.4 s each), alternating which goes first, and the medians of the runs and of the pairs' ratios
are printed. Both ways give the same bits (tests/test_forked.py), so only the time differs.
Run it with nothing else running: this machine's speed drifts within minutes, which is why the
two are interleaved rather than run one after the other."""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import flowdsl
    from flowdsl import jit
    from flowdsl.optim import Optimizer
    jit.threads(a.threads)
    net = flowdsl.load(a.file)
    s = net.model.input_shape
    rng = np.random.default_rng(0)
    shape = (a.batch, s[1], s[2], s[0]) if len(s) == 3 else (a.batch,) + tuple(s)
    xs = [rng.random(shape, dtype=np.float32) for _ in range(4)]
    ys = [rng.integers(0, net.loss_layer.out[0], a.batch) for _ in range(4)]
    opt = Optimizer(net, net.model.train["optimizer"], 0.0)
    if net.train_shares(a.batch) <= 1:
        sys.exit(f"a training step of {a.batch} samples does not split on {a.threads} threads: nothing to compare")

    def step(i):
        net.loss_grad(xs[i % 4], ys[i % 4])
        opt.step()

    def rate(mode, k):
        os.environ["FLOWDSL_SPLIT"] = mode
        step(0)
        t0 = time.perf_counter()
        for i in range(k):
            step(i)
        return k * a.batch / (time.perf_counter() - t0)

    for m in ("threads", "procs"):
        rate(m, 3)
    t0 = time.perf_counter()
    step(0)
    step(1)
    k = max(2, int(0.4 / ((time.perf_counter() - t0) / 2)))
    r = {"threads": [], "procs": []}
    for p in range(a.pairs):
        for m in (("threads", "procs") if p % 2 == 0 else ("procs", "threads")):
            r[m].append(rate(m, k))
    rt, rp = np.array(r["threads"]), np.array(r["procs"])
    q = rp / rt
    print(f"{Path(a.file).name}, batch {a.batch}, {a.threads} threads: threads {np.median(rt):,.0f} img/s, "
          f"processes {np.median(rp):,.0f} img/s, ratio {np.median(q):.3f} "
          f"(pairs {a.pairs} of {k} steps; range {q.min():.2f}-{q.max():.2f})")


if __name__ == "__main__":
    main()
