"""Fashion-MNIST garment class (0-9) from a 28x28 grayscale image: a small VGG-style CNN.

Two ways in: ``POST /fashion`` with pixels in the dataset's own convention (28x28, 0-255, light garment
on a dark background), and ``POST /fashion/image`` with an ordinary picture, which ``images.py`` turns
into that convention first (grayscale, dark background, cropped to the garment, fitted into 28x28 and
centred, as the dataset itself was made), on the model's worker thread.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, Field, field_serializer, field_validator

from service.artifacts import Artifact
from service.models.base import JsonFloat, JsonInt, Predictor, StrictInput, UploadRoute
from service.models.conformal import ALPHA, ALPHA_RANGE, DEFAULT_ALPHA, PREDICTION_SET, label_sets, load_conformal
from service.models.fashion.images import BLANK_CONTRAST, MEDIA_TYPES, to_dataset_pixels
from service.nets import fashion_cnn
from service.nets.fashion_cnn import NAMES, SIDE

NAMES_ZH = ["T恤", "裤子", "套衫", "连衣裙", "外套", "凉鞋", "衬衫", "运动鞋", "包", "短靴"]


def check_pixels(value: Any) -> np.ndarray:
    """A 28x28 float array from a 28x28 nested list or a flat list of 784 numbers (or such a numeric array,
    as a v2 tensor row arrives); ValueError names the rule."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "uif":  # no detour through Python lists
        if value.shape not in ((SIDE, SIDE), (SIDE * SIDE,)):
            raise ValueError(f"pixels must be 28 rows of 28 numbers, or 784; got shape {list(value.shape)}")
        return _in_range(value.astype(np.float32).reshape(SIDE, SIDE))
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
    return _in_range(np.asarray(flat, dtype=np.float32).reshape(SIDE, SIDE))


def _in_range(array: np.ndarray) -> np.ndarray:
    if not np.isfinite(array).all():
        raise ValueError("pixels must be finite numbers from 0 to 255; NaN and Infinity are not allowed")
    if array.min() < 0 or array.max() > 255:
        raise ValueError(
            f"pixels must be from 0 to 255 (0 = background, 255 = brightest garment); "
            f"got values from {array.min():g} to {array.max():g}"
        )
    return array


INK = 64  # a pixel brighter than this (a quarter of full scale) is part of the garment, for the drift summaries


