"""Training-time augmentation (`augment = [shift(2), hflip, vflip, rotate(45), zoom(0.1), cutout(8),
noise(0.05), flip_pixels(5)]`) and the perturbations of `eval --perturb shift=2,flip=5`. Vectorised
numpy, and one numba kernel for rotate and zoom (bilinear resampling under an affine map), on
NHWC float32 batches in [0, 1]; every function returns a new array and never modifies its input.

shift(px): a whole number of pixels, or a fraction of each side (shift(0.1): up to 10% of the
width across and of the height down, as Keras' width/height_shift_range). rotate(degrees, fill):
a uniform angle in [-degrees, degrees] about the centre; zoom(fraction, fill): a uniform scale in
[1 - fraction, 1 + fraction]. fill says what shows where the source falls outside the image,
with scipy.ndimage's meanings: nearest (the edge pixel, Keras' default), zeros, mirror, reflect,
wrap."""
from __future__ import annotations

import math

import numpy as np

from .errors import FlowError
from .jit import kernel, prange

IMAGE_ONLY = ("shift", "hflip", "vflip", "rotate", "zoom", "cutout")
FILLS = {"zeros": 0, "nearest": 1, "mirror": 2, "reflect": 3, "wrap": 4}


class Draws:
    """The random numbers of one batch's augmentation, drawn for the whole global batch (`total`
    images) and cut to this rank's `rows` (data-parallel ranks draw what one process draws, and
    keep their share); with rows None, exactly rng's own draws for the batch."""

    def __init__(self, rng, n, rows=None, total=None):
        self.rng, self.n = rng, n
        self.rows = rows
        self.total = n if rows is None else total

    def _cut(self, a, axis=0):
        return a if self.rows is None else np.take(a, self.rows, axis=axis)

    def integers(self, lo, hi, lead=()):
        """(lead..., n) integers in [lo, hi)."""
        return self._cut(self.rng.integers(lo, hi, size=tuple(lead) + (self.total,)), axis=len(lead))

    def random(self):
        return self._cut(self.rng.random(self.total))

    def uniform(self, lo, hi):
        return self._cut(self.rng.uniform(lo, hi, size=self.total))

    def standard_normal(self, shape):
        return self._cut(self.rng.standard_normal((self.total,) + tuple(shape[1:]), dtype=np.float32))


def _draws(rng, x):
    return rng if isinstance(rng, Draws) else Draws(_rng(rng), len(x))


def _rng(rng):
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    return rng


def _as_batch(x):
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    return x


# ------------------------------------------------------------------------------ the operations
def shift_images(x, dy, dx):
    """Translate image n by (dy[n], dx[n]) pixels (down, right when positive) with zero fill:
    out[n, i, j] = x[n, i - dy, j - dx]. x: (N, H, W, C). Returns a new array."""
    n, h, w = x.shape[:3]
    dy = np.asarray(dy, np.int64)
    dx = np.asarray(dx, np.int64)
    out = np.zeros_like(x)
    # images that share a shift are copied with one slice assignment (a big batch has few
    # distinct shifts); a batch of mostly distinct shifts is copied image by image
    key = (dy + h) * (2 * w + 1) + (dx + w)
    order = np.argsort(key, kind="stable")
    ks = key[order]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    ends = np.r_[starts[1:], n]
    for s, e in zip(starts.tolist(), ends.tolist()):
        k = order[s] if e - s == 1 else order[s:e]
        a, b = int(dy[order[s]]), int(dx[order[s]])
        if abs(a) >= h or abs(b) >= w:
            continue
        out[k, max(a, 0):h + min(a, 0), max(b, 0):w + min(b, 0)] = \
            x[k, max(-a, 0):h + min(-a, 0), max(-b, 0):w + min(-b, 0)]
    return out


def random_shift(x, px, rng):
    """Random integer translation in [-px, px] on each axis, per image, zero fill. A fraction px
    < 1 is that share of each side: up to round(px * H) down, round(px * W) across."""
    _need_images(x, "shift")
    d = _draws(rng, x)
    if px < 1:
        py_, px_ = int(round(px * x.shape[1])), int(round(px * x.shape[2]))
        dy = d.integers(-py_, py_ + 1)
        dx = d.integers(-px_, px_ + 1)
        return shift_images(x, dy, dx)
    s = d.integers(-px, px + 1, (2,))
    return shift_images(x, s[0], s[1])


