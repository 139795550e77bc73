"""Unit tests: in process, on the stub model (tests/stubs.py), pure functions or the small committed tabular
artifacts; no server process, no subprocess."""
