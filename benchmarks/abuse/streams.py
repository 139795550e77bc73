"""stream-flood: hundreds of concurrent POST /poem/stream, each refused one retrying after its Retry-After,
while the good client calls POST /poem."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

from .attack import Attack, Ctx
from .options import HOST, Options
from .stats import percentile
from .wire import close_writer, detail_of, post_head, read_body, read_head


async def attack_stream_flood(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    body = json.dumps(ctx.examples.get("poem") or {"line_num": 2}).encode()
    head = post_head("/poem/stream", "application/json", len(body), ctx.key_header())
    deadline = time.monotonic() + opts.seconds
    attempts: list[dict] = []
    out.update(streams=opts.streams, body=json.loads(body))
    out["attempts_raw"] = attempts
    semaphore = asyncio.Semaphore(100)

    async def one() -> None:
        record: dict[str, Any] = {"status": None, "events": 0}
        t0 = time.monotonic()
        record["start"] = t0
        writer = None
        try:
            async with semaphore:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, ctx.port), 10)
            writer.write(head + body)
            await writer.drain()
            status, headers = await asyncio.wait_for(read_head(reader), max(0.1, deadline - time.monotonic() + 5))
            record["status"], record["retry_after"] = status, headers.get("retry-after")
            record["first_byte_s"] = round(time.monotonic() - t0, 4)
            tail = bytearray()

            def count(data: bytes) -> None:
                text = bytes(tail) + data
                record["events"] += text.count(b"event:") - bytes(tail).count(b"event:")
                tail[:] = text[-8:]
                if b"event: error" in text:
                    record["error_event"] = True

            left = deadline - time.monotonic()
            if left > 0:
                kept, _ = await asyncio.wait_for(read_body(reader, headers, keep=300, on_data=count), left)
                if status != 200:
                    record["detail"] = detail_of(kept)
                record["ended"] = "complete"
            else:
                record["ended"] = "cut by the attacker's deadline"
        except TimeoutError:
            record["ended"] = "cut by the attacker's deadline"
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            record["ended"] = f"error: {type(exc).__name__}"
        finally:
            close_writer(writer)
            record["end"] = time.monotonic()
            record["seconds"] = round(record["end"] - t0, 4)
            attempts.append(record)

    async def worker() -> None:
        while time.monotonic() < deadline:
            await one()
            last = attempts[-1] if attempts else {}
            if last.get("status") == 503:
                try:
                    wait = max(1.0, float(last.get("retry_after") or 1))
                except ValueError:
                    wait = 1.0
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            elif last.get("status") != 200:
                await asyncio.sleep(0.5)

    await asyncio.gather(*(worker() for _ in range(opts.streams)))


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def summarize_streams(attempts: list[dict]) -> dict[str, Any]:
    ok = [a for a in attempts if a["status"] == 200]
    refused = [a for a in attempts if a["status"] == 503]
    return {
        "attempts": len(attempts),
        "statuses": dict(Counter(str(a["status"]) for a in attempts)),
        "ended": dict(Counter(a.get("ended", "?") for a in attempts)),
        "refused_503": len(refused),
        "refused_with_retry_after": sum(bool(a.get("retry_after")) for a in refused),
        "retry_after_values": dict(Counter(str(a.get("retry_after")) for a in refused)),
        "refusal_detail": next((a.get("detail") for a in refused if a.get("detail")), None),
        # measured on this side, from each stream's first byte to its end as read here: a new stream can
        # start on the server just before this side has read the end of the one whose place it took
        "streams_served": len(ok),
        "most_streams_at_once": max_overlap([(a["start"] + a["first_byte_s"], a["end"]) for a in ok]),
        "stream_seconds": {
            "p50": percentile([a["seconds"] for a in ok], 50),
            "max": max((a["seconds"] for a in ok), default=None),
        },
        "events_per_stream_p50": percentile([a["events"] for a in ok], 50),
        "error_events": sum(bool(a.get("error_event")) for a in ok),
    }


def _finish_streams(ctx: Ctx) -> None:
    attempts = ctx.outcome.pop("attempts_raw", [])
    ctx.outcome.update(summarize_streams(attempts))


def _checks_streams(result: dict, opts: Options) -> dict[str, bool]:
    out = result["outcome"]
    return {
        "streams_capped": out.get("refused_503", 0) > 0,
        "refusals_carry_retry_after": out.get("refused_503", 0) == out.get("refused_with_retry_after", -1),
        "good_poem_p99_under_1s": (result.get("good_client") or {}).get("p99_ms") is not None
        and result["good_client"]["p99_ms"] < 1000,
    }


def _line_streams(out: dict) -> str:
    return (
        f"{out.get('attempts')} attempts {out.get('statuses')}, at once max {out.get('most_streams_at_once')}, "
        f"503 with Retry-After {out.get('refused_with_retry_after')}/{out.get('refused_503')}"
    )


STREAM_FLOOD = Attack(
    "stream-flood",
    attack_stream_flood,
    good_model="poem",
    finish=_finish_streams,
    bound=lambda o: o.seconds + 20,
    checks=_checks_streams,
    line=_line_streams,
)
