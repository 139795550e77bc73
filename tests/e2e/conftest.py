"""The real server on the committed artifacts (all four real models), shared by the end-to-end tests that do
not change settings; only tests in this folder can ask for it."""

import os
import shutil

import pytest

from tests.conftest import running_server

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# Flags that keep Chromium from calling home on a closed network.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium driven by Playwright, for the page tests (skipped, saying why, without them).
    Per module, never longer: Playwright's sync API runs an event loop in this thread while it is open, and every
    test that calls asyncio.run() after it would fail."""
    if not CHROMIUM:
        pytest.skip("Chromium not found (apt-get install chromium, or set $CHROMIUM); .ci/run installs it")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def server():
    """One server on the committed artifacts, shared by the tests that do not change settings."""
    with running_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server):
    with server.client() as c:
        yield c
