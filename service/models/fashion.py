"""Fashion-MNIST garment class (0-9) from a 28x28 grayscale image: a small VGG-style CNN.

Two ways in: ``POST /fashion`` with pixels in the dataset's own convention (28x28, 0-255, light garment
on a dark background), and ``POST /fashion/image`` with an ordinary picture, which is turned into that
convention first (grayscale, dark background, cropped to the garment, fitted into 28x28 and centred, as
the dataset itself was made).
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import File, HTTPException, Query, Request, UploadFile
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator
from starlette.concurrency import run_in_threadpool
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from service.artifacts import Artifact
from service.models.base import InputError, JsonInt, Predictor

SIDE = 28
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
NAMES_ZH = ["T恤", "裤子", "套衫", "连衣裙", "外套", "凉鞋", "衬衫", "运动鞋", "包", "短靴"]
MEAN, STD = 0.2860, 0.3530  # of the training pixels on a 0-1 scale; kept in the net so callers send raw pixels
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # Pillow's names; anything else is refused with 415


class FashionCNN(nn.Module):
    """Stages of conv-BN-ReLU layers, each closed by 2x2 max pooling and dropout, then a dropout MLP head.

    The input is pixels on a 0-1 scale, normalised inside the net by fixed buffers, so the service and
    training feed it the same thing and no preprocessing parameters live outside ``model.pt``.
    """

    def __init__(self, stages: list[list[int]], hidden: int, dropout: float, head_dropout: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN))
        self.register_buffer("std", torch.tensor(STD))
        layers: list[nn.Module] = []
        width = 1
        for stage in stages:
            for out in stage:  # no conv bias: the batch norm that follows has its own
                layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                width = out
            layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
        self.features = nn.Sequential(*layers)
        side = SIDE // 2 ** len(stages)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * side * side, hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(head_dropout), nn.Linear(hidden, len(NAMES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) pixels in 0-1 -> (N, 10) logits."""
        return self.head(self.features((x - self.mean) / self.std))


