"""Shared test helpers: the str(model) round trip, the one way to run the CLI in a child process (run_cli, start_cli,
cli_command, ENV) and the one toy data set (toy_set, TOY_NET; as files: save_npz,
save_image_folder, toy_image_folder). Test files import them with `from conftest import ...`
(pytest puts tests/ on sys.path to import this conftest).

The tests run against the source checkout even when flowdsl is not installed (`pytest` from the
repository root)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

try:
    import flowdsl  # noqa: F401
except ImportError:  # not installed: use the checkout
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

# Convs choose their algorithm by the rule of machines without AVX-512 BLAS (conv.wide_vectors), here
# and in every child: with AVX-512 BLAS kernels evaluation runs "gemm" for every conv of more than four
# filters and nothing runs "planar", so that code would go unrun here; test_layers checks the
# AVX-512 rule on its own.
os.environ["FLOWDSL_WIDE"] = "0"


# ------------------------------------------------------------------------------ the language
def round_trip(m):
    """parse(str(m)) gives the same model, and printing is a fixed point."""
    from flowdsl.model import build_text
    text = str(m)
    again = build_text(text, "canonical.flow")
    assert again.spec() == m.spec(), text
    assert str(again) == text
    return again


# ------------------------------------------------------------------------------ the CLI
# Decoded-data caches go to a folder of this test session, never the user's ~/.cache (a child
# flowdsl inherits it through ENV below).
if "FLOWDSL_DATA_CACHE" not in os.environ:
    import tempfile
    os.environ["FLOWDSL_DATA_CACHE"] = tempfile.mkdtemp(prefix="flowdsl-test-data-cache-")

# The environment of every child flowdsl: this checkout first on the path (whatever is installed),
# and none of the user's switches that change what the CLI prints or refuses.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
for _k in ("FLOWDSL_DEBUG", "FLOWDSL_MEM_AVAILABLE"):
    ENV.pop(_k, None)


def cli_command(*args, via=None):
    """argv of `python -m flowdsl ARGS`; via: Python code to run instead (`python -c VIA ARGS`,
    ARGS in sys.argv[1:]) for a child that must also report on itself, e.g. its peak memory."""
    return [sys.executable, *(("-c", via) if via else ("-m", "flowdsl")), *map(str, args)]


def run_cli(*args, cwd=ROOT, env=None, timeout=300, via=None, **popen):
    """Run `python -m flowdsl ARGS` in a child process and return its CompletedProcess (text
    stdout and stderr). env: the whole environment (default ENV; build on it with dict(ENV, ...))."""
    return subprocess.run(cli_command(*args, via=via), cwd=cwd, env=ENV if env is None else env,
                          capture_output=True, text=True, timeout=timeout, **popen)


def start_cli(*args, cwd=ROOT, env=None, **popen):
    """Start `python -m flowdsl ARGS` and return the Popen (the caller waits, signals, kills)."""
    return subprocess.Popen(cli_command(*args), cwd=cwd, env=ENV if env is None else env, **popen)


# ------------------------------------------------------------------------------ the toy data set
TOY_NET = "network = conv(8x8x1, filters=3, field=3, act=relu) :: maxpool :: dense(2) :: softmax\n"


def toy_set(n=None, shape=(8, 8, 1), classes=2, seed=0, per_class=None):
    """The toy data set: (x float32 (N, H, W, C) in [0, 1], y int64 (N,)). Noise in [0, 0.3), and
    class k is bright (+0.6) in the k-th of `classes` vertical bands: with two classes, class 0
    has a bright left half and class 1 a bright right half. A small conv net learns it in a few
    epochs, and no two images are alike. n samples with random labels, or per_class of each
    class in class order (the layout of an image folder)."""
    h, w, c = shape
    rng = np.random.default_rng(seed)
    if per_class is None:
        y = rng.integers(0, classes, n)
    else:
        y = np.repeat(np.arange(classes), per_class)
    x = rng.random((len(y), h, w, c), dtype=np.float32) * 0.3
    for k in range(classes):
        x[y == k, :, k * w // classes:(k + 1) * w // classes] += 0.6
    return x.clip(0, 1), y.astype(np.int64)


def save_npz(path, x, y):
    """x and y as an npz data file (npz("...") in a train block); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)
    return path


