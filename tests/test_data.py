"""Data sources (flowdsl/data.py): every source, every error path. Fixtures are generated in
tmp_path; nothing binary is committed."""
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import toy_image_folder
from PIL import Image

from flowdsl import data
from flowdsl.data import Dataset, check_labels, load_image_files, load_source, read_idx, split
from flowdsl.errors import FlowError
from flowdsl.model import build_text

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------ fixture helpers
def source(tmp_path, text, shape="28x28x1", classes=10):
    """A data source CallValue parsed by the real parser, and the model's input shape."""
    m = build_text(f"input({shape}) :: dense({classes}) :: softmax\ntrain {{ data = {text} }}",
                   str(tmp_path / "m.flow"))
    return m.train["data"], m.input_shape


def load(tmp_path, text, shape="28x28x1", **kw):
    call, ishape = source(tmp_path, text, shape)
    return load_source(call, tmp_path, ishape, **kw)


def idx_bytes(arr, code=0x08):
    arr = np.asarray(arr)
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(dt).tobytes()


def write(path, raw, gz=False):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def mnist_like(n=12, rows=28, cols=28, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    return x, y


def write_idx_pair(folder, x, y, gz=True, names=("img.gz", "lab.gz")):
    folder = Path(folder)
    return (write(folder / names[0], idx_bytes(x), gz), write(folder / names[1], idx_bytes(y), gz))


def save_png(path, arr, mode=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    img.save(path)
    return path


def err(fn, *a, **kw) -> FlowError:
    with pytest.raises(FlowError) as e:
        fn(*a, **kw)
    return e.value


# ------------------------------------------------------------------------------------ images()
def test_images_folder_layout_values_and_order(tmp_path):
    made = toy_image_folder(tmp_path / "d", classes=("b_dog", "a_cat"), per_class=3)
    (tmp_path / "d" / "a_cat" / ".hidden.png").write_bytes(b"junk")         # hidden: ignored
    (tmp_path / "d" / "a_cat" / "notes.txt").write_text("not an image")      # not an image: ignored
    (tmp_path / "d" / ".git").mkdir()                                          # hidden folder: no class
    (tmp_path / "d" / "README").write_text("top-level file: ignored")
    ds = load(tmp_path, 'images("d")', "4x4x1")
    assert ds.classes == ["a_cat", "b_dog"]
    assert ds.x.shape == (6, 4, 4, 1) and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64 and ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    want = [made[tmp_path / "d" / c / f"{i:03d}.png"] for c in ("a_cat", "b_dog") for i in range(3)]
    np.testing.assert_array_equal(ds.x[..., 0], np.stack(want).astype(np.float32) / 255)
    assert "images(" in ds.source


def test_images_extensions_case_insensitive_and_formats(tmp_path):
    a = np.full((4, 4), 200, np.uint8)
    save_png(tmp_path / "d" / "x" / "0.PNG", a)
    Image.fromarray(a).save(tmp_path / "d" / "x" / "1.BMP")
    Image.fromarray(a).save(tmp_path / "d" / "x" / "2.gif")
    Image.fromarray(a).save(tmp_path / "d" / "x" / "3.tif")
    Image.fromarray(a).save(tmp_path / "d" / "x" / "4.webp", lossless=True)
    Image.fromarray(a).save(tmp_path / "d" / "x" / "5.jpeg", quality=100)
    ds = load(tmp_path, 'images("d")', "4x4x1")
    assert len(ds) == 6
    np.testing.assert_allclose(ds.x, 200 / 255, atol=3 / 255)


def test_images_resized_to_model_input_and_size_argument(tmp_path):
    toy_image_folder(tmp_path / "d", per_class=2, shape=(6, 10, 1))
    ds = load(tmp_path, 'images("d")', "5x3x1")               # W=5, H=3
    assert ds.x.shape == (4, 3, 5, 1)
    ds2 = load(tmp_path, 'images("d", size=5x3)', "5x3x1")
    np.testing.assert_array_equal(ds.x, ds2.x)
    # bilinear: a constant image stays constant
    save_png(tmp_path / "c" / "k" / "a.png", np.full((9, 9), 51, np.uint8))
    ds3 = load(tmp_path, 'images("c")', "4x4x1")
    np.testing.assert_allclose(ds3.x, 0.2, atol=1e-6)


def test_images_size_or_color_contradicting_the_model(tmp_path):
    toy_image_folder(tmp_path / "d", per_class=1)
    e = err(load, tmp_path, 'images("d", size=8x8)', "4x4x1")
    assert "size=8x8" in str(e) and "4x4x1" in str(e)
    e = err(load, tmp_path, 'images("d", color=rgb)', "4x4x1")
    assert "color=rgb" in str(e) and "4x4x1" in str(e)
    e = err(load, tmp_path, 'images("d", color=gray)', "4x4x3")
    assert "color=gray" in str(e)
    e = err(load, tmp_path, 'images("d")', "4x4x2")
    assert "channel" in str(e)


def test_images_gray_and_rgb_conversions(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[1, 0] = (0, 0, 255)
    rgb[1, 1] = (10, 20, 30)
    save_png(tmp_path / "d" / "k" / "a.png", rgb)
    ds = load(tmp_path, 'images("d")', "2x2x3")
    np.testing.assert_array_equal(ds.x[0], rgb / np.float32(255))
    ds = load(tmp_path, 'images("d", color=gray)', "2x2x1")          # RGB -> L (ITU-R 601-2 luma)
    want = np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255
    np.testing.assert_array_equal(ds.x[0, ..., 0], want)
    # gray images into an rgb model: three equal channels
    save_png(tmp_path / "g" / "k" / "a.png", np.array([[0, 100], [200, 255]], np.uint8))
    ds = load(tmp_path, 'images("g")', "2x2x3")
    assert ds.x.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(ds.x[0, ..., 0], ds.x[0, ..., 2])
    np.testing.assert_allclose(ds.x[0, ..., 1], np.array([[0, 100], [200, 255]]) / 255, atol=1e-7)


def test_images_rgba_palette_la_cmyk(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 40, 80, 120, 7     # nearly transparent
    (tmp_path / "rgba" / "k").mkdir(parents=True)
    Image.fromarray(rgba).save(tmp_path / "rgba" / "k" / "a.png")
    ds = load(tmp_path, 'images("rgba")', "2x2x3")
    np.testing.assert_allclose(ds.x[0], np.broadcast_to([40 / 255, 80 / 255, 120 / 255], (2, 2, 3)), atol=1e-7)

    # palette image, with transparency (pillow would warn if converted naively)
    p = Image.new("P", (2, 2))
    p.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * (256 * 3 - 9))
    p.putdata([0, 1, 2, 1])
    p.info["transparency"] = 0
    (tmp_path / "pal" / "k").mkdir(parents=True)
    p.save(tmp_path / "pal" / "k" / "a.png", transparency=0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load(tmp_path, 'images("pal")', "2x2x3")
    np.testing.assert_array_equal(ds.x[0, 0, 0], [0, 0, 0])
    np.testing.assert_array_equal(ds.x[0, 0, 1], [1, 1, 1])
    np.testing.assert_array_equal(ds.x[0, 1, 0], [1, 0, 0])

    la = Image.fromarray(np.array([[[100, 0], [200, 255]]], np.uint8).reshape(1, 2, 2), "LA")
    (tmp_path / "la" / "k").mkdir(parents=True)
    la.save(tmp_path / "la" / "k" / "a.png")
    ds = load(tmp_path, 'images("la")', "2x1x1")
    np.testing.assert_allclose(ds.x[0, 0, :, 0], [100 / 255, 200 / 255], atol=1e-7)

    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))                       # pure red
    (tmp_path / "cmyk" / "k").mkdir(parents=True)
    cmyk.save(tmp_path / "cmyk" / "k" / "a.jpg", quality=100)
    ds = load(tmp_path, 'images("cmyk")', "2x2x3")
    np.testing.assert_allclose(ds.x[0, ..., 0], 1.0, atol=0.03)
    np.testing.assert_allclose(ds.x[0, ..., 1:], 0.0, atol=0.03)
    ds = load(tmp_path, 'images("cmyk")', "2x2x1")
    assert ds.x.shape == (1, 2, 2, 1)


def test_images_16bit_scaled_not_clipped(tmp_path):
    a = np.array([[0, 1000], [32768, 65535]], np.uint16)
    (tmp_path / "d" / "k").mkdir(parents=True)
    Image.fromarray(a).save(tmp_path / "d" / "k" / "a.png")
    assert Image.open(tmp_path / "d" / "k" / "a.png").mode.startswith("I")
    ds = load(tmp_path, 'images("d")', "2x2x1")
    np.testing.assert_allclose(ds.x[0, ..., 0], a / 65535.0, atol=1e-6)
    ds = load(tmp_path, 'images("d")', "2x2x3")
    np.testing.assert_allclose(ds.x[0, ..., 2], a / 65535.0, atol=1e-6)
    # resized in float, not through 8 bits
    ds = load(tmp_path, 'images("d")', "1x1x1")
    assert 0.0 < ds.x[0, 0, 0, 0] < 1.0


def test_images_corrupt_and_truncated_files_named(tmp_path):
    toy_image_folder(tmp_path / "d", per_class=2)
    bad = tmp_path / "d" / "cat" / "zzz.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    e = err(load, tmp_path, 'images("d")', "4x4x1")
    assert str(bad) in str(e) and "cannot read image" in str(e)

    big = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    good = save_png(tmp_path / "t" / "k" / "a.png", big)
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) // 2])
    e = err(load, tmp_path, 'images("t")', "64x64x1")
    assert str(good) in str(e)

    jpg = tmp_path / "j" / "k" / "a.jpg"
    jpg.parent.mkdir(parents=True)
    Image.fromarray(big).save(jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[:300])
    e = err(load, tmp_path, 'images("j")', "64x64x1")
    assert str(jpg) in str(e)


def test_images_empty_class_folder_no_classes_missing_dir(tmp_path):
    toy_image_folder(tmp_path / "d", per_class=1)
    (tmp_path / "d" / "empty").mkdir()
    (tmp_path / "d" / "empty" / "readme.txt").write_text("no images here")
    e = err(load, tmp_path, 'images("d")', "4x4x1")
    assert "empty" in str(e) and "no images" in str(e)

    (tmp_path / "flat").mkdir()
    save_png(tmp_path / "flat" / "a.png", np.zeros((4, 4), np.uint8))
    e = err(load, tmp_path, 'images("flat")', "4x4x1")
    assert "no class folders" in str(e)

    e = err(load, tmp_path, 'images("nowhere")', "4x4x1")
    assert f"no such file or directory: {tmp_path / 'nowhere'}" in str(e)


def test_images_classes_from_checkpoint(tmp_path):
    toy_image_folder(tmp_path / "d", classes=("cat", "dog"), per_class=1)
    ds = load(tmp_path, 'images("d")', "4x4x1", classes=["cat", "dog"])
    assert ds.classes == ["cat", "dog"]
    e = err(load, tmp_path, 'images("d")', "4x4x1", classes=["cat", "dog", "eel"])
    assert "eel" in str(e)
    e = err(load, tmp_path, 'images("d")', "4x4x1", classes=["dog", "cat"])
    assert "order" in str(e)


def test_images_many_files_threaded_deterministic(tmp_path):
    made = toy_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=70, shape=(8, 8, 1))
    ds = load(tmp_path, 'images("d")', "8x8x1")
    assert len(ds) == 210
    want = np.stack([made[p] for p in sorted(made)]).astype(np.float32) / 255
    np.testing.assert_array_equal(ds.x[..., 0], want)
    assert ds.y.tolist() == [0] * 70 + [1] * 70 + [2] * 70
    # a bad file among many: the error names it
    bad = tmp_path / "d" / "b" / "033.png"
    bad.write_bytes(b"garbage")
    e = err(load, tmp_path, 'images("d")', "8x8x1")
    assert str(bad) in str(e)


