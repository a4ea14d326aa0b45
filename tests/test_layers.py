"""Every registered layer kind against its naive float64 reference (tests/naive.py): output shape,
dtype and layout, forward values, backward against central finite differences, the kernels'
plain-Python versions against the compiled ones, and whole networks' gradients.

A kind without examples in naive.EXAMPLES fails here, so a new kind cannot go untested.

Finite differences are taken of the float64 reference, so eps can be small (1e-6): the
truncation and rounding errors are ~1e-10, far below the float32 kernels' own error, and
a step that small almost never crosses a relu kink or a maxpool tie."""
import copy
import importlib
import os
import pkgutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import naive  # noqa: E402

from flowdsl.dist import Solo  # noqa: E402
from flowdsl.layers import REGISTRY, load_all  # noqa: E402
from flowdsl.model import build_text  # noqa: E402
from flowdsl.net import Net  # noqa: E402
from flowdsl.plan import Timer  # noqa: E402

load_all()
N = 3            # batch
EPS = 1e-6       # finite-difference step, on the float64 reference
SAMPLE = 24      # finite-difference coordinates checked per array
FD_RTOL = 2e-3   # float32 kernels against float64 differences
KINDS = sorted(REGISTRY)
CASES = [(k, t, s) for k in KINDS for t, s in naive.EXAMPLES.get(k, ())]
IDS = [f"{k}:{t}@{s}" for k, t, s in CASES]


@pytest.fixture(autouse=True)
def winograd_at_any_batch(monkeypatch):
    """The examples here are a few tiny images: let conv's Winograd path run on them (in use it
    waits for WINO_MIN_TILES output tiles; test_winograd_waits_for_enough_tiles checks that)."""
    import flowdsl.layers.conv as convmod
    monkeypatch.setattr(convmod, "WINO_MIN_TILES", 0)


# ------------------------------------------------------------------------------ helpers
def nhwc(s):
    return (s[1], s[2], s[0]) if len(s) == 3 else tuple(s)


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def build(kind, text, shape):
    """(net, layer): the layer under test in `input(shape) :: layer :: squared` (loss kinds: the
    loss right after the input; input: just the input)."""
    role = REGISTRY[kind].role
    if role == "input":
        src = f"{text}({shape}) :: squared"
    elif role == "loss":
        src = f"input({shape}) :: {text}"
    else:
        src = f"input({shape}) :: {text} :: squared"
    model = build_text(src)
    layer = model.layers[0] if role == "input" else model.layers[1]
    assert layer.kind == kind, f"{text!r} builds a {layer.kind}, listed under {kind}"
    return Net(model, seed=0), layer


def randomise(net, layer, rng):
    """Random parameters (not the init's zeros and ones) and running statistics."""
    for pname, v in net.params.get(layer.name, {}).items():
        v[...] = rng.normal(0.0, 0.7, v.shape)
    st = net.state.get(layer.name, {})
    if "mean" in st:
        st["mean"][...] = rng.normal(0.0, 0.5, st["mean"].shape)
        st["var"][...] = rng.uniform(0.5, 2.0, st["var"].shape)


def f64(d):
    return {k: np.array(v, np.float64) for k, v in d.items()}


def setup(kind, text, shape):
    net, layer = build(kind, text, shape)
    rng = rng_for(kind, text, shape)
    randomise(net, layer, rng)
    x = rng.normal(0.0, 1.0, (N,) + nhwc(layer.in_shape)).astype(np.float32)
    return net, layer, x, rng


def params_of(net, layer):
    return net.params.get(layer.name, {})


def ctx_of(net, layer, x=None):
    """The context Net.forward gives the layer. A layer with sources (add, concat) gets their
    outputs as ctx["extras"]: in these one-layer nets every source is the network input, x."""
    ctx = {"state": net.state.get(layer.name, {}), "rng": net.rng}
    if x is not None and extras_of(layer, x):
        ctx["extras"] = extras_of(layer, x)
    return ctx


def extras_of(layer, x):
    """What the reference reads besides its input for a layer with sources: the network input x
    once per source (see ctx_of)."""
    srcs = layer.inputs()
    assert all(l.role == "input" for l in srcs), "registry examples of layers with sources name the input"
    return [x] * len(srcs)


def deterministic(net, layer, x):
    """False for a layer whose training forward draws from ctx["rng"] (dropout with p > 0):
    asked of the layer itself, two generators giving two outputs, not of its kind name."""
    ys = []
    for seed in (1, 2):
        ctx = ctx_of(net, layer, x)
        ctx.update(rng=np.random.default_rng(seed), state=copy.deepcopy(ctx["state"]))
        ys.append(layer.forward(x, params_of(net, layer), ctx, True))
    return np.array_equal(*ys)


def fd_check(name, got, f, x0, rng):
    """Compare got (the analytic gradient of f at x0) with central differences of f on a sample
    of coordinates. f takes a float64 array shaped like x0."""
    assert got.shape == x0.shape, f"{name}: gradient shape {got.shape}, expected {x0.shape}"
    assert np.all(np.isfinite(got)), f"{name}: gradient not finite (not written?)"
    idx = np.arange(x0.size) if x0.size <= SAMPLE else rng.choice(x0.size, SAMPLE, replace=False)
    fd = np.empty(len(idx))
    for t, i in enumerate(idx):
        xp = x0.copy()
        xp.flat[i] += EPS
        xm = x0.copy()
        xm.flat[i] -= EPS
        fd[t] = (f(xp) - f(xm)) / (2 * EPS)
    g = np.asarray(got, np.float64).flat[idx]
    scale = max(np.abs(fd).max(), 1e-3)
    np.testing.assert_allclose(g, fd, rtol=FD_RTOL, atol=FD_RTOL * scale, err_msg=name)


# ------------------------------------------------------------------------------ the registry
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_a_reference_and_examples(kind):
    assert naive.EXAMPLES.get(kind), f"no examples for layer kind '{kind}' in tests/naive.py EXAMPLES"
    assert kind in naive.REFERENCES, f"no naive reference for layer kind '{kind}' in tests/naive.py"


def test_examples_name_only_registered_kinds():
    assert set(naive.EXAMPLES) <= set(REGISTRY), set(naive.EXAMPLES) - set(REGISTRY)


# ------------------------------------------------------------------------------ forward
def atol_for(layer, want):
    """1e-5; for Winograd F(4x4) and F(2x2, 5x5) layers (the same six points) 4e-6 of the
    output's scale: their transforms scale inputs by up to 5 and outputs by up to 8, so their
    rounding (~2e-6 of the largest output here) is not relative to each element, as im2col's is
    (a small output next to large ones errs by more)."""
    if getattr(layer, "algo", None) in ("winograd4", "winograd25"):
        return max(1e-5, 4e-6 * float(np.abs(want).max()))
    return 1e-5


@pytest.mark.parametrize("kind,text,shape", CASES, ids=IDS)
def test_forward_matches_reference(kind, text, shape):
    net, layer, x, _ = setup(kind, text, shape)
    p = params_of(net, layer)
    modes = (False, True) if deterministic(net, layer, x) else (False,)
    for training in modes:
        state = f64(net.state.get(layer.name, {}))  # before a training pass moves it
        x64 = x.astype(np.float64)
        want = naive.reference(layer, x64, f64(p), training, state, extras=extras_of(layer, x64))
        y = layer.forward(x, p, ctx_of(net, layer, x), training)
        what = f"{text} on {shape}, training={training}"
        assert y.dtype == np.float32, what
        assert y.flags.c_contiguous, what
        assert y.shape == (N,) + nhwc(layer.out), f"{what}: out_shape {layer.out} but output {y.shape}"
        assert want.shape == y.shape, f"{what}: reference gives {want.shape}"
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=atol_for(layer, want), err_msg=what)
        if layer.role not in ("input", "loss"):
            # the same through Net.forward (the layer is the last before the loss)
            state = f64(net.state.get(layer.name, {}))
            want = naive.reference(layer, x64, f64(p), training, state, extras=extras_of(layer, x64))
            y = net.forward(x, training=training)
            assert y.dtype == np.float32 and y.flags.c_contiguous and y.shape == want.shape, what
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=atol_for(layer, want), err_msg=what)


# ------------------------------------------------------------------------------ backward
BACKWARD = [c for c in CASES if REGISTRY[c[0]].role != "loss"]


