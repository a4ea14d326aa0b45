"""Training (flowdsl/train.py, optim.py, checkpoint.py, jobs.py): optimizers against hand-computed
steps, schedules, determinism and exact resume, checkpoints, the train/eval/predict verbs."""
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TOY_NET, run_cli, save_npz, start_cli, toy_set

import flowdsl
import flowdsl.model
from flowdsl.args import CallValue
from flowdsl.errors import FlowError
from flowdsl.optim import Optimizer, lr_at

FASHION = Path("/usr/share/datasets/fashion-mnist")

SMALL = TOY_NET + "train { batch = 16  seed = 5  optimizer = adam(lr=0.01) }\n"


# ---------------------------------------------------------------------------- optimizers
class _FakeNet:
    def __init__(self, w, g):
        self.flat = np.array(w, np.float32)
        self.gflat = np.array(g, np.float32)
        self._spec = [(None, "w", (len(w) - 1,), 0), (None, "b", (1,), len(w) - 1)]


def _opt(name, **args):
    from flowdsl.settings import OPTIMIZERS
    vals = {p.name: p.default for p in OPTIMIZERS[name]}
    vals.update(args)
    return CallValue(name, tuple(vals.items()))


def test_sgd_step():
    net = _FakeNet([1.0, -2.0, 0.5], [0.5, 1.0, -1.0])
    Optimizer(net, _opt("sgd", lr=0.1)).step()
    np.testing.assert_allclose(net.flat, [0.95, -2.1, 0.6], rtol=1e-6)


def test_sgd_l2_applies_to_weights_only():
    net = _FakeNet([1.0, -2.0, 0.5], [0.0, 0.0, 0.0])
    Optimizer(net, _opt("sgd", lr=0.1), l2=0.5).step()
    np.testing.assert_allclose(net.flat, [0.95, -1.9, 0.5], rtol=1e-6)  # bias untouched


def test_momentum_two_steps():
    net = _FakeNet([1.0, 1.0], [1.0, 2.0])
    o = Optimizer(net, _opt("momentum", lr=0.1, mu=0.9))
    o.step()  # v = -0.1 g ; w += v
    np.testing.assert_allclose(net.flat, [0.9, 0.8], rtol=1e-6)
    o.step()  # v = 0.9 v - 0.1 g
    np.testing.assert_allclose(net.flat, [0.9 - 0.19, 0.8 - 0.38], rtol=1e-6)


def test_adam_first_steps_match_hand_computation():
    w0, g = np.array([1.0, -1.0, 0.3]), np.array([0.2, -0.4, 1.0])
    net = _FakeNet(w0, g)
    o = Optimizer(net, _opt("adam", lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8))
    m = v = np.zeros(3)
    w = w0.copy()
    for t in (1, 2):
        o.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w - 0.01 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        np.testing.assert_allclose(net.flat, w, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam", "adamw", "rmsprop"])
def test_optimizer_step_parallel_equals_serial_and_skips_frozen(kind, monkeypatch):
    """The optimizer's kernel runs on the calling thread below optim.SERIAL_PARAMS and in parallel
    above: every element is updated on its own, so the two agree to the last bit (the compiled
    loops contract multiply-adds differently at the chunks' edges); a frozen
    (trainable=false) parameter and its optimizer state never move, in both."""
    import flowdsl.optim as optim
    from flowdsl import jit
    jit.numba()
    old = jit.threads()
    try:
        jit.threads(2)
        rng = np.random.default_rng(4)
        n = 300_001
        w, g = rng.standard_normal(n), rng.standard_normal(n)
        got = []
        for serial in (True, False):
            monkeypatch.setattr(optim, "SERIAL_PARAMS", n + 1 if serial else 0)
            net = _FakeNet(w, g)
            o = Optimizer(net, _opt(kind, lr=0.01), l2=0.1)
            o.live[::5] = 0
            for _ in range(3):
                o.step()
            got.append((net.flat.copy(), o.m.copy(), o.v.copy()))
        for a, b in zip(*got):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)   # |g| ~ 1
        frozen, flat, m = slice(0, n, 5), got[0][0], got[0][1]
        np.testing.assert_array_equal(flat[frozen], np.float32(w[frozen]))
        assert not np.any(m[frozen]) and not np.any(got[0][2][frozen] if kind in ("adam", "adamw", "rmsprop") else 0)
        assert np.mean(flat[1::5] != np.float32(w[1::5])) > 0.99   # the others moved
    finally:
        jit.threads(old)


