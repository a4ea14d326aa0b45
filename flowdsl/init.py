"""Weight initialisers of the init block: normal, uniform, he, glorot, zeros, constant."""
from __future__ import annotations

import math

import numpy as np


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
    else:  # settings.INITS and this function list the same names
        raise AssertionError(name)
    return np.ascontiguousarray(a, dtype=f32)