def random_vflip(x, rng):
    """Mirror each image top-bottom with probability 0.5."""
    _need_images(x, "vflip")
    flip = _draws(rng, x).random() < 0.5
    out = x.copy()
    out[flip] = x[flip, ::-1]
    return out


def affine_images(x, mats, fill="nearest"):
    """out[n, i, j] = x[n] sampled bilinearly at (mats[n] applied to (i, j)): mats (N, 2, 3)
    maps an output pixel's (row, column, 1) to the source position. fill: what a source
    position outside the image reads (FILLS)."""
    _need_images(x, "rotate")
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    _affine(x, np.ascontiguousarray(mats, np.float32).reshape(len(x), 6), out, FILLS[fill])
    return out


def _about_centre(h, w, angles, scales):
    """(N, 2, 3) maps from output to source pixels for a rotation by `angles` (radians,
    anticlockwise on the screen) and a zoom by `scales` about the image centre."""
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    c, s = np.cos(angles) / scales, np.sin(angles) / scales
    m = np.empty((len(angles), 2, 3))
    # source = R(angle)^-1 (out - centre) / scale + centre, rows pointing down
    m[:, 0, 0], m[:, 0, 1] = c, s
    m[:, 1, 0], m[:, 1, 1] = -s, c
    m[:, 0, 2] = cy - c * cy - s * cx
    m[:, 1, 2] = cx + s * cy - c * cx
    return m


def random_rotate(x, degrees, fill, rng):
    """Rotate each image by a uniform angle in [-degrees, degrees] about its centre (bilinear)."""
    _need_images(x, "rotate")
    a = _draws(rng, x).uniform(-degrees, degrees) * (math.pi / 180.0)
    return affine_images(x, _about_centre(x.shape[1], x.shape[2], a, np.ones(len(x))), fill)


def random_zoom(x, fraction, fill, rng):
    """Scale each image by a uniform factor in [1 - fraction, 1 + fraction] about its centre (a
    factor above 1 magnifies: 1.25 shows the middle 80% of each side)."""
    _need_images(x, "zoom")
    z = _draws(rng, x).uniform(1.0 - fraction, 1.0 + fraction)
    return affine_images(x, _about_centre(x.shape[1], x.shape[2], np.zeros(len(x)), z), fill)


@kernel(parallel=False)
def _fill_index(q, n, mode):
    """The pixel a source index q (any integer) reads along an axis of n, or -1 for zeros."""
    if 0 <= q < n:
        return q
    if mode == 0:
        return -1
    if mode == 1:
        return 0 if q < 0 else n - 1
    if mode == 2:                                  # mirror: c b | a b c d | c b
        if n == 1:
            return 0
        r = q % (2 * n - 2)
        return r if r < n else 2 * n - 2 - r
    if mode == 3:                                  # reflect: b a | a b c d | d c
        r = q % (2 * n)
        return r if r < n else 2 * n - 1 - r
    return q % n                                   # wrap


@kernel
def _affine(x, mats, out, mode):
    n_, h, w, c = x.shape
    one = np.float32(1.0)
    for t in prange(n_ * h):
        n = t // h
        i = t % h
        for j in range(w):
            sy = mats[n, 0] * np.float32(i) + mats[n, 1] * np.float32(j) + mats[n, 2]
            sx = mats[n, 3] * np.float32(i) + mats[n, 4] * np.float32(j) + mats[n, 5]
            y0 = int(np.floor(sy))
            x0 = int(np.floor(sx))
            fy = sy - np.float32(y0)
            fx = sx - np.float32(x0)
            ya = _fill_index(y0, h, mode)
            yb = _fill_index(y0 + 1, h, mode)
            xa = _fill_index(x0, w, mode)
            xb = _fill_index(x0 + 1, w, mode)
            w00 = (one - fy) * (one - fx)
            w01 = (one - fy) * fx
            w10 = fy * (one - fx)
            w11 = fy * fx
            for cc in range(c):
                v = np.float32(0.0)
                if ya >= 0 and xa >= 0:
                    v += w00 * x[n, ya, xa, cc]
                if ya >= 0 and xb >= 0:
                    v += w01 * x[n, ya, xb, cc]
                if yb >= 0 and xa >= 0:
                    v += w10 * x[n, yb, xa, cc]
                if yb >= 0 and xb >= 0:
                    v += w11 * x[n, yb, xb, cc]
                out[n, i, j, cc] = v