@pytest.mark.parametrize("kind,text,shape", BACKWARD, ids=[f"{k}:{t}@{s}" for k, t, s in BACKWARD])
def test_backward_matches_finite_differences(kind, text, shape):
    net, layer, x, rng = setup(kind, text, shape)
    if not deterministic(net, layer, x):
        pytest.skip("random in training: see test_dropout_*")
    p = params_of(net, layer)
    # a layer with running statistics (batchnorm) also runs backward after an eval forward
    for training in (True, False) if net.state.get(layer.name) else (True,):
        state = f64(net.state.get(layer.name, {}))
        ctx = ctx_of(net, layer, x)
        y = layer.forward(x, p, ctx, training)
        dy = rng.normal(0.0, 1.0, y.shape).astype(np.float32)
        dy64 = dy.astype(np.float64)
        dy_before = dy.copy()
        g = {k: np.full_like(v, np.nan) for k, v in p.items()}  # backward must overwrite
        dx = layer.backward(dy, p, g, ctx, need_dx=True)
        assert dx.dtype == np.float32 and dx.shape == x.shape, text
        assert np.array_equal(dy, dy_before), f"{text}: backward wrote into dy"
        x64, p64 = x.astype(np.float64), f64(p)
        extras64 = extras_of(layer, x64)  # held fixed: their gradients are ctx["dextras"]

        def loss(xv, pv, ev=extras64):
            return np.sum(naive.reference(layer, xv, pv, training, state, extras=ev) * dy64)

        fd_check(f"{text} dx", dx, lambda xv: loss(xv, p64), x64, rng)
        for j, e64 in enumerate(extras64):
            def le(ev, j=j):
                return loss(x64, p64, extras64[:j] + [ev] + extras64[j + 1:])
            fd_check(f"{text} dextras[{j}]", ctx["dextras"][j], le, e64, rng)
        for name in p:
            def lp(v, name=name):
                return loss(x64, {**p64, name: v})
            fd_check(f"{text} d{name}", g[name], lp, p64[name], rng)

        # need_dx=False: the same parameter gradients, no dx
        ctx = ctx_of(net, layer, x)
        layer.forward(x, p, ctx, training)
        g2 = {k: np.full_like(v, np.nan) for k, v in p.items()}
        assert layer.backward(dy, p, g2, ctx, need_dx=False) is None
        for name in p:
            np.testing.assert_allclose(g2[name], g[name], rtol=1e-6, atol=1e-6)


LOSSES = [c for c in CASES if REGISTRY[c[0]].role == "loss"]


@pytest.mark.parametrize("kind,text,shape", LOSSES, ids=[f"{k}:{t}@{s}" for k, t, s in LOSSES])
def test_loss_gradient(kind, text, shape):
    net, layer, z, rng = setup(kind, text, shape)
    if layer.targets == "labels":
        target = rng.integers(0, z.shape[1], N)
    else:
        target = rng.normal(0.0, 1.0, z.shape).astype(np.float32)
    f = lambda zv, t: naive.LOSSES[kind](layer, zv, t)  # noqa: E731
    loss, dz, _ = layer.loss(z, target)
    assert dz.dtype == np.float32 and dz.shape == z.shape
    np.testing.assert_allclose(loss, f(z.astype(np.float64), target), rtol=1e-5)
    fd_check(f"{text} dz", dz, lambda zv: f(zv, target), z.astype(np.float64), rng)


# ------------------------------------------------------------------------------ dropout
def test_dropout_training_mask_and_backward():
    net, layer = build("dropout", "dropout(0.3)", "40x30x5")
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (4, 30, 40, 5)).astype(np.float32)
    ctx = ctx_of(net, layer)
    saved = copy.deepcopy(net.rng)
    y = layer.forward(x, {}, ctx, True)
    assert y.dtype == np.float32 and y.flags.c_contiguous and y.shape == x.shape
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(y[kept], x[kept] / np.float32(0.7), rtol=1e-6)
    dy = rng.normal(0.0, 1.0, x.shape).astype(np.float32)
    dx = layer.backward(dy, {}, {}, ctx, need_dx=True)
    np.testing.assert_allclose(dx, np.where(kept, dy / np.float32(0.7), 0), rtol=1e-6)
    # the mask comes from the net's generator: the same state gives the same mask
    y2 = layer.forward(x, {}, {"state": {}, "rng": saved}, True)
    np.testing.assert_array_equal(y, y2)
    # and a further draw a different one
    y3 = layer.forward(x, {}, ctx_of(net, layer), True)
    assert not np.array_equal(y3 != 0, kept)


def test_dropout_is_the_identity_in_evaluation_and_at_p0():
    for text, training in (("dropout(0.5)", False), ("dropout(p=0)", True)):
        net, layer = build("dropout", text, "6")
        x = np.ones((2, 6), np.float32)
        ctx = ctx_of(net, layer)
        assert layer.forward(x, {}, ctx, training) is x
        dy = np.full((2, 6), 3.0, np.float32)
        np.testing.assert_array_equal(layer.backward(dy, {}, {}, ctx, need_dx=True), dy)


# ------------------------------------------------------------------------------ batchnorm
@pytest.mark.parametrize("shape", ["4x3x3", "5"])
def test_batchnorm_running_statistics(shape):
    net, layer = build("batchnorm", "batchnorm(momentum=0.8)", shape)
    st = net.state[layer.name]
    assert st["mean"].dtype == np.float32 and st["var"].dtype == np.float32
    np.testing.assert_array_equal(st["mean"], 0)
    np.testing.assert_array_equal(st["var"], 1)
    rng = np.random.default_rng(2)
    x = rng.normal(2.0, 3.0, (N,) + nhwc(layer.in_shape)).astype(np.float32)
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
    m0, v0 = st["mean"].copy(), st["var"].copy()
    net.forward(x, training=True)
    np.testing.assert_allclose(st["mean"], 0.8 * m0 + 0.2 * x2.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st["var"], 0.8 * v0 + 0.2 * x2.var(0, ddof=1), rtol=1e-5, atol=1e-6)
    assert st["mean"].dtype == np.float32 and st["var"].dtype == np.float32
    m1 = st["mean"].copy()
    net.forward(x, training=False)   # evaluation leaves them alone
    np.testing.assert_array_equal(st["mean"], m1)


# ------------------------------------------------------------------------------ conv algorithms
def test_conv_examples_cover_every_algorithm():
    algos = {}
    for kind, text, shape in CASES:
        if kind == "conv":
            algos.setdefault(build(kind, text, shape)[1].algo, []).append(text)
    assert set(algos) == {"rows", "gemm", "winograd", "winograd4", "winograd25", "planar"}, algos
    assert len(algos["winograd"]) >= 4 and len(algos["planar"]) >= 6 and len(algos["winograd4"]) >= 3
    assert len(algos["winograd25"]) >= 3


def test_wide_vector_machines_run_gemm_in_evaluation(monkeypatch):
    """With AVX-512 BLAS kernels (conv.wide_vectors) every conv of more than DIRECT_MAX_FILTERS filters runs
    "gemm" in evaluation except stride-1 convs over one input channel with a 3x3 or wider field
    ("planar", nets A and B's first layers) and Winograd's convs in batches of at least
    WIDE_WINO_MIN_TILES tiles (gemm in smaller ones; F(2x2, 5x5) over WIDE_WINO25_MIN_C input
    channels or more), and no conv runs "planar" in training (gemm
    wins there); Winograd keeps its thresholds in training; fewer filters still run "rows". The
    suite itself runs with FLOWDSL_WIDE=0 (conftest), so that every algorithm is exercised on any
    machine."""
    import flowdsl.layers.conv as convmod
    assert convmod.wide_vectors() is False and os.environ["FLOWDSL_WIDE"] == "0"
    classic = {}
    for kind, text, shape in CASES:
        if kind == "conv":
            layer = build(kind, text, shape)[1]
            classic[(text, shape)] = layer.algo_for(256)
    monkeypatch.setattr(convmod, "WIDE", True)
    evaluation, training = {}, {}
    for kind, text, shape in CASES:
        if kind == "conv":
            layer = build(kind, text, shape)[1]
            few = layer.args["filters"] <= convmod.DIRECT_MAX_FILTERS
            a = layer.args
            one_wide = (a["stride"] == 1 and layer.in_shape[0] == 1 and a["field"] >= 3   # the conv that
                        and layer._run_as().padding <= a["field"] - 1)                  # runs: pad_mode's pad=0 twin
            old = classic[(text, shape)]
            th, tw = convmod._winograd.tiles(layer.out[1], layer.out[2])
            big = old.startswith("winograd") and 256 * th * tw >= convmod.WIDE_WINO_MIN_TILES and (
                old != "winograd25" or layer.in_shape[0] >= convmod.WIDE_WINO25_MIN_C)
            evaluation.setdefault(layer.algo_for(256, training=False), set()).add(
                "rows" if few else "wino" if big else one_wide)
            if old.startswith("winograd"):   # a small batch: gemm
                assert layer.algo_for(4, training=False) == "gemm", (text, shape)
            training.setdefault(layer.algo_for(256), set()).add(few)
            assert layer.algo_for(256) == ("gemm" if old == "planar" else old), (text, shape)
    for c, want in ((convmod.WIDE_WINO25_MIN_C - 1, "gemm"), (convmod.WIDE_WINO25_MIN_C, "winograd25")):
        layer = build("conv", "conv(filters=40, field=5)", f"12x12x{c}")[1]   # net B's conv2 at 20
        assert (layer.algo_for(256), layer.algo_for(256, training=False)) == ("winograd25", want), c
    wino = {a: evaluation.pop(a) for a in ("winograd", "winograd4", "winograd25") if a in evaluation}
    assert wino and all(v == {"wino"} for v in wino.values()), wino
    assert evaluation == {"rows": {"rows"}, "gemm": {False}, "planar": {True}}, evaluation
    assert "planar" not in training and {"winograd", "winograd4"} <= set(training), training


