"""Focus (flowdsl/focus.py, Net.focus, `flowdsl focus`): scaling edge cases, file names and sizes,
unknown names, --all, --kernels, dense bar strips."""
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, toy_set
from PIL import Image

import flowdsl
from flowdsl.errors import FlowError
from flowdsl.focus import GRID_MIN_SIDE, MIN_SIDE, bars, grid, to_uint8, upscale_factor

NET = """c1 = conv(12x10x3, filters=4, field=3, pad=1, act=relu)
p1 = maxpool
c2 = conv(filters=2, field=3, act=tanh)
network = c1 :: p1 :: c2 :: flatten :: dense(5, act=relu) :: dense(2) :: softmax
"""


def test_scaling_min_to_0_max_to_255():
    a = np.array([[-3.0, -1.0], [1.0, 5.0]], np.float32)
    u = to_uint8(a)
    assert u.dtype == np.uint8 and u.min() == 0 and u.max() == 255
    assert u[0, 1] == round((-1 + 3) / 8 * 255)


def test_scaling_constant_map_is_mid_gray_and_no_wraparound():
    assert (to_uint8(np.full((3, 3), 7.5)) == 128).all()
    assert (to_uint8(np.zeros((2, 2))) == 128).all()
    big = to_uint8(np.array([0.0, 1e30, 2e30]))   # no overflow or wrap-around
    assert list(big) == [0, 128, 255]


def test_scaling_nan_and_inf_free():
    a = np.array([np.nan, 1.0, np.inf, -np.inf, 3.0])
    u = to_uint8(a)
    assert u.dtype == np.uint8
    assert u[1] < u[4] and u[2] == 255 and u[3] == 0 and u[0] == 0
    assert (to_uint8(np.array([np.nan, np.nan])) == 128).all()


def test_grid_and_bars_geometry():
    maps = [np.full((3, 5), i * 40, np.uint8) for i in range(5)]
    g = grid(maps)  # 3 columns, 2 rows, 1-pixel gaps
    assert g.shape == (2 * 3 + 1, 3 * 5 + 2)
    assert (g[3, :] == 255).all() and (g[:, 5] == 255).all()
    assert (g[0:3, 0:5] == 0).all() and (g[4:7, 6:11] == 160).all()
    b = bars(np.array([1.0, -1.0, 0.5]), height=40, unit=10)
    assert b.shape == (40, 30) and b.max() == 255
    assert bars(np.array([np.nan, 2.0])).max() == 255


def test_net_focus_writes_pngs_per_channel_and_grid(tmp_path):
    net = flowdsl.parse(NET)
    x = np.random.default_rng(0).random((2, 10, 12, 3), dtype=np.float32)
    acts = net.focus("c1", x, png_dir=str(tmp_path), names=["a", "b"])
    assert acts.shape == (2, 10, 12, 4) and acts.dtype == np.float32
    k = upscale_factor(10, 12)
    assert k == -(-MIN_SIDE // 10)
    for ch in range(4):
        for nm in ("a", "b"):
            im = Image.open(tmp_path / f"c1-{ch}-{nm}.png")
            assert im.mode == "L" and im.size == (12 * k, 10 * k)
            arr = np.asarray(im)
            assert arr.min() < arr.max() or (arr == 128).all()
    g = Image.open(tmp_path / "c1-grid-a.png")
    kg = -(-GRID_MIN_SIDE // 10)   # grid tiles: at least GRID_MIN_SIDE a side, 2-pixel gaps
    assert g.size == (2 * 12 * kg + 2, 2 * 10 * kg + 2)
    # the per-channel PNG is the activation, scaled and enlarged
    a0 = to_uint8(acts[0, :, :, 0])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "c1-0-a.png"))[::k, ::k], a0)


def test_large_maps_keep_their_size(tmp_path):
    net = flowdsl.parse("conv(40x33x1, filters=2, field=3, pad=1) :: dense(2) :: softmax")
    net.focus("conv1", np.ones((1, 33, 40, 1), np.float32), png_dir=str(tmp_path))
    assert Image.open(tmp_path / "conv1-0-0.png").size == (40, 33)


def test_dense_layers_are_bar_strips(tmp_path):
    net = flowdsl.parse(NET)
    acts = net.focus("dense1", np.ones((1, 10, 12, 3), np.float32), png_dir=str(tmp_path))
    assert acts.shape == (1, 5)
    im = Image.open(tmp_path / "dense1-grid-0.png")
    assert im.mode == "L" and im.size[0] >= 5
    assert not list(tmp_path.glob("dense1-0-*.png"))


def test_unknown_layer_lists_the_names():
    net = flowdsl.parse(NET)
    with pytest.raises(FlowError) as e:
        net.focus("c9", np.ones((1, 10, 12, 3), np.float32))
    for name in ("c1", "p1", "c2", "dense1"):
        assert name in e.value.message


