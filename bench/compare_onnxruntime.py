"""flowdsl inference against ONNX Runtime on the bench's three nets, interleaved in one run.

    pip install "flowdsl[onnx]" onnxruntime
    python bench/compare_onnxruntime.py [--threads 2] [--repeats 3] [--nets A,B,C] [--batches 256,1]

Each net (bench/nets: A hello-dl, B Nielsen, C glasses) is exported by flowdsl itself
(`net.export_onnx`, NHWC input, random weights of the seed), so both run the same graph on the
same numbers; the outputs are compared once (max abs difference printed). Then, for each batch
size, flowdsl (`net.predict`) and ONNX Runtime (CPUExecutionProvider, intra-op threads =
--threads, inter-op 1, sequential execution) alternate, each in a fresh process (their OpenMP
runtimes would otherwise spin against each other), --repeats times; each process times --runs
runs of about 0.5 s after a warm-up. Prints medians (images/s) and the ratio flowdsl / ORT."""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NETS = {"A": "a_hellodl.flow", "B": "b_nielsen.flow", "C": "c_glasses.flow"}


def _input(net, n):
    import numpy as np
    c, h, w = net.model.input_shape
    return np.random.default_rng(0).random((n, h, w, c), dtype=np.float32)


def worker(fw, key, batch, threads, runs, onnx_path):
    import numpy as np
    sys.path.insert(0, str(HERE.parent))
    import flowdsl
    from flowdsl import jit
    jit.threads(threads)
    net = flowdsl.load(HERE / "nets" / NETS[key])
    x = _input(net, batch)
    if fw == "flowdsl":
        def step():
            net.predict(x, batch=batch)
    else:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def step():
            sess.run(None, {name: x})
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
        out.append(k * batch / (time.perf_counter() - t0))
    print(" ".join(f"{v:.1f}" for v in out))
    del np


def export_all(keys, folder):
    """Export each net; return {key: path}, and print how far ORT's outputs are from flowdsl's."""
    import numpy as np
    import onnxruntime as ort
    sys.path.insert(0, str(HERE.parent))
    import flowdsl
    paths = {}
    for key in keys:
        net = flowdsl.load(HERE / "nets" / NETS[key])
        p = os.path.join(folder, f"{key}.onnx")
        net.export_onnx(p)
        x = _input(net, 4)
        got = ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        print(f"net {key}: exported {p}; max |ORT - flowdsl| = {float(np.abs(got - net.predict(x)).max()):.2e}",
              flush=True)
        paths[key] = p
    return paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3, help="alternations of the two runtimes")
    ap.add_argument("--runs", type=int, default=3, help="timed runs inside each process")
    ap.add_argument("--nets", default="A,B,C")
    ap.add_argument("--batches", default="256,1")
    ap.add_argument("--worker", nargs=4, metavar=("RUNTIME", "NET", "BATCH", "ONNX"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        fw, key, batch, path = a.worker
        worker(fw, key, int(batch), a.threads, a.runs, path)
        return 0
    keys = a.nets.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_all(keys, tmp)
        print(f"threads={a.threads}  repeats={a.repeats} alternations x {a.runs} runs (fresh process each; "
              f"medians; ratio = flowdsl / ORT)", flush=True)
        from flowdsl.blas import describe
        print(describe(), flush=True)
        for key in keys:
            for b in [int(v) for v in a.batches.split(",")]:
                res = {"flowdsl": [], "ort": []}
                for _ in range(a.repeats):
                    for fw in ("flowdsl", "ort"):
                        cmd = [sys.executable, __file__, "--worker", fw, key, str(b), paths[key],
                               "--threads", str(a.threads), "--runs", str(a.runs)]
                        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
                        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                        if r.returncode != 0:
                            sys.stderr.write(r.stderr[-2000:])
                            raise SystemExit(f"{fw} on net {key} failed")
                        res[fw] += [float(v) for v in r.stdout.split()]
                o, t = statistics.median(res["flowdsl"]), statistics.median(res["ort"])
                print(f"net {key} infer batch {b:4d}: flowdsl {o:9,.0f} img/s   ORT {t:9,.0f} img/s   "
                      f"ratio {o / t:5.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
