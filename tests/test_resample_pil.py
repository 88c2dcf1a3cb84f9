"""Pillow's BILINEAR on tensors (utils.resample.pil_bilinear) and the global image built on it.

Pillow itself is the reference: every case is resized by the installed Pillow and by the
tensor code, and the two must agree bit for bit (uint8 through Pillow's 8-bit path, float32
through mode "F"). On a CUDA machine the same cases also run on the GPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import utils.resample as resample
from conftest import DEVICES
from dataset.transforms import global_image
from utils.resample import pil_bilinear, pil_vertical_first

# (H, W, h, w): non-integer shrinks, non-square, enlargements, one axis unchanged, 1-pixel
# outputs and inputs, tiny images, and both sides of Pillow's pass-order rule.
CASES = [
    (1000, 1000, 508, 508),
    (613, 397, 101, 257),
    (397, 613, 257, 101),
    (100, 100, 508, 508),
    (100, 37, 508, 300),
    (300, 200, 300, 77),  # height unchanged: horizontal pass only
    (300, 200, 41, 200),  # width unchanged: vertical pass only
    (300, 200, 300, 200),  # nothing changes: a copy
    (250, 180, 1, 1),
    (250, 180, 1, 180),
    (1, 1, 1, 1),
    (1, 1, 5, 3),
    (1, 9, 4, 4),
    (9, 1, 4, 4),
    (2, 3, 1, 1),
    (2, 3, 7, 9),
    (2, 3, 2, 1),
    (155, 170, 18, 101),  # 137 rows dropped, 2 * 69 columns: horizontal first
    (155, 170, 18, 102),  # 2 * 68 < 137: vertical first (Pillow 13)
    (64, 40, 5, 11),  # height shrinks, width grows: vertical first
    (1000, 100, 3, 7),
]


def _content(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "zeros":
        return np.zeros(shape, np.uint8)
    if kind == "full":
        return np.full(shape, 255, np.uint8)
    rows, cols = np.indices(shape[-2:])
    return np.broadcast_to((((rows + cols) % 2) * 255).astype(np.uint8), shape).copy()


def _pillow_uint8(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """(C, H, W) uint8 through Pillow: C == 3 as one RGB image, C == 1 as mode L."""
    if image.shape[0] == 1:
        return np.asarray(Image.fromarray(image[0]).resize((w, h), Image.BILINEAR))[None]
    pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    return np.asarray(pil.resize((w, h), Image.BILINEAR)).transpose(2, 0, 1)


def _pillow_float(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """(C, H, W) float32 through Pillow's mode "F", one channel at a time."""
    return np.stack([np.asarray(Image.fromarray(c, mode="F").resize((w, h), Image.BILINEAR)) for c in image])


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,W,h,w", CASES)
def test_uint8_equals_pillow(device, H, W, h, w):
    """RGB and single-channel (mode L) images: random, all 0, all 255, a 0/255 checkerboard."""
    rng = np.random.default_rng(H * 7919 + W * 31 + h * 7 + w)
    kinds = ("random", "zeros", "full", "checker")
    images = np.stack([_content(kind, (3, H, W), rng) for kind in kinds])  # one call for all
    out = pil_bilinear(torch.from_numpy(images).to(device), (h, w))
    assert out.dtype == torch.uint8 and out.device.type == device and out.shape == (4, 3, h, w)
    out = out.cpu().numpy()
    for kind, image, result in zip(kinds, images, out):
        assert np.array_equal(result, _pillow_uint8(image, h, w)), kind
        assert np.array_equal(result[2:], _pillow_uint8(image[2:], h, w)), kind
    single = pil_bilinear(torch.from_numpy(images[0, :1]).to(device), (h, w))
    assert np.array_equal(single.cpu().numpy(), _pillow_uint8(images[0, :1], h, w))


@pytest.mark.parametrize("device", DEVICES)
def test_uint8_equals_pillow_at_glnet_size(device):
    image = np.random.default_rng(0).integers(0, 256, (3, 2448, 2448), dtype=np.uint8)
    out = pil_bilinear(torch.from_numpy(image).to(device), (508, 508))
    assert np.array_equal(out.cpu().numpy(), _pillow_uint8(image, 508, 508))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,W,h,w", CASES)
def test_float_equals_pillow_mode_f(device, H, W, h, w):
    rng = np.random.default_rng(H * 7919 + W * 31 + h * 7 + w + 1)
    image = np.concatenate([
        rng.random((2, H, W), dtype=np.float32),
        (rng.standard_normal((1, H, W)) * 300).astype(np.float32),  # negatives, big values
        _content("checker", (1, H, W), rng).astype(np.float32) / 255,
    ])
    out = pil_bilinear(torch.from_numpy(image).to(device), (h, w))
    assert out.dtype == torch.float32 and out.device.type == device
    assert _same_bits(out.cpu().numpy(), _pillow_float(image, h, w))


@pytest.mark.parametrize("device", DEVICES)
def test_float_non_finite_values_spread_as_in_pillow(device):
    """Pillow skips the taps an output lacks; a padded tap must not turn inf into nan."""
    rng = np.random.default_rng(5)
    for H, W, h, w in [(10, 13, 7, 4), (9, 20, 2, 5), (20, 9, 5, 2)]:
        image = rng.standard_normal((1, H, W)).astype(np.float32)
        image[0, 2, 3], image[0, 5, 1], image[0, 7, 8], image[0, -1, -1] = np.inf, np.nan, -np.inf, np.inf
        out = pil_bilinear(torch.from_numpy(image).to(device), (h, w)).cpu().numpy()
        expected = _pillow_float(image, h, w)
        assert np.array_equal(np.isnan(out), np.isnan(expected))
        assert np.array_equal(np.nan_to_num(out), np.nan_to_num(expected))


