"""flowdsl's image data path, end to end: cache build, refresh, batch serving, training.

    python bench/data_pipeline.py --images 2000 --size 256 --out /tmp/dp [--epochs 2] [--no-train]

1. Generates OUT/images/{circle,square}/: N images of a shape on a noisy background (seeded, so
   the same N and size give the same files), source sizes drawn from 0.75x..2.5x --size (so most
   are resized and large JPEGs go through pillow's draft path), 80% JPEG and 20% PNG. Skipped
   when the folder already holds N images.
2. Cache (FLOWDSL_DATA_CACHE=OUT/cache, emptied first so the build is cold): the cold build
   (files/s), a warm second load (nothing decoded), and a refresh after one image's mtime
   changed (one file decoded). Decodes are counted by wrapping flowdsl.imagefolder._decode.
3. Batches/s at batch 64 (random indices, np.random.default_rng(0)) from RAM (budget=None), from
   the cache file (budget=0) with its pages in the page cache, and streamed again after
   posix_fadvise(DONTNEED) evicted them (a cold page cache, as far as an unprivileged process
   can make one).
4. `flowdsl train` on a small net in a child process, once with the data in RAM and once
   streamed (FLOWDSL_MEM_AVAILABLE set just below what the data would need; the cache is already
   built): img/s of the last epoch from log.csv, and each child's peak RSS (VmHWM printed by
   a runpy wrapper at exit), and the seconds from the child's start to the end of its first
   training step (the cache is warm: "the second run").

Prints a table and writes OUT/summary.json."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

CLASSES = ("circle", "square")
JPEG_SHARE = 0.8
BATCH = 64

# the child: `python -m flowdsl ...` under runpy, printing its own peak RSS on the way out. The
# peak is VmHWM of /proc/self/status, not getrusage's ru_maxrss: Linux carries ru_maxrss across
# fork and exec, so a child reports at least its parent's peak (this script's, which held the
# whole data set in RAM for the batch measurement: the first 30,000-image run "peaked" at 5.9 GB
# streamed because of that, where the child itself stayed near 0.7 GB).
RSS_WRAPPER = (
    "import atexit, runpy, sys, time\n"
    "T0 = time.perf_counter()\n"
    "import flowdsl.net\n"
    "_lg = flowdsl.net.Net.loss_grad\n"
    "def _first(self, *a, **k):\n"
    "    r = _lg(self, *a, **k)\n"
    "    if not getattr(_first, 'done', False):\n"
    "        _first.done = True\n"
    "        sys.stderr.write('FIRST_STEP_S %.3f\\n' % (time.perf_counter() - T0))\n"
    "    return r\n"
    "flowdsl.net.Net.loss_grad = _first\n"
    "def _hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1])\n"
    "    return -1\n"
    "atexit.register(lambda: sys.stderr.write('PEAK_RSS_KB %d\\n' % _hwm()))\n"
    "sys.argv = ['flowdsl'] + sys.argv[1:]\n"
    "runpy.run_module('flowdsl', run_name='__main__', alter_sys=True)\n")


# ---------------------------------------------------------------------------------- images
def _source_size(rng, size):
    """(w, h) of one source image: each side drawn from a few sizes around `size`."""
    choices = [max(8, int(size * f)) for f in (0.75, 1.0, 1.25, 1.5, 2.5)]
    return int(rng.choice(choices)), int(rng.choice(choices))


def _make_image(job):
    """Write image i (class, source size, format and picture all seeded by (seed, i))."""
    i, n, size, seed, folder = job
    from PIL import Image, ImageDraw
    rng = np.random.default_rng([seed, i])
    label = i % len(CLASSES)
    w, h = _source_size(rng, size)
    base = rng.integers(0, 256, 3)
    noise = rng.normal(0.0, 40.0, (h, w, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.15, 0.35) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    box = (cx - r, cy - r, cx + r, cy + r)
    if CLASSES[label] == "circle":
        d.ellipse(box, fill=colour)
    else:
        d.rectangle(box, fill=colour)
    jpeg = rng.random() < JPEG_SHARE
    path = Path(folder) / CLASSES[label] / f"{i:06d}.{'jpg' if jpeg else 'png'}"
    if jpeg:
        img.save(path, "JPEG", quality=90)
    else:
        img.save(path, "PNG")
    return str(path)


def _image_count(folder):
    if not folder.is_dir():
        return 0
    return sum(1 for c in CLASSES if (folder / c).is_dir()
               for p in (folder / c).iterdir() if p.suffix in (".jpg", ".png"))


def generate(folder: Path, n, size, seed, workers):
    """The data set; returns (seconds, generated?). An existing folder of n images is reused."""
    have = _image_count(folder)
    if have == n:
        print(f"images: {folder} already holds {n:,} images; not generating", flush=True)
        return 0.0, False
    if folder.exists():
        print(f"images: {folder} holds {have:,} images, not {n:,}; generating afresh", flush=True)
        shutil.rmtree(folder)
    for c in CLASSES:
        (folder / c).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(i, n, size, seed, str(folder)) for i in range(n)]
    with Pool(processes=max(1, workers)) as pool:
        for _ in pool.imap_unordered(_make_image, jobs, chunksize=max(1, min(64, n // (8 * workers) or 1))):
            pass
    secs = time.perf_counter() - t0
    print(f"images: generated {n:,} in {secs:.1f} s ({n / max(secs, 1e-9):,.0f} files/s) at {folder}",
          flush=True)
    return secs, True


# ----------------------------------------------------------------------------------- cache
class DecodeCounter:
    """Counts calls of flowdsl.imagefolder._decode (looked up as a module global, so wrapping
    the attribute sees every decode, in every decoding thread)."""

    def __init__(self):
        import threading
        from flowdsl import imagefolder
        self.mod, self.orig, self.n, self.lock = imagefolder, imagefolder._decode, 0, threading.Lock()

        def counted(*a, **k):
            with self.lock:
                self.n += 1
            return self.orig(*a, **k)
        imagefolder._decode = counted

    def take(self):
        n, self.n = self.n, 0
        return n


def load(call, folder, shape, budget, notes):
    from flowdsl.data import load_source
    t0 = time.perf_counter()
    ds = load_source(call, str(folder.parent), shape, budget=budget, say=notes.append)
    return ds, time.perf_counter() - t0


def cache_bench(call, folder, shape, n, res):
    counter = DecodeCounter()
    notes = []
    ds, cold = load(call, folder, shape, None, notes)
    res["cold_build_s"] = cold
    res["cold_files_per_s"] = n / max(cold, 1e-9)
    res["cold_decodes"] = counter.take()
    res["samples"] = len(ds)
    res["dataset_bytes"] = int(ds.store.nbytes)
    res["library_note"] = next((s for s in notes if s.startswith("cached")), "")
    del ds
    t0 = time.perf_counter()
    ds, warm = load(call, folder, shape, None, notes)
    res["warm_open_held_s"] = warm          # what training waits for
    if hasattr(ds.store, "wait"):           # a large cache is copied into RAM in the background
        ds.store.wait()
    res["warm_load_s"] = time.perf_counter() - t0
    res["warm_decodes"] = counter.take()
    del ds
    ds, warm_stream = load(call, folder, shape, 0, notes)
    res["warm_open_streamed_s"] = warm_stream
    res["warm_open_streamed_decodes"] = counter.take()
    cache_file = ds.store.path if ds.streamed else None
    del ds
    # touch one image: a new mtime, the same bytes
    victim = sorted((folder / CLASSES[0]).iterdir())[0]
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    ds, refresh = load(call, folder, shape, None, notes)
    res["refresh_one_s"] = refresh
    res["refresh_decodes"] = counter.take()
    del ds
    ds, again = load(call, folder, shape, None, notes)
    res["after_refresh_load_s"] = again
    res["after_refresh_decodes"] = counter.take()
    del ds
    return cache_file


# --------------------------------------------------------------------------------- batches
def _evict(path):
    """Drop a file's (clean) pages from the page cache; False where that is not possible."""
    if not path or not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def batch_rate(ds, batches, evict=None):
    n = len(ds)
    rng = np.random.default_rng(0)
    b = min(BATCH, n)
    idx = [rng.choice(n, b, replace=False) for _ in range(batches)]
    ds.batch(idx[0][:2])                   # numba compile / load outside the timing
    evicted = _evict(evict) if evict else None
    t0 = time.perf_counter()
    served = 0
    for ix in idx:
        x = ds.batch(ix)
        served += x.nbytes
    secs = time.perf_counter() - t0
    compact = batches * b * ds.sample_bytes
    out = {"batches_per_s": batches / secs, "img_per_s": batches * b / secs,
           "mb_per_s_float32": served / secs / 1e6, "mb_per_s_compact": compact / secs / 1e6,
           "batches": batches, "batch": b, "seconds": secs}
    if evict:
        out["evicted"] = evicted
    return out