def test_images_into_vector_model(tmp_path):
    toy_image_folder(tmp_path / "d", per_class=1, shape=(4, 4, 1))
    ds = load(tmp_path, 'images("d")', "16")
    assert ds.x.shape == (2, 16)
    ds = load(tmp_path, 'images("d", size=2x2, color=rgb)', "12")
    assert ds.x.shape == (2, 12)
    e = err(load, tmp_path, 'images("d")', "15")
    assert "size=" in str(e)


def test_load_image_files(tmp_path):
    a = save_png(tmp_path / "a.png", np.full((6, 6), 255, np.uint8))
    b = save_png(tmp_path / "b.png", np.zeros((3, 3, 3), np.uint8))
    x = load_image_files([a, str(b)], (1, 4, 4))
    assert x.shape == (2, 4, 4, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], 1.0)
    np.testing.assert_allclose(x[1], 0.0)
    x = load_image_files([a], (3, 4, 4))
    assert x.shape == (1, 4, 4, 3)
    assert load_image_files([a], (16,)).shape == (1, 16)
    e = err(load_image_files, [tmp_path / "missing.png"], (1, 4, 4))
    assert f"no such file: {tmp_path / 'missing.png'}" in str(e)
    e = err(load_image_files, [a], (1, 4, 4), color="rgb")
    assert "color=rgb" in str(e)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    e = err(load_image_files, [bad], (1, 4, 4))
    assert str(bad) in str(e)