def test_adamw_step_matches_pytorch_formula():
    """adamw: weights shrink by lr * weight_decay before the Adam step (PyTorch's AdamW, decoupled
    from the moments); biases (not in the decay mask) only take the Adam step; and with
    weight_decay=0 it is adam to the last bit."""
    w0, g = np.array([1.0, -2.0, 0.5]), np.array([0.5, -1.0, 0.25])
    net = _FakeNet(w0, g)
    # _FakeNet's last parameter is a bias
    o = Optimizer(net, _opt("adamw", lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1))
    w, m, v = w0.copy(), np.zeros(3), np.zeros(3)
    for t in (1, 2, 3):
        o.step()
        w = w * (1 - 0.01 * 0.1 * np.array([1.0, 1.0, 0.0]))
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        w = w - 0.01 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(net.flat, w, rtol=1e-6)
    assert abs(net.flat[0] - w0[0]) > 0.03   # moved by the step and the decay
    a, b = _FakeNet(w0, g), _FakeNet(w0, g)
    Optimizer(a, _opt("adam", lr=0.01)).step()
    Optimizer(b, _opt("adamw", lr=0.01, weight_decay=0.0)).step()
    np.testing.assert_array_equal(a.flat, b.flat)


def test_rmsprop_step():
    net = _FakeNet([1.0, 2.0], [0.5, -1.0])
    Optimizer(net, _opt("rmsprop", lr=0.01, rho=0.9, eps=1e-8)).step()
    v = 0.1 * np.array([0.25, 1.0])
    np.testing.assert_allclose(net.flat, np.array([1.0, 2.0]) - 0.01 * np.array([0.5, -1.0]) / (np.sqrt(v) + 1e-8),
                               rtol=1e-5)


# ---------------------------------------------------------------------------- schedules
def _sched(text):
    m = flowdsl.model.build_text(f"input(4) :: dense(2) :: softmax\ntrain {{ schedule = {text} }}")
    return m.train["schedule"]


