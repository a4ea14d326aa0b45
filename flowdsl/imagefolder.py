"""images(dir, size=WxH, color=gray|rgb, fit=stretch|crop|pad, bad=error|skip): an image folder,
one subfolder per class (torchvision's ImageFolder convention: classes are the sorted subfolder
names, files sorted), decoded once into a compact cache and served from it.

Decoding: pillow, in threads (it releases the GIL); large JPEGs are decoded at a reduced scale
(`draft`) no smaller than needed. Fitting to the model's W x H: `stretch` (the default) resizes
bilinearly, ignoring the aspect ratio; `crop` scales the short side to fit and cuts the centre;
`pad` scales the long side to fit and letterboxes with black. 8-bit images are stored as uint8;
a folder with 16-bit (or float) images as uint16, so they are not clipped to 8 bits.

The cache (flowdsl.datacache): samples.bin holds one slot per image, index.json maps each file
(relative path, size, mtime, label) to its slot. A second run decodes nothing; a changed, added
or removed file re-decodes only its own slot. Unreadable files: bad=error (the default) names the
first one and says how to skip; bad=skip leaves them out and lists them once (Dataset.notes).
Where the samples fit the memory budget they are loaded into RAM; otherwise batches stream from
samples.bin (flowdsl.batches.CacheFile)."""
from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import datacache
from .batches import CacheFile, LoadingFile, lut
from .data import Dataset, _resolve, _show_input
from .errors import FlowError, size_text

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DECODE_WORKERS = 4       # threads decoding images
FITS = ("stretch", "crop", "pad")


class _Deep(Exception):
    """A 16-bit or float image in a cache being built as uint8: rebuild as uint16."""


def _image_target(input_shape, size, color, where):
    """(W, H, C, flatten) for images fitted to the model input, given size= and color=."""
    where = str(where)
    if color is not None and color not in ("gray", "rgb"):
        raise FlowError(f"color must be gray or rgb. Received: color={color}", where)
    want_c = {"gray": 1, "rgb": 3, None: None}[color]
    if size is not None:
        size = tuple(int(d) for d in size)
        if len(size) not in (2, 3):
            raise FlowError(f"size must be WxH (e.g. 28x28). Received: size={'x'.join(map(str, size))}", where)
    if len(input_shape) == 3:
        c, h, w = input_shape
        if c not in (1, 3):
            raise FlowError(f"images have 1 channel (gray) or 3 (rgb), but the model input "
                            f"{_show_input(input_shape)} has {c}", where)
        if want_c is not None and want_c != c:
            raise FlowError(f"color={color} gives {want_c} channel{'s' * (want_c > 1)}, but the model input "
                            f"{_show_input(input_shape)} has {c}", where)
        if size is not None and (size[:2] != (w, h) or (len(size) == 3 and size[2] != c)):
            raise FlowError(f"size={'x'.join(map(str, size))} differs from the model input "
                            f"{_show_input(input_shape)}", where)
        return w, h, c, False
    d = input_shape[0]
    if size is not None:
        w, h = size[:2]
        c = want_c if want_c is not None else (size[2] if len(size) == 3 else
                                              1 if d == w * h else 3 if d == 3 * w * h else None)
        if c is None or w * h * c != d:
            raise FlowError(f"images of size {'x'.join(map(str, size))}"
                            f"{f' ({color})' if color else ''} do not fit the model input {d}", where)
        return w, h, c, True
    for c in ((want_c,) if want_c is not None else (1, 3)):
        side = math.isqrt(d // c) if d % c == 0 else 0
        if side * side * c == d:
            return side, side, c, True
    raise FlowError(f"the model input is a vector of {d}: give the image size, e.g. "
                    f"images(..., size=WxH{', color=' + color if color else ''})", where)


def _to_float(img, mode, path):
    """A pillow image -> float32 (H, W, C) in [0, 1] in `mode` ('L' or 'RGB'). 16-bit and 32-bit
    integer images are scaled by 65535, not clipped at 255."""
    from PIL import Image
    m = img.mode
    if m in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img)
        if m == "F":
            a = a.astype(np.float32)
            top = float(np.nanmax(a)) if a.size else 0.0
            scale = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
            a = a / np.float32(scale)
        else:
            a = a.astype(np.float32) / np.float32(65535.0)
        a = np.clip(a, 0.0, 1.0).astype(np.float32, copy=False)
        return Image.fromarray(a), True
    if m == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids pillow's warning about palette transparency
    if img.mode != mode:
        try:
            img = img.convert(mode)
        except ValueError:
            for via in ("RGBA", "RGB", "LA"):
                try:
                    img = img.convert(via).convert(mode)
                    break
                except ValueError:
                    continue
            else:
                raise FlowError(f"cannot convert a {img.mode} image to {mode}", str(path)) from None
    return img, False


