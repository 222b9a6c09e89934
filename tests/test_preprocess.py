"""engine.preprocess: the crop window, resize + crop, and normalisation against slow references."""

import cv2
import numpy as np
import pytest

from engine.errors import InputError
from engine.preprocess import Preprocess


def photo():
    """A real photograph (scikit-image's astronaut, 512 x 512 RGB), cut to a wide and a tall frame."""
    from skimage import data

    return data.astronaut()


def window_reference(h, w, size, resize_to):
    """The central window of the source that a scale-to-shorter-side-then-centre-crop keeps, in float pixels."""
    s = (resize_to or min(size)) / min(h, w)
    nh, nw = max(size[0], round(h * s)), max(size[1], round(w * s))
    sy, sx = nh / h, nw / w  # the per-axis scale cv2.resize applies
    top, left = (nh - size[0]) // 2, (nw - size[1]) // 2
    return top / sy, left / sx, size[0] / sy, size[1] / sx


@pytest.mark.parametrize("h, w, size, resize_to", [
    (272, 640, (224, 224), None),  # bikes.mp4: a wide video frame
    (640, 272, (224, 224), None),
    (500, 375, (224, 224), 256),  # the ImageNet habit: shorter side 256, centre 224
    (33, 47, (16, 16), 20),
    (7, 9, (32, 32), None),  # upscaling
    (100, 100, (64, 48), None),  # a non-square network input
])
def test_source_window_is_the_region_the_scaled_crop_covers(h, w, size, resize_to):
    pre = Preprocess(size=size, resize_to=resize_to)
    top, left, hs, ws = pre.source_window(h, w)
    rt, rl, rh, rw = window_reference(h, w, size, resize_to)
    assert abs(hs - rh) <= 0.5 + 1e-9 and abs(ws - rw) <= 0.5 + 1e-9  # rounded to whole pixels
    assert abs(top - rt) <= 1 and abs(left - rl) <= 1  # centred, to the pixel
    assert 0 <= top and top + hs <= h and 0 <= left and left + ws <= w


def test_without_a_crop_the_window_is_the_whole_image():
    assert Preprocess(size=(8, 8), crop="none").source_window(30, 50) == (0, 0, 30, 50)
    assert Preprocess(size=(8, 8), resize="exact", crop="none").source_window(30, 50) == (0, 0, 30, 50)


@pytest.mark.parametrize("shape", [(272, 512), (512, 272), (400, 400)])
def test_crop_then_resize_shows_the_picture_that_scale_then_crop_shows(shape):
    img = np.ascontiguousarray(photo()[: shape[0], : shape[1]])
    pre = Preprocess(size=(224, 224))
    got = pre.resize_crop(img)
    h, w = shape
    s = 224 / min(h, w)
    nh, nw = round(h * s), round(w * s)
    scaled = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)  # the textbook way: whole image first
    top, left = (nh - 224) // 2, (nw - 224) // 2
    want = scaled[top : top + 224, left : left + 224]
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.mean() < 3.0, diff.mean()  # the same picture, up to sub-pixel rounding of the window edges
    # and not a shifted one: the reference moved by 4 pixels differs far more
    shifted = np.roll(want, 4, axis=1)
    assert np.abs(got.astype(np.int16) - shifted.astype(np.int16)).mean() > 2 * diff.mean()

def test_grey_and_rgba_become_rgb():
    img = photo()[:64, :96]
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    pre = Preprocess(size=(32, 32))
    np.testing.assert_array_equal(pre.resize_crop(rgba), pre.resize_crop(img))
    g = pre.resize_crop(grey)
    assert g.shape == (32, 32, 3) and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()


