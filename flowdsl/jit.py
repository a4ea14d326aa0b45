"""The only place numba is configured. Kernels are declared with @kernel and compiled lazily on
first use, so importing flowdsl (and `flowdsl check`) never imports numba.

Threads: numba's OpenMP workers and OpenBLAS's workers must not fight over the cores (measured
here: 10-40x slower steps). Numba runs the elementwise/gather kernels; numpy's BLAS the matrix
products, single-threaded, split across flowdsl's own sleeping threads (flowdsl/blas.py). We set
OMP_WAIT_POLICY=passive before numba loads, so numba's idle workers sleep instead of spinning.
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
import types

FLAGS = dict(cache=True, fastmath={"reassoc", "contract", "arcp", "nsz"}, error_model="numpy",
             boundscheck=False, nogil=True)

_numba = None


def _keep_freed_memory():
    """Ask glibc to serve large blocks from its heap and keep freed memory, instead of a fresh
    mmap per array: every training step allocates the same big buffers (im2col columns,
    activations), and a fresh mapping costs a page fault per 4 KB on first touch. Measured on
    net B (batch 64, 2 threads): 29.4 -> 21.7 ms per step. FLOWDSL_SYSTEM_MALLOC=1 opts out."""
    if os.environ.get("FLOWDSL_SYSTEM_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 or mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 and ok)


def _setup_env():
    _keep_freed_memory()
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    if "NUMBA_CACHE_DIR" not in os.environ and os.environ.get("FLOWDSL_NO_USER_CACHE") != "1":
        # numba caches next to the source; a read-only install needs a user directory instead.
        from . import __version__
        pkg_dir = os.path.dirname(os.path.abspath(__file__))
        cache_dir = os.path.join(pkg_dir, "__pycache__")
        if not _writable(cache_dir):
            base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            user = os.path.join(base, f"flowdsl-{__version__}-numba")
            try:
                os.makedirs(user, exist_ok=True)
                if not _writable(user):
                    raise OSError
            except OSError:
                user = os.path.join(tempfile.gettempdir(), f"flowdsl-{__version__}-numba-{os.getuid()}")
                os.makedirs(user, exist_ok=True)
            os.environ["NUMBA_CACHE_DIR"] = user


def _writable(d):
    try:
        os.makedirs(d, exist_ok=True)
        probe = os.path.join(d, f".flowdsl-probe-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
        return True
    except OSError:
        return False


def numba():
    global _numba
    if _numba is None:
        _setup_env()
        import numba as nb
        _numba = nb
        threads(None)
    return _numba


class _Lazy:
    """A kernel not yet compiled. On the first call every lazy kernel of the same module is
    handed to numba.njit and replaces itself in the module's globals, so kernels may call one
    another (numba must see dispatchers, not these wrappers; only serial kernels are called
    from kernels)."""

    def __init__(self, fn, parallel):
        self.py_func = fn
        self.parallel = parallel
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self.compiled = None

    def __call__(self, *args):
        if self.compiled is None:
            compile_module(self.py_func.__module__)
        return self.compiled(*args)

    @property
    def serial(self):
        """The serial version (a parallel kernel's twin; a serial kernel itself)."""
        if self.compiled is None:
            compile_module(self.py_func.__module__)
        return getattr(self.compiled, "serial", self.compiled)


SERIAL_BELOW = 1 << 17  # a parallel kernel whose array arguments hold fewer elements than this
                        # runs on the calling thread (see Parallel; nets A and B at batch 1:
                        # 1 << 15: 2,623 and 4,195 img/s, 1 << 17: 4,811 and 8,479, 1 << 19:
                        # 4,602 and 8,649; batch 16 and 256 within 5% of each other)


class Parallel:
    """A parallel kernel and its serial twin, chosen per call by the size of the work.

    Waking numba's sleeping OpenMP worker costs 50-130 us here (OMP_WAIT_POLICY=passive, a
    virtual machine: measured with a 64-element kernel, 68 us parallel, 0.2 us serial), more
    than most kernels of a small batch take. Letting the workers spin instead (GOMP_SPINCOUNT)
    made the launch cheap but the spinning workers took the core from flowdsl's BLAS threads
    (net B's conv2 in training 1.3 -> 2.0 ms). So a call whose array arguments hold fewer than
    SERIAL_BELOW elements in all runs the serial twin: the same function compiled with
    parallel=False (prange runs as range), under its own name so that numba's cache (which
    keys entries by name, not by flags) keeps the two apart. One thread: always serial."""

    def __init__(self, fn):
        self.py_func = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self.par = njit(fn, True)
        self._serial = None

    @property
    def serial(self):
        if self._serial is None:
            fn = self.py_func
            twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                      fn.__defaults__, fn.__closure__)
            twin.__qualname__ = fn.__qualname__ + "_serial"
            twin.__module__ = fn.__module__
            twin.__doc__ = fn.__doc__
            self._serial = njit(twin, False)
        return self._serial

    def __call__(self, *args):
        if _threads == 1 or _blas._solo:   # one thread, or each thread on its own share
            return self.serial(*args)
        size = 0
        for a in args:
            size += getattr(a, "size", 0)
        if size < SERIAL_BELOW:
            return self.serial(*args)
        return self.par(*args)


def njit(fn, parallel):
    return numba().njit(parallel=parallel, **FLAGS)(fn)


