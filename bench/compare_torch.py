"""flowdsl vs PyTorch (CPU) on the issue's three nets, interleaved in one run.

    pip install torch==2.13.0        # CPU build; never a flowdsl dependency
    python bench/compare_torch.py [--threads 2] [--repeats 7] [--nets A,B,C]

For each net: training images/s (forward + backward + optimizer step on random data) and
inference images/s at batch 256, flowdsl and PyTorch alternating run by run so that both see
the same machine state. Prints medians and the ratio flowdsl / PyTorch."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def torch_net(name):
    import torch.nn as nn
    if name == "A":
        g = lambda: nn.GELU(approximate="tanh")  # noqa: E731  flowdsl's gelu is the tanh form
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.MaxPool2d(2), g(),
            nn.Conv2d(32, 64, 3), nn.MaxPool2d(2, ceil_mode=True), g(),
            nn.Conv2d(64, 128, 3), nn.MaxPool2d(2), g(),
            nn.Flatten(), nn.Linear(512, 64), g(), nn.Linear(64, 128), g(), nn.Linear(128, 10)), (1, 28, 28), 10
    if name == "B":
        return nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 40, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(640, 100), nn.ReLU(), nn.Linear(100, 10)), (1, 28, 28), 10
    if name == "C":
        return nn.Sequential(
            nn.Conv2d(3, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(1, 1, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(40000, 2), nn.ReLU()), (3, 400, 400), 2
    raise KeyError(name)


NETS = {"A": ("a_hellodl.flow", 64, "adam"), "B": ("b_nielsen.flow", 64, "adam"), "C": ("c_glasses.flow", 20, "momentum")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--nets", default="A,B,C")
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=None, help="override every net's training batch")
    a = ap.parse_args()

    import numpy as np
    import torch

    import flowdsl
    from flowdsl import jit
    from flowdsl.optim import Optimizer

    torch.set_num_threads(a.threads)
    jit.threads(a.threads)
    print(f"threads={a.threads}  torch {torch.__version__}  repeats={a.repeats}  (medians; ratio = flowdsl / torch)")
    rows = []
    for key in a.nets.split(","):
        fname, batch, optname = NETS[key]
        batch = a.batch or batch
        net = flowdsl.load(HERE / "nets" / fname)
        opt = Optimizer(net, net.model.train["optimizer"], 0.0)
        tnet, ishape, ncls = torch_net(key)
        topt = (torch.optim.Adam(tnet.parameters(), lr=1e-3) if optname == "adam"
                else torch.optim.SGD(tnet.parameters(), lr=1e-3, momentum=0.8))
        lossf = torch.nn.CrossEntropyLoss()
        rng = np.random.default_rng(0)
        c, h, w = ishape
        x = rng.random((batch, h, w, c), dtype=np.float32)
        y = rng.integers(0, ncls, batch)
        tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        ty = torch.from_numpy(y)
        xi = rng.random((a.infer_batch, h, w, c), dtype=np.float32)
        txi = torch.from_numpy(np.ascontiguousarray(xi.transpose(0, 3, 1, 2)))

        def f_train():
            net.loss_grad(x, y)
            opt.step()

        def t_train():
            topt.zero_grad(set_to_none=True)
            lossf(tnet(tx), ty).backward()
            topt.step()

        def f_infer():
            net.predict(xi, batch=a.infer_batch)

        def t_infer():
            with torch.inference_mode():
                tnet(txi)

        res = {}
        for label, fns, n in (("train", (f_train, t_train), batch), ("infer", (f_infer, t_infer), a.infer_batch)):
            for fn in fns:  # warm-up (and numba compile / cache load)
                for _ in range(3):
                    fn()
            steps = []
            for fn in fns:
                t0 = time.perf_counter()
                fn()
                steps.append(max(1, int(0.4 / max(time.perf_counter() - t0, 1e-6))))
            k = min(steps)
            ours, theirs = [], []
            for _ in range(a.repeats):
                for fn, out in ((fns[0], ours), (fns[1], theirs)):
                    t0 = time.perf_counter()
                    for _ in range(k):
                        fn()
                    out.append(k * n / (time.perf_counter() - t0))
            res[label] = (statistics.median(ours), statistics.median(theirs))
        for label in ("train", "infer"):
            o, t = res[label]
            rows.append((key, label, batch if label == "train" else a.infer_batch, o, t, o / t))
            print(f"net {key} {label:5s} batch {rows[-1][2]:4d}: flowdsl {o:9,.0f} img/s   torch {t:9,.0f} img/s   "
                  f"ratio {o / t:5.2f}", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
