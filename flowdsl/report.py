"""report.png (loss and accuracy per epoch, the best epoch's test confusion matrix) and eval.png
(the confusion matrix of an evaluation), drawn with matplotlib's Agg backend. matplotlib is
imported only here, when a picture is written."""
from __future__ import annotations

import math
import os

import numpy as np

TRAIN, TEST, BEST = "#1f77b4", "#d62728", "#7f7f7f"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _finite(vals):
    return [v for v in vals if v is not None and math.isfinite(v)]


def _curves(ax, rows, key, title, best_epoch, accuracy):
    from matplotlib.ticker import MaxNLocator
    epochs = [int(r["epoch"]) for r in rows]
    drawn = []
    for name, color in (("train", TRAIN), ("test", TEST)):
        pts = [(e, r[f"{name}_{key}"]) for e, r in zip(epochs, rows) if math.isfinite(r[f"{name}_{key}"])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=color, marker="o", markersize=3.5, linewidth=1.8, label=name)
            drawn += ys
    if best_epoch:
        ax.axvline(best_epoch, color=BEST, linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})")
    ax.set_title(title, pad=26)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    if drawn:
        lo, hi = min(drawn), max(drawn)
        if accuracy:
            lo = max(0.0, math.floor((lo - 0.02) * 20) / 20)
            ax.set_ylim(lo, 1.0)
        else:
            ax.set_ylim(0.0, hi * 1.08 if hi > 0 else 1.0)
    if len(epochs) == 1:
        ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    # above the axes, between title and plot: a legend there never covers a curve
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False, fontsize=9,
              borderaxespad=0.2)


def _confusion(fig, ax, conf, classes, title):
    conf = np.asarray(conf, np.int64)
    k = conf.shape[0]
    from .data import class_names
    names = class_names(classes, k)
    frac = conf / conf.sum(axis=1, keepdims=True).clip(min=1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    bar.set_label("share of the true class")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    small = 12 if k <= 4 else 8 if k <= 10 else 7 if k <= 20 else 5
    turn = k * max(map(len, names)) > 40  # long names side by side would overlap
    ax.set_xticklabels([n[:14] for n in names], rotation=45 if turn else 0, ha="right" if turn else "center",
                       fontsize=small)
    ax.set_yticklabels([n[:14] for n in names], fontsize=small)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=small,
                        color="white" if frac[i, j] > 0.55 else "black")


def _save(fig, path):
    plt = _pyplot()
    tmp = str(path) + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    os.replace(tmp, path)


def write_report(hist, path, title=""):
    """report.png of a training run: loss and accuracy per epoch (train and test, the best epoch
    marked) and the test confusion matrix of the best epoch, the weights in best.npz."""
    _save(report_figure(hist, title), path)


def report_figure(hist, title=""):
    """The matplotlib figure of write_report (tests look at its axes)."""
    plt = _pyplot()
    rows = hist.rows
    conf = hist.best_confusion if getattr(hist, "best_confusion", None) is not None else hist.confusion
    best = int(getattr(hist, "best_epoch", 0) or 0)
    has_acc = any(_finite([r["train_acc"], r["test_acc"]]) for r in rows)
    ratios = [1.0] + [1.0] * has_acc + ([1.35] if conf is not None else [])
    fig = plt.figure(figsize=(5.2 * sum(ratios), 5.4), layout="constrained")
    axes = fig.subplots(1, len(ratios), width_ratios=ratios, squeeze=False)[0]
    _curves(axes[0], rows, "loss", "loss", best, accuracy=False)
    if not rows:
        axes[0].text(0.5, 0.5, "no epoch finished", ha="center", va="center", transform=axes[0].transAxes)
    if has_acc:
        _curves(axes[1], rows, "acc", "accuracy", best, accuracy=True)
    if conf is not None:
        shown = f"epoch {best}, the weights in best.npz" if best and hist.best_confusion is not None \
            else f"epoch {int(rows[-1]['epoch'])}" if rows else ""
        _confusion(fig, axes[-1], conf, hist.classes,
                   f"test confusion matrix\n({shown})" if shown else "test confusion matrix")
    if title:
        fig.suptitle(title, fontsize=11, x=0.01, ha="left")
    return fig


def write_confusion(conf, classes, path, title):
    """eval.png: one confusion matrix."""
    _save(confusion_figure(conf, classes, title), path)


def confusion_figure(conf, classes, title):
    plt = _pyplot()
    k = np.asarray(conf).shape[0]
    side = max(5.5, min(14.0, 0.45 * k + 3.0))
    fig = plt.figure(figsize=(side + 1.2, side), layout="constrained")
    _confusion(fig, fig.add_subplot(1, 1, 1), conf, classes, title)
    return fig


def write_errors(x, y, probs, classes, path, most=100):
    """errors.png: up to `most` misclassified images (Nielsen's sheet of the 33 mistakes), the
    most confident mistakes first, each titled with its true class, the prediction and its
    probability. x: the images (N, H, W, C), or a function of indices giving those images (only
    the drawn ones are asked for). Returns the number of mistakes drawn (0: nothing is written)."""
    from .data import class_names
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != y)
    if not len(wrong):
        return 0
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:most]
    imgs = x(wrong) if callable(x) else x[wrong]
    names = class_names(classes, probs.shape[1])
    plt = _pyplot()
    cols = min(10, len(wrong))
    rows = math.ceil(len(wrong) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i, img in zip(axes.ravel(), wrong, imgs):
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"true {names[y[i]][:12]}\npred {names[pred[i]][:12]} {probs[i, pred[i]]:.2f}", fontsize=7)
    fig.suptitle(f"{len(wrong)} misclassified (most confident first)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (1.9 * rows)))
    _save(fig, path)
    return len(wrong)
