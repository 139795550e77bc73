"""Attacks on connections rather than requests: slow clients (slowloris), more idle connections than the
cap (conn-cap), megabytes of header lines (header-flood), and pipelined requests never read (pipeline-unread)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from .attack import Attack, Ctx, round_two_settings
from .options import HOST, MB, Options
from .server import raise_nofile
from .stats import percentile
from .wire import (
    answer_of,
    close_writer,
    exchange,
    post_head,
    read_until_close,
    send_until,
)


async def slow_connection(
    port: int, mode: str, deadline: float, semaphore: asyncio.Semaphore, key_header: bytes, t_attack: float
) -> dict[str, Any]:
    """One slow client: "idle" sends nothing, "headers" a header line every 3 s, "body" announces 8 MB to the
    upload route and sends 1 KB every 3 s. Returns how long the server kept it and what it said."""
    record: dict[str, Any] = {"mode": mode, "lifetime_s": None, "status": None, "ended": "still open"}
    writer = None
    try:
        async with semaphore:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    except Exception as exc:
        record["ended"] = f"connect error: {type(exc).__name__}"
        return record
    opened = time.monotonic()
    record["opened_at_s"] = round(opened - t_attack, 3)
    first = bytearray()
    reading = asyncio.create_task(read_until_close(reader, first, 1000))
    try:
        if mode == "headers":
            writer.write(f"POST /fashion/image HTTP/1.1\r\nHost: {HOST}\r\n".encode())
        elif mode == "body":
            writer.write(
                post_head("/fashion/image", "multipart/form-data; boundary=slow", 8_000_000, key_header)
                + b'--slow\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
            )
        line = 0
        while not reading.done():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait({reading}, timeout=min(3.0, left))
            if reading.done() or time.monotonic() >= deadline:
                break
            try:
                if mode == "headers":
                    line += 1
                    writer.write(f"X-Trickle-{line}: {'a' * 20}\r\n".encode())
                elif mode == "body":
                    writer.write(b"\x89" * 1024)
                if mode != "idle":
                    await asyncio.wait_for(writer.drain(), 3)
            except (ConnectionError, OSError, TimeoutError) as exc:
                await asyncio.wait({reading}, timeout=0.5)
                if not reading.done():
                    record["ended"] = f"write error: {type(exc).__name__}"
                    record["lifetime_s"] = round(time.monotonic() - opened, 3)
                break
        if reading.done():
            record["ended"] = reading.result()
            record["lifetime_s"] = round(time.monotonic() - opened, 3)
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        close_writer(writer)
    status, detail = answer_of(bytes(first))
    record["status"] = status
    if detail is not None:
        record["detail"] = detail
    if first and status is None:
        record["first_bytes"] = bytes(first[:80]).decode("latin-1")
    return record


def summarize_slow(records: list[dict], limit_s: float | None) -> dict[str, Any]:
    modes: dict[str, Any] = {}
    for mode in sorted({r["mode"] for r in records}):
        rows = [r for r in records if r["mode"] == mode]
        lifetimes = [r["lifetime_s"] for r in rows if r["lifetime_s"] is not None]
        modes[mode] = {
            "connections": len(rows),
            "ended": dict(Counter(r["ended"] for r in rows)),
            "statuses": dict(Counter(str(r["status"]) for r in rows)),
            "details": {
                str(status): next(r["detail"] for r in rows if r["status"] == status)
                for status in {r["status"] for r in rows if r.get("detail")}
            },
            "lifetime_s": {
                "min": min(lifetimes, default=None),
                "p50": percentile(lifetimes, 50),
                "max": max(lifetimes, default=None),
            },
            "still_open_at_end": sum(r["ended"] == "still open" for r in rows),
        }
        if limit_s is not None:
            modes[mode]["over_limit"] = sum(
                r["lifetime_s"] is None or r["lifetime_s"] > limit_s
                for r in rows
                if not r["ended"].startswith("connect error")
            )
    return modes


async def attack_slowloris(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    n = ctx.extra["connections"]
    hold = max(opts.seconds, opts.read_timeout_s + 6)
    out.update(connections=n, read_timeout_s=opts.read_timeout_s, held_up_to_s=hold)
    t0 = time.monotonic()
    semaphore = asyncio.Semaphore(100)
    modes = ("idle", "headers", "body")
    tasks = [
        asyncio.create_task(slow_connection(ctx.port, modes[i % 3], t0 + hold, semaphore, ctx.key_header(), t0))
        for i in range(n)
    ]
    records = await collect(tasks, out)
    out["modes"] = summarize_slow(records, opts.read_timeout_s + 3)
    out["all_closed_after_s"] = round(time.monotonic() - t0, 2)


async def collect(tasks: list[asyncio.Task], out: dict) -> list[dict]:
    """Each connection's record as it ends (kept in ``out["records"]`` as they come, for a cut-short run)."""
    records: list[dict] = []
    out["records"] = records
    try:
        for task in asyncio.as_completed(tasks):
            records.append(await task)
    finally:
        for task in tasks:
            task.cancel()
    return records


