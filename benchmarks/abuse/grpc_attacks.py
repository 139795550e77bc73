"""Attacks on the v2 gRPC endpoint: large messages without a key or with invalid contents, a flood of small
calls, and thousands of calls whose message never comes. grpcio is imported only when these run."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from .attack import Attack, Ctx, round_two_settings, turns
from .options import HOST, MB, Options
from .stats import percentile

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def grpc_channel(ctx: Ctx):
    """A channel on its own connection (no subchannel shared with the others), messages up to 64 MB."""
    import grpc  # only the gRPC attacks need it

    return grpc.aio.insecure_channel(
        f"{HOST}:{ctx.server.grpc_port}",
        options=[
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_send_message_length", 64 * MB),
            ("grpc.max_receive_message_length", 64 * MB),
        ],
    )


def infer_method(channel, stream: bool = False):
    """ModelInfer on ``channel``; with ``stream``, called with a request iterator (it may never send one)."""
    from tritonclient.grpc import service_pb2 as pb  # Triton's client, as an attacker would use

    make = channel.stream_unary if stream else channel.unary_unary
    return make(
        INFER_METHOD,
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )


def infer_request(model: str, example: dict):
    """A ModelInferRequest of one instance: each field of ``example`` a [1] tensor in its typed contents."""
    from tritonclient.grpc import service_pb2 as pb  # Triton's client, as an attacker would use

    request = pb.ModelInferRequest(model_name=model)
    for name, value in example.items():
        if value is None:
            continue
        tensor = request.inputs.add(name=name, shape=[1])
        if isinstance(value, bool):
            tensor.datatype = "BOOL"
            tensor.contents.bool_contents.append(value)
        elif isinstance(value, int):
            tensor.datatype = "INT64"
            tensor.contents.int64_contents.append(value)
        elif isinstance(value, float):
            tensor.datatype = "FP64"
            tensor.contents.fp64_contents.append(value)
        else:
            tensor.datatype = "BYTES"
            tensor.contents.bytes_contents.append(str(value).encode())
    return request


def pixels_request(datatype: str, shape: list[int], raw: bytes):
    """A fashion ModelInferRequest whose pixels are ``raw`` (raw_input_contents), declared as given."""
    from tritonclient.grpc import service_pb2 as pb  # Triton's client, as an attacker would use

    request = pb.ModelInferRequest(model_name="fashion")
    request.inputs.add(name="pixels", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


async def grpc_call(method, request, metadata: list, timeout: float) -> dict[str, Any]:
    import grpc

    record: dict[str, Any] = {"code": "OK", "detail": None}
    t0 = time.monotonic()
    try:
        await method(request, metadata=metadata or None, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        record["code"], record["detail"] = exc.code().name, (exc.details() or "")[:200]
    record["seconds"] = round(time.monotonic() - t0, 4)
    return record


def summarize_calls(records: list[dict]) -> dict[str, Any]:
    times = [r["seconds"] for r in records]
    details = {}
    for r in records:
        if r["detail"] and r["code"] not in details:
            details[r["code"]] = r["detail"]
    return {
        "calls": len(records),
        "codes": dict(Counter(r["code"] for r in records)),
        "seconds": {"p50": percentile(times, 50), "p99": percentile(times, 99), "max": max(times, default=None)},
        "details": details,
    }


async def grpc_callers(
    ctx: Ctx, requests: dict[str, Any], metadata: Callable[[int], list], callers: int, records: list[dict]
) -> None:
    """``callers`` loops for --seconds over a few channels, caller i sending the requests in turn from the
    i-th, with ``metadata(i)``; each call's code and time go to ``records``."""
    channels = [grpc_channel(ctx) for _ in range(ctx.opts.grpc_channels)]
    names = list(requests)
    deadline = time.monotonic() + ctx.opts.seconds

    async def caller(i: int) -> None:
        method = infer_method(channels[i % len(channels)])
        for name in turns(names, i, deadline):
            record = await grpc_call(method, requests[name], metadata(i), ctx.opts.client_timeout_s)
            record["variant"] = name
            record["keyed"] = bool(metadata(i))
            records.append(record)

    try:
        await asyncio.gather(*(caller(i) for i in range(callers)))
    finally:
        for channel in channels:
            await channel.close()


