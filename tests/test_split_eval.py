"""The split evaluation pass (Net._split_forward over blas.split): with two or more threads each
thread runs the whole network on its own share of the batch. The outputs must be the ones of the
layer-by-layer pass (SPLIT_EVAL off) for every kind of layer that treats samples independently
in evaluation (batchnorm's running statistics, dropout as identity, branches, padding modes,
pooled convs of every algorithm), at odd batch sizes, and focus and one thread must not go
through it (training's own split pass: test_split_train.py)."""
import threading

import numpy as np
import pytest
from conftest import count_splits

from flowdsl import blas, jit
from flowdsl import net as netmod
from flowdsl.model import build_text
from flowdsl.net import Net

NETS = {
    "bn_dropout": "network = input(12x12x3) :: conv(filters=8, field=3, pad=same) :: batchnorm :: relu "
                  ":: maxpool :: dropout(0.5) :: conv(filters=16, field=3) :: maxpool(2, ceil=true) :: relu "
                  ":: dense(20) :: batchnorm :: gelu :: dropout(0.3) :: dense(5) :: softmax",
    "branches": "s = conv(filters=8, field=3, pad=same) :: relu\n"
                "network = input(10x10x2) :: conv(filters=8, field=3, pad=same) :: s "
                ":: conv(filters=8, field=3, pad=same) :: add(s) :: relu "
                ":: concat(s) :: conv(filters=6, field=1) :: avgpool(2) :: dense(4) :: softmax",
    "reflect": "network = input(11x9x1) :: conv(filters=5, field=5, pad=2, pad_mode=reflect, act=tanh) "
               ":: conv(filters=7, field=3, stride=2) :: globalavgpool :: dense(3) :: squared",
    "dense": "network = input(30) :: dense(64, act=relu) :: dense(32, act=swish) :: dense(3) :: softmax",
}


def _trained(text, seed=3):
    """A net with batchnorm running statistics and weights moved away from their start."""
    net = Net(build_text(text + "\ntrain { seed = 3 }", "<t>"), seed=seed)
    rng = np.random.default_rng(seed)
    for step in range(2):
        x = _inputs(net, 8, seed=seed + step)
        net.loss_grad(x, rng.integers(0, net.loss_layer.out[0], 8) if net.loss_layer.kind == "softmax"
                      else rng.standard_normal((8,) + tuple(net.loss_layer.out)).astype(np.float32))
        net.flat -= np.float32(0.05) * net.gflat
    return net


def _inputs(net, n, seed=0):
    shape = net.model.input_shape
    dims = (n,) + ((shape[1], shape[2], shape[0]) if len(shape) == 3 else tuple(shape))
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("n", [2, 7, 33])
def test_split_pass_equals_the_layer_by_layer_pass(two_threads, monkeypatch, name, n):
    net = _trained(NETS[name])
    x = _inputs(net, n)
    monkeypatch.setattr(netmod, "SPLIT_EVAL", False)
    want = net.predict(x)
    calls = count_splits(monkeypatch)
    monkeypatch.setattr(netmod, "SPLIT_EVAL", True)
    got = net.predict(x)
    assert calls == [(n, True)]   # it did split
    assert got.shape == want.shape and np.isfinite(got).all() and want.std() > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    got2 = net.predict(x, tta="hflip") if len(net.model.input_shape) == 3 else None
    if got2 is not None:
        monkeypatch.setattr(netmod, "SPLIT_EVAL", False)
        np.testing.assert_allclose(got2, net.predict(x, tta="hflip"), rtol=1e-5, atol=1e-6)


def test_split_pass_every_conv_algorithm(two_threads, monkeypatch):
    """Each conv algorithm, pooled or not, run on a pool thread: the same outputs."""
    text = ("network = input(16x16x3) :: conv(filters=3, field=3, pad=same) "        # rows
            ":: conv(filters=16, field=3, pad=same) :: maxpool :: relu "             # planar, pooled
            ":: conv(filters=32, field=3, pad=same) :: relu "                        # winograd
            ":: conv(filters=8, field=3, pad=same) :: relu "                         # winograd4
            ":: conv(filters=8, field=3, stride=2) :: maxpool(2, ceil=true) :: relu "  # gemm, pooled
            ":: dense(4) :: softmax")
    net = _trained(text)
    n = 9
    algos = [l.algo_for(n, False) for l in net.layers if l.kind == "conv"]
    assert algos == ["rows", "planar", "winograd", "winograd4", "gemm"]
    assert len(net.plan(False, n).pooled()) == 2
    x = _inputs(net, 2 * n)   # shares of 9
    monkeypatch.setattr(netmod, "SPLIT_EVAL", False)
    want = net.predict(x)
    monkeypatch.setattr(netmod, "SPLIT_EVAL", True)
    calls = count_splits(monkeypatch)
    got = net.predict(x)
    assert calls == [(2 * n, True)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_training_focus_batch_one_and_one_thread_do_not_split(two_threads, monkeypatch):
    net = _trained(NETS["bn_dropout"])
    x = _inputs(net, 6)
    calls = count_splits(monkeypatch)
    net.loss_grad(x, np.arange(6) % 5)      # training (below SPLIT_TRAIN_MIN: test_split_train.py)
    net.focus("conv1", x[:3])               # keep: outputs of inner layers
    net.predict(x[:1])                      # one sample
    from flowdsl.plan import Timer
    with Timer(net) as t:                   # per-layer times: one thread's own
        net.predict(x)
    assert calls == [] and t.times["conv1"][0] > 0
    jit.threads(1)
    net.predict(x)
    assert calls == []
    assert blas.split(10, lambda lo, hi: 0, 1 << 40) is None
    assert calls == [(10, False)]


def test_split_runs_each_share_on_its_own_thread_alone():
    """blas.split: contiguous shares covering range(n) in order, one per thread, with _solo set
    inside (products and kernels serial there) and cleared after, also when a share raises;
    below SPLIT_MIN it does not split."""
    jit.numba()
    old = blas._threads
    try:
        jit.threads(2)
        seen = []

        def run(lo, hi):
            assert blas._solo
            a = np.ones((400, 300), np.float32)
            assert (blas.mm(a, a.T) == 300).all()   # a serial product inside a share
            seen.append(threading.get_ident())
            return (lo, hi)
        assert blas.split(11, run, blas.SPLIT_MIN) == [(0, 5), (5, 11)]
        assert len(set(seen)) == 2 and not blas._solo
        assert blas.split(11, run, blas.SPLIT_MIN - 1) is None

        def bad(lo, hi):
            if lo:
                raise ValueError("share failed")
            return lo
        with pytest.raises(ValueError, match="share failed"):
            blas.split(4, bad, blas.SPLIT_MIN)
        assert not blas._solo
        assert blas.split(11, run, blas.SPLIT_MIN) == [(0, 5), (5, 11)]   # not left locked
    finally:
        jit.threads(old)


def test_split_threshold_uses_the_pass_work(monkeypatch):
    """Net A's estimate is ~3.7 M multiply-adds a sample (bench/nets/a_hellodl.flow: its convs
    and denses' parameters times their output positions): batch 8 splits, batch 4 does not."""
    import flowdsl
    from conftest import ROOT
    net = flowdsl.load(str(ROOT / "bench/nets/a_hellodl.flow"))
    m = net.macs_per_sample()
    assert 3.0e6 < m < 4.5e6
    assert 4 * m < blas.SPLIT_MIN < 8 * m