def test_schedules():
    assert lr_at(None, 0.1, 50, 100, 10) == 0.1
    assert lr_at(_sched("constant"), 0.1, 99, 100, 10) == 0.1
    s = _sched("step(every=2, gamma=0.5)")
    assert [lr_at(s, 1.0, k, 100, 10) for k in (0, 19, 20, 39, 40)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    c = _sched("cosine")
    assert lr_at(c, 1.0, 0, 100, 10) == pytest.approx(1.0)
    assert lr_at(c, 1.0, 50, 100, 10) == pytest.approx(0.5)
    assert lr_at(c, 1.0, 100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    w = _sched("cosine(warmup=4)")
    assert [lr_at(w, 1.0, k, 100, 10) for k in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    o = _sched("onecycle(max_lr=0.1, pct=0.25)")
    lrs = [lr_at(o, 0.01, k, 100, 10) for k in range(100)]
    assert lrs[0] == pytest.approx(0.1 / 25) and max(lrs) == pytest.approx(0.1, rel=1e-3)
    assert int(np.argmax(lrs)) == 25 and lrs[-1] < 0.001


# ---------------------------------------------------------------------------- fit, determinism, resume
def test_fit_learns_and_is_deterministic():
    x, y = toy_set(256)
    a = flowdsl.parse(SMALL)
    ha = a.fit(x, y, epochs=3, test=(x[:64], y[:64]))
    assert ha["test_acc"][-1] >= 0.95
    assert ha["train_loss"][-1] < ha["train_loss"][0]
    b = flowdsl.parse(SMALL)
    hb = b.fit(x, y, epochs=3)
    assert ha["train_loss"] == hb["train_loss"]          # bit for bit
    np.testing.assert_array_equal(a.flat, b.flat)
    c = flowdsl.parse(SMALL.replace("seed = 5", "seed = 6"))
    c.fit(x, y, epochs=3)
    assert not np.array_equal(a.flat, c.flat)


RESIDUAL = """stem = conv(8x8x1, filters=4, field=3, pad=same) :: batchnorm :: relu
branch = conv(filters=4, field=3, pad=same) :: batchnorm :: relu :: conv(filters=4, field=3, pad=same)
network = stem :: branch :: add(stem) :: relu :: maxpool :: dense(2) :: softmax
train { batch = 16  seed = 3  optimizer = adam(lr=0.01) }
"""


def test_residual_net_learns_saves_and_focuses(tmp_path):
    """A net with a skip connection trains, its weights round-trip, and focus on the add shows
    the sum of the two paths it joins."""
    x, y = toy_set(256, seed=4)
    net = flowdsl.parse(RESIDUAL)
    h = net.fit(x, y, epochs=3, test=(x[:64], y[:64]))
    assert h["test_acc"][-1] >= 0.95 and h["train_loss"][-1] < h["train_loss"][0]
    net.save(str(tmp_path / "w.npz"))
    again = flowdsl.parse(RESIDUAL, weights=str(tmp_path / "w.npz"))
    np.testing.assert_array_equal(net.predict(x[:8]), again.predict(x[:8]))
    added, stem, branch = (net.focus(n, x[:4]) for n in ("add1", "stem", "branch"))
    assert added.shape == (4, 8, 8, 4) and np.abs(branch).max() > 0
    np.testing.assert_allclose(added, stem + branch, rtol=1e-6, atol=1e-6)


AUG = """network = conv(8x8x1, filters=5, field=3, pad=1, act=relu) :: dropout(0.3) :: maxpool
  :: batchnorm :: dense(2) :: softmax
train { batch = 16  seed = 2  optimizer = adam(lr=0.005)  schedule = cosine(warmup=3)
        augment = [shift(1), hflip, noise(0.02), flip_pixels(2)] }
"""


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    x, y = toy_set(200, seed=1)
    full = flowdsl.parse(AUG)
    hf = full.fit(x, y, epochs=3, out_dir=str(tmp_path / "a"))
    part = flowdsl.parse(AUG)
    hp = part.fit(x, y, epochs=3, out_dir=str(tmp_path / "b"), callback=lambda step, loss: step == 17)
    assert hp.stopped and hp.step == 17
    resumed = flowdsl.parse(AUG)
    hr = resumed.fit(x, y, epochs=3, out_dir=str(tmp_path / "b"), resume=str(tmp_path / "b" / "last.npz"))
    np.testing.assert_array_equal(full.flat, resumed.flat)
    np.testing.assert_array_equal(full.state["batchnorm1"]["mean"], resumed.state["batchnorm1"]["mean"])
    assert hf["train_loss"] == hr["train_loss"]
    assert not np.array_equal(full.flat, part.flat)


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = x.sum(axis=1, keepdims=True)
    net = flowdsl.parse("input(4) :: dense(1) :: squared\ntrain { optimizer = sgd(lr=50)  batch = 8 }")
    with pytest.raises(FlowError) as e:  # gradient descent with a step this large diverges
        net.fit(x, y, epochs=50, out_dir=str(tmp_path))
    msg = e.value.message
    assert "at step" in msg and "lower learning rate" in msg
    data = np.load(tmp_path / "last.npz", allow_pickle=False)
    assert all(np.isfinite(data[k]).all() for k in data.files if k.startswith("param."))


def test_patience_stops_early():
    x, y = toy_set(64)
    net = flowdsl.parse(SMALL.replace("adam(lr=0.01)", "sgd(lr=1e-9)"))
    h = net.fit(x, y, epochs=20, test=(x, y), patience=2)
    assert h.stopped.startswith("stopped early at epoch") and len(h.rows) < 20


# ---------------------------------------------------------------------------- checkpoints
def test_save_load_roundtrip_and_mismatch(tmp_path):
    a = flowdsl.parse(SMALL)
    p = tmp_path / "w.npz"
    a.save(str(p))
    b = flowdsl.parse(SMALL.replace("seed = 5", "seed = 9"), weights=str(p))
    np.testing.assert_array_equal(a.flat, b.flat)
    with pytest.raises(FlowError, match="conv1.w"):
        flowdsl.parse(SMALL.replace("filters=3", "filters=4"), weights=str(p))
    with pytest.raises(FlowError, match="no parameter"):
        flowdsl.parse("d = dense(2)\nnetwork = input(8x8x1) :: d :: softmax", weights=str(p))


def test_checkpoint_refuses_pickle_and_truncation(tmp_path):
    net = flowdsl.parse(SMALL)
    bad = tmp_path / "pickled.npz"
    np.savez(bad, **{"param.conv1.w": np.array([object()], dtype=object)})
    with pytest.raises(FlowError, match="pickle"):
        net.load_weights(str(bad))
    good = tmp_path / "good.npz"
    net.save(str(good))
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FlowError):
        net.load_weights(str(trunc))
    with pytest.raises(FlowError, match="no such checkpoint"):
        net.load_weights(str(tmp_path / "missing.npz"))


def test_checkpoint_holds_source_and_no_temp_files(tmp_path):
    net = flowdsl.parse(SMALL)
    net.save(str(tmp_path / "w.npz"))
    z = np.load(tmp_path / "w.npz", allow_pickle=False)
    src = str(z["__meta__.source"])
    assert flowdsl.model.build_text(src).spec()[0] == net.model.spec()[0]
    assert sorted(os.listdir(tmp_path)) == ["w.npz"]


# ---------------------------------------------------------------------------- the verbs
@pytest.fixture()
def npz_model(tmp_path):
    x, y = toy_set(320, seed=3)
    save_npz(tmp_path / "train.npz", x[:256], y[:256])
    save_npz(tmp_path / "test.npz", x[256:], y[256:])
    f = tmp_path / "bars.flow"
    f.write_text(TOY_NET + "train {\n  data = npz(\"train.npz\")\n  test = npz(\"test.npz\")\n"
                 "  optimizer = adam(lr=0.01)\n  batch = 16\n  epochs = 2\n  seed = 1\n}\n")
    return f


def test_train_eval_predict_cli(npz_model, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", str(npz_model), "--out", str(out), "--epochs", "3")
    assert r.returncode == 0, r.stderr
    assert "epoch 3/3" in r.stderr and "Traceback" not in r.stderr
    for f in ("last.npz", "best.npz", "log.csv", "report.png"):
        assert (out / f).exists(), f
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,step") and len(rows) == 4
    from PIL import Image
    assert Image.open(out / "report.png").size[0] >= 1000
    r = run_cli("eval", str(npz_model), "--weights", str(out / "best.npz"), "--perturb", "shift=1,flip=2")
    assert r.returncode == 0, r.stderr
    acc = float(r.stdout.split("accuracy ")[1].split()[0])
    assert acc >= 0.9
    assert "perturbed" in r.stdout and "precision" in r.stdout
    img = tmp_path / "left.png"
    x = np.zeros((8, 8), np.uint8)
    x[:, :4] = 230
    Image.fromarray(x, "L").save(img)
    r = run_cli("predict", str(npz_model), "--weights", str(out / "best.npz"), str(img), "--top", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{img}: 0 ")  # class 0 (bright left) first
    # test-time augmentation: the bars' classes are mirror images of each other, so averaging each
    # image with its mirror must cost accuracy here (a user's choice, never a default)
    r = run_cli("eval", str(npz_model), "--weights", str(out / "best.npz"), "--tta", "hflip")
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("with test-time augmentation (hflip"))
    assert float(line.split("accuracy ")[1].split()[0]) < acc - 0.2
    r = run_cli("predict", str(npz_model), "--weights", str(out / "best.npz"), str(img), "--tta", "hflip")
    assert r.returncode == 0, r.stderr
    probs = [float(v) for v in r.stdout.split()[2::2]]
    assert abs(probs[0] - 0.5) < 0.2            # the mirror of a left bar is a right bar
    r = run_cli("eval", str(npz_model), "--weights", str(out / "best.npz"), "--tta", "vflip")
    assert r.returncode == 1 and "unknown test-time augmentation 'vflip'" in r.stderr
    assert "Traceback" not in r.stderr


def test_tta_hflip_averages_each_image_and_its_mirror():
    from flowdsl.train import evaluate
    net = flowdsl.parse("conv(7x5x2, filters=6, field=3, act=relu) :: maxpool(2, ceil=true) :: dense(4) :: softmax")
    rng = np.random.default_rng(0)
    x = rng.random((300, 5, 7, 2), dtype=np.float32)
    y = rng.integers(0, 4, 300)
    want = (net.predict(x) + net.predict(x[:, :, ::-1])) / 2
    got = net.predict(x, batch=64, tta="hflip")
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.allclose(got, net.predict(x), atol=1e-3)
    res = evaluate(net, x, y, batch=128, tta="hflip")
    assert res["acc"] == (want.argmax(1) == y).mean()
    assert res["confusion"].sum() == 300
    assert abs(res["loss"] + np.log(want[np.arange(300), y]).mean()) < 1e-5
    reg = flowdsl.parse("input(4x3x1) :: dense(2) :: squared")
    xr = rng.random((40, 3, 4, 1), dtype=np.float32)
    t = rng.random((40, 2)).astype(np.float32)
    mean = (reg.predict(xr) + reg.predict(xr[:, :, ::-1])) / 2
    got = evaluate(reg, xr, t, tta="hflip")["loss"]
    assert abs(got - 0.5 * ((mean - t) ** 2).sum() / 40) < 1e-5
    assert abs(got - evaluate(reg, xr, t)["loss"]) > 1e-4
    # without augmentation the probability loss is the loss (smoothed too)
    for head in ("softmax", "softmax(smoothing=0.2)"):
        m = flowdsl.parse(f"input(5x4x1) :: dense(3) :: {head}")
        xs = rng.random((50, 4, 5, 1), dtype=np.float32)
        ys = rng.integers(0, 3, 50)
        z = m.forward(xs)
        assert abs(m.loss_layer.prob_loss(m.predict(xs), ys) - m.loss_layer.loss(z, ys)[0]) < 1e-5
    with pytest.raises(FlowError, match="unknown test-time augmentation 'shift'"):
        net.predict(x, tta="shift")
    vec = flowdsl.parse("input(6) :: dense(3) :: softmax")
    with pytest.raises(FlowError, match="needs image input"):
        vec.predict(np.zeros((2, 6), np.float32), tta="hflip")


def test_cli_overrides_and_bad_values(npz_model, tmp_path):
    # bad command-line values are usage errors: exit 2, as argparse's own
    r = run_cli("train", str(npz_model), "--out", str(tmp_path / "o"), "--batch", "0")
    assert r.returncode == 2 and "batch" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", str(npz_model), "--out", str(tmp_path / "o"), "--optimizer", "addam(lr=1)")
    assert r.returncode == 2 and "did you mean 'adam'" in r.stderr
    r = run_cli("train", str(npz_model), "--out", str(tmp_path / "o"), "--lr", "-1")
    assert r.returncode == 2 and "--lr" in r.stderr
    r = run_cli("eval", str(npz_model), "--weights", str(tmp_path / "nope.npz"))
    assert r.returncode == 1 and "no such checkpoint" in r.stderr


def test_kill_9_leaves_a_checkpoint_that_eval_loads(npz_model, tmp_path):
    out = tmp_path / "k"
    rng = np.random.default_rng(0)
    for trial in range(3):
        if (out / "last.npz").exists():  # wait for this run's own first save, not the last trial's
            (out / "last.npz").unlink()
        p = start_cli("train", npz_model, "--out", out, "--epochs", "200", "--overwrite",
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not (out / "last.npz").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.0, 1.5)))
        assert p.poll() is None, p.stderr.read()   # killed while training, not after a crash
        p.send_signal(signal.SIGKILL)
        p.stderr.close()
        p.wait()
        r = run_cli("eval", str(npz_model), "--weights", str(out / "last.npz"))
        assert r.returncode == 0, r.stderr   # (a leftover .tmp-* file beside it is harmless)
        assert 0.0 <= float(r.stdout.split("accuracy ")[1].split()[0]) <= 1.0, r.stdout


def _wait_for(path, p, seconds=120):
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)