def _fitted(img, w, h, fit):
    """img resized to (w, h) as `fit` says (bilinear)."""
    from PIL import Image
    bil = Image.Resampling.BILINEAR
    W0, H0 = img.size
    if (W0, H0) == (w, h):
        return img
    if fit == "crop":
        s = max(w / W0, h / H0)
        cw, ch = w / s, h / s            # the source box with the target's aspect ratio
        left, top = (W0 - cw) / 2, (H0 - ch) / 2
        return img.resize((w, h), bil, box=(left, top, left + cw, top + ch))
    if fit == "pad":
        s = min(w / W0, h / H0)
        nw, nh = max(1, round(W0 * s)), max(1, round(H0 * s))
        canvas = Image.new(img.mode, (w, h), 0)
        canvas.paste(img.resize((nw, nh), bil), ((w - nw) // 2, (h - nh) // 2))
        return canvas
    return img.resize((w, h), bil)


def _decode(path: Path, w, h, c, fit="stretch"):
    """One image fitted to (h, w, c): uint8, or float32 in [0, 1] for 16-bit and float images."""
    from PIL import Image
    mode = "L" if c == 1 else "RGB"
    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and im.size[0] >= 2 * w and im.size[1] >= 2 * h:
                W0, H0 = im.size
                s = {"crop": max(w / W0, h / H0), "pad": min(w / W0, h / H0)}.get(fit)
                want = (w, h) if s is None else (max(1, int(W0 * s)), max(1, int(H0 * s)))
                im.draft(mode, want)
            im.load()
            img, is_float = _to_float(im, mode, path)
            img = _fitted(img, w, h, fit)
            if is_float:
                a = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)[:, :, None]
                return np.repeat(a, 3, axis=2) if c == 3 else a
            a = np.asarray(img)
            return a[:, :, None] if a.ndim == 2 else a
    except FlowError:
        raise
    except Exception as e:  # pillow raises many kinds on corrupt or truncated files
        msg = str(e) or type(e).__name__
        raise FlowError(f"cannot read image: {msg}", str(path)) from None


def _compact(a, dtype):
    """A decoded image as codes of dtype (uint8 or uint16)."""
    if a.dtype == np.float32:
        if dtype == np.uint8:
            raise _Deep
        return np.round(a * np.float32(65535.0)).astype(np.uint16)
    return a.astype(np.uint16) * np.uint16(257) if dtype == np.uint16 else a


def _decode_into(paths, w, h, c, fit, dtype, put, progress=None):
    """Decode paths[i] for every i, handing (i, codes) to put or (i, None, message) for an
    unreadable file; threads for more than a few files."""
    def work(i):
        try:
            a = _compact(_decode(paths[i], w, h, c, fit), dtype)
        except FlowError as e:
            return i, None, e.message
        return i, a, None

    if len(paths) < 32:
        results = map(work, range(len(paths)))
        ex = None
    else:
        workers = max(1, min(DECODE_WORKERS, os.cpu_count() or 1, len(paths)))
        ex = ThreadPoolExecutor(max_workers=workers)
        results = ex.map(work, range(len(paths)), chunksize=max(1, min(64, len(paths) // (workers * 8))))
    try:
        for r in results:
            put(*r)
            if progress is not None:
                progress.update(1)
    finally:
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)


def load_image_files(paths, input_shape, color=None, fit="stretch") -> np.ndarray:
    """Single images (for predict/focus) -> float32 x fitted to the model input, like images()."""
    w, h, c, flatten = _image_target(input_shape, None, color, paths[0] if paths else "<images>")
    files = []
    for p in paths:
        p = _resolve(p, None)
        if not p.exists():
            raise FlowError(f"no such file: {p}")
        if p.is_dir():
            raise FlowError(f"{p} is a directory; give image files")
        files.append(p)
    x = np.empty((len(files), h, w, c), np.float32)
    for i, p in enumerate(files):
        a = _decode(p, w, h, c, fit)
        x[i] = a if a.dtype == np.float32 else lut(np.uint8)[a]
    return x.reshape(len(x), -1) if flatten else x


def _image_files(folder: Path):
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(names):
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(Path(root) / name)
    return files


def describe_folder(call, base_dir, input_shape):
    """(count, sample bytes) of an image folder without decoding it (for `flowdsl check`)."""
    folder, w, h, c, _, paths, _, _ = _listing(call, base_dir, input_shape, None)
    return len(paths), w * h * c


def _listing(call, base_dir, input_shape, classes):
    folder = _resolve(call["dir"], base_dir)
    if not folder.exists():
        raise FlowError(f"no such file or directory: {folder}")
    if not folder.is_dir():
        raise FlowError(f"images() needs a directory with one subfolder per class; {folder} is a file")
    w, h, c, flatten = _image_target(input_shape, call.get("size"), call.get("color"), folder)
    # hidden folders and Python byte-code caches are never classes
    names = sorted(e.name for e in os.scandir(folder)
                   if e.is_dir() and not e.name.startswith(".") and e.name != "__pycache__")
    if not names:
        raise FlowError(f"no class folders in {folder}: images() expects one subfolder per class "
                        f"(e.g. {folder}/cat/1.png, {folder}/dog/2.png)", str(folder))
    if classes is not None and list(classes) != names:
        missing = [k for k in classes if k not in names]
        extra = [k for k in names if k not in classes]
        detail = []
        if missing:
            detail.append("missing: " + ", ".join(missing))
        if extra:
            detail.append("not in the weights: " + ", ".join(extra))
        if not detail:
            detail.append("same names in a different order")
        raise FlowError(f"the class folders ({', '.join(names)}) differ from the classes the weights were "
                        f"trained on ({', '.join(classes)}): {'; '.join(detail)}", str(folder))
    paths, labels = [], []
    for k, name in enumerate(names):
        files = _image_files(folder / name)
        if not files:
            raise FlowError(f"class folder '{name}' has no images "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))})", str(folder / name))
        paths += files
        labels += [k] * len(files)
    return folder, w, h, c, flatten, paths, labels, names


