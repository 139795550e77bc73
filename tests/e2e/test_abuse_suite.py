"""The cheap attacks of the abuse suite (benchmarks/abuse.py), reduced, against a real server each.

Each test starts its own ``python -m service`` with the attack's settings, runs the attack for two seconds
beside the suite's monitor (a /healthz prober and a well-behaved client) and asserts the targets of issue 14:
a request without a key refused before its body is read, a body over its route's limit refused, a tampered
artifact never loaded, an oversized ICC profile answered with its cause, slow connections closed within the
read deadline, /healthz answered throughout and the well-behaved client served.

Round two (two workers, client keys, gRPC on): megabytes of request headers answered 431 and closed,
pipelined requests bounded (the server stops reading), 7 MB gRPC messages without a key UNAUTHENTICATED,
oversized v2 bodies (8 MB BYTES tensors, JSON number arrays) a 4xx, and an upload whose EXIF block is damaged
a 4xx amid good requests that are each answered as when sent alone.

The heavy attacks (8 maximum-size uploads, 1000 slow connections, 500 streams, 10,000 hanging gRPC calls,
the gRPC floods) run only in the full suite: ``python -m benchmarks.abuse``.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import abuse

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

QUICK = dict(seconds=2.0, baseline_s=0.5, settle_s=1.0, json_concurrency=2, slow_connections=50, read_timeout_s=2.0)
EVERY_ATTACK = ("server_alive", "healthz_never_failed", "good_client_only_2xx")


def run(name: str, **options) -> dict:
    return abuse.run_attack(name, abuse.Options(**{**QUICK, **options}))


def assert_checks(result: dict, *names: str) -> None:
    failed = [name for name in (*EVERY_ATTACK, *names) if not result["checks"].get(name)]
    report = {key: result.get(key) for key in ("error", "healthz", "good_client", "outcome")}
    assert not failed, (
        f"{result['attack']} failed {failed}\n{abuse.outcome_line(result)}\n"
        f"{json.dumps(report, indent=1, default=str)[:6000]}"
    )


def test_json_key_flood_is_refused_before_the_body():
    result = run("json-key-flood")
    assert_checks(
        result, "no_key_401", "no_key_answered_before_body", "no_key_within_1s", "with_key_413", "with_key_within_1s"
    )
    out = result["outcome"]
    assert out["body_bytes"] > 6_500_000
    # the 413 names the route's own limit, far below the global 8 MB. Its body is read after the status line
    # while this client is still sending megabytes; on a loaded machine the connection may end before that
    # read (exchange() records why), so the text is checked when it arrived (test_runtime_api checks it always).
    held = out["with_key_held"]
    assert "/house-price" in held.get("detail", "") or held.get("response_error"), held


def test_tampered_artifact_never_loads():
    result = run("tampered-artifact")
    assert_checks(
        result,
        "payloads_live_in_control",
        "no_marker",
        "house_price_failed",
        "house_price_503",
        "fashion_weights_refused",
        "poem_path_escape_refused",
        "phone_price_serves",
    )
    assert not any(result["outcome"]["markers_present"].values())


def test_icc_bomb_is_answered_with_its_cause():
    result = run("icc-bomb")
    assert_checks(result, "icc_413_or_422", "icc_not_not_a_png")
    for verdict in result["outcome"]["verdicts"].values():
        for detail in verdict["details"].values():
            assert "not a png" not in detail.lower()


def test_slow_connections_are_closed_within_the_read_deadline():
    result = run("slowloris")
    assert_checks(result, "slow_closed_within_timeout_plus_3s")
    modes = result["outcome"]["modes"]
    assert set(modes) == {"idle", "headers", "body"}
    assert sum(mode["connections"] for mode in modes.values()) == QUICK["slow_connections"]
    for mode in modes.values():
        assert mode["still_open_at_end"] == 0
        assert mode["lifetime_s"]["max"] <= QUICK["read_timeout_s"] + 3


# Round two: two workers, client keys and gRPC on (abuse.round_two_settings), sizes reduced.

ROUND_TWO = {
    "settle_s": 2.0,
    "header_connections": 4,
    "header_bytes": 1024 * 1024,
    "pipeline_connections": 4,
    "pipeline_bytes": 32 * 1024 * 1024,
    "grpc_concurrency": 8,
    "grpc_channels": 2,
    "v2_concurrency": 2,
    "v2_numbers": 300_000,
    "mix_clients": 16,
}


def test_header_flood_is_answered_431_and_closed():
    result = run("header-flood", **ROUND_TWO)
    assert_checks(result, "header_431", "header_431_closes")
    assert set(result["outcome"]["by_mode"]) == {"many-lines", "huge-value"}


def test_pipelined_requests_are_bounded():
    result = run("pipeline-unread", **ROUND_TWO)
    assert_checks(result, "pipeline_server_stopped_reading", "pipeline_answers_bounded", "pipeline_connections_closed")
    assert len(result["outcome"]["records"]) == ROUND_TWO["pipeline_connections"]


def test_big_grpc_messages_without_a_key_are_unauthenticated():
    result = run("grpc-big-nokey", **ROUND_TWO)
    assert_checks(result, "grpc_nokey_unauthenticated")
    assert result["outcome"]["message_bytes"] > 1_900_000  # just under the server's 2 MB cap
    # refused on its metadata, the message is never taken in: a server that received each message before
    # refusing it rose ~370 MB here (8 calls at once), one that refuses on the metadata ~100 MB
    assert result["rss_mb"]["peak_rise"] < 250, result["rss_mb"]


def test_big_v2_bodies_get_a_4xx():
    result = run("v2-bodies", **ROUND_TWO)
    assert_checks(result, "v2_bodies_4xx")
    assert set(result["outcome"]["by_payload"]) == {
        "bytes_1_byte_elements",
        "bytes_empty_elements",
        "json_numbers_flat",
        "json_numbers_nested",
    }


def test_broken_exif_upload_is_a_4xx_and_good_answers_are_unchanged():
    result = run("broken-upload-mix", **ROUND_TWO)
    assert_checks(
        result, "exif_payload_raises_in_pillow", "exif_4xx", "bad_requests_4xx", "good_never_5xx", "good_answers_match"
    )
    assert result["outcome"]["alone"] == {"fashion": 200, "fashion-batch": 200, "fashion-image": 200}
