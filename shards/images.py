"""Turning one input into the image bytes stored in a shard, decoding it once on the way.

DALI's CPU decoder can crash the whole process on a corrupt image, so nothing enters a shard
that PIL has not fully decoded. JPEG and PNG in RGB or grayscale are stored as they are;
anything else that decodes (CMYK JPEG, palette or alpha PNG, BMP, TIFF, ...) is converted to
RGB and stored as lossless PNG, and the conversion is recorded in the sample's metadata.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

STORED_AS_IS = {"JPEG": "jpg", "PNG": "png"}
STORED_MODES = ("RGB", "L")
IMAGE_EXTENSIONS = ("jpg", "png")


class UndecodableImage(Exception):
    """The input is not an image PIL can fully decode; the message says why."""


@dataclass
class EncodedImage:
    ext: str  # "jpg" or "png"
    data: bytes
    width: int
    height: int
    meta: dict = field(default_factory=dict)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_checked(data: bytes) -> Image.Image:
    """Fully decode `data` with PIL or raise UndecodableImage with the reason."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # Image.open only reads the header; load() decodes every pixel
        return image
    except UnidentifiedImageError:
        raise UndecodableImage("not an image (no known image format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UndecodableImage(f"cannot decode: {e}") from None


def encode_file_bytes(data: bytes) -> EncodedImage:
    """The stored form of an image file's bytes (checked by a full decode)."""
    image = decode_checked(data)
    fmt, mode = image.format, image.mode
    if fmt in STORED_AS_IS and mode in STORED_MODES:
        return EncodedImage(STORED_AS_IS[fmt], data, image.width, image.height)
    converted = image.convert("RGB")
    return EncodedImage("png", _png_bytes(converted), image.width, image.height,
                        meta={"converted": f"{fmt} {mode} -> PNG RGB"})


def encode_pixels(pixels: np.ndarray) -> EncodedImage:
    """Lossless PNG of a uint8 grayscale (H, W) or RGB (H, W, 3) array."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) array, got {pixels.dtype} {pixels.shape}")
    image = Image.fromarray(pixels)  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    return EncodedImage("png", _png_bytes(image), image.width, image.height)