# --------------------------------------------------------------------------------------- idx()
@pytest.mark.parametrize("gz", [True, False])
def test_idx_gz_and_plain(tmp_path, gz):
    x, y = mnist_like()
    write_idx_pair(tmp_path / "m", x, y, gz=gz, names=("i.idx", "l.idx"))
    ds = load(tmp_path, 'idx("m/i.idx", "m/l.idx")')
    assert ds.x.shape == (12, 28, 28, 1) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.x[..., 0], x / np.float32(255))
    assert ds.y.dtype == np.int64 and ds.y.tolist() == y.tolist()
    assert ds.classes == [str(i) for i in range(10)]
    assert ds.x.flags.writeable            # the caller owns x, the cache is not exposed


def test_idx_gzip_detected_by_magic_not_extension(tmp_path):
    x, y = mnist_like(n=3)
    write(tmp_path / "plain.gz", idx_bytes(x))            # not gzipped despite the name
    write(tmp_path / "zipped.bin", idx_bytes(y), gz=True)  # gzipped despite the name
    ds = load(tmp_path, 'idx("plain.gz", "zipped.bin")')
    assert len(ds) == 3


def test_idx_into_vector_model_and_shape_mismatch(tmp_path):
    x, y = mnist_like(n=4)
    write_idx_pair(tmp_path, x, y)
    ds = load(tmp_path, 'idx("img.gz", "lab.gz")', "784")
    assert ds.x.shape == (4, 784)
    np.testing.assert_array_equal(ds.x[1], x[1].reshape(-1) / np.float32(255))
    e = err(load, tmp_path, 'idx("img.gz", "lab.gz")', "32x32x1")
    assert "28x28x1" in str(e) and "32x32x1" in str(e) and "img.gz" in str(e)


