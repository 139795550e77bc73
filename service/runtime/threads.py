"""Work that must not hold the event loop: decoding large bodies on a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are decoded on a thread (measured: 8 MB took 1-2 s)


async def off_loop(size: int, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, on a thread when it decodes a body of ``size`` bytes over OFF_LOOP_BYTES, so that
    the event loop (and /healthz) gets the interpreter back every few milliseconds; small ones inline, where
    a thread hop would cost more than the work."""
    if size <= OFF_LOOP_BYTES:
        return function(*args)
    return await asyncio.to_thread(function, *args)
