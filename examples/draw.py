"""Draws the sample pictures in this folder (dark garments on white, like product photos), so the README's
upload examples have files to send: ``python examples/draw.py``. Shapes, not dataset images."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224
HERE = Path(__file__).parent


def canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("L", (SIZE, SIZE), 255)
    return image, ImageDraw.Draw(image)


def trousers() -> Image.Image:
    image, draw = canvas()
    draw.rectangle([64, 16, 160, 64], fill=40)  # waistband and hips
    draw.polygon([(64, 64), (108, 64), (100, 208), (64, 208)], fill=40)  # left leg
    draw.polygon([(116, 64), (160, 64), (160, 208), (124, 208)], fill=40)  # right leg
    return image


def tshirt() -> Image.Image:
    image, draw = canvas()
    draw.polygon(
        [
            (72, 24),
            (96, 24),
            (112, 40),
            (128, 24),
            (152, 24),
            (208, 64),
            (184, 96),
            (160, 80),
            (160, 208),
            (64, 208),
            (64, 80),
            (40, 96),
            (16, 64),
        ],
        fill=60,
    )
    return image


def bag() -> Image.Image:
    image, draw = canvas()
    draw.arc([72, 24, 152, 104], 180, 360, fill=30, width=12)  # handle
    draw.rectangle([32, 64, 192, 192], fill=50)
    return image


if __name__ == "__main__":
    for name, draw_it in (("trousers", trousers), ("tshirt", tshirt), ("bag", bag)):
        draw_it().save(HERE / f"{name}.png", optimize=True)
        print(HERE / f"{name}.png", np.asarray(Image.open(HERE / f"{name}.png")).shape)
