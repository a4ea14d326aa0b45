"""Images/s of each training-time augmentation by itself, on batches the size training uses.

    python bench/augment.py [--size 28] [--channels 1] [--batch 64] [--repeats 5] [--seconds 0.5]

For each augmentation (and the Keras tutorial's list, rotate(45) + shift(0.1) + hflip, as
examples/cifar_keras.flow uses it): the median over --repeats of the images/s of
Augmenter.apply on a random float32 batch, each repeat running for about --seconds. The numba
kernels are compiled (or loaded from the cache) before timing. Compare with a training step's
img/s (flowdsl bench FILE): an augmentation costs that share of a step."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = ["shift(2)", "shift(0.1)", "hflip", "vflip", "rotate(45)", "rotate(45, fill=zeros)",
         "rotate(45, fill=mirror)", "zoom(0.2)", "cutout(8)", "noise(0.05)", "flip_pixels(5)",
         "[rotate(45), shift(0.1), hflip]"]


def augmenter(text, shape):
    from flowdsl.augment import Augmenter
    from flowdsl.model import build_text
    w, h, c = shape
    m = build_text(f"input({w}x{h}x{c}) :: dense(2) :: softmax\ntrain {{ augment = {text} }}\n")
    return Augmenter(m.train["augment"])


def rate(aug, x, seconds, rng):
    n, t0 = 0, time.perf_counter()
    while True:
        aug.apply(x, rng)
        n += 1
        el = time.perf_counter() - t0
        if el >= seconds:
            return n * len(x) / el


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5)
    a = ap.parse_args(argv)
    from flowdsl import jit
    jit.numba()
    shape = (a.size, a.size, a.channels)
    x = np.random.default_rng(0).random((a.batch, a.size, a.size, a.channels), dtype=np.float32)
    print(f"augmentation of {a.batch} images of {a.size}x{a.size}x{a.channels}, median of {a.repeats}")
    print(f"{'augment':34s} {'img/s':>12s}")
    for text in CASES:
        aug = augmenter(text, shape)
        rng = np.random.default_rng(1)
        aug.apply(x, rng)                       # compile or load the kernels
        rates = [rate(aug, x, a.seconds, rng) for _ in range(a.repeats)]
        print(f"{text:34s} {statistics.median(rates):12,.0f}")


if __name__ == "__main__":
    main()