def test_idx_errors(tmp_path):
    x, y = mnist_like(n=5)
    lab = write(tmp_path / "lab", idx_bytes(y))
    good = idx_bytes(x)

    def bad_images(name, raw, gz=False):
        write(tmp_path / name, raw, gz)
        return err(load, tmp_path, f'idx("{name}", "lab")')

    e = bad_images("magic", b"\x12\x34" + good[2:])
    assert "magic" in str(e) and "12 34" in str(e) and str(tmp_path / "magic") in str(e)
    e = bad_images("float", idx_bytes(x.astype(np.float32), code=0x0D))
    assert "type 08" in str(e)
    e = bad_images("trunc", good[:-100])
    assert "truncated" in str(e) and str(tmp_path / "trunc") in str(e)
    e = bad_images("trunc.gz", good[:-100], gz=True)
    assert "truncated" in str(e)
    e = bad_images("head", good[:10])
    assert "truncated" in str(e)
    e = bad_images("tiny", b"\x00\x00")
    assert "truncated" in str(e)
    e = bad_images("extra", good + b"\x00" * 7)
    assert "7 unexpected bytes" in str(e)
    e = bad_images("badgz", gzip.compress(good)[:-20])
    assert "gzip" in str(e) and str(tmp_path / "badgz") in str(e)

    # labels: must be 1-D; counts must agree
    write(tmp_path / "img", good)
    write(tmp_path / "lab2d", idx_bytes(np.zeros((5, 2), np.uint8)))
    e = err(load, tmp_path, 'idx("img", "lab2d")')
    assert "1 dimension" in str(e) and "lab2d" in str(e)
    write(tmp_path / "lab4", idx_bytes(y[:4]))
    e = err(load, tmp_path, 'idx("img", "lab4")')
    assert "5 images" in str(e) and "4 labels" in str(e)
    e = err(load, tmp_path, 'idx("img", "nope.gz")')
    assert f"no such file: {tmp_path / 'nope.gz'}" in str(e)
    assert lab.exists()