def big_message_instances(opts: Options) -> int:
    return opts.grpc_message_bytes // (28 * 28 * 4)  # 28x28 FP32 pictures in a message of that size


async def attack_grpc_big_nokey(ctx: Ctx) -> None:
    n = big_message_instances(ctx.opts)
    ctx.outcome["message_bytes"] = n * 28 * 28 * 4
    records: list[dict] = []
    ctx.outcome["calls_raw"] = records
    requests = {"fp32": pixels_request("FP32", [n, 28, 28], bytes(n * 28 * 28 * 4))}
    await grpc_callers(ctx, requests, lambda i: [], ctx.opts.grpc_concurrency, records)


async def attack_grpc_big_invalid(ctx: Ctx) -> None:
    n = big_message_instances(ctx.opts)
    size = n * 28 * 28 * 4
    over = (9 * MB) // (28 * 28 * 4)
    requests = {
        "fp32_short": pixels_request("FP32", [n, 28, 28], bytes(size - 4)),  # 1 value short
        "fp32_wrong_shape": pixels_request("FP32", [1, 28, 28], bytes(size)),
        "bytes_empty_elements": pixels_request("BYTES", [n, 28, 28], bytes(size)),  # n*784 empty strings
        "over_cap": pixels_request("FP32", [over, 28, 28], bytes(over * 28 * 28 * 4)),
    }
    ctx.outcome["message_bytes"] = {name: r.ByteSize() for name, r in requests.items()}
    records: list[dict] = []
    ctx.outcome["calls_raw"] = records
    await grpc_callers(ctx, requests, lambda i: ctx.key_metadata(), ctx.opts.grpc_concurrency, records)


async def attack_grpc_flood(ctx: Ctx) -> None:
    request = infer_request("phone-price", ctx.examples["phone-price"])
    records: list[dict] = []
    ctx.outcome["calls_raw"] = records
    t0 = time.monotonic()
    await grpc_callers(
        ctx, {"phone": request}, lambda i: ctx.key_metadata() if i % 2 == 0 else [], ctx.opts.grpc_callers, records
    )
    ctx.outcome["calls_per_s"] = round(len(records) / (time.monotonic() - t0), 1)


def _finish_grpc(ctx: Ctx) -> None:
    records = ctx.outcome.pop("calls_raw", [])
    ctx.outcome["by_variant"] = {
        name: summarize_calls([r for r in records if r["variant"] == name])
        for name in sorted({r["variant"] for r in records})
    }
    ctx.outcome["by_key"] = {
        label: summarize_calls([r for r in records if r["keyed"] == keyed])
        for label, keyed in (("with_key", True), ("no_key", False))
        if any(r["keyed"] == keyed for r in records)
    }


def _only_codes(summary: dict | None, codes: set[str]) -> bool:
    return bool(summary) and summary["calls"] > 0 and set(summary["codes"]) <= codes


def _checks_grpc_nokey(result: dict, opts: Options) -> dict[str, bool]:
    return {
        "grpc_nokey_unauthenticated": _only_codes(
            result["outcome"].get("by_key", {}).get("no_key"), {"UNAUTHENTICATED"}
        )
    }


def _checks_grpc_invalid(result: dict, opts: Options) -> dict[str, bool]:
    variants = result["outcome"].get("by_variant", {})
    return {
        "grpc_invalid_refused": len(variants) == 4
        and all(_only_codes(v, {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}) for v in variants.values()),
        "grpc_over_cap_resource_exhausted": _only_codes(variants.get("over_cap"), {"RESOURCE_EXHAUSTED"}),
    }


def _checks_grpc_flood(result: dict, opts: Options) -> dict[str, bool]:
    by_key = result["outcome"].get("by_key", {})
    good = result.get("good_client") or {}
    return {
        "grpc_with_key_ok": _only_codes(by_key.get("with_key"), {"OK"}),
        "grpc_nokey_unauthenticated": _only_codes(by_key.get("no_key"), {"UNAUTHENTICATED"}),
        "good_client_p50_under_100ms": good.get("p50_ms") is not None and good["p50_ms"] < 100,
    }