def test_own_product_machines_pick_winograd_for_enough_tiles_in_evaluation(monkeypatch):
    """With flowdsl's own product (conv.own_rules: AVX-512 CPUs, FLOWDSL_WIDE unset) evaluation
    runs Winograd's 3x3 convs from OWN_WINO_MIN_TILES tiles a call and F(2x2, 5x5) only over
    WIDE_WINO25_MIN_C input channels or more, gemm (pooling and relu inside) otherwise; training
    keeps its thresholds, planar and rows stay. The suite runs the classic rules (FLOWDSL_WIDE=0)."""
    import flowdsl.layers.conv as convmod
    assert convmod.own_rules() is False and os.environ["FLOWDSL_WIDE"] == "0"
    monkeypatch.setattr(convmod, "OWN_RULES", True)
    monkeypatch.setattr(convmod, "WIDE", False)
    monkeypatch.setattr(convmod, "WINO_MIN_TILES", 128)   # training's (this file's fixture sets 0)
    a2 = build("conv", "conv(filters=64, field=3)", "13x13x32")[1]    # net A's conv2: 36 tiles an image
    b2 = build("conv", "conv(filters=40, field=5)", "12x12x20")[1]    # net B's conv2
    wide5 = build("conv", "conv(filters=40, field=5)", "12x12x32")[1]
    one = build("conv", "conv(filters=20, field=5)", "28x28x1")[1]
    few = build("conv", "conv(filters=3, field=3)", "9x9x4")[1]
    per = convmod.OWN_WINO_MIN_TILES // 36
    assert a2.algo_for(per, False) == "gemm" and a2.algo_for(per + 1, False) == "winograd4"
    assert a2.algo_for(1) == "gemm" and a2.algo_for(64) == "winograd4"   # training: its own thresholds
    assert {b2.algo_for(n, False) for n in (1, 16, 256, 4096)} == {"gemm"} and b2.algo_for(64) == "winograd25"
    assert wide5.algo_for(1, False) == "gemm" and wide5.algo_for(256, False) == "winograd25"
    assert {one.algo_for(n, False) for n in (1, 256)} == {"planar"} and few.algo_for(256, False) == "rows"
    monkeypatch.setattr(convmod, "OWN_RULES", None)
    for env, want in (("0", False), ("1", False)):
        monkeypatch.setenv("FLOWDSL_WIDE", env)
        assert convmod.own_rules() is want
        monkeypatch.setattr(convmod, "OWN_RULES", None)
    monkeypatch.delenv("FLOWDSL_WIDE")
    from flowdsl import blas
    for own in (True, False):
        monkeypatch.setattr(blas, "OWN", own)
        assert convmod.own_rules() is own
        monkeypatch.setattr(convmod, "OWN_RULES", None)


@pytest.mark.parametrize("text,shape,pool", [
    ("conv(filters=6, field=3)", "13x11x8", "maxpool(2, ceil=true)"),
    ("conv(filters=5, field=3, pad=1)", "9x8x1", "maxpool(3, stride=2)"),   # columns as rows
    ("conv(filters=7, field=5, stride=2, pad=2)", "17x13x3", "maxpool(2)")])
def test_gemm_applies_the_next_max_window_in_evaluation(text, shape, pool, monkeypatch):
    """"gemm" in evaluation pools each chunk's output itself (flowdsl.plan fuses conv + maxpool):
    the same numbers as the two layers run apart, across several chunks per thread's share."""
    import flowdsl.layers.conv as convmod
    from flowdsl.model import build_text
    monkeypatch.setattr(convmod, "WIDE", True)
    m = build_text(f"network = input({shape}) :: {text} :: {pool} :: dense(3) :: softmax", "t.flow")
    fused, apart = Net(m, seed=3), Net(m, seed=3, fuse=False)
    assert any(s.absorbs is not None for s in fused.plan(False, 13).steps)
    x = np.random.default_rng(0).normal(0, 1, (13,) + nhwc(m.layers[1].in_shape)).astype(np.float32)
    monkeypatch.setattr(convmod, "CHUNK_FLOATS", 1 << 10)   # a few images per chunk
    np.testing.assert_allclose(fused.forward(x), apart.forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,algo", [(40, "winograd4"), (20, "gemm")])
def test_wide_evaluation_runs_winograd_for_big_batches(n, algo, monkeypatch):
    """With AVX-512, a Winograd conv followed by a maxpool in evaluation: a batch of
    WIDE_WINO_MIN_TILES tiles or more runs Winograd (the plan then leaves the maxpool apart), a
    smaller one gemm with the maxpool inside; the predictions equal those of the unfused layers
    on the classic rule."""
    import flowdsl.layers.conv as convmod
    from flowdsl.model import build_text
    m = build_text("network = input(13x13x32) :: conv(filters=16, field=3) :: maxpool :: dense(3) "
                   ":: softmax", "t.flow")
    x = np.random.default_rng(1).normal(0, 1, (n, 13, 13, 32)).astype(np.float32)
    want = Net(m, seed=4, fuse=False).forward(x)
    monkeypatch.setattr(convmod, "WIDE", True)
    net = Net(m, seed=4)
    assert any(s.absorbs is not None for s in net.plan(False, n).steps) == (algo == "gemm")
    ran = []
    orig = convmod.Conv.algo_for
    monkeypatch.setattr(convmod.Conv, "algo_for",
                        lambda self, k, training=True: ran.append(orig(self, k, training)) or ran[-1])
    np.testing.assert_allclose(net.forward(x), want, rtol=2e-5, atol=2e-5)
    assert ran and set(ran) == {algo}, ran


@pytest.mark.parametrize("scheme", ["_winograd", "_winograd4", "_winograd25"])
@pytest.mark.parametrize("c,k", [(3, 5), (24, 64), (96, 96), (7, 300)])
def test_winograd_filter_transform_and_its_adjoint(scheme, c, k):
    """U = (G kron G) w filter by filter (the separable kernel, blocks of columns: fewer columns
    than a block, several, a partial last one) and dw = (G kron G)^T dU against float64 products
    with the Kronecker matrix, in the serial and the parallel kernel: within float32 rounding
    of the scale (the float32 product it replaced: up to 1.1e-7)."""
    import importlib
    from flowdsl.layers import _winograd as W
    sc = importlib.import_module(f"flowdsl.layers.{scheme}")
    rng = rng_for("wtransform", scheme, c, k)
    r = sc.R
    kron = np.kron(sc._G.astype(np.float64), sc._G.astype(np.float64))
    w = rng.normal(0.0, 1.0, (r, r, c, k)).astype(np.float32)
    dU = rng.normal(0.0, 1.0, (kron.shape[0], c, k)).astype(np.float32)
    want_u = (kron @ w.astype(np.float64).reshape(r * r, -1)).reshape(-1, c, k)
    want_dw = (kron.T @ dU.astype(np.float64).reshape(kron.shape[0], -1)).reshape(r, r, c, k)
    got_u, got_dw = W.weights(w, sc), W.weights_grad(dU, sc)
    assert got_u.dtype == got_dw.dtype == np.float32 and got_u.shape == want_u.shape
    for kern in ("serial", "par"):
        u = np.full((kron.shape[0], c * k), np.nan, np.float32)
        getattr(W._transform, kern)(sc._G32, w.reshape(r * r, -1), u)
        d = np.full((r * r, c * k), np.nan, np.float32)
        getattr(W._transform_t, kern)(sc._G32, dU.reshape(kron.shape[0], -1), d)
        for got, want in ((u.reshape(want_u.shape), want_u), (got_u, want_u), (d.reshape(want_dw.shape), want_dw),
                          (got_dw, want_dw)):
            assert np.isfinite(got).all()
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-7 * np.abs(want).max())


