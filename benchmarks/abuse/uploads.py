"""Upload attacks on the image routes: maximum-size pictures (big-uploads), a PNG with a huge ICC profile
(icc-bomb), and a PNG whose EXIF Pillow cannot read amid good requests (broken-upload-mix)."""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter
from typing import Any

import httpx

from .attack import Attack, Ctx, round_two_settings, turns
from .options import Options
from .payloads import big_jpeg, big_png, icc_png, small_png
from .stats import percentile
from .wire import by_payload, exchange, multipart, post_head, send_until


async def upload_loop(
    ctx: Ctx, name: str, data: bytes, content_type: str, deadline: float, results: list[dict]
) -> None:
    """POST /fashion/image of ``data`` as the form's file ``name``, again and again until ``deadline``."""
    body, form_type = multipart(name, data, content_type)
    head = post_head("/fashion/image", form_type, len(body), ctx.key_header())

    async def send() -> dict:
        result = await exchange(ctx.port, head, body, timeout=ctx.opts.client_timeout_s)
        result["payload"] = name
        return result

    await send_until(deadline, send, results)


async def attack_big_uploads(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    png, jpeg = ctx.extra["png"], ctx.extra["jpeg"]
    out.update(png_bytes=len(png), jpeg_bytes=len(jpeg))
    deadline = time.monotonic() + opts.seconds
    results: list[dict] = []
    out["uploads"] = results  # filled as they finish: a cut-off run still reports what it got
    tasks = [upload_loop(ctx, "big_rgba.png", png, "image/png", deadline, results) for _ in range(opts.uploads)]
    tasks.append(upload_loop(ctx, "photo.jpg", jpeg, "image/jpeg", deadline, results))
    await asyncio.gather(*tasks)


async def attack_icc_bomb(ctx: Ctx) -> None:
    out = ctx.outcome
    deadline = time.monotonic() + ctx.opts.seconds
    results: list[dict] = []
    out["uploads"] = results
    payloads = ctx.extra["icc"]
    out["payload_bytes"] = {name: len(data) for name, data in payloads.items()}
    await asyncio.gather(
        *(upload_loop(ctx, name, data, "image/png", deadline, results) for name, data in payloads.items())
    )


def _prepare_big_uploads(ctx: Ctx) -> None:
    ctx.extra["png"] = big_png(ctx.payloads).read_bytes()
    ctx.extra["jpeg"] = big_jpeg(ctx.payloads).read_bytes()


def _finish_uploads(ctx: Ctx) -> None:
    ctx.outcome["by_payload"] = by_payload(ctx.outcome.pop("uploads", []))
    ctx.outcome["latency_s"] = {
        name: summary["seconds_to_answer"] for name, summary in ctx.outcome["by_payload"].items()
    }


def _checks_big_uploads(result: dict, opts: Options) -> dict[str, bool]:
    peak = (result.get("rss_mb") or {}).get("peak")
    png = result["outcome"].get("by_payload", {}).get("big_rgba.png", {})
    return {
        "peak_rss_under_1200mb": peak is not None and peak < 1200,
        "every_upload_answered": bool(png) and all(k.isdigit() for k in png.get("statuses", {"x": 1})),
    }


def _prepare_icc(ctx: Ctx) -> None:
    ctx.extra["icc"] = {
        "icc_random.png": icc_png(ctx.payloads, "random").read_bytes(),
        "icc_zeros.png": icc_png(ctx.payloads, "zeros").read_bytes(),
    }


def icc_verdicts(outcome: dict) -> dict[str, Any]:
    verdicts = {}
    for name, summary in outcome.get("by_payload", {}).items():
        statuses = [int(s) for s in summary["statuses"] if s.isdigit()]
        details = " ".join(summary["details"].values()).lower()
        verdicts[name] = {
            "statuses": summary["statuses"],
            "details": summary["details"],
            "413_or_422": bool(statuses)
            and all(s in (413, 422) for s in statuses)
            and len(statuses) == len(summary["statuses"]),
            "misleading": 415 in statuses or "not a png" in details,
        }
    return verdicts


def _checks_icc(result: dict, opts: Options) -> dict[str, bool]:
    verdicts = result["outcome"].get("verdicts", {})
    return {
        "icc_413_or_422": bool(verdicts) and all(v["413_or_422"] for v in verdicts.values()),
        "icc_not_not_a_png": bool(verdicts) and not any(v["misleading"] for v in verdicts.values()),
    }


def _finish_icc(ctx: Ctx) -> None:
    _finish_uploads(ctx)
    ctx.outcome["verdicts"] = icc_verdicts(ctx.outcome)


def _prepare_mix(ctx: Ctx) -> None:
    from PIL import Image

    ctx.extra["png"], ctx.extra["broken"] = small_png(), small_png(broken_exif=True)
    try:
        Image.open(io.BytesIO(ctx.extra["broken"])).getexif()
        ctx.outcome["broken_exif_raises"] = False
    except Exception as exc:  # the point of the payload: Pillow cannot read its EXIF
        ctx.outcome["broken_exif_raises"] = f"{type(exc).__name__}: {exc}"


async def attack_broken_upload_mix(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    example = ctx.examples["fashion"]
    other = {"pixels": [[255 - v for v in row] for row in example["pixels"]]}
    image = {"file": ("shirt.png", ctx.extra["png"], "image/png")}
    kinds = {  # name: (group, path, httpx arguments)
        "fashion": ("good", "/fashion", {"json": example}),
        "fashion-batch": ("good", "/fashion/batch", {"json": {"instances": [example, other]}}),
        "fashion-image": ("good", "/fashion/image", {"files": image}),
        "invalid-json": (
            "bad",
            "/fashion",
            {"content": b'{"pixels": [[0, 1,', "headers": {"Content-Type": "application/json"}},
        ),
        "wrong-pixels": ("bad", "/fashion", {"json": {"pixels": [[1, 2, 3]]}}),
        "broken-exif": (
            "exif",
            "/fashion/image",
            {"files": {"file": ("broken.png", ctx.extra["broken"], "image/png")}},
        ),
    }
    out["broken_png_bytes"] = len(ctx.extra["broken"])
    records: list[dict] = []
    out["records"] = records
    limits = httpx.Limits(max_connections=opts.mix_clients, max_keepalive_connections=opts.mix_clients)
    async with httpx.AsyncClient(
        base_url=ctx.server.url, headers=ctx.key_headers(), timeout=opts.client_timeout_s, limits=limits
    ) as client:

        async def send(kind: str) -> dict[str, Any]:
            group, path, arguments = kinds[kind]
            record: dict[str, Any] = {"kind": kind, "group": group, "status": None}
            t0 = time.monotonic()
            try:
                response = await client.post(path, **arguments)
                record["status"] = response.status_code
                try:
                    record["body"] = response.json()
                except ValueError:
                    record["body"] = response.text[:300]
            except httpx.HTTPError as exc:
                record["error"] = type(exc).__name__
            record["seconds"] = round(time.monotonic() - t0, 4)
            return record

        # each good request's answer when sent alone, before the mix
        alone = {kind: await send(kind) for kind, (group, _, _) in kinds.items() if group == "good"}
        out["alone"] = {kind: r["status"] for kind, r in alone.items()}
        names = list(kinds)
        deadline = time.monotonic() + opts.seconds

        async def client_loop(i: int) -> None:
            for kind in turns(names, i, deadline):
                record = await send(kind)
                if record["group"] == "good":
                    expected = alone[record["kind"]]
                    record["matches"] = (
                        expected["status"] == 200
                        and record["status"] == 200
                        and record.get("body") == expected.get("body")
                    )
                    if not record["matches"] and "first_mismatch" not in out:
                        out["first_mismatch"] = {
                            "kind": record["kind"],
                            "status": record["status"],
                            "got": str(record.get("body"))[:300],
                            "alone": str(expected.get("body"))[:300],
                        }
                if record["group"] != "good" or not record.get("matches"):
                    record["detail"] = str(record.get("body"))[:200] if record["status"] != 200 else None
                record.pop("body", None)
                records.append(record)

        await asyncio.gather(*(client_loop(i) for i in range(opts.mix_clients)))


def _finish_mix(ctx: Ctx) -> None:
    records = ctx.outcome.pop("records", [])
    by_kind = {}
    for kind in sorted({r["kind"] for r in records}):
        rows = [r for r in records if r["kind"] == kind]
        times = [r["seconds"] for r in rows]
        by_kind[kind] = {
            "group": rows[0]["group"],
            "requests": len(rows),
            "statuses": dict(Counter(str(r["status"] or r.get("error")) for r in rows)),
            "seconds": {"p50": percentile(times, 50), "max": max(times)},
            "details": {str(r["status"]): r["detail"] for r in rows if r.get("detail")},
        }
        if rows[0]["group"] == "good":
            by_kind[kind]["mismatches"] = sum(not r["matches"] for r in rows)
    ctx.outcome["by_kind"] = by_kind


def _checks_mix(result: dict, opts: Options) -> dict[str, bool]:
    out = result["outcome"]
    kinds = out.get("by_kind", {})

    def groups(name: str) -> list[dict]:
        return [k for k in kinds.values() if k["group"] == name]

    def only(name: str, low: int, high: int) -> bool:
        """The group was sent, and every status of it is in [low, high)."""
        statuses = [s for k in groups(name) for s in k["statuses"]]
        return bool(statuses) and all(s.isdigit() and low <= int(s) < high for s in statuses)

    return {
        "exif_payload_raises_in_pillow": bool(out.get("broken_exif_raises")),
        "exif_4xx": only("exif", 400, 500),
        "bad_requests_4xx": only("bad", 400, 500),
        "good_never_5xx": only("good", 0, 500),
        "good_answers_match": len(groups("good")) == 3 and all(k["mismatches"] == 0 for k in groups("good")),
    }


def _line_by_payload(out: dict) -> str:
    return "; ".join(f"{p}: {s['statuses']}" for p, s in out.get("by_payload", {}).items())


def _line_mix(out: dict) -> str:
    return "; ".join(
        f"{k}: {s['statuses']}" + (f" mismatches {s['mismatches']}" if "mismatches" in s else "")
        for k, s in out.get("by_kind", {}).items()
    )


BIG_UPLOADS = Attack(
    "big-uploads",
    attack_big_uploads,
    prepare=_prepare_big_uploads,
    finish=_finish_uploads,
    bound=lambda o: o.seconds + o.client_timeout_s + 5,
    checks=_checks_big_uploads,
    line=_line_by_payload,
)
ICC_BOMB = Attack(
    "icc-bomb",
    attack_icc_bomb,
    prepare=_prepare_icc,
    finish=_finish_icc,
    bound=lambda o: o.seconds + o.client_timeout_s + 5,
    checks=_checks_icc,
    line=_line_by_payload,
)
BROKEN_UPLOAD_MIX = Attack(
    "broken-upload-mix",
    attack_broken_upload_mix,
    settings=round_two_settings,
    prepare=_prepare_mix,
    finish=_finish_mix,
    bound=lambda o: o.seconds + o.client_timeout_s + 20,
    checks=_checks_mix,
    line=_line_mix,
    seconds=15.0,
)
