"""Raw HTTP/1.1 on asyncio streams: the attacks need what an HTTP client library hides (a body sent while the
answer is awaited, a pause mid-body, the bytes sent before an answer, a reset told apart from an answer)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from .options import HOST
from .stats import percentile


def parse_head(data: bytes) -> tuple[int | None, dict[str, str]]:
    lines = data.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        status = None
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_head(reader: asyncio.StreamReader) -> tuple[int | None, dict[str, str]]:
    return parse_head(await reader.readuntil(b"\r\n\r\n"))


async def read_body(
    reader: asyncio.StreamReader,
    headers: dict[str, str],
    keep: int = 2000,
    on_data: Callable[[bytes], None] | None = None,
) -> tuple[bytes, int]:
    """Read one response body (content-length, chunked, or until EOF): (its first ``keep`` bytes, its size)."""
    kept, total = bytearray(), 0

    def take(data: bytes) -> None:
        nonlocal total
        total += len(data)
        if len(kept) < keep:
            kept.extend(data[: keep - len(kept)])
        if on_data:
            on_data(data)

    if "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, 1 << 16))
            if not data:
                break
            left -= len(data)
            take(data)
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # the (empty) trailer
                break
            take((await reader.readexactly(size + 2))[:-2])
    else:
        while data := await reader.read(1 << 16):
            take(data)
    return bytes(kept), total


def detail_of(body: bytes) -> str:
    """The ``detail`` of a JSON error body (or the text itself), shortened."""
    text = body.decode("utf-8", "replace")
    try:
        value = json.loads(text).get("detail", text)
        text = value if isinstance(value, str) else json.dumps(value)
    except (ValueError, AttributeError):
        pass
    return text[:300]


def close_writer(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        with contextlib.suppress(Exception):
            writer.transport.abort()


async def exchange(
    port: int,
    head: bytes,
    body: bytes = b"",
    *,
    hold_at: int | None = None,
    hold_s: float = 0.0,
    timeout: float = 30.0,
    keep: int = 2000,
) -> dict[str, Any]:
    """One raw HTTP/1.1 request on a new connection, the body written while the answer is awaited.

    With ``hold_at``, only the first ``hold_at`` body bytes are sent, then nothing for ``hold_s`` seconds,
    then the rest: an answer during the pause came before the server had the body. Returns the status, the
    seconds until the status line, body bytes written by then, the answer's size and detail, or the error."""
    out: dict[str, Any] = {"status": None, "error": None, "body_bytes": len(body)}
    t0 = time.monotonic()
    writer = None
    sent = 0
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port, limit=1 << 20), 10)
    except Exception as exc:
        out["error"] = f"connect: {type(exc).__name__}"
        out["seconds"] = round(time.monotonic() - t0, 3)
        return out

    async def sender() -> None:
        nonlocal sent
        writer.write(head)
        await writer.drain()
        stop = len(body) if hold_at is None else min(hold_at, len(body))
        for limit, pause in ((stop, hold_s if hold_at is not None else 0.0), (len(body), 0.0)):
            while sent < limit:
                piece = body[sent : min(limit, sent + (1 << 18))]
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
            if pause:
                await asyncio.sleep(pause)

    send_task = asyncio.create_task(sender())
    head_task = asyncio.create_task(read_head(reader))
    try:
        done, _ = await asyncio.wait({head_task}, timeout=timeout)
        if not done:
            out["error"] = f"no answer within {timeout:g} s"
            return out
        out["seconds"] = round(time.monotonic() - t0, 4)
        out["body_sent_at_answer"] = sent
        out["body_complete_at_answer"] = (
            send_task.done() and not send_task.cancelled() and send_task.exception() is None
        )
        try:
            status, headers = head_task.result()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError) as exc:
            # A server that answers early and closes while the body is still coming sends a reset (unread data
            # in its socket), and the reset can discard its answer before this side reads it: counted apart.
            complete = out["body_complete_at_answer"]
            out["error"] = (
                f"closed without an answer: {type(exc).__name__}"
                if complete
                else f"reset mid-body, answer unread: {type(exc).__name__}"
            )
            out["reset_mid_body"] = not complete
            out["seconds"] = round(time.monotonic() - t0, 4)  # until the connection ended
            if send_task.done() and not send_task.cancelled() and send_task.exception() is not None:
                out["send_error"] = type(send_task.exception()).__name__
            return out
        out["status"] = status
        out["retry_after"] = headers.get("retry-after")
        send_task.cancel()
        try:
            kept, size = await asyncio.wait_for(read_body(reader, headers, keep), max(1.0, timeout - out["seconds"]))
            out["response_bytes"] = size
            out["detail"] = detail_of(kept)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as exc:
            out["response_error"] = type(exc).__name__
        out["total_seconds"] = round(time.monotonic() - t0, 4)
        return out
    finally:
        for task in (send_task, head_task):
            task.cancel()
        await asyncio.gather(send_task, head_task, return_exceptions=True)
        close_writer(writer)


