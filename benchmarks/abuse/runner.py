"""Running attacks: one against a fresh server beside the monitor (``run_attack``), or several in turn
(``run_suite``). A measuring tool: whatever the server does is recorded, never raised."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx

from .attack import Ctx
from .catalog import ATTACKS
from .monitor import Monitor, summarize_samples
from .options import Options
from .payloads import payload_dir
from .report import common_checks, table, write
from .server import Server, raise_nofile


def fetch_examples(url: str, key: str | None) -> dict[str, dict]:
    """Each model's example input from GET /models (input_schema.examples[0])."""
    try:
        response = httpx.get(url + "/models", headers={"X-API-Key": key} if key else {}, timeout=10)
        return {m["name"]: (m.get("input_schema", {}).get("examples") or [None])[0] for m in response.json()}
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def run_attack(name: str, opts: Options | None = None) -> dict[str, Any]:
    """Run one attack against a fresh server and return its result (figures, outcome, checks); never raises
    for what the server does (a crash, a refusal, a timeout is recorded)."""
    opts = opts or Options()
    attack = ATTACKS[name]
    if opts.seconds is None:
        opts = replace(opts, seconds=attack.seconds)
    work = Path(tempfile.mkdtemp(prefix=f"abuse-{name}-"))
    ctx = Ctx(opts=opts, work=work, payloads=payload_dir(opts))
    result: dict[str, Any] = {
        "attack": name,
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
    }
    server = monitor = None
    samples: dict = {}
    t_start = t_end = time.monotonic()
    started = time.monotonic()
    try:
        attack.prepare(ctx)
        settings = {**attack.settings(opts), **ctx.settings}
        ctx.key = json.loads(settings["SERVE_API_KEYS"])[0] if "SERVE_API_KEYS" in settings else None
        result["settings"] = settings
        server = ctx.server = Server(settings, work, opts.server_nofile)
        result["server_fd_limit"] = server.nofile
        result["readyz_at_start"] = server.wait_ready(ctx.key)
        result["server_start_s"] = round(time.monotonic() - started, 1)
        ctx.examples = fetch_examples(server.url, ctx.key)
        good_body = ctx.examples.get(attack.good_model)
        result["good_client_route"] = f"POST /{attack.good_model}"
        if good_body is None:
            result["good_client_note"] = f"no example for {attack.good_model} on /models: no good client"
        monitor = Monitor(server, ctx.key, f"/{attack.good_model}", good_body, opts, work)
        time.sleep(opts.baseline_s)
        t_start = time.monotonic()
        try:
            asyncio.run(asyncio.wait_for(attack.run(ctx), attack.bound(opts)))
        except TimeoutError:
            ctx.outcome["cut_off"] = f"the attack ran past its bound of {attack.bound(opts):g} s and was stopped"
        t_end = time.monotonic()
    except Exception as exc:  # a measuring tool: report, go on with the next attack
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc().splitlines()[-6:]
        t_end = time.monotonic()
    finally:
        if monitor is not None:
            time.sleep(opts.settle_s)
            samples = monitor.stop()
        if server is not None:
            result["server_alive"] = server.alive()
            if not server.alive():
                result["server_exit_code"] = server.process.returncode
            server.stop()
            result["server_log"] = server.log_summary()
        try:
            attack.finish(ctx)
        except Exception as exc:
            result.setdefault("error", f"summarizing: {type(exc).__name__}: {exc}")
        if not opts.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            result["work_dir"] = str(work)
    result["attack_seconds"] = round(t_end - t_start, 2)
    if samples:
        result.update(summarize_samples(samples, t_start, t_end + opts.settle_s))
    result["outcome"] = ctx.outcome
    checks = common_checks(result)
    try:
        checks.update(attack.checks(result, opts))
    except Exception as exc:
        result.setdefault("error", f"checking: {type(exc).__name__}: {exc}")
    result["checks"] = checks
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def run_suite(
    names: list[str], opts: Options, out: Path | None = None, echo: Callable[[str], None] = print
) -> list[dict]:
    """Run the attacks in turn, echoing each one's row; the JSON at ``out`` rewritten after each (a cut-off
    suite keeps what it measured)."""
    raise_nofile()
    results = []
    for name in names:
        echo(f"== {name} ...")
        result = run_attack(name, opts)
        results.append(result)
        echo(table([result]).splitlines()[-1])
        if out is not None:
            write(results, out)
    return results
