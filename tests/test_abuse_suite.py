"""The cheap attacks of the abuse suite (benchmarks/abuse.py), reduced, against a real server each.

Each test starts its own ``python -m service`` with the attack's settings, runs the attack for two seconds
beside the suite's monitor (a /healthz prober and a well-behaved client) and asserts the targets of issue 14:
a request without a key refused before its body is read, a body over its route's limit refused, a tampered
artifact never loaded, an oversized ICC profile answered with its cause, slow connections closed within the
read deadline, /healthz answered throughout and the well-behaved client served.

The heavy attacks (8 maximum-size uploads, 1000 slow connections, 500 streams) run only in the full suite:
``python -m benchmarks.abuse``.
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
    assert not failed, (f"{result['attack']} failed {failed}\n{abuse.outcome_line(result)}\n"
                        f"{json.dumps(report, indent=1, default=str)[:6000]}")


def test_json_key_flood_is_refused_before_the_body():
    result = run("json-key-flood")
    assert_checks(result, "no_key_401", "no_key_answered_before_body", "no_key_within_1s",
                  "with_key_413", "with_key_within_1s")
    out = result["outcome"]
    assert out["body_bytes"] > 6_500_000
    # the 413 names the route's own limit, far below the global 8 MB. Its body is read after the status line
    # while this client is still sending megabytes; on a loaded machine the connection may end before that
    # read (exchange() records why), so the text is checked when it arrived (test_runtime_api checks it always).
    held = out["with_key_held"]
    assert "/house-price" in held.get("detail", "") or held.get("response_error"), held


def test_tampered_artifact_never_loads():
    result = run("tampered-artifact")
    assert_checks(result, "payloads_live_in_control", "no_marker", "house_price_failed", "house_price_503",
                  "fashion_weights_refused", "poem_path_escape_refused", "phone_price_serves")
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