def summarize_exchanges(results: list[dict]) -> dict[str, Any]:
    statuses = Counter(str(r["status"]) if r["status"] is not None else (r.get("error") or "none") for r in results)
    times = [r["seconds"] for r in results if r.get("status") is not None]
    ended = [r["seconds"] for r in results if r.get("status") is not None or r.get("reset_mid_body")]
    details = {}
    for r in results:
        key = str(r["status"])
        if r.get("detail") is not None and key not in details and not (r["status"] and r["status"] < 300):
            details[key] = r["detail"]
    return {
        "requests": len(results),
        "statuses": dict(statuses),
        "seconds_to_answer": {"p50": percentile(times, 50), "max": max(times) if times else None},
        "seconds_to_answer_or_reset": {"p50": percentile(ended, 50), "max": max(ended) if ended else None},
        "response_bytes_max": max((r.get("response_bytes") or 0 for r in results), default=0),
        "details": details,
    }


def multipart(filename: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = "abuse" + os.urandom(8).hex()
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_head(path: str, content_type: str, length: int, extra: bytes = b"") -> bytes:
    return (
        (
            f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n"
        ).encode()
        + extra
        + b"\r\n"
    )


def by_payload(results: list[dict]) -> dict[str, Any]:
    """``summarize_exchanges`` for each payload (each result's ``payload``)."""
    return {
        name: summarize_exchanges([r for r in results if r["payload"] == name])
        for name in sorted({r["payload"] for r in results})
    }


async def send_until(
    deadline: float,
    send: Callable[[], Awaitable[dict]],
    results: list[dict],
    refused: Callable[[dict], bool] = lambda result: result["status"] is None,
) -> None:
    """``send()`` once, then again until ``deadline``, each result into ``results`` as it comes (a cut-off run
    still reports what it got); after a refused connection, a pause of 0.2 s rather than a spin."""
    first = True
    while first or time.monotonic() < deadline:
        first = False
        result = await send()
        results.append(result)
        if refused(result):
            await asyncio.sleep(0.2)


async def read_until_close(
    reader: asyncio.StreamReader, kept: bytearray, keep: int, on_first: Callable[[], None] | None = None
) -> str:
    """Read what the server sends until it closes, keeping the first ``keep`` bytes in ``kept`` (``on_first``
    called as the first bytes arrive): how the connection ended."""
    try:
        while data := await reader.read(1 << 16):
            if on_first is not None:
                on_first()
                on_first = None
            kept.extend(data[: keep - len(kept)])
        return "closed by server"
    except (ConnectionError, OSError) as exc:
        return f"reset: {type(exc).__name__}"


def answer_of(data: bytes) -> tuple[int | None, str | None]:
    """The status and the detail of an answer from its first bytes (None for what is no HTTP answer)."""
    if not data.startswith(b"HTTP/"):
        return None, None
    status = parse_head(data)[0]
    _, found, body = data.partition(b"\r\n\r\n")
    return status, detail_of(body) if status is not None and found else None
