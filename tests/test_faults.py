"""Fault injection: whatever goes wrong around a run (a kill -9 in the middle of writing a
checkpoint, a full disk or an output folder that cannot exist, corrupt or odd images, bad data
files, weights of another model, pickled or truncated checkpoints, a model too large for the
memory), flowdsl says so in one message and exits 1 (no Python traceback), and never leaves a
broken checkpoint behind. Interrupts (SIGINT, SIGTERM) are in tests/test_train.py."""
import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import ENV, TOY_NET, run_cli, save_npz, toy_set

import flowdsl
import flowdsl.checkpoint
from flowdsl import cli
from flowdsl.errors import FlowError

MODEL = TOY_NET
OTHER = MODEL.replace("filters=3", "filters=4")  # same names, conv1.w of another shape


def assert_error(r, *words, code=1):
    """Exit `code`, no traceback, exactly one 'error:' line, and every word in the message."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert str(w) in r.stderr, (w, r.stderr)
    return r.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A model with npz data, weights of it and of another model, and images of every kind."""
    d = tmp_path_factory.mktemp("faults")
    save_npz(d / "train.npz", *toy_set(96))
    (d / "m.flow").write_text(MODEL + 'train {\n  data = npz("train.npz")\n  batch = 16\n  epochs = 1\n}\n')
    (d / "other.flow").write_text(OTHER)
    flowdsl.parse(MODEL).save(str(d / "w.npz"))
    flowdsl.parse(OTHER).save(str(d / "other.npz"))
    return d


# ---------------------------------------------------------------------------- checkpoints and kill -9
WRITER = textwrap.dedent("""
    import sys, numpy as np
    from flowdsl.checkpoint import save

    class Model:
        def __str__(self):
            return "input(4) :: dense(2) :: softmax\\n"

    class Net:  # what checkpoint.save needs of a network
        model = Model()
        def __init__(self):
            self.w = np.zeros(1_500_000, np.float32)
        def named_params(self):
            return {"big.w": self.w, "small.b": self.w[:10]}
        def named_state(self):
            return {}

    net = Net()
    i = 0
    while True:
        net.w[:] = i
        save(net, sys.argv[1], {"meta.i": np.array(i)})
        i += 1
""")


def test_kill_9_while_writing_checkpoints_never_leaves_a_broken_one(tmp_path):
    """A process that writes checkpoints in a loop, killed at random moments: the checkpoint
    always reads back whole (every value from one and the same save), never a partial file."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "ck" / "last.npz"
    rnd = random.Random(1)
    leftovers = 0
    for trial in range(12):
        if path.exists():  # wait for this writer's own first save, not an earlier trial's file:
            path.unlink()  # a kill during interpreter start-up would land on no write at all
        p = subprocess.Popen([sys.executable, str(script), str(path)], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.01)
        assert p.poll() is None, p.stderr.read().decode()
        time.sleep(rnd.uniform(0.0, 0.4))
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()
        data = flowdsl.checkpoint.read(str(path))
        i = int(data["meta.i"])
        assert data["param.big.w"].shape == (1_500_000,)
        assert (data["param.big.w"] == i).all() and (data["param.small.b"] == i).all()
        temps = [f for f in os.listdir(path.parent) if f.startswith(".tmp-")]
        leftovers += bool(temps)
        for f in temps:  # a kill mid-write leaves the temporary file, never a broken last.npz
            os.remove(path.parent / f)
    assert leftovers >= 1, "no kill landed during a write: the test proves nothing"


# ---------------------------------------------------------------------------- output folder, disk full
def test_a_new_run_sweeps_temporary_files_of_dead_runs(tmp_path):
    """kill -9 during a save leaves .tmp-<pid>-*.npz behind; the next run into that folder
    removes those of dead processes and keeps a live process's file and unrelated files."""
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".tmp-{dead.pid}-abc.npz"
    live = out / f".tmp-{os.getppid()}-def.npz"     # the pytest runner's parent: alive
    other = out / ".tmp-notes.npz"
    for f in (stale, live, other):
        f.write_bytes(b"partial")
    x, y = toy_set(32)
    flowdsl.parse(MODEL).fit(x, y, epochs=1, batch=16, out_dir=str(out), verbose=0)
    left = set(os.listdir(out))
    assert stale.name not in left
    assert live.name in left and other.name in left
    assert {"last.npz", "best.npz", "log.csv"} <= left