SIGNAL_EPOCHS = 80  # 1280 steps: the signal lands long before the end even on a loaded machine


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                           (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_signal_saves_exits_nonzero_and_resume_matches_uninterrupted(npz_model, tmp_path, sig, code, word):
    """SIGINT or SIGTERM in the middle of training: last.npz, log.csv and report.png are written,
    the exit status is 128 + the signal (130, 143: a script can tell an interrupted run from a
    finished one), and --resume continues to exactly the weights of an uninterrupted run."""
    ep = str(SIGNAL_EPOCHS)
    out = tmp_path / "int"
    p = start_cli("train", npz_model, "--out", out, "--epochs", ep,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "log.csv", p)  # one epoch done: training is under way
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    total = SIGNAL_EPOCHS * 16
    assert p.returncode == code, (p.returncode, err)
    assert word in err and "Traceback" not in err, err
    assert f"--resume {out / 'last.npz'}" in err
    saved = np.load(out / "last.npz", allow_pickle=False)
    step = int(saved["meta.step"])
    assert 16 <= step < total, step  # really stopped in the middle
    for f in ("best.npz", "log.csv", "report.png"):
        assert (out / f).exists(), f
    assert 2 <= len((out / "log.csv").read_text().splitlines()) <= SIGNAL_EPOCHS
    r = run_cli("train", str(npz_model), "--out", str(out), "--epochs", ep, "--resume", str(out / "last.npz"))
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref"
    r = run_cli("train", str(npz_model), "--out", str(ref), "--epochs", ep)
    assert r.returncode == 0, r.stderr
    a = np.load(ref / "last.npz", allow_pickle=False)
    b = np.load(out / "last.npz", allow_pickle=False)
    assert int(a["meta.step"]) == int(b["meta.step"]) == total
    for k in a.files:
        if k.startswith("param.") or k.startswith("opt."):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (ref / "log.csv").read_text().splitlines()[-1].split(",")[:4] == \
        (out / "log.csv").read_text().splitlines()[-1].split(",")[:4]


def test_second_ctrl_c_stops_at_once_and_leaves_a_good_checkpoint(npz_model, tmp_path):
    out = tmp_path / "twice"
    p = start_cli("train", npz_model, "--out", out, "--epochs", SIGNAL_EPOCHS,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "log.csv", p)
    p.send_signal(signal.SIGINT)
    time.sleep(0.002)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err, err
    r = run_cli("eval", str(npz_model), "--weights", str(out / "last.npz"))
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not FASHION.exists(), reason="Debian's dataset-fashion-mnist is not installed "
                    "(apt-get install dataset-fashion-mnist; .ci/run does this)")
