"""Where the net looks (issue 21): gradients in evaluation mode to any layer and to the input,
Grad-CAM and HiResCAM, saliency, filter images, and `flowdsl focus --gradcam/--saliency/--filters`."""
import numpy as np
import pytest
from conftest import ENV, ROOT, run_cli

from flowdsl.errors import FlowError
from flowdsl.model import build_text
from flowdsl.net import Net

SRC = ("network = input(9x8x2) :: conv(filters=3, field=3, pad=1, act=tanh) :: batchnorm :: maxpool(2, ceil=true)"
       " :: dropout(0.5) :: conv(filters=4, field=3, pad=1) :: relu :: dense(3) :: softmax")


def _net(src=SRC, seed=1):
    net = Net(build_text(src), seed=seed)
    rng = np.random.default_rng(seed)
    net.flat[...] += rng.normal(0, 0.2, net.flat.shape).astype(np.float32)
    for st in net.state.values():
        if "mean" in st:
            st["mean"][...] = rng.normal(0, 0.2, st["mean"].shape)
            st["var"][...] = rng.uniform(0.5, 2, st["var"].shape)
    return net


def _logit(net, x, k):
    return net.forward(x)[:, k].astype(np.float64)


SMOOTH = ("network = input(9x8x2) :: conv(filters=3, field=3, pad=1, act=tanh) :: batchnorm :: avgpool(2, ceil=true)"
          " :: dropout(0.5) :: conv(filters=3, field=3, pad=1) :: add(avgpool1) :: softplus :: dense(3) :: softmax")


def test_input_gradient_is_the_logit_gradient_in_evaluation_mode():
    """d logit_k / d x by backprop equals central differences of net.forward (evaluation:
    batchnorm's running statistics, no dropout), and touches no parameter gradient or statistic.
    A smooth net (no relu or max kinks for the differences to step over)."""
    net = _net(SMOOTH)
    rng = np.random.default_rng(0)
    x = rng.random((2, 8, 9, 2)).astype(np.float32)
    net.gflat[...] = 7.0
    before = {k: v.copy() for k, v in net.named_state().items()}
    z, _, dx = net.backprop(x, net._class_seed(1))
    np.testing.assert_allclose(z, net.forward(x), rtol=1e-5, atol=1e-6)
    assert (net.gflat == 7.0).all()
    assert all(np.array_equal(v, before[k]) for k, v in net.named_state().items())
    eps = 3e-3
    for _ in range(16):
        i = tuple(int(rng.integers(0, s)) for s in x.shape)
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        fd = (_logit(net, xp, 1) - _logit(net, xm, 1))[i[0]] / (2 * eps)
        assert dx[i] == pytest.approx(fd, rel=2e-2, abs=3e-4)


def test_gradcam_and_hirescam_follow_their_definitions():
    """A net where the class score is linear in a conv's maps (conv -> gap -> dense, no biases):
    the gradient at the map is W[c, k] / (H W), so Grad-CAM is ReLU(sum_c W[c, k] / (H W) A_c) and
    HiResCAM ReLU(sum_c A_c W[c, k] / (H W)): the same here, both checked against that formula."""
    net = _net("network = input(6x5x1) :: conv(filters=2, field=3, pad=1, bias=false) :: gap"
               " :: dense(3, bias=false) :: softmax", seed=2)
    x = np.random.default_rng(1).random((3, 5, 6, 1)).astype(np.float32)
    acts = net.focus("conv1", x)                       # (3, 5, 6, 2)
    w = net.params["dense1"]["w"]                      # (2, 3)
    for k in (0, 2):
        want = np.maximum(np.einsum("nhwc,c->nhw", acts, w[:, k] / 30.0), 0)
        for method in ("gradcam", "hirescam"):
            got = net.gradcam(x, "conv1", cls=k, method=method)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # default layer: the last map larger than 1x1; default class: the predicted one
    assert net.default_cam_layer() == "conv1"
    pred = net.predict(x).argmax(axis=1)
    np.testing.assert_allclose(net.gradcam(x), np.stack([net.gradcam(x[i:i + 1], cls=int(pred[i]))[0]
                                                         for i in range(3)]), rtol=1e-5, atol=1e-7)


