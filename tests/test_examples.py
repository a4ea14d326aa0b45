"""Every example is a program, tested here in one place: each examples/*.flow parses and builds,
prints as source that builds the same model (str(model) round trip), passes `flowdsl check`, and
trains: a smoke run of a few steps on a small batch of its own data must lower the loss and move
every parameter, so none of them silently breaks. Then the figures PRODUCT.md quotes for the
seed, glasses, letters and nielsen examples."""
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, round_trip

import flowdsl
from flowdsl import cli
from flowdsl.jobs import load_data
from flowdsl.model import build_text, load_model

EXAMPLES = sorted((ROOT / "examples").glob("*.flow"))
IDS = [p.stem for p in EXAMPLES]
FASHION = Path("/usr/share/datasets/fashion-mnist")
SEED = "conv(400x400x3, field=3, stride=1, pad=1) :: dense(2) :: softmax"
UNSHIPPED = {"letters": "idx", "cifar_keras": "images"}   # examples whose data the user fetches


def test_there_are_examples():
    names = {p.stem for p in EXAMPLES}
    assert {"seed", "glasses", "letters", "nielsen", "fashion", "hellodl", "kirsch", "lenet5", "cifar_keras"} <= names


# ------------------------------------------------------------------------------ parse, build, check
@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_example_builds_and_round_trips(path):
    m = load_model(path)
    assert m.layers[-1].role == "loss"
    assert m.n_params() > 0 and "Total:" in m.summary()
    round_trip(m)


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_flowdsl_check_passes_every_example(path, capsys):
    assert cli.main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    if path.stem in UNSHIPPED:   # its data is not shipped: a warning at the source's position
        line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if l.strip().startswith("data ="))
        assert err.startswith(f"{path}:{line}:3: warning: data = {UNSHIPPED[path.stem]}("), err
        assert "no such file" in err or "no such folder" in err, err
    else:
        assert err == ""
    assert out.startswith(f"{path}: ok\n"), out
    assert f"Total: {load_model(path).n_params():,} weights" in out, out


# ------------------------------------------------------------------------------ smoke runs
SMOKE_SAMPLES = 32   # one batch of them, seen SMOKE_STEPS times: a few seconds per example
SMOKE_STEPS = 5


def smoke_data(path, model):
    """SMOKE_SAMPLES of the example's own training data, or random images of the right shape
    with random labels where its data is not shipped (letters: EMNIST is not packaged)."""
    data = model.train["data"]
    if data is not None and data.name == "fashion_mnist" and not FASHION.exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
    rng = np.random.default_rng(0)
    if data is not None and path.stem not in UNSHIPPED:
        train, _ = load_data(model, model.train)
        pick = rng.permutation(len(train.x))[:SMOKE_SAMPLES]   # both classes of a sorted folder
        return train.x[pick], train.y[pick], True
    c, h, w = model.input_shape
    x = rng.random((SMOKE_SAMPLES, h, w, c), dtype=np.float32)
    return x, rng.integers(0, model.layers[-1].out[0], SMOKE_SAMPLES), False


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_example_smoke_run(path):
    """A few steps of the example's own optimizer, schedule and seed on one batch (augmentation
    off, so a step that changes nothing changes nothing): the loss on that batch goes down, every
    parameter array moves, and the trained net predicts probabilities."""
    model = load_model(path)
    x, y, real = smoke_data(path, model)
    net = flowdsl.load(path)
    before = {k: v.copy() for k, v in net.named_params().items()}
    h = net.fit(x, y, epochs=SMOKE_STEPS, batch=SMOKE_SAMPLES, augment=())
    loss = h["train_loss"]
    assert len(h.rows) == SMOKE_STEPS and np.isfinite(loss).all(), loss
    # min, not last: glasses_bright's bright init makes its first steps overshoot and come back
    assert min(loss[1:]) < loss[0] - 1e-3, f"the loss does not go down: {loss}"
    frozen = {f"{l.name}.{p}" for l in model.layers if not l.trainable for p in l.param_shapes(l.in_shape)}
    still = [k for k, v in net.named_params().items() if np.array_equal(v, before[k]) and k not in frozen]
    assert not still, f"parameters no step changed (no gradient reaches them?): {still}"
    moved = [k for k in frozen if not np.array_equal(net.named_params()[k], before[k])]
    assert not moved, f"trainable=false parameters moved: {moved}"
    classes = model.layers[-1].out[0]
    if real and classes >= 10:  # fashion's ten classes: well above chance on its own batch
        assert max(h["train_acc"]) >= 2 / classes, h["train_acc"]
    probs = net.predict(x[:8])
    assert probs.shape == (8, classes) and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