@pytest.mark.parametrize("color", ["RGB", "BGR"])
def test_normalise_matches_the_float64_formula(color):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(3, 5, 7, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    got = Preprocess(size=(5, 7), mean=mean, std=std, color=color).normalise(batch)
    want = (batch.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)  # (n, h, w, 3) RGB
    if color == "BGR":
        want = want[..., ::-1]
    want = want.transpose(0, 3, 1, 2)
    assert got.dtype == np.float32 and got.shape == (3, 3, 5, 7) and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_normalise_refuses_what_is_not_a_uint8_batch():
    pre = Preprocess(size=(4, 4))
    with pytest.raises(InputError, match=r"\(n, h, w, 3\) uint8 batch, got float32 \(1, 4, 4, 3\)"):
        pre.normalise(np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(InputError, match=r"got uint8 \(4, 4, 3\)"):
        pre.normalise(np.zeros((4, 4, 3), np.uint8))


def test_call_is_resize_crop_then_normalise():
    img = photo()[:100, :150]
    pre = Preprocess(size=(24, 24), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    np.testing.assert_array_equal(pre(img), pre.normalise(pre.resize_crop(img)[None]))
    assert pre([]).shape == (0, 3, 24, 24)


@pytest.mark.parametrize("kwargs, message", [
    ({"size": ("a", 3)}, r"size must be \(height, width\) with positive ints, got \('a', 3\)"),
    ({"size": (8, 0)}, r"size must be \(height, width\) with positive ints, got \(8, 0\)"),
    ({"size": 8}, r"size must be \(height, width\) with positive ints, got 8"),
    ({"size": (8, 8), "resize_to": 0}, "resize_to must be a positive int .* got 0"),
    ({"size": (8, 8), "resize_to": -5}, "resize_to must be a positive int .* got -5"),
    ({"size": (8, 8), "std": (float("nan"), 1, 1)}, "mean and std must be 3 finite values with std > 0"),
    ({"size": (8, 8), "mean": (0, 0)}, "mean and std must be 3 finite values"),
    ({"size": (8, 8), "mean": "abc"}, "mean and std must be 3 numbers each"),
])
def test_bad_settings_are_refused_naming_what_came(kwargs, message):
    with pytest.raises(InputError, match=message):
        Preprocess(**kwargs)


def test_from_dict_without_size_is_refused():
    with pytest.raises(InputError, match=r"preprocessing needs 'size' \(height, width\), got only \['crop'\]"):
        Preprocess.from_dict({"crop": "none"})


@pytest.mark.parametrize("resize", ["shorter", "exact"])
@pytest.mark.parametrize("shape", [(0, 30, 3), (5, 0, 3), (0, 0)])
def test_an_image_without_pixels_is_refused(resize, shape):
    with pytest.raises(InputError, match=r"at least one pixel, got shape"):
        Preprocess((8, 8), resize=resize, crop="none" if resize == "exact" else "center")([np.zeros(shape, np.uint8)])


def test_read_image_converts_grey_alpha_and_16_bit_and_refuses_float_pixels(tmp_path):
    from PIL import Image

    from engine.errors import ImageReadError
    from engine.preprocess import read_image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (12, 9), dtype=np.uint8)
    alpha = np.stack([grey, np.full_like(grey, 200)], axis=2)  # grey + alpha: a 2-channel PNG
    Image.fromarray(alpha, "LA").save(tmp_path / "ga.png")
    np.testing.assert_array_equal(read_image(tmp_path / "ga.png"), np.repeat(grey[:, :, None], 3, axis=2))
    deep = rng.integers(0, 65536, (12, 9, 3), dtype=np.uint16)  # 16-bit BGR: the top 8 bits, as RGB
    assert cv2.imwrite(str(tmp_path / "deep.png"), deep)
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png"), (deep >> 8).astype(np.uint8)[:, :, ::-1])
    assert cv2.imwrite(str(tmp_path / "depth.tiff"), rng.random((12, 9)).astype(np.float32))
    with pytest.raises(ImageReadError, match=r"depth\.tiff has float32 pixels; lookalike reads 8- and 16-bit"):
        read_image(tmp_path / "depth.tiff")