@pytest.mark.parametrize("shape,filters,field,pad,algo,n", [
    ("14x14x24", 64, 3, "same", "winograd", 10), ("13x13x32", 40, 3, "0", "winograd4", 10),
    ("7x7x64", 24, 3, "2", "winograd4", 10), ("7x7x96", 96, 3, "same", "winograd4", 10),
    ("28x28x1", 20, 5, "0", "planar", 40), ("28x28x1", 24, 3, "same", "planar", 40),
    ("14x13x3", 16, 3, "1", "planar", 21), ("12x12x8", 10, 4, "3", "planar", 5),
    ("12x12x20", 40, 5, "0", "winograd25", 10), ("14x14x16", 32, 5, "same", "winograd25", 9)])
def test_fast_conv_matches_im2col_at_network_sizes(shape, filters, field, pad, algo, n, monkeypatch):
    """Winograd (F(2x2), F(4x4) and F(2x2, 5x5)) and planar convs against the im2col path on
    realistic sizes (fashion.flow's second conv, hello-dl's, a padded one, fashion_res's block;
    net B's and fashion's first layers, an RGB one, a generic field; net B's second conv and a
    padded 5x5 one; batches that split the weight
    gradient's image ranges unevenly), training forward and backward and chunked evaluation."""
    import flowdsl.layers.conv as convmod
    net, layer = build("conv", f"conv(filters={filters}, field={field}, pad={pad})", shape)
    rng = rng_for("fastconv", shape)
    randomise(net, layer, rng)
    p = params_of(net, layer)
    x = rng.normal(0.0, 1.0, (n,) + nhwc(layer.in_shape)).astype(np.float32)
    dy = rng.normal(0.0, 1.0, (n,) + nhwc(layer.out)).astype(np.float32)

    def run():
        ctx = ctx_of(net, layer)
        y = layer.forward(x, p, ctx, True)
        g = {k: np.full_like(v, np.nan) for k, v in p.items()}
        dx = layer.backward(dy, p, g, ctx, need_dx=True)
        chunk, convmod.CHUNK_FLOATS = convmod.CHUNK_FLOATS, 1 << 14   # several evaluation chunks
        try:
            ye = layer.forward(x, p, ctx_of(net, layer), False)
        finally:
            convmod.CHUNK_FLOATS = chunk
        if layer.algo.startswith("winograd"):   # one image a chunk, as a thread alone runs it
            with monkeypatch.context() as m:
                m.setattr(convmod._winograd, "CHUNK_FLOATS", 1)
                m.setattr(convmod._winograd, "solo", lambda: True)
                ctx = ctx_of(net, layer)
                yc = layer.forward(x, p, ctx, True)
                assert len(ctx["V"]) == n
                gc = {k: np.full_like(v, np.nan) for k, v in p.items()}
                dxc = layer.backward(dy, p, gc, ctx, need_dx=True)
            # the products' sums run in another order (BLAS blocks by the tile count): rounding
            # of the scheme's size (F(2x2, 5x5) ~2e-6 of the scale, the others less)
            close = 2.5e-5 if algo == "winograd25" else 1e-5
            for a, b in ((yc, y), (dxc, dx), (gc["w"], g["w"]), (gc["b"], g["b"])):
                np.testing.assert_allclose(a, b, rtol=0, atol=close * float(np.abs(b).max()))
        return [y, dx, g["w"], g["b"], ye]

    assert layer.algo == algo
    got = run()
    monkeypatch.setattr(convmod, "WINO_MIN_C", 10 ** 9)
    monkeypatch.setattr(convmod, "WINO25_MIN_C", 10 ** 9)
    monkeypatch.setattr(convmod, "PLANAR_MAX_C", 0)
    assert layer.algo == "gemm"
    want = run()
    # F(2x2, 5x5)'s weight gradient sums products of values its transforms scaled by up to 25
    # and 9 over all tiles: 1.6e-5 of the scale from the float64 result here (im2col's ~1e-6)
    tol = 5e-5 if algo == "winograd25" else 2e-5
    for name, a, b in zip(("y", "dx", "dw", "db", "y eval"), got, want):
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale, err_msg=name)


def test_winograd_waits_for_enough_tiles(monkeypatch):
    """Below WINO_MIN_TILES output tiles a Winograd layer runs im2col (faster for one image),
    forward and backward, with the same results."""
    import flowdsl.layers.conv as convmod
    monkeypatch.setattr(convmod, "WINO_MIN_TILES", 100)
    net, layer = build("conv", "conv(filters=6, field=3, pad=same)", "10x10x12")  # 25 tiles an image
    rng = rng_for("wino-tiles")
    randomise(net, layer, rng)
    p = params_of(net, layer)
    outs = {}
    for n in (3, 4):   # 75 tiles: im2col; 100: Winograd
        x = rng.normal(0.0, 1.0, (n, 10, 10, 12)).astype(np.float32)
        ctx = ctx_of(net, layer)
        y = layer.forward(x, p, ctx, True)
        g = {k: np.full_like(v, np.nan) for k, v in p.items()}
        dx = layer.backward(y, p, g, ctx, need_dx=True)
        want = naive.reference(layer, x.astype(np.float64), f64(p), True)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        outs[ctx["algo"]] = (dx, g["w"])
    assert set(outs) == {"gemm", "winograd"}


