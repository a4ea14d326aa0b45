"""Data larger than memory: the image-folder cache (built once, refreshed per changed file,
never left looking complete by a kill), streaming batches from it, fit modes, bad files."""
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ENV, TOY_NET, run_cli, start_cli, toy_image_folder
from flowdsl import datacache
from flowdsl.data import load_source, parse_source

FLOW = TOY_NET + "train {\n  data = images(\"imgs\", size=8x8)\n  batch = 4\n  epochs = 2\n  seed = 3\n}\n"


def _src(text, shape=(1, 8, 8), budget=None, base=None):
    return load_source(parse_source(text), str(base), shape, budget=budget, say=lambda s: None)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("FLOWDSL_DATA_CACHE", str(d))
    return d


def _index(cache):
    (idx,) = list(cache.glob("*/index.json"))
    return json.loads(idx.read_text())


def test_streamed_and_in_memory_batches_are_identical(tmp_path, cache):
    toy_image_folder(tmp_path / "imgs", per_class=5, shape=(8, 8, 1))
    ram = _src('images("imgs", size=8x8)', base=tmp_path)
    disk = _src('images("imgs", size=8x8)', base=tmp_path, budget=0)
    assert not ram.streamed and disk.streamed and disk.resident_bytes == 0
    assert ram.store.dtype == np.uint8 and ram.resident_bytes == 10 * 64 + 10 * 8
    idx = np.array([7, 0, 3, 3, 9])
    a, b = ram.batch(idx), disk.batch(idx)
    assert a.dtype == np.float32 and a.shape == (5, 8, 8, 1)
    np.testing.assert_array_equal(a, b)
    # the values are those of dividing the decoded bytes by 255 in float32
    px = np.asarray(Image.open(tmp_path / "imgs" / "cat" / "000.png"))
    np.testing.assert_array_equal(ram.batch([0])[0, ..., 0], np.divide(px, np.float32(255), dtype=np.float32))


def test_a_large_cache_is_copied_into_ram_in_the_background(tmp_path, cache, monkeypatch):
    """A held cache above LOAD_IN_BACKGROUND is served from the file while a thread copies it
    into RAM (so training starts at once), then from the array: the same batches throughout."""
    from flowdsl import imagefolder
    from flowdsl.batches import LoadingFile
    toy_image_folder(tmp_path / "imgs", per_class=40, shape=(8, 8, 1))
    ram = _src('images("imgs", size=8x8)', base=tmp_path)
    assert isinstance(ram.store, np.ndarray)
    monkeypatch.setattr(imagefolder, "LOAD_IN_BACKGROUND", 0)
    gate = __import__("threading").Event()
    real = LoadingFile._copy
    monkeypatch.setattr(LoadingFile, "CHUNK", 64)                  # one sample per read
    monkeypatch.setattr(LoadingFile, "_copy", lambda self: (gate.wait(), real(self)))
    bg = _src('images("imgs", size=8x8)', base=tmp_path)
    assert isinstance(bg.store, LoadingFile) and not bg.streamed
    assert bg.resident_bytes == ram.resident_bytes                 # counted as held
    idx = np.array([79, 0, 41, 41, 3])
    assert not bg.store.loaded
    before = bg.batch(idx)                                         # read from the file
    gate.set()
    np.testing.assert_array_equal(bg.store.wait(), ram.store)
    assert bg.store.loaded
    src, rows = bg.fetch(idx)
    assert src is bg.store.array                                   # now served from RAM
    np.testing.assert_array_equal(before, ram.batch(idx))
    np.testing.assert_array_equal(bg.batch(idx), ram.batch(idx))
    # a split keeps serving through the same store
    sub = bg.subset(np.arange(10, 20))
    np.testing.assert_array_equal(sub.batch([0, 9]), ram.batch([10, 19]))


def test_a_truncated_cache_file_stops_the_copy_with_a_named_error(tmp_path):
    from flowdsl.batches import LoadingFile
    f = tmp_path / "samples.bin"
    f.write_bytes(bytes(range(200)))
    lf = LoadingFile(f, 4, (8, 8), np.uint8)                       # promises 256 bytes
    with pytest.raises(OSError, match="short read at byte 200 .*truncated"):
        lf.wait()
    assert not lf.loaded
    with pytest.raises(OSError, match="short read at sample 3"):
        lf.read([3])
    np.testing.assert_array_equal(lf.read([1])[0].reshape(-1), np.arange(64, 128))
    lf.close()


