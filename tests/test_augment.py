"""Augmentations (flowdsl/augment.py): the semantics of each operation, determinism, and that the
input batch is never modified."""
import numpy as np
import pytest

from flowdsl.augment import (Augmenter, add_noise, cutout_at, flip_pixels_at, perturb, random_cutout,
                             random_flip_pixels, random_hflip, random_shift, shift_images)
from flowdsl.errors import FlowError
from flowdsl.model import build_text


def augment_calls(tmp_path, text, shape="8x8x1"):
    m = build_text(f"input({shape}) :: dense(2) :: softmax\ntrain {{ augment = {text} }}",
                   str(tmp_path / "m.flow"))
    return m.train["augment"], m.input_shape


def batch(n=16, h=8, w=8, c=1, seed=0):
    return np.random.default_rng(seed).random((n, h, w, c), dtype=np.float32)


def expected_shift(img, dy, dx):
    """Reference: out[i, j] = img[i - dy, j - dx], zero outside."""
    h, w = img.shape[:2]
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[i, j] = img[i - dy, j - dx]
    return out


# ---------------------------------------------------------------------------------------- shift
def test_shift_images_matches_reference():
    x = batch(n=9, h=5, w=7, c=2)
    dy = np.array([-2, -1, 0, 1, 2, 0, 4, -5, 3])
    dx = np.array([0, 1, -2, 2, -1, 0, -6, 0, 7])
    out = shift_images(x, dy, dx)
    for k in range(len(x)):
        np.testing.assert_array_equal(out[k], expected_shift(x[k], dy[k], dx[k]))


def test_random_shift_moves_by_the_drawn_amount_with_zero_fill():
    px = 2
    x = batch(n=400, h=9, w=9, c=3) * 0.9 + 0.05   # no zeros in the content
    before = x.copy()
    out = random_shift(x, px, np.random.default_rng(5))
    np.testing.assert_array_equal(x, before)          # input untouched
    d = np.random.default_rng(5).integers(-px, px + 1, size=(2, len(x)))   # the same draws
    seen = set()
    for k in range(len(x)):
        dy, dx = int(d[0, k]), int(d[1, k])
        assert abs(dy) <= px and abs(dx) <= px
        np.testing.assert_array_equal(out[k], expected_shift(x[k], dy, dx))
        # the zero border is exactly as wide as the shift
        rows_zero = np.flatnonzero((out[k] == 0).all(axis=(1, 2)))
        assert len(rows_zero) == abs(dy)
        seen.add((dy, dx))
    assert len(seen) == (2 * px + 1) ** 2           # every shift in [-px, px]^2 occurs


def test_shift_of_a_single_pixel():
    x = np.zeros((50, 7, 7, 1), np.float32)
    x[:, 3, 3, 0] = 1.0
    out = random_shift(x, 3, np.random.default_rng(0))
    for k in range(len(x)):
        (i, j, _), = np.argwhere(out[k])            # still exactly one lit pixel (px <= 3 keeps it inside)
        assert abs(i - 3) <= 3 and abs(j - 3) <= 3
        assert out[k].sum() == 1.0