# ------------------------------------------------------------------------------ kernels as Python
def layer_modules():
    """Every module of the flowdsl.layers package, helpers too (conv's strategies, ...), found
    by pkgutil: a kernel in a new module is swapped and counted without touching this file."""
    import flowdsl.layers as package
    return [importlib.import_module(m.name)
            for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


def kernels_in(mod):
    return {name: obj for name, obj in vars(mod).items()
            if hasattr(obj, "py_func") and getattr(obj.py_func, "__module__", None) == mod.__name__}


def python_kernels(monkeypatch):
    """Swap every compiled kernel of the layer package for its plain-Python version (`.py_func`);
    returns the set of (module, kernel) names called from then on, nested calls included (a
    Python kernel calls the others through its module's globals)."""
    from flowdsl import jit
    called = set()
    for mod in layer_modules():   # bind every module's kernels first, as a run that compiled them
        jit.compile_module(mod.__name__)   # has: one module's kernels imported into another
        # (winograd25's _in from winograd4) would otherwise look for their lazy originals in a
        # module whose names are swapped below, and stay uncompiled
    for mod in layer_modules():
        for name, obj in kernels_in(mod).items():
            def python(*args, _f=obj.py_func, _key=(mod.__name__, name)):
                called.add(_key)
                return _f(*args)
            python.serial = python   # a parallel kernel's serial twin, called by name
            monkeypatch.setattr(mod, name, python)
    return called


def run_layer(net, layer, x, world=None):
    """A training forward and backward, then an evaluation forward, of one layer: [y, dx,
    y in evaluation, parameter gradients...]. Running statistics are put back after training,
    and a random layer gets the same generator state every time (dropout: the same mask).
    world: the layer runs as a data-parallel rank of it (ctx["world"]; batchnorm's global
    statistics)."""
    p = params_of(net, layer)
    ctx = ctx_of(net, layer, x)
    ctx["rng"] = np.random.default_rng(0)
    if world is not None:
        ctx["world"] = world
    st = {k: v.copy() for k, v in ctx["state"].items()}
    y = layer.forward(x, p, ctx, True)
    g = {k: np.full_like(v, np.nan) for k, v in p.items()}
    dx = layer.backward(np.ones_like(y) + y, p, g, ctx, need_dx=True)
    for k, v in st.items():  # undo the running-statistics update
        ctx["state"][k][...] = v
    y_eval = layer.forward(x, p, ctx_of(net, layer, x), False)
    return [y, dx, y_eval] + [g[k] for k in sorted(g)]


# Every example of every kind that has a forward and backward (losses have their own interface and
# call no layer kernel), at batch 2; test_python_versions_reach_every_kernel checks that these
# reach every kernel of the package, so a kernel no case runs fails there instead of going unchecked.
PYFUNC = [c + (2,) for c in CASES if REGISTRY[c[0]].role in ("layer", "activation")]
PYFUNC += [  # more samples and rows than threads: parallel tasks that could collide if they shared dx
    ("maxpool", "maxpool(3, stride=2, ceil=true)", "13x11x3", 8),
    ("maxpool", "maxpool(2)", "12x11x3", 8),
    ("avgpool", "avgpool(3, stride=1)", "9x11x3", 8),
    ("conv", "conv(filters=2, field=3, stride=2, pad=1)", "11x9x2", 8),
    ("conv", "conv(filters=6, field=3, stride=2, pad=1)", "11x9x2", 8),
    ("conv", "conv(filters=6, field=3, pad=same)", "9x7x9", 8),
    ("conv", "conv(filters=6, field=3, pad=1)", "9x7x12", 8),      # Winograd
    ("conv", "conv(filters=7, field=3)", "9x7x1", 8),
    ("conv", "conv(filters=7, field=4, stride=2, pad=2)", "8x10x1", 8),
    ("conv", "conv(filters=19, field=5, pad=2)", "9x8x2", 8),     # planar: 3 filter groups
    ("conv", "conv(filters=6, field=3, pad=1)", "9x7x32", 8),     # Winograd F(4x4)
    ("conv", "conv(filters=6, field=5, pad=1)", "9x8x16", 8),     # Winograd F(2x2, 5x5)
    # im2col products large enough for the own kernel (blas.runs_own): evaluation's one-call path
    # (_vconv.conv_eval), and at stride 1 the input gradient's product through it too
    ("conv", "conv(filters=16, field=3, stride=2, pad=1, act=relu)", "12x12x8", 8),
    ("conv", "conv(filters=16, field=3)", "9x9x16", 4),
]


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT", "0") != "0", reason="no compiled kernels to compare")
@pytest.mark.parametrize("own", [True, False], ids=["own", "blas"])
@pytest.mark.parametrize("mode", ["parallel", "serial"])
@pytest.mark.parametrize("kind,text,shape,batch", PYFUNC, ids=[f"{k}:{t}@{s}x{b}" for k, t, s, b in PYFUNC])
def test_kernels_match_their_python_versions(kind, text, shape, batch, mode, own, monkeypatch):
    """The compiled kernels against their plain-Python versions (`.py_func`): training forward and
    backward, and the evaluation forward; every parallel kernel both as compiled with prange
    (jit.SERIAL_BELOW = 0: every call) and as its serial twin (the small calls' path); with
    flowdsl's own products (blas.OWN: the AVX-512 machines' kernels, _vconv's included, correct
    on any CPU) and without."""
    from flowdsl import blas, jit
    monkeypatch.setattr(blas, "OWN", own)
    net, layer, _, rng = setup(kind, text, shape)
    x = rng.normal(0.0, 1.0, (batch,) + nhwc(layer.in_shape)).astype(np.float32)
    monkeypatch.setattr(jit, "SERIAL_BELOW", 0 if mode == "parallel" else 1 << 62)
    compiled = run_layer(net, layer, x)
    monkeypatch.setattr(jit, "SERIAL_BELOW", 1 << 17)
    python_kernels(monkeypatch)
    python = run_layer(net, layer, x)
    # fastmath (reassociation, fused multiply-add) changes the last bits; chained through the
    # activation's derivative and a conv sum that can reach ~1e-4 of the array's scale
    for i, (a, b) in enumerate(zip(compiled, python)):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4 * scale,
                                   err_msg=f"output {i} (y, dx, y in evaluation, grads...)")


def run_pooled(net, layer, x, window):
    """run_layer for a layer that applies the next max window (size, stride) itself (the plan's
    pooled steps, Layer.can_pool): windows clipped to the input, a last partial one kept."""
    (k, s), (_, h, w) = window, layer.out
    ph, pw = (-(-(n - k) // s) + 1 for n in (h, w))
    ph, pw = (o - ((o - 1) * s >= n) for o, n in ((ph, h), (pw, w)))   # each window starts inside
    pool = (k, s, ph, pw)
    p = params_of(net, layer)
    ctx = ctx_of(net, layer, x)
    st = {kk: v.copy() for kk, v in ctx["state"].items()}
    y = layer.forward_fused(x, p, ctx, True, None, pool)
    g = {kk: np.full_like(v, np.nan) for kk, v in p.items()}
    dx = layer.backward(np.ones_like(y) + y, p, g, ctx, need_dx=True)
    for kk, v in st.items():
        ctx["state"][kk][...] = v
    y_eval = layer.forward_fused(x, p, ctx_of(net, layer, x), False, None, pool)
    return [y, dx, y_eval] + [g[kk] for kk in sorted(g)]


POOLED = [("batchnorm", "batchnorm", "12x11x5", 8, (2, 2)),   # batchnorm + maxpool (plan's pooled step)
          ("batchnorm", "batchnorm", "13x11x3", 4, (3, 3)),
          ("batchnorm", "batchnorm", "9x7x4", 3, (2, 3))]


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT", "0") != "0", reason="no compiled kernels to compare")
@pytest.mark.parametrize("mode", ["parallel", "serial"])
@pytest.mark.parametrize("kind,text,shape,batch,window", POOLED,
                         ids=[f"{k}+max{w}@{s}x{b}" for k, t, s, b, w in POOLED])
def test_pooled_kernels_match_their_python_versions(kind, text, shape, batch, window, mode, monkeypatch):
    """test_kernels_match_their_python_versions for the layers that run the next maxpool."""
    from flowdsl import jit
    net, layer, _, rng = setup(kind, text, shape)
    x = rng.normal(0.0, 1.0, (batch,) + nhwc(layer.in_shape)).astype(np.float32)
    monkeypatch.setattr(jit, "SERIAL_BELOW", 0 if mode == "parallel" else 1 << 62)
    compiled = run_pooled(net, layer, x, window)
    monkeypatch.setattr(jit, "SERIAL_BELOW", 1 << 17)
    python_kernels(monkeypatch)
    python = run_pooled(net, layer, x, window)
    assert np.abs(python[1]).max() > 0
    for i, (a, b) in enumerate(zip(compiled, python)):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4 * scale, err_msg=f"output {i}")


@pytest.mark.parametrize("mode", ["parallel", "serial"])
@pytest.mark.parametrize("shape,batch", [("6x5x4", 3), ("1x1x7", 40), ("3x3x2", 1)])
def test_batchnorm_as_a_rank_matches_the_one_process_statistics(shape, batch, mode, monkeypatch):
    """batchnorm on a data-parallel rank (ctx["world"]: MPI ranks, split training's threads)
    takes its statistics from _global_stats' sums instead of _bn_stats: with a world of one the
    outputs, input gradient, parameter gradients and running statistics must be the
    one-process pass's, compiled and as Python."""
    from flowdsl import jit
    net, layer, _, rng = setup("batchnorm", "batchnorm", shape)
    x = rng.normal(3.0, 2.0, (batch,) + nhwc(layer.in_shape)).astype(np.float32)
    monkeypatch.setattr(jit, "SERIAL_BELOW", 0 if mode == "parallel" else 1 << 62)

    def compare():
        plain, ranked = run_layer(net, layer, x), run_layer(net, layer, x, world=Solo())
        for i, (a, b) in enumerate(zip(ranked, plain)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"output {i}")
        return ranked
    compiled = compare()
    python_kernels(monkeypatch)
    for i, (a, b) in enumerate(zip(compiled, compare())):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"python output {i}")
    st = net.state[layer.name]
    before = {k: v.copy() for k, v in st.items()}
    ctx = dict(ctx_of(net, layer, x), world=Solo())
    layer.forward(x, params_of(net, layer), ctx, True)
    after = {k: v.copy() for k, v in st.items()}
    for k, v in before.items():
        st[k][...] = v
    layer.forward(x, params_of(net, layer), ctx_of(net, layer, x), True)
    for k in st:
        assert not np.array_equal(after[k], before[k])
        np.testing.assert_allclose(after[k], st[k], rtol=1e-6, atol=1e-7)


def softmax_probabilities(rng):
    """softmax's forward (predict's probabilities) on scores of several scales, a row of ties
    and one image: (input, output) pairs."""
    from flowdsl.layers.softmax import Softmax
    layer = Softmax({"smoothing": 0.0}, "softmax", None, None)
    cases = [rng.normal(0.0, 1.0, (7, 10)), rng.normal(0.0, 30.0, (3, 4)), np.zeros((2, 5)),
             rng.normal(5.0, 1.0, (1, 10))]
    return [(z, layer.forward(z.astype(np.float32), None, {}, False)) for z in cases]