def test_streaming_training_gives_the_same_weights(tmp_path, cache):
    """FLOWDSL_MEM_AVAILABLE low enough to force streaming: bit-identical weights to the run
    that holds the data in memory (same seed), and the run says it streams."""
    toy_image_folder(tmp_path / "imgs", per_class=12, shape=(8, 8, 1))
    (tmp_path / "m.flow").write_text(FLOW)
    env = dict(ENV, FLOWDSL_DATA_CACHE=str(cache))
    r1 = run_cli("train", tmp_path / "m.flow", "--out", tmp_path / "ram", env=env)
    assert r1.returncode == 0, r1.stderr
    assert "MB in memory" in r1.stderr and "of images from the cache" not in r1.stderr
    # the model needs a few MB; leave the data (1.5 KB) no room
    from flowdsl.model import load_model
    need = load_model(tmp_path / "m.flow").memory_estimate(4)
    r2 = run_cli("train", tmp_path / "m.flow", "--out", tmp_path / "disk",
                 env=dict(env, FLOWDSL_MEM_AVAILABLE=str(int((need + 1000) / 0.9))))
    assert r2.returncode == 0, r2.stderr
    assert "of images from the cache" in r2.stderr and "streamed from the cache" in r2.stderr
    a, b = np.load(tmp_path / "ram" / "last.npz"), np.load(tmp_path / "disk" / "last.npz")
    weights = [k for k in a.files if k.startswith("param.")] + ["opt.m", "opt.v"]
    assert weights and all(np.array_equal(a[k], b[k]) for k in weights)
    assert int(a["meta.step"]) == int(b["meta.step"]) == 12


def test_second_run_reuses_the_cache_and_one_touched_file_redecodes_one_entry(tmp_path, cache):
    made = toy_image_folder(tmp_path / "imgs", per_class=4, shape=(8, 8, 1))
    ds = _src('images("imgs", size=8x8)', base=tmp_path)
    first = _index(cache)
    data = next(cache.glob("*/samples.bin"))
    t0 = data.stat().st_mtime_ns
    time.sleep(0.01)
    _src('images("imgs", size=8x8)', base=tmp_path)
    assert _index(cache) == first and data.stat().st_mtime_ns == t0      # nothing decoded again
    # rewrite one image with other pixels: only its entry changes, the others keep their slots
    path = sorted(made)[5]
    new = (255 - made[path]).astype(np.uint8)
    Image.fromarray(new).save(path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    ds2 = _src('images("imgs", size=8x8)', base=tmp_path)
    second = _index(cache)
    rel = os.path.relpath(path, tmp_path / "imgs")
    changed = [k for k in first["entries"] if first["entries"][k] != second["entries"][k]]
    assert changed == [rel] and second["slots"] == first["slots"]
    np.testing.assert_array_equal(ds2.batch([5])[0, ..., 0], new / np.float32(255))
    np.testing.assert_array_equal(ds2.batch([4]), ds.batch([4]))
    # a removed file leaves a free slot that an added file takes
    os.remove(sorted(made)[0])
    Image.fromarray(new).save(tmp_path / "imgs" / "dog" / "zzz.png")
    ds3 = _src('images("imgs", size=8x8)', base=tmp_path)
    assert len(ds3) == 8 and _index(cache)["slots"] == first["slots"]
    np.testing.assert_array_equal(ds3.batch([7])[0, ..., 0], new / np.float32(255))


def test_kill_during_cache_building_then_a_new_run_trains(tmp_path, cache):
    """kill -9 while the cache is being written: no index is left behind, so the next run
    rebuilds it and trains; the killed builder's temporary file is swept."""
    toy_image_folder(tmp_path / "imgs", per_class=300, shape=(48, 48, 1))
    flow = TOY_NET.replace("8x8x1", "48x48x1") + \
        "train {\n  data = images(\"imgs\", size=48x48)\n  batch = 50\n  epochs = 1\n  seed = 1\n}\n"
    (tmp_path / "m.flow").write_text(flow)
    env = dict(ENV, FLOWDSL_DATA_CACHE=str(cache))
    p = start_cli("train", tmp_path / "m.flow", "--out", tmp_path / "r", env=env,
                  stdout=-1, stderr=-1)
    deadline = time.time() + 60
    while time.time() < deadline and not list(cache.glob("*/samples.bin.tmp-*")):
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not list(cache.glob("*/index.json")), "a killed build must not look complete"
    r = run_cli("train", tmp_path / "m.flow", "--out", tmp_path / "r", env=env)
    assert r.returncode == 0, r.stderr
    idx = _index(cache)
    assert len(idx["entries"]) == 600 and not list(cache.glob("*/*.tmp-*"))
    ds = _src('images("imgs", size=48x48)', shape=(1, 48, 48), base=tmp_path)
    px = np.asarray(Image.open(tmp_path / "imgs" / "dog" / "299.png"))
    np.testing.assert_array_equal(ds.batch([599])[0, ..., 0], px / np.float32(255))


def test_bad_files_error_names_the_file_and_skip_leaves_them_out(tmp_path, cache):
    toy_image_folder(tmp_path / "imgs", per_class=3, shape=(8, 8, 1))
    bad = tmp_path / "imgs" / "cat" / "001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    (tmp_path / "imgs" / "dog" / "x.jpg").write_bytes(b"not a jpeg")
    from flowdsl.errors import FlowError
    with pytest.raises(FlowError) as e:
        _src('images("imgs", size=8x8)', base=tmp_path)
    assert e.value.file == str(bad) and "bad=skip" in e.value.message and "2 unreadable" in e.value.message
    ds = _src('images("imgs", size=8x8, bad=skip)', base=tmp_path)
    assert len(ds) == 5 and list(ds.y) == [0, 0, 1, 1, 1]
    assert ds.notes and "skipped 2 unreadable images" in ds.notes[0] and "001.png" in ds.notes[0]


def test_unusable_cache_dir_falls_back_with_a_message(tmp_path, monkeypatch):
    toy_image_folder(tmp_path / "imgs", per_class=2, shape=(8, 8, 1))
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("FLOWDSL_DATA_CACHE", str(blocker / "cache"))
    said = []
    ds = load_source(parse_source('images("imgs", size=8x8)'), str(tmp_path), (1, 8, 8), say=said.append)
    assert len(ds) == 4 and not ds.streamed
    assert said and "cannot use the data cache" in said[0] and "in memory" in said[0]


@pytest.mark.parametrize("fit", ["stretch", "crop", "pad"])
def test_fit_modes(tmp_path, cache, fit):
    """A 16x8 image (left half black, right half white, a gray 4-pixel band in the middle)
    fitted to 8x8: stretch squeezes it, crop keeps the middle square, pad letterboxes it."""
    a = np.zeros((8, 16), np.uint8)
    a[:, 8:] = 255
    a[:, 6:10] = 128
    (tmp_path / "imgs" / "k").mkdir(parents=True)
    Image.fromarray(a).save(tmp_path / "imgs" / "k" / "a.png")
    x = _src(f'images("imgs", size=8x8, fit={fit})', base=tmp_path).x[0, ..., 0]
    if fit == "crop":   # the middle 8 columns: 4..12 -> black 2, gray 4, white 2
        np.testing.assert_allclose(x[0], np.array([0, 0, 128, 128, 128, 128, 255, 255]) / 255, atol=0.06)
    elif fit == "pad":  # 8x4 image in rows 2..6, black bars above and below
        assert (x[:2] == 0).all() and (x[6:] == 0).all() and x[2:6, -1].min() > 0.9
    else:
        assert x[:, 0].max() < 0.05 and x[:, -1].min() > 0.95 and 0.3 < x[0, 4] < 0.7


def test_idx_too_large_for_the_budget_streams_from_the_cache(tmp_path, cache):
    """IDX images that do not fit the budget are decompressed once into the cache and served
    from it, equal to the in-memory ones; a second load reuses the cache file."""
    import gzip
    import struct
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (30, 6, 5), dtype=np.uint8)
    labs = rng.integers(0, 3, 30).astype(np.uint8)
    (tmp_path / "i.gz").write_bytes(gzip.compress(b"\0\0\x08\x03" + struct.pack(">3I", 30, 6, 5) + imgs.tobytes()))
    (tmp_path / "l").write_bytes(b"\0\0\x08\x01" + struct.pack(">I", 30) + labs.tobytes())
    text = 'idx("i.gz", "l")'
    ram = _src(text, shape=(1, 6, 5), base=tmp_path)
    said = []
    disk = load_source(parse_source(text), str(tmp_path), (1, 6, 5), budget=100, say=said.append)
    assert not ram.streamed and disk.streamed and said and "streaming" in said[0]
    idx = np.array([29, 0, 14])
    np.testing.assert_array_equal(disk.batch(idx), ram.batch(idx))
    np.testing.assert_array_equal(disk.y, labs)
    data = next(cache.glob("*/samples.bin"))
    t0 = data.stat().st_mtime_ns
    vec = load_source(parse_source(text), str(tmp_path), (30,), budget=100, say=said.append)
    assert data.stat().st_mtime_ns == t0
    np.testing.assert_array_equal(vec.batch(idx), ram.batch(idx).reshape(3, 30))


