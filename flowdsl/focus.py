"""Focus: a layer's activations as grayscale PNGs (NeuroFlow's `net focus layer`).

Per input and layer: `<layer>-<channel>-<input>.png`, one per channel, scaled per channel from
its min..max to 0..255 (a constant map is mid-gray), and `<layer>-grid-<input>.png`, every
channel tiled with a 1-pixel gap. Maps smaller than MIN_SIDE pixels are enlarged by a whole
factor with nearest-neighbour, so a 2x2 map stays visible and its pixels stay square. Dense
layers (vectors) are drawn as a bar strip in the grid file. `kernels` draws a conv layer's
filters: one row per filter, one tile per input channel."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

MIN_SIDE = 32       # maps smaller than this are enlarged (whole factor, nearest neighbour)
GAP = 1             # pixels between grid tiles
GAP_VALUE = 255     # grid background: white


def to_uint8(a) -> np.ndarray:
    """Scale one map from its min..max to 0..255. Constant (or empty) maps are mid-gray; NaN
    and infinities are replaced (NaN -> the minimum) so nothing divides by zero or wraps."""
    a = np.asarray(a, np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.full(a.shape, 128, np.uint8)
    lo, hi = a[finite].min(), a[finite].max()
    a = np.where(finite, a, np.where(np.isposinf(a), hi, lo))
    if hi - lo <= 1e-12 * max(1.0, abs(hi), abs(lo)):
        return np.full(a.shape, 128, np.uint8)
    return np.clip(np.rint((a - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def upscale_factor(h, w) -> int:
    return max(1, math.ceil(MIN_SIDE / max(1, min(h, w))))


def _enlarge(img, k):
    return img if k == 1 else np.kron(img, np.ones((k, k), np.uint8))


def grid(maps_u8, cols=None) -> np.ndarray:
    """Tile a list of equally sized uint8 maps with GAP pixels between them."""
    n = len(maps_u8)
    h, w = maps_u8[0].shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * h + (rows - 1) * GAP, cols * w + (cols - 1) * GAP), GAP_VALUE, np.uint8)
    for i, m in enumerate(maps_u8):
        r, c = divmod(i, cols)
        out[r * (h + GAP):r * (h + GAP) + h, c * (w + GAP):c * (w + GAP) + w] = m
    return out


def bars(v, height=80, unit=None) -> np.ndarray:
    """A vector as a strip of vertical bars (white on black), scaled from min..max; a zero line
    is drawn in gray when the values change sign."""
    v = np.nan_to_num(np.asarray(v, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    d = len(v)
    unit = unit or max(2, min(24, 480 // max(1, d)))
    lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
    span = hi - lo if hi - lo > 1e-12 else 1.0
    img = np.zeros((height, d * unit), np.uint8)
    zero = int(round((hi - 0.0) / span * (height - 1)))
    for i, x in enumerate(v):
        y = int(round((hi - x) / span * (height - 1)))
        a, b = sorted((y, zero))
        img[a:b + 1, i * unit:(i + 1) * unit - (1 if unit > 2 else 0)] = 255
    if lo < 0 < hi:
        img[zero, :] = np.maximum(img[zero, :], 128)
    return img


def write_pngs(layer, acts, png_dir, names=None):
    """Write the PNGs of one layer's activations (N, H, W, C) or (N, D). Returns the paths."""
    os.makedirs(png_dir, exist_ok=True)
    acts = np.asarray(acts)
    names = list(names) if names is not None else [str(i) for i in range(len(acts))]
    paths = []
    for a, nm in zip(acts, names):
        if a.ndim == 3:
            h, w, c = a.shape
            k = upscale_factor(h, w)
            maps = [_enlarge(to_uint8(a[:, :, ch]), k) for ch in range(c)]
            for ch, m in enumerate(maps):
                p = os.path.join(png_dir, f"{layer.name}-{ch}-{nm}.png")
                Image.fromarray(m, "L").save(p)
                paths.append(p)
            g = grid(maps)
        else:
            g = bars(a.reshape(-1))
        p = os.path.join(png_dir, f"{layer.name}-grid-{nm}.png")
        Image.fromarray(g, "L").save(p)
        paths.append(p)
    return paths


def kernel_png(layer, w, png_dir, tile=None):
    """Draw a conv layer's weights (F, F, C, K): one row per filter, one tile per input channel
    (at most 16 channels shown), each tile scaled on its own."""
    os.makedirs(png_dir, exist_ok=True)
    f, _, c, k = w.shape
    t = tile or max(1, 48 // f)
    shown = min(c, 16)
    tiles = [_enlarge(to_uint8(w[:, :, ch, fi]), t) for fi in range(k) for ch in range(shown)]
    g = grid(tiles, cols=shown)
    p = os.path.join(png_dir, f"{layer.name}-kernels.png")
    Image.fromarray(g, "L").save(p)
    return p
