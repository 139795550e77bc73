"""Schemathesis against a real server: every operation, all phases (examples, coverage, fuzzing, stateful).

Checks (schemathesis defaults): no 5xx, responses match their documented schema, content types and
status codes are documented, invalid data is rejected and valid data accepted, except where
schemathesis.toml says why JSON Schema cannot express what valid is. The CLI is what a user would run,
and it reads the same schemathesis.toml.
"""

import subprocess
import sys
from pathlib import Path

import httpx

from service.app import create_app
from tests.conftest import ROOT


def test_live_server_publishes_this_schema(server):
    assert httpx.get(server.url + "/openapi.json").json() == create_app().openapi()


def test_every_operation_in_every_phase(server):
    cli = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run([str(cli), "--no-color", "run", f"{server.url}/openapi.json", "--max-examples", "10",
                          "--seed", "1"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = run.stdout[run.stdout.find("SUMMARY"):]
    assert run.returncode == 0, run.stdout[-6000:]
    assert "No issues found" in summary, summary
    operations = len([1 for path in create_app().openapi()["paths"].values() for _ in path])
    assert f"Tested: {operations}" in summary, summary
