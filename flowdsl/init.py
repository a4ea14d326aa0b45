"""Weight initialisers of the init block: normal, uniform, he, glorot, zeros, constant, and the
fixed edge filters kirsch (the 8 compass kernels) and sobel (x and y gradients) for a field-3 conv."""
from __future__ import annotations

import math

import numpy as np


def _kirsch():
    """The 8 Kirsch compass kernels, N, NW, W, SW, S, SE, E, NE: 5 on three neighbouring ring
    cells, -3 on the other five, 0 in the centre; each the last turned a step anticlockwise."""
    ring = [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0)]   # clockwise from top left
    out = np.zeros((3, 3, 8))
    for k in range(8):
        for q, (a, b) in enumerate(ring):
            out[a, b, k] = 5.0 if (q + k) % 8 in (0, 1, 2) else -3.0
    return out


def _sobel():
    gx = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    return np.stack([gx, gx.T], axis=-1)                 # x gradient, y gradient


FIXED = {"kirsch": _kirsch, "sobel": _sobel}   # name -> (3, 3, filters) kernels


def fixed_filters(name):
    """The (3, 3, K) kernels of a fixed initialiser, or None for the random ones."""
    make = FIXED.get(name)
    return None if make is None else make()


def initialise(rng, pname, shape, init, fans, he_default):
    """One parameter array. Biases ('b', 'beta') start at 0 and scales ('gamma') at 1 unless the
    init block names the layer with constant/zeros; weights follow `init` or the default (he before
    relu/gelu, glorot otherwise)."""
    f32 = np.float32
    if pname in ("b", "beta"):
        return np.zeros(shape, f32)
    if pname == "gamma":
        return np.ones(shape, f32)
    fan_in, fan_out = fans
    name = init.name if init is not None else ("he" if he_default else "glorot")
    if name == "normal":
        a = rng.normal(init["mean"], init["std"], size=shape)
    elif name == "uniform":
        a = rng.uniform(init["lo"], init["hi"], size=shape)
    elif name == "he":
        a = rng.normal(0.0, math.sqrt(2.0 / max(1, fan_in)), size=shape)
    elif name == "glorot":
        lim = math.sqrt(6.0 / max(1, fan_in + fan_out))
        a = rng.uniform(-lim, lim, size=shape)
    elif name == "zeros":
        a = np.zeros(shape)
    elif name == "constant":
        a = np.full(shape, init["value"])
    elif name in FIXED:   # (3, 3, C, K) filters, checked by the model; each kernel over C channels / C
        k3 = FIXED[name]()
        a = np.repeat(k3[:, :, None, :], shape[2], axis=2) / shape[2]
    else:  # settings.INITS and this function list the same names
        raise AssertionError(name)
    return np.ascontiguousarray(a, dtype=f32)