async def attack_conn_cap(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    n = ctx.extra["connections"]
    out.update(cap=opts.connection_cap, connections=n)
    t0 = time.monotonic()
    semaphore = asyncio.Semaphore(100)
    tasks = [
        asyncio.create_task(slow_connection(ctx.port, "idle", t0 + opts.seconds, semaphore, b"", t0)) for _ in range(n)
    ]
    records = await collect(tasks, out)
    refused = [r for r in records if r["lifetime_s"] is not None and r["lifetime_s"] < 1.0]
    out["held_to_end"] = sum(r["ended"] == "still open" for r in records)
    out["refused_within_1s"] = len(refused)
    out["refused_statuses"] = dict(Counter(str(r["status"]) for r in refused))
    out["closed_later"] = sum(r["lifetime_s"] is not None and r["lifetime_s"] >= 1.0 for r in records)
    out["connect_errors"] = sum(r["ended"].startswith("connect error") for r in records)
    # once the idle connections are gone, a new one must get through again
    await asyncio.sleep(0.3)
    recovery = await exchange(
        ctx.port, f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode(), timeout=5
    )
    out["healthz_after_release"] = {k: recovery.get(k) for k in ("status", "seconds", "error")}


def _connections_for(ctx: Ctx, wanted: int) -> int:
    soft = raise_nofile()
    margin = 200
    n = max(1, min(wanted, soft - margin))
    ctx.outcome["fd_limit_attacker"] = soft
    if n < wanted:
        ctx.outcome["capped_by_fd_limit"] = f"{wanted} asked, {n} possible with ulimit -n {soft}"
    return n


def _prepare_slowloris(ctx: Ctx) -> None:
    ctx.extra["connections"] = _connections_for(ctx, ctx.opts.slow_connections)


def _finish_slow(ctx: Ctx) -> None:
    records = ctx.outcome.pop("records", [])
    if "modes" not in ctx.outcome:  # cut off: summarize what finished
        ctx.outcome["modes"] = summarize_slow(records, ctx.opts.read_timeout_s + 3)


def _checks_slowloris(result: dict, opts: Options) -> dict[str, bool]:
    modes = result["outcome"].get("modes", {})
    return {
        "slow_closed_within_timeout_plus_3s": bool(modes) and all(m.get("over_limit", 1) == 0 for m in modes.values()),
        "no_connect_errors": bool(modes)
        and not any(k.startswith("connect error") for m in modes.values() for k in m["ended"]),
    }


def _prepare_conn_cap(ctx: Ctx) -> None:
    ctx.extra["connections"] = _connections_for(ctx, ctx.opts.connection_cap + ctx.opts.cap_extra)


def _finish_conn_cap(ctx: Ctx) -> None:
    ctx.outcome.pop("records", None)


def _checks_conn_cap(result: dict, opts: Options) -> dict[str, bool]:
    out = result["outcome"]
    # Over the cap, the connection that waited longest is closed to make room (so a probe gets in): the
    # check is that no more than the cap stay open, not that the newest are refused.
    return {
        "cap_enforced": out.get("held_to_end", 10**9) <= opts.connection_cap,
        "healthz_after_release_ok": out.get("healthz_after_release", {}).get("status") == 200,
    }


async def flood_connection(
    port: int, first: bytes, piece: bytes, total: int, tail: bytes, timeout: float = 5.0
) -> dict[str, Any]:
    """Send ``first``, then ``piece`` repeated to ``total`` bytes, then ``tail``, reading all the while: the
    first answer's status, the bytes sent before it came (or the server closed), and how the connection ended
    (closed by the server, reset, or still open ``timeout`` s after the last write)."""
    record: dict[str, Any] = {"status": None, "sent_at_answer": None, "sent": 0}
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    except (OSError, TimeoutError) as exc:
        record["ended"] = f"connect error: {type(exc).__name__}"
        return record
    got = bytearray()

    def answered() -> None:
        record["sent_at_answer"] = record["sent"]
        record["answer_s"] = round(time.monotonic() - t0, 4)

    reading = asyncio.create_task(read_until_close(reader, got, 2000, on_first=answered))
    chunk = piece * max(1, (1 << 16) // len(piece))
    try:
        writer.write(first)
        while record["sent"] < total and record["sent_at_answer"] is None and not reading.done():
            data = chunk[: total - record["sent"]]
            writer.write(data)
            await asyncio.wait_for(writer.drain(), timeout)
            record["sent"] += len(data)
        if record["sent"] >= total and record["sent_at_answer"] is None and not reading.done():
            writer.write(tail)
            await asyncio.wait_for(writer.drain(), timeout)
            record["sent_all"] = True
        await asyncio.wait({reading}, timeout=timeout)  # the answer, then the close
    except TimeoutError:
        record["write_stalled"] = True
    except (ConnectionError, OSError) as exc:
        record["write_error"] = type(exc).__name__
        await asyncio.wait({reading}, timeout=1.0)
    finally:
        record["ended"] = reading.result() if reading.done() else "still open"
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        close_writer(writer)
    record["seconds"] = round(time.monotonic() - t0, 4)
    record["status"], detail = answer_of(bytes(got))
    if detail is not None:
        record["detail"] = detail
    return record


async def attack_header_flood(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    head = (
        f"POST /phone-price HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    ).encode()  # no key
    modes = {
        "many-lines": (head, b"X-Flood: " + b"a" * 16 + b"\r\n", b"\r\n{}"),
        "huge-value": (head + b"X-Big: ", b"a" * 1024, b"\r\n\r\n{}"),
    }
    out.update(connections=opts.header_connections, header_bytes=opts.header_bytes)
    records: list[dict] = []
    out["records"] = records
    deadline = time.monotonic() + opts.seconds

    async def flood(mode: str) -> None:
        async def send() -> dict:
            record = await flood_connection(ctx.port, *modes[mode][:2], opts.header_bytes, modes[mode][2])
            record["mode"] = mode
            return record

        await send_until(deadline, send, records, refused=lambda record: record["ended"].startswith("connect error"))

    await asyncio.gather(*(flood(list(modes)[i % 2]) for i in range(opts.header_connections)))


def summarize_floods(records: list[dict]) -> dict[str, Any]:
    sent = [r["sent_at_answer"] if r["sent_at_answer"] is not None else r["sent"] for r in records]
    details = {}
    for r in records:
        if r.get("detail") and str(r["status"]) not in details:
            details[str(r["status"])] = r["detail"]
    return {
        "connections": len(records),
        "statuses": dict(Counter(str(r["status"]) for r in records)),
        "ended": dict(Counter(r["ended"] for r in records)),
        "sent_all": sum(bool(r.get("sent_all")) for r in records),
        "write_stalled": sum(bool(r.get("write_stalled")) for r in records),
        "kb_sent_before_answer_or_close": {
            "p50": round(percentile(sent, 50) / 1024, 1) if sent else None,
            "max": round(max(sent) / 1024, 1) if sent else None,
        },
        "seconds": {
            "p50": percentile([r.get("seconds", 0) for r in records], 50),
            "max": max((r.get("seconds", 0) for r in records), default=None),
        },
        "details": details,
    }


def _finish_header_flood(ctx: Ctx) -> None:
    records = ctx.outcome.pop("records", [])
    ctx.outcome["by_mode"] = {
        mode: summarize_floods([r for r in records if r["mode"] == mode])
        for mode in sorted({r["mode"] for r in records})
    }


def _checks_header_flood(result: dict, opts: Options) -> dict[str, bool]:
    modes = result["outcome"].get("by_mode", {})

    def answered_431(summary: dict) -> bool:
        """Every connection got 431, or was reset (the server closed with headers unread: the 431 can be lost
        to the reset), and at least one 431 came."""
        statuses, ended = summary["statuses"], summary["ended"]
        unanswered = statuses.get("None", 0)
        return (
            statuses.get("431", 0) > 0
            and set(statuses) <= {"431", "None"}
            and unanswered <= sum(v for k, v in ended.items() if k.startswith("reset"))
        )

    return {
        "header_431": len(modes) == 2 and all(answered_431(s) for s in modes.values()),
        "header_431_closes": len(modes) == 2 and all(s["ended"].get("still open", 0) == 0 for s in modes.values()),
    }


async def pipeline_connection(port: int, share: int, deadline: float, stall_s: float = 1.0) -> dict[str, Any]:
    """Pipeline GET /healthz up to ``share`` bytes without reading an answer, until the writes stall (the
    server stopped reading) for ``stall_s``, fail, or the deadline; hold the connection to the deadline, then
    read for 2 s what came back: how many answers, and whether the server closed the connection."""
    request = f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    chunk = request * ((1 << 16) // len(request))
    record: dict[str, Any] = {"sent": 0, "answers_read": 0}
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    except (OSError, TimeoutError) as exc:
        record["ended"] = record["closed"] = f"connect error: {type(exc).__name__}"
        return record
    t0 = time.monotonic()
    try:
        record["ended"] = "deadline"
        while time.monotonic() < deadline:
            data = chunk[: (share - record["sent"]) // len(request) * len(request)]
            if not data:
                record["ended"] = "sent all"
                break
            writer.write(data)
            await asyncio.wait_for(writer.drain(), stall_s)
            record["sent"] += len(data)
    except TimeoutError:
        record["ended"] = "stalled"
    except (ConnectionError, OSError) as exc:
        record["ended"] = f"write error: {type(exc).__name__}"
    record["stopped_after_s"] = round(time.monotonic() - t0, 2)
    record["requests_sent"] = record["sent"] // len(request)
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))  # never reading meanwhile
    record["closed"] = "still open"
    tail, end = b"", time.monotonic() + 2.0
    try:
        while (left := end - time.monotonic()) > 0:
            data = await asyncio.wait_for(reader.read(1 << 20), left)
            if not data:
                record["closed"] = "closed by server"
                break
            record["answers_read"] += (tail + data).count(b"HTTP/1.1 ") - tail.count(b"HTTP/1.1 ")
            tail = data[-8:]
    except TimeoutError:
        pass
    except (ConnectionError, OSError) as exc:
        record["closed"] = f"reset: {type(exc).__name__}"
    close_writer(writer)
    return record


async def attack_pipeline_unread(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    share = opts.pipeline_bytes // opts.pipeline_connections
    out.update(connections=opts.pipeline_connections, mb_per_connection=round(share / MB, 2))
    deadline = time.monotonic() + opts.seconds
    out["records"] = await asyncio.gather(
        *(pipeline_connection(ctx.port, share, deadline) for _ in range(opts.pipeline_connections))
    )


def _finish_pipeline(ctx: Ctx) -> None:
    records = ctx.outcome.get("records") or []
    for r in records:
        r["mb_sent"] = round(r.pop("sent") / MB, 2)
    ctx.outcome["ended"] = dict(Counter(r["ended"] for r in records))
    ctx.outcome["closed"] = dict(Counter(r["closed"] for r in records))
    ctx.outcome["mb_sent"] = {
        "min": min((r["mb_sent"] for r in records), default=None),
        "max": max((r["mb_sent"] for r in records), default=None),
        "total": round(sum(r["mb_sent"] for r in records), 1),
    }
    ctx.outcome["answers_read_max"] = max((r["answers_read"] for r in records), default=None)


def _checks_pipeline(result: dict, opts: Options) -> dict[str, bool]:
    records = result["outcome"].get("records") or []
    return {
        "pipeline_server_stopped_reading": bool(records)
        and all(r["ended"] == "stalled" or r["ended"].startswith("write error") for r in records),
        # the server answers what it queued (SERVE_MAX_PIPELINED, 8 by default), not all it was sent
        "pipeline_answers_bounded": bool(records) and all(r["answers_read"] <= 1000 for r in records),
        # and drops a client that reads no answers (closed or reset by the end of the attack)
        "pipeline_connections_closed": bool(records) and all(r["closed"] != "still open" for r in records),
    }


def _line_slowloris(out: dict) -> str:
    return "; ".join(
        f"{m}: {s['ended']} {s['statuses']} life max {s['lifetime_s']['max']} s"
        for m, s in out.get("modes", {}).items()
    )


def _line_conn_cap(out: dict) -> str:
    return (
        f"{out.get('connections')} conns, cap {out.get('cap')}: held {out.get('held_to_end')}, refused "
        f"{out.get('refused_within_1s')} {out.get('refused_statuses')}, later {out.get('closed_later')}, "
        f"connect errors {out.get('connect_errors')}"
    )


def _line_header_flood(out: dict) -> str:
    return "; ".join(
        f"{m}: {s['statuses']} {s['ended']}, KB sent before answer/close max "
        f"{s['kb_sent_before_answer_or_close']['max']}"
        for m, s in out.get("by_mode", {}).items()
    )


def _line_pipeline(out: dict) -> str:
    return (
        f"{out.get('connections')} conns: {out.get('ended')}, MB sent {out.get('mb_sent')}, answers read max "
        f"{out.get('answers_read_max')}, {out.get('closed')}"
    )


SLOWLORIS = Attack(
    "slowloris",
    attack_slowloris,
    settings=lambda o: {
        "SERVE_REQUEST_READ_TIMEOUT_S": f"{o.read_timeout_s:g}",
        **({"SERVE_MAX_CONNECTIONS": str(o.slow_max_connections)} if o.slow_max_connections else {}),
    },
    prepare=_prepare_slowloris,
    finish=_finish_slow,
    bound=lambda o: max(o.seconds, o.read_timeout_s + 6) + 20,
    checks=_checks_slowloris,
    line=_line_slowloris,
)
CONN_CAP = Attack(
    "conn-cap",
    attack_conn_cap,
    settings=lambda o: {
        "SERVE_MAX_CONNECTIONS": str(o.connection_cap),
        "SERVE_WORKERS": "1",  # a per-process cap
        "SERVE_REQUEST_READ_TIMEOUT_S": f"{o.seconds + 30:g}",
    },
    prepare=_prepare_conn_cap,
    finish=_finish_conn_cap,
    bound=lambda o: o.seconds + 20,
    checks=_checks_conn_cap,
    line=_line_conn_cap,
)
HEADER_FLOOD = Attack(
    "header-flood",
    attack_header_flood,
    settings=round_two_settings,
    finish=_finish_header_flood,
    bound=lambda o: o.seconds + 30,
    checks=_checks_header_flood,
    line=_line_header_flood,
    seconds=15.0,
)
PIPELINE_UNREAD = Attack(
    "pipeline-unread",
    attack_pipeline_unread,
    settings=round_two_settings,
    finish=_finish_pipeline,
    bound=lambda o: o.seconds + 15,
    checks=_checks_pipeline,
    line=_line_pipeline,
    seconds=15.0,
)
