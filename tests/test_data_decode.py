"""Decoding and transforms: unusual images decode right, bad bytes raise SkipSample with the right reason, and the
fused fast path matches the plain Pillow path."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.decode import decode_image, fast_jpeg_size, jpeg_exif_orientation
from data_pipelines.errors import SkipSample
from data_pipelines.transforms import build_eval_transform, build_mixup, build_train_transform, rrc_params
from tests.data_helpers import CC12M_TAR, bad_samples, encode, halves_image, read_tar, unusual_images


@pytest.fixture(scope="module")
def cc12m_jpegs() -> list[bytes]:
    return [parts["jpg"] for _, parts in sorted(read_tar(CC12M_TAR).items())]


@pytest.mark.parametrize("name", sorted(unusual_images()))
def test_unusual_images_decode_to_expected_rgb(name):
    data, expected = unusual_images()[name]
    decoded = np.asarray(decode_image(data))
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape
    diff = np.abs(decoded.astype(int) - expected.astype(int))
    # JPEG ringing at the red/blue edge of the rotated image is allowed; the rest must match closely.
    assert diff.mean() < (8 if name == "exif_rotated_jpeg" else 1.5), diff.mean()


def test_exif_rotation_puts_left_half_on_top():
    data, _ = unusual_images()["exif_rotated_jpeg"]
    assert jpeg_exif_orientation(data) == 6
    assert fast_jpeg_size(data) is None  # must take the Pillow path, which applies the rotation
    decoded = np.asarray(decode_image(data))
    assert decoded.shape == (64, 32, 3)
    assert tuple(decoded[8, 16]) == pytest.approx((255, 0, 0), abs=12)
    assert tuple(decoded[56, 16]) == pytest.approx((0, 0, 255), abs=12)


def test_sixteen_bit_png_is_scaled_not_clipped():
    data, expected = unusual_images()["grey16_png"]
    decoded = np.asarray(decode_image(data))
    assert decoded[0, 0, 0] == 0 and decoded[0, -1, 0] == 255
    assert np.array_equal(decoded, expected)
    assert len(np.unique(decoded[0, :, 0])) > 50  # a ramp, not a step to white


@pytest.mark.parametrize("name", sorted(unusual_images()))
def test_unusual_images_through_train_and_eval_transforms(name):
    data, _ = unusual_images()[name]
    for transform in (build_train_transform(32), build_eval_transform(32)):
        out = transform.from_encoded(data)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


IMAGE_LEVEL_BAD = [c for c in bad_samples(encode(halves_image(), "JPEG"))
                   if c[2] in ("decode_error", "empty_image", "too_many_pixels")]


@pytest.mark.parametrize("case", IMAGE_LEVEL_BAD, ids=lambda c: c[0])
def test_bad_image_bytes_raise_skip_with_reason(case):
    _key, parts, reason = case
    image = parts.get("jpg", parts.get("png"))
    with pytest.raises(SkipSample) as info:
        decode_image(image, max_image_pixels=10_000_000)
    assert info.value.reason == reason
    with pytest.raises(SkipSample) as info:
        build_train_transform(32, max_image_pixels=10_000_000).from_encoded(image)
    assert info.value.reason == reason


def test_truncated_real_jpeg_is_rejected_not_grey_filled(cc12m_jpegs):
    cut = cc12m_jpegs[0][: len(cc12m_jpegs[0]) * 2 // 3]
    with pytest.raises(SkipSample) as info:
        build_train_transform(224).from_encoded(cut)
    assert info.value.reason == "decode_error"


def test_fast_decode_matches_pillow_on_real_jpegs(cc12m_jpegs):
    from data_pipelines.decode import decode_jpeg_scaled

    for data in cc12m_jpegs[:8]:
        assert fast_jpeg_size(data) is not None
        fast = decode_jpeg_scaled(data).astype(int)
        slow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        assert fast.shape == slow.shape
        assert np.abs(fast - slow).mean() < 1.0


def test_rrc_params_follow_timm_random_stream():
    from timm.data.transforms import RandomResizedCropAndInterpolation

    img = Image.new("RGB", (640, 480))
    for seed in range(20):
        random.seed(seed)
        ours = rrc_params(480, 640, (0.08, 1.0), (3 / 4, 4 / 3))
        random.seed(seed)
        theirs = RandomResizedCropAndInterpolation.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        assert ours == tuple(theirs)


def test_fused_train_path_matches_pillow_crop(cc12m_jpegs):
    """Same seed -> same crop box; the reduced-scale decode may only blur the output slightly."""
    transform = build_train_transform(224, hflip=0.0, color_jitter=None)
    diffs = []
    for i, data in enumerate(cc12m_jpegs[:12]):
        random.seed(i)
        fast = transform.from_encoded(data)
        random.seed(i)
        slow = transform(Image.open(io.BytesIO(data)).convert("RGB"))
        assert fast.shape == slow.shape == (3, 224, 224)
        diffs.append((fast - slow).abs().mean().item())
    # Normalised units (1.0 is about 57 grey levels): the mean difference stays a few grey levels.
    assert max(diffs) < 0.1, diffs


def test_png_tensor_route_matches_pillow_route(cc12m_jpegs):
    """Non-JPEG bytes take the uint8 tensor route too: with the same seeds, the same crop box and flip as the PIL
    route (``transform(img)``), and only torch's antialiased resize in place of Pillow's."""
    transform = build_train_transform(96, hflip=0.5, color_jitter=None)
    assert transform.tensor_route is not None
    flipped, diffs = 0, []
    for i, data in enumerate(cc12m_jpegs[:12]):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        png = io.BytesIO()
        img.save(png, format="PNG")
        random.seed(i)
        torch.manual_seed(i)
        fast = transform.from_encoded(png.getvalue())
        random.seed(i)
        torch.manual_seed(i)
        slow = transform(img)
        torch.manual_seed(i)
        flipped += bool(torch.rand(1) < 0.5)
        assert fast.shape == slow.shape == (3, 96, 96)
        diffs.append((fast - slow).abs().mean().item())
    assert 0 < flipped < 12  # both flip outcomes were exercised
    assert max(diffs) < 0.05, diffs  # a wrong box or flip gives about 0.5 and more


def test_eval_transform_and_mixup_shapes(cc12m_jpegs):
    transform = build_eval_transform(224, crop_pct=0.875)
    images = torch.stack([transform.from_encoded(d) for d in cc12m_jpegs[:4]])
    assert images.shape == (4, 3, 224, 224)
    mixed, targets = build_mixup(10)(images, torch.tensor([0, 1, 2, 3]))
    assert mixed.shape == images.shape and targets.shape == (4, 10)
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_eval_fast_path_matches_pillow_path(cc12m_jpegs):
    transform = build_eval_transform(224, crop_pct=0.875)
    for data in cc12m_jpegs[:6]:
        fast = transform.from_encoded(data)
        slow = transform(Image.open(io.BytesIO(data)).convert("RGB"))
        assert (fast - slow).abs().mean().item() < 0.05