def for_inference(net: FashionCNN) -> FashionCNN:
    """The same net, faster to evaluate: each conv folded with the batch norm after it (the same affine
    maths in one pass), dropout removed, and weights in channels_last, the layout oneDNN's CPU convolutions
    prefer. In-process on the 2-core target machine, batch 1 went from 1,033 to 1,828 images/s."""
    layers: list[nn.Module] = []
    for layer in net.features:
        if isinstance(layer, nn.BatchNorm2d):
            layers[-1] = fuse_conv_bn_eval(layers[-1], layer)
        elif not isinstance(layer, nn.Dropout):
            layers.append(layer)
    net.features = nn.Sequential(*layers)
    return net.to(memory_format=torch.channels_last)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 matrix maths runs natively here (AVX512-BF16 or AMX on a CPU, or a recent GPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def build_net(hyperparameters: dict[str, Any]) -> FashionCNN:
    """The net described by a manifest's hyperparameters (training writes the same keys)."""
    return FashionCNN([list(s) for s in hyperparameters["stages"]], hyperparameters["hidden"],
                      hyperparameters["dropout"], hyperparameters["head_dropout"])


def check_pixels(value: Any) -> np.ndarray:
    """A 28x28 float array from a 28x28 nested list or a flat list of 784 numbers; ValueError names the rule."""
    if not isinstance(value, list):
        raise ValueError("pixels must be a list: 28 rows of 28 numbers, or 784 numbers row by row")
    if value and all(isinstance(row, list) for row in value):
        if len(value) != SIDE or any(len(row) != SIDE for row in value):
            lengths = sorted({len(row) for row in value})
            raise ValueError(f"pixels must be 28 rows of 28 numbers; got {len(value)} rows of length {lengths}")
        flat = list(itertools.chain.from_iterable(value))
    elif any(isinstance(v, list) for v in value):
        raise ValueError("pixels must be either all rows (a 28x28 nested list) or all numbers (784 of them)")
    elif len(value) != SIDE * SIDE:
        raise ValueError(f"a flat pixels list must hold 784 numbers (28x28, row by row); got {len(value)}")
    else:
        flat = value
    kinds = set(map(type, flat)) - {int, float}  # bool and str are refused, not coerced
    if kinds:
        raise ValueError(f"pixels must be numbers from 0 to 255; got {', '.join(sorted(k.__name__ for k in kinds))}")
    array = np.asarray(flat, dtype=np.float32).reshape(SIDE, SIDE)
    if not np.isfinite(array).all():
        raise ValueError("pixels must be finite numbers from 0 to 255; NaN and Infinity are not allowed")
    if array.min() < 0 or array.max() > 255:
        raise ValueError(f"pixels must be from 0 to 255 (0 = background, 255 = brightest garment); "
                         f"got values from {array.min():g} to {array.max():g}")
    return array


def _trousers() -> list[list[int]]:
    """A crude pair of trousers (waistband over two legs), so the docs page has a valid example to try."""
    return [[200 if 8 <= x < 20 and (y < 6 or not 13 <= x < 15) else 0 for x in range(SIDE)] for y in range(SIDE)]


Pixel = Annotated[float, Field(ge=0, le=255)]
Row = Annotated[list[Pixel], Field(min_length=SIDE, max_length=SIDE)]
Rows = Annotated[list[Row], Field(min_length=SIDE, max_length=SIDE)]
Flat = Annotated[list[Pixel], Field(min_length=SIDE * SIDE, max_length=SIDE * SIDE)]
TOP_K = "How many of the most likely classes to list in `top`."


class FashionImage(BaseModel):
    """One 28x28 grayscale image in the dataset's convention: light garment on a dark background."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"pixels": _trousers(), "top_k": 3}]})

    pixels: Rows | Flat = Field(
        description="Brightness 0-255 (0 = background) as 28 rows of 28 numbers, or 784 numbers row by row.")
    top_k: JsonInt = Field(3, ge=1, le=10, description=TOP_K)

    @field_validator("pixels", mode="wrap")
    @classmethod
    def _pixels(cls, value: Any, handler: Any) -> np.ndarray:
        """The annotation documents the shape; this checks it, with one message naming the rule broken
        (rather than a list per union branch and pixel), and keeps the pixels as a 28x28 array."""
        return check_pixels(value)

    @field_serializer("pixels")
    def _rows(self, pixels: np.ndarray) -> list[list[float]]:
        return pixels.tolist()


class TopClass(BaseModel):
    label: int = Field(ge=0, le=9, description="Class index.")
    name: str = Field(description="Class name in English.", examples=["Trouser"])
    probability: float = Field(ge=0, le=1)


class FashionPrediction(BaseModel):
    label: int = Field(ge=0, le=9, description="Most likely class, 0-9.", examples=[1])
    name: str = Field(description="Its English name.", examples=["Trouser"])
    name_zh: str = Field(description="Its Chinese name, as in the course notes.", examples=["裤子"])
    probabilities: list[float] = Field(min_length=10, max_length=10,
                                       description="Probability of each class, index = class.")
    top: list[TopClass] = Field(description="The top_k most likely classes, best first.")


class ImageRejected(Exception):
    """An upload refused before decoding: not a supported image (415) or too many pixels (413)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Prepared:
    """An uploaded image already turned into dataset pixels (28x28, 0-255), queued like a FashionImage."""

    pixels: np.ndarray
    top_k: int


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    """The first frame of a PNG/JPEG/WebP/GIF/BMP as 8-bit grayscale, transparency composited onto white."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageRejected(413, f"image has too many pixels: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageRejected(415, "the upload is not a PNG, JPEG, WebP, GIF or BMP image; send one of those") from None
    if image.width * image.height > max_pixels:  # checked before decoding a byte of pixel data
        raise ImageRejected(413, f"image is {image.width}x{image.height} = {image.width * image.height} pixels, "
                                 f"more than the limit of {max_pixels}; send a smaller picture")
    try:
        image.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error... for damaged data
        message = f"the {image.format} image is truncated or corrupt ({exc}); send the whole file"
        raise InputError(message, "file") from None
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("L")


def to_dataset_pixels(data: bytes, max_pixels: int) -> np.ndarray:
    """An uploaded picture as the dataset would show it: 28x28, 0-255, light garment centred on black.

    A light background (most photos and drawings) is inverted; the garment is cropped to its bounding
    box, contrast-stretched to 0-255 and fitted into 28x28 keeping its aspect ratio, as Fashion-MNIST did.
    """
    gray = np.asarray(_decode(data, max_pixels))
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 127:
        gray, border = 255 - gray, 255 - border
    background = float(np.median(border))
    contrast = float(gray.max()) - background
    if contrast < 16:  # nothing stands out (stretching would only amplify noise): a blank input, as for /fashion
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


class Fashion(Predictor):
    name = "fashion"
    folder = "fashion"
    Input = FashionImage
    Output = FashionPrediction
    summary = "Classify a 28x28 Fashion-MNIST garment image (10 classes)"
    description = ("CNN over 28x28 grayscale pixels, light garment on a dark background, as in Fashion-MNIST. "
                   "For an ordinary picture use POST /fashion/image.")

    def setup(self, artifact: Artifact, device: torch.device) -> None:
        self.net = build_net(artifact.manifest.hyperparameters)
        self.net.load_state_dict(artifact.load_state_dict("model.pt", device))
        self.net = for_inference(self.net.to(device).eval())
        # bfloat16 products where the hardware has them: 2.5x the images/s at batch 64 on the target CPU, and
        # the same validation accuracy (README). Always on, so an image's answer does not depend on its batch.
        self.bf16 = bf16_is_fast(device)

    @torch.inference_mode()
    def predict(self, batch: list[FashionImage | Prepared]) -> list[FashionPrediction]:
        pixels = np.stack([item.pixels for item in batch])[:, None] / np.float32(255)
        x = torch.from_numpy(pixels).to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            logits = self.net(x)
        probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return [self._prediction(p, item.top_k) for p, item in zip(probabilities, batch)]

    @staticmethod
    def _prediction(p: np.ndarray, top_k: int) -> FashionPrediction:
        best = [int(i) for i in np.argsort(-p, kind="stable")[:top_k]]
        return FashionPrediction(
            label=best[0], name=NAMES[best[0]], name_zh=NAMES_ZH[best[0]],
            probabilities=[round(float(v), 6) for v in p],
            top=[TopClass(label=i, name=NAMES[i], probability=round(float(p[i]), 6)) for i in best])

    def add_routes(self, router, submit) -> None:
        """``POST /fashion/image``: decode and preprocess on a thread-pool thread, then the same batcher."""
        from service.routes import ErrorBody  # routes imports the registry, which imports this package

        async def predict_image(
            request: Request,
            file: UploadFile = File(description="A PNG, JPEG, WebP, GIF (first frame) or BMP picture of one garment."),
            top_k: int = Query(3, ge=1, le=10, description=TOP_K),
        ) -> FashionPrediction:
            data = await file.read()
            try:
                pixels = await run_in_threadpool(to_dataset_pixels, data, request.app.state.settings.max_image_pixels)
            except ImageRejected as exc:
                raise HTTPException(exc.status, str(exc)) from None
            return (await submit([Prepared(pixels, top_k)], request))[0]

        validation_errors = {"$ref": "#/components/schemas/HTTPValidationError"}  # the body of FastAPI's own 422s
        responses = {
            413: {"model": ErrorBody, "description": "The body is over the size limit, or the image has more pixels "
                                                     "than SERVE_MAX_IMAGE_PIXELS (checked before decoding)."},
            415: {"model": ErrorBody, "description": "The upload is not a PNG, JPEG, WebP, GIF or BMP image."},
            422: {"description": "A parameter is invalid, or the image data is truncated or corrupt.",
                  "content": {"application/json": {"schema": validation_errors}}},
        }
        # The part's media types, so clients (and fuzzers) know the bytes must be an image, not any file.
        encoding = {"file": {"contentType": "image/png, image/jpeg, image/webp, image/gif, image/bmp"}}
        router.add_api_route(
            f"/{self.name}/image", predict_image, methods=["POST"], response_model=FashionPrediction,
            summary="Classify an uploaded picture of a garment", operation_id=f"predict_{self.folder}_image",
            description="Any size; a light background is inverted, the garment is cropped, fitted into 28x28 "
                        "and centred like the dataset, then classified by the same model as POST /fashion.",
            responses=responses,
            openapi_extra={"requestBody": {"content": {"multipart/form-data": {"encoding": encoding}}}})
