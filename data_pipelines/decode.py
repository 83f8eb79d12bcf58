"""Image decoding: a correct general path (Pillow) and a fast path for plain JPEGs (simplejpeg, DCT-domain scaling).

The general path turns every valid image into an 8-bit RGB ``PIL.Image``: EXIF orientation applied; CMYK, greyscale,
palette and 16-bit images converted with the right value scaling; alpha composited over white (not black).
The fast path is used only when it gives the same pixels: a baseline or progressive JPEG in YCbCr, RGB or grey,
without an EXIF rotation, that ends with an EOI marker. Everything else falls back to the general path.
Corrupt data raises :class:`~data_pipelines.errors.SkipSample` (reasons ``empty_image``, ``decode_error``,
``too_many_pixels``).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps

from data_pipelines.errors import DECODE_ERROR, EMPTY_IMAGE, TOO_MANY_PIXELS, SkipSample

try:  # simplejpeg is a pinned dependency, but keep the package importable without it.
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only in broken environments
    simplejpeg = None

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default limit (about 0.25 GB of RGB pixels).

# Exceptions Pillow and simplejpeg raise on corrupt data (Pillow is not consistent about the type).
_CORRUPT_DATA_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error,
                        Image.DecompressionBombError)

_WHITE = (255, 255, 255)


def image_format(data: bytes) -> str | None:
    """Return "jpeg", "png", "webp", "gif", "bmp", "tiff" from the magic bytes of ``data``, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def jpeg_exif_orientation(data: bytes) -> int:
    """Return the EXIF orientation tag (1..8) of JPEG ``data``, 1 when absent. Reads only the marker segments."""
    pos = 2
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return 1
        marker = data[pos + 1]
        if marker in (0xD9, 0xDA):  # end of image / start of scan: no more metadata segments
            return 1
        seg_len = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[pos + 10:pos + 2 + seg_len])
        pos += 2 + seg_len
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    try:
        endian = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd_offset,) = struct.unpack(endian + "I", tiff[4:8])
        (n_entries,) = struct.unpack(endian + "H", tiff[ifd_offset:ifd_offset + 2])
        for i in range(n_entries):
            entry = tiff[ifd_offset + 2 + 12 * i:ifd_offset + 14 + 12 * i]
            tag, _type, _count = struct.unpack(endian + "HHI", entry[:8])
            if tag == 0x0112:
                value = struct.unpack(endian + "H", entry[8:10])[0]
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        return 1
    return 1


def fast_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Return (height, width) if ``data`` can take the simplejpeg fast path with identical results, else None."""
    if simplejpeg is None or image_format(data) != "jpeg":
        return None
    # A missing EOI marker means a truncated file: let Pillow decide (it raises "image file is truncated").
    if data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) < 0:
        return None
    try:
        height, width, colorspace, _subsampling = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None  # CMYK / YCCK: Pillow handles the Adobe inversion
    if jpeg_exif_orientation(data) != 1:
        return None
    return height, width


def decode_jpeg_scaled(data: bytes, *, min_height: int = 0, min_width: int = 0,
                       max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, fast_dct: bool = False) -> np.ndarray:
    """Decode a fast-path JPEG to an RGB uint8 array (H, W, 3), at the smallest DCT scale (1/8, 1/4, 1/2 or 1) that
    keeps the output at least ``min_height`` x ``min_width``; ``fast_dct`` uses libjpeg-turbo's faster, slightly less
    accurate IDCT. Raises SkipSample on corrupt data or more than ``max_image_pixels``."""
    try:
        height, width, _cs, _ss = simplejpeg.decode_jpeg_header(data)
        if height * width > max_image_pixels:
            raise SkipSample(TOO_MANY_PIXELS, f"{width}x{height} > {max_image_pixels}")
        # Only 1/2, 1/4, 1/8 scales: libjpeg-turbo's 7/8, 6/8, 5/8 IDCTs are slower than a full-size decode.
        divisor = 8 if min_height > 0 or min_width > 0 else 1  # no minimum given: full size
        while divisor > 1 and (-(-height // divisor) < min_height or -(-width // divisor) < min_width):
            divisor //= 2
        target_h, target_w = (-(-height // divisor), -(-width // divisor)) if divisor > 1 else (0, 0)
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=target_h, min_width=target_w,
                                      fastdct=fast_dct, strict=True)
    except ValueError as e:
        raise SkipSample(DECODE_ERROR, f"simplejpeg: {e}") from e


def check_pixel_limit(data: bytes, max_image_pixels: int) -> None:
    """Raise SkipSample("too_many_pixels") if the image header of ``data`` declares more than ``max_image_pixels``
    pixels (reads the header only; a header that cannot be read is left to the decoder to report)."""
    try:
        kind = image_format(data)
        if kind == "jpeg" and simplejpeg is not None:
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
        elif kind == "png" and data[12:16] == b"IHDR" and len(data) >= 24:
            # The PNG header's first chunk, at a fixed place: a fifth of a 28 x 28 sample's decode to open it in Pillow.
            width, height = struct.unpack(">II", data[16:24])
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                width, height = Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError as e:
        raise SkipSample(TOO_MANY_PIXELS, str(e)) from e
    except _CORRUPT_DATA_ERRORS:
        return
    if width * height > max_image_pixels:
        raise SkipSample(TOO_MANY_PIXELS, f"{width}x{height} > {max_image_pixels}")


def decode_image(data: bytes | None, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode encoded image ``data`` into an 8-bit RGB ``PIL.Image`` with EXIF orientation applied.

    ``draft_size`` (width, height), if given, lets JPEGs decode at a reduced DCT scale that stays at least that
    large. Raises SkipSample(``empty_image`` | ``too_many_pixels`` | ``decode_error``).
    """
    if not data:
        raise SkipSample(EMPTY_IMAGE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_image_pixels:
                raise SkipSample(TOO_MANY_PIXELS, f"{width}x{height} > {max_image_pixels}")
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample(TOO_MANY_PIXELS, str(e)) from e
    except _CORRUPT_DATA_ERRORS as e:
        raise SkipSample(DECODE_ERROR, f"{type(e).__name__}: {e}") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to 8-bit RGB: alpha over white, 16-bit scaled (not clipped)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.uint32)
        # Mode "I" also holds 8-bit data from some decoders; only rescale when values exceed 8 bits.
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = (values + 128) // 257
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(img)
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "1":
        img = img.convert("L")
    return img.convert("RGB")