@pytest.mark.parametrize("mode", ["parallel", "serial", "python"])
def test_softmax_probabilities_match_the_reference(mode, monkeypatch):
    """The probabilities (one kernel call) against float64 softmax: rows sum to 1, ties give
    equal shares, large scores do not overflow."""
    from flowdsl import jit
    monkeypatch.setattr(jit, "SERIAL_BELOW", 0 if mode == "parallel" else 1 << 62)
    if mode == "python":
        python_kernels(monkeypatch)
    for z, got in softmax_probabilities(np.random.default_rng(4)):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        want = e / e.sum(axis=1, keepdims=True)
        assert got.dtype == np.float32 and got.shape == z.shape
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT", "0") != "0", reason="no compiled kernels to compare")
def test_python_versions_reach_every_kernel(monkeypatch):
    """Every kernel in the layer package runs (as Python) in some case of
    test_kernels_match_their_python_versions: a new kernel, or one only some new path calls,
    cannot go unchecked against its Python version."""
    from flowdsl import blas
    every = {(m.__name__, name) for m in layer_modules() for name in kernels_in(m)}
    assert every, "no kernels found in flowdsl.layers"
    called = python_kernels(monkeypatch)
    for own in (True, False):   # both kernel sets (see test_kernels_match_their_python_versions)
        monkeypatch.setattr(blas, "OWN", own)
        for kind, text, shape, batch in PYFUNC:
            net, layer, _, rng = setup(kind, text, shape)
            run_layer(net, layer, rng.normal(0.0, 1.0, (batch,) + nhwc(layer.in_shape)).astype(np.float32))
        for kind, text, shape, batch, window in POOLED:
            net, layer, _, rng = setup(kind, text, shape)
            run_pooled(net, layer, rng.normal(0.0, 1.0, (batch,) + nhwc(layer.in_shape)).astype(np.float32), window)
    net, layer, x, _ = setup("batchnorm", "batchnorm", "6x5x4")
    run_layer(net, layer, x, world=Solo())
    softmax_probabilities(np.random.default_rng(0))
    missing = sorted(f"{m}.{k}" for m, k in every - called)
    assert not missing, f"kernels no case runs: {missing}; add an example to tests/naive.py or PYFUNC"


# ------------------------------------------------------------------------------ whole networks
NETS = [
    ("letters-like", """input(12x12x1)
        :: conv(filters=4, field=3) :: maxpool(2, ceil=true) :: gelu
        :: conv(filters=5, field=3) :: maxpool(2, ceil=true) :: gelu
        :: flatten :: dense(6) :: softmax"""),
    ("batchnorm-dropout-avgpool", """input(8x7x2)
        :: conv(filters=3, field=3, pad=same) :: batchnorm :: relu :: dropout(p=0)
        :: avgpool(3, stride=2, ceil=true) :: conv(filters=6, field=2, act=elu)
        :: flatten :: dense(5) :: batchnorm(momentum=0.5) :: tanh :: dense(3) :: softmax"""),
    ("regression", "input(6) :: dense(4, act=sigmoid) :: dropout(0) :: dense(2, act=softplus) :: squared"),
    # skip connections: from the input (twice), two from one source, nested, adjacent (2x), and
    # from a conv followed by maxpool (whose relu must then stay with the conv)
    ("residual", """b = conv(filters=3, field=3, pad=same) :: batchnorm :: relu
        c = conv(filters=3, field=3, pad=same, act=relu)
        network = input(6x5x3) :: add(input1) :: b
          :: conv(filters=3, field=3, pad=same, act=tanh) :: add(b) :: elu :: add(b) :: add(input1)
          :: c :: maxpool(2, stride=1) :: conv(filters=3, field=2, pad=1) :: add(c) :: conv(filters=3, field=1) :: add(add3)
          :: maxpool(2, ceil=true) :: dense(4) :: add(dense1) :: softmax"""),
    # branches: an Inception block (four branches from one stem, a padded pool branch, a stem
    # whose gradient sums over its consumers, the stem itself joined too), a branch from the
    # input, a conv + maxpool (fused in evaluation) feeding two branches, and l2pool / gap
    ("inception", """stem = input(9x8x2) :: conv(filters=4, field=3, pad=same, bias=false) :: batchnorm :: relu
        a = stem :: conv(filters=3, field=1, act=relu)
        b = stem :: conv(filters=2, field=1, act=relu) :: conv(filters=3, field=3, pad=1, pad_mode=mirror)
        c = stem :: conv(filters=2, field=1) :: relu :: conv(filters=2, field=5, pad=2, act=tanh)
        d = stem :: maxpool(3, stride=1, pad=1) :: conv(filters=2, field=1)
        network = concat(a, b, c, d, stem) :: maxpool(2, ceil=true) :: relu :: l2pool(2) :: dense(3) :: softmax"""),
    ("branches", """inp = input(8x6x1)
        t = inp :: conv(filters=3, field=3, pad=1, act=relu) :: maxpool
        u = t :: conv(filters=2, field=1, act=relu)
        v = t :: avgpool(3, stride=1, pad=1) :: conv(filters=3, field=1, bias=false)
        w = inp :: conv(filters=4, field=2, stride=2, act=elu)
        network = concat(u, v, w) :: concat(v) :: conv(filters=3, field=3, pad=1) :: add(v) :: gap :: dense(2) :: softmax"""),
    # add first in a chain (the sum of two branches), and after a layer with two names
    ("sums", """inp = input(6x5x2)
        p = inp :: conv(filters=3, field=3, pad=1, act=tanh)
        q = inp :: conv(filters=3, field=1, bias=false)
        network = add(p, q) :: relu :: add(p, q) :: dense(3) :: softmax"""),
]


@pytest.mark.parametrize("name,src", NETS, ids=[n for n, _ in NETS])
def test_network_gradient(name, src):
    model = build_text(src)
    net = Net(model, seed=3)
    rng = rng_for("net", name)
    net.flat[...] += rng.normal(0.0, 0.1, net.flat.shape).astype(np.float32)  # biases, gammas off 0 and 1
    x = rng.normal(0.0, 1.0, (4,) + nhwc(model.input_shape)).astype(np.float32)
    last = model.layers[-1]
    if last.targets == "labels":
        t = rng.integers(0, last.in_shape[0], 4)
    else:
        t = rng.normal(0.0, 1.0, (4,) + last.in_shape).astype(np.float32)
    net.gflat[...] = np.nan
    loss, _ = net.loss_grad(x, t)
    p64 = {ln: f64(ps) for ln, ps in net.params.items()}
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(loss, naive.network_loss(model, x64, p64, t), rtol=1e-5)
    assert np.all(np.isfinite(net.gflat)), "some parameter gradient was not written"
    for ln, ps in net.params.items():
        for pn in ps:
            def f(v, ln=ln, pn=pn):
                return naive.network_loss(model, x64, {**p64, ln: {**p64[ln], pn: v}}, t)
            fd_check(f"{name}: {ln}.{pn}", net.grads[ln][pn], f, p64[ln][pn], rng)