def test_gradcam_upsamples_to_the_input_and_hirescam_differs_where_channels_are_few():
    net = _net()
    x = np.random.default_rng(3).random((2, 8, 9, 2)).astype(np.float32)
    g = net.gradcam(x, "conv2")                        # conv2 works on a 5x4 map
    assert g.shape == (2, 8, 9) and (g >= 0).all() and np.isfinite(g).all()
    _, got, _ = net.backprop(x, net._class_seed(None), wrt=["conv2"])
    a, grad = got["conv2"]
    assert a.shape == grad.shape == (2, 4, 5, 4)
    with pytest.raises(FlowError, match="method must be"):
        net.gradcam(x, method="cam")
    with pytest.raises(FlowError, match="gives a vector"):
        net.gradcam(x, "dense1")
    with pytest.raises(FlowError, match="out of range"):
        net.gradcam(x, cls=5)


def test_saliency_is_the_absolute_input_gradient_max_over_channels():
    net = _net()
    x = np.random.default_rng(4).random((2, 8, 9, 2)).astype(np.float32)
    _, _, dx = net.backprop(x, net._class_seed(0))
    np.testing.assert_array_equal(net.saliency(x, 0), np.abs(dx).max(axis=3))


def test_filter_images_raise_their_filters_mean_and_repeat_with_the_seed():
    net = _net()
    a = net.filter_images("conv2", steps=10)
    b = net.filter_images("conv2", steps=10)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 8, 9, 2) and a.min() >= 0 and a.max() <= 1
    start = net.filter_images("conv2", steps=0)

    def mean_of_own_filter(imgs):
        _, kept = net.forward(imgs, keep={"conv2"})
        return np.array([kept["conv2"][i, :, :, i].mean() for i in range(4)])
    assert (mean_of_own_filter(a) > mean_of_own_filter(start)).all()
    with pytest.raises(FlowError, match="filters of a conv layer"):
        net.filter_images("relu1")


