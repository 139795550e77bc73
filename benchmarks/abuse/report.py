"""What a run reports: the checks every attack shares, each attack's one-line outcome, the Markdown table,
and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from .catalog import ATTACKS
from .server import ORIGINAL_NOFILE


def common_checks(result: dict) -> dict[str, bool]:
    """The targets every attack shares: what a neighbour of the attack must still see."""
    healthz = result.get("healthz") or {}
    good = result.get("good_client") or {}
    rss = result.get("rss_mb") or {}
    return {
        "server_alive": bool(result.get("server_alive")),
        "healthz_p99_under_100ms": healthz.get("p99_ms") is not None and healthz["p99_ms"] < 100,
        "healthz_never_failed": healthz.get("n", 0) > 0 and healthz.get("failures", 1) == 0,
        "good_client_only_2xx": good.get("requests", 0) > 0 and good.get("non_2xx_count", 1) == 0,
        "memory_peak_rise_under_500mb": rss.get("peak_rise") is not None and rss["peak_rise"] <= 500,
        "memory_end_rise_under_300mb": rss.get("end_rise") is not None and rss["end_rise"] <= 300,
    }


def outcome_line(result: dict) -> str:
    """A one-line summary of what the attacker got."""
    error = f"ERROR {result['error'][:150]}; " if "error" in result else ""
    return error + ATTACKS[result["attack"]].line(result.get("outcome", {}))


def table(results: list[dict]) -> str:
    """A Markdown table, one row per attack."""
    rows = [
        (
            "| attack | peak RSS MB (rise) | RSS after settle (rise) | /healthz p50 / p99 / max ms | fails "
            "| good req | good non-2xx | good p99 ms | checks failed | outcome |"
        ),
        "|---|---:|---:|---|---:|---:|---|---:|---|---|",
    ]
    for r in results:
        rss, hz, good = r.get("rss_mb") or {}, r.get("healthz") or {}, r.get("good_client") or {}
        failed = [k for k, v in r.get("checks", {}).items() if not v]
        rows.append(
            f"| {r['attack']} | {rss.get('peak')} ({rss.get('peak_rise')}) | {rss.get('after')} "
            f"({rss.get('end_rise')}) | {hz.get('p50_ms')} / {hz.get('p99_ms')} / "
            f"{hz.get('max_ms')} | {hz.get('failures')} | {good.get('requests')} | {good.get('non_2xx') or 0} | "
            f"{good.get('p99_ms')} | {', '.join(failed) or '-'} | {outcome_line(r)} |"
        )
    return "\n".join(rows)


def write(results: list[dict], out: Path) -> None:
    """The JSON report: the machine, how it was measured, and every attack's result."""
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "fd_limit_at_start": ORIGINAL_NOFILE[0],
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "how": "python -m benchmarks.abuse: a fresh `python -m service` per attack on 127.0.0.1; monitor in "
        "a separate process: /healthz every 20 ms on a new connection (healthz) and every 100 ms on a "
        "kept-alive one (healthz_keepalive), the good client at 20 req/s over 4 connections, VmRSS of "
        "the server and its children every 50 ms; figures over the attack and a settle after it",
        "attacks": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