# ---------------------------------------------------------------------------------------- hflip
def test_hflip_each_image_mirrored_or_kept():
    x = batch(n=1000, h=4, w=5, c=3)
    before = x.copy()
    out = random_hflip(x, np.random.default_rng(1))
    np.testing.assert_array_equal(x, before)
    flipped = 0
    for k in range(len(x)):
        if np.array_equal(out[k], x[k, :, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(out[k], x[k])
    assert 430 < flipped < 570                       # p = 0.5


# ---------------------------------------------------------------------------------------- noise
def test_noise_statistics_and_clipping():
    x = np.full((64, 16, 16, 1), 0.5, np.float32)
    out = add_noise(x, 0.05, np.random.default_rng(2))
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(x, 0.5)
    d = (out - x).ravel()
    assert abs(d.mean()) < 0.002
    assert abs(d.std() - 0.05) < 0.002
    edge = np.zeros((8, 8, 8, 1), np.float32)
    edge[:4] = 1.0
    out = add_noise(edge, 0.3, np.random.default_rng(3))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out[:4] < 1).mean() > 0.4 and (out[4:] > 0).mean() > 0.4


# ---------------------------------------------------------------------------------- flip_pixels
@pytest.mark.parametrize("n", [1, 5, 30, 64])
def test_flip_pixels_changes_exactly_n_pixels(n):
    rng = np.random.default_rng(4)
    x = rng.choice(np.array([0.0, 0.2, 0.9, 1.0], np.float32), size=(50, 8, 8, 3))
    before = x.copy()
    out = random_flip_pixels(x, n, np.random.default_rng(9))
    np.testing.assert_array_equal(x, before)
    changed = (out != x)                                  # (N, H, W, C)
    per_pixel = changed.any(axis=3)
    assert (per_pixel.sum(axis=(1, 2)) == n).all()       # exactly n positions per image
    assert (changed.all(axis=3) == per_pixel).all()      # all channels of a flipped pixel
    np.testing.assert_allclose(out[changed], 1.0 - x[changed], atol=1e-7)


def test_flip_pixels_vectors_and_limits():
    x = np.zeros((10, 20), np.float32)
    out = random_flip_pixels(x, 3, np.random.default_rng(0))
    assert ((out == 1).sum(axis=1) == 3).all()
    pos = np.array([[0, 5], [2, 3]])
    out = flip_pixels_at(np.zeros((2, 2, 3, 1), np.float32), pos)
    assert out.reshape(2, 6)[0, [0, 5]].tolist() == [1, 1] and out.sum() == 4
    with pytest.raises(FlowError):
        random_flip_pixels(np.zeros((1, 2, 2, 1), np.float32), 5, np.random.default_rng(0))


# --------------------------------------------------------------------------------------- cutout
def expected_cutout(img, cy, cx, size):
    out = img.copy()
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            if cy - size // 2 <= i < cy - size // 2 + size and cx - size // 2 <= j < cx - size // 2 + size:
                out[i, j] = 0
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_cutout_at_matches_reference(size):
    x = batch(n=6, h=6, w=7, c=2) + 0.5                  # no zeros of its own
    cy = np.array([0, 5, 2, 3, 0, 5])
    cx = np.array([0, 6, 3, 0, 6, 2])
    out = cutout_at(x, cy, cx, size)
    assert out.dtype == np.float32
    for k in range(len(x)):
        np.testing.assert_array_equal(out[k], expected_cutout(x[k], cy[k], cx[k], size))


def test_random_cutout_probability_and_input_untouched():
    x = batch(n=400, h=8, w=8) + 0.5
    before = x.copy()
    out = random_cutout(x, 4, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(x, before)
    zeros = (out == 0).sum(axis=(1, 2, 3))
    assert (zeros >= 4).all() and (zeros <= 16).all()    # a clipped corner keeps >= 2x2 of a 4x4
    assert (zeros == 16).mean() > 0.3
    half = random_cutout(x, 4, 0.5, np.random.default_rng(1))
    hit = ((half == 0).sum(axis=(1, 2, 3)) > 0).mean()
    assert 0.4 < hit < 0.6
    np.testing.assert_array_equal(random_cutout(x, 4, 0.0, np.random.default_rng(2)), x)
    with pytest.raises(FlowError, match="cutout needs image input"):
        random_cutout(np.zeros((2, 64), np.float32), 4, 1.0, np.random.default_rng(0))


def test_cutout_in_the_train_block(tmp_path):
    calls, shape = augment_calls(tmp_path, "[cutout(4, p=0.5), hflip]")
    aug = Augmenter(calls, 0)
    aug.check(shape)
    assert aug.ops[0] == ("cutout", (4, 0.5))
    calls, _ = augment_calls(tmp_path, "cutout")
    assert Augmenter(calls, 0).ops == [("cutout", (8, 1.0))]
    calls, _ = augment_calls(tmp_path, "cutout(9)", shape="9x9x1")
    with pytest.raises(FlowError, match="larger than the 8x8 input"):
        Augmenter(calls, 0).check((1, 8, 8))
    with pytest.raises(FlowError, match="larger than the 8x8 input"):
        augment_calls(tmp_path, "cutout(9)")
    with pytest.raises(FlowError, match="p must be"):
        augment_calls(tmp_path, "cutout(4, p=1.5)")
    with pytest.raises(FlowError, match="cutout needs image input"):
        augment_calls(tmp_path, "cutout(2)", shape="64")


# ------------------------------------------------------------------------------------ Augmenter
def test_augmenter_from_the_train_block(tmp_path):
    calls, shape = augment_calls(tmp_path, "[shift(2), hflip, noise(0.1), flip_pixels(3)]")
    aug = Augmenter(calls, seed=1)
    aug.check(shape)
    assert [op for op, _ in aug.ops] == ["shift", "hflip", "noise", "flip_pixels"]
    assert aug.ops[0][1] == 2 and aug.ops[2][1] == 0.1 and aug.ops[3][1] == 3
    x = batch(n=8)
    before = x.copy()
    a = aug.apply(x, np.random.default_rng(3))
    b = Augmenter(calls, seed=99).apply(x, np.random.default_rng(3))
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(a, b)                   # deterministic given the rng
    assert a.dtype == np.float32 and a.shape == x.shape and a is not x
    assert a.min() >= 0 and a.max() <= 1
    # without an rng: the seeded one, so two Augmenters with one seed agree
    np.testing.assert_array_equal(Augmenter(calls, seed=4).apply(x), Augmenter(calls, seed=4).apply(x))


def test_augmenter_single_op_semantics(tmp_path):
    calls, _ = augment_calls(tmp_path, "flip_pixels(4)")
    x = np.full((6, 8, 8, 1), 0.25, np.float32)
    out = Augmenter(calls, 0).apply(x, np.random.default_rng(0))
    assert ((out != x).sum(axis=(1, 2, 3)) == 4).all()
    calls, _ = augment_calls(tmp_path, "shift")            # default px=2
    assert Augmenter(calls, 0).ops == [("shift", 2)]


def test_augmenter_empty_returns_a_copy():
    x = batch(n=2)
    out = Augmenter((), 0).apply(x)
    assert out is not x
    np.testing.assert_array_equal(out, x)
    assert not Augmenter((), 0)


def test_augmenter_refuses_image_ops_on_vectors(tmp_path):
    calls, _ = augment_calls(tmp_path, "[hflip, noise(0.1)]")       # (a vector model refuses it at build)
    aug = Augmenter(calls, 0)
    with pytest.raises(FlowError, match="hflip needs image input"):
        aug.check((64,))
    with pytest.raises(FlowError):
        aug.apply(np.zeros((2, 64), np.float32))
    calls, shape = augment_calls(tmp_path, "[noise(0.1), flip_pixels(2)]", shape="64")
    aug = Augmenter(calls, 0)
    aug.check(shape)
    assert aug.apply(np.zeros((2, 64), np.float32)).shape == (2, 64)
    calls, _ = augment_calls(tmp_path, "flip_pixels(100)", shape="10x10x1")
    with pytest.raises(FlowError, match="only 64 pixels"):
        Augmenter(calls, 0).check((1, 8, 8))
    with pytest.raises(FlowError, match="only 64 pixels"):
        augment_calls(tmp_path, "flip_pixels(100)", shape="8x8x1")   # the model build checks it too


# -------------------------------------------------------------------------------------- perturb
def test_perturb():
    x = batch(n=20) * 0.8 + 0.1
    before = x.copy()
    a = perturb(x, shift=2, flip=5, rng=np.random.default_rng(7))
    b = perturb(x, shift=2, flip=5, rng=7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, before)
    only_flip = perturb(x, flip=5, rng=np.random.default_rng(1))
    assert ((only_flip != x).sum(axis=(1, 2, 3)) == 5).all()
    only_shift = perturb(x, shift=1, rng=np.random.default_rng(1))
    d = np.random.default_rng(1).integers(-1, 2, size=(2, len(x)))
    np.testing.assert_array_equal(only_shift, shift_images(x, d[0], d[1]))
    same = perturb(x)
    assert same is not x
    np.testing.assert_array_equal(same, x)