def test_idx_cache(tmp_path):
    x, y = mnist_like(n=3)
    img, _ = write_idx_pair(tmp_path, x, y)
    a = read_idx(img)
    assert read_idx(img) is a and not a.flags.writeable
    # a rewritten file is read again
    x2, _ = mnist_like(n=4, seed=5)
    os.utime(write(img, idx_bytes(x2), gz=True), ns=(1, 10**9 + 7))
    assert read_idx(img).shape == (4, 28, 28)


def test_relative_paths_resolve_against_base_dir(tmp_path, monkeypatch):
    x, y = mnist_like(n=2)
    write_idx_pair(tmp_path / "sub", x, y)
    monkeypatch.chdir(Path(tmp_path).anchor)
    call, shape = source(tmp_path, 'idx("sub/img.gz", "sub/lab.gz")')
    assert len(load_source(call, tmp_path, shape)) == 2
    e = err(load_source, call, tmp_path / "elsewhere", shape)
    assert f"no such file: {tmp_path / 'elsewhere' / 'sub' / 'img.gz'}" in str(e)


# --------------------------------------------------------------------------------------- npz()
def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)             # H=5, W=4, C=3
    y = np.arange(6) % 3
    np.savez(tmp_path / "a.npz", x=nhwc, y=y)
    ds = load(tmp_path, 'npz("a.npz")', "4x5x3")
    np.testing.assert_array_equal(ds.x, nhwc / np.float32(255))
    assert ds.y.tolist() == y.tolist() and ds.classes == ["0", "1", "2"]

    nchw = rng.random((6, 3, 5, 4)).astype(np.float64)
    np.savez(tmp_path / "b.npz", images=nchw, labels=y.astype(np.float32))
    ds = load(tmp_path, 'npz("b.npz", x="images", y="labels")', "4x5x3")
    assert ds.x.dtype == np.float32 and ds.x.shape == (6, 5, 4, 3)
    np.testing.assert_allclose(ds.x, nchw.transpose(0, 2, 3, 1), rtol=1e-6)
    assert ds.y.dtype == np.int64

    nhw = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    onehot = np.eye(3, dtype=np.float32)[y]
    np.savez(tmp_path / "c.npz", x=nhw, y=onehot)
    ds = load(tmp_path, 'npz("c.npz")', "4x5x1")
    assert ds.x.shape == (6, 5, 4, 1) and ds.y.tolist() == y.tolist()
    ds = load(tmp_path, 'npz("c.npz")', "20")
    assert ds.x.shape == (6, 20)


