"""report.png: loss and accuracy curves per epoch and the test confusion matrix, drawn with
pillow alone (no plotting library)."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

W, H = 1200, 440
COL = {"train": (31, 119, 180), "test": (214, 39, 40), "axis": (60, 60, 60), "grid": (225, 225, 225)}


def _font(size=13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow < 10.1
        return ImageFont.load_default()


def _plot(d, box, title, series, ylabel):
    x0, y0, x1, y1 = box
    f, fs = _font(15), _font(12)
    d.text((x0, y0 - 30), title, fill=COL["axis"], font=f)
    vals = [v for _, ys, _ in series for v in ys if v is not None and math.isfinite(v)]
    n = max((len(ys) for _, ys, _ in series), default=0)
    d.rectangle(box, outline=COL["axis"])
    if not vals or n == 0:
        d.text((x0 + 10, y0 + 10), "no data", fill=COL["axis"], font=fs)
        return
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.08
    lo, hi = lo - pad, hi + pad
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        y = y1 - (v - lo) / (hi - lo) * (y1 - y0)
        d.line([(x0, y), (x1, y)], fill=COL["grid"])
        d.text((x0 - 52, y - 7), f"{v:.3g}", fill=COL["axis"], font=fs)
    xs = lambda i: x0 + (x1 - x0) * ((i + 0.5) / n)  # noqa: E731
    for i in range(n):
        if n <= 20 or i % max(1, n // 10) == 0:
            d.text((xs(i) - 4, y1 + 6), str(i + 1), fill=COL["axis"], font=fs)
    d.text(((x0 + x1) / 2 - 20, y1 + 22), "epoch", fill=COL["axis"], font=fs)
    d.text((x0 - 52, y0 - 14), ylabel, fill=COL["axis"], font=fs)
    ly = y0 + 8
    for name, ys, color in series:
        pts = [(xs(i), y1 - (v - lo) / (hi - lo) * (y1 - y0)) for i, v in enumerate(ys)
               if v is not None and math.isfinite(v)]
        if not pts:
            continue
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
        d.line([(x1 - 90, ly + 7), (x1 - 70, ly + 7)], fill=color, width=3)
        d.text((x1 - 64, ly), name, fill=COL["axis"], font=fs)
        ly += 18


def _confusion(d, box, conf, classes):
    x0, y0, x1, y1 = box
    f, fs = _font(15), _font(11)
    d.text((x0, y0 - 30), "test confusion matrix (rows: true, columns: predicted)", fill=COL["axis"], font=f)
    if conf is None:
        d.rectangle(box, outline=COL["axis"])
        d.text((x0 + 10, y0 + 10), "no test set", fill=COL["axis"], font=fs)
        return
    k = conf.shape[0]
    names = [str(c) for c in (classes or range(k))][:k]
    names += [str(i) for i in range(len(names), k)]
    lab = min(90, max(len(s) for s in names) * 7 + 6)
    cell = max(4, min((x1 - x0 - lab) // k, (y1 - y0 - 20) // k))
    gx, gy = x0 + lab, y0
    row_tot = conf.sum(axis=1, keepdims=True).clip(min=1)
    frac = conf / row_tot
    for i in range(k):
        d.text((x0, gy + i * cell + cell / 2 - 6), names[i][:12], fill=COL["axis"], font=fs)
        for j in range(k):
            v = frac[i, j]
            shade = int(255 - 215 * v)
            color = (shade, shade, 255) if i == j else (255, shade, shade)
            d.rectangle([gx + j * cell, gy + i * cell, gx + (j + 1) * cell - 1, gy + (i + 1) * cell - 1], fill=color)
            if cell >= 24:
                txt = str(int(conf[i, j]))
                d.text((gx + j * cell + 3, gy + i * cell + cell / 2 - 6), txt,
                       fill=(0, 0, 0) if v < 0.6 else (255, 255, 255), font=fs)
    for j in range(k):
        d.text((gx + j * cell + 2, gy + k * cell + 4), names[j][:max(1, cell // 7)], fill=COL["axis"], font=fs)


def write_report(hist, path, title=""):
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((20, 8), title, fill=COL["axis"], font=_font(16))
    rows = hist.rows
    _plot(d, (70, 70, 370, 380), "loss", [("train", [r["train_loss"] for r in rows], COL["train"]),
                                        ("test", [r["test_loss"] for r in rows], COL["test"])], "")
    _plot(d, (470, 70, 770, 380), "accuracy", [("train", [r["train_acc"] for r in rows], COL["train"]),
                                              ("test", [r["test_acc"] for r in rows], COL["test"])], "")
    _confusion(d, (830, 70, 1190, 400), hist.confusion, hist.classes)
    tmp = str(path) + ".tmp.png"
    img.save(tmp)
    import os
    os.replace(tmp, path)
