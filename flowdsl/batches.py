"""Serving batches: compact samples (uint8, uint16 or float32, in RAM or in a cache file read with
pread) turned into float32 batches, and a prefetch thread that reads the next batches of a
training run from the cache file while the current step runs (fetch); scaling to float32 and
augmenting (scale) stay on the training thread.

Scaling: a uint8 value v becomes float32(v) / float32(255) (uint16: / 65535), computed once into a
lookup table, so a batch is bit-identical to dividing the whole data set up front (what flowdsl
did before it kept samples compact)."""
from __future__ import annotations

import os
import queue
import threading

import numpy as np

from .jit import kernel

_LUTS = {}


def lut(dtype):
    """float32 values of every code of an unsigned integer dtype (uint8: v / 255)."""
    dtype = np.dtype(dtype)
    t = _LUTS.get(dtype)
    if t is None:
        top = np.float32(np.iinfo(dtype).max)
        t = _LUTS[dtype] = np.arange(int(top) + 1, dtype=np.float32) / top
    return t


class CacheFile:
    """A flat file of M samples of `shape` and `dtype`, read a sample at a time with pread: the
    file's pages stay in the system's page cache, not in this process's resident memory (a
    memory map would count them there, and a 6 GB cache would look like a 6 GB process)."""

    fd = -1

    def __init__(self, path, count, shape, dtype):
        self.path = str(path)
        self.shape = (int(count),) + tuple(shape)
        self.dtype = np.dtype(dtype)
        self.sample_bytes = int(np.prod(shape)) * self.dtype.itemsize
        self.fd = os.open(self.path, os.O_RDONLY)

    @property
    def nbytes(self):
        return self.shape[0] * self.sample_bytes

    def __len__(self):
        return self.shape[0]

    def read(self, rows, out=None):
        """The samples `rows` as an array (len(rows),) + shape of the file's dtype."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows),) + self.shape[1:], self.dtype) if out is None else out
        flat = out.reshape(len(rows), -1).view(np.uint8)
        b = self.sample_bytes
        for j in np.argsort(rows, kind="stable"):   # in file order: sequential on a disk
            r = int(rows[j])
            got = os.preadv(self.fd, [memoryview(flat[j])], r * b)
            if got != b:
                raise OSError(f"{self.path}: short read at sample {r} ({got} of {b} bytes); the cache file "
                              f"was truncated")
        return out

    def load(self):
        """The whole file in RAM."""
        return np.fromfile(self.path, self.dtype).reshape(self.shape)

    def close(self):
        fd, self.fd = self.fd, -1   # once only: a second close could hit a reused descriptor number
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self):
        self.close()


class LoadingFile(CacheFile):
    """A cache file being copied into RAM by a background thread: until the copy is complete,
    batches are read from the file (as CacheFile does); from then on they are served from the
    array. The bytes are the same either way, so a run gives the same result whenever the copy
    finishes; what it buys is that training starts at once instead of after reading a 6 GB file
    (7.5 s here for 30,000 images at 256x256x3)."""

    CHUNK = 32 << 20

    def __init__(self, path, count, shape, dtype):
        super().__init__(path, count, shape, dtype)
        self.array = np.empty(self.shape, self.dtype)
        self.done = threading.Event()
        self.error = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._copy, daemon=True, name="flowdsl-load")
        self.thread.start()

    def _copy(self):
        flat = self.array.reshape(-1).view(np.uint8)
        pos, total = 0, flat.size
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                while pos < total and not self._stop.is_set():
                    got = os.preadv(fd, [memoryview(flat[pos:pos + self.CHUNK])], pos)
                    if got <= 0:
                        raise OSError(f"{self.path}: short read at byte {pos:,} of {total:,}; the cache "
                                      f"file was truncated")
                    pos += got
            finally:
                os.close(fd)
        except OSError as e:
            self.error = e
        if pos >= total:
            self.done.set()

    @property
    def loaded(self):
        return self.done.is_set()

    def wait(self):
        """The whole array once the copy is complete (raises what stopped the copy)."""
        while not self.done.wait(0.05):
            if self.error is not None:
                raise self.error
        return self.array

    def close(self):
        self._stop.set()
        super().close()


def fetch(store, rows):
    """(source array, rows of it): the compact samples of a batch. For a CacheFile the samples
    are read from the file (I/O only: the part of a batch worth doing in a prefetch thread);
    for an array in RAM nothing is copied."""
    rows = np.asarray(rows, np.int64)
    if isinstance(store, LoadingFile) and store.loaded:
        return store.array, rows
    if isinstance(store, CacheFile):
        return store.read(rows), np.arange(len(rows), dtype=np.int64)
    return store, rows


def scale(src, rows, shape):
    """float32 batch of the compact samples src[rows] (codes through the lookup table)."""
    n = len(rows)
    out = np.empty((n,) + tuple(shape), np.float32)
    if n == 0:
        return out
    src = src.reshape(src.shape[0], -1)
    dst = out.reshape(n, -1)
    if src.dtype == np.float32:
        _gather_f32(src, rows, dst)
    else:
        _gather_lut(src, rows, dst, lut(src.dtype))
    return out


@kernel(parallel=False)
def _gather_lut(src, rows, dst, table):
    """dst[i] = table[src[rows[i]]]: integer codes to float32 (serial: it runs beside training's
    parallel kernels in the prefetch thread, with the GIL released)."""
    k = src.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        for q in range(k):
            dst[i, q] = table[src[r, q]]


@kernel(parallel=False)
def _gather_f32(src, rows, dst):
    k = src.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        for q in range(k):
            dst[i, q] = src[r, q]


def prefetcher(streamed):
    """The class that fetches a training run's batches: Prefetch (a background thread, which
    overlaps reads that wait on the disk with the step) for data streamed from the cache, Direct
    (on the training thread, between steps) for data held in RAM, where fetching copies nothing.
    The thread only reads (pread releases the GIL and uses little CPU): a thread that also scaled
    and augmented took CPU from numba's workers on a 2-core machine, where each parallel kernel
    waits for its slowest worker (the glasses net lost ~20% that way; docs/data.md).
    FLOWDSL_PREFETCH=thread|inline overrides the choice."""
    mode = os.environ.get("FLOWDSL_PREFETCH", "auto").strip().lower()
    if mode == "thread":
        return Prefetch
    if mode == "inline":
        return Direct
    return Prefetch if streamed else Direct


class Direct:
    """Prefetch's interface without a thread: get(step) runs make(step) on the calling thread.
    For data held in RAM, where a batch costs little to gather: a third thread beside numba's
    workers on a 2-core machine slowed the glasses net's training by ~20% (interleaved)."""

    def __init__(self, make, start, stop, depth=2):
        self.make = make

    def get(self, step):
        return self.make(step)

    def close(self):
        pass


class Prefetch:
    """Runs make(step) for steps start, start+1, ... < stop in a background thread, at most
    `depth` steps ahead; get(step) returns make(step)'s result in order, or raises what make
    raised. close() stops the thread (also on Ctrl-C and errors: the thread is a daemon and
    never blocks the process from exiting)."""

    def __init__(self, make, start, stop, depth=2):
        self.q = queue.Queue(maxsize=depth)
        self.stop_event = threading.Event()
        self.next = start
        self.thread = threading.Thread(target=self._run, args=(make, start, stop), daemon=True,
                                       name="flowdsl-prefetch")
        self.thread.start()

    def _run(self, make, start, stop):
        for step in range(start, stop):
            if self.stop_event.is_set():
                return
            try:
                item = (step, make(step), None)
            except BaseException as e:  # handed to the consumer, raised there
                item = (step, None, e)
            while not self.stop_event.is_set():
                try:
                    self.q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def get(self, step):
        while True:
            try:
                got, value, err = self.q.get(timeout=0.5)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.q.empty():
                    raise RuntimeError("the prefetch thread stopped unexpectedly") from None
        if err is not None:
            raise err
        assert got == step, (got, step)
        return value

    def close(self):
        self.stop_event.set()
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass
        self.thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
