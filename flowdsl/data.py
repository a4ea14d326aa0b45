"""Data sources of the `train { data = ... }` block: IDX, npz, csv and Fashion-MNIST here, image
folders in flowdsl/imagefolder.py (with their cache).

Every source gives a `Dataset`: samples kept compact (uint8 images and IDX, float32 only where
the source is float), served as float32 batches scaled to [0, 1], channels last (N, H, W, C) for
image models or (N, D) for vector models, already fitted to the model's input; y int64 labels.
npz and csv stay in RAM. Every problem with the data is a `FlowError` that names the file.
One concern over ~500 lines: each format's reader is mostly its error messages.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import FlowError, size_text
from .jit import kernel, prange

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Where fashion_mnist() looks after $FLOWDSL_DATA (Debian's dataset-fashion-mnist package).
# A module attribute so tests can point it elsewhere.
FASHION_SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class Dataset:
    """Samples kept compact, served as float32 batches.

    store: (M, ...) uint8 / uint16 codes (scaled by 255 / 65535 when served) or float32 values,
    in RAM (a numpy array) or streamed from a cache file (batches.CacheFile); rows: which store
    row each sample is (None: sample i is row i; a split or a cache with free slots has rows);
    shape: a served sample's shape, the model's (H, W, C) or (D,); y: int64 labels."""

    def __init__(self, store, y, classes, source, rows=None, shape=None, notes=()):
        self.store = store
        self.y = y
        self.classes = list(classes)
        self.source = source
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        self.shape = tuple(shape) if shape is not None else tuple(store.shape[1:])
        self.notes = list(notes)   # e.g. the unreadable files a folder skipped

    def __len__(self):
        return len(self.y)

    @property
    def streamed(self):
        """True when batches are read from a cache file instead of RAM (a file still being copied
        into RAM counts as held: it is in RAM within seconds)."""
        from .batches import CacheFile, LoadingFile
        return isinstance(self.store, CacheFile) and not isinstance(self.store, LoadingFile)

    @property
    def resident_bytes(self):
        """Bytes this data set holds in RAM."""
        return 0 if self.streamed else int(self.store.nbytes) + self.y.nbytes

    @property
    def sample_bytes(self):
        return int(math.prod(self.store.shape[1:])) * self.store.dtype.itemsize

    def batch(self, idx):
        """float32 (len(idx),) + shape: the samples idx, scaled."""
        return self.scale(self.fetch(idx))

    def fetch(self, idx):
        """The compact samples idx (read from the cache file when streamed): scale() turns them
        into the float32 batch. Split in two so a prefetch thread does the reading only."""
        from .batches import fetch
        idx = np.asarray(idx, np.int64)
        return fetch(self.store, idx if self.rows is None else self.rows[idx])

    def scale(self, fetched):
        from .batches import scale
        return scale(*fetched, self.shape)

    @property
    def x(self):
        """Every sample as one float32 array (small data sets, tests and the API only)."""
        return self.batch(np.arange(len(self)))

    def subset(self, idx, source=None) -> "Dataset":
        idx = np.asarray(idx, np.int64)
        rows = idx if self.rows is None else self.rows[idx]
        return Dataset(self.store, self.y[idx], self.classes, source or self.source, rows, self.shape, self.notes)


def as_dataset(x, y, classes=(), source="arrays"):
    """A Dataset over arrays already in the model's layout (uint8 stays compact)."""
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.uint8, np.uint16, np.float32):
        x = x.astype(np.float32)
    return Dataset(x, np.asarray(y), classes, source)


# ------------------------------------------------------------------------------------ helpers
def _show(shape) -> str:
    """A per-sample shape in DSL order: (H, W, C) -> WxHxC; (D,) -> D."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 3:
        h, w, c = shape
        return f"{w}x{h}x{c}"
    return "x".join(str(d) for d in shape)


def _show_input(input_shape) -> str:
    """The model's input (C, H, W) or (N,) in DSL order."""
    from .layers.base import show_shape
    return show_shape(input_shape)


def _resolve(path, base_dir) -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute():
        p = Path(base_dir if base_dir is not None else os.getcwd()) / p
    return Path(os.path.normpath(p))


def _existing_file(path, base_dir) -> Path:
    p = _resolve(path, base_dir)
    if not p.exists():
        raise FlowError(f"no such file: {p}")
    if p.is_dir():
        raise FlowError(f"{p} is a directory, not a file")
    return p


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise FlowError(f"cannot read {path}: {e.strerror or e}", str(path)) from None


