"""Split training in processes: the shares of a training batch (Net._split_loss_grad) run in
forked helper processes instead of threads of this one.

Why: two threads of one process running a share each contend for the GIL. Every kernel call and
every product lets it go and takes it back; when the other thread holds it then, the taker
sleeps until it is let go, and a wake-up on a virtual machine takes ~0.05-0.1 ms. Measured on
2 cores (2026-12-07): the two shares of one split step ran 1.25-1.55x slower than one share
alone, while two *processes* each training the same share ran at 0.97-1.15x their speed alone.

How: Net.flat and Net.gflat live in anonymous shared memory (shared_zeros), so a helper forked
from the training process reads the parameters the optimizer has just written and adds its
part of the gradient sum into the same buffer, with no copies. Each helper (share j >= 1) has
its own shared gradient buffer and input rows; the processes meet through a Crew's barrier
(atomic counters in shared memory, spun on as in flowdsl/_spin.py) and its allreduce slots
(batchnorm's statistics), the same collectives the threads' dist.Team offers, summed in rank
order: the result is the thread split's bit for bit. The caller sends each step's bounds, labels,
generator state and numpy error state over a pipe.

Failures: a helper that raises sends its exception back and the caller raises it; a helper that
dies (killed, out of memory) is noticed by the caller's barrier within ~10 ms and reported; any
failure, and Ctrl-C in the caller, kills the helpers, and the next step forks new ones. Helpers
ignore SIGINT, SIGTERM and SIGHUP (the caller decides, and stops at a step boundary), die with
the thread that forked them (PR_SET_PDEATHSIG), are named flowdsl-helper in top and ps, and are
killed when their Net is collected or fit returns.

Only on Linux (fork is unsafe on macOS, absent on Windows); FLOWDSL_SPLIT=threads keeps the
shares in threads (the previous design). A helper runs serial kernels only (blas.solo), so
numba's OpenMP pool, which is not fork-safe, is never entered in it."""
from __future__ import annotations

import copy
import math
import mmap
import os
import signal
import sys
import threading
import time
import warnings
import weakref

import numpy as np

from .errors import FlowError

LINE = 8             # int64s per barrier counter (one cache line each)
SPIN = 300_000       # rounds a waiter spins before it naps (~0.45 ms, as flowdsl/_spin.py)
NAP = 50e-6          # seconds between polls after that
CHECK = 0.01         # seconds between checks that the other processes are alive
STALL = 300.0        # seconds the caller waits in one collective for a helper that is alive but
                     # silent (a lock held forever in it, say) before it gives up with an error
IDLE = 2_000_000     # rounds a helper spins for the next step's doorbell before it sleeps on its
                     # pipe (~3 ms: the caller's optimizer step and next batch come sooner; a
                     # sleeping helper took 0.2-0.5 ms to wake)
BOX = 1 << 16        # bytes of a step's message in shared memory (larger ones go by the pipe)