def serve_bench(call, folder, shape, batches, res):
    from flowdsl.data import load_source
    ds = load_source(call, str(folder.parent), shape, budget=None, say=lambda s: None)
    assert not ds.streamed
    if hasattr(ds.store, "wait"):   # a large cache is copied into RAM in the background: wait
        ds.store.wait()
    res["ram"] = batch_rate(ds, batches)
    res["ram"]["resident_mb"] = ds.resident_bytes / 1e6
    del ds
    ds = load_source(call, str(folder.parent), shape, budget=0, say=lambda s: None)
    assert ds.streamed, "budget=0 did not stream"
    res["stream"] = batch_rate(ds, batches)
    res["stream"]["resident_mb"] = ds.resident_bytes / 1e6
    res["stream_cold"] = batch_rate(ds, batches, evict=ds.store.path)
    del ds


# -------------------------------------------------------------------------------- training
# S -> S/4 -> S/8 -> S/16 -> S/32 (strides that tile the input, so no border goes unread).
NET = ("network = input({s}x{s}x3)\n"
       "  :: conv(filters=8, field=8, stride=4, pad=2, act=relu) :: maxpool(2)\n"
       "  :: conv(filters=16, field=4, stride=2, pad=1, act=relu) :: maxpool(2)\n"
       "  :: dense(2) :: softmax\n"
       "train {{ data = images(\"{dir}\", size={s}x{s}, color=rgb)  batch = {batch}  epochs = {epochs}"
       "  optimizer = adam(lr=1e-3)  seed = 1 }}\n")