def _fit(x, input_shape, path, what="the data") -> np.ndarray:
    """x (N, H, W, C) or (N, D) -> the model's layout, or a FlowError naming both shapes."""
    n = x.shape[0]
    sample = x.shape[1:]
    if len(input_shape) == 3:
        c, h, w = input_shape
        if sample == (h, w, c):
            return x
        if len(sample) == 1 and sample[0] == c * h * w:
            return x.reshape(n, h, w, c)
    else:
        if math.prod(sample) == input_shape[0]:
            return x.reshape(n, input_shape[0])
    raise FlowError(f"{what}: each sample is {_show(sample)} ({math.prod(sample)} values), "
                    f"which does not fit the model input {_show_input(input_shape)}", str(path))


def _check_finite(x, path, what="the data"):
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        val = x[tuple(bad)]
        raise FlowError(f"{what} contains {val} (NaN or Inf) at sample {int(bad[0])}", str(path))


def _classes_for(y, given=None):
    if given is not None and len(y) and len(given) > int(y.max()):
        return list(given)
    k = int(y.max()) + 1 if len(y) else 0
    return [str(i) for i in range(max(k, 0))]


def check_labels(ds: Dataset, n_classes: int, where=None):
    """Every label must be in 0..n_classes-1. `where` (e.g. 'train data' or a file) prefixes the
    message."""
    y = ds.y
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        i = int(np.argmax(bad))
        where = str(where) if where else ""
        if ds.source == "arrays":
            head = where or "labels"
        else:
            head = f"{where}: {ds.source}" if where and where != ds.source and where not in ds.source else ds.source
        raise FlowError(f"{head}: label {int(y[i])} (sample {i}) is out of range for a model "
                        f"with {n_classes} classes (labels must be 0..{n_classes - 1}; "
                        f"{int(bad.sum())} bad labels in all)")


def class_names(classes, k):
    """k display names: the given class names, then the indices of classes without one."""
    names = [str(c) for c in (classes or [])][:k]
    return names + [str(i) for i in range(len(names), k)]


@kernel
def _all_finite(flat):
    """Whether every value of a C-contiguous float32 (N, D) array is finite: v * 0 is 0 for a
    finite v and NaN for NaN and the infinities (the kernel flags leave out nnan/ninf, so
    this is not folded away), summed per row in vectorised order."""
    n = flat.shape[0]
    bad = np.zeros(n, np.uint8)
    for i in prange(n):
        acc = np.float32(0.0)
        r = flat[i]
        for j in range(r.shape[0]):
            acc += r[j] * np.float32(0.0)
        if acc != np.float32(0.0):
            bad[i] = 1
    return bad.max() == 0


