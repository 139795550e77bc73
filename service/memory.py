"""Memory given back after large requests, so that an attack's megabytes do not stay with the process.

glibc keeps freed memory in the arena of the thread that freed it (a body decoded on a thread, a gRPC
message in grpc's core) and returns it to the system only when told to. A large request asks for a trim;
one background task per process does it at most once a second, on a thread (``malloc_trim`` walks the
arenas, a few milliseconds), never on the request's path.
"""

from __future__ import annotations

import asyncio
import contextlib

from service.models.base import return_freed_memory

TRIM_AFTER_BYTES = 1 << 20  # a request body (or gRPC message) larger than this asks for a trim
TRIM_EVERY_S = 1.0

_wanted = False


def trim_soon() -> None:
    """Ask for freed memory to be given back within a second."""
    global _wanted
    _wanted = True


async def _trim_forever() -> None:
    global _wanted
    while True:
        await asyncio.sleep(TRIM_EVERY_S)
        if _wanted:
            _wanted = False
            await asyncio.to_thread(return_freed_memory)


@contextlib.asynccontextmanager
async def trimming():
    """Run the trimmer for as long as the app serves."""
    task = asyncio.get_running_loop().create_task(_trim_forever(), name="memory-trim")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