# ------------------------------------------------------------------------------ PRODUCT.md's figures
def test_seed_one_liner():
    m = build_text(SEED, "seed.flow")
    conv, dense, loss = m.layers
    assert conv.kind == "conv" and conv.out == (1, 400, 400)  # internal (C, H, W)
    assert dense.out == (2,) and loss.kind == "softmax"
    assert m.input_shape == (3, 400, 400)
    assert conv.n_params(conv.in_shape) == 3 * 3 * 3 + 1
    assert dense.n_params(dense.in_shape) == 400 * 400 * 2 + 2
    assert m.n_params() == 320_030
    s = m.summary()
    assert "400x400x1" in s and "320,030" in s
    round_trip(m)


def test_seed_example_file_is_the_one_liner():
    assert load_model(ROOT / "examples" / "seed.flow").spec() == build_text(SEED).spec()


def test_glasses_total():
    m = load_model(ROOT / "examples" / "glasses.flow")
    assert m.n_params() == 80_067
    assert [l.name for l in m.layers][:4] == ["c0", "c1", "c2", "c3"]
    assert m.layer("c2").out == (1, 200, 200)
    assert "80,067" in m.summary()
    # the train block is read (its settings are the demo's business, not the language's)
    assert m.train["batch"] == 20 and m.train["optimizer"] is not None
    assert str(m.init["c0"]) == "normal(mean=0, std=0.1)"
    assert str(m.init["default"]) == "he"


def test_letters_total():
    m = load_model(ROOT / "examples" / "letters.flow")
    assert m.n_params() == 137_178
    outs = [l.out for l in m.layers if l.kind == "maxpool"]
    assert outs == [(32, 13, 13), (64, 6, 6), (128, 2, 2)]  # ceil=true gives hello-dl's 11 -> 6
    assert m.layers[-1].kind == "softmax"  # logsoftmax is an alias
    assert "137,178" in m.summary()


def test_nielsen_builds():
    m = load_model(ROOT / "examples" / "nielsen.flow")
    assert m.layers[-2].out == (10,)
    assert m.n_params() == 520 + 20_040 + 641_000 + 1_001_000 + 10_010
    assert [l.kind for l in m.layers].count("dropout") == 2


def _header_script(path):
    """The python snippet in an example's header comment (between `python - <<'PY'` and `PY`)."""
    lines = path.read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "#   python - <<'PY'")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "#   PY")
    return "\n".join(l[len("#   "):] for l in lines[start + 1:end])


def test_letters_header_turns_emnist_into_the_files_it_reads(tmp_path, monkeypatch):
    """Run the header's conversion on a small fake EMNIST letters file pair (transposed images,
    labels 1..26): the result is what letters.flow reads, upright, labelled 0..25."""
    import gzip
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    lab = np.array([1, 26, 3, 4, 5], np.uint8)
    (tmp_path / "gzip").mkdir()
    with gzip.open(tmp_path / "gzip" / "emnist-letters-train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x03" + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + img.tobytes())
    with gzip.open(tmp_path / "gzip" / "emnist-letters-train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x01" + (5).to_bytes(4, "big") + lab.tobytes())
    monkeypatch.chdir(tmp_path)
    exec(compile(_header_script(ROOT / "examples" / "letters.flow"), "letters.flow", "exec"), {})
    from flowdsl.data import load_source, parse_source
    ds = load_source(parse_source('idx("letters/train-images-idx3-ubyte.gz", "letters/train-labels-idx1-ubyte.gz")'),
                     str(tmp_path), (1, 28, 28))
    assert ds.y.tolist() == [0, 25, 2, 3, 4]
    np.testing.assert_array_equal(ds.x[..., 0], img.transpose(0, 2, 1) / np.float32(255))


def test_cifar_header_writes_the_png_folders_it_reads(tmp_path, monkeypatch):
    """The header's conversion on fake CIFAR-10 python batches: class folders of 32x32 RGB PNGs
    that cifar_keras.flow's images(...) source reads back pixel for pixel."""
    import pickle
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    names = [f"class{i}" for i in range(10)]
    pickle.dump({"label_names": names}, open(d / "batches.meta", "wb"))
    rows = {}
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows[f] = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        pickle.dump({b"data": rows[f], b"labels": [1, 7]}, open(d / f, "wb"))
    monkeypatch.chdir(tmp_path)
    exec(compile(_header_script(ROOT / "examples" / "cifar_keras.flow"), "cifar_keras.flow", "exec"), {})
    from flowdsl.data import load_source, parse_source
    monkeypatch.setenv("FLOWDSL_DATA_CACHE", str(tmp_path / "cache"))
    ds = load_source(parse_source('images("cifar10/test", size=32x32, color=rgb)'), str(tmp_path), (3, 32, 32))
    assert ds.classes == ["class1", "class7"] and ds.y.tolist() == [0, 1]
    want = rows["test_batch"].reshape(2, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(ds.x, want / np.float32(255))
    assert len(list((tmp_path / "cifar10" / "train").rglob("*.png"))) == 10