def load_images(call, base_dir, input_shape, classes=None, budget=None, say=None) -> Dataset:
    """The folder as a Dataset: from its cache (built or refreshed first), in RAM when its
    samples fit `budget` bytes (None: no limit), else streamed."""
    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    fit = call.get("fit") or "stretch"
    bad_mode = call.get("bad") or "error"
    folder, w, h, c, flatten, paths, labels, names = _listing(call, base_dir, input_shape, classes)
    labels = np.asarray(labels, np.int64)
    shape = (w * h * c,) if flatten else (h, w, c)
    key = {"folder": str(folder), "size": [w, h, c], "fit": fit}
    try:
        store, slots, bad = _from_cache(folder, key, paths, labels, w, h, c, fit, budget, say)
    except _NoCache as e:
        say(f"note: cannot use the data cache ({e}); decoding {len(paths):,} images in memory "
            f"(set FLOWDSL_DATA_CACHE to a writable folder to cache them)")
        need = len(paths) * w * h * c
        if budget is not None and need > budget:
            raise FlowError(f"{len(paths):,} images of {w}x{h}x{c} need {size_text(need)} in memory, more than the "
                            f"{size_text(budget)} available, and there is no cache to stream them from: set "
                            f"FLOWDSL_DATA_CACHE to a writable folder", str(folder)) from None
        store, slots, bad = _in_memory(paths, w, h, c, fit)
    good = np.array([i for i in range(len(paths)) if i not in bad], np.int64)
    notes = []
    if bad:
        first = sorted(bad)
        if bad_mode != "skip":
            i = first[0]
            more = f" ({len(bad)} unreadable files in all)" if len(bad) > 1 else ""
            raise FlowError(f"{bad[i]}{more}; to train without unreadable files, write "
                            f"images(..., bad=skip)", str(paths[i]))
        shown = ", ".join(os.path.relpath(paths[i], folder) for i in first[:5])
        notes.append(f"skipped {len(bad)} unreadable image{'s' * (len(bad) > 1)} in {folder}: {shown}"
                     + (", ..." if len(bad) > 5 else ""))
        say(notes[-1])
        if not len(good):
            raise FlowError(f"every image in {folder} is unreadable", str(folder))
    return Dataset(store, labels[good], names, f"images({folder})", rows=slots[good], shape=shape, notes=notes)


class _NoCache(Exception):
    pass


def _in_memory(paths, w, h, c, fit):
    for dtype in (np.uint8, np.uint16):
        store = np.empty((len(paths), h, w, c), dtype)
        bad = {}

        def put(i, a, msg=None):
            if a is None:
                bad[i] = msg
            else:
                store[i] = a
        try:
            _decode_into(paths, w, h, c, fit, dtype, put)
        except _Deep:
            continue
        return store, np.arange(len(paths), dtype=np.int64), bad
    raise AssertionError("unreachable")


# caches larger than this are copied into RAM by a background thread while training starts
LOAD_IN_BACKGROUND = 256 << 20


