"""Does c3 look at the eyes? Compare the glasses net's focus maps before and after training.

    python examples/glasses/measure_focus.py runs/glasses/best.npz [--layer c3] [--flow FILE]

For every avatar in eyes.csv (the eye region and face box drawn by make_avatars.py), the layer's
activation map is averaged inside the eye region, over the rest of the face, and over the whole
map. Printed for the initialised net (the "before" picture of `flowdsl focus` without weights)
and for the trained one:
  eye/face   mean inside the eye region over the mean on the rest of the face
  eye/map    mean inside the eye region over the mean of the whole map
  glasses/no mean eye-region activation of avatars with glasses over those without
  cam eye share   the share of the HiResCAM map's mass (for the predicted class) inside the
                  eye region (the eye boxes cover about 5.5% of an avatar), over all avatars and
                  over those with glasses
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def measures(net, layer, x, rows):
    acts = net.focus(layer, x)[..., 0]
    scale = 400 // acts.shape[1]
    eye_m, face_m, map_m, cls = [], [], [], []
    yy, xx = np.mgrid[:acts.shape[1], :acts.shape[2]]
    for r, m in zip(rows, acts):
        x0, y0, x1, y1 = (int(r[k]) // scale for k in ("x0", "y0", "x1", "y1"))
        fx0, fy0, fx1, fy1 = (int(r[k]) / scale for k in ("fx0", "fy0", "fx1", "fy1"))
        face = (((yy - (fy0 + fy1) / 2) / ((fy1 - fy0) / 2)) ** 2
                + ((xx - (fx0 + fx1) / 2) / ((fx1 - fx0) / 2)) ** 2) <= 1
        eye = np.zeros(m.shape, bool)
        eye[y0:y1, x0:x1] = True
        eye_m.append(m[eye].mean())
        face_m.append(m[face & ~eye].mean())
        map_m.append(m.mean())
        cls.append(r["class"] == "glasses")
    eye_m, face_m, map_m, cls = map(np.asarray, (eye_m, face_m, map_m, cls))
    tiny = 1e-12
    return {"eye/face": eye_m.mean() / max(face_m.mean(), tiny),
            "eye/map": eye_m.mean() / max(map_m.mean(), tiny),
            "glasses/no": eye_m[cls].mean() / max(eye_m[~cls].mean(), tiny)}


def cam_share(net, layer, x, rows, chunk=16):
    """The share of the HiResCAM map's mass (at `layer`, upsampled to 400x400) inside the eye
    region: for the predicted class over all avatars and over the avatars with glasses, and for
    the class 'glasses' (index 0: classes are the sorted folder names) over the avatars with it."""
    def shares(cls):
        out = []
        for i in range(0, len(x), chunk):
            maps = net.gradcam(x[i:i + chunk], layer, cls, "hirescam")
            for r, m in zip(rows[i:i + chunk], maps):
                x0, y0, x1, y1 = (int(r[k]) for k in ("x0", "y0", "x1", "y1"))
                total = float(m.sum())
                out.append(float(m[y0:y1, x0:x1].sum()) / total if total > 0 else 0.0)
        return np.asarray(out)
    pred, as_glasses = shares(None), shares(0)
    glasses = np.array([r["class"] == "glasses" for r in rows])
    return {"cam eye share": pred.mean(), "cam eye share (glasses)": pred[glasses].mean(),
            "cam eye share (glasses, class glasses)": as_glasses[glasses].mean()}


def main(argv=None):
    import flowdsl
    from flowdsl.data import load_image_files
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("weights")
    ap.add_argument("--layer", default="c3")
    ap.add_argument("--flow", default=str(HERE.parent / "glasses.flow"),
                    help="the .flow file the weights belong to (default: examples/glasses.flow)")
    ap.add_argument("--every", type=int, default=5, help="use every n-th avatar (speed)")
    ap.add_argument("--heldout", action="store_true",
                    help="only the avatars the .flow file's split(...) holds out for testing")
    a = ap.parse_args(argv)
    rows = sorted(csv.DictReader(open(HERE / "eyes.csv")), key=lambda r: (r["class"], r["file"]))
    if a.heldout:   # the split depends on the labels and the seed only: the same avatars as training's
        from flowdsl.data import as_dataset, split
        from flowdsl.model import load_model
        m = load_model(a.flow)
        labels = np.array([r["class"] != "glasses" for r in rows], np.int64)   # classes in sorted order
        frac = m.train["test"]["fraction"]
        _, test = split(as_dataset(np.zeros((len(rows), 1), np.float32), labels), frac, m.train["seed"])
        rows = [rows[i] for i in test.rows]
    else:
        rows = rows[:: a.every]
    x = load_image_files([HERE / r["file"] for r in rows], (3, 400, 400))
    flow = a.flow
    net0, net1 = flowdsl.load(flow), flowdsl.load(flow, weights=a.weights)
    before = {**measures(net0, a.layer, x, rows), **cam_share(net0, a.layer, x, rows)}
    after = {**measures(net1, a.layer, x, rows), **cam_share(net1, a.layer, x, rows)}
    print(f"{a.layer} on {len(rows)} avatars{'':27s} before   after")
    for k in before:
        print(f"  {k:38s}  {before[k]:7.3f} {after[k]:7.3f}")
    return before, after


if __name__ == "__main__":
    main()