def test_npz_errors(tmp_path):
    y = np.zeros(4, np.int64)
    np.savez(tmp_path / "obj.npz", x=np.array([[1], "a", None, 2], dtype=object), y=y)
    e = err(load, tmp_path, 'npz("obj.npz")', "1")
    assert "refusing pickled data" in str(e) and "obj.npz" in str(e)

    (tmp_path / "pickle.npz").write_bytes(pickle.dumps({"x": [1, 2]}))
    e = err(load, tmp_path, 'npz("pickle.npz")', "1")
    assert "refusing pickled data" in str(e) and "pickle.npz" in str(e)

    x = np.zeros((4, 2, 2, 1), np.float32)
    x[2, 1, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    e = err(load, tmp_path, 'npz("nan.npz")', "2x2x1")
    assert "NaN" in str(e) and str(tmp_path / "nan.npz") in str(e)
    x[2, 1, 0, 0] = np.inf
    np.savez(tmp_path / "inf.npz", x=x, y=y)
    e = err(load, tmp_path, 'npz("inf.npz")', "2x2x1")
    assert "Inf" in str(e)

    np.savez(tmp_path / "ok.npz", x=np.zeros((4, 2, 2, 1), np.uint8), y=y)
    e = err(load, tmp_path, 'npz("ok.npz", y="labels")', "2x2x1")
    assert "no array 'labels'" in str(e) and "x, y" in str(e)
    e = err(load, tmp_path, 'npz("ok.npz")', "3x3x1")
    assert "(4, 2, 2, 1)" in str(e) and "3x3x1" in str(e)

    np.savez(tmp_path / "count.npz", x=np.zeros((4, 2, 2, 1), np.uint8), y=np.zeros(3, np.int64))
    e = err(load, tmp_path, 'npz("count.npz")', "2x2x1")
    assert "4 samples" in str(e) and "3 labels" in str(e)

    np.savez(tmp_path / "frac.npz", x=np.zeros((2, 2, 2, 1), np.uint8), y=np.array([0.5, 1.0]))
    e = err(load, tmp_path, 'npz("frac.npz")', "2x2x1")
    assert "whole numbers" in str(e)

    np.save(tmp_path / "single.npy", np.zeros(3))
    os.rename(tmp_path / "single.npy", tmp_path / "single.npz")
    e = err(load, tmp_path, 'npz("single.npz")', "2x2x1")
    assert "np.savez" in str(e)

    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated zip")
    e = err(load, tmp_path, 'npz("junk.npz")', "2x2x1")
    assert "junk.npz" in str(e)

    e = err(load, tmp_path, 'npz("missing.npz")', "2x2x1")
    assert f"no such file: {tmp_path / 'missing.npz'}" in str(e)


# --------------------------------------------------------------------------------------- csv()
def test_csv_kaggle_style(tmp_path):
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (5, 12))                               # 2x2x3 images, HWC per row
    pix[0, 0] = 255
    y = np.array([3, 1, 4, 1, 5])
    lines = ["label," + ",".join(f"pixel{i}" for i in range(12))]
    lines += [",".join(map(str, [y[r], *pix[r]])) for r in range(5)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n\n")
    ds = load(tmp_path, 'csv("d.csv")', "2x2x3")
    assert ds.x.shape == (5, 2, 2, 3) and ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.x, pix.reshape(5, 2, 2, 3) / 255.0, rtol=1e-6)
    assert ds.y.tolist() == y.tolist() and ds.y.dtype == np.int64
    ds = load(tmp_path, 'csv("d.csv")', "12")
    assert ds.x.shape == (5, 12)


def test_csv_label_column_and_unit_values(tmp_path):
    (tmp_path / "d.csv").write_text("0.5,0.25,1,1.0\n0,1,0,0.75\n")         # no header, label in col 2
    ds = load(tmp_path, 'csv("d.csv", label=2)', "3")
    assert ds.y.tolist() == [1, 0]
    np.testing.assert_allclose(ds.x, [[0.5, 0.25, 1.0], [0, 1, 0.75]])       # already 0..1: not scaled
    # label=-1: the last column, counting from the end as Python does
    (tmp_path / "e.csv").write_text("p0,p1,p2,label\n0.5,0.25,1,1\n0,1,0.75,0\n")
    ds = load(tmp_path, 'csv("e.csv", label=-1)', "3")
    assert ds.y.tolist() == [1, 0]
    np.testing.assert_allclose(ds.x, [[0.5, 0.25, 1.0], [0, 1, 0.75]])
    (tmp_path / "f.csv").write_text("2,0.5,0.25,1\n1,0,1,0\n")
    a, b = load(tmp_path, 'csv("f.csv", label=-4)', "3"), load(tmp_path, 'csv("f.csv", label=0)', "3")
    assert a.y.tolist() == b.y.tolist() == [2, 1] and np.array_equal(a.x, b.x)
    e = err(load, tmp_path, 'csv("e.csv", label=-5)', "3")
    assert "label=-5" in str(e) and "-1..-4 from the end" in str(e)


