"""Modules import downward only: cli -> jobs -> (net, train, data, ...) -> layers -> jit/blas.
No engine module pulls in the CLI's layer (flowdsl.jobs, flowdsl.cli), neither when it is
imported nor when a network is trained through the library. Each check runs in a fresh
interpreter, so what an earlier test imported cannot hide a cycle. The module list is found by
walking the package: a new module is covered without touching this file."""
import json
import pkgutil
import subprocess
import sys

import pytest
from conftest import ENV, ROOT

import flowdsl

UPPER = ("flowdsl.cli", "flowdsl.jobs", "flowdsl.__main__")   # the CLI's own modules
ENGINE = sorted(["flowdsl"] + [m.name for m in pkgutil.walk_packages(flowdsl.__path__, "flowdsl.")
                               if m.name not in UPPER])


def python(code):
    """Run code in a fresh interpreter (this checkout first on the path); its CompletedProcess."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_the_walk_finds_the_engine():
    assert {"flowdsl.net", "flowdsl.model", "flowdsl.train", "flowdsl.layers",
            "flowdsl.layers.conv", "flowdsl.layers.base"} <= set(ENGINE), ENGINE
    assert not set(UPPER) & set(ENGINE)


@pytest.mark.parametrize("module", ENGINE)
def test_engine_module_does_not_import_the_cli(module):
    code = ("import importlib, json, sys\n"
            f"importlib.import_module({module!r})\n"
            f"print(json.dumps([m for m in {list(UPPER)!r} if m in sys.modules]))\n")
    r = python(code)
    assert r.returncode == 0, r.stderr
    bad = json.loads(r.stdout.splitlines()[-1])
    assert not bad, f"import {module} imports {', '.join(bad)}: an upward import (engine below CLI)"


FIT = """
import json, sys
import numpy as np
import flowdsl
net = flowdsl.parse("network = conv(6x6x1, filters=2, field=3, act=relu) :: maxpool :: dense(2) :: softmax\\n"
                    "train { batch = 8  seed = 1 }")
rng = np.random.default_rng(0)
x = rng.random((8, 6, 6, 1), dtype=np.float32)
y = rng.integers(0, 2, 8)
h = net.fit(x, y, iterations=1, batch=8)
net.predict(x)
net.evaluate(x, y)
print(json.dumps([h.step, [m for m in %r if m in sys.modules]]))
""" % (list(UPPER),)


def test_training_through_the_library_does_not_import_the_cli():
    """Net.fit / predict / evaluate on arrays: the library path, with no data source to load."""
    r = python(FIT)
    assert r.returncode == 0, r.stderr
    step, bad = json.loads(r.stdout.splitlines()[-1])
    assert step == 1
    assert not bad, f"training a Net imports {', '.join(bad)}: an upward import (engine below CLI)"


HEAVY = ("onnx", "onnxruntime", "mpi4py")   # optional extras: imported only where they are needed


def test_check_and_training_import_no_optional_extra():
    code = FIT.replace("print(json.dumps([h.step,", "from flowdsl import cli\n"
                       "cli.main(['check', 'examples/fashion.flow'])\nprint(json.dumps([h.step,")
    code = code.replace(f"for m in {list(UPPER)!r}", f"for m in {list(HEAVY)!r}")
    r = python(code)
    assert r.returncode == 0, r.stderr
    step, bad = json.loads(r.stdout.splitlines()[-1])
    assert step == 1 and not bad, f"check or training imports {', '.join(bad)}"