@pytest.fixture()
def model_and_image(tmp_path):
    f = tmp_path / "m.flow"
    f.write_text(NET)
    x, _ = toy_set(1, shape=(10, 12, 3), seed=1)
    img = tmp_path / "face.png"
    Image.fromarray(np.round(x[0] * 255).astype(np.uint8), "RGB").save(img)
    return f, img


def test_cli_focus_layers_all_and_kernels(model_and_image, tmp_path):
    f, img = model_and_image
    out = tmp_path / "f1"
    r = run_cli("focus", str(f), "--layer", "c2", "--input", str(img), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["c2-0-face.png", "c2-1-face.png", "c2-grid-face.png"]
    out = tmp_path / "f2"
    r = run_cli("focus", str(f), "--all", "--kernels", "--input", str(img), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = {p.name for p in out.glob("*.png")}
    for layer in ("c1", "p1", "c2", "flatten1", "dense1", "dense2"):
        assert f"{layer}-grid-face.png" in names, layer
    assert {"c1-kernels.png", "c2-kernels.png"} <= names
    k = Image.open(out / "c1-kernels.png")
    assert k.size == (3 * 48 + 4, 4 * 48 + 6)  # 3 input channels x 4 filters, 16x enlarged 3x3 tiles, 2 px gaps
    assert k.mode == "RGB"
    for p in out.glob("*.png"):
        Image.open(p).load()


def test_cli_unknown_layer_exits_1_listing_names(model_and_image, tmp_path):
    f, img = model_and_image
    r = run_cli("focus", str(f), "--layer", "c3", "--input", str(img), cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "did you mean 'c" in r.stderr and r.stderr.startswith(str(f)) and "c1" in r.stderr and "dense1" in r.stderr


def test_trained_focus_is_not_blank(tmp_path):
    """After training on the toy set, focus on c2 writes one PNG per channel and input, of the
    map's size enlarged; the maps show structure (not a constant gray) and differ between an
    image of each class (not the same picture whatever the input)."""
    x, y = toy_set(128, shape=(10, 12, 3), seed=0)
    net = flowdsl.parse(NET + "train { optimizer = adam(lr=0.01) batch = 16 }")
    h = net.fit(x, y, epochs=4)
    assert h["train_acc"][-1] > 0.9 and h["train_loss"][-1] < h["train_loss"][0]
    pair = np.stack([x[y == 0][0], x[y == 1][0]])
    acts = net.focus("c2", pair, png_dir=str(tmp_path), names=["left", "right"])
    assert acts.shape == (2, 3, 4, 2)              # 10x12 -> pad 1 -> maxpool 5x6 -> field 3: 3x4, 2 filters
    k = upscale_factor(3, 4)
    pngs = {}
    for name in ("left", "right"):
        for ch in range(2):
            im = Image.open(tmp_path / f"c2-{ch}-{name}.png")
            assert im.mode == "L" and im.size == (4 * k, 3 * k)
            pngs[name, ch] = np.asarray(im)
        assert max(pngs[name, ch].std() for ch in range(2)) > 10, f"c2 maps of the {name} image are flat"
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(
        [f"c2-{ch}-{n}.png" for ch in range(2) for n in ("left", "right")] + ["c2-grid-left.png", "c2-grid-right.png"])
    diff = max(np.abs(pngs["left", ch].astype(int) - pngs["right", ch]).mean() for ch in range(2))
    assert diff > 10, f"c2 looks the same for an image of each class (mean pixel difference {diff:.1f})"


def test_training_lights_up_the_eye_region(tmp_path):
    """The NeuroFlow claim, measured: after (a short) training, c3's mean activation inside the
    eye region, relative to the rest of the face, is clearly higher than before. Uses
    examples/glasses_bright.flow, whose untrained c3 is a blurred avatar (glasses.flow's untrained
    c3 is nearly blank on the face, which makes the ratio meaningless: see README)."""
    import csv
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "examples" / "glasses"))
    try:
        import measure_focus
    finally:
        sys.path.pop(0)
    from flowdsl.data import load_image_files
    flow = root / "examples" / "glasses_bright.flow"
    r = run_cli("train", str(flow), "--iterations", "60", "--out", str(tmp_path), "--quiet-bar", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(root / "examples" / "glasses" / "eyes.csv")))[::10]
    x = load_image_files([root / "examples" / "glasses" / row["file"] for row in rows], (3, 400, 400))
    before = measure_focus.measures(flowdsl.load(flow), "c3", x, rows)["eye/face"]
    after = measure_focus.measures(flowdsl.load(flow, weights=tmp_path / "last.npz"), "c3", x, rows)["eye/face"]
    print(f"c3 eye region / rest of face: before {before:.2f}, after 60 steps {after:.2f}")
    assert 0.5 < before < 2.0      # the untrained map is a blurred avatar, not blank
    assert after > 1.8 * before and after > 2.5
