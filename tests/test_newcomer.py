"""The first hour of a new user (issue 17): the compile message, readable report and eval
pictures, runs never overwritten, why training stopped, the API's errors, errors that say what
to do, focus pictures that can be read."""
import os
import re

import numpy as np
import pytest
from PIL import Image

import flowdsl
from conftest import ENV, TOY_NET, run_cli, save_npz, toy_set
from flowdsl.errors import FlowError

TRAIN = "train {\n  data = npz(\"toy.npz\")\n  test = split(0.25)\n  batch = 8\n  epochs = 2\n  seed = 1\n}\n"


@pytest.fixture
def toy(tmp_path):
    x, y = toy_set(48)
    save_npz(tmp_path / "toy.npz", x, y)
    f = tmp_path / "toy.flow"
    f.write_text(TOY_NET + TRAIN)
    return f


# ------------------------------------------------------------------------- 1. the first run
def test_first_run_says_it_compiles_and_leaves_compile_time_out_of_img_s(toy, tmp_path):
    env = dict(ENV, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    first = run_cli("train", str(toy), "--out", str(tmp_path / "r1"), "--quiet-bar", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert "compiling kernels for conv (" in first.stderr and "(first run only" in first.stderr, first.stderr
    assert str(tmp_path / "numba-cache") in first.stderr
    m = re.search(r"compiled (\d+) kernels in ([\d.]+) s", first.stderr)
    assert m and int(m.group(1)) > 3, first.stderr
    ep1 = re.search(r"epoch 1/2 .* ([\d,]+) img/s +([\d.]+) s \(([\d.]+) s of it loading kernels\)", first.stderr)
    assert ep1, first.stderr
    imgs, secs, kern = float(ep1.group(1).replace(",", "")), float(ep1.group(2)), float(ep1.group(3))
    assert kern > 0.5 * secs                              # the first epoch was mostly compiling
    assert imgs > 10 * 36 / secs                          # img/s counts the training time only
    second = run_cli("train", str(toy), "--out", str(tmp_path / "r2"), "--quiet-bar", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    assert "compiling kernels" not in second.stderr and "compiled" not in second.stderr, second.stderr
    assert "10-60 s" in run_cli("train", "--help").stdout.replace("\n", " ")


def test_kernel_clock_counts_compiles_once(tmp_path, monkeypatch):
    """KernelClock on a fresh module: one compile reported, then none; seconds add up."""
    import sys
    (tmp_path / "kcmod_17.py").write_text(
        "from flowdsl import jit\n@jit.kernel(parallel=False)\ndef twice(a):\n    return a * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    from flowdsl import jit
    import kcmod_17
    seen = []
    with jit.KernelClock(on_compile=seen.append) as clock:
        assert kcmod_17.twice(3.0) == 6.0
        names, secs = clock.take_compiled()
        assert names == ["twice"] and seen == ["twice"] and secs > 0
        assert clock.take() > 0
        kcmod_17.twice(4.0)
        assert clock.take_compiled() == ([], 0.0) and clock.take() == 0.0
    sys.modules.pop("kcmod_17", None)


# ------------------------------------------------------------------------- 2. the pictures
def _history(epochs=6, classes=("T-shirt/top", "Trouser", "Pullover")):
    from flowdsl.train import History
    rows = [{"epoch": e, "step": 10 * e, "lr": 1e-3, "train_loss": 0.74 / e, "train_acc": 0.6 + 0.05 * e,
             "test_loss": 0.8 / e + 0.05, "test_acc": 0.58 + 0.05 * e - (0.06 if e == 6 else 0),
             "seconds": 1.0, "img_per_s": 100.0} for e in range(1, epochs + 1)]
    best = np.array([[9, 1, 0], [0, 10, 0], [1, 0, 9]])
    last = np.array([[5, 5, 0], [0, 10, 0], [5, 0, 5]])
    return History(rows=rows, confusion=last, best_confusion=best, best_epoch=5, classes=list(classes))


def test_report_axes_are_readable_and_show_the_best_epochs_confusion():
    from flowdsl.report import report_figure
    fig = report_figure(_history(), "toy")
    loss, acc, conf = [a for a in fig.axes if a.get_label() != "<colorbar>"][:3]
    for ax in (loss, acc):
        ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] - 1e-9 <= t <= ax.get_ylim()[1] + 1e-9]
        assert all(abs(t * 20 - round(t * 20)) < 1e-9 for t in ticks), ticks   # round: multiples of 0.05
        leg = ax.get_legend()
        assert leg is not None
        fig.canvas.draw()
        box, frame = leg.get_window_extent(), ax.get_window_extent()
        assert box.y0 >= frame.y1 - 1        # above the plot: the legend never covers a curve
    assert loss.get_ylim()[0] == 0.0
    assert acc.get_ylim()[1] == 1.0
    assert [t.get_text() for t in conf.get_xticklabels()] == ["T-shirt/top", "Trouser", "Pullover"]
    assert [t.get_text() for t in conf.get_yticklabels()] == ["T-shirt/top", "Trouser", "Pullover"]
    assert "epoch 5" in conf.get_title() and "best.npz" in conf.get_title()
    counts = sorted(int(t.get_text()) for t in conf.texts)
    assert counts == sorted(_history().best_confusion.ravel().tolist())   # the best epoch's, not the last
    assert any(a.get_label() == "<colorbar>" for a in fig.axes)            # a colour key


def test_training_keeps_the_best_epochs_confusion_and_eval_says_what_it_wrote(toy, tmp_path):
    r = run_cli("train", str(toy), "--out", str(tmp_path / "run"), "--epochs", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    best = np.load(tmp_path / "run" / "best.npz")
    last = np.load(tmp_path / "run" / "last.npz")
    assert int(last["meta.best_epoch"]) == int(best["meta.best_epoch"]) >= 1
    np.testing.assert_array_equal(last["meta.best_confusion"], best["meta.confusion"])
    e = run_cli("eval", str(toy), "--weights", str(tmp_path / "run" / "best.npz"), "--out", str(tmp_path / "ev"),
                cwd=tmp_path)
    assert e.returncode == 0, e.stderr
    assert f"wrote {tmp_path / 'ev' / 'eval.png'}" in e.stdout
    assert Image.open(tmp_path / "ev" / "eval.png").size[0] >= 500


def test_eval_text_uses_class_names(tmp_path):
    from conftest import save_image_folder
    x, y = toy_set(per_class=6)
    save_image_folder(tmp_path / "imgs", x, y, ("cat", "dog"))
    f = tmp_path / "m.flow"
    f.write_text(TOY_NET + 'train {\n  data = images("imgs", size=8x8)\n  test = split(0.5)\n  epochs = 1\n  batch = 4\n}\n')
    assert run_cli("train", str(f), "--out", str(tmp_path / "run"), cwd=tmp_path).returncode == 0
    e = run_cli("eval", str(f), "--weights", str(tmp_path / "run" / "best.npz"), cwd=tmp_path)
    assert e.returncode == 0, e.stderr
    conf = e.stdout[e.stdout.index("confusion"):]
    assert re.search(r"^\s+cat\s+dog\s*$", conf.splitlines()[1]) and conf.splitlines()[2].split()[0] == "cat"


# ------------------------------------------------------------------------- 3. never overwrite
def test_a_second_run_never_overwrites_the_first(toy, tmp_path):
    out = tmp_path / "runs" / "toy"
    assert run_cli("train", str(toy), "--out", str(out), cwd=tmp_path).returncode == 0
    before = (out / "best.npz").read_bytes(), (out / "log.csv").read_bytes()
    r = run_cli("train", str(toy), "--out", str(out), "--epochs", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"writing {out}-2/" in r.stderr and (out.parent / "toy-2" / "best.npz").exists()
    assert ((out / "best.npz").read_bytes(), (out / "log.csv").read_bytes()) == before
    r = run_cli("train", str(toy), "--out", str(out), "--epochs", "1", "--overwrite", cwd=tmp_path)
    assert r.returncode == 0 and (out / "log.csv").read_bytes() != before[1]
    assert not (out.parent / "toy-3").exists()
    from flowdsl.jobs import free_run_folder
    (out.parent / "toy-3").mkdir()                      # an empty folder is free; toy-2 is not
    (out.parent / "toy-2" / "best.npz").unlink()
    assert free_run_folder(str(out)) == f"{out}-3"      # any one of the run files counts
    (out.parent / "toy-2" / "last.npz").unlink()
    (out.parent / "toy-2" / "log.csv").unlink()
    assert free_run_folder(str(out)) == f"{out}-2"


def test_default_folder_is_kept_too(toy, tmp_path):
    for _ in range(2):
        assert run_cli("train", str(toy), "--epochs", "1", cwd=tmp_path).returncode == 0
    assert (tmp_path / "runs" / "toy" / "last.npz").exists() and (tmp_path / "runs" / "toy-2" / "last.npz").exists()


# ------------------------------------------------------------------------- 4. why it stopped
def test_early_stop_and_resume_say_why_and_where(toy, tmp_path):
    # a learning rate too small to change anything: test_acc never improves after epoch 1
    r = run_cli("train", str(toy), "--out", str(tmp_path / "r"), "--epochs", "10", "--patience", "2",
                "--lr", "1e-12", "--quiet-bar", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"stopped early at epoch 3: test_acc did not improve for 2 epochs \(best [\d.]+ at epoch 1\)",
                     r.stderr), r.stderr
    r = run_cli("train", str(toy), "--out", str(tmp_path / "r"), "--epochs", "4",
                "--resume", str(tmp_path / "r" / "last.npz"), "--quiet-bar", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"resuming from epoch 4, step 15 of 20", r.stderr), r.stderr


# ------------------------------------------------------------------------- 5. the API
def test_api_labels_out_of_range_and_non_finite_inputs_are_data_errors():
    net = flowdsl.parse(TOY_NET, seed=0)
    x, y = toy_set(16)
    with pytest.raises(FlowError, match=r"label 5 .* 2 classes"):
        net.fit(x, np.where(y == 1, 5, y), epochs=1, batch=4, verbose=0)
    bad = x.copy()
    bad[3, 2, 2, 0] = np.nan
    with pytest.raises(FlowError, match=r"sample 3 holds NaN"):
        net.fit(bad, y, epochs=1, batch=4, verbose=0)
    bad[3, 2, 2, 0] = np.inf
    with pytest.raises(FlowError, match=r"sample 3 holds infinite values"):
        net.predict(bad)
    with pytest.raises(FlowError, match=r"sample 3"):
        net.focus("conv1" if "conv1" in net.model.names() else net.model.names()[1], bad)


def test_api_diverging_loss_mentions_no_checkpoint():
    net = flowdsl.parse(TOY_NET + "train {\n  optimizer = sgd(lr=1e30)\n}\n", seed=0)
    x, y = toy_set(16)
    with pytest.raises(FlowError, match="the loss became") as e:
        net.fit(x, y, epochs=5, batch=4, verbose=0)
    assert "checkpoint" not in str(e.value) and "--lr" not in str(e.value) and "lr=1e+29" in str(e.value)


def test_api_fit_shows_progress_unless_verbose_0(capsys):
    net = flowdsl.parse(TOY_NET, seed=0)
    x, y = toy_set(16)
    net.fit(x, y, epochs=1, batch=4)
    assert "epoch 1/1" in capsys.readouterr().err
    net.fit(x, y, epochs=1, batch=4, verbose=0)
    assert capsys.readouterr().err == ""


def test_readme_api_example_runs_as_written(tmp_path, monkeypatch):
    text = (open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read())
    block = text[text.index("    import flowdsl\n"):]
    block = block[:block.index("\n\n")]
    code = "\n".join(line[4:] for line in block.splitlines())
    x, y = toy_set(32, shape=(28, 28, 1), classes=10)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.flow").write_text("network = conv(28x28x1, filters=8) :: dense(10) :: softmax\n")
    exec(compile(code, "README.md", "exec"), {"x": x, "y": y})
    assert (tmp_path / "w.npz").exists()


# ------------------------------------------------------------------------- 6. errors
def test_checkpoint_of_another_model_says_which(tmp_path, toy):
    assert run_cli("train", str(toy), "--out", str(tmp_path / "run"), "--epochs", "1", cwd=tmp_path).returncode == 0
    other = tmp_path / "other.flow"
    other.write_text("network = conv(8x8x1, filters=5, field=3, act=relu) :: dense(2) :: softmax\n")
    r = run_cli("eval", str(other), "--weights", str(tmp_path / "run" / "best.npz"), "--data", 'npz("toy.npz")',
                cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "best.npz was trained for 'toy' (" in r.stderr and "not this model (" in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["--epochs", "abc"], ["--lr", "fast"], ["--batch", "-3"]])
def test_bad_command_line_values_exit_2(toy, tmp_path, args):
    r = run_cli("train", str(toy), *args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()


def test_check_names_a_missing_image_folder_at_its_position(tmp_path):
    f = tmp_path / "m.flow"
    f.write_text(TOY_NET + 'train {\n  data = images("nowhere", size=8x8)\n}\n')
    r = run_cli("check", str(f), cwd=tmp_path)
    assert r.returncode == 0
    assert re.search(rf"{re.escape(str(f))}:3:3: warning: data = images\(", r.stderr) and "nowhere" in r.stderr
    t = run_cli("train", str(f), cwd=tmp_path)
    assert t.returncode == 1 and re.search(rf"{re.escape(str(f))}:3:3: error", t.stderr), t.stderr


# ------------------------------------------------------------------------- 7. focus pictures
def test_focus_grid_tiles_are_large_and_numbered_and_one_channel_layers_have_no_grid(tmp_path):
    net = flowdsl.parse("c1 = conv(8x8x1, filters=4, field=3, pad=1, act=relu)\n"
                        "c2 = conv(filters=1, field=3, pad=1)\nnetwork = c1 :: c2 :: dense(2) :: softmax\n", seed=0)
    x, _ = toy_set(1)
    net.focus("c1", x, png_dir=tmp_path, names=["a"])
    net.focus("c2", x, png_dir=tmp_path, names=["a"])
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "c2-grid-a.png" not in names and "c2-0-a.png" in names
    g = np.asarray(Image.open(tmp_path / "c1-grid-a.png"))
    assert g.shape[0] >= 2 * 64 and g.shape[1] >= 2 * 64         # 2x2 tiles of at least 64 px
    tile = g[:64, :64]
    plain = np.asarray(Image.open(tmp_path / "c1-0-a.png").resize((64, 64), Image.NEAREST))
    assert (tile[:10, :10] != plain[:10, :10]).any()              # the channel number is drawn on it
    assert (tile[20:, 20:] == plain[20:, 20:]).mean() > 0.9


def test_focus_percentile_scale_lifts_a_map_with_one_bright_pixel():
    from flowdsl.focus import to_uint8
    a = np.linspace(0, 1, 400).reshape(20, 20)
    a[0, 0] = 1000.0
    assert to_uint8(a).mean() < 2                        # min..max: almost black
    assert 100 < to_uint8(a, "percentile").mean() < 160  # 1st..99th: the gradient shows


def test_focus_kernels_are_large_and_diverging(tmp_path):
    from flowdsl.focus import kernel_png
    from flowdsl.model import build_text
    layer = build_text("c1 = conv(8x8x1, filters=2, field=3)\nnetwork = c1 :: dense(2) :: softmax\n").layer("c1")
    w = np.zeros((3, 3, 1, 2), np.float32)
    w[0, 0, 0, 0], w[2, 2, 0, 0] = 1.0, -1.0
    img = np.asarray(Image.open(kernel_png(layer, w, tmp_path)).convert("RGB")).astype(int)
    assert img.shape[0] >= 24 and img.shape[1] >= 2 * img.shape[0]   # a 3x3 kernel >= 24 px; 2 filters side by side
    cell = img.shape[0] // 3
    r, g, b = img[cell // 2, cell // 2]
    assert r > 200 and b < 100                           # positive: red
    r, g, b = img[2 * cell + cell // 2, 2 * cell + cell // 2]
    assert b > 200 and r < 100                           # negative: blue
    assert (img[cell + cell // 2, cell + cell // 2] > 240).all()   # zero: white


def test_cli_focus_scale_option(tmp_path):
    f = tmp_path / "m.flow"
    f.write_text(TOY_NET)
    x, _ = toy_set(1)
    Image.fromarray((x[0, :, :, 0] * 255).astype(np.uint8), "L").save(tmp_path / "a.png")
    r = run_cli("focus", str(f), "--all", "--input", str(tmp_path / "a.png"), "--scale", "percentile",
                "--out", str(tmp_path / "fo"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("focus", str(f), "--all", "--input", str(tmp_path / "a.png"), "--scale", "loud", cwd=tmp_path)
    assert r.returncode == 2