def check_finite(x, where="the input"):
    """A FlowError naming the first sample of a float array that holds NaN or an infinity (a
    data problem, reported before it turns into a NaN loss or silent garbage probabilities)."""
    x = np.asarray(x) if not isinstance(x, Dataset) else x.store
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f" or x.size == 0:
        return
    flat = x.reshape(x.shape[0], -1)
    if flat.dtype == np.float32 and flat.flags.c_contiguous and _all_finite(flat):
        return   # one pass, no temporaries (a 400x400x3 batch of 20: 6 ms -> 0.8; one 28x28 image: 10 -> 3.5 us)
    step = max(1, (1 << 22) // max(1, flat.shape[1]))   # ~4 M values at a time: no full-size temporary
    first, count = -1, 0
    for i in range(0, flat.shape[0], step):
        bad = ~np.isfinite(flat[i:i + step]).all(axis=1)
        if bad.any():
            if first < 0:
                first = i + int(np.argmax(bad))
            count += int(bad.sum())
    if first >= 0:
        kinds = [k for k, f in (("NaN", np.isnan), ("infinite values", np.isinf)) if f(flat[first]).any()]
        raise FlowError(f"{where}: sample {first} holds {' and '.join(kinds)} ({count:,} of {flat.shape[0]:,} samples "
                        f"are not finite); fix or drop them before training or predicting")


def split(ds: Dataset, fraction: float, seed: int = 0):
    """Split off round(fraction * N) samples as a test set, stratified by label, deterministic in
    seed. Returns (train, test); both keep the original sample order."""
    n = len(ds)
    if not 0.0 < fraction < 1.0:
        raise FlowError(f"split({fraction}): the fraction must be between 0 and 1")
    n_test = int(round(fraction * n))
    if n_test < 1 or n - n_test < 1:
        raise FlowError(f"split({fraction:g}) of {ds.source}: {n} samples give "
                        f"{n - n_test} to train and {n_test} to test; both need at least one")
    rng = np.random.default_rng(seed)
    labels, counts = np.unique(ds.y, return_counts=True)
    # largest-remainder allocation of the test samples across classes
    quota = n_test * counts / n
    take = np.floor(quota).astype(np.int64)
    rest = n_test - int(take.sum())
    if rest:
        # the largest remainders first; ties (common with many small classes) broken by the seed
        order = np.lexsort((rng.random(len(labels)), -(quota - take)))
        take[order[:rest]] += 1
    test_idx = []
    for lab, k in zip(labels, take):
        members = np.flatnonzero(ds.y == lab)
        if k:
            test_idx.append(rng.permutation(members)[:k])
    test_mask = np.zeros(n, bool)
    if test_idx:
        test_mask[np.concatenate(test_idx)] = True
    pct = f"{fraction * 100:g}%"
    train = ds.subset(np.flatnonzero(~test_mask), f"{ds.source} (train part of split({fraction:g}))")
    test = ds.subset(np.flatnonzero(test_mask), f"{ds.source} ({pct} test split)")
    return train, test


# ---------------------------------------------------------------------------------------- idx
_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_maybe_gz(path: Path) -> bytes:
    raw = _read(path)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise FlowError(f"corrupt or truncated gzip data: {e}", str(path)) from None
    return raw


@lru_cache(maxsize=8)
def _idx_cached(path_s: str, mtime_ns: int, size: int, role: str):
    path = Path(path_s)
    raw = _read_maybe_gz(path)
    return _parse_idx(raw, path, role)


def _parse_idx(raw: bytes, path: Path, role: str) -> np.ndarray:
    p = str(path)
    if len(raw) < 4:
        raise FlowError(f"not an IDX {role} file: only {len(raw)} bytes (truncated?)", p)
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise FlowError(f"not an IDX {role} file: the magic number is {raw[:4].hex(' ')}, expected "
                        f"00 00 <type> <dims> (type 08 for bytes)", p)
    code, ndim = raw[2], raw[3]
    dtype = _IDX_TYPES[code]
    if role == "images":
        if code != 0x08:
            raise FlowError(f"IDX images must be unsigned bytes (type 08); this file has type {code:02x}", p)
        if ndim not in (2, 3, 4):
            raise FlowError(f"IDX images must have 3 dimensions (count, rows, columns); "
                            f"this file has {ndim}", p)
    else:
        if dtype.kind not in "iu":
            raise FlowError(f"IDX labels must be integers; this file has type {code:02x}", p)
        if ndim != 1:
            raise FlowError(f"IDX labels must have 1 dimension (count); this file has {ndim} "
                            f"(is it an images file?)", p)
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise FlowError(f"truncated IDX header: {len(raw)} bytes, the {ndim} sizes need {head}", p)
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    count = math.prod(dims)
    need = count * dtype.itemsize
    have = len(raw) - head
    shown = " x ".join(map(str, dims))
    if have < need:
        raise FlowError(f"truncated IDX file: the header promises {shown} {role} values ({need} bytes) "
                        f"but only {have} bytes follow", p)
    if have > need:
        raise FlowError(f"IDX file has {have - need} unexpected bytes after the {shown} {role} values "
                        f"the header promises", p)
    a = np.frombuffer(raw, dtype, count=count, offset=head).reshape(dims)  # read-only view
    if role == "labels":
        a = a.astype(np.int64)
        a.setflags(write=False)
    return a


def read_idx(path, role="images") -> np.ndarray:
    """One IDX file (gzipped or not, detected by its magic bytes), decoded and cached in-process.
    The returned array is read-only (shared by the cache)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise FlowError(f"no such file: {path}") from None
    return _idx_cached(str(path), st.st_mtime_ns, st.st_size, role)


def _idx_dataset(img_path: Path, lab_path: Path, input_shape, source, classes, budget=None, say=None):
    labs = read_idx(lab_path, "labels")
    dims = _idx_dims(img_path)
    if budget is not None and dims is not None and math.prod(dims) > budget:
        store = _idx_cached_file(img_path, dims, say or (lambda m: None))
        sample = dims[1:] + (1,) if len(dims) == 3 else dims[1:]
        _fit(np.empty((1,) + sample, np.uint8), input_shape, img_path, "the IDX images")  # shape check only
        shape = (math.prod(sample),) if len(input_shape) == 1 else None
        n_img = store.shape[0]
        store.shape = (n_img,) + tuple(sample)
    else:
        imgs = read_idx(img_path, "images")
        store = imgs[..., None] if imgs.ndim == 3 else imgs   # uint8, scaled when served
        store = _fit(store, input_shape, img_path, "the IDX images")
        shape, n_img = None, len(store)
    if n_img != len(labs):
        raise FlowError(f"{img_path} holds {n_img} images but {lab_path} holds {len(labs)} labels",
                        str(img_path))
    if n_img == 0:
        raise FlowError("the IDX file holds no images", str(img_path))
    y = np.array(labs, np.int64)
    return Dataset(store, y, classes if classes is not None else _classes_for(y), source, shape=shape)


def _idx_open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _idx_dims(path: Path):
    """The dimensions an IDX images file's header promises (None if it is not one: the full
    reader then says why)."""
    try:
        with _idx_open(path) as f:
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\0\0\x08" or head[3] not in (2, 3, 4):
                return None
            return struct.unpack(f">{head[3]}I", f.read(4 * head[3]))
    except (OSError, EOFError, zlib.error, struct.error):
        return None


def _idx_cached_file(path: Path, dims, say):
    """An IDX images file too large for memory, decompressed once into the data cache and
    streamed from there (flowdsl.datacache: written to a temporary name, index last)."""
    from . import datacache
    from .batches import CacheFile
    st = path.stat()
    key = {"idx": str(path.resolve()), "bytes": st.st_size, "mtime": st.st_mtime_ns}
    cdir = datacache.folder_for(path.name, key)
    sb = math.prod(dims[1:])
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        with datacache.Lock(cdir):
            datacache.sweep(cdir)
            if datacache.read_index(cdir, key) is None:
                tmp = cdir / f"samples.bin.tmp-{os.getpid()}"
                with _idx_open(path) as f, open(tmp, "wb") as out:
                    f.read(4 + 4 * len(dims))
                    left = dims[0] * sb
                    while left:
                        chunk = f.read(min(left, 64 << 20))
                        if not chunk:
                            raise FlowError(f"truncated IDX file: the header promises {' x '.join(map(str, dims))} "
                                            f"values", str(path))
                        out.write(chunk)
                        left -= len(chunk)
                os.replace(tmp, cdir / "samples.bin")
                datacache.write_index(cdir, {"key": key, "dtype": "uint8", "slots": dims[0], "sample_bytes": sb,
                                             "entries": {}})
    except OSError as e:
        raise FlowError(f"the IDX images ({size_text(dims[0] * sb)}) do not fit in memory and cannot be cached at "
                        f"{cdir}: {e.strerror or e}; set FLOWDSL_DATA_CACHE to a writable folder", str(path)) from None
    say(f"streaming {size_text(dims[0] * sb)} of IDX images from the cache {cdir}")
    return CacheFile(cdir / "samples.bin", dims[0], dims[1:], np.uint8)


def _load_idx(call, base_dir, input_shape, classes=None, budget=None, say=None) -> Dataset:
    img = _existing_file(call["images"], base_dir)
    lab = _existing_file(call["labels"], base_dir)
    ds = _idx_dataset(img, lab, input_shape, f"idx({img}, {lab})", None, budget, say)
    ds.classes = _classes_for(ds.y, classes)
    return ds


def _fashion_dirs():
    dirs = []
    env = os.environ.get("FLOWDSL_DATA")
    if env:
        for d in env.split(os.pathsep):
            if d:
                d = os.path.expanduser(d)
                dirs += [Path(d), Path(d) / "fashion-mnist"]
    dirs += [Path(d) for d in FASHION_SYSTEM_DIRS]
    return dirs


def _find_fashion(part):
    names = FASHION_FILES[part]
    dirs = _fashion_dirs()
    for d in dirs:
        found = []
        for n in names:
            for cand in (d / (n + ".gz"), d / n):
                if cand.is_file():
                    found.append(cand)
                    break
        if len(found) == 2:
            return found
    looked = ", ".join(str(d) for d in dirs)
    raise FlowError(
        f"Fashion-MNIST ({part}) not found (looked in: {looked}). Install it with "
        f"`sudo apt-get install dataset-fashion-mnist`, or set FLOWDSL_DATA to a directory holding "
        f"{names[0]}.gz and {names[1]}.gz")


def _load_fashion(call, base_dir, input_shape, classes=None, budget=None, say=None) -> Dataset:
    part = call.get("part", "train")
    if part not in FASHION_FILES:
        raise FlowError(f"fashion_mnist: part must be train or test. Received: part={part}")
    img, lab = _find_fashion(part)
    return _idx_dataset(img, lab, input_shape, f"fashion_mnist({part}) from {img.parent}",
                        list(FASHION_CLASSES), budget, say)


# ---------------------------------------------------------------------------------------- npz
def _load_npz(call, base_dir, input_shape, classes=None) -> Dataset:
    path = _existing_file(call["file"], base_dir)
    p = str(path)
    kx, ky = str(call.get("x", "x")), str(call.get("y", "y"))
    try:
        f = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):
            raise FlowError("refusing pickled data: this file is a Python pickle; save plain arrays with "
                            "np.savez(file, x=..., y=...)", p) from None
        raise FlowError(f"cannot read npz: {e}", p) from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise FlowError(f"cannot read npz: {e}", p) from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise FlowError("this is a single .npy array; npz(...) needs an .npz archive saved with "
                        "np.savez(file, x=images, y=labels)", p)
    with f:
        arrays = {}
        for key, role in ((kx, "x"), (ky, "y")):
            if key not in f.files:
                raise FlowError(f"no array '{key}' in the archive (it holds: {', '.join(f.files) or 'nothing'}); "
                                f"choose with npz(..., {role}=\"name\")", p)
            try:
                arrays[role] = f[key]
            except ValueError as e:
                if "pickle" in str(e) or "Object arrays" in str(e):
                    raise FlowError(f"refusing pickled data: array '{key}' holds Python objects", p) from None
                raise FlowError(f"cannot read array '{key}': {e}", p) from None
            except Exception as e:  # corrupt member (zlib, CRC, truncated)
                raise FlowError(f"cannot read array '{key}': {e}", p) from None
    x, y = arrays["x"], arrays["y"]
    x = _npz_x(x, kx, input_shape, path)
    y = _npz_y(y, ky, path)
    if len(x) != len(y):
        raise FlowError(f"'{kx}' holds {len(x)} samples but '{ky}' holds {len(y)} labels", p)
    if len(x) == 0:
        raise FlowError("the archive holds no samples", p)
    return Dataset(x, y, _classes_for(y, classes), f"npz({path})")


def _npz_x(x, key, input_shape, path):
    p = str(path)
    if x.dtype.kind == "f":
        x = x.astype(np.float32)
        _check_finite(x, path, f"array '{key}'")
    elif x.dtype in (np.uint8, np.uint16):
        pass                     # kept compact; scaled by 255 or 65535 when served
    elif x.dtype.kind == "b":
        x = x.astype(np.float32)
    elif x.dtype.kind in "iu":
        if x.size and (x.min() < 0 or x.max() > 255):
            raise FlowError(f"array '{key}' holds integers from {x.min()} to {x.max()}; pixels must be 0..255 "
                            f"(uint8) or floats in 0..1", p)
        x = x.astype(np.uint8)
    else:
        raise FlowError(f"array '{key}' has dtype {x.dtype}; expected uint8 or float pixels", p)
    if x.ndim < 2:
        raise FlowError(f"array '{key}' has shape {x.shape}; expected (N, H, W, C), (N, C, H, W), (N, H, W) "
                        f"or (N, D)", p)
    n = x.shape[0]
    if len(input_shape) == 3:
        c, h, w = input_shape
        s = x.shape[1:]
        if s == (h, w, c):
            return x
        if s == (c, h, w):
            return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        if c == 1 and s == (h, w):
            return x[..., None]
        if len(s) == 1 and s[0] == c * h * w:
            return x.reshape(n, h, w, c)
        expected = f"(N, {h}, {w}, {c}) or (N, {c}, {h}, {w})" + (f" or (N, {h}, {w})" if c == 1 else "")
        raise FlowError(f"array '{key}' has shape {x.shape}, which does not fit the model input "
                        f"{_show_input(input_shape)}: expected {expected}", p)
    d = input_shape[0]
    if math.prod(x.shape[1:]) != d:
        raise FlowError(f"array '{key}' has shape {x.shape} ({math.prod(x.shape[1:])} values per sample), "
                        f"which does not fit the model input {d}", p)
    if x.ndim == 4 and x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = x.transpose(0, 2, 3, 1)  # NCHW -> flatten in H, W, C order like every other source
    return np.ascontiguousarray(x.reshape(n, d))


def _npz_y(y, key, path):
    p = str(path)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.shape[1] > 1 and y.dtype.kind in "biuf" and \
            np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all():
        y = y.argmax(axis=1)  # one-hot
    if y.ndim != 1:
        raise FlowError(f"labels '{key}' have shape {y.shape}; expected one integer per sample (N,)", p)
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise FlowError(f"labels '{key}' contain NaN or Inf", p)
        if (y != np.round(y)).any():
            i = int(np.argmax(y != np.round(y)))
            raise FlowError(f"labels '{key}' must be whole numbers; sample {i} has {y[i]}", p)
        return y.astype(np.int64)
    raise FlowError(f"labels '{key}' have dtype {y.dtype}; expected integers", p)


# ---------------------------------------------------------------------------------------- csv
def _is_number(s) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _fields(line, delim):
    parts = line.split(delim) if delim else line.split()
    return [q.strip().strip('"').strip() for q in parts]


def _data_line(line) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("#")


def _load_csv(call, base_dir, input_shape, classes=None) -> Dataset:
    path = _existing_file(call["file"], base_dir)
    p = str(path)
    label = int(call.get("label", 0))
    raw = _read(path)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise FlowError(f"corrupt gzip data: {e}", p) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise FlowError(f"not a text file (bad UTF-8 at byte {e.start})", p, line) from None
    lines = text.splitlines()
    first = next((i for i, l in enumerate(lines) if _data_line(l)), None)
    if first is None:
        raise FlowError("the csv file has no rows", p)
    head = lines[first]
    delim = "," if "," in head else ";" if ";" in head else "\t" if "\t" in head else None
    fields = _fields(head, delim)
    start = first + 1 if any(not _is_number(f) for f in fields) else first
    ncols = len(fields)
    if not -ncols <= label < ncols:
        raise FlowError(f"label={label}, but the rows have {ncols} columns (0..{ncols - 1}, or -1..-{ncols} "
                        f"from the end)", p, first + 1)
    label %= ncols   # label=-1: the last column, as in Python
    if ncols < 2:
        raise FlowError("each row needs a label and at least one pixel value", p, first + 1)
    body = lines[start:]
    if not any(_data_line(l) for l in body):
        raise FlowError("the csv file has a header but no rows", p)
    try:
        data = np.loadtxt(body, delimiter=delim, dtype=np.float64, ndmin=2, comments="#", quotechar='"')
    except ValueError:
        _csv_find_bad_row(lines, start, delim, ncols, p)
        raise FlowError("cannot parse the csv file", p) from None
    if data.shape[1] != ncols:
        _csv_find_bad_row(lines, start, delim, ncols, p)
    rows_at = None

    def line_of(row):
        nonlocal rows_at
        if rows_at is None:
            rows_at = [i + 1 for i in range(start, len(lines)) if _data_line(lines[i])]
        return rows_at[row]

    finite = np.isfinite(data)
    if not finite.all():
        r, col = np.argwhere(~finite)[0]
        raise FlowError(f"column {col} is {data[r, col]} (NaN or Inf)", p, line_of(int(r)))
    y = data[:, label]
    frac = y != np.round(y)
    if frac.any():
        r = int(np.argmax(frac))
        raise FlowError(f"the label (column {label}) must be a whole number. Received: {y[r]:g}", p, line_of(r))
    x = np.delete(data, label, axis=1)
    lo, hi = x.min(), x.max()
    if lo < 0 or hi > 255:
        r = int(np.argmax((x < 0).any(axis=1) | (x > 255).any(axis=1)))
        raise FlowError(f"pixel values must be 0..255 or 0..1; this row has "
                        f"{x[r].min():g}..{x[r].max():g}", p, line_of(r))
    x = x.astype(np.float32)
    if hi > 1:
        x /= np.float32(255.0)
    x = _fit(x, input_shape, path, "the csv rows")
    y = y.astype(np.int64)
    return Dataset(x, y, _classes_for(y, classes), f"csv({path})")


def _csv_find_bad_row(lines, start, delim, ncols, p):
    """Slow path: find the first bad row and raise a FlowError with its line number."""
    for i in range(start, len(lines)):
        line = lines[i]
        if not _data_line(line):
            continue
        line = line.split("#", 1)[0]
        fields = _fields(line, delim)
        if len(fields) != ncols:
            raise FlowError(f"this row has {len(fields)} values; the rows before it have {ncols}", p, i + 1)
        for j, f in enumerate(fields):
            if not _is_number(f):
                raise FlowError(f"column {j} is not a number. Received: '{f[:40]}'", p, i + 1)


# ---------------------------------------------------------------------------------- dispatch
def _load_images(call, base_dir, input_shape, classes=None, budget=None, say=None):
    from .imagefolder import load_images
    return load_images(call, base_dir, input_shape, classes, budget, say)


STREAMING = ("images", "idx", "fashion_mnist")   # sources that stream from a cache beyond the budget
_LOADERS = {
    "images": _load_images,
    "idx": _load_idx,
    "npz": _load_npz,
    "csv": _load_csv,
    "fashion_mnist": _load_fashion,
}


def load_source(call, base_dir, input_shape, classes=None, budget=None, say=None) -> Dataset:
    """Load the data a source call describes (a validated CallValue from the train block).

    base_dir: the .flow file's folder (relative paths resolve against it); input_shape: the
    model's (C, H, W) or (N,); classes: class names from a checkpoint, if any (image folders must
    match them; label-only sources take them as their names); budget: bytes of RAM the samples
    may take (cached sources stream beyond it; None: no limit); say: where notes go."""
    input_shape = tuple(int(d) for d in input_shape)
    if call.name == "split":
        raise FlowError("split(...) is not a data source: it takes its test set from `data`")
    loader = _LOADERS.get(call.name)
    if loader is None:
        raise FlowError(f"unknown data source '{call.name}' (choose from {', '.join(sorted(_LOADERS))})")
    ds = loader(call, base_dir, input_shape, classes, budget, say) if call.name in STREAMING else \
        loader(call, base_dir, input_shape, classes)
    assert ds.store.dtype in (np.uint8, np.uint16, np.float32) and ds.y.dtype == np.int64
    return ds


def describe_source(call, base_dir, input_shape):
    """(samples, bytes per sample in RAM) of a source without decoding it, or (None, file bytes)
    where only the file size is cheap to know; a FlowError if its files do not exist."""
    if call.name == "images":
        from .imagefolder import describe_folder
        n, per = describe_folder(call, base_dir, input_shape)
        return n, per
    if call.name in ("idx", "fashion_mnist"):
        img = _find_fashion(call.get("part", "train"))[0] if call.name == "fashion_mnist" else \
            _existing_file(call["images"], base_dir)
        if call.name == "idx":
            _existing_file(call["labels"], base_dir)
        with _idx_open(img) as f:
            head = f.read(16)
        if len(head) >= 8 and head[:2] == b"\0\0" and head[3] >= 1 and len(head) >= 4 + 4 * min(head[3], 3):
            dims = struct.unpack(f">{min(head[3], 3)}I", head[4:4 + 4 * min(head[3], 3)])
            return dims[0], math.prod(dims[1:])
        return None, img.stat().st_size
    path = _existing_file(call["file"], base_dir)
    return None, path.stat().st_size


def load_image_files(paths, input_shape, color=None, fit="stretch"):
    """Single images (for predict/focus) as float32 x fitted to the model input, like images()."""
    from .imagefolder import load_image_files as load
    return load(paths, input_shape, color, fit)


__all__ = ["Dataset", "load_source", "load_image_files", "check_labels", "split", "read_idx",
           "FASHION_CLASSES"]


# ------------------------------------------------------------------------------------ sources
def base_dir(model):
    """The folder a model's relative data paths resolve against: its .flow file's, or the
    current directory for a model built from text."""
    return str(Path(model.file).resolve().parent) if model.file else os.getcwd()


def parse_source(text, model=None):
    """A data source written on the command line or in the API, e.g. 'fashion_mnist("test")'."""
    from .args import bind_call
    from .parse import parse_text
    from .settings import SOURCES
    try:
        prog = parse_text(f"train {{ data = {text} }}", "<--data>")
        block = prog.statements[0]
        if len(block.settings) != 1:
            raise FlowError("expected one source")
        return bind_call(block.settings[0].value, SOURCES, "data source")
    except FlowError as e:
        raise FlowError(f"--data: {e.message}. Received: {text}") from None
