"""tampered-artifact: a copy of the artifacts with code-carrying payloads planted (and each manifest
re-hashed), served; the payloads must never run, and a control shows each one is live when loaded unsafely."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from service.artifacts import version_folders

from .attack import Attack, Ctx
from .options import ROOT, Options
from .payloads import pickle_payload, skops_payload
from .wire import detail_of


def tamper_artifacts(ctx: Ctx) -> dict[str, Any]:
    """Copy the artifacts and plant the payloads; return what was planted where (and the control's verdict)."""
    source = Path(os.environ.get("SERVE_ARTIFACTS_DIR") or ROOT / "artifacts")
    target = ctx.work / "artifacts"
    shutil.copytree(source, target)
    markers = ctx.work / "markers"
    markers.mkdir()
    planted: dict[str, Any] = {"artifacts_copy": str(target), "markers": {}, "files": {}}

    def newest(model_dir: Path) -> Path:  # the version that serves
        return list(version_folders(model_dir).values())[-1] if version_folders(model_dir) else model_dir

    def rehash(folder: Path, changes: dict[str, str]) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"].update(changes)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))

    def plant(folder_name: str, pattern: str, label: str) -> None:
        folder = newest(target / folder_name)
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            planted["files"][label] = f"no manifest: {exc}"
            return
        marker = markers / f"{label}.marker"
        planted["markers"][label] = str(marker)
        changes = {}
        for name in manifest.get("files", {}):
            if not re.fullmatch(pattern, name):
                continue
            original = (folder / name).read_bytes() if (folder / name).is_file() else None
            suffix = Path(name).suffix
            if suffix in (".joblib", ".pkl", ".pickle", ".pt", ".pth", ".bin"):
                data, kind = pickle_payload(marker), "pickle (__reduce__ -> os.system)"
            elif suffix == ".skops":
                data, kind = skops_payload(marker, original), "skops (ConstructorFromReduceNode -> posix.system)"
            else:
                planted["files"][f"{label}:{name}"] = f"left alone: a {suffix} file cannot carry code"
                continue
            (folder / name).write_bytes(data)
            changes[name] = hashlib.sha256(data).hexdigest()
            planted["files"][f"{label}:{name}"] = kind
        if changes:
            rehash(folder, changes)
        else:
            planted["files"].setdefault(label, f"nothing matching {pattern} in the manifest")
        if (folder / "manifest.sig").exists():
            planted["files"][f"{label}:manifest.sig"] = "present (left as it was: it no longer matches)"

    plant("house_price", r"preprocessor\..*", "house-price preprocessor")
    plant("fashion", r"[^/]*\.(pt|pth|bin)", "fashion weights")
    # poem: the manifest names files outside its folder (each with its true hash)
    poem = newest(target / "poem")
    escapes = {}
    for name in ("/etc/hostname", f"../../phone_price/{newest(target / 'phone_price').name}/manifest.json"):
        path = Path(name) if name.startswith("/") else poem / name
        if path.is_file():
            escapes[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    if (poem / "manifest.json").is_file() and escapes:
        rehash(poem, escapes)
        planted["files"]["poem:manifest.json"] = f"lists {', '.join(escapes)}"
    if ctx.opts.control:
        planted["control"] = control_payloads(ctx.work)
    return planted


def control_payloads(work: Path) -> dict[str, str]:
    """Load each kind of payload the unsafe way in a throwaway process: the marker appears if the payload is
    live (so an absent marker under the server means the server refused it, not that the payload was dud)."""
    control = work / "control"
    control.mkdir(exist_ok=True)
    cases = {
        "pickle via joblib.load": (
            "import joblib, sys; joblib.load(sys.argv[1])",
            "preprocessor.joblib",
            pickle_payload,
        ),
        "skops.io.load trusting posix.system": (
            "import skops.io, sys; skops.io.load(sys.argv[1], trusted=['posix.system'])",
            "preprocessor.skops",
            skops_payload,
        ),
        "torch.load(weights_only=False)": (
            "import torch, sys; torch.load(sys.argv[1], weights_only=False)",
            "model.pt",
            pickle_payload,
        ),
    }
    verdicts = {}
    for label, (code, name, make) in cases.items():
        marker = control / f"{name}.marker"
        path = control / name
        path.write_bytes(make(marker))
        try:
            run = subprocess.run(
                [sys.executable, "-c", code, str(path)],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=control,
                check=False,
            )
            error = run.stderr.strip().splitlines()[-1] if run.returncode and run.stderr.strip() else ""
        except (subprocess.TimeoutExpired, OSError) as exc:
            error = type(exc).__name__
        verdicts[label] = "live (marker created)" if marker.exists() else f"not shown live: {error or 'no marker'}"
    return verdicts


async def attack_tampered_artifact(ctx: Ctx) -> None:
    out = ctx.outcome
    copy = ctx.extra["planted"]["artifacts_copy"]
    async with httpx.AsyncClient(base_url=ctx.server.url, timeout=10, headers=ctx.key_headers()) as client:
        texts = []
        try:
            readyz = await client.get("/readyz")
            texts.append(readyz.text)
            out["readyz"] = {"status": readyz.status_code, "body": readyz.json()}
        except (httpx.HTTPError, ValueError) as exc:
            out["readyz"] = {"error": type(exc).__name__}
        try:
            models = await client.get("/models")
            texts.append(models.text)
        except httpx.HTTPError:
            pass
        calls = {}
        for name in ("phone-price", "house-price", "fashion", "poem"):
            example = ctx.examples.get(name)
            if example is None:
                calls[name] = {"error": "no example on /models"}
                continue
            try:
                response = await client.post(f"/{name}", json=example)
                texts.append(response.text)
                calls[name] = {
                    "status": response.status_code,
                    "detail": detail_of(response.content) if response.status_code >= 400 else None,
                }
            except httpx.HTTPError as exc:
                calls[name] = {"error": type(exc).__name__}
        out["calls"] = calls
        out["absolute_paths_in_responses"] = sorted({p for p in (copy, str(ctx.work)) if any(p in t for t in texts)})
    await asyncio.sleep(min(ctx.opts.seconds, 3.0))  # the good client keeps calling phone-price meanwhile


def _prepare_tampered(ctx: Ctx) -> None:
    ctx.extra["planted"] = tamper_artifacts(ctx)
    ctx.settings["SERVE_ARTIFACTS_DIR"] = ctx.extra["planted"]["artifacts_copy"]


def _finish_tampered(ctx: Ctx) -> None:
    """What was planted, and whether any marker appeared (read once the server has stopped)."""
    planted = ctx.extra.get("planted", {})
    ctx.outcome["planted"] = planted.get("files")
    ctx.outcome["control"] = planted.get("control")
    ctx.outcome["markers_present"] = {label: Path(path).exists() for label, path in planted.get("markers", {}).items()}


def _checks_tampered(result: dict, opts: Options) -> dict[str, bool]:
    out = result["outcome"]
    models = (out.get("readyz") or {}).get("body", {}).get("models", {})
    calls = out.get("calls", {})
    control = out.get("control") or {}
    return {
        "no_marker": bool(out.get("markers_present")) and not any(out["markers_present"].values()),
        "house_price_failed": str(models.get("house-price", "")).startswith("failed"),
        "house_price_503": calls.get("house-price", {}).get("status") == 503,
        "fashion_weights_refused": str(models.get("fashion", "")).startswith("failed"),
        "poem_path_escape_refused": str(models.get("poem", "")).startswith("failed"),
        "phone_price_serves": models.get("phone-price") == "ready"
        and calls.get("phone-price", {}).get("status") == 200,
        "payloads_live_in_control": bool(control) and all(v.startswith("live") for v in control.values()),
        "no_absolute_paths": not out.get("absolute_paths_in_responses"),
    }


def _line_tampered(out: dict) -> str:
    models = (out.get("readyz") or {}).get("body", {}).get("models", {})
    states = {k: str(v).split(":")[0] for k, v in models.items()}
    return f"states {states}; markers {out.get('markers_present')}; control {list((out.get('control') or {}).values())}"


TAMPERED_ARTIFACT = Attack(
    "tampered-artifact",
    attack_tampered_artifact,
    prepare=_prepare_tampered,
    finish=_finish_tampered,
    bound=lambda o: 60,
    checks=_checks_tampered,
    line=_line_tampered,
)