def compile_module(modname):
    nb = numba()
    mod = sys.modules[modname]
    if "prange" in vars(mod):
        mod.prange = nb.prange
    for name, obj in list(vars(mod).items()):
        if not isinstance(obj, _Lazy):
            continue
        if obj.py_func.__module__ != modname:   # imported from another module: compiled there
            if obj.compiled is None:           # (its globals, its prange)
                compile_module(obj.py_func.__module__)
        elif obj.compiled is None:
            obj.compiled = Parallel(obj.py_func) if obj.parallel else njit(obj.py_func, False)
        setattr(mod, name, obj.compiled)


def kernel(fn=None, *, parallel=True):
    """Declare a numba kernel: @kernel or @kernel(parallel=False)."""
    if fn is None:
        return lambda f: _Lazy(f, parallel)
    return _Lazy(fn, parallel)


def prange(*a):
    """numba.prange inside kernels; plain range when run as Python."""
    return range(*a)


_threads = None
_blas = None   # flowdsl.blas, once threads() has run (numba() runs it before any kernel)


def threads(n: int | None = None) -> int:
    """Use n threads for numba kernels and BLAS (default: all cores). Returns the count."""
    global _threads
    nb = numba() if _numba is None else _numba
    cap = nb.config.NUMBA_NUM_THREADS
    n = cap if n is None else max(1, min(int(n), cap))
    nb.set_num_threads(n)
    global _blas
    from . import blas as _blas
    _blas.set_threads(n)
    _threads = n
    fp = _fpmode()
    if fp and n > 1:   # numba's workers flush denormals for good; the caller's thread is put back
        old = fp.read()
        fp.flush_workers(n)
        fp.restore(old)
    return n


# ------------------------------------------------------------------------------ denormals
_fp = None


def _fpmode():
    """flowdsl._fpmode on x86 (False elsewhere, or with FLOWDSL_DENORMALS=1: IEEE denormals kept)."""
    global _fp
    if _fp is None:
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        if not x86 or os.environ.get("FLOWDSL_DENORMALS") == "1":
            _fp = False
        else:
            numba()
            from . import _fpmode as fp
            _fp = fp
    return _fp


def flush_thread():
    """Flush denormals on the calling thread for good (flowdsl's own BLAS threads)."""
    fp = _fpmode()
    if fp:
        fp.flush()


class flushed:
    """with flushed(): the calling thread treats float32 denormals as zero (FTZ and DAZ) inside
    the block, and gets its own setting back after it: flowdsl's forward, backward and optimizer
    steps run so, while the caller's own numpy code keeps IEEE denormals. (A denormal operand
    costs a microcode assist per operation: 50-100x slower products; see flowdsl/_fpmode.py.)"""
    __slots__ = ("old",)

    def __enter__(self):
        fp = _fp if _fp is not None else _fpmode()
        self.old = fp.flush() if fp else None
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            _fp.restore(self.old)
        return False


def cache_dir() -> str:
    """Where numba keeps compiled kernels (NUMBA_CACHE_DIR, else the package's __pycache__)."""
    numba()
    return os.environ.get("NUMBA_CACHE_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                             "__pycache__")


class KernelClock:
    """Watches numba while a job runs: the wall seconds spent compiling kernels or loading them
    from the cache (time not spent training, left out of img/s), and the kernels compiled because
    the cache did not hold them. on_compile(name) is called once, at the first compile.

        with KernelClock(on_compile=...) as clock:
            ...
            secs = clock.take()                # seconds since the last take()
            names, secs = clock.take_compiled()  # kernels compiled since the last call, and
                                                 # the kernel seconds since then
    """

    def __init__(self, on_compile=None):
        import threading
        self.on_compile = on_compile
        self._lock = threading.Lock()
        self._depth = 0
        self._t0 = 0.0
        self._seconds = 0.0
        self._burst = 0.0
        self._compiled = []
        self._announced = False
        self._listeners = []

    # numba.core.event listeners (duck-typed: notify(event) with event.is_start / is_end)
    def _locking(self, event):
        import time
        with self._lock:
            if event.is_start:
                if self._depth == 0:
                    self._t0 = time.perf_counter()
                self._depth += 1
            elif self._depth > 0:
                self._depth -= 1
                if self._depth == 0:
                    dt = time.perf_counter() - self._t0
                    self._seconds += dt
                    self._burst += dt

    def _compiling(self, event):
        if not event.is_start:
            return
        d = (event.data or {}).get("dispatcher")
        name = getattr(getattr(d, "py_func", None), "__name__", "kernel")
        with self._lock:
            self._compiled.append(name)
            first = not self._announced
            self._announced = True
        if first and self.on_compile is not None:
            self.on_compile(name)

    def __enter__(self):
        numba()
        from numba.core import event as ev

        class _L(ev.Listener):
            def __init__(self, fn):
                self.fn = fn

            def on_start(self, event):
                self.fn(event)

            def on_end(self, event):
                self.fn(event)

        for kind, fn in (("numba:compiler_lock", self._locking), ("numba:compile", self._compiling)):
            listener = _L(fn)
            ev.register(kind, listener)
            self._listeners.append((kind, listener))
        return self

    def __exit__(self, *exc):
        from numba.core import event as ev
        for kind, listener in self._listeners:
            ev.unregister(kind, listener)
        self._listeners.clear()

    def take(self) -> float:
        with self._lock:
            s, self._seconds = self._seconds, 0.0
        return s

    def take_compiled(self):
        """(names of the kernels compiled, kernel seconds) since the last call; ([], s) when
        nothing was compiled (then the seconds keep adding up)."""
        with self._lock:
            if not self._compiled:
                return [], self._burst
            c, s = self._compiled, self._burst
            self._compiled, self._burst = [], 0.0
        return c, s
