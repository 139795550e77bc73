"""Decoding a large upload in a fresh Python process (so its memory is measured alone): bounded peak memory,
given back afterwards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT

DECODE_PEAK = """
import sys, numpy as np
from service.models.fashion import images
from service.models.base import return_freed_memory
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) / 1024
data = open(sys.argv[1], "rb").read()
before = status("VmRSS")
images.to_dataset_pixels(data, 40_000_000)
return_freed_memory()  # as the model's worker does after a batch with uploads
print(status("VmHWM") - before, status("VmRSS") - before)
"""


@pytest.mark.parametrize(
    "mode, size, fmt, most_mb",
    [
        ("RGBA", (6300, 6300), "PNG", 260),  # 39.7 M pixels: 6 bytes each at the peak (it was 480 MB before)
        ("RGB", (6000, 4000), "JPEG", 40),  # a phone photo: decoded at 1/4 scale, in grayscale
    ],
)
def test_decoding_a_large_picture_takes_bounded_memory_and_gives_it_back(tmp_path, mode, size, fmt, most_mb):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the peak memory of a process")
    rng = np.random.default_rng(0)
    picture = Image.new(mode, size, "white")
    picture.paste(
        Image.fromarray(rng.integers(0, 255, (size[1] // 2, size[0] // 3), np.uint8)).convert(mode),
        (size[0] // 3, size[1] // 4),
    )  # a garment-sized patch of noise on white
    path = tmp_path / f"big.{fmt.lower()}"
    picture.save(path, fmt)
    del picture
    out = subprocess.run([sys.executable, "-c", DECODE_PEAK, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    peak, kept = map(float, out.stdout.split())
    assert peak < most_mb and kept < 30, f"decoding took {peak:.0f} MB at its peak and kept {kept:.0f} MB"
