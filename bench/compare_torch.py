"""flowdsl vs PyTorch (CPU) on the issue's three nets, interleaved in one run.

    pip install torch==2.13.0        # CPU build; never a flowdsl dependency
    python bench/compare_torch.py [--threads 2] [--repeats 5] [--nets A,B,C] [--modes train,infer]

For each net: training images/s (forward + backward + optimizer step on random data) and
inference images/s at batch 256. flowdsl and PyTorch alternate, each in a fresh process (their
OpenMP runtimes would otherwise share one wait policy and spin against each other), so both
see the same machine state. Prints medians and the ratio flowdsl / PyTorch."""
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


def worker(fw, key, mode, threads, infer_batch, batch, runs):
    """Time one framework on one net in this (fresh) process; print images/s of each run."""
    import numpy as np
    fname, default_batch, optname = NETS[key]
    batch = batch or default_batch
    n = batch if mode == "train" else infer_batch
    rng = np.random.default_rng(0)
    if fw == "flowdsl":
        import flowdsl
        from flowdsl import jit
        from flowdsl.optim import Optimizer
        jit.threads(threads)
        net = flowdsl.load(HERE / "nets" / fname)
        c, h, w = net.model.input_shape
        x = rng.random((n, h, w, c), dtype=np.float32)
        y = rng.integers(0, net.loss_layer.out[0], n)
        if mode == "train":
            opt = Optimizer(net, net.model.train["optimizer"], 0.0)

            def step():
                net.loss_grad(x, y)
                opt.step()
        else:
            def step():
                net.predict(x, batch=n)
    else:
        import torch
        torch.set_num_threads(threads)
        tnet, (c, h, w), ncls = torch_net(key)
        tx = torch.from_numpy(rng.random((n, c, h, w), dtype=np.float32))
        ty = torch.from_numpy(rng.integers(0, ncls, n))
        if mode == "train":
            topt = (torch.optim.Adam(tnet.parameters(), lr=1e-3) if optname == "adam"
                    else torch.optim.SGD(tnet.parameters(), lr=1e-3, momentum=0.8))
            lossf = torch.nn.CrossEntropyLoss()

            def step():
                topt.zero_grad(set_to_none=True)
                lossf(tnet(tx), ty).backward()
                topt.step()
        else:
            tnet.eval()

            def step():
                with torch.inference_mode():
                    tnet(tx)
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    step()
    k = max(1, int(0.5 / max(time.perf_counter() - t0, 1e-6)))
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(k):
            step()
        out.append(k * n / (time.perf_counter() - t0))
    print(" ".join(f"{v:.1f}" for v in out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5, help="alternations of the two frameworks")
    ap.add_argument("--runs", type=int, default=3, help="timed runs inside each process")
    ap.add_argument("--nets", default="A,B,C")
    ap.add_argument("--modes", default="train,infer")
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=None, help="override every net's training batch")
    ap.add_argument("--worker", nargs=3, metavar=("FRAMEWORK", "NET", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(*a.worker, a.threads, a.infer_batch, a.batch, a.runs)
        return 0
    import subprocess
    print(f"threads={a.threads}  repeats={a.repeats} alternations x {a.runs} runs  "
          f"(each framework in its own process; medians; ratio = flowdsl / torch)", flush=True)
    from flowdsl.blas import describe
    print(describe(), flush=True)
    rows = []
    for key in a.nets.split(","):
        for mode in a.modes.split(","):
            res = {"flowdsl": [], "torch": []}
            for _ in range(a.repeats):
                for fw in ("flowdsl", "torch"):
                    cmd = [sys.executable, __file__, "--worker", fw, key, mode, "--threads", str(a.threads),
                           "--infer-batch", str(a.infer_batch), "--runs", str(a.runs)]
                    if a.batch:
                        cmd += ["--batch", str(a.batch)]
                    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    res[fw] += [float(v) for v in r.stdout.split()]
            o, t = statistics.median(res["flowdsl"]), statistics.median(res["torch"])
            b = (a.batch or NETS[key][1]) if mode == "train" else a.infer_batch
            rows.append((key, mode, b, o, t, o / t))
            print(f"net {key} {mode:5s} batch {b:4d}: flowdsl {o:9,.0f} img/s   torch {t:9,.0f} img/s   "
                  f"ratio {o / t:5.2f}", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