def image_summaries(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """What drift is watched on for (N, 28, 28) images on the dataset's 0-255 scale: mean brightness, the share
    of pixels with ink, and the shares of rows and of columns holding any (how much of the frame the garment
    fills). Training profiles its validation images with the same function (training/fashion.py)."""
    ink = pixels > INK
    return {
        "mean_intensity": pixels.mean(axis=(1, 2), dtype=np.float64),
        "ink_fraction": ink.mean(axis=(1, 2)),
        "ink_rows": ink.any(axis=2).mean(axis=1),
        "ink_columns": ink.any(axis=1).mean(axis=1),
    }


def _trousers() -> list[list[int]]:
    """A crude pair of trousers (waistband over two legs), so the docs page has a valid example to try."""
    return [[200 if 8 <= x < 20 and (y < 6 or not 13 <= x < 15) else 0 for x in range(SIDE)] for y in range(SIDE)]


Pixel = Annotated[float, Field(ge=0, le=255)]
Row = Annotated[list[Pixel], Field(min_length=SIDE, max_length=SIDE)]
Rows = Annotated[list[Row], Field(min_length=SIDE, max_length=SIDE)]
Flat = Annotated[list[Pixel], Field(min_length=SIDE * SIDE, max_length=SIDE * SIDE)]
TOP_K = "How many of the most likely classes to list in `top`."


class FashionImage(StrictInput):
    """One 28x28 grayscale image in the dataset's convention: light garment on a dark background."""

    pixels: Rows | Flat = Field(
        description="Brightness 0-255 (0 = background) as 28 rows of 28 numbers, or 784 numbers row by row."
    )
    top_k: JsonInt = Field(3, ge=1, le=10, description=TOP_K)
    alpha: JsonFloat = Field(DEFAULT_ALPHA, ge=ALPHA_RANGE[0], le=ALPHA_RANGE[1], description=ALPHA)

    @field_validator("pixels", mode="wrap")
    @classmethod
    def _pixels(cls, value: Any, handler: Any) -> np.ndarray:
        """The annotation documents the shape; this checks it, with one message naming the rule broken
        (rather than a list per union branch and pixel), and keeps the pixels as a 28x28 array."""
        return check_pixels(value)

    @field_serializer("pixels")
    def _rows(self, pixels: np.ndarray) -> Any:  # (not a union: pydantic would check every number against it)
        """As sent: whole numbers as integers (what clients send, and a third of the cost of floats in JSON)."""
        whole = pixels.astype(np.uint8)  # validated: 0-255
        return whole.tolist() if np.array_equal(whole, pixels) else pixels.tolist()


class TopClass(BaseModel):
    label: int = Field(ge=0, le=9, description="Class index.")
    name: str = Field(description="Class name in English.", examples=["Trouser"])
    probability: float = Field(ge=0, le=1)


class FashionPrediction(BaseModel):
    label: int = Field(ge=0, le=9, description="Most likely class, 0-9.", examples=[1])
    name: str = Field(description="Its English name.", examples=["Trouser"])
    name_zh: str = Field(description="Its Chinese name, as in the course notes.", examples=["裤子"])
    probabilities: list[float] = Field(
        min_length=10, max_length=10, description="Probability of each class, index = class."
    )
    top: list[TopClass] = Field(description="The top_k most likely classes, best first.")
    prediction_set: list[str] | None = Field(description=PREDICTION_SET, examples=[["Trouser"]])
    blank: bool = Field(
        description=(
            "True when nothing stands out from the background (brightest pixel less than 16 above the darkest): "
            "there is no garment to classify, and the classes above are the model's guess for an empty image."
        )
    )


class UploadOptions(BaseModel):
    """Query parameters of POST /fashion/image."""

    top_k: int = Field(3, ge=1, le=10, description=TOP_K)
    alpha: float = Field(DEFAULT_ALPHA, ge=ALPHA_RANGE[0], le=ALPHA_RANGE[1], description=ALPHA)


class Fashion(Predictor):
    Input = FashionImage
    Output = FashionPrediction
    example = {"pixels": _trousers(), "top_k": 3}
    summary = "Classify a 28x28 Fashion-MNIST garment image (10 classes)"
    description = (
        "CNN over 28x28 grayscale pixels, light garment on a dark background, as in Fashion-MNIST. "
        "For an ordinary picture use POST /fashion/image."
    )
    max_instance_bytes = 64 * 1024  # 784 numbers with 17 significant digits, one per line, fit in ~22 KB
    v2_tensors = {"pixels": ("FP32", [-1, SIDE, SIDE])}  # UINT8 and [-1, 784] are accepted too
    upload = UploadRoute(
        path="image",
        summary="Classify an uploaded picture of a garment",
        description="Any size; a light background is inverted, the garment is cropped, fitted into 28x28 "
        "and centred like the dataset, then classified by the same model as POST /fashion.",
        file_description="A PNG, JPEG, WebP, GIF (first frame) or BMP picture of one garment.",
        media_types=MEDIA_TYPES,
        Options=UploadOptions,
        errors={
            413: "The body is over the size limit, or the image has more pixels than SERVE_MAX_IMAGE_PIXELS "
            "(checked before decoding).",
            415: "The upload is not a PNG, JPEG, WebP, GIF or BMP image.",
            422: "A parameter is invalid, or the image data is truncated or corrupt.",
        },
    )

    def setup(self, artifact: Artifact, device: torch.device) -> None:
        net = fashion_cnn.build(artifact.manifest.hyperparameters)
        net.load_state_dict(artifact.load_state_dict("model.pt", device))
        # bfloat16 weights where the hardware multiplies them natively: 2.5x the images/s at batch 64 on the
        # target CPU, and the same validation accuracy (README). Always on, so an answer does not depend on its batch.
        self.net = fashion_cnn.for_inference(net.to(device).eval(), device)
        self.conformal = load_conformal(artifact)

    def decode(self, data: bytes, options: UploadOptions) -> FashionImage:
        pixels = to_dataset_pixels(data, self.settings.max_image_pixels)
        # the field holds the checked array (see _pixels), while its annotation is the JSON shape
        return FashionImage.model_construct(pixels=pixels, top_k=options.top_k, alpha=options.alpha)  # type: ignore[arg-type]

    def predict(self, batch: list[FashionImage]) -> list[FashionPrediction]:
        pixels = np.stack([item.pixels for item in batch])[:, None] / np.float32(255)
        logits = self.net(torch.from_numpy(pixels).to(self.device))
        probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()
        blank = np.ptp(pixels.reshape(len(batch), -1), axis=1) * 255 < BLANK_CONTRAST
        sets = label_sets(self.conformal, probabilities, [item.alpha for item in batch], NAMES)
        return [
            self._prediction(p, item.top_k, bool(b), labels)
            for p, item, b, labels in zip(probabilities, batch, blank, sets)
        ]

    def drift_columns(self, batch: list[FashionImage], outputs: Sequence[Any]) -> dict[str, np.ndarray]:
        labels = np.array([getattr(out, "label", np.nan) for out in outputs], np.float64)
        return {**image_summaries(np.stack([item.pixels for item in batch])), "output": labels}

    @staticmethod
    def _prediction(p: np.ndarray, top_k: int, blank: bool, prediction_set: list[str] | None) -> FashionPrediction:
        best = [int(i) for i in np.argsort(-p, kind="stable")[:top_k]]
        return FashionPrediction(
            label=best[0],
            name=NAMES[best[0]],
            name_zh=NAMES_ZH[best[0]],
            probabilities=[round(float(v), 6) for v in p],
            top=[TopClass(label=i, name=NAMES[i], probability=round(float(p[i]), 6)) for i in best],
            prediction_set=prediction_set,
            blank=blank,
        )
