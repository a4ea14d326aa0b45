"""What the source documents ask for (issue 18), beyond the per-kind registry tests of
test_layers.py: padding modes, fixed Kirsch/Sobel filters and frozen layers, the Keras
tutorial's augmentation, bias=false, ensembles and top-k, csv labels from the end."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import naive  # noqa: E402

from flowdsl.augment import (FILLS, Augmenter, _fill_index, affine_images, random_rotate,  # noqa: E402
                             random_shift, random_vflip, random_zoom)
from flowdsl.errors import FlowError  # noqa: E402
from flowdsl.layers._padmodes import source_index  # noqa: E402
from flowdsl.model import build_text  # noqa: E402
from flowdsl.net import Net  # noqa: E402


# ------------------------------------------------------------------------------ padding modes
@pytest.mark.parametrize("mode,want", [("nearest", "aa|abcd|dd"), ("mirror", "cb|abcd|cb"),
                                       ("reflect", "ba|abcd|dc"), ("wrap", "cd|abcd|ab")])
def test_pad_modes_mean_what_scipy_says(mode, want):
    got = "".join("abcd"[i] for i in source_index(4, 2, mode))
    assert got == want.replace("|", "")


@pytest.mark.parametrize("mode", ["nearest", "mirror", "reflect", "wrap"])
def test_augment_fill_agrees_with_the_pad_modes(mode):
    for n in (1, 2, 5):
        want = source_index(n, 11, mode)
        got = [_fill_index.py_func(q, n, FILLS[mode]) if hasattr(_fill_index, "py_func") else
               _fill_index(q, n, FILLS[mode]) for q in range(-11, n + 11)]
        assert got == want.tolist(), (mode, n)
    assert _fill_index(-1, 4, FILLS["zeros"]) == -1 and _fill_index(4, 4, FILLS["zeros"]) == -1


def test_pad_mode_changes_only_the_border_and_every_algorithm_agrees(monkeypatch):
    """The same weights under zeros and mirror padding differ at the border only; forced through
    each conv algorithm (falling back where one cannot run), mirror gives the naive answer."""
    import flowdsl.layers.conv as convmod
    monkeypatch.setattr(convmod, "WINO_MIN_TILES", 0)
    rng = np.random.default_rng(0)
    x = rng.random((2, 9, 8, 12)).astype(np.float32)
    outs = {}
    for mode in ("zeros", "mirror"):
        net = Net(build_text(f"input(8x9x12) :: conv(filters=5, field=3, pad=1, pad_mode={mode}) :: squared"), seed=1)
        outs[mode] = net.forward(x)
        layer = net.layers[0]
        want = naive.ref_conv(layer, x.astype(np.float64), {k: v.astype(np.float64)
                                                            for k, v in net.params[layer.name].items()}, False)
        np.testing.assert_allclose(outs[mode], want, rtol=1e-4, atol=1e-4)
    same = np.isclose(outs["zeros"], outs["mirror"], atol=1e-5)
    assert same[:, 1:-1, 1:-1].all() and not same[:, 0].all() and not same[:, :, -1].all()


def test_pool_pad_keeps_the_size_for_an_inception_pool_branch():
    m = build_text("input(28x28x8) :: maxpool(3, stride=1, pad=1) :: avgpool(3, stride=1, pad=1) :: "
                   "l2pool(3, stride=1, pad=1) :: gap :: dense(2) :: softmax")
    assert [l.out for l in m.layers[1:4]] == [(8, 28, 28)] * 3 and m.layers[4].out == (8,)
    src = "input(8x8x1) :: maxpool(3, pad=2) :: dense(2) :: softmax"
    with pytest.raises(FlowError, match="at most half the window") as e:
        build_text(src)
    assert e.value.line == 1 and e.value.column == src.index("2)") + 1


# ------------------------------------------------------------------------------ fixed filters
def test_kirsch_fills_the_8_compass_kernels_divided_over_the_channels():
    net = Net(build_text("c0 = conv(8x8x3, filters=8, field=3, pad=1)\n"
                         "network = c0 :: relu :: dense(2) :: softmax\ninit { c0 = kirsch }\n"))
    w = net.params["c0"]["w"]
    north = np.array([[5, 5, 5], [-3, 0, -3], [-3, -3, -3]], np.float32) / 3
    np.testing.assert_allclose(w[:, :, 0, 0], north)
    np.testing.assert_allclose(w[:, :, 2, 0], north)
    east = np.array([[-3, -3, 5], [-3, 0, 5], [-3, -3, 5]], np.float32) / 3
    np.testing.assert_allclose(w[:, :, 1, 6], east)
    # 8 distinct rotations of one ring, each summing to zero (a flat patch gives no edge)
    flat = w[:, :, 0, :].reshape(9, 8).T
    assert len({tuple(r) for r in np.round(flat, 4)}) == 8 and np.allclose(flat.sum(axis=1), 0, atol=1e-6)
    assert not net.params["c0"]["b"].any()


def test_sobel_and_misfit_fixed_filters():
    net = Net(build_text("c = conv(6x6x1, filters=2, field=3)\nnetwork = c :: dense(2) :: softmax\n"
                         "init { c = sobel }\n"))
    np.testing.assert_array_equal(net.params["c"]["w"][:, :, 0, 0], [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    np.testing.assert_array_equal(net.params["c"]["w"][:, :, 0, 1], [[-1, -2, -1], [0, 0, 0], [1, 2, 1]])
    with pytest.raises(FlowError, match="kirsch gives 8 filters of 3x3; conv c has filters=4") as e:
        build_text("c = conv(6x6x1, filters=4, field=3)\nnetwork = c :: dense(2) :: softmax\ninit {\n  c = kirsch\n}\n")
    assert e.value.line == 4
    with pytest.raises(FlowError, match="cannot initialise every layer"):
        build_text("conv(6x6x1, filters=8) :: dense(2) :: softmax\ninit { default = kirsch }\n")
    with pytest.raises(FlowError, match="cannot initialise 'd'"):
        build_text("d = dense(2)\nnetwork = input(4) :: d :: softmax\ninit { d = sobel }\n")


def test_trainable_false_never_moves_but_passes_gradient_back():
    """A frozen middle layer keeps its weights (also under L2 and adamw's decay, with momentum and adam) while the
    layer before it learns: the gradient passes through."""
    src = ("a = conv(8x8x1, filters=4, field=3, pad=1, act=relu)\n"
           "f = conv(filters=8, field=3, trainable=false, act=relu)\n"
           "network = a :: f :: batchnorm(trainable=false) :: dense(3) :: softmax\n"
           "init { f = kirsch }\n")
    rng = np.random.default_rng(0)
    x = rng.random((32, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 32)
    for opt in ("adam(lr=0.01)", "momentum(lr=0.05)", "sgd(lr=0.1)", "rmsprop(lr=0.01)",
                "adamw(lr=0.01, weight_decay=0.1)"):
        net = Net(build_text(src + f"train {{\n  optimizer = {opt}\n  l2 = 0.01\n  batch = 8\n}}\n"))
        before = {k: v.copy() for k, v in net.named_params().items()}
        net.fit(x, y, epochs=2, verbose=0)
        after = net.named_params()
        for k in ("f.w", "f.b", "batchnorm1.gamma", "batchnorm1.beta"):
            np.testing.assert_array_equal(after[k], before[k], err_msg=f"{opt}: {k} moved")
        for k in ("a.w", "a.b", "dense1.w"):
            assert not np.array_equal(after[k], before[k]), f"{opt}: {k} did not learn"
    assert "trainable=false" in str(net.model) and "trainable" not in build_text("conv(8x8x1) :: dense(2) :: "
                                                                                  "softmax").layers[1].describe()


def test_bias_false_has_no_bias_parameter_and_round_trips():
    m = build_text("conv(8x8x1, filters=4, bias=false) :: batchnorm :: relu :: dense(3, bias=false) :: softmax")
    net = Net(m)
    assert set(net.named_params()) == {"conv1.w", "batchnorm1.gamma", "batchnorm1.beta", "dense1.w"}
    assert m.n_params() == 9 * 4 + 8 + 6 * 6 * 4 * 3
    assert build_text(str(m)).spec() == m.spec() and "bias=false" in str(m)


# ------------------------------------------------------------------------------ augmentation
def _checker(h=6, w=6, c=2):
    rng = np.random.default_rng(3)
    return rng.random((4, h, w, c)).astype(np.float32)


def test_affine_identity_and_quarter_turn_and_wrap_translation():
    x = _checker()
    eye = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (4, 1, 1))
    np.testing.assert_array_equal(affine_images(x, eye), x)
    # a quarter turn of a square image moves every pixel exactly onto another one
    quarter = random_rotate.__globals__["_about_centre"](6, 6, np.full(4, math.pi / 2), np.ones(4))
    got = affine_images(x, quarter)
    assert any(np.allclose(got, np.rot90(x, k, axes=(1, 2)), atol=1e-5) for k in (1, 3))
    # an integer translation with fill=wrap is np.roll
    move = eye.copy()
    move[:, 0, 2], move[:, 1, 2] = -2, 1          # out[i, j] = x[i - 2, j + 1]
    np.testing.assert_allclose(affine_images(x, move, "wrap"), np.roll(x, (2, -1), axis=(1, 2)), atol=1e-6)
    zero = affine_images(x, move, "zeros")
    assert not zero[:, :2].any() and np.allclose(zero[:, 2:, :-1], x[:, :-2, 1:])
    near = affine_images(x, move, "nearest")
    np.testing.assert_allclose(near[:, 0], x[:, 0][:, np.r_[1:6, 5]], atol=1e-6)


def test_rotate_zoom_vflip_and_fractional_shift_are_drawn_from_the_rng():
    x = _checker(10, 10, 1)
    a = random_rotate(x, 45, "nearest", np.random.default_rng(7))
    b = random_rotate(x, 45, "nearest", np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, x) and a.min() >= x.min() - 1e-6 and a.max() <= x.max() + 1e-6
    z = random_zoom(x, 0.3, "reflect", np.random.default_rng(1))
    assert z.shape == x.shape and not np.allclose(z, x)
    v = random_vflip(x, np.random.default_rng(2))
    flipped = [np.array_equal(v[i], x[i, ::-1]) for i in range(4)]
    kept = [np.array_equal(v[i], x[i]) for i in range(4)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped)
    # shift(0.1) on a 10x10 image moves by at most 1 pixel each way; shift(0.3) by up to 3
    for frac, most in ((0.1, 1), (0.3, 3)):
        one = np.zeros((200, 10, 10, 1), np.float32)
        one[:, 5, 5] = 1
        s = random_shift(one, frac, np.random.default_rng(0))
        pos = np.argwhere(s[..., 0] == 1)
        assert len(pos) == 200 and np.abs(pos[:, 1:] - 5).max() == most


def test_augment_list_checks_and_applies_the_new_kinds():
    m = build_text("conv(12x12x1, filters=2) :: dense(2) :: softmax\n"
                   "train { augment = [rotate(45, fill=zeros), shift(0.1), hflip, vflip, zoom(0.2)] }\n")
    aug = Augmenter(m.train["augment"])
    x = _checker(12, 12, 1)
    np.testing.assert_array_equal(aug.apply(x, np.random.default_rng(5)), aug.apply(x, np.random.default_rng(5)))
    assert build_text(str(m)).spec() == m.spec()
    for bad, msg in (("shift(1.5)", "whole number of pixels"), ("rotate(0)", "degrees must be"),
                     ("zoom(1)", "fraction must be"), ("rotate(10, fill=edge)", "fill must be one of")):
        with pytest.raises(FlowError, match=msg) as e:
            build_text(f"conv(12x12x1, filters=2) :: dense(2) :: softmax\ntrain {{ augment = [{bad}] }}\n")
        assert e.value.line == 2
    with pytest.raises(FlowError, match="rotate needs image input"):
        build_text("input(5) :: dense(2) :: softmax\ntrain { augment = [rotate(10)] }\n")


# ------------------------------------------------------------------------------ ensembles, top-k
def test_evaluate_top_k_and_ensemble_mean(tmp_path):
    from flowdsl.train import evaluate
    m = build_text("input(6) :: dense(4) :: softmax")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    y = rng.integers(0, 4, 50)
    nets = [Net(m, seed=s) for s in (1, 2, 3)]
    r = evaluate(nets[0], x, y, top=4)
    z = nets[0].forward(x)
    rank = (z > z[np.arange(50), y][:, None]).sum(axis=1)
    assert r["topk"] == pytest.approx([(rank < k).mean() for k in (1, 2, 3, 4)])
    assert r["topk"][0] == pytest.approx(r["acc"]) and r["topk"][-1] == 1.0
    mean = sum(n.predict(x) for n in nets) / 3
    e = evaluate(nets[0], x, y, members=nets)
    assert e["acc"] == pytest.approx((mean.argmax(axis=1) == y).mean())
    paths = []
    for i, n in enumerate(nets):
        paths.append(str(tmp_path / f"{i}.npz"))
        n.save(paths[-1])
    np.testing.assert_allclose(nets[0].predict(x, weights=paths), mean, rtol=1e-6)
    with pytest.raises(FlowError, match="list of checkpoints"):
        nets[0].predict(x, weights=paths[0])


# ------------------------------------------------------------------------------ branches
STEM = "stem = input(8x8x1) :: conv(filters=2, pad=1)\n"


def _error_at(src, token, line, message):
    """build_text(src) fails with `message` at the first `token` of `line` (1-based)."""
    with pytest.raises(FlowError, match=message) as e:
        build_text(src, "m.flow")
    col = src.split("\n")[line - 1].index(token) + 1
    assert (e.value.line, e.value.column) == (line, col), (e.value.line, e.value.column, str(e.value))
    assert "Traceback" not in str(e.value) and f"m.flow:{line}:{col}:" in str(e.value)


def test_branch_and_concat_errors_are_positioned():
    _error_at(STEM + "a = stem :: maxpool\nnetwork = concat(a, stem) :: dense(2) :: softmax\n", "a,", 3,
              r"cannot join stem \(8x8x2\) to a \(4x4x2\): the width and height must be equal")
    _error_at(STEM + "a = stem :: relu\nb = stem :: tanh\nnetwork = a :: b :: dense(2) :: softmax\n", "relu", 2,
              r"the output of a \(relu\) is not used")
    _error_at(STEM + "a = stem :: relu\nnetwork = concat(a) :: dense(2) :: softmax\n", "a)", 3,
              "at least two inputs")
    _error_at(STEM + "a = stem :: relu\nnetwork = stem :: concat(a) :: dense(2) :: softmax\n", "a)", 3,
              "'a' is not built before this layer")
    _error_at(STEM + "network = stem :: concat(nope) :: dense(2) :: softmax\n", "nope", 2, "no layer named 'nope'")
    _error_at("network = conv(8x8x1, pad=1, pad_mode=edge) :: dense(2) :: softmax\n", "edge", 1,
              "pad_mode must be one of zeros, constant, nearest, mirror, reflect, wrap")
    _error_at(STEM + "a = stem :: relu\nnetwork = a :: stem :: dense(2) :: softmax\n", "stem ::", 3,
              "'stem' is used twice")


def test_a_shared_stem_is_one_layer_and_round_trips():
    src = (STEM + "a = stem :: conv(filters=3, field=1)\nb = stem :: maxpool(3, stride=1, pad=1)\n"
           "network = concat(a, b, stem) :: concat(stem) :: gap :: dense(2) :: softmax\n")
    m = build_text(src)
    assert [l.kind for l in m.layers].count("conv") == 2          # stem's conv is not copied
    j1, j2 = [l for l in m.layers if l.kind == "concat"]
    assert j1.out == (7, 8, 8) and j2.out == (9, 8, 8)
    assert j1.feed is m.layer("a") and m.layer("a").name == "conv2" and [x.name for x in j1.inputs()] == ["b", "conv1"]
    assert j2.feed is None and [x.name for x in j2.inputs()] == ["conv1"]
    text = str(m)
    assert "a = stem :: conv(" in text and "b = stem :: maxpool(" in text and "network = concat(a, b, stem)" in text
    again = build_text(text)
    assert again.spec() == m.spec() and str(again) == text
    # the gradient reaching the stem is the sum over its four consumers: against a net where
    # the stem's output is cut off (as if it were another input) the stem's weight gradient differs
    net = Net(m, seed=2)
    x = np.random.default_rng(1).random((4, 8, 8, 1)).astype(np.float32)
    net.loss_grad(x, np.array([0, 1, 1, 0]))
    assert np.abs(net.grads["conv1"]["w"]).sum() > 0 and np.isfinite(net.gflat).all()


def test_add_first_in_a_chain_sums_the_named_outputs():
    src = (STEM + "a = stem :: conv(filters=2, field=1)\nb = stem :: relu\n"
           "network = add(a, b, stem) :: add(a) :: dense(2) :: softmax\n")
    m = build_text(src)
    s1, s2 = [l for l in m.layers if l.kind == "add"]
    assert s1.feed is m.layer("a") and [x.name for x in s1.inputs()] == ["b", "conv1"]
    assert [x.name for x in s2.inputs()] == ["conv2"] and "network = add(a, b, stem) :: add(from=a)" in str(m)
    assert build_text(str(m)).spec() == m.spec()
    net = Net(m, seed=1)
    x = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
    _, kept = net.forward(x, keep={"conv2", "b", "conv1", s1.name, s2.name})
    np.testing.assert_allclose(kept[s1.name], kept["conv2"] + kept["b"] + kept["conv1"], rtol=1e-6)
    np.testing.assert_allclose(kept[s2.name], kept[s1.name] + kept["conv2"], rtol=1e-6)
    _error_at(STEM + "a = stem :: relu\nnetwork = add(a) :: dense(2) :: softmax\n", "a)", 3, "name at least two")
