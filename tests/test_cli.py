"""`flowdsl check`: the layout table for a good file; for a bad one, exit 1 and one positioned
message with no traceback (unless --debug); exit 2 for usage errors; and it stays light (no
numba) and fast. Every example is checked in tests/test_examples.py."""
import json
import time

import pytest
from conftest import ENV, ROOT, run_cli

from flowdsl import cli

GLASSES = ROOT / "examples" / "glasses.flow"


@pytest.fixture
def bad_file(tmp_path):
    p = tmp_path / "bad.flow"
    p.write_text("c0 = conv(28x28x1, filters=4)\nnetwork = c0 :: dnse(2) :: softmax\n")
    return p


def test_check_good_file_prints_the_layout():
    r = run_cli("check", GLASSES)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    out = r.stdout
    assert out.startswith(f"{GLASSES}: ok\n")
    rows = {line.split()[0]: line for line in out.splitlines() if line[:1].isalnum()}
    for name, shape, params in [("c0", "400x400x1", "28"), ("c1", "400x400x1", "10"),
                                ("c2", "200x200x1", "17"), ("c3", "200x200x1", "10"),
                                ("dense1", "2", "80,002"), ("softmax1", "2", "0")]:
        assert name in rows, out
        cols = rows[name].split()
        assert cols[-2:] == [shape, params], rows[name]
    assert "conv(400x400x3, filters=1, field=3, stride=1, pad=1, act=relu)" in rows["c0"]
    assert "Total: 80,067 weights" in out
    assert "MB" in out


def test_check_bad_file_is_one_message(bad_file):
    r = run_cli("check", bad_file)
    assert r.returncode == 1
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines == [
        f"{bad_file}:2:17: error: unknown layer 'dnse'; did you mean 'dense'?",
        "    network = c0 :: dnse(2) :: softmax",
        "                    ^",
    ]


