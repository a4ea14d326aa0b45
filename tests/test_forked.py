"""Split training in helper processes (flowdsl/forked.py): the shares of a training batch run in
forked helpers that share the parameters and gradients through shared memory. Their results
must be the thread split's bit for bit (tests/test_split_train.py checks both against the
layer-by-layer pass); a helper that fails, or dies, must surface as an error in the caller and
leave nothing waiting; the next step must fork fresh helpers; helpers must not outlive their
net."""
import gc
import os
import signal
import time

import numpy as np
import pytest
from conftest import SPLIT_NETS, count_splits

from flowdsl import blas, forked
from flowdsl.errors import FlowError
from flowdsl.model import build_text
from flowdsl.net import Net

pytestmark = pytest.mark.skipif(not forked.supported(), reason="helper processes need fork (Linux)")

NETS = SPLIT_NETS


@pytest.fixture
def split(two_threads, monkeypatch):
    """Two threads (conftest), every training pass splits, shares in helper processes."""
    monkeypatch.setattr(blas, "SPLIT_TRAIN_MIN", 0)
    monkeypatch.setenv("FLOWDSL_SPLIT", "procs")
    yield


def _net(name, seed=3):
    return Net(build_text(NETS[name] + "\ntrain { seed = 3 }", "<t>"), seed=seed)


def _batch(net, n, seed=0):
    rng = np.random.default_rng(seed)
    s = net.model.input_shape
    x = rng.standard_normal((n,) + (tuple(s[1:]) + s[:1] if len(s) == 3 else tuple(s))).astype(np.float32)
    if net.loss_layer.kind == "softmax":
        return x, rng.integers(0, net.loss_layer.out[0], n)
    return x, rng.standard_normal((n,) + tuple(net.loss_layer.out)).astype(np.float32)


def _steps(net, batches, mode, monkeypatch):
    """loss_grad over the batches with the shares in `mode`: [(loss, correct, gradient, state)]."""
    monkeypatch.setenv("FLOWDSL_SPLIT", mode)
    out = []
    for i, (x, y) in enumerate(batches):
        net.rng = np.random.default_rng([i, 4])
        loss, correct = net.loss_grad(x, y)
        out.append((loss, correct, net.gflat.copy(),
                    {f"{k}.{p}": v.copy() for k, d in net.state.items() for p, v in d.items()},
                    net.rng.random()))
        net.flat -= np.float32(0.01) * net.gflat   # a step, so the helpers must see new weights
    return out


@pytest.mark.parametrize("name", sorted(NETS))
def test_helpers_give_the_thread_split_bit_for_bit(split, monkeypatch, name):
    """Loss, correct count, gradient, running statistics and the generator's end state of four
    steps (batches of 9, 4 and 5 rows: helpers re-forked for larger shares) equal the thread
    split's exactly; the parameters the caller changes between steps reach the helper."""
    a, b = _net(name), _net(name)
    batches = [_batch(a, n, seed=n) for n in (9, 9, 6, 17)]
    want = _steps(a, batches, "threads", monkeypatch)
    calls = count_splits(monkeypatch)
    got = _steps(b, batches, "procs", monkeypatch)
    assert calls == [(9, True), (9, True), (6, True), (17, True)]
    assert b._crew is not None and b._crew.rows == 9     # grew for the batch of 17
    for w, g in zip(want, got):
        assert (g[0], g[1], g[4]) == (w[0], w[1], w[4])
        assert np.abs(w[2]).max() > 0
        np.testing.assert_array_equal(g[2], w[2])
        for k in w[3]:
            np.testing.assert_array_equal(g[3][k], w[3][k])
    np.testing.assert_array_equal(a.flat, b.flat)


def test_shared_zeros_are_shared_with_a_forked_process():
    a = forked.shared_zeros(5)
    assert a.dtype == np.float32 and a.shape == (5,) and not a.any() and a.flags.writeable
    pid = os.fork()
    if pid == 0:
        a[:] = 7
        os._exit(0)
    os.waitpid(pid, 0)
    assert (a == 7).all()


def _pids(net):
    return list(net._crew.pids[1:]) if net._crew is not None else []


def _gone(pid, wait=5.0):
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def _in_share(monkeypatch, net, in_helper, action):
    """Run action() in the middle of a step (between batchnorm2's collectives), in the helper's
    share (in_helper) or the caller's; returns a function that undoes it."""
    bn2 = net.model.layer("batchnorm2")
    real = type(bn2).forward_fused
    caller = os.getpid()

    def patched(self, xx, p, ctx, training, act, pool):
        if self is bn2 and (os.getpid() != caller) == in_helper:
            action()
        return real(self, xx, p, ctx, training, act, pool)
    monkeypatch.setattr(type(bn2), "forward_fused", patched)
    return lambda: monkeypatch.setattr(type(bn2), "forward_fused", real)