def test_csv_bad_rows_with_line_numbers(tmp_path):
    (tmp_path / "a.csv").write_text("label,p0,p1\n1,0,255\n2,3,x7\n")
    e = err(load, tmp_path, 'csv("a.csv")', "2")
    assert e.line == 3 and f"{tmp_path / 'a.csv'}:3:" in str(e) and "x7" in str(e)

    (tmp_path / "b.csv").write_text("1,0,255\n\n2,3\n")
    e = err(load, tmp_path, 'csv("b.csv")', "2")
    assert e.line == 3 and "2 values" in str(e)

    (tmp_path / "c.csv").write_text("label,p0,p1\n1,0,1\n# comment\n\n2,nan,0\n")
    e = err(load, tmp_path, 'csv("c.csv")', "2")
    assert e.line == 5 and "NaN" in str(e) and "c.csv" in str(e)

    (tmp_path / "d.csv").write_text("1,0,1\n2.5,0,1\n")
    e = err(load, tmp_path, 'csv("d.csv")', "2")
    assert e.line == 2 and "whole number" in str(e)

    (tmp_path / "e.csv").write_text("1,0,1\n2,0,300\n")
    e = err(load, tmp_path, 'csv("e.csv")', "2")
    assert e.line == 2 and "0..255" in str(e)

    (tmp_path / "f.csv").write_text("1,0,1\n")
    e = err(load, tmp_path, 'csv("f.csv", label=3)', "2")
    assert "label=3" in str(e)
    e = err(load, tmp_path, 'csv("f.csv")', "5")
    assert "2 values" in str(e) and "5" in str(e)

    (tmp_path / "g.csv").write_text("label,p0\n")
    e = err(load, tmp_path, 'csv("g.csv")', "1")
    assert "no rows" in str(e)


# ---------------------------------------------------------------------------- fashion_mnist()
def _fake_fashion(folder, n_train=20, n_test=10):
    rng = np.random.default_rng(3)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write(Path(folder) / f"{prefix}-images-idx3-ubyte.gz", idx_bytes(x), gz=True)
        write(Path(folder) / f"{prefix}-labels-idx1-ubyte.gz", idx_bytes(y), gz=True)


