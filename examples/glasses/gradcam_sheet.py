"""The glasses demo's answer to NeuroFlow's question, as one picture: for an avatar with glasses
and one without, the input, c3's activation and HiResCAM's map at c3 over the input.

    python examples/glasses/gradcam_sheet.py runs/glasses/best.npz [--out docs/gradcam-glasses.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def main(argv=None):
    import flowdsl
    from flowdsl.data import load_image_files
    from flowdsl.focus import overlay, to_uint8, upsample
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("weights")
    ap.add_argument("--out", default=str(HERE.parent.parent / "docs" / "gradcam-glasses.png"))
    ap.add_argument("--size", type=int, default=200, help="side of each tile in pixels")
    a = ap.parse_args(argv)
    net = flowdsl.load(HERE.parent / "glasses.flow", weights=a.weights)
    files = [HERE / "glasses" / "000.png", HERE / "noglasses" / "000.png"]
    x = load_image_files(files, net.model.input_shape)
    act = upsample(net.focus("c3", x)[..., 0], 400, 400)
    cam = net.gradcam(x, "c3", method="hirescam")
    s = a.size
    rows = []
    for i in range(len(files)):
        tiles = [(x[i] * 255 + 0.5).astype(np.uint8),
                 np.repeat(to_uint8(act[i])[..., None], 3, axis=2),
                 overlay(x[i], cam[i])]
        rows.append(np.concatenate([np.asarray(Image.fromarray(t).resize((s, s), Image.BILINEAR)) for t in tiles], 1))
    Image.fromarray(np.concatenate(rows, 0)).save(a.out)
    print(f"wrote {a.out}: rows {', '.join(f.parent.name for f in files)}; columns input, c3 activation, "
          f"HiResCAM at c3 for the predicted class")


if __name__ == "__main__":
    main()
