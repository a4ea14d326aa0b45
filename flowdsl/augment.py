"""Training-time augmentation (`augment = [shift(2), hflip, cutout(8), noise(0.05), flip_pixels(5)]`) and the
perturbations of `eval --perturb shift=2,flip=5`. Vectorised numpy on NHWC float32 batches in
[0, 1]; every function returns a new array and never modifies its input."""
from __future__ import annotations

import numpy as np

from .errors import FlowError

IMAGE_ONLY = ("shift", "hflip", "cutout")


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
    """Random integer translation in [-px, px] on each axis, per image, zero fill."""
    _need_images(x, "shift")
    d = rng.integers(-px, px + 1, size=(2, len(x)))
    return shift_images(x, d[0], d[1])


def random_hflip(x, rng):
    """Mirror each image left-right with probability 0.5."""
    _need_images(x, "hflip")
    flip = rng.random(len(x)) < 0.5
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
    cy = rng.integers(0, h, size=n)
    cx = rng.integers(0, w, size=n)
    hit = rng.random(n) < p
    out = cutout_at(x, cy, cx, size)
    if not hit.all():
        out[~hit] = x[~hit]
    return out


def add_noise(x, std, rng):
    """Add N(0, std) to every value, then clip to [0, 1]."""
    out = rng.standard_normal(x.shape, dtype=np.float32)
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
    return flip_pixels_at(x, flip_positions(x, n, rng))


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
                self.ops.append(("shift", int(c.get("px", 2))))
            elif c.name == "hflip":
                self.ops.append(("hflip", None))
            elif c.name == "cutout":
                self.ops.append(("cutout", (int(c.get("size", 8)), float(c.get("p", 1.0)))))
            elif c.name == "noise":
                self.ops.append(("noise", float(c.get("std", 0.05))))
            elif c.name == "flip_pixels":
                self.ops.append(("flip_pixels", int(c.get("n", 5))))
            else:
                raise FlowError(f"unknown augmentation '{c.name}' (choose from cutout, flip_pixels, hflip, noise, shift)")
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

    def apply(self, x, rng=None):
        """A new, augmented copy of the batch x (N, H, W, C) float32 (or (N, D) for noise and
        flip_pixels). rng: a numpy Generator (default: the one seeded at construction)."""
        rng = self.rng if rng is None else _rng(rng)
        x = _as_batch(x)
        out = x
        for name, arg in self.ops:
            if name == "shift":
                out = random_shift(out, arg, rng)
            elif name == "hflip":
                out = random_hflip(out, rng)
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
           "random_hflip", "cutout_at", "random_cutout", "add_noise", "random_flip_pixels"]