def test_fashion_missing_says_how_to_get_it(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("FLOWDSL_DATA", str(empty))
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIRS", (str(tmp_path / "no-system-copy"),))
    e = err(load, tmp_path, 'fashion_mnist("train")')
    assert "sudo apt-get install dataset-fashion-mnist" in str(e)
    assert "FLOWDSL_DATA" in str(e) and str(empty) in str(e)


@pytest.mark.parametrize("sub", ["", "fashion-mnist"])
def test_fashion_from_flowdsl_data(tmp_path, monkeypatch, sub):
    _fake_fashion(tmp_path / "store" / sub)
    monkeypatch.setenv("FLOWDSL_DATA", str(tmp_path / "store"))
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIRS", ())
    tr = load(tmp_path, 'fashion_mnist("train")')
    te = load(tmp_path, "fashion_mnist(test)")
    assert tr.x.shape == (20, 28, 28, 1) and te.x.shape == (10, 28, 28, 1)
    assert tr.classes == data.FASHION_CLASSES and tr.classes[0] == "T-shirt/top"
    assert tr.classes[-1] == "Ankle boot" and len(tr.classes) == 10
    assert "fashion_mnist(train)" in tr.source


@pytest.mark.skipif(not (SYSTEM_FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST files absent from {SYSTEM_FASHION} "
                           f"(sudo apt-get install dataset-fashion-mnist)")
def test_fashion_system_copy(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWDSL_DATA", raising=False)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIRS", (str(SYSTEM_FASHION),))
    ds = load(tmp_path, 'fashion_mnist("test")')
    assert ds.x.shape == (10000, 28, 28, 1) and ds.x.dtype == np.float32
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.y.dtype == np.int64 and np.bincount(ds.y).tolist() == [1000] * 10
    assert ds.classes == data.FASHION_CLASSES


# --------------------------------------------------------------------------- labels and split
def _ds(y, n_feat=3):
    y = np.asarray(y, np.int64)
    x = np.arange(len(y) * n_feat, dtype=np.float32).reshape(len(y), n_feat)
    return Dataset(x, y, [str(i) for i in range(int(y.max()) + 1)], "test-data")


def test_check_labels():
    check_labels(_ds([0, 1, 2]), 3, "train data")
    e = err(check_labels, _ds([0, 1, 5, 2]), 3, "train data")
    assert "label 5" in str(e) and "test-data" in str(e) and "3 classes" in str(e) and "sample 2" in str(e)
    e = err(check_labels, Dataset(np.zeros((2, 1), np.float32), np.array([0, -1]), ["0"], "src"), 2)
    assert "label -1" in str(e)
    e = err(check_labels, _ds([0, 7]), 3, "test-data")             # where == source: said once
    assert str(e).count("test-data") == 1


def test_check_labels_on_loaded_source(tmp_path):
    x, y = mnist_like(n=10)
    write_idx_pair(tmp_path, x, y)
    ds = load(tmp_path, 'idx("img.gz", "lab.gz")')
    e = err(check_labels, ds, 5, "data")
    assert "label 5" in str(e) and "img.gz" in str(e)


def test_split_sizes_determinism_and_stratification():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    ds = _ds(y)
    tr, te = split(ds, 0.2, seed=7)
    assert len(te) == 20 and len(tr) == 80
    assert np.bincount(te.y).tolist() == [10, 6, 4]                     # stratified
    ids = np.concatenate([tr.x[:, 0], te.x[:, 0]])
    assert sorted(ids.tolist()) == sorted(ds.x[:, 0].tolist())          # a partition
    tr2, te2 = split(ds, 0.2, seed=7)
    np.testing.assert_array_equal(te.x, te2.x)
    _, te3 = split(ds, 0.2, seed=8)
    assert not np.array_equal(te.x, te3.x)
    assert te.classes == ds.classes and te.x.dtype == np.float32
    # round(fraction * N), at least one each
    assert len(split(_ds(np.zeros(7)), 0.3, 0)[1]) == 2
    assert len(split(_ds([0, 1]), 0.5, 0)[1]) == 1
    # uneven classes still give the exact total
    _, te = split(_ds(np.repeat([0, 1, 2], [3, 3, 4])), 0.25, 1)
    assert len(te) == 2
    # many small classes, fewer test samples than classes: which classes give one depends on the seed
    ten = _ds(np.repeat(np.arange(10), 5))
    picks = {tuple(sorted(split(ten, 0.06, s)[1].y.tolist())) for s in range(6)}
    assert all(len(p) == 3 for p in picks) and len(picks) > 1


def test_split_refuses_empty_parts():
    e = err(split, _ds([0]), 0.5, 0)
    assert "at least one" in str(e)
    e = err(split, _ds([0, 1, 2]), 0.1, 0)
    assert "0 to test" in str(e)
    e = err(split, _ds([0, 1, 2]), 0.9, 0)
    assert "0 to train" in str(e)


def test_split_is_not_a_source(tmp_path):
    m = build_text("input(4) :: dense(2) :: softmax\ntrain { test = split(0.2) }", str(tmp_path / "m.flow"))
    e = err(load_source, m.train["test"], tmp_path, m.input_shape)
    assert "split" in str(e)