def _child_env(extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("FLOWDSL_MEM_AVAILABLE", None)
    env.update(extra)
    return env


def stream_memory(flow, data_bytes, batch):
    """A FLOWDSL_MEM_AVAILABLE under which training fits but the data does not (data_budget =
    0.9 * available - the training estimate ends up at half the data's size)."""
    from flowdsl.memory import train_estimate
    from flowdsl.model import load_model
    model = load_model(str(flow))
    est = train_estimate(model, batch)
    return int(math.ceil((est + data_bytes // 2) / 0.9)), est


def train_once(flow, out, epochs, env_extra, label):
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-c", RSS_WRAPPER, "train", str(flow), "--out", str(out),
           "--epochs", str(epochs), "--quiet-bar"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=_child_env(env_extra), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out.parent / f"{out.name}.stderr.txt").write_text(p.stderr)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit(f"train ({label}) failed with exit status {p.returncode}")
    m = re.search(r"PEAK_RSS_KB (\d+)", p.stderr)
    rows = []
    with open(out / "log.csv") as f:
        head = f.readline().strip().split(",")
        for line in f:
            if line.strip():
                rows.append(dict(zip(head, line.strip().split(","))))
    last = rows[-1]
    streamed = "streamed from the cache" in p.stderr
    return {"mode_seen": "streamed" if streamed else "ram", "epoch": int(last["epoch"]),
            "img_per_s": float(last["img_per_s"]), "epoch_seconds": float(last["seconds"]),
            "epochs_img_per_s": [float(r["img_per_s"]) for r in rows],
            "train_acc": float(last["train_acc"]) if last["train_acc"] else float("nan"),
            "peak_rss_mb": int(m.group(1)) / 1024 if m else float("nan"), "wall_s": wall,
            "first_step_s": float(f.group(1)) if (f := re.search(r"FIRST_STEP_S ([0-9.]+)", p.stderr)) else float("nan"),
            "rebuilt_cache": bool(re.search(r"^cached \d", p.stderr, re.M)), "env": env_extra}


def train_bench(folder, size, epochs, data_bytes, out, res, stream_mem=None):
    flow = out / "bench_net.flow"
    flow.write_text(NET.format(s=size, dir=str(folder), batch=BATCH, epochs=epochs))
    chk = subprocess.run([sys.executable, "-m", "flowdsl", "check", str(flow)], env=_child_env({}),
                         capture_output=True, text=True)
    if chk.returncode != 0:
        sys.stderr.write(chk.stdout + chk.stderr)
        raise SystemExit(f"flowdsl check {flow} failed")
    cache_env = {"FLOWDSL_DATA_CACHE": os.environ["FLOWDSL_DATA_CACHE"]}
    ram = train_once(flow, out / "train_ram", epochs, dict(cache_env), "ram")
    if stream_mem is None:
        stream_mem, est = stream_memory(flow, data_bytes, BATCH)
        res["train_estimate_bytes"] = est
    st = train_once(flow, out / "train_stream", epochs,
                    dict(cache_env, FLOWDSL_MEM_AVAILABLE=str(stream_mem)), "stream")
    res["ram"], res["stream"] = ram, st
    res["stream_over_ram"] = st["img_per_s"] / ram["img_per_s"] if ram["img_per_s"] else float("nan")
    res["flow"] = str(flow)
    for r, want in ((ram, "ram"), (st, "streamed")):
        if r["mode_seen"] != want:
            print(f"warning: the {want} training run was {r['mode_seen']}", file=sys.stderr)
        if r["rebuilt_cache"]:
            print(f"warning: the {want} training run rebuilt the cache", file=sys.stderr)


# ---------------------------------------------------------------------------------- report
def table(s):
    c, b, t = s["cache"], s.get("serve", {}), s.get("train")
    lines = [f"data pipeline: {s['images']:,} images, {s['size']}x{s['size']} rgb "
             f"({c['dataset_bytes'] / 1e6:,.1f} MB cached), {os.cpu_count()} cpus", ""]
    lines.append(f"{'cache':30s} {'seconds':>9s} {'files/s':>10s} {'decoded':>8s}")
    lines.append(f"{'  cold build (+ load to RAM)':30s} {c['cold_build_s']:9.3f} {c['cold_files_per_s']:10,.0f} "
                 f"{c['cold_decodes']:8d}")
    if "warm_open_held_s" in c:
        lines.append(f"{'  warm open, held':30s} {c['warm_open_held_s']:9.3f}")
    for k, name in (("warm_load", "  warm load to RAM"), ("warm_open_streamed", "  warm open, streamed"),
                    ("refresh_one", "  refresh after 1 touched"), ("after_refresh_load", "  load after refresh")):
        lines.append(f"{name:30s} {c[k + '_s']:9.3f} {'':>10s} {c[_dec(k)]:8d}")
    if b:
        lines += ["", f"{'batches (64, random)':30s} {'batch/s':>9s} {'img/s':>10s} {'MB/s f32':>9s} {'MB/s u8':>8s}"]
        for k, name in (("ram", "  RAM"), ("stream", "  cache file (page cache)"),
                        ("stream_cold", "  cache file (evicted)")):
            r = b[k]
            lines.append(f"{name:30s} {r['batches_per_s']:9,.1f} {r['img_per_s']:10,.0f} "
                         f"{r['mb_per_s_float32']:9,.0f} {r['mb_per_s_compact']:8,.0f}")
    if t:
        lines += ["", f"{'training (flowdsl train)':30s} {'epoch':>5s} {'img/s':>9s} {'peak RSS':>9s} {'mode':>9s} "
                      f"{'1st step':>9s}"]
        for k, name in (("ram", "  data in RAM"), ("stream", "  streamed")):
            r = t[k]
            lines.append(f"{name:30s} {r['epoch']:5d} {r['img_per_s']:9,.0f} {r['peak_rss_mb']:7,.0f}MB "
                         f"{r['mode_seen']:>9s} {r.get('first_step_s', float('nan')):8.2f}s")
        lines.append(f"{'  streamed / RAM':30s} {'':5s} {t['stream_over_ram']:9.2f}")
        if t["ram"]["epoch"] == 1:
            lines.append("  (epoch 1 includes loading the numba kernels: use --epochs 2 or more)")
    return "\n".join(lines)


def _dec(k):
    return {"warm_load": "warm_decodes", "warm_open_streamed": "warm_open_streamed_decodes",
            "refresh_one": "refresh_decodes", "after_refresh_load": "after_refresh_decodes"}[k]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="number of images (default 2000)")
    ap.add_argument("--size", type=int, default=256, help="model input side S (SxSx3; default 256)")
    ap.add_argument("--out", default="/tmp/dp", help="output folder (images, cache, runs, summary.json)")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs per mode (default 2)")
    ap.add_argument("--batches", type=int, default=50, help="batches timed per serving mode (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="image generation processes")
    ap.add_argument("--stream-mem", type=int, default=None,
                    help="FLOWDSL_MEM_AVAILABLE for the streamed run (default: computed to just stream)")
    ap.add_argument("--no-train", action="store_true", help="skip the training runs")
    a = ap.parse_args(argv)
    if a.images < 2 * len(CLASSES):
        ap.error("--images must be at least 4")
    if a.size < 32 or a.size % 32:
        ap.error("--size must be a multiple of 32 (the net's strides and pools divide it by 32)")

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "images"
    cache = out / "cache"
    if cache.exists():
        shutil.rmtree(cache)      # a cold build every run
    cache.mkdir()
    os.environ["FLOWDSL_DATA_CACHE"] = str(cache)
    os.environ.pop("FLOWDSL_MEM_AVAILABLE", None)

    summary = {"images": a.images, "size": a.size, "seed": a.seed, "out": str(out), "cpus": os.cpu_count()}
    gen_s, generated = generate(folder, a.images, a.size, a.seed, a.workers)
    summary["generate"] = {"seconds": gen_s, "generated": generated}

    import PIL.Image  # noqa: F401  imported before the timings
    from flowdsl.data import parse_source
    call = parse_source(f'images("{folder}", size={a.size}x{a.size}, color=rgb)')
    shape = (3, a.size, a.size)

    print("cache: cold build, warm load, refresh ...", flush=True)
    summary["cache"] = {}
    cache_bench(call, folder, shape, a.images, summary["cache"])
    print("batches: RAM, cache file ...", flush=True)
    summary["serve"] = {}
    serve_bench(call, folder, shape, a.batches, summary["serve"])
    if not a.no_train:
        print(f"training: {a.epochs} epoch(s) in RAM, then streamed ...", flush=True)
        summary["train"] = {}
        train_bench(folder, a.size, a.epochs, summary["cache"]["dataset_bytes"], out, summary["train"],
                    a.stream_mem)
    text = table(summary)
    print("\n" + text)
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, default=float)
    print(f"\nwrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
