"""Error of each conv algorithm against a float64 convolution of the same float32 inputs.

    python bench/conv_error.py

For conv shapes of nets A and B and fashion.flow (batch 64, random inputs in [0, 1), the
network's initial weights), every algorithm that can run the shape is forced in turn; prints
max |y - y64| / max |y64| of the training forward (docs/internals.md quotes the table).
--grad: the weight gradient's error instead (dz random normal), for the Winograd schemes and gemm.
--eval: the evaluation forward (gemm and planar there run flowdsl/layers/_vconv.py's kernels
where the own product runs)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [("28x28x1", 32, 3, 0), ("28x28x1", 20, 5, 0), ("13x13x32", 64, 3, 0), ("6x6x64", 128, 3, 0),
          ("12x12x20", 40, 5, 0), ("14x14x24", 64, 3, 1), ("7x7x64", 128, 3, 1), ("28x28x1", 2, 3, 1)]


def reference(x, w, b, pad):
    """float64 direct convolution, NHWC, stride 1."""
    x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    f = w.shape[0]
    n, h, wd, _ = x.shape
    oh, ow = h - f + 1, wd - f + 1
    y = np.zeros((n, oh, ow, w.shape[3])) + b.astype(np.float64)
    for a in range(f):
        for c in range(f):
            y += np.einsum("nhwc,ck->nhwk", x[:, a:a + oh, c:c + ow], w[a, c].astype(np.float64))
    return y


def reference_dw(x, dz, f, pad):
    """float64 weight gradient: dw[a, c] = sum over positions of the shifted input times dz."""
    x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh, ow = dz.shape[1], dz.shape[2]
    d = dz.astype(np.float64)
    return np.stack([np.stack([np.einsum("nhwc,nhwk->ck", x[:, a:a + oh, c:c + ow], d)
                               for c in range(f)]) for a in range(f)])


def main():
    grad = "--grad" in sys.argv[1:]
    evaluation = "--eval" in sys.argv[1:]
    import flowdsl
    from flowdsl.layers import conv as convmod
    print("| conv | " + " | ".join(convmod.STRATEGIES) + " |")
    print("|---|" + "---|" * len(convmod.STRATEGIES))
    for shape, k, f, pad in SHAPES:
        net = flowdsl.parse(f"network = conv({shape}, filters={k}, field={f}, pad={pad}) :: dense(2) :: softmax")
        l = net.layers[0]
        p = net.params[l.name]
        p["b"][...] = np.random.default_rng(1).normal(0, 0.1, p["b"].shape)
        c, h, w = l.in_shape
        x = np.random.default_rng(0).random((64, h, w, c), dtype=np.float32)
        ref = reference(x, p["w"], p["b"], pad)
        row = []
        for algo, mod in convmod.STRATEGIES.items():
            ok = {"rows": True, "gemm": True, "planar": c <= 8,
                  "winograd": f == 3, "winograd4": f == 3, "winograd25": f == 5}[algo]
            if not ok or (algo == "rows" and k > 8):
                row.append("-")
                continue
            ctx = {"x": x}
            y = mod.forward(l, x, p["w"], p["b"], not evaluation, ctx)
            if grad:
                if algo in ("rows", "planar"):
                    row.append("-")
                    continue
                dz = np.random.default_rng(2).normal(0, 1, y.shape).astype(np.float32)
                g = {"w": np.empty_like(p["w"]), "b": np.empty_like(p["b"])}
                mod.backward(l, dz, p["w"], g, ctx, False)
                gref = reference_dw(x, dz, f, pad)
                row.append(f"{float(np.abs(g['w'] - gref).max() / np.abs(gref).max()):.1e}")
                continue
            row.append(f"{float(np.abs(y - ref).max() / np.abs(ref).max()):.1e}")
        print(f"| {shape} -> {k}, {f}x{f}, pad {pad} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