def test_out_under_a_regular_file_is_refused_before_training(work, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    r = run_cli("train", work / "m.flow", "--out", blocker / "sub")
    assert_error(r, "cannot write to the output folder", str(blocker / "sub"))
    assert "epoch" not in r.stderr


def test_out_in_proc_is_refused(work):
    r = run_cli("train", work / "m.flow", "--out", "/proc/flowdsl-cannot-be-here")
    assert_error(r, "cannot write to the output folder", "/proc/flowdsl-cannot-be-here")


@pytest.mark.parametrize("verb", ["focus", "eval"])
def test_focus_and_eval_out_under_a_regular_file(work, images, tmp_path, verb):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    if verb == "focus":
        r = run_cli("focus", work / "m.flow", "--layer", "conv1", "--input", images / "gray.png",
                        "--out", blocker / "sub")
    else:
        r = run_cli("eval", work / "m.flow", "--weights", work / "w.npz", "--data",
                        f'npz("{work / "train.npz"}")', "--out", blocker / "sub")
    assert_error(r, "cannot write to the output folder", str(blocker / "sub"))


def test_an_os_error_anywhere_is_one_message(monkeypatch, capsys, work):
    import flowdsl.jobs

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/some/where.png")

    monkeypatch.setattr(flowdsl.jobs, "run_predict", denied)
    assert cli.main(["predict", str(work / "m.flow"), "--weights", str(work / "w.npz"), "x.png"]) == 1
    err = capsys.readouterr().err
    assert err == "flowdsl: error: cannot access /some/where.png: Permission denied\n"


def _disk_fills_after(monkeypatch, saves_ok):
    """np.savez writes `saves_ok` checkpoints, then fails half-way with ENOSPC."""
    real = np.savez
    calls = []

    def savez(f, **arrays):
        calls.append(1)
        if len(calls) > saves_ok:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(f, **arrays)

    monkeypatch.setattr(flowdsl.checkpoint.np, "savez", savez)
    return calls


def test_disk_full_during_fit_stops_with_flowerror_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    x, y = toy_set(64)
    out = tmp_path / "run"
    net = flowdsl.parse(MODEL)
    # the saves of fit: last.npz at step 0, then last.npz and best.npz after epoch 1, ...
    _disk_fills_after(monkeypatch, 3)
    with pytest.raises(FlowError) as e:
        net.fit(x, y, epochs=5, batch=16, out_dir=str(out))
    msg = e.value.message
    assert "No space left on device" in msg and "last.npz" in msg and "kept" in msg
    data = flowdsl.checkpoint.read(str(out / "last.npz"))   # the epoch-1 checkpoint, whole
    assert int(data["meta.step"]) == 4
    assert sorted(f for f in os.listdir(out)) == ["best.npz", "last.npz", "log.csv"]  # no temp files


def test_disk_full_via_train_verb_is_one_message(work, tmp_path, monkeypatch, capsys):
    _disk_fills_after(monkeypatch, 1)
    out = tmp_path / "run"
    code = cli.main(["train", str(work / "m.flow"), "--out", str(out), "--epochs", "3"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert [l for l in err.splitlines() if "error:" in l] == [
        f"error: cannot write checkpoint {out / 'last.npz'}: No space left on device; "
        f"the previous checkpoint there is kept"]
    assert int(flowdsl.checkpoint.read(str(out / "last.npz"))["meta.step"]) == 0


# ---------------------------------------------------------------------------- images: predict, focus
@pytest.fixture(scope="module")
def images(work):
    from PIL import Image
    d = work / "img"
    d.mkdir()
    left = np.zeros((8, 8), np.uint8)
    left[:, :4] = 230
    good = {
        "gray.png": Image.fromarray(left, "L"),
        "rgba.png": Image.fromarray(np.dstack([left, left, left, np.full_like(left, 200)]), "RGBA"),
        "sixteen.png": Image.fromarray(left.astype(np.uint16) * 257),            # 16-bit gray
        "palette.png": Image.fromarray(np.dstack([left] * 3), "RGB").convert("P"),
        "la.png": Image.fromarray(np.dstack([left, np.full_like(left, 255)]), "LA"),
        "onebit.png": Image.fromarray(left > 100),
        "cmyk.jpg": Image.fromarray(np.dstack([left] * 3), "RGB").convert("CMYK"),
        "big.png": Image.fromarray(np.repeat(np.repeat(left, 40, 0), 40, 1), "L"),  # resized to 8x8
    }
    for name, im in good.items():
        im.save(d / name)
    png = (d / "gray.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "corrupt.png").write_bytes(png[:16] + bytes(random.Random(0).randrange(256) for _ in range(200)))
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("this is not an image\n")
    return d


GOOD = ["gray.png", "rgba.png", "sixteen.png", "palette.png", "la.png", "onebit.png", "cmyk.jpg", "big.png"]


def test_predict_reads_every_image_mode(work, images):
    r = run_cli("predict", work / "m.flow", "--weights", work / "w.npz", *[images / n for n in GOOD])
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert [l.split(":")[0] for l in lines] == [str(images / n) for n in GOOD]


def test_focus_reads_odd_modes(work, images, tmp_path):
    r = run_cli("focus", work / "m.flow", "--weights", work / "w.npz", "--layer", "conv1",
                    "--input", images / "rgba.png", images / "sixteen.png", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(list(tmp_path.glob("conv1-grid-*.png"))) == 2


@pytest.mark.parametrize("verb,name,words", [
    ("predict", "truncated.png", ["cannot read image"]),
    ("predict", "corrupt.png", ["cannot read image"]),
    ("predict", "empty.png", ["cannot read image"]),
    ("focus", "text.png", ["cannot read image"]),
    ("focus", "truncated.png", ["cannot read image"]),
    ("predict", "missing.png", ["no such file"]),
    ("focus", ".", ["is a directory"]),
])
def test_bad_images_are_one_message_naming_the_file(work, images, verb, name, words):
    img = images / name
    if verb == "predict":
        r = run_cli("predict", work / "m.flow", "--weights", work / "w.npz", images / "gray.png", img)
    else:
        r = run_cli("focus", work / "m.flow", "--weights", work / "w.npz", "--layer", "conv1",
                        "--input", img, "--out", images / "focus-out")
    assert_error(r, *words, str(img.resolve()) if name != "." else str(images))


# ---------------------------------------------------------------------------- data files via train
def _flow(d, data_line, name="d.flow"):
    f = d / name
    f.write_text(MODEL + f"train {{\n  {data_line}\n  batch = 16\n  epochs = 1\n}}\n")
    return f


def test_idx_with_bad_magic_via_train(work, tmp_path):
    imgs = tmp_path / "imgs.idx"
    imgs.write_bytes(b"\x00\x00\x07\x03" + (4).to_bytes(4, "big") + (8).to_bytes(4, "big") * 2 + bytes(256))
    labs = tmp_path / "labs.idx"
    labs.write_bytes(b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + bytes(4))
    f = _flow(tmp_path, 'data = idx("imgs.idx", "labs.idx")')
    r = run_cli("train", f, "--out", tmp_path / "run")
    assert_error(r, "magic number", str(imgs))
    assert not (tmp_path / "run" / "last.npz").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_npz_via_train(tmp_path, bad):
    x, y = toy_set(32)
    x[5, 2, 3, 0] = bad
    save_npz(tmp_path / "bad.npz", x, y)
    f = _flow(tmp_path, 'data = npz("bad.npz")')
    r = run_cli("train", f, "--out", tmp_path / "run")
    assert_error(r, "NaN or Inf", "sample 5", str(tmp_path / "bad.npz"))


def test_nan_in_test_npz_via_train(work, tmp_path):
    x, y = toy_set(32)
    save_npz(tmp_path / "good.npz", x, y)
    x[0, 0, 0, 0] = np.nan
    save_npz(tmp_path / "test.npz", x, y)
    f = _flow(tmp_path, 'data = npz("good.npz")\n  test = npz("test.npz")')
    r = run_cli("train", f, "--out", tmp_path / "run")
    assert_error(r, "NaN or Inf", str(tmp_path / "test.npz"))


# ---------------------------------------------------------------------------- weights of another model
@pytest.mark.parametrize("verb", ["eval", "predict", "focus"])
def test_weights_of_another_model(work, images, verb):
    common = [work / "m.flow", "--weights", work / "other.npz"]
    if verb == "eval":
        r = run_cli("eval", *common, "--data", f'npz("{work / "train.npz"}")')
    elif verb == "predict":
        r = run_cli("predict", *common, images / "gray.png")
    else:
        r = run_cli("focus", *common, "--layer", "conv1", "--input", images / "gray.png",
                        "--out", work / "focus-other")
    assert_error(r, str(work / "other.npz"), "conv1.w", "(3, 3, 1, 4)", "(3, 3, 1, 3)")


def test_resume_from_another_model(work, tmp_path):
    r = run_cli("train", work / "m.flow", "--out", tmp_path / "run", "--resume", work / "other.npz")
    assert_error(r, "conv1.w")


def test_resume_from_weights_only_checkpoint(work, tmp_path):
    r = run_cli("train", work / "m.flow", "--out", tmp_path / "run", "--resume", work / "w.npz")
    assert_error(r, "not a training checkpoint", "--weights")


# ---------------------------------------------------------------------------- pickled, truncated .npz
@pytest.fixture(scope="module")
def bad_checkpoints(work):
    pickled = work / "pickled.npz"
    np.savez(pickled, **{"param.conv1.w": np.array([{"evil": 1}], dtype=object)})
    good = (work / "w.npz").read_bytes()
    truncated = work / "truncated.npz"
    truncated.write_bytes(good[: len(good) // 2])
    raw = work / "raw-pickle.npz"
    raw.write_bytes(b"\x80\x04\x95 a raw pickle stream, not a zip")
    text = work / "text.npz"
    text.write_text("weights, honest\n")
    return {"pickled": (pickled, "pickle"), "truncated": (truncated, "truncated"),
            "raw-pickle": (raw, "pickle"), "text": (text, "not a flowdsl checkpoint")}


@pytest.mark.parametrize("kind", ["pickled", "truncated", "raw-pickle", "text"])
@pytest.mark.parametrize("how", ["--weights", "--resume"])
def test_pickled_or_truncated_checkpoint(work, images, bad_checkpoints, tmp_path, kind, how):
    path, word = bad_checkpoints[kind]
    if how == "--weights":
        r = run_cli("predict", work / "m.flow", "--weights", path, images / "gray.png")
    else:
        r = run_cli("train", work / "m.flow", "--out", tmp_path / "run", "--resume", path)
    assert_error(r, str(path), word)


# ---------------------------------------------------------------------------- memory
def _cli_maxrss(*args, env=None):
    """Run the CLI in a child Python that reports its own peak RSS (bytes) on stderr. VmHWM, not
    getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec, so a
    child of a big pytest process would report the parent's peak."""
    code = ("import sys\nfrom flowdsl.cli import main\nrc = main(sys.argv[1:])\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
            "print('maxrss=%s' % hwm, file=sys.stderr)\n"
            "sys.exit(rc)")
    t = time.perf_counter()
    r = run_cli(*args, via=code, env=env, timeout=120)
    secs = time.perf_counter() - t
    rss = int(r.stderr.rsplit("maxrss=", 1)[1]) * 1024
    r.stderr = r.stderr.rsplit("maxrss=", 1)[0]
    return r, rss, secs


def test_train_refuses_a_model_that_cannot_fit_even_at_batch_1(tmp_path):
    f = tmp_path / "huge.flow"
    f.write_text('conv(20000x20000x3, filters=64) :: dense(2) :: softmax\ntrain { data = npz("none.npz") }\n')
    r, rss, secs = _cli_maxrss("train", f, "--out", tmp_path / "run")
    err = assert_error(r, "even at batch 1", "GB", "of memory is available", "make the input or the layers smaller")
    assert "none.npz" not in err           # refused before looking for the data
    assert rss < 400 * 2**20, rss          # nothing was allocated
    assert secs < 30


def test_train_suggests_a_batch_that_fits(tmp_path):
    x = (np.random.default_rng(0).random((40, 256, 256, 1)) * 255).astype(np.uint8)
    save_npz(tmp_path / "big.npz", x, np.arange(40) % 2)
    f = tmp_path / "wide.flow"
    f.write_text('conv(256x256x1, filters=256, field=1) :: dense(2) :: softmax\n'
                 'train { data = npz("big.npz")  batch = 32 }\n')
    from flowdsl.model import load_model
    m = load_model(f)
    avail = m.memory_estimate(4)  # pretend the machine has room for about 4 samples
    env = dict(ENV, FLOWDSL_MEM_AVAILABLE=str(avail))
    r, rss, secs = _cli_maxrss("train", f, "--out", tmp_path / "run", env=env)
    from flowdsl.errors import size_text as gb
    err = assert_error(r, "training at batch 32 needs about", gb(m.memory_estimate(32)), "try --batch")
    suggested = int(err.split("try --batch ")[1].split()[0])
    assert 1 <= suggested < 32 and m.memory_estimate(suggested) <= avail
    assert rss < 400 * 2**20 + x.nbytes * 6, rss
    assert not (tmp_path / "run" / "last.npz").exists()


def test_fit_refuses_a_batch_that_cannot_fit(monkeypatch):
    net = flowdsl.parse(MODEL)
    x, y = toy_set(64)
    monkeypatch.setenv("FLOWDSL_MEM_AVAILABLE", str(net.model.memory_estimate(8)))
    with pytest.raises(FlowError, match=r"training at batch 64 needs about .* try batch=\d"):
        net.fit(x, y, epochs=1, batch=64)
    net.fit(x, y, epochs=1, batch=4)


def test_check_prints_the_memory_estimate(tmp_path):
    f = tmp_path / "m.flow"
    f.write_text(MODEL + "train { batch = 64 }\n")
    r = run_cli("check", f)
    assert r.returncode == 0, r.stderr
    from flowdsl.model import load_model
    est = load_model(f).memory_estimate(64)
    assert "Training memory at batch 64: about" in r.stdout and f"{est / 2**20:,.1f} MB" in r.stdout


@pytest.mark.parametrize("text,largest", [
    ("input(20000x20000x3) :: dense(1000) :: dense(2) :: softmax", "dense1.w"),
    ("conv(20000x20000x3, filters=64) :: dense(2) :: softmax", "dense1.w"),
])
def test_net_construction_refuses_parameters_that_cannot_fit(text, largest):
    try:  # reset this process's peak RSS (VmHWM), so that the check is not hidden by earlier tests
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    before = _vm("VmRSS:")
    t = time.perf_counter()
    with pytest.raises(FlowError) as e:
        flowdsl.parse(text)
    assert time.perf_counter() - t < 5
    msg = e.value.message
    assert "weights" in msg and "GB" in msg and largest in msg and "memory is available" in msg
    assert _vm("VmHWM:") - before < 100 * 2**20  # nothing was allocated


def _vm(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))


def test_eval_of_a_model_too_large_is_one_message(tmp_path, work):
    f = tmp_path / "huge.flow"
    f.write_text("input(20000x20000x3) :: dense(1000) :: dense(2) :: softmax\n")
    r = run_cli("eval", f, "--weights", work / "w.npz", "--data", f'npz("{work / "train.npz"}")')
    assert_error(r, "1,200,000,003,002 weights", "dense1.w")