def test_focus_cli_writes_gradcam_saliency_and_filter_pngs(tmp_path):
    """On the glasses net: maps and overlays named like the other focus files; an all-zero map
    (initial weights often give one at c3) is drawn black with a note, never NaN."""
    from PIL import Image
    g = ROOT / "examples" / "glasses"
    img = g / "glasses" / "000.png"
    run = tmp_path / "run"   # a checkpoint that knows the class names: one training step
    t = run_cli("train", ROOT / "examples" / "glasses.flow", "--iterations", "1", "--out", run,
                env=dict(ENV, FLOWDSL_DATA_CACHE=str(tmp_path / "cache")))
    assert t.returncode == 0, t.stderr
    tmp_path = tmp_path / "focus"
    r = run_cli("focus", ROOT / "examples" / "glasses.flow", "--weights", run / "last.npz", "--gradcam", "--method",
                "hirescam", "--layer", "c3", "--saliency", "--class", "glasses", "--input", img, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["c3-hirescam-000.png", "c3-hirescam-overlay-000.png", "saliency-000.png",
                     "saliency-overlay-000.png"], names
    ov = np.asarray(Image.open(tmp_path / "c3-hirescam-overlay-000.png"))
    assert ov.shape == (400, 400, 3)
    assert "looking at class" in r.stdout
    r = run_cli("focus", ROOT / "examples" / "glasses.flow", "--filters", "--layer", "c1", "--out", tmp_path)
    assert r.returncode == 0 and (tmp_path / "c1-filters.png").exists(), r.stderr
    r = run_cli("focus", ROOT / "examples" / "glasses.flow", "--weights", run / "last.npz", "--gradcam", "--class",
                "sunglasses", "--input", img, "--out", tmp_path)
    assert r.returncode == 1 and "no class named 'sunglasses'" in r.stderr and "Traceback" not in r.stderr


def test_an_all_zero_map_is_drawn_plainly_with_a_note(tmp_path):
    from flowdsl.focus import write_heat
    paths, empty = write_heat(np.zeros((1, 4, 5), np.float32), np.zeros((1, 4, 5, 1), np.float32), tmp_path,
                              "c-gradcam", ["a"])
    from PIL import Image
    assert empty == ["a"] and not np.asarray(Image.open(paths[0])).any()


def test_gradcam_equals_numpy_from_activations_and_a_finite_difference_gradient():
    """Grad-CAM of `p` (after conv, batchnorm in evaluation, avgpool) recomputed by hand: the
    gradient of the logit with respect to p's map by central differences in float64 through the
    rest of the net (dropout, conv, an add back to p, softplus, dense), run as a second Net that
    starts at p (the same weights), then ReLU(sum_c mean(grad_c) * A_c), upsampled."""
    from flowdsl.focus import upsample
    head = ("a = conv(9x8x2, filters=3, field=3, pad=1, act=tanh)\nb = batchnorm\np = avgpool(2, ceil=true)\n"
            "c = conv(filters=3, field=3, pad=1)\nd = dense(3)\n"
            "network = a :: b :: p :: dropout(0.5) :: c :: add(p) :: softplus :: d :: softmax\n")
    tail = ("inp = input(5x4x3)\nc = conv(filters=3, field=3, pad=1)\nd = dense(3)\n"
            "network = inp :: c :: add(inp) :: softplus :: d :: softmax\n")
    net, rest = _net(head), Net(build_text(tail), seed=0)
    for name in ("c", "d"):
        for k, v in net.params[name].items():
            rest.params[name][k][...] = v
    x = np.random.default_rng(6).random((1, 8, 9, 2)).astype(np.float32)
    acts = net.focus("p", x).astype(np.float64)                    # (1, 4, 5, 3)
    k = int(net.predict(x)[0].argmax())
    grad = np.zeros_like(acts)
    eps = 1e-3
    for idx in np.ndindex(acts.shape):
        up, dn = acts.copy(), acts.copy()
        up[idx] += eps
        dn[idx] -= eps
        grad[idx] = (rest.forward(up.astype(np.float32))[0, k].astype(np.float64)
                     - rest.forward(dn.astype(np.float32))[0, k]) / (2 * eps)
    want = np.maximum(np.einsum("nhwc,nc->nhw", acts, grad.mean(axis=(1, 2))), 0)
    want = upsample(want.astype(np.float32), 8, 9)
    np.testing.assert_allclose(net.gradcam(x, "p"), want, rtol=2e-2, atol=2e-3 * float(want.max()))


def test_eval_out_writes_the_misclassified_sheet_most_confident_first(tmp_path):
    from flowdsl import report
    rng = np.random.default_rng(0)
    x = rng.random((6, 4, 4, 1)).astype(np.float32)
    y = np.array([0, 1, 0, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.45, 0.55], [0.1, 0.9]], np.float32)
    drawn = []
    real = report._save
    report._save = lambda fig, path: drawn.append([a.get_title() for a in fig.axes if a.get_title()]) or real(fig, path)
    try:
        assert report.write_errors(x, y, probs, ["cat", "dog"], tmp_path / "errors.png") == 3
    finally:
        report._save = real
    assert drawn[0] == ["true dog\npred cat 0.80", "true cat\npred dog 0.60", "true cat\npred dog 0.55"]
    assert (tmp_path / "errors.png").exists()
    assert report.write_errors(x, probs.argmax(axis=1), probs, [], tmp_path / "none.png") == 0


def test_the_glasses_sheet_script_draws_input_activation_and_cam(tmp_path):
    import subprocess
    import sys
    from PIL import Image
    net = Net(build_text((ROOT / "examples" / "glasses.flow").read_text()), seed=0)
    net.save(tmp_path / "w.npz")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "glasses" / "gradcam_sheet.py"), str(tmp_path / "w.npz"),
                        "--out", str(tmp_path / "s.png"), "--size", "100"], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "s.png").size == (300, 200)
