"""Ordinary pictures turned into Fashion-MNIST's convention: 28x28, 0-255, light garment centred on black."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import ExifTags, Image, ImageChops, PngImagePlugin, UnidentifiedImageError

from service.models.base import InputError, InputRejected
from service.nets.fashion_cnn import SIDE

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # Pillow's names; anything else is refused with 415
MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")
# Decoded pictures are shrunk to this on their long side before anything else: the garment is then cropped
# and fitted into 28x28, so more detail is never used, and what is kept is at most 1024^2 x 4 bytes (4 MiB).
WORKING_SIDE = 1024
# EXIF orientation -> the transpose that makes the picture upright (as ImageOps.exif_transpose does)
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
BLANK_CONTRAST = 16  # brightest pixel minus background, 0-255: below it nothing stands out to classify


def too_many_pixels(pixels: int | str, max_pixels: int) -> InputRejected:
    return InputRejected(
        413,
        f"image has {pixels} pixels, more than the limit of {max_pixels} "
        "(SERVE_MAX_IMAGE_PIXELS); send a smaller picture",
    )


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """The first frame of a PNG/JPEG/WebP/GIF/BMP as 8-bit grayscale, upright as its EXIF orientation says
    (phone cameras store pictures sideways and say so there), transparency composited onto white, and no
    larger than WORKING_SIDE on its long side.

    Memory is bounded by the pixel cap, which counts the pixels decoded: a JPEG is decoded straight to
    grayscale at 1/2 to 1/8 scale (the decoder's draft mode), anything else at full size in its own mode (at
    most 4 bytes a pixel) and shrunk at once (at most 6 bytes a pixel at the peak, with transparency). One
    decode at a time per model: uploads are decoded on the model's worker thread.
    """
    try:
        image: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as exc:  # Pillow's own, far higher cap: answer with ours
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise too_many_pixels(found[1] if found else "too many", max_pixels) from None
    except ValueError as exc:
        raise chunk_too_large(exc) from None
    except (UnidentifiedImageError, OSError):
        raise InputRejected(415, "the upload is not a PNG, JPEG, WebP, GIF or BMP image; send one of those") from None
    if image.format == "JPEG":  # a photo of any size is decoded small: the cap applies to what is decoded
        image.draft("L", (WORKING_SIDE, WORKING_SIDE))  # the smallest scale (1/2 to 1/8) still at least this
    if image.width * image.height > max_pixels:  # checked before decoding a byte of pixel data
        raise too_many_pixels(f"{image.width}x{image.height} = {image.width * image.height}", max_pixels)
    try:
        image.load()
    except ValueError as exc:
        raise chunk_too_large(exc) from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error... for damaged data
        message = f"the {image.format} image is truncated or corrupt ({exc}); send the whole file"
        raise InputError(message, "file") from None
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as exc:  # a damaged EXIF block (Pillow: SyntaxError "not a TIFF file")
        raise InputError(
            f"the {image.format} image's EXIF block is damaged ({exc}), so its orientation is "
            "unknown; save the picture again (or without EXIF) and send it",
            "file",
        ) from None
    factor = -(-max(image.size) // WORKING_SIDE)  # box-averaged to at most WORKING_SIDE on the long side
    if image.has_transparency_data:  # onto white, in 1-byte planes: gray x alpha + (255 - alpha)
        alpha = (image if image.mode in ("RGBA", "LA") else image.convert("RGBA")).getchannel("A")
        gray = image.convert("L")
        del image  # from here the full-size picture is two 1-byte planes (6 bytes a pixel was the peak)
        covered = shrink(ImageChops.multiply(gray, alpha), factor)
        del gray
        image = ImageChops.add(covered, ImageChops.invert(shrink(alpha, factor)))
        del alpha
    else:
        image = shrink(image if image.mode in ("L", "RGB") else image.convert("L"), factor)
    if orientation in TRANSPOSE:  # before anything else looks at the pixels
        image = image.transpose(TRANSPOSE[orientation])
    return image.convert("L")


def shrink(image: Image.Image, factor: int) -> Image.Image:
    return image.reduce(factor) if factor > 1 else image


def chunk_too_large(exc: ValueError) -> InputRejected:
    """Pillow refuses a PNG metadata chunk (ICC profile, text) that inflates past its cap with a ValueError."""
    if "too large" not in str(exc).lower():
        return InputRejected(415, "the upload is not a PNG, JPEG, WebP, GIF or BMP image; send one of those")
    return InputRejected(
        413,
        f"the image carries a metadata chunk (an ICC colour profile or text) larger than "
        f"{PngImagePlugin.MAX_TEXT_CHUNK // 2**20} MB once decompressed; save it without "
        "the profile or metadata and send it again",
    )


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
    crop = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
    crop = np.clip((crop - background) * (255 / contrast), 0, 255).astype(np.uint8)
    height, width = crop.shape
    scale = SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    fitted = Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("L", (SIDE, SIDE))
    canvas.paste(fitted, ((SIDE - size[0]) // 2, (SIDE - size[1]) // 2))
    return np.asarray(canvas, dtype=np.float32)