async def attack_grpc_streams_unread(ctx: Ctx) -> None:
    """Open --grpc-streams ModelInfer calls whose request never comes (HTTP/2 streams the server must hold),
    over a few connections, and leave them; meanwhile a separate channel calls phone-price every 0.2 s. A call
    still pending at the end was accepted by the server or is queued by this client's HTTP/2 stack (the
    server's MAX_CONCURRENT_STREAMS): grpcio does not tell them apart."""
    opts, out = ctx.opts, ctx.outcome
    hold = asyncio.Event()

    async def never_sends():
        await hold.wait()
        return
        yield  # an async generator that never yields: the call's message never comes

    channels = [grpc_channel(ctx) for _ in range(opts.grpc_stream_channels)]
    methods = [infer_method(channel, stream=True) for channel in channels]
    deadline = time.monotonic() + opts.seconds
    calls = []
    try:
        t0 = time.monotonic()
        for i in range(opts.grpc_streams):
            calls.append(methods[i % len(methods)](never_sends(), metadata=ctx.key_metadata()))
            if i % 200 == 199:
                await asyncio.sleep(0)
        out.update(streams=opts.grpc_streams, channels=len(channels), opened_in_s=round(time.monotonic() - t0, 2))
        probes: list[dict] = []
        out["probe_raw"] = probes
        request = infer_request("phone-price", ctx.examples["phone-price"])
        probe_channel = grpc_channel(ctx)
        try:
            method = infer_method(probe_channel)
            while time.monotonic() < deadline:
                probes.append(await grpc_call(method, request, ctx.key_metadata(), 2.0))
                await asyncio.sleep(0.2)
        finally:
            await probe_channel.close()
        codes = Counter()
        for call in calls:
            if call.done():
                codes[(await call.code()).name] += 1
        out["ended_early"] = dict(codes)  # refused (RESOURCE_EXHAUSTED, UNAVAILABLE) or otherwise ended
        out["held_to_end"] = len(calls) - sum(codes.values())  # accepted, or queued by the client's HTTP/2 limit
    finally:
        for call in calls:
            call.cancel()
        hold.set()
        for channel in channels:
            await channel.close()


def _finish_grpc_streams(ctx: Ctx) -> None:
    ctx.outcome["probe"] = summarize_calls(ctx.outcome.pop("probe_raw", []))


def _checks_grpc_streams(result: dict, opts: Options) -> dict[str, bool]:
    return {"grpc_probe_ok": _only_codes(result["outcome"].get("probe"), {"OK"})}


def _line_calls(out: dict) -> str:
    return "; ".join(
        f"{v}: {s['codes']} p50 {s['seconds']['p50']} s max {s['seconds']['max']} s"
        for v, s in out.get("by_variant", {}).items()
    )


def _line_flood(out: dict) -> str:
    return f"{out.get('calls_per_s')} calls/s; " + "; ".join(
        f"{k}: {s['codes']} p50 {s['seconds']['p50']} s" for k, s in out.get("by_key", {}).items()
    )


def _line_streams(out: dict) -> str:
    probe = out.get("probe") or {}
    return (
        f"{out.get('streams')} calls: held {out.get('held_to_end')}, ended early {out.get('ended_early')}; "
        f"probe {probe.get('codes')} p99 {(probe.get('seconds') or {}).get('p99')} s"
    )


def _grpc_attack(name: str, run, checks, line=_line_calls) -> Attack:
    """The round-two server; calls that may each wait out the client timeout."""
    return Attack(
        name,
        run,
        settings=round_two_settings,
        finish=_finish_grpc,
        bound=lambda o: o.seconds + o.client_timeout_s + 10,
        checks=checks,
        line=line,
        seconds=15.0,
    )


GRPC_BIG_NOKEY = _grpc_attack("grpc-big-nokey", attack_grpc_big_nokey, _checks_grpc_nokey)
GRPC_BIG_INVALID = _grpc_attack("grpc-big-invalid", attack_grpc_big_invalid, _checks_grpc_invalid)
GRPC_FLOOD = _grpc_attack("grpc-flood", attack_grpc_flood, _checks_grpc_flood, line=_line_flood)
GRPC_STREAMS_UNREAD = Attack(
    "grpc-streams-unread",
    attack_grpc_streams_unread,
    settings=round_two_settings,
    finish=_finish_grpc_streams,
    bound=lambda o: o.seconds + 60,
    checks=_checks_grpc_streams,
    line=_line_streams,
    seconds=15.0,
)