@pytest.mark.parametrize("H,W,h,w", [(613, 397, 101, 257), (155, 170, 18, 102), (100, 37, 508, 300), (300, 200, 41, 200)])
def test_bands_give_the_same_result(monkeypatch, H, W, h, w):
    """Tiny bands (many, and a narrower last one) change nothing: the bound on memory is free."""
    rng = np.random.default_rng(9)
    image = rng.integers(0, 256, (3, H, W), dtype=np.uint8)
    floats = rng.standard_normal((2, H, W)).astype(np.float32)
    monkeypatch.setattr(resample, "_PIL_BAND", 997)
    assert np.array_equal(pil_bilinear(torch.from_numpy(image), (h, w)).numpy(), _pillow_uint8(image, h, w))
    assert _same_bits(pil_bilinear(torch.from_numpy(floats), (h, w)).numpy(), _pillow_float(floats, h, w))


def test_pass_order_rule():
    # Equal shrinks (a square image to a square size) keep Pillow's classic horizontal-first order.
    assert not pil_vertical_first(2448, 2448, 508, 508)
    assert not pil_vertical_first(100, 100, 508, 508)  # enlarging
    assert pil_vertical_first(64, 40, 5, 80)  # height shrinks while the width grows
    assert not pil_vertical_first(155, 170, 18, 101) and pil_vertical_first(155, 170, 18, 102)


def test_leading_dims_dtype_and_errors():
    image = torch.randint(0, 256, (2, 3, 40, 30), dtype=torch.uint8)
    out = pil_bilinear(image, (11, 17))
    assert out.shape == (2, 3, 11, 17)
    assert torch.equal(out[1], pil_bilinear(image[1], (11, 17)))
    same = pil_bilinear(image, (40, 30))
    assert torch.equal(same, image) and same.data_ptr() != image.data_ptr()
    # Other float types go through float32, as the authors' astype(np.float32) did.
    doubles = torch.rand(3, 20, 20, dtype=torch.float64)
    assert torch.equal(pil_bilinear(doubles, (7, 9)), pil_bilinear(doubles.float(), (7, 9)))
    with pytest.raises(TypeError):
        pil_bilinear(torch.zeros(3, 4, 4, dtype=torch.int32), (2, 2))
    with pytest.raises(ValueError):
        pil_bilinear(torch.zeros(3, 4, 4, dtype=torch.uint8), (0, 2))


# --------------------------------------------------------------------------- global_image


def _old_global_image(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """What global_image returned when it called Pillow on the CPU."""
    if image.dtype == np.uint8:
        return _pillow_uint8(image, h, w).astype(np.float32) / np.float32(255.0)
    return np.clip(_pillow_float(image.astype(np.float32), h, w), 0.0, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,W,h,w", [(600, 600, 256, 256), (613, 397, 101, 257), (50, 70, 128, 128)])
def test_global_image_keeps_device_and_equals_pillow(device, H, W, h, w):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (3, H, W), dtype=np.uint8)
    floats = (rng.random((3, H, W), dtype=np.float32) * 1.2 - 0.1)  # some values outside [0, 1]
    for source in (image, floats):
        out = global_image(torch.from_numpy(source).to(device), (h, w))
        assert out.dtype == torch.float32 and out.device.type == device and out.shape == (3, h, w)
        assert _same_bits(out.cpu().numpy(), _old_global_image(source, h, w))
        assert 0 <= out.min() and out.max() <= 1


def test_global_image_of_the_parity_capture(parity_inputs, parity_ref):
    """The reference capture's global input, made with Pillow, is reproduced exactly."""
    image, _ = parity_inputs
    expected = parity_ref["input_global"][0]
    out = global_image(torch.from_numpy(image.transpose(2, 0, 1).copy()), expected.shape[-2:])
    assert _same_bits(out.numpy(), expected)


def test_a_pass_refuses_rows_it_does_not_hold():
    """Shrinking 40 rows to 10 reads all 40 (each output averages its 4 rows and their
    neighbours): held from row 0, 20 rows are too few, and a window shifted by an offset
    must not read other rows instead of the ones it lacks."""
    x = torch.randint(0, 256, (1, 20, 5), dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside the 20 held from row 0"):
        resample._pil_rows(x, 40, 10)
    with pytest.raises(ValueError, match="outside the 20 held from row 25"):
        resample._pil_rows(x, 40, 10, offset=25, outputs=(0, 5))
    # Outputs 5..10 read rows 18..40 (output 5 is centred on row 22 with a 4-row support):
    # the 22 rows from row 18 suffice, one fewer at either end does not.
    y = torch.randint(0, 256, (1, 40, 5), dtype=torch.uint8)
    assert torch.equal(resample._pil_rows(y[:, 18:], 40, 10, offset=18, outputs=(5, 10)),
                       resample._pil_rows(y, 40, 10)[:, 5:])
    for held, offset in [(y[:, 19:], 19), (y[:, 18:39], 18)]:
        with pytest.raises(ValueError, match="outside"):
            resample._pil_rows(held, 40, 10, offset=offset, outputs=(5, 10))
