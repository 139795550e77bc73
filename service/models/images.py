"""Ordinary pictures turned into Fashion-MNIST's convention: 28x28, 0-255, light garment centred on black."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.models.base import InputError, InputRejected
from service.nets.fashion_cnn import SIDE

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # Pillow's names; anything else is refused with 415
MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")
BLANK_CONTRAST = 16  # brightest pixel minus background, 0-255: below it nothing stands out to classify


def too_many_pixels(pixels: int | str, max_pixels: int) -> InputRejected:
    return InputRejected(413, f"image has {pixels} pixels, more than the limit of {max_pixels} "
                              "(SERVE_MAX_IMAGE_PIXELS); send a smaller picture")


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """The first frame of a PNG/JPEG/WebP/GIF/BMP as 8-bit grayscale, upright as its EXIF orientation says
    (phone cameras store pictures sideways and say so there), transparency composited onto white."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as exc:  # Pillow's own, far higher cap: answer with ours
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise too_many_pixels(found[1] if found else "too many", max_pixels) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InputRejected(415, "the upload is not a PNG, JPEG, WebP, GIF or BMP image; send one of those") from None
    if image.width * image.height > max_pixels:  # checked before decoding a byte of pixel data
        raise too_many_pixels(f"{image.width}x{image.height} = {image.width * image.height}", max_pixels)
    try:
        image.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error... for damaged data
        message = f"the {image.format} image is truncated or corrupt ({exc}); send the whole file"
        raise InputError(message, "file") from None
    image = ImageOps.exif_transpose(image)  # before anything else looks at the pixels
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("L")


def to_dataset_pixels(data: bytes, max_pixels: int) -> np.ndarray:
    """An uploaded picture as the dataset would show it: 28x28, 0-255, light garment centred on black.

    A light background (most photos and drawings) is inverted; the garment is cropped to its bounding
    box, contrast-stretched to 0-255 and fitted into 28x28 keeping its aspect ratio, as Fashion-MNIST did.
    """
    gray = np.asarray(decode(data, max_pixels))
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 127:
        gray, border = 255 - gray, 255 - border
    background = float(np.median(border))
    contrast = float(gray.max()) - background
    if contrast < BLANK_CONTRAST:  # nothing stands out (stretching would only amplify noise): a blank input
        return np.zeros((SIDE, SIDE), np.float32)
    mask = gray > background + 0.1 * contrast
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    crop = np.clip((crop - background) * (255 / contrast), 0, 255).astype(np.uint8)
    height, width = crop.shape
    scale = SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    fitted = Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("L", (SIDE, SIDE))
    canvas.paste(fitted, ((SIDE - size[0]) // 2, (SIDE - size[1]) // 2))
    return np.asarray(canvas, dtype=np.float32)