def _raise(e):
    raise e


def test_a_failing_helper_raises_its_error_in_the_caller(split, monkeypatch):
    """A helper whose share raises between batchnorm's collectives: the caller, waiting in one,
    is released and raises the helper's own exception; the helper is gone; the next step forks
    a new one and runs normally."""
    net = _net("bn_dropout")
    x, y = _batch(net, 8)
    net.loss_grad(x, y)
    first = _pids(net)
    assert len(first) == 1
    undo = _in_share(monkeypatch, net, True, lambda: _raise(ValueError("the helper's share failed")))
    net.loss_grad(x, y)        # the helper was forked before the patch: it runs the real code
    net._crew.close()          # a helper forked from here on has the patch
    net._crew = None
    with pytest.raises(ValueError, match="the helper's share failed"):
        net.loss_grad(x, y)
    assert net._crew is None and _gone(first[0])
    assert not blas._solo
    undo()
    loss, _ = net.loss_grad(x, y)
    assert np.isfinite(loss) and len(_pids(net)) == 1


def test_a_helper_that_dies_is_reported_and_replaced(split, monkeypatch):
    """A helper killed in the middle of a step (here by itself; in life the out-of-memory killer)
    is noticed by the caller waiting in a collective: a FlowError that says so, not a hang."""
    net = _net("bn_dropout")
    x, y = _batch(net, 8)
    undo = _in_share(monkeypatch, net, True, lambda: os.kill(os.getpid(), signal.SIGKILL))
    t0 = time.monotonic()
    with pytest.raises(FlowError, match="helper process .* ended during a step .*signal 9"):
        net.loss_grad(x, y)
    assert time.monotonic() - t0 < 10
    assert net._crew is None
    undo()
    loss, _ = net.loss_grad(x, y)
    assert np.isfinite(loss)


def test_the_callers_failure_or_interrupt_stops_the_helpers(split, monkeypatch):
    """The caller's own share raising (or Ctrl-C arriving in it): the helper, waiting in a
    collective, is killed, the caller's exception propagates, and the next step forks anew."""
    net = _net("bn_dropout")
    x, y = _batch(net, 8)
    net.loss_grad(x, y)
    old = _pids(net)
    undo = _in_share(monkeypatch, net, False, lambda: _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        net.loss_grad(x, y)
    assert net._crew is None and _gone(old[0]) and not blas._solo
    undo()
    assert np.isfinite(net.loss_grad(x, y)[0])
    assert _pids(net) and _pids(net) != old


def test_helpers_use_the_callers_numpy_error_state(split):
    """Only the helper's rows overflow: with errstate(all="raise") the helper's FloatingPointError
    is the caller's; with "ignore" nothing is raised anywhere."""
    text = "network = input(6) :: dense(4) :: dense(3) :: softmax\ntrain { seed = 3 }"
    net = Net(build_text(text, "<t>"), seed=3)
    x = np.ones((8, 6), np.float32)
    y = np.zeros(8, np.int64)
    x[4:] = 3e38                                  # the helper's share (rows 4..7)
    with np.errstate(all="ignore"):
        net.loss_grad(x, y)
    with np.errstate(all="raise"), pytest.raises(FloatingPointError):
        net.loss_grad(x, y)
    with np.errstate(all="raise"):
        x[4:] = 1
        assert np.isfinite(net.loss_grad(x, y)[0])


def test_helpers_end_with_their_net(split):
    net = _net("branches")
    x, y = _batch(net, 8)
    net.loss_grad(x, y)
    pids = _pids(net)
    assert pids and not _gone(pids[0], wait=0)
    del net
    gc.collect()
    assert _gone(pids[0])


def test_split_setting_is_checked_and_threads_still_work(split, monkeypatch):
    net = _net("branches")
    x, y = _batch(net, 8)
    monkeypatch.setenv("FLOWDSL_SPLIT", "forks")
    with pytest.raises(FlowError, match="FLOWDSL_SPLIT must be procs or threads. Received: forks"):
        net.loss_grad(x, y)
    monkeypatch.setenv("FLOWDSL_SPLIT", "threads")
    calls = count_splits(monkeypatch)
    net.loss_grad(x, y)
    assert calls == [(8, True)] and net._crew is None     # blas.split: the threads


def test_a_failed_fork_falls_back_to_threads(split, monkeypatch):
    """fork refused (a process limit, no memory to map the child): the shares run in threads,
    with the same result, and the net does not try again."""
    net, ref = _net("bn_dropout"), _net("bn_dropout")
    x, y = _batch(net, 8)
    want = _steps(ref, [(x, y)], "threads", monkeypatch)
    monkeypatch.setenv("FLOWDSL_SPLIT", "procs")
    tries = []

    def refused():
        tries.append(1)
        raise OSError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(os, "fork", refused)
    calls = count_splits(monkeypatch)
    got = _steps(net, [(x, y), (x, y)], "procs", monkeypatch)
    assert tries == [1] and net._crew is None
    assert calls == [(8, False), (8, True), (8, True)]   # the forked attempt, then blas.split twice
    np.testing.assert_array_equal(got[0][2], want[0][2])


def test_fit_ends_its_helpers(split, monkeypatch):
    """A helper holds the memory of its last step: fit releases it when it returns."""
    from conftest import toy_set
    import flowdsl
    net = flowdsl.parse("network = conv(8x8x1, filters=6, field=3, pad=1) :: batchnorm :: relu :: maxpool "
                        ":: dense(2) :: softmax\ntrain { batch = 16  seed = 2 }")
    x, y = toy_set(64, seed=1)
    seen = []
    real = Net._forked_loss_grad

    def spy(self, *a):
        out = real(self, *a)
        seen.extend(_pids(self))
        return out
    monkeypatch.setattr(Net, "_forked_loss_grad", spy)
    net.fit(x, y, epochs=1)
    assert seen and net._crew is None and _gone(seen[0])


def test_sigterm_to_the_process_group_stops_training_gracefully(tmp_path):
    """`kill -TERM -PGID` (or `pkill -f`, which matches the helper too: it has the caller's
    command line) during split training: the helper ignores it, the caller stops at the step
    boundary and saves, exit status 143, no error about the helper."""
    import subprocess
    import sys
    from conftest import ENV, ROOT, save_npz, toy_set
    x, y = toy_set(320, seed=3)
    save_npz(tmp_path / "train.npz", x[:256], y[:256])
    save_npz(tmp_path / "test.npz", x[256:], y[256:])
    f = tmp_path / "bars.flow"
    f.write_text("network = conv(8x8x1, filters=6, field=3, pad=1) :: batchnorm :: relu :: maxpool "
                 ":: dense(2) :: softmax\ntrain {\n  data = npz(\"train.npz\")\n  test = npz(\"test.npz\")\n"
                 "  batch = 16\n  epochs = 400\n  seed = 1\n}\n")
    out = tmp_path / "run"
    script = ("import sys; from flowdsl import blas, jit; jit.numba(); jit.threads(2); "
              "blas.SPLIT_TRAIN_MIN = 0; from flowdsl.cli import main; "
              f"sys.exit(main(['train', {str(f)!r}, '--out', {str(out)!r}]))")
    p = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=dict(ENV, FLOWDSL_SPLIT="procs"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "log.csv").exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    group = subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True).stdout.split()
    helpers = [int(h) for h in group if int(h) != p.pid]
    assert helpers, group                   # the caller's helper, in its process group
    for h in helpers:                       # a helper alone: it ignores the signal
        os.kill(h, signal.SIGTERM)
    assert not any(_gone(h, wait=0.5) for h in helpers)
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "helper" not in err and "Traceback" not in err, err
    assert (out / "last.npz").exists()
    assert all(_gone(h) for h in helpers)