def save_image_folder(root, x, y, classes):
    """root/<class>/<i>.png for images x (float in [0, 1]; one channel: gray, three: RGB) and
    labels y (indices into classes), numbered 000.png, 001.png, ... in each class; returns
    {path: the uint8 pixels written}."""
    from PIL import Image
    made, count = {}, {}
    for img, label in zip(x, y):
        a = np.round(img * 255).astype(np.uint8)
        a = a[..., 0] if a.shape[-1] == 1 else a
        i = count[label] = count.get(label, -1) + 1
        path = Path(root) / classes[label] / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(path)
        made[path] = a
    return made


def toy_image_folder(root, classes=("cat", "dog"), per_class=3, shape=(4, 4, 1), seed=0):
    """The toy set as an images("...") folder: per_class images of each class, shape (H, W, C)."""
    x, y = toy_set(shape=shape, classes=len(classes), per_class=per_class, seed=seed)
    return save_image_folder(root, x, y, classes)


# ---------------------------------------------------------------- split passes (test_split_*.py)
@pytest.fixture
def two_threads(monkeypatch):
    """Two threads, and every evaluation pass of the tests' small nets splits (blas.SPLIT_MIN 0)."""
    from flowdsl import blas, jit
    jit.numba()
    old = blas._threads
    jit.threads(2)
    monkeypatch.setattr(blas, "SPLIT_MIN", 0)
    yield
    jit.threads(old)


# small nets with every layer kind a split training step must get right (tests/test_split_train.py,
# tests/test_forked.py)
SPLIT_NETS = {
    "bn_dropout": "network = input(12x12x3) :: conv(filters=8, field=3, pad=same) :: batchnorm :: relu "
                  ":: maxpool :: dropout(0.5) :: conv(filters=16, field=3) :: batchnorm :: maxpool(2, ceil=true) "
                  ":: relu :: dense(20) :: batchnorm :: gelu :: dropout(0.3) :: dense(5) :: softmax(smoothing=0.1)",
    "branches": "s = conv(filters=8, field=3, pad=same) :: batchnorm :: relu\n"
                "network = input(10x10x2) :: conv(filters=8, field=3, pad=same) :: s "
                ":: conv(filters=8, field=3, pad=same) :: add(s) :: relu "
                ":: concat(s) :: conv(filters=6, field=1) :: avgpool(2) :: dense(4) :: softmax",
    "reflect": "network = input(11x9x1) :: conv(filters=5, field=5, pad=2, pad_mode=reflect, act=tanh) "
               ":: conv(filters=7, field=3, stride=2) :: globalavgpool :: dense(3) :: squared",
    "dense": "network = input(30) :: dense(64, act=relu) :: batchnorm :: dropout(0.2) "
             ":: dense(32, act=swish) :: dense(3) :: softmax",
}


def count_splits(monkeypatch):
    """Record (n, whether it split) for every blas.split call from now on, and for every split
    training step whose shares ran in helper processes (Net._forked_loss_grad)."""
    from flowdsl import blas
    from flowdsl.net import Net
    calls = []
    real = blas.split

    def counted(n, run, work):
        out = real(n, run, work)
        calls.append((n, out is not None))
        return out
    monkeypatch.setattr(blas, "split", counted)
    real_forked = Net._forked_loss_grad

    def forked(self, x, y, total, t):
        out = real_forked(self, x, y, total, t)
        calls.append((x.shape[0], out is not None))
        return out
    monkeypatch.setattr(Net, "_forked_loss_grad", forked)
    return calls