def supported():
    """Whether this platform can fork helpers (Linux)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def wanted():
    """Whether split training runs its shares in processes: FLOWDSL_SPLIT (procs, the default
    where supported; threads)."""
    v = os.environ.get("FLOWDSL_SPLIT", "").strip().lower()
    if v not in ("", "procs", "threads"):
        raise FlowError(f"FLOWDSL_SPLIT must be procs or threads. Received: {v}")
    return v != "threads" and supported()


def shared_zeros(n, dtype=np.float32):
    """n zeros in anonymous shared memory (MAP_SHARED): a process forked later reads and writes
    the same bytes. Plain np.zeros where helpers cannot be forked."""
    dtype = np.dtype(dtype)
    if not supported():
        return np.zeros(n, dtype)
    mm = mmap.mmap(-1, max(1, n * dtype.itemsize))   # zero-filled; freed with its last array
    return np.frombuffer(mm, dtype, count=n)


class BrokenCrew(threading.BrokenBarrierError):
    """Another process of the crew failed or died: this step is abandoned."""


class Member:
    """One process's view of its Crew: the collectives of a data-parallel rank (dist.Solo's)."""

    def __init__(self, crew, rank):
        self.crew, self.rank, self.size, self.local_size = crew, rank, crew.t, crew.t
        self._turn = 0
        self._k = 0

    @property
    def root(self):
        return self.rank == 0

    def barrier(self):
        from ._spin import _arrive, _spin
        c, t = self.crew.counts, self.crew.t
        self._k += 1
        k = self._k
        _arrive(c, self.rank, k)
        s = _spin(c, t, k, SPIN)
        start = last = time.monotonic()
        while s == 0:
            time.sleep(NAP)
            s = _spin(c, t, k, 1000)
            if s == 0 and time.monotonic() - last > CHECK:
                last = time.monotonic()
                if not self.crew.others_alive(self.rank):
                    self.crew.abort()
                    s = -1
                elif self.rank == 0 and last - start > STALL:
                    self.crew.stalled = last - start
                    self.crew.abort()
                    s = -1
        if s < 0:
            raise BrokenCrew

    def allreduce(self, a):
        """Sum a over the crew, in place, in rank order (every process gets the same bits), as
        dist._Member.allreduce: two slot sets used in turn, one barrier a call."""
        slots = self.crew.slots[self._turn]
        self._turn ^= 1
        nb = a.nbytes
        if nb > slots.shape[1]:
            raise FlowError(f"internal: a collective of {nb} bytes exceeds the crew's {slots.shape[1]}")
        flat = np.ascontiguousarray(a).reshape(-1)
        slots[self.rank, :nb].view(a.dtype)[...] = flat
        self.barrier()
        total = slots[0, :nb].view(a.dtype).copy()
        for r in range(1, self.size):
            total += slots[r, :nb].view(a.dtype)
        a[...] = total.reshape(a.shape)
        return a


class Crew:
    """The helper processes of one Net for t shares of up to `rows` samples each: shares 1..t-1
    run in helpers, share 0 in the caller."""

    def __init__(self, net, t, rows):
        self.t, self.rows = t, rows
        self.parent = os.getpid()
        sample = net._sample_shape()
        width = max([1] + [int(l.out[0]) for l in net.layers if getattr(l, "out", None)])
        cap = 8 * (2 * width + 8)   # batchnorm's sums: c + 1 float64, or 2c float32
        # counters: t barrier counts, the abort flag, then per helper its doorbell and message length
        self.counts = shared_zeros((3 * t + 1) * LINE, np.int64)
        self.boxes = shared_zeros(t * BOX, np.uint8).reshape(t, BOX)
        self.seq = 0
        self.slots = shared_zeros(2 * t * cap, np.uint8).reshape(2, t, cap)
        self.outs = shared_zeros(2 * t, np.float64).reshape(t, 2)
        self.grads = [net.gflat] + [shared_zeros(net.gflat.size) for _ in range(1, t)]
        self.xs = [None] + [shared_zeros(rows * math.prod(sample)).reshape((rows,) + sample)
                            for _ in range(1, t)]
        self.pids, self.conns, self.bells = [0], [None], [None]
        self.ended = {}
        self.stalled = None
        self.member = Member(self, 0)
        try:
            for j in range(1, t):
                self._fork(net, j)
        except BaseException:
            self.close()
            raise
        self._final = weakref.finalize(self, _kill, self.parent, list(self.pids[1:]),
                                       list(self.conns[1:]) + list(self.bells[1:]), self.ended)

    def _fork(self, net, j):
        import multiprocessing.connection as mpc
        mine, theirs = mpc.Pipe()
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():   # (3.12+ warns about forking a process with threads)
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:   # the helper
            code = 0
            try:
                mine.close()
                os.close(w)
                _helper(net, self, j, theirs, r)
            except BaseException:   # noqa: BLE001 - nothing may escape into the caller's code
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        os.close(r)
        self.pids.append(pid)
        self.conns.append(mine)
        self.bells.append(w)

    # --- the caller's side ----------------------------------------------------------------------
    def alive(self):
        """Whether every helper is still running (a dead one is reaped: its status kept in
        self.ended)."""
        for pid in self.pids[1:]:
            if pid in self.ended:
                return False
            try:
                got, st = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self.ended[pid] = None
                return False
            if got:
                self.ended[pid] = st
                return False
        return True

    def others_alive(self, rank):
        if rank == 0:
            return self.alive()
        return os.getppid() == self.parent

    def abort(self):
        from ._spin import _arrive
        _arrive(self.counts, self.t, 1)

    def bell(self, j):
        """Where helper j's doorbell and message length are in counts."""
        return (self.t + 1 + 2 * (j - 1)) * LINE, (self.t + 2 + 2 * (j - 1)) * LINE

    def send(self, msgs):
        """Start a step: msgs[j - 1] (pickled bytes) for helper j. The message goes into the
        helper's box (or its pipe when larger), a byte into its bell pipe (which wakes it if it
        sleeps), then its doorbell counter is raised (a helper spinning on it starts at once)."""
        from ._spin import _arrive
        self.seq += 1
        for j, msg in enumerate(msgs, 1):
            at, length = self.bell(j)
            if len(msg) <= BOX:
                self.boxes[j, :len(msg)] = np.frombuffer(msg, np.uint8)
                self.counts[length] = len(msg)
            else:
                self.counts[length] = -1
                self.conns[j].send_bytes(msg)
            os.write(self.bells[j], b"\0")
            _arrive(self.counts, at // LINE, self.seq)

    def failure(self):
        """The exception a helper sent back, or one saying that a helper died or stalled."""
        if self.stalled:
            return FlowError(f"a helper process of split training did not answer for {self.stalled:.0f} s "
                             "(alive but stuck); FLOWDSL_SPLIT=threads runs the shares in threads instead")
        for j in range(1, self.t):
            c = self.conns[j]
            try:
                if c.poll(1.0):
                    kind, what = c.recv()
                    if kind == "error":
                        return what
            except (EOFError, OSError):
                pass
        self.alive()
        status = []
        for st in self.ended.values():
            if st is not None and os.WIFSIGNALED(st):
                sig = os.WTERMSIG(st)
                status.append(f"killed by signal {sig}" + (" (perhaps the kernel's out-of-memory killer)"
                                                           if sig == signal.SIGKILL else ""))
            elif st is not None:
                status.append(f"exit status {os.WEXITSTATUS(st)}")
        return FlowError("a helper process of split training ended during a step"
                         + (f" ({', '.join(status)})" if status else "")
                         + "; FLOWDSL_SPLIT=threads runs the shares in threads instead")

    def close(self):
        final = getattr(self, "_final", None)
        if final is not None:
            final()
        else:
            _kill(self.parent, self.pids[1:], self.conns[1:] + self.bells[1:], self.ended)


def _kill(owner, pids, conns, ended):
    """Close the pipes to the helpers and kill the ones not reaped yet (`ended`: a reaped pid
    may already name another process): only in the process that forked them (a helper holds
    copies of every Crew made before it, which its own collector may collect)."""
    if os.getpid() != owner:
        return
    for c in conns:
        try:
            os.close(c) if isinstance(c, int) else c.close()
        except OSError:
            pass
    for pid in pids:
        if pid in ended:
            continue
        ended[pid] = None
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _die_with_parent():
    """PR_SET_PDEATHSIG: SIGKILL this helper when the thread that forked it ends; and its name
    (PR_SET_NAME, what top and ps -o comm show) flowdsl-helper."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
        libc.prctl(15, ctypes.c_char_p(b"flowdsl-helper"), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _helper(net, crew, j, conn, bell):
    """A helper's life: run share j of each step the caller rings for, until its pipe closes."""
    import gc
    import pickle
    gc.freeze()   # what the caller had is the caller's: never collected (or flushed, closed) here
    # the caller decides when to stop: Ctrl-C, a terminal's hang-up or `kill` sent to the whole
    # process group (`pkill -f` matches a helper too: it has the caller's command line) reach
    # the caller, which stops at the next step boundary and saves; the helper ends with it
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != crew.parent:   # the caller ended before prctl took effect
        return
    from . import blas
    from ._spin import _await
    from .net import generator_from_state
    blas._solo = True          # serial kernels, products on this thread: never numba's pool
    blas._pool = None
    member = Member(crew, j)
    states = copy.deepcopy(net.state)
    gviews = net._views(crew.grads[j])
    at, length = crew.bell(j)
    seq = 0
    while True:
        seq += 1
        s = _await(crew.counts, at, seq, crew.t, IDLE)
        try:
            if not os.read(bell, 1):   # (at once when the doorbell rang: its byte came first)
                return                 # the caller closed the pipe
        except OSError:
            return
        while s == 0:
            s = _await(crew.counts, at, seq, crew.t, SPIN)
        if s < 0:
            return
        k = int(crew.counts[length])
        msg = pickle.loads(crew.boxes[j, :k].tobytes() if k >= 0 else conn.recv_bytes())
        lo, hi, n, whole, rng_state, y, errs, gcut = msg
        try:
            with np.errstate(**errs):
                got = net._share_pass(j, lo, hi, n, whole, crew.xs[j][:hi - lo], y, member,
                                      generator_from_state(rng_state), states, gviews, crew.grads, gcut)
            crew.outs[j] = got
            member.barrier()   # done: the caller may read outs and the gradient
        except BrokenCrew:     # the caller failed: it kills this helper
            return
        except BaseException as e:   # noqa: BLE001 - sent back, raised by the caller
            crew.abort()
            try:
                conn.send(("error", e))
            except Exception:   # noqa: BLE001 - an exception that does not pickle
                conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
            return
