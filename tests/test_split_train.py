"""The split training pass (Net._split_loss_grad over blas.split): with two or more threads each
thread runs forward, loss and backward on its own share of the batch, and the threads meet only
in batchnorm's statistics (dist.Team) and in the final gradient sum. Its loss, gradients,
running statistics and dropout masks must be the layer-by-layer pass's (SPLIT_TRAIN off) up to
float32 rounding, for every kind of layer; a failing share must raise its own error without
leaving the other waiting; a training run through it must still be deterministic and resume
exactly. The team's collectives (dist.Team, flowdsl/_spin.py) are tested on their own."""
import threading
import time

import numpy as np
import pytest
from conftest import SPLIT_NETS, count_splits

from flowdsl import blas, dist, jit
from flowdsl import net as netmod
from flowdsl.model import build_text
from flowdsl.net import Net
from flowdsl.optim import Optimizer

NETS = SPLIT_NETS


@pytest.fixture(params=["procs", "threads"])
def two_threads(request, two_threads, monkeypatch):
    """conftest's, and every training pass of these small nets splits too; its shares run in
    helper processes (flowdsl/forked.py) or in threads (FLOWDSL_SPLIT)."""
    monkeypatch.setattr(blas, "SPLIT_TRAIN_MIN", 0)
    monkeypatch.setenv("FLOWDSL_SPLIT", request.param)
    yield


IN_THREADS = pytest.mark.parametrize("two_threads", ["threads"], indirect=True)   # spies see threads only


def _net(text, seed=3, train="seed = 3"):
    return Net(build_text(text + f"\ntrain {{ {train} }}", "<t>"), seed=seed)


def _batch(net, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = net.model.input_shape
    dims = (n,) + ((shape[1], shape[2], shape[0]) if len(shape) == 3 else tuple(shape))
    x = rng.standard_normal(dims).astype(np.float32)
    if net.loss_layer.kind == "softmax":
        y = rng.integers(0, net.loss_layer.out[0], n)
    else:
        y = rng.standard_normal((n,) + tuple(net.loss_layer.out)).astype(np.float32)
    return x, y


def _step(net, x, y, split, monkeypatch, seed=7):
    monkeypatch.setattr(netmod, "SPLIT_TRAIN", split)
    net.rng = np.random.default_rng([seed, 4])   # as train.py: one generator per step
    loss, correct = net.loss_grad(x, y)
    return loss, correct, net.gflat.copy()


@pytest.mark.parametrize("split", [True, False])
def test_loss_grad_takes_what_forward_takes_and_refuses_the_rest(two_threads, monkeypatch, split):
    """Both passes index by the network's shapes: an NCHW batch is converted (not read as NHWC, which
    wrote outside the kernels' buffers and aborted the process in free()), and a batch or labels
    that do not fit are a FlowError before any kernel runs."""
    from flowdsl.errors import FlowError
    a, b = _net(NETS["bn_dropout"]), _net(NETS["bn_dropout"])
    x, y = _batch(a, 9)
    calls = count_splits(monkeypatch)
    want = _step(a, x, y, split, monkeypatch)
    got = _step(b, np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y, split, monkeypatch)   # (N, C, H, W)
    assert calls == ([(9, True)] * 2 if split else [])
    assert got[:2] == want[:2]
    np.testing.assert_array_equal(got[2], want[2])
    assert _step(b, x.astype(np.float64), y, split, monkeypatch)[0] == pytest.approx(want[0], rel=1e-6)
    for bad_x, bad_y, msg in [(x[:, :, :11], y, "does not fit the network input"),
                              (x, y[:8], "labels must be 9 integers"),
                              (x, y.astype(np.float32), "labels must be 9 integers"),
                              (x, np.r_[y[:8], 5], "label 5 is out of range"),
                              (x, np.r_[-1, y[1:]], "label -1 is out of range")]:
        with pytest.raises(FlowError, match=msg):
            b.loss_grad(bad_x, bad_y)
    r = _net(NETS["reflect"])   # a regression loss: its targets' size is checked
    xr, yr = _batch(r, 4)
    with pytest.raises(FlowError, match="do not fit 4 samples"):
        r.loss_grad(xr, yr[:3])


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("n", [2, 7, 33])
def test_split_training_pass_equals_the_layer_by_layer_pass(two_threads, monkeypatch, name, n):
    a, b = _net(NETS[name]), _net(NETS[name])
    x, y = _batch(a, n)
    want = _step(a, x, y, False, monkeypatch)
    calls = count_splits(monkeypatch)
    got = _step(b, x, y, True, monkeypatch)
    assert calls == [(n, True)]   # it did split
    assert got[1] == want[1]
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    g, w = got[2], want[2]
    assert np.abs(w).max() > 0 and np.isfinite(g).all()
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5 * np.abs(w).max())
    for layer, st in a.state.items():         # the running statistics: updated once, the same
        for k, v in st.items():
            np.testing.assert_allclose(b.state[layer][k], v, rtol=1e-5, atol=1e-6)
    # the generator ends where one pass leaves it (the same draws: dropout's masks)
    assert a.rng.random() == b.rng.random()


