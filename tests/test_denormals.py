"""Float32 denormals (below 1.2e-38) count as zero while flowdsl computes (flowdsl/_fpmode.py,
jit.flushed): on its calling thread inside forward, backward and optimizer steps, on numba's
workers and on its BLAS threads; the caller's own numpy keeps IEEE denormals."""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import flowdsl
from flowdsl import jit

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="FTZ/DAZ are x86's MXCSR bits; elsewhere denormals are kept")

TINY = np.float32(1e-20)   # TINY * TINY = 1e-40: a denormal unless flushed
NET = "network = input(6) :: dense(3, bias=false) :: softmax\n"


def _tiny_net():
    net = flowdsl.parse(NET, seed=0)
    net.params["dense1"]["w"][...] = TINY
    return net


def test_forward_flushes_denormals_and_gives_the_callers_thread_back():
    net = _tiny_net()
    x = np.full((2, 6), TINY, np.float32)
    assert (TINY * TINY) > 0                        # this thread: IEEE before
    scores = net.forward(x)
    assert scores.shape == (2, 3) and np.all(scores == 0)   # 6 * 1e-40 each, flushed
    assert (TINY * TINY) > 0 and np.float32(1e-39) * np.float32(1.0) > 0   # ... and after


def test_gradients_and_the_optimizer_step_flush_denormals():
    from flowdsl.args import CallValue
    from flowdsl.optim import Optimizer
    net = _tiny_net()
    x = np.full((4, 6), TINY, np.float32)
    net.loss_grad(x, np.zeros(4, np.int64))
    g = net.grads["dense1"]["w"]         # x * (p - onehot): about 1e-20, a normal value
    assert np.abs(g).max() > 0 and np.abs(g).max() < 1e-19
    g[...] = np.float32(1e-39)           # a denormal gradient
    net.params["dense1"]["w"][...] = np.float32(3e-39)
    Optimizer(net, CallValue("momentum", (("lr", 1.0), ("mu", 0.0))), 0.0).step()
    assert np.all(net.params["dense1"]["w"] == 0)   # 3e-39 - 1e-39 kept would be 2e-39


def test_numba_workers_and_blas_threads_flush():
    from flowdsl import blas
    from flowdsl.layers.activations import act_forward
    jit.threads(2)
    assert blas.MIN_WORK < 600 * 2000 * 40   # the product below is split over the pool threads
    n = 4 * jit.SERIAL_BELOW             # large enough for the parallel kernel
    z = np.full(n, -np.float32(1e-38), np.float32)
    with jit.flushed():
        y = act_forward("leakyrelu", 0.25, z)   # -2.5e-39 each, on every worker: flushed
        a = np.full((600, 2000), TINY, np.float32)
        p = blas.mm(a, np.full((2000, 40), TINY, np.float32))
    assert np.all(y == 0) and np.all(p == 0)


def test_flowdsl_denormals_1_keeps_them():
    code = ("import numpy as np, flowdsl\n"
            f"net = flowdsl.parse({NET!r}, seed=0)\n"
            "net.params['dense1']['w'][...] = np.float32(1e-20)\n"
            "print(float(net.forward(np.full((1, 6), np.float32(1e-20), np.float32)).max()))\n")
    env = dict(os.environ, FLOWDSL_DENORMALS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert 5e-40 < float(out.stdout) < 7e-40     # 6 * 1e-40, kept