@pytest.mark.parametrize("source,words", [
    ("conv(4x4x1, field=5) :: dense(2) :: softmax", ":1:19: error: conv conv1: field 5 does not fit"),
    ("input(8) :: dense(2) ::", ":1:24: error: dangling '::'"),
    ("", ": error: the file is empty"),
    ("input(8) :: dense(2) :: softmax\ntrain { epochs = 0 }", ":2:18: error: train: epochs must be >= 1"),
])
def test_check_errors_exit_1(tmp_path, capsys, source, words):
    p = tmp_path / "m.flow"
    p.write_text(source)
    assert cli.main(["check", str(p)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{p}{words}"), err
    assert "Traceback" not in err


def test_check_missing_file_is_exit_1(tmp_path, capsys):
    assert cli.main(["check", str(tmp_path / "nope.flow")]) == 1
    assert capsys.readouterr().err.strip() == f"{tmp_path / 'nope.flow'}: error: no such file"


def test_check_binary_file_is_exit_1(tmp_path, capsys):
    p = tmp_path / "garbage.flow"
    p.write_bytes(bytes(range(255, -1, -1)) * 4)
    assert cli.main(["check", str(p)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{p}:1:1: error: not a UTF-8 text file")
    assert "Traceback" not in err


def test_no_verb_exits_2():
    r = run_cli()
    assert r.returncode == 2
    assert "usage" in r.stderr and "check" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,words", [
    (["check"], "the following arguments are required: file"),
    (["frobnicate", "x.flow"], "invalid choice: 'frobnicate'"),
    (["check", "a.flow", "b.flow"], "unrecognized arguments: b.flow"),
    (["--no-such-option", "check", "a.flow"], "unrecognized arguments"),
])
def test_usage_errors_exit_2(args, words, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "usage: flowdsl" in err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(bad_file):
    r = run_cli("check", bad_file, "--debug")
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr
    assert "FlowError" in r.stderr and "unknown layer 'dnse'" in r.stderr


@pytest.mark.parametrize("args", [["--debug", "check"], ["check", "--debug"]])
def test_debug_raises_in_process(bad_file, args):
    from flowdsl.errors import FlowError
    with pytest.raises(FlowError):
        cli.main(args + [str(bad_file)])


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "check" in capsys.readouterr().out


def test_check_does_not_import_numba():
    """check needs no compiled kernel, so it never loads numba (seconds of start-up)."""
    code = ("import flowdsl.cli, json, sys; rc = flowdsl.cli.main(sys.argv[1:]); "
            "print(json.dumps([rc, sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite'))]))")
    r = run_cli("check", "examples/glasses.flow", via=code, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("examples/glasses.flow: ok\n"), r.stdout
    rc, loaded = json.loads(r.stdout.splitlines()[-1])
    assert rc == 0
    assert loaded == [], f"flowdsl check imported {loaded}"


def test_check_is_fast():
    run_cli("check", GLASSES)  # warm the file system cache
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        r = run_cli("check", GLASSES)
        best = min(best, time.perf_counter() - t)
        assert r.returncode == 0
    print(f"flowdsl check examples/glasses.flow: {best:.2f} s wall, interpreter start included")
    assert best < 3  # the target is 1 s; the bound leaves room for a loaded machine


def test_broken_parser_cache_is_rebuilt(tmp_path):
    """The built parser is cached under $XDG_CACHE_HOME/flowdsl; a corrupt file is rebuilt."""
    env = dict(ENV, XDG_CACHE_HOME=str(tmp_path))
    env.pop("FLOWDSL_NO_USER_CACHE", None)
    r = run_cli("check", GLASSES, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    (cache,) = (tmp_path / "flowdsl").iterdir()
    good = cache.read_bytes()
    cache.write_bytes(good[: len(good) // 2])  # a half-written file
    r = run_cli("check", GLASSES, env=env, timeout=60)
    assert r.returncode == 0 and "Total: 80,067" in r.stdout and r.stderr == ""
    assert len(cache.read_bytes()) > len(good) // 2  # rewritten whole


def test_bench_says_when_the_training_step_splits(tmp_path, capsys, monkeypatch):
    """With two threads and a pass above blas.SPLIT_TRAIN_MIN the training rate is the split
    pass's, and bench says so, and that the per-layer table is the layer-by-layer pass; with one
    thread neither line appears. (On a one-core machine two threads are capped at one.)"""
    from flowdsl import blas, jit
    monkeypatch.setattr(blas, "SPLIT_MIN", 0)
    monkeypatch.setattr(blas, "SPLIT_TRAIN_MIN", 0)
    f = tmp_path / "tiny.flow"
    f.write_text("network = input(10x10x3) :: conv(filters=6, field=3, pad=same) :: relu"
                 " :: dense(3) :: softmax\ntrain { batch = 16 }\n")
    jit.numba()
    old = blas._threads
    try:
        for threads in ("2", "1"):
            assert cli.main(["bench", str(f), "--threads", threads, "--infer-batch", "8", "--repeats", "2"]) == 0
            out = capsys.readouterr().out
            two = blas._threads >= 2   # bench ran on this many
            assert ("split 2 ways" in out) == two, out
            from flowdsl import forked
            says = "this process and 1 forked helper each run" if forked.wanted() else "each thread runs"
            assert (says in out) == two, out
            assert ("per layer, the same step run layer by layer" in out) == two, out
            assert "conv1 (conv," in out and "total" in out
    finally:
        jit.threads(old)


def test_bench_prints_rates_and_a_row_per_layer(tmp_path, capsys):
    """`flowdsl bench`: training and inference rates, then forward/backward milliseconds for every
    layer with each conv's algorithm (Winograd waits for enough 2x2 tiles: 16 images of 10x10
    have 400, one image 25; gemm applies the maxpool itself, and its row names it; the relu
    after it runs in the same step, and that row names it too)."""
    f = tmp_path / "tiny.flow"
    f.write_text("network = input(10x10x12) :: conv(filters=6, field=3, pad=same) :: maxpool :: relu"
                 " :: dense(3) :: softmax\ntrain { batch = 16 }\n")
    for batch, algo in (("16", "winograd"), ("1", "gemm")):
        assert cli.main(["bench", str(f), "--batch", batch, "--infer-batch", "8", "--repeats", "2"]) == 0
        out = capsys.readouterr().out
        rates = {line.split(":")[0]: float(line.split()[1].replace(",", "")) for line in out.splitlines()
                 if line.startswith(("train:", "infer:"))}
        assert set(rates) == {"train", "infer"} and min(rates.values()) > 0, out
        rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
        pooled = algo == "gemm"
        names = {"layer", "conv1", "dense1", "total"}   # relu1 runs in the step before it
        assert set(rows) == (names if pooled else names | {"maxpool1"}), out
        assert rows["conv1"][1:3] == ["(conv,", f"{algo})"], out
        assert (rows["conv1"][3:5] == ["+", "maxpool1"]) == pooled, out
        assert rows["conv1" if pooled else "maxpool1"][-4:-2] == ["->", "relu1"], out
        for name in ("conv1", "dense1", "total") + (() if pooled else ("maxpool1",)):
            assert float(rows[name][-2]) >= 0 and float(rows[name][-1]) >= 0