def random_hflip(x, rng):
    """Mirror each image left-right with probability 0.5."""
    _need_images(x, "hflip")
    flip = _draws(rng, x).random() < 0.5
    out = x.copy()
    out[flip] = x[flip, :, ::-1]
    return out


def cutout_at(x, cy, cx, size):
    """Zero a size x size square centred at (cy[n], cx[n]) in image n, in all channels; the part
    of the square outside the image is dropped. out[n, i, j] = 0 where
    cy - size//2 <= i < cy - size//2 + size (and likewise for j), else x[n, i, j]."""
    n, h, w = x.shape[:3]
    y0 = np.asarray(cy, np.int64)[:, None] - size // 2
    x0 = np.asarray(cx, np.int64)[:, None] - size // 2
    ii = np.arange(h)[None, :]
    jj = np.arange(w)[None, :]
    rows = (ii >= y0) & (ii < y0 + size)              # (N, H)
    cols = (jj >= x0) & (jj < x0 + size)              # (N, W)
    keep = ~(rows[:, :, None] & cols[:, None, :])     # (N, H, W)
    return x * keep[..., None].astype(x.dtype)


def random_cutout(x, size, p, rng):
    """With probability p per image, zero a size x size square whose centre is uniform over the
    image (DeVries & Taylor 2017, "cutout"); squares near the border are clipped."""
    _need_images(x, "cutout")
    n, h, w = x.shape[:3]
    d = _draws(rng, x)
    cy = d.integers(0, h)
    cx = d.integers(0, w)
    hit = d.random() < p
    out = cutout_at(x, cy, cx, size)
    if not hit.all():
        out[~hit] = x[~hit]
    return out


def add_noise(x, std, rng):
    """Add N(0, std) to every value, then clip to [0, 1]."""
    out = _draws(rng, x).standard_normal(x.shape)
    out *= np.float32(std)
    out += x
    np.clip(out, 0.0, 1.0, out=out)
    return out


def flip_positions(x, n, rng):
    """n distinct pixel positions per image, as flat indices into H*W (or D for vectors):
    an (N, n) int array."""
    npix = _npix(x)
    if n > npix:
        raise FlowError(f"flip_pixels({n}): the images have only {npix} pixels")
    if n == npix:
        return np.broadcast_to(np.arange(npix), (len(x), npix))
    if n * 8 <= npix:
        # few positions: draw with replacement, redraw the rows that repeat one (rare)
        pos = rng.integers(0, npix, size=(len(x), n))
        while True:
            s = np.sort(pos, axis=1)
            dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
            if not dup.any():
                return pos
            pos[dup] = rng.integers(0, npix, size=(int(dup.sum()), n))
    keys = rng.random((len(x), npix), dtype=np.float32)
    return np.argpartition(keys, n - 1, axis=1)[:, :n]


def flip_pixels_at(x, pos):
    """Set the pixels at flat positions pos (N, n) to 1 - value, in all channels."""
    out = x.copy()
    npix = _npix(x)
    flat = out.reshape(len(x), npix, -1)  # a view of out
    rows = np.arange(len(x))[:, None]
    flat[rows, pos] = 1.0 - flat[rows, pos]
    return out


def random_flip_pixels(x, n, rng):
    """For n random pixel positions per image, set the value to 1 - value (all channels)."""
    d = _draws(rng, x)
    if d.rows is None:
        return flip_pixels_at(x, flip_positions(x, n, d.rng))
    proxy = np.broadcast_to(x[:1], (d.total,) + x.shape[1:])   # the global batch's shape, no copy
    return flip_pixels_at(x, flip_positions(proxy, n, d.rng)[d.rows])


def _npix(x):
    return x.shape[1] * x.shape[2] if x.ndim == 4 else int(np.prod(x.shape[1:]))


def _need_images(x, what):
    if x.ndim != 4:
        raise FlowError(f"augment {what} needs image input (N, H, W, C); this data has shape {x.shape[1:]}")