def _from_cache(folder, key, paths, labels, w, h, c, fit, budget, say):
    cdir = datacache.folder_for(folder.name, key)
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        probe = cdir / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise _NoCache(f"{cdir}: {e.strerror or e}") from None
    rel = [os.path.relpath(p, folder) for p in paths]
    stats = []
    for p in paths:
        st = os.stat(p)
        stats.append((st.st_size, st.st_mtime_ns))
    with datacache.Lock(cdir):
        datacache.sweep(cdir)
        index = datacache.read_index(cdir, key)
        for attempt in range(2):
            try:
                index = _refresh(cdir, key, index, rel, stats, labels, paths, w, h, c, fit, say)
                break
            except _Deep:   # a 16-bit image: the whole cache as uint16
                index = {"dtype": "uint16", "fresh": True}
    entries = index["entries"]
    slots = np.array([entries[r][2] for r in rel], np.int64)
    bad = {i: entries[r][3] for i, r in enumerate(rel) if entries[r][2] < 0}
    store = CacheFile(cdir / "samples.bin", index["slots"], (h, w, c), index["dtype"])
    if budget is None or store.nbytes <= budget:
        if store.nbytes > LOAD_IN_BACKGROUND:   # training starts while the copy into RAM runs
            store.close()
            return LoadingFile(cdir / "samples.bin", index["slots"], (h, w, c), index["dtype"]), slots, bad
        arr = store.load()
        store.close()
        return arr, slots, bad
    say(f"streaming {size_text(store.nbytes)} of images from the cache {cdir} "
        f"(more than the {size_text(max(0, budget))} of memory left for data)")
    return store, slots, bad


def _refresh(cdir, key, index, rel, stats, labels, paths, w, h, c, fit, say):
    """Bring the cache up to date with the folder; returns the new index."""
    fresh = index is None or index.get("fresh")
    dtype = np.dtype((index or {}).get("dtype", "uint8"))
    sb = w * h * c * dtype.itemsize
    old = {} if fresh else index["entries"]
    entries, todo, used = {}, [], set()
    for i, (r, st) in enumerate(zip(rel, stats)):
        e = old.get(r)
        if e is not None and e[0] == st[0] and e[1] == st[1]:
            entries[r] = e
            if e[2] >= 0:
                used.add(e[2])
        else:
            todo.append(i)
    if not fresh and not todo and len(entries) == len(old):
        return index                                       # nothing changed
    m_old = 0 if fresh else index["slots"]
    free = sorted(set(range(m_old)) - used)
    slot_for = {}
    for k, i in enumerate(todo):
        slot_for[i] = free[k] if k < len(free) else m_old + (k - len(free))
    m = max([m_old] + [s + 1 for s in slot_for.values()]) if not fresh else len(todo)
    if fresh:
        slot_for = {i: i for i in todo}
        target = cdir / f"samples.bin.tmp-{os.getpid()}"
    else:
        target = cdir / "samples.bin"
        interim = {"key": key, "dtype": dtype.name, "slots": m, "sample_bytes": sb, "entries": entries}
        if m != m_old:
            os.truncate(target, m * sb)
        datacache.write_index(cdir, interim)   # a kill from here on re-decodes only `todo`
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, m * sb)
        bar = None
        if len(todo) >= 64:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), unit="files", desc=f"caching {len(todo):,} images", disable=None,
                       file=sys.stderr, dynamic_ncols=True, leave=False)
        t0 = time.perf_counter()

        def put(i, a, msg=None):
            r = rel[i]
            if a is None:
                entries[r] = [stats[i][0], stats[i][1], -1, msg, int(labels[i])]
                return
            s = slot_for[i]
            os.pwrite(fd, np.ascontiguousarray(a).tobytes(), s * sb)
            entries[r] = [stats[i][0], stats[i][1], s, None, int(labels[i])]

        try:
            _decode_into([paths[i] for i in todo], w, h, c, fit, dtype,
                         lambda j, a, msg=None: put(todo[j], a, msg), bar)
        finally:
            if bar is not None:
                bar.close()
        os.fsync(fd)
    finally:
        os.close(fd)
    if fresh:
        os.replace(target, cdir / "samples.bin")
    secs = time.perf_counter() - t0
    if len(todo) >= 64:
        say(f"cached {len(todo):,} images in {secs:.1f} s ({len(todo) / max(secs, 1e-9):,.0f} files/s) at {cdir}")
    index = {"key": key, "dtype": dtype.name, "slots": m, "sample_bytes": sb, "entries": entries}
    datacache.write_index(cdir, index)
    return index