def test_prefetch_serves_steps_in_order_raises_errors_and_stops():
    from flowdsl.batches import Direct, Prefetch, prefetcher
    made = []

    def make(step):
        made.append(step)
        if step == 7:
            raise ValueError("bad batch 7")
        return step * 10

    p = Prefetch(make, 3, 20, depth=2)
    assert [p.get(s) for s in range(3, 7)] == [30, 40, 50, 60]
    with pytest.raises(ValueError, match="bad batch 7"):
        p.get(7)
    p.close()
    assert not p.thread.is_alive() and max(made) == 7   # the thread stopped at the error

    p = Prefetch(lambda s: time.sleep(0.01) or s, 0, 10 ** 6, depth=2)
    assert p.get(0) == 0
    p.close()
    assert not p.thread.is_alive()
    assert Direct(lambda s: -s, 0, 5).get(4) == -4


@pytest.mark.parametrize("env, streamed, expect", [
    (None, True, "Prefetch"), (None, False, "Direct"), ("inline", True, "Direct"), ("thread", False, "Prefetch")])
def test_prefetcher_choice(monkeypatch, env, streamed, expect):
    from flowdsl.batches import prefetcher
    if env is None:
        monkeypatch.delenv("FLOWDSL_PREFETCH", raising=False)
    else:
        monkeypatch.setenv("FLOWDSL_PREFETCH", env)
    assert prefetcher(streamed).__name__ == expect