# ----------------------------------------------------------------------------------- Augmenter
class Augmenter:
    """The train block's augment list, applied in the order written."""

    def __init__(self, calls=(), seed=0):
        self.ops = []
        for c in calls or ():
            if c.name == "shift":
                self.ops.append(("shift", c.get("px", 2)))
            elif c.name in ("hflip", "vflip"):
                self.ops.append((c.name, None))
            elif c.name == "rotate":
                self.ops.append(("rotate", (float(c.get("degrees", 15.0)), c.get("fill", "nearest"))))
            elif c.name == "zoom":
                self.ops.append(("zoom", (float(c.get("fraction", 0.1)), c.get("fill", "nearest"))))
            elif c.name == "cutout":
                self.ops.append(("cutout", (int(c.get("size", 8)), float(c.get("p", 1.0)))))
            elif c.name == "noise":
                self.ops.append(("noise", float(c.get("std", 0.05))))
            elif c.name == "flip_pixels":
                self.ops.append(("flip_pixels", int(c.get("n", 5))))
            else:
                raise FlowError(f"unknown augmentation '{c.name}' (choose from cutout, flip_pixels, hflip, noise, "
                                f"rotate, shift, vflip, zoom)")
        self.calls = tuple(calls or ())
        self.rng = np.random.default_rng(seed)

    def __bool__(self):
        return bool(self.ops)

    def __repr__(self):
        return f"Augmenter([{', '.join(str(c) for c in self.calls)}])"

    def check(self, input_shape, file=None):
        """Refuse augmentations that cannot apply to the model input (C, H, W) or (N,)."""
        for name, arg in self.ops:
            if name in IMAGE_ONLY and len(input_shape) != 3:
                raise FlowError(f"augment {name} needs image input; the model input is a vector of "
                                f"{input_shape[0]}", file)
            if name == "cutout" and arg[0] > max(input_shape[1], input_shape[2]):
                raise FlowError(f"augment cutout({arg[0]}): larger than the {input_shape[2]}x"
                                f"{input_shape[1]} input", file)
            if name == "flip_pixels":
                npix = input_shape[1] * input_shape[2] if len(input_shape) == 3 else input_shape[0]
                if arg > npix:
                    raise FlowError(f"augment flip_pixels({arg}): the input has only {npix} pixels", file)

    def apply(self, x, rng=None, rows=None, total=None):
        """A new, augmented copy of the batch x (N, H, W, C) float32 (or (N, D) for noise and
        flip_pixels). rng: a numpy Generator (default: the one seeded at construction). rows,
        total: x is the rows `rows` of a global batch of `total` (a data-parallel rank's share):
        the draws are the global batch's, so every rank augments as one process would."""
        rng = self.rng if rng is None else _rng(rng)
        if rows is not None:
            rng = Draws(rng, len(x), rows, total)
        x = _as_batch(x)
        out = x
        for name, arg in self.ops:
            if name == "shift":
                out = random_shift(out, arg, rng)
            elif name == "hflip":
                out = random_hflip(out, rng)
            elif name == "vflip":
                out = random_vflip(out, rng)
            elif name == "rotate":
                out = random_rotate(out, arg[0], arg[1], rng)
            elif name == "zoom":
                out = random_zoom(out, arg[0], arg[1], rng)
            elif name == "cutout":
                out = random_cutout(out, arg[0], arg[1], rng)
            elif name == "noise":
                out = add_noise(out, arg, rng)
            else:
                out = random_flip_pixels(out, arg, rng)
        return out.copy() if out is x else out

    __call__ = apply


def perturb(x, shift=0, flip=0, rng=None):
    """`eval --perturb shift=S,flip=F`: a random shift of up to S pixels, then F flipped pixels per
    image. Deterministic given rng (a Generator or a seed). Returns a new array."""
    rng = _rng(rng)
    x = _as_batch(x)
    out = x
    if shift:
        out = random_shift(out, int(shift), rng)
    if flip:
        out = random_flip_pixels(out, int(flip), rng)
    return out.copy() if out is x else out


__all__ = ["Augmenter", "perturb", "shift_images", "flip_pixels_at", "flip_positions", "random_shift",
           "random_hflip", "random_vflip", "random_rotate", "random_zoom", "affine_images", "cutout_at", "random_cutout", "add_noise", "random_flip_pixels"]