@IN_THREADS
def test_split_dropout_masks_are_the_whole_batch_mask(two_threads, monkeypatch):
    """Each share's dropout mask is its rows of the layer-by-layer pass's mask, for both
    dropouts of a pass (the generator advances alike in every share). (Shares in processes:
    tests/test_forked.py, the threads' results bit for bit.)"""
    from flowdsl.layers.dropout import Dropout
    masks = []
    real = Dropout.forward

    def spy(self, x, p, ctx, training):
        out = real(self, x, p, ctx, training)
        rows = ctx.get("rows")
        masks.append((self.name, 0 if rows is None else int(rows[0][0]), ctx["mask"].copy()))
        return out
    monkeypatch.setattr(Dropout, "forward", spy)
    text = NETS["bn_dropout"]
    a, b = _net(text), _net(text)
    x, y = _batch(a, 9)
    _step(a, x, y, False, monkeypatch)
    want = {name: m for name, _, m in masks}
    masks.clear()
    _step(b, x, y, True, monkeypatch)
    assert sorted({lo for _, lo, _ in masks}) == [0, 4]
    for name, w in want.items():
        got = np.concatenate([m for nm, lo, m in sorted(masks, key=lambda t: t[1]) if nm == name])
        assert (w == 0).any() and (w != 0).any()
        np.testing.assert_array_equal(got, w)


