"""Integration tests: one real server process (uvicorn or ``python -m service``) on the stub model or the small
phone-price artifact, or a quick subprocess run of a tool."""