def _step_outputs(nets, shape, seed, focus=None):
    """One training step and a prediction of each net on the same random batch (N, H, W, C) with
    4 classes: [{loss, correct, grads, probs, focus}]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, 4, shape[0])
    outs = []
    for net in nets:
        loss, correct = net.loss_grad(x, y)
        outs.append({"loss": loss, "correct": correct, "grads": net.gflat.copy(), "probs": net.predict(x),
                     "focus": net.focus(focus, x) if focus else None})
    return outs


def test_maxpool_then_relu_is_relu_then_maxpool():
    """examples/fashion.flow pools before its relus (4x less activation work): the same network,
    outputs and gradients, because relu is monotonic. Checked on a batchnormed conv stack."""
    head = "network = input(9x9x2) :: conv(filters=3, field=3, pad=same) :: batchnorm :: "
    tail = " :: dense(4) :: softmax\ntrain { seed = 3 }"
    nets = [Net(build_text(head + mid + tail, "<t>"), seed=3)
            for mid in ("relu :: maxpool(2, ceil=true)", "maxpool(2, ceil=true) :: relu")]
    a, b = _step_outputs(nets, (5, 9, 9, 2), 0)
    assert nets[0].flat.shape == nets[1].flat.shape and np.array_equal(nets[0].flat, nets[1].flat)
    assert abs(a["probs"].std()) > 0 and np.abs(a["grads"]).max() > 0
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    np.testing.assert_allclose(a["grads"], b["grads"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a["probs"], b["probs"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("act,deferred", [("relu", True), ("leakyrelu(alpha=0.1)", True),
                                          ("elu", False), ("tanh", False)])
def test_conv_activation_moved_after_maxpool(act, deferred):
    """The plan runs a conv's relu after the maxpool that follows it: outputs and
    gradients equal those of the activation in place, and focus on the conv still shows its
    activated output. Only relu and leakyrelu: exactly monotonic in float32 too."""
    text = (f"network = input(10x10x2) :: conv(filters=6, field=3, pad=same, act={act}) "
            f":: maxpool(2) :: conv(filters=5, field=3, act={act}) :: maxpool(2, ceil=true) "
            f":: dense(4) :: softmax\ntrain {{ seed = 5 }}")
    nets = [Net(build_text(text, "<t>"), seed=5, fuse=f) for f in (True, False)]  # [1]: activation in place
    for training in (True, False):
        assert nets[0].plan(training, 6).deferred() == (["conv1", "conv2"] if deferred else [])
        assert nets[1].plan(training, 6).deferred() == []
    assert nets[0].plan(True, 6).describe()[:2] == (["conv1 (linear)", f"maxpool1 -> {act.split('(')[0]}"]
                                                     if deferred else ["conv1", "maxpool1"])
    assert nets[0].plan(True, 6, keep={"conv1"}).deferred() == (["conv2"] if deferred else [])
    a, b = _step_outputs(nets, (6, 10, 10, 2), 1, focus="conv1")
    assert np.abs(b["grads"]).max() > 0
    assert a["loss"] == b["loss"] and a["correct"] == b["correct"]
    for key in ("grads", "probs", "focus"):
        np.testing.assert_array_equal(a[key], b[key])
    if act == "relu":
        assert a["focus"].min() == 0 and (a["focus"] < 0).sum() == 0   # the conv's activated output


EVAL_NETS = [   # small-batch evaluation's one-call kernels (own products) and their numpy twins
    ("planar, pooled, relu", "input(28x28x1) :: conv(filters=20, field=5, act=relu) :: maxpool", (1, 3)),
    ("planar, general window", "input(9x8x2) :: conv(filters=19, field=5, pad=2, act=relu) "
                               ":: maxpool(3, stride=2, ceil=true)", (2,)),
    ("planar, unpooled", "input(10x9x3) :: conv(filters=8, field=3, pad=1, act=relu) :: conv(filters=5, field=3)", (2,)),
    ("gemm, pooled, relu", "input(12x12x12) :: conv(filters=40, field=5, act=relu) :: maxpool", (1, 3)),
    ("gemm, pooled, no bias", "input(12x12x12) :: conv(filters=40, field=5, bias=false, act=relu) :: maxpool(2, ceil=true)", (1,)),
    ("gemm, relu", "input(12x12x8) :: conv(filters=16, field=3, stride=2, pad=1, act=relu)", (1, 5)),
    ("dense rows", "input(40) :: dense(20, act=relu) :: dense(5) :: dense(7, act=tanh, bias=false)", (1, 4, 5)),
]


@pytest.mark.parametrize("own", [True, False], ids=["own", "blas"])
@pytest.mark.parametrize("name,src,batches", EVAL_NETS, ids=[n for n, _, _ in EVAL_NETS])
def test_small_batch_evaluation_against_float64(name, src, batches, own, monkeypatch):
    """predict at batch 1 and other small batches against the float64 layer references chained:
    conv + maxpool + relu in one numba call (_vconv, flowdsl's own products: correct on any
    CPU), dense layers of a few rows in one (dense._small), and the numpy paths of CPUs without
    AVX-512 (blas.OWN False)."""
    from flowdsl import blas
    monkeypatch.setattr(blas, "OWN", own)
    model = build_text(src + " :: squared", "<t>")
    net = Net(model, seed=1)
    algo = name.split(",")[0]
    assert all(l.algo_for(n, False) == algo for l in net.layers if l.kind == "conv" for n in batches)
    assert algo == "dense rows" or net.plan(False, 1).steps[0].pool is not None or "unpooled" in name or name == "gemm, relu"
    rng = rng_for("small-eval", name)
    net.flat[...] += rng.normal(0.0, 0.2, net.flat.shape).astype(np.float32)   # biases off 0
    for n in batches:
        x = rng.normal(0.0, 1.0, (n,) + nhwc(model.input_shape)).astype(np.float32)
        want = x.astype(np.float64)
        for layer in model.layers:
            if layer.role not in ("input", "loss"):
                want = naive.reference(layer, want, f64(net.params.get(layer.name, {})), False,
                                       f64(net.state.get(layer.name, {})))
        got = net.predict(x)
        want = want.reshape(got.shape)
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()), err_msg=f"batch {n}")


@pytest.mark.parametrize("act,pool,fused", [("relu", "maxpool(2)", 2), ("leakyrelu(alpha=0.1)", "maxpool(2, ceil=true)", 2),
                                            ("linear", "max2d(3, stride=2)", 2), ("gelu", "maxpool(2)", 0)])
def test_conv_pools_its_own_output_in_evaluation(act, pool, fused):
    """In evaluation a planar conv applies the maxpool after it, then its (deferred) relu, before
    writing anything (the plan's pooled steps): predictions and kept pool outputs equal those of the separate
    layers bit for bit, and the maxpool layer does not run. focus on the conv itself still gets
    its whole output; gelu does not commute with max and is not fused."""
    text = (f"network = input(11x10x1) :: conv(filters=6, field=5, pad=2, act={act}) :: {pool} "
            f":: conv(filters=9, field=3, act={act}) :: maxpool(2, ceil=true) :: dense(4) :: softmax\n"
            f"train {{ seed = 2 }}")
    nets = [Net(build_text(text, "<t>"), seed=2, fuse=f) for f in (True, False)]  # [1]: separate layers
    assert [l.algo for l in nets[0].layers if l.kind == "conv"] == ["planar", "planar"]
    pooled = nets[0].plan(False, 5).pooled()
    assert pooled == ({"conv1": "maxpool1", "conv2": "maxpool2"} if fused else {})
    assert nets[0].plan(True, 5).pooled() == {} and nets[1].plan(False, 5).pooled() == {}
    assert nets[0].plan(False, 5, keep={"conv1"}).pooled() == ({"conv2": "maxpool2"} if fused else {})
    x = np.random.default_rng(4).standard_normal((5, 10, 11, 1)).astype(np.float32)
    outs = []
    for net in nets:
        with Timer(net) as t:
            probs = net.predict(x)
        ran = set(t.times)
        _, kept = net.forward(x, keep={"maxpool1", "maxpool2"})
        outs.append((probs, kept, net.focus("conv1", x), ran))
    (pa, ka, fa, ran_a), (pb, kb, fb, ran_b) = outs
    assert ran_b >= {"maxpool1", "maxpool2"}
    assert ("maxpool1" in ran_a) == (not fused) and ("maxpool2" in ran_a) == (not fused)
    assert pa.std() > 0
    np.testing.assert_array_equal(pa, pb)
    for name in ka:
        np.testing.assert_array_equal(ka[name], kb[name])
    np.testing.assert_array_equal(fa, fb)
    assert fa.shape == (5, 10, 11, 6)


@pytest.mark.parametrize("size,h,pool", [(9, 9, "maxpool"), (9, 10, "maxpool(2, ceil=true)"),
                                         (11, 11, "max2d(3)"), (10, 9, "maxpool(2, stride=3)"),
                                         (8, 8, "maxpool(3, stride=2)")])
def test_gemm_conv_pools_its_own_output_in_training(size, h, pool):
    """conv (gemm) :: maxpool in training: each chunk's product is pooled while in cache and the
    winners recorded (the full-size output is never written); backward takes the pooled gradient
    to the winners. conv1 (NHWC columns, its relu deferred past the pool) and conv2 (columns as
    rows, strided, input gradient needed): loss, gradients, predictions, Grad-CAM and the input
    gradient equal those of the separate layers, for windows that tile, clip (ceil), skip
    (stride > size) and overlap."""
    from flowdsl import plan
    text = (f"network = input({size}x{h}x9) :: conv(filters=6, field=3, pad=same, act=relu) :: {pool} "
            f":: conv(filters=7, field=3, stride=2, pad=1) :: maxpool(2, ceil=true) :: relu "
            f":: dense(4) :: softmax\ntrain {{ seed = 4 }}")
    nets = [Net(build_text(text, "<t>"), seed=4, fuse=f) for f in (True, False)]
    assert [nets[0].layers[i].algo_for(6) for i in (0, 2)] == ["gemm", "gemm"]
    assert nets[0].plan(True, 6).pooled() == {"conv1": "maxpool1", "conv2": "maxpool2"}
    assert nets[1].plan(True, 6).pooled() == {}
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, h, size, 9)).astype(np.float32)
    outs = []
    for net in nets:
        with plan.Timer(net) as t:
            loss, _ = net.loss_grad(x, np.arange(6) % 4)
        probs = net.predict(x)
        cam = net.gradcam(x, layer="maxpool1")
        _, _, dinput = net.backprop(x, lambda z: np.ones_like(z))
        outs.append((loss, net.gflat.copy(), probs, cam, dinput, set(t.times)))
    (la, ga, pa, ca, da, ran_a), (lb, gb, pb, cb, db, ran_b) = outs
    assert not {"maxpool1", "maxpool2"} & ran_a and {"maxpool1", "maxpool2"} <= ran_b
    assert np.abs(gb).max() > 0 and pb.std() > 0 and np.abs(db).max() > 0 and cb.max() > 0
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-6 * np.abs(gb).max())
    np.testing.assert_allclose(pa, pb, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ca, cb, rtol=1e-5, atol=1e-6 * cb.max())
    np.testing.assert_allclose(da, db, rtol=1e-4, atol=1e-6 * np.abs(db).max())


@pytest.mark.parametrize("size,h,pool", [(9, 9, "maxpool"), (9, 10, "maxpool(2, ceil=true)"),
                                         (11, 11, "max2d(3)"), (10, 9, "maxpool(2, stride=3)"),
                                         (8, 8, "maxpool(3, stride=2)")])
def test_batchnorm_pools_its_own_output(size, h, pool):
    """conv :: batchnorm :: maxpool :: relu (examples/fashion.flow): batchnorm applies the max
    window to its normalised values as it computes them, in training and evaluation, so its
    full-size output is never written; backward takes the pooled gradient. Loss, gradients,
    running statistics, predictions, Grad-CAM and the input gradient equal those of the separate
    layers (float32 rounding of the sums' order at most); overlapping windows are not fused."""
    text = (f"network = input({size}x{h}x2) :: conv(filters=5, field=3, pad=same, bias=false) :: batchnorm "
            f":: {pool} :: relu :: conv(filters=7, field=3, pad=same) :: batchnorm :: maxpool(2, ceil=true) "
            f":: dense(4) :: softmax\ntrain {{ seed = 4 }}")
    nets = [Net(build_text(text, "<t>"), seed=4, fuse=f) for f in (True, False)]  # [1]: separate layers
    overlap = "stride=2" in pool and "(3" in pool
    want = {"batchnorm2": "maxpool2"} if overlap else {"batchnorm1": "maxpool1", "batchnorm2": "maxpool2"}
    for training in (True, False):
        assert nets[0].plan(training, 6).pooled() == want
        assert nets[1].plan(training, 6).pooled() == {}
    assert nets[0].plan(True, 6, keep={"batchnorm2"}).pooled() == ({} if overlap else {"batchnorm1": "maxpool1"})
    rng = np.random.default_rng(7)
    for net in nets:   # gamma of both signs (a negative one turns the window's maximum into its minimum)
        for name in ("batchnorm1", "batchnorm2"):
            g = net.params[name]["gamma"]
            g[...] = np.linspace(-1.5, 2.0, g.size, dtype=np.float32)
            net.params[name]["beta"][...] = np.linspace(0.3, -0.2, g.size, dtype=np.float32)
    x = rng.standard_normal((6, h, size, 2)).astype(np.float32) * 2 + 0.5
    outs = []
    for net in nets:
        for _ in range(2):   # the second step reads running statistics the first one moved
            loss, correct = net.loss_grad(x, np.arange(6) % 4)
        with Timer(net) as t:
            probs = net.predict(x)
        cam = net.gradcam(x, layer="relu1")
        _, _, dinput = net.backprop(x, lambda z: np.ones_like(z))
        outs.append((loss, net.gflat.copy(), {k: v["mean"].copy() for k, v in net.state.items() if "mean" in v},
                     probs, cam, dinput, set(t.times)))
    (la, ga, sa, pa, ca, da, ran_a), (lb, gb, sb, pb, cb, db, ran_b) = outs
    assert ("maxpool1" in ran_a) == overlap and "maxpool2" not in ran_a and {"maxpool1", "maxpool2"} <= ran_b
    assert np.abs(gb).max() > 0 and pb.std() > 0 and np.abs(db).max() > 0 and cb.max() > 0
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-6 * np.abs(gb).max())
    for k in sb:
        np.testing.assert_array_equal(sa[k], sb[k])
    np.testing.assert_allclose(pa, pb, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ca, cb, rtol=1e-5, atol=1e-6 * cb.max())
    np.testing.assert_allclose(da, db, rtol=1e-4, atol=1e-6 * np.abs(db).max())


@pytest.mark.parametrize("shape", [(3, 6, 8, 5), (2, 7, 9, 17)])
def test_maxpool_ties_go_to_the_first_maximum(shape):
    """Equal values in a window (relu's zeros, before a pool that runs after it): the maximum's
    gradient goes to the window's first position in reading order, in the 2x2 fast path (an even
    input, and an odd one whose last row and column no window reads) as in the general one."""
    from flowdsl.layers.maxpool import _max_bwd, _max_fwd
    rng = np.random.default_rng(5)
    x = np.maximum(rng.normal(0, 1, shape), 0).astype(np.float32)
    x[:, :4, :4] = 0.0      # all-zero windows
    x[:, 4:6, :2] = 1.5     # a window of equal positive values
    n, h, w, c = shape
    oh, ow = h // 2, w // 2
    k, s, p = 2, 2, 0
    for fn_f, fn_b in [(_max_fwd, _max_bwd), (_max_fwd.py_func, _max_bwd.py_func)]:
        y = np.empty((n, oh, ow, c), np.float32)
        arg = np.empty((n, oh, ow, c), np.int32)
        fn_f(x, y, arg, k, s, p)
        want = np.empty_like(y)
        first = np.empty_like(arg)
        for i in range(oh):
            for j in range(ow):
                win = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(n, 4, c)
                want[:, i, j] = win.max(axis=1)
                f = win.argmax(axis=1)   # numpy: the first maximum
                first[:, i, j] = (2 * i + f // 2) * w + 2 * j + f % 2
        np.testing.assert_array_equal(y, want)
        np.testing.assert_array_equal(arg, first)
        dy = rng.normal(0, 1, y.shape).astype(np.float32)
        dx = np.full((n, h * w, c), np.nan, np.float32)
        fn_b(dy, arg, dx, h, k, s, p)
        ref = np.zeros((n, h * w, c), np.float32)
        for b in range(n):
            for cc in range(c):
                np.add.at(ref[b, :, cc], first[b, :, :, cc].ravel(), dy[b, :, :, cc].ravel())
        np.testing.assert_array_equal(dx, ref)


def test_activation_layers_run_in_the_step_before_them():
    """An activation layer after a step with no activation of its own to apply runs as that step's
    post (flowdsl.plan): outputs and gradients equal the unfused net's bit for bit, in training and
    evaluation, one step fewer each; not when the step's own output is read by another layer (add)
    or kept (focus); and never in place on the step's input (in evaluation dropout hands its input
    back: the caller's array must not change)."""
    from flowdsl.model import build_text
    src = ("a = conv(filters=4, field=3, pad=same)\n"
           "network = input(6x6x2) :: dropout(0.3) :: relu :: a :: tanh :: add(a) :: maxpool :: relu "
           ":: flatten :: gelu :: dense(5) :: batchnorm :: swish :: dense(3) :: softmax\n")
    m = build_text(src, "t.flow")
    fused, apart = Net(m, seed=2), Net(m, seed=2, fuse=False)
    for training in (False, True):
        tails = fused.plan(training, 7).tails()
        assert tails == {"dropout1": "relu1", "maxpool1": "relu2", "flatten1": "gelu1", "batchnorm1": "swish1"}, tails
        assert apart.plan(training, 7).tails() == {}
        assert len(fused.plan(training, 7).steps) == len(apart.plan(training, 7).steps) - 4
    assert "swish1" not in fused.plan(False, 7, keep={"batchnorm1"}).tails().values()
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (7, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, 3, 7)
    x0 = x.copy()
    np.testing.assert_array_equal(fused.predict(x), apart.predict(x))
    np.testing.assert_array_equal(x, x0)   # relu1 after dropout (the identity here) left x alone
    for net in (fused, apart):
        net.rng = np.random.default_rng([5, 4])
    assert fused.loss_grad(x, y) == apart.loss_grad(x, y)
    np.testing.assert_array_equal(fused.gflat, apart.gflat)
    np.testing.assert_array_equal(x, x0)
    acts = fused.focus("swish1", x)
    np.testing.assert_array_equal(acts, apart.focus("swish1", x))
