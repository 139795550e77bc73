"""Serving runtime in real processes: SIGTERM draining on one real uvicorn server on the stub model, and the
source revision that manifests record, probed in a fresh interpreter outside any git repository."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx

from tests.conftest import ROOT, running_server


def test_sigterm_finishes_accepted_requests(stub_artifacts):
    bodies = [{"x": i, "sleep_ms": 20} for i in range(40)]
    with running_server(
        "tests.stubs:create_stub_app",
        factory=True,
        artifacts_dir=str(stub_artifacts),
        default_batching='{"max_batch_size": 64, "max_wait_ms": 500}',
    ) as server:

        async def scenario():
            async with httpx.AsyncClient(
                base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=100)
            ) as client:
                tasks = [asyncio.create_task(client.post("/doubler", json=b)) for b in bodies]
                await asyncio.sleep(0.25)  # all sent; the batcher is still waiting out its 500 ms
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                responses = await asyncio.gather(*tasks)
                return responses, time.monotonic() - signalled

        responses, after_signal = asyncio.run(scenario())
        assert server.process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    assert [r.json() for r in responses] == [{"y": 2.0 * i} for i in range(40)]
    assert after_signal > 0.1, "the requests were still queued when SIGTERM arrived"
    assert "Shutting down" in server.output()


def test_manifests_record_the_real_commit_or_say_why_not(tmp_path):
    """Never the literal "HEAD": the commit and whether the code had uncommitted changes, or null and why."""
    import shutil
    import subprocess
    import sys

    from service.artifacts import source_revision

    commit, tree = source_revision()
    assert commit is None or (len(commit) == 40 and tree in ("clean", "dirty")), (commit, tree)
    shutil.copytree(ROOT / "service", tmp_path / "service", ignore=shutil.ignore_patterns("__pycache__"))
    probe = "from service.artifacts import source_revision; print(source_revision())"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(tmp_path), "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)},
    )
    assert out.stdout.startswith("(None, 'unknown: ") and "not a git repository" in out.stdout
