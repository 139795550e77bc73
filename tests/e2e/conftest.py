"""The real server on the committed artifacts (all four real models), shared by the end-to-end tests that do
not change settings; only tests in this folder can ask for it."""

import pytest

from tests.conftest import running_server


@pytest.fixture(scope="session")
def server():
    """One server on the committed artifacts, shared by the tests that do not change settings."""
    with running_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server):
    with server.client() as c:
        yield c
