"""Helpers for the data-pipeline tests: paths to the real data and builders of unusual and bad samples."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DATA = os.path.join(REPO_ROOT, "..", "shared", "data", "real")
CC12M_TAR = os.path.join(REAL_DATA, "cc12m-train-0000.tar")
MNIST_TGZ = os.path.join(REAL_DATA, "mnist-sample-000000.tgz")
IMAGENET_SAMPLES = os.path.join(REAL_DATA, "imagenet-1k-samples")
IMAGENET_WNIDS = os.path.join(REAL_DATA, "imagenet-1k-wnids.txt")


def write_cc12m_shards(out: str, per_shard: int) -> str:
    """The 32 real CC12M samples written to ``out`` by our writer in shards of ``per_shard`` (with manifest.json)."""
    from data_pipelines.writers import WriteOptions, list_webdataset, write_shards

    samples, _ = list_webdataset(CC12M_TAR)
    write_shards(samples, out, WriteOptions(samples_per_shard=per_shard, progress=False, prefix="cc12m"),
                 kind="img2dataset", input_desc=CC12M_TAR)
    return out


def read_tar(path: str) -> dict[str, dict[str, bytes]]:
    """All samples of a (possibly gzip) tar as {key: {ext: bytes}}, with plain tarfile (independent of our code)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            if m.isfile():
                base = os.path.basename(m.name)
                key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0]) if "/" in m.name else \
                    base.split(".", 1)[0]
                samples.setdefault(key, {})[base.split(".", 1)[1]] = tar.extractfile(m).read()
    return samples


def write_tar(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write samples [(key, {ext: bytes})] as a plain tar, in the given order."""
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def halves_image(width: int = 64, height: int = 32, mode: str = "RGB") -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(arr).convert(mode)


def unusual_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """Valid but unusual images -> (encoded bytes, the expected RGB uint8 array after correct decoding)."""
    cases: dict[str, tuple[bytes, np.ndarray]] = {}

    # CMYK JPEG of pure cyan: RGB (0, 255, 255).
    cmyk = Image.new("CMYK", (32, 24), (255, 0, 0, 0))
    cases["cmyk_jpeg"] = (encode(cmyk, "JPEG", quality=95), np.full((24, 32, 3), (0, 255, 255), np.uint8))

    # 16-bit greyscale PNG: a horizontal ramp over the full 16-bit range must not be clipped to white.
    ramp16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    png16 = encode(Image.fromarray(ramp16), "PNG")
    expected16 = ((ramp16.astype(np.uint32) + 128) // 257).astype(np.uint8)
    cases["grey16_png"] = (png16, np.repeat(expected16[..., None], 3, axis=2))

    # Palette PNG with a transparent index: transparent pixels become white.
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (8, 0, 16, 16))
    expected_pal = np.zeros((16, 16, 3), np.uint8)
    expected_pal[:, :8] = 255  # index 0 transparent -> white
    expected_pal[:, 8:] = (0, 255, 0)
    cases["palette_transparent_png"] = (encode(pal, "PNG", transparency=0), expected_pal)

    # RGBA PNG: half-transparent red over white is (255, 128, 128) (rounding within 1).
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    cases["rgba_png"] = (encode(rgba, "PNG"), np.full((8, 8, 3), (255, 127, 127), np.uint8))

    # Greyscale JPEG.
    grey = Image.new("L", (16, 16), 100)
    cases["grey_jpeg"] = (encode(grey, "JPEG", quality=100), np.full((16, 16, 3), 100, np.uint8))

    # EXIF orientation 6 (display = rotate 90 degrees clockwise): the left (red) half ends up on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(halves_image(64, 32), "JPEG", quality=100, exif=exif.tobytes())
    expected_rot = np.zeros((64, 32, 3), np.uint8)
    expected_rot[:32] = (255, 0, 0)
    expected_rot[32:] = (0, 0, 255)
    cases["exif_rotated_jpeg"] = (rotated, expected_rot)
    return cases


def bad_samples(good_jpeg: bytes) -> list[tuple[str, dict[str, bytes], str]]:
    """Samples that must be skipped: (key, parts, expected skip reason)."""
    bomb = encode(Image.new("L", (4000, 3000), 0), "PNG")  # 12 MP, a few kB compressed
    return [
        ("bad_truncated_jpeg", {"jpg": good_jpeg[: len(good_jpeg) // 2], "txt": b"cut in half"}, "decode_error"),
        ("bad_corrupt_jpeg", {"jpg": b"\xff\xd8\xff\xe0" + os.urandom(2000), "txt": b"noise"}, "decode_error"),
        ("bad_zero_bytes", {"jpg": b"", "txt": b"empty"}, "empty_image"),
        ("bad_no_image", {"txt": b"caption without an image"}, "missing_image"),
        ("bad_no_caption", {"jpg": good_jpeg}, "missing_caption"),
        ("bad_caption_latin1", {"jpg": good_jpeg, "txt": "caf\xe9 cr\xe8me".encode("latin-1")}, "caption_not_utf8"),
        ("bad_bomb", {"png": bomb, "txt": b"too many pixels"}, "too_many_pixels"),
    ]


def write_photo_shards(real_data, out, *, count: int = 32, per_shard: int = 8, max_side_px: int = 64,
                       prefix: str = "in1k") -> str:
    """The first ``count`` real ImageNet photos (shrunk to ``max_side_px``) as shards of ``per_shard`` under ``out``,
    labels from the sorted class ids; returns the brace pattern of the shards."""
    from data_pipelines.writers import WriteOptions, list_imagefolder, write_shards

    samples, class_map = list_imagefolder(str(real_data / "imagenet-1k-samples"), label_from="filename-prefix")
    write_shards(samples[:count], str(out), WriteOptions(samples_per_shard=per_shard, resize_max_side_px=max_side_px,
                                                         progress=False, prefix=prefix),
                 kind="imagefolder", input_desc="test", class_map=class_map)
    last = (count + per_shard - 1) // per_shard - 1
    return str(out / f"{prefix}-{{000000..{last:06d}}}.tar")
