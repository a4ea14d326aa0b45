"""Focus: a layer's activations as grayscale PNGs (NeuroFlow's `net focus layer`).

Per input and layer: `<layer>-<channel>-<input>.png`, one per channel, scaled per channel from
its min..max to 0..255 (a constant map is mid-gray; scale="percentile" clips to the 1st..99th
percentile instead, so a few bright pixels do not leave a deep layer's map almost black), and,
for layers of two or more channels, `<layer>-grid-<input>.png`: every channel tiled with a gap,
each tile at least GRID_MIN_SIDE pixels and labelled with its channel number. Maps smaller than
MIN_SIDE pixels are enlarged by a whole factor with nearest-neighbour, so a 2x2 map stays
visible and its pixels stay square. Dense layers (vectors) are drawn as a bar strip in the grid
file. `kernels` draws a conv layer's filters in colour: one row per filter, one tile per input
channel, red for positive weights and blue for negative ones, white for zero."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

MIN_SIDE = 32       # maps smaller than this are enlarged (whole factor, nearest neighbour)
GRID_MIN_SIDE = 64  # grid tiles are enlarged to at least this many pixels a side
KERNEL_MIN_SIDE = 24  # and each kernel tile to at least this
GAP = 1             # pixels between grid tiles
GAP_VALUE = 255     # grid background: white
SCALES = ("minmax", "percentile")


def to_uint8(a, scale="minmax") -> np.ndarray:
    """Scale one map from its min..max (scale="percentile": its 1st..99th percentile, values
    beyond clipped) to 0..255. Constant (or empty) maps are mid-gray; NaN and infinities are
    replaced (NaN -> the minimum) so nothing divides by zero or wraps."""
    a = np.asarray(a, np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.full(a.shape, 128, np.uint8)
    if scale == "percentile":
        lo, hi = np.percentile(a[finite], [1.0, 99.0])
        if hi - lo <= 1e-12 * max(1.0, abs(hi), abs(lo)):   # mostly constant: fall back to min..max
            lo, hi = a[finite].min(), a[finite].max()
    else:
        lo, hi = a[finite].min(), a[finite].max()
    a = np.where(finite, a, np.where(np.isposinf(a), hi, lo))
    if hi - lo <= 1e-12 * max(1.0, abs(hi), abs(lo)):
        return np.full(a.shape, 128, np.uint8)
    return np.clip(np.rint((a - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def upscale_factor(h, w) -> int:
    return max(1, math.ceil(MIN_SIDE / max(1, min(h, w))))


def _enlarge(img, k):
    return img if k == 1 else np.kron(img, np.ones((k, k), np.uint8))


def grid(maps_u8, cols=None, gap=GAP, fill=GAP_VALUE) -> np.ndarray:
    """Tile a list of equally sized uint8 maps (H, W) or RGB tiles (H, W, 3) with `gap` pixels
    between them."""
    n = len(maps_u8)
    h, w = maps_u8[0].shape[:2]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap) + maps_u8[0].shape[2:], fill,
                  np.uint8)
    for i, m in enumerate(maps_u8):
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = m
    return out


def _label(tile, text):
    """The tile with `text` (its channel number) in a small dark box at its top-left corner."""
    from PIL import ImageDraw, ImageFont
    img = Image.fromarray(tile, "L")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # pillow < 10.1
        font = ImageFont.load_default()
    x0, y0, x1, y1 = d.textbbox((2, 1), text, font=font)
    d.rectangle((0, 0, x1 + 2, y1 + 2), fill=0)
    d.text((2, 1), text, fill=255, font=font)
    return np.asarray(img)


def labelled_grid(maps_u8) -> np.ndarray:
    """The grid file's picture: each map enlarged to at least GRID_MIN_SIDE pixels a side
    (whole factor, nearest neighbour), its channel number on it, a 2-pixel gap between tiles."""
    h, w = maps_u8[0].shape
    k = max(1, math.ceil(GRID_MIN_SIDE / max(1, min(h, w))))
    return grid([_label(_enlarge(m, k), str(i)) for i, m in enumerate(maps_u8)], gap=2)


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


def write_pngs(layer, acts, png_dir, names=None, scale="minmax"):
    """Write the PNGs of one layer's activations (N, H, W, C) or (N, D). Returns the paths.
    A layer of one channel gets no grid file (it would repeat the channel's own file)."""
    if scale not in SCALES:
        from .errors import FlowError
        raise FlowError(f"unknown focus scale '{scale}' (choose from {', '.join(SCALES)})")
    os.makedirs(png_dir, exist_ok=True)
    acts = np.asarray(acts)
    names = list(names) if names is not None else [str(i) for i in range(len(acts))]
    paths = []
    for a, nm in zip(acts, names):
        if a.ndim == 3:
            h, w, c = a.shape
            k = upscale_factor(h, w)
            raw = [to_uint8(a[:, :, ch], scale) for ch in range(c)]
            for ch, m in enumerate(raw):
                p = os.path.join(png_dir, f"{layer.name}-{ch}-{nm}.png")
                Image.fromarray(_enlarge(m, k), "L").save(p)
                paths.append(p)
            if c == 1:
                continue
            g = labelled_grid(raw)
        else:
            g = bars(a.reshape(-1))
        p = os.path.join(png_dir, f"{layer.name}-grid-{nm}.png")
        Image.fromarray(g, "L").save(p)
        paths.append(p)
    return paths


def diverging(a) -> np.ndarray:
    """RGB (H, W, 3) of a kernel: white at 0, red for positive, blue for negative weights, on a
    scale symmetric about 0 (the tile's largest |weight| is full colour), so signs can be read."""
    a = np.nan_to_num(np.asarray(a, np.float64))
    m = np.abs(a).max()
    t = a / m if m > 0 else np.zeros_like(a)
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    r = 255 * (1 - neg * 0.85)
    g = 255 * (1 - np.maximum(pos, neg) * 0.85)
    b = 255 * (1 - pos * 0.85)
    return np.rint(np.stack([r, g, b], axis=-1)).astype(np.uint8)


def kernel_png(layer, w, png_dir, tile=None):
    """Draw a conv layer's weights (F, F, C, K): one row per filter, one tile per input channel
    (at most 16 channels shown; with one input channel the filters fill a grid), each tile in diverging colours on its own symmetric scale and
    at least KERNEL_MIN_SIDE pixels a side."""
    os.makedirs(png_dir, exist_ok=True)
    f, _, c, k = w.shape
    t = tile or max(math.ceil(KERNEL_MIN_SIDE / f), 48 // f)
    shown = min(c, 16)
    tiles = [np.kron(diverging(w[:, :, ch, fi]), np.ones((t, t, 1), np.uint8))
             for fi in range(k) for ch in range(shown)]
    # one input channel: the filters wrap into a square-ish grid instead of one tall column
    g = grid(tiles, cols=shown if shown > 1 else math.ceil(math.sqrt(k)), gap=2, fill=96)  # gray: 0 is white
    p = os.path.join(png_dir, f"{layer.name}-kernels.png")
    Image.fromarray(g, "RGB").save(p)
    return p


# ------------------------------------------------------------------------ where the net looks
def upsample(maps, h, w):
    """(N, h0, w0) float maps to (N, h, w), bilinear (pillow's, on float32 images)."""
    from PIL import Image
    maps = np.asarray(maps, np.float32)
    if maps.shape[1:] == (h, w):
        return maps
    return np.stack([np.asarray(Image.fromarray(m, "F").resize((w, h), Image.BILINEAR), np.float32)
                     for m in maps])


def jet(v):
    """A jet-style colour table in numpy: v in [0, 1] (any shape) -> RGB uint8 (shape + (3,))."""
    v = np.clip(np.asarray(v, np.float32), 0, 1)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * v - k), 0, 1) for k in (3, 2, 1)], axis=-1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def overlay(image, heat, alpha=0.4):
    """image (H, W, C) in [0, 1] (C = 1 or 3) under a jet colouring of heat (H, W) scaled to its
    max: (1 - alpha) * image + alpha * colour (alpha 0.4, as keras-io's Grad-CAM example)."""
    img = np.asarray(image, np.float32)
    img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]
    top = float(heat.max())
    col = jet(heat / top if top > 0 else heat).astype(np.float32) / 255
    return (np.clip((1 - alpha) * img + alpha * col, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_heat(maps, images, png_dir, stem, names):
    """`<stem>-<input>.png` (the map, gray, scaled to its max) and `<stem>-overlay-<input>.png`
    for each input; returns (paths, names of inputs whose map is zero everywhere)."""
    from PIL import Image
    os.makedirs(png_dir, exist_ok=True)
    paths, empty = [], []
    for m, img, nm in zip(maps, images, names):
        top = float(m.max())
        if not top > 0:
            empty.append(nm)
        g = np.zeros(m.shape, np.uint8) if not top > 0 else (np.clip(m / top, 0, 1) * 255 + 0.5).astype(np.uint8)
        for suffix, arr in ((f"{stem}-{nm}.png", g), (f"{stem}-overlay-{nm}.png", overlay(img, m))):
            path = os.path.join(png_dir, suffix)
            Image.fromarray(arr).save(path)
            paths.append(path)
    return paths, empty


def filters_png(images, png_dir, layer_name):
    """The filter images (K, H, W, C) in [0, 1], tiled into `<layer>-filters.png`."""
    from PIL import Image
    k, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    up = upscale_factor(h, w)
    tile_h, tile_w = h * up, w * up
    sheet = np.full((rows * (tile_h + GAP) + GAP, cols * (tile_w + GAP) + GAP, 3), GAP_VALUE, np.uint8)
    for i in range(k):
        im = images[i] - images[i].min()   # each tile stretched to its own range (contrast)
        top = float(im.max())
        im = (im / top * 255 + 0.5).astype(np.uint8) if top > 0 else np.full(im.shape, 128, np.uint8)
        im = np.repeat(im, 3, axis=2) if c == 1 else im[..., :3]
        im = im.repeat(up, axis=0).repeat(up, axis=1)
        r, q = divmod(i, cols)
        y0, x0 = GAP + r * (tile_h + GAP), GAP + q * (tile_w + GAP)
        sheet[y0:y0 + tile_h, x0:x0 + tile_w] = im
    os.makedirs(png_dir, exist_ok=True)
    path = os.path.join(png_dir, f"{layer_name}-filters.png")
    Image.fromarray(sheet).save(path)
    return path