def test_a_helper_that_hangs_is_an_error_not_a_hang(split, monkeypatch):
    """A helper alive but stuck (a lock held for good, say) in the middle of a step: after
    forked.STALL seconds in one collective the caller gives up with a FlowError that says so;
    the next step forks a fresh helper."""
    net = _net("bn_dropout")
    x, y = _batch(net, 8)
    undo = _in_share(monkeypatch, net, True, lambda: time.sleep(3600))
    monkeypatch.setattr(forked, "STALL", 0.5)
    t0 = time.monotonic()
    with pytest.raises(FlowError, match=r"did not answer for \d+ s \(alive but stuck\)"):
        net.loss_grad(x, y)
    assert time.monotonic() - t0 < 10 and net._crew is None
    undo()
    assert np.isfinite(net.loss_grad(x, y)[0])


def test_fit_forks_its_helpers_before_the_first_step(split, monkeypatch):
    """fit forks the helpers before its prefetch thread starts (a fork copies only the calling
    thread: a lock another thread held would stay held in the helper)."""
    import threading
    from conftest import toy_set
    import flowdsl
    net = flowdsl.parse("network = conv(8x8x1, filters=6, field=3, pad=1) :: batchnorm :: relu :: maxpool "
                        ":: dense(2) :: softmax\ntrain { batch = 16  seed = 2 }")
    x, y = toy_set(64, seed=1)
    forks = []
    real = forked.Crew.__init__

    def spy(self, *a):
        forks.append(sorted(t.name for t in threading.enumerate()))
        real(self, *a)
    monkeypatch.setattr(forked.Crew, "__init__", spy)
    monkeypatch.setenv("FLOWDSL_PREFETCH", "thread")    # (the default for streamed data)
    net.fit(x, y, epochs=1)
    assert len(forks) == 1 and "flowdsl-prefetch" not in forks[0], forks
