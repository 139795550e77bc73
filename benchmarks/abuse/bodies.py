"""Oversized request bodies: a JSON object of 800k unknown keys (json-key-flood: refused before it is read)
and v2 inference bodies of millions of tiny tensor elements (v2-bodies)."""

from __future__ import annotations

import asyncio
import json
import time

from .attack import Attack, Ctx, round_two_settings, turns
from .options import API_KEY, Options
from .payloads import key_flood_body, v2_bodies
from .wire import by_payload, exchange, post_head, send_until, summarize_exchanges


async def attack_json_key_flood(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    body = ctx.extra["json"]
    out["body_bytes"] = len(body)
    out["keys"] = opts.json_keys
    valid = f"X-API-Key: {ctx.key}\r\n".encode()
    heads = {
        label: post_head("/house-price", "application/json", len(body), extra)
        for label, extra in (("no_key", b""), ("with_key", valid))
    }
    # The cheap refusals, each on one request that pauses after 64 KB of its body: an answer during the pause
    # came before the server read the body.
    for label, head in heads.items():
        held = out[f"{label}_held"] = await exchange(
            ctx.port, head, body, hold_at=64 * 1024, hold_s=1.5, timeout=opts.client_timeout_s
        )
        held["answered_before_body"] = held["status"] is not None and held.get("body_sent_at_answer", 0) <= 64 * 1024
    # Then the flood: json_concurrency bodies in flight at once, sent at full speed, half the time without a key.
    for label, head in heads.items():
        deadline = time.monotonic() + opts.seconds / 2
        results: list[dict] = []
        out[f"{label}_flood_raw"] = results

        async def send(head: bytes = head) -> dict:
            return await exchange(ctx.port, head, body, timeout=opts.client_timeout_s)

        await asyncio.gather(*(send_until(deadline, send, results) for _ in range(opts.json_concurrency)))


def _prepare_json(ctx: Ctx) -> None:
    ctx.extra["json"] = key_flood_body(ctx.opts.json_keys)


def _finish_json(ctx: Ctx) -> None:
    for label in ("no_key", "with_key"):
        raw = ctx.outcome.pop(f"{label}_flood_raw", [])
        ctx.outcome[f"{label}_flood"] = summarize_exchanges(raw)


def _checks_json(result: dict, opts: Options) -> dict[str, bool]:
    out = result["outcome"]

    def only(label: str, status: int) -> bool:
        """The held request got ``status``; every flood request too, or a reset while its body was still being
        sent (the server stopped reading: its answer was lost to the reset, see ``exchange``)."""
        flood = out.get(f"{label}_flood", {}).get("statuses", {})
        return (
            out.get(f"{label}_held", {}).get("status") == status
            and bool(flood)
            and all(k == str(status) or k.startswith("reset mid-body") for k in flood)
        )

    def fast(label: str) -> bool:
        worst = out.get(f"{label}_flood", {}).get("seconds_to_answer_or_reset", {}).get("max")
        return worst is not None and worst < 1.0

    return {
        "no_key_401": only("no_key", 401),
        "no_key_answered_before_body": bool(out.get("no_key_held", {}).get("answered_before_body")),
        "no_key_within_1s": fast("no_key"),
        "with_key_413": only("with_key", 413),
        "with_key_within_1s": fast("with_key"),
    }


def _prepare_v2(ctx: Ctx) -> None:
    ctx.extra["v2"] = v2_bodies(ctx.opts)


async def attack_v2_bodies(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    bodies = ctx.extra["v2"]
    out["body_bytes"] = {name: len(body) for name, (_, _, body) in bodies.items()}
    names = list(bodies)
    records: list[dict] = []
    out["records"] = records
    deadline = time.monotonic() + opts.seconds

    async def worker(i: int) -> None:
        for name in turns(names, i, deadline):
            path, extra, body = bodies[name]
            head = post_head(
                path, "application/octet-stream" if extra else "application/json", len(body), ctx.key_header() + extra
            )
            record = await exchange(ctx.port, head, body, timeout=opts.client_timeout_s)
            record["payload"] = name
            records.append(record)

    await asyncio.gather(*(worker(i) for i in range(opts.v2_concurrency)))


def _finish_v2(ctx: Ctx) -> None:
    ctx.outcome["by_payload"] = by_payload(ctx.outcome.pop("records", []))


def _checks_v2(result: dict, opts: Options) -> dict[str, bool]:
    payloads = result["outcome"].get("by_payload", {})

    def refused(summary: dict) -> bool:
        """Every request 400/413/422, or reset while its body was still being sent (the server answered early
        and closed: the answer was lost to the reset, see ``exchange``), and at least one status came."""
        statuses = summary["statuses"]
        return any(k in ("400", "413", "422") for k in statuses) and all(
            k in ("400", "413", "422") or k.startswith("reset mid-body") for k in statuses
        )

    return {
        "v2_bodies_4xx": len(payloads) == 4 and all(refused(s) for s in payloads.values()),
        "v2_bodies_answered_within_2s": len(payloads) == 4
        and all((s["seconds_to_answer_or_reset"]["max"] or 99) < 2 for s in payloads.values()),
    }


def _line_json(out: dict) -> str:
    parts = []
    for label in ("no_key", "with_key"):
        held, flood = out.get(f"{label}_held", {}), out.get(f"{label}_flood", {})
        parts.append(
            f"{label}: {flood.get('statuses')} max "
            f"{flood.get('seconds_to_answer_or_reset', {}).get('max')} s, "
            f"held {held.get('status')} {'before' if held.get('answered_before_body') else 'after'} body"
        )
    return "; ".join(parts)


def _line_v2(out: dict) -> str:
    return "; ".join(
        f"{p}: {s['statuses']} max {s['seconds_to_answer']['max']} s" for p, s in out.get("by_payload", {}).items()
    )


JSON_KEY_FLOOD = Attack(
    "json-key-flood",
    attack_json_key_flood,
    settings=lambda o: {"SERVE_API_KEYS": json.dumps([API_KEY])},
    prepare=_prepare_json,
    finish=_finish_json,
    bound=lambda o: o.seconds + 3 * o.client_timeout_s + 10,
    checks=_checks_json,
    line=_line_json,
)
V2_BODIES = Attack(
    "v2-bodies",
    attack_v2_bodies,
    settings=round_two_settings,
    prepare=_prepare_v2,
    finish=_finish_v2,
    bound=lambda o: o.seconds + o.client_timeout_s + 10,
    checks=_checks_v2,
    line=_line_v2,
    seconds=15.0,
)