def test_split_training_every_conv_algorithm(two_threads, monkeypatch):
    """Each conv algorithm in training (gemm absorbing a maxpool, the Winograd schemes, planar,
    rows) run on both threads: the gradients of the layer-by-layer pass."""
    text = ("network = input(16x16x3) :: conv(filters=3, field=3, pad=same) "         # rows
            ":: conv(filters=16, field=3, pad=same) :: maxpool :: relu "              # gemm, pooled
            ":: conv(filters=32, field=3, pad=same) :: relu "                         # winograd
            ":: conv(filters=16, field=3, pad=same) :: relu "                         # winograd4
            ":: conv(filters=20, field=5, pad=2) :: relu "                            # winograd25
            ":: conv(filters=8, field=3, stride=2) :: relu "                          # gemm
            ":: dense(4) :: softmax")
    a, b = _net(text), _net(text)
    n = 24
    algos = [l.algo_for(n // 2, True) for l in a.layers if l.kind == "conv"]
    assert set(algos) >= {"rows", "winograd", "winograd4", "winograd25", "gemm"}, algos
    x, y = _batch(a, n)
    want = _step(a, x, y, False, monkeypatch)
    calls = count_splits(monkeypatch)
    got = _step(b, x, y, True, monkeypatch)
    assert calls == [(n, True)]
    np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=2e-5 * np.abs(want[2]).max())


def test_small_batches_one_thread_timer_and_ranks_do_not_split(monkeypatch):
    jit.numba()
    old = blas._threads
    try:
        jit.threads(2)
        net = _net(NETS["bn_dropout"])
        x, y = _batch(net, 6)
        calls = count_splits(monkeypatch)
        net.loss_grad(x, y)                  # below SPLIT_TRAIN_MIN: the layer-by-layer pass
        monkeypatch.setattr(blas, "SPLIT_MIN", 0)
        monkeypatch.setattr(blas, "SPLIT_TRAIN_MIN", 0)
        net.loss_grad(x[:1], y[:1])          # one sample
        from flowdsl.plan import Timer
        with Timer(net) as t:                # per-layer times: one thread's own
            net.loss_grad(x, y)
        assert t.times["conv1"][0] > 0
        net.world = _Ranks()                 # a rank of several (MPI): the layer-by-layer pass
        net.loss_grad(x, y)
        net.world = None
        jit.threads(1)
        net.loss_grad(x, y)
        assert calls == []
        jit.threads(2)
        net.loss_grad(x, y)
        assert calls == [(6, True)]
        # the threshold: each share's forward work
        monkeypatch.setattr(blas, "SPLIT_TRAIN_MIN", 3 * net.macs_per_sample())
        net.loss_grad(x, y)                  # shares of 3: splits
        net.loss_grad(x[:5], y[:5])          # shares of 2: does not
        assert calls == [(6, True), (6, True)]
    finally:
        jit.threads(old)


class _Ranks(dist.Solo):
    """A stand-in for one of two MPI ranks (its collectives are the identity)."""
    size = 2


def test_a_model_whose_extra_gradients_do_not_fit_trains_layer_by_layer(two_threads, monkeypatch):
    """The other share's gradient buffer is a copy of the parameters: when it would take more
    than a quarter of the available memory the pass runs layer by layer (no out-of-memory kill);
    the decision is made once per net."""
    net = _net(NETS["dense"])
    x, y = _batch(net, 8)
    calls = count_splits(monkeypatch)
    monkeypatch.setenv("FLOWDSL_MEM_AVAILABLE", str(4 * 4 * net.gflat.size - 1))
    net.loss_grad(x, y)
    monkeypatch.setenv("FLOWDSL_MEM_AVAILABLE", str(10 ** 12))
    net.loss_grad(x, y)                       # still no: decided once
    assert calls == [] and net.train_shares(8) == 1
    fresh = _net(NETS["dense"])
    fresh.loss_grad(x, y)
    assert calls == [(8, True)] and fresh.train_shares(8) == 2


def test_training_threshold_splits_the_bench_nets_at_batch_64():
    """Nets A and B (bench/nets) at their batch of 64 split on 2 threads; at batch 16 not."""
    import flowdsl
    from conftest import ROOT
    for name in ("a_hellodl", "b_nielsen"):
        m = flowdsl.load(str(ROOT / f"bench/nets/{name}.flow")).macs_per_sample()
        assert 32 * m >= blas.SPLIT_TRAIN_MIN > 8 * m, name


@IN_THREADS
@pytest.mark.parametrize("who", ["main", "pool"])
def test_a_failing_share_raises_its_error_and_leaves_nothing_waiting(two_threads, monkeypatch, who):
    """A share that fails between batchnorm's collectives: the other share, waiting in one, is
    released (BrokenBarrierError, not a hang), the caller gets the failing share's own error,
    and the next pass runs normally."""
    net = _net(NETS["bn_dropout"])
    x, y = _batch(net, 8)
    bn2 = net.model.layer("batchnorm2")
    real = type(bn2).forward_fused

    def flaky(self, xx, p, ctx, training, act, pool):   # the caller's share, or the pool's
        if self is bn2 and threading.current_thread().name.startswith("flowdsl-mm") == (who == "pool"):
            raise ValueError(f"share on the {who} thread failed")
        return real(self, xx, p, ctx, training, act, pool)
    monkeypatch.setattr(type(bn2), "forward_fused", flaky)
    out = {}

    def go():
        try:
            net.loss_grad(x, y)
        except Exception as e:   # noqa: BLE001 - the test inspects it
            out["err"] = e
    t = threading.Thread(target=go)
    t.start()
    t.join(60)
    assert not t.is_alive(), "a share was left waiting"
    assert isinstance(out.get("err"), ValueError) and who in str(out["err"])
    assert not blas._solo
    monkeypatch.setattr(type(bn2), "forward_fused", real)
    calls = count_splits(monkeypatch)
    loss, _ = net.loss_grad(x, y)
    assert calls == [(8, True)] and np.isfinite(loss)


@IN_THREADS
def test_shares_keep_the_callers_numpy_error_state(two_threads, monkeypatch):
    """numpy's error state is per thread: the pool's share must use the caller's, so that
    train.py's errstate(all="ignore") silences a diverging step there too, and "raise" raises."""
    text = "network = input(6) :: dense(4) :: dense(3) :: softmax"
    net = _net(text)
    x, y = _batch(net, 8)
    x[:] = 3e38                                   # the products overflow to inf
    seen = []
    real = net.loss_layer.loss

    def spy(z, yy):
        seen.append((threading.current_thread() is threading.main_thread(), np.geterr()["over"]))
        return real(z, yy)
    monkeypatch.setattr(net.loss_layer, "loss", spy)
    with np.errstate(all="ignore"):
        net.loss_grad(x, y)
    assert sorted(seen) == [(False, "ignore"), (True, "ignore")]
    seen.clear()
    with np.errstate(all="raise"), pytest.raises(FloatingPointError):
        net.loss_grad(x, y)


def test_training_through_the_split_is_deterministic_and_resumes_exactly(two_threads, tmp_path):
    """fit() with the split pass: bit-identical twice, and a run stopped at step 21 and resumed
    ends on exactly the weights and running statistics of the uninterrupted one."""
    import flowdsl
    from conftest import toy_set
    text = ("network = conv(8x8x1, filters=6, field=3, pad=1) :: batchnorm :: relu :: dropout(0.3) "
            ":: maxpool :: dense(2) :: softmax\n"
            "train { batch = 16  seed = 2  optimizer = adam(lr=0.01)  augment = [shift(1), noise(0.02)] }\n")
    x, y = toy_set(256, seed=1)
    calls = []
    real = netmod.Net._split_loss_grad

    def counted(self, *a):
        out = real(self, *a)
        calls.append(out is not None)
        return out
    netmod.Net._split_loss_grad, saved = counted, real
    try:
        full = flowdsl.parse(text)
        hf = full.fit(x, y, epochs=2, out_dir=str(tmp_path / "a"))
        assert calls and all(calls)
        again = flowdsl.parse(text)
        again.fit(x, y, epochs=2)
        np.testing.assert_array_equal(full.flat, again.flat)
        part = flowdsl.parse(text)
        part.fit(x, y, epochs=2, out_dir=str(tmp_path / "b"), callback=lambda step, loss: step == 21)
        resumed = flowdsl.parse(text)
        hr = resumed.fit(x, y, epochs=2, out_dir=str(tmp_path / "b"), resume=str(tmp_path / "b" / "last.npz"))
    finally:
        netmod.Net._split_loss_grad = saved
    np.testing.assert_array_equal(full.flat, resumed.flat)
    np.testing.assert_array_equal(full.state["batchnorm1"]["mean"], resumed.state["batchnorm1"]["mean"])
    assert hf["train_loss"] == hr["train_loss"] and hf["train_acc"][-1] > 0.8


def test_split_and_layer_by_layer_training_stay_close(two_threads, monkeypatch):
    """Ten SGD steps each way from the same start: the weights differ by float32 rounding only.
    (Not Adam: it scales a gradient that is zero but for rounding, such as a conv bias before
    batchnorm, to a full step whose sign is the rounding's.)"""
    text = NETS["bn_dropout"]
    nets = {s: _net(text, train="seed = 3  optimizer = sgd(lr=0.05)") for s in (False, True)}
    for split, net in nets.items():
        opt = Optimizer(net, net.model.train["optimizer"], 0.0)
        for step in range(10):
            x, y = _batch(net, 16, seed=step)
            _step(net, x, y, split, monkeypatch, seed=step)
            opt.step()
    a, b = nets[False].flat, nets[True].flat
    moved = np.abs(a - _net(text).flat).max()
    assert moved > 1e-3
    assert np.abs(a - b).max() < 1e-3 * moved


# ------------------------------------------------------------------------- the team's collectives
@pytest.mark.parametrize("spin", [0, 50, None])
def test_team_allreduce_sums_in_rank_order_on_every_thread(spin):
    """Three threads, 200 reductions each with uneven delays: every thread gets the same bits,
    the sum of the three contributions; spin 0 and 50 make waiters sleep, None is the default."""
    jit.numba()
    team = dist.Team(3)
    if spin is not None:
        team._bar.spin = spin
    rng = np.random.default_rng(0)
    vals = rng.standard_normal((3, 200, 5))
    got = np.zeros((3, 200, 5))

    def run(r):
        m = team.member(r)
        assert m.size == 3 and m.root == (r == 0)
        for i in range(200):
            if (i + r) % 17 == 0:
                time.sleep(0.002)
            a = vals[r, i].copy()
            out = m.allreduce(a)
            assert out is a
            got[r, i] = a
            if i % 50 == 0:
                m.barrier()
    ts = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts)
    want = (vals[0] + vals[1]) + vals[2]
    for r in range(3):
        np.testing.assert_array_equal(got[r], want)


@pytest.mark.parametrize("spin", [0, None])
def test_team_abort_releases_every_waiter(spin):
    jit.numba()
    team = dist.Team(3)
    if spin is not None:
        team._bar.spin = spin
    errs = []

    def wait(r):
        try:
            team.member(r).allreduce(np.ones(2))
        except threading.BrokenBarrierError:
            errs.append(r)
    ts = [threading.Thread(target=wait, args=(r,)) for r in (1, 2)]
    for t in ts:
        t.start()
    time.sleep(0.05)
    team.abort()
    for t in ts:
        t.join(10)
    assert not any(t.is_alive() for t in ts) and sorted(errs) == [1, 2]
    with pytest.raises(threading.BrokenBarrierError):   # later waits fail at once
        team.member(0).barrier()
