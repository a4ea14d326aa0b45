"""Padding modes for conv(pad_mode=...), with scipy.ndimage's meanings, on an axis a b c d:

    nearest  a a | a b c d | d d        mirror  c b | a b c d | c b
    reflect  b a | a b c d | d c        wrap    c d | a b c d | a b

(zeros, alias constant, is the convs' own padding and never comes here.) A padded input is a
gather: padded pixel (i, j) copies input pixel (rows[i], cols[j]); the backward pass folds the
padded border's gradient back onto the pixels it copied (a scatter-add, parallel over samples,
so no two tasks write the same sample)."""
import numpy as np

from ..jit import kernel, prange

MODES = ("zeros", "constant", "nearest", "mirror", "reflect", "wrap")


def source_index(n, pad, mode):
    """For each of the n + 2*pad padded positions, the input position it copies (int64)."""
    q = np.arange(-pad, n + pad, dtype=np.int64)
    if mode == "nearest":
        return np.clip(q, 0, n - 1)
    if mode == "wrap":
        return q % n
    if mode == "reflect":        # b a | a b: the edge repeats; period 2n
        r = q % (2 * n)
        return np.where(r < n, r, 2 * n - 1 - r)
    if mode == "mirror":         # c b | a b c: the edge does not repeat; period 2(n - 1)
        if n == 1:
            return np.zeros_like(q)
        r = q % (2 * (n - 1))
        return np.where(r < n, r, 2 * (n - 1) - r)
    raise ValueError(mode)


_CACHE = {}


def indices(h, w, pad, mode):
    key = (h, w, pad, mode)
    got = _CACHE.get(key)
    if got is None:
        if len(_CACHE) > 64:
            _CACHE.clear()
        got = _CACHE[key] = (source_index(h, pad, mode), source_index(w, pad, mode))
    return got


def pad(x, p, mode):
    """(N, H, W, C) -> (N, H + 2p, W + 2p, C), the border filled as `mode` says."""
    n, h, w, c = x.shape
    rows, cols = indices(h, w, p, mode)
    out = np.empty((n, h + 2 * p, w + 2 * p, c), np.float32)
    _gather(x, rows, cols, out)
    return out


def fold(dxp, h, w, p, mode):
    """The gradient of pad(): each padded pixel's gradient added to the input pixel it copied."""
    rows, cols = indices(h, w, p, mode)
    dx = np.empty((dxp.shape[0], h, w, dxp.shape[3]), np.float32)
    _scatter(dxp, rows, cols, dx)
    return dx


@kernel
def _gather(x, rows, cols, out):
    n_, ph, pw, c = out.shape
    for t in prange(n_ * ph):
        n = t // ph
        i = t % ph
        r = rows[i]
        for j in range(pw):
            q = cols[j]
            for cc in range(c):
                out[n, i, j, cc] = x[n, r, q, cc]


@kernel
def _scatter(dxp, rows, cols, dx):
    n_, ph, pw, c = dxp.shape
    zero = np.float32(0.0)
    for n in prange(n_):
        for i in range(dx.shape[1]):
            for j in range(dx.shape[2]):
                for cc in range(c):
                    dx[n, i, j, cc] = zero
        for i in range(ph):
            r = rows[i]
            for j in range(pw):
                q = cols[j]
                for cc in range(c):
                    dx[n, r, q, cc] += dxp[n, i, j, cc]