def test_fashion_mnist_subset_reaches_accuracy():
    from flowdsl.data import read_idx
    x = read_idx(FASHION / "train-images-idx3-ubyte.gz")[:4000].astype(np.float32)[..., None] / 255
    y = read_idx(FASHION / "train-labels-idx1-ubyte.gz", "labels")[:4000].astype(np.int64)
    xt = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[:1000].astype(np.float32)[..., None] / 255
    yt = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz", "labels")[:1000].astype(np.int64)
    net = flowdsl.parse("network = conv(28x28x1, filters=16, field=3, act=relu) :: maxpool"
                        " :: conv(filters=32, field=3, act=relu) :: maxpool :: dense(64, act=relu) :: dense(10) :: softmax\n"
                        "train { optimizer = adam(lr=2e-3)  batch = 64  seed = 0 }")
    h = net.fit(x, y, epochs=3, test=(xt, yt))
    assert h["test_acc"][-1] >= 0.78, h["test_acc"]


def test_eval_ensemble_and_top_k_cli(npz_model, tmp_path):
    """eval --weights a b c: each member's accuracy, then the ensemble's (mean probabilities);
    --top K: top-1 .. top-K. predict takes several checkpoints too."""
    runs = []
    for seed in (1, 2, 3):
        out = tmp_path / f"r{seed}"
        r = run_cli("train", str(npz_model), "--out", str(out), "--epochs", "1", "--seed", str(seed))
        assert r.returncode == 0, r.stderr
        runs.append(str(out / "last.npz"))
    r = run_cli("eval", str(npz_model), "--weights", *runs, "--top", "2")
    assert r.returncode == 0, r.stderr
    members = [l for l in r.stdout.splitlines() if l.startswith("member ")]
    assert [m.split(":")[0] for m in members] == [f"member {p}" for p in runs]
    ens = next(l for l in r.stdout.splitlines() if l.startswith("ensemble of 3 (mean probabilities): accuracy"))
    accs = [float(m.split("accuracy ")[1].split()[0]) for m in members]
    acc = float(ens.split("accuracy ")[1].split()[0])
    assert f"against the best member, {max(accs):.4f}" in ens and f"{acc - max(accs):+.4f}" in ens
    top = next(l for l in r.stdout.splitlines() if l.startswith("top-1 "))
    t1, t2 = [float(v) for v in top.replace("top-1", "").replace("top-2", "").split()]
    assert t1 == acc and t2 == 1.0                       # two classes: the top 2 always hold it
    img = tmp_path / "left.png"
    from PIL import Image
    x = np.zeros((8, 8), np.uint8)
    x[:, :4] = 230
    Image.fromarray(x, "L").save(img)
    r = run_cli("predict", str(npz_model), str(img), "--weights", *runs)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{img}: 0 ")
    r2 = run_cli("predict", str(npz_model), "--weights", *runs, str(img))   # images after the checkpoints
    assert r2.returncode == 0 and r2.stdout == r.stdout, r2.stderr
    r = run_cli("predict", str(npz_model), "--weights", *runs)
    assert r.returncode == 2 and "predict needs images" in r.stderr
