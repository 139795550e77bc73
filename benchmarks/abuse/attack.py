"""What an attack is: its coroutine and hooks (settings, prepare, finish, checks, a one-line outcome), and
the context it runs in (the server, the key, the models' examples, the outcome it fills)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .options import API_KEY, Options
from .server import Server, free_port


@dataclass
class Ctx:
    """One attack's run: filled by the runner (server, key, examples), read by the attack's hooks, which
    leave what they measured in ``outcome`` and what they prepared in ``extra``."""

    opts: Options
    work: Path
    payloads: Path
    settings: dict[str, str] = field(default_factory=dict)
    key: str | None = None
    server: Server | None = None
    examples: dict[str, dict] = field(default_factory=dict)
    outcome: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def key_headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key} if self.key else {}

    def key_header(self) -> bytes:
        return f"X-API-Key: {self.key}\r\n".encode() if self.key else b""

    def key_metadata(self) -> list[tuple[str, str]]:
        return [("x-api-key", self.key)] if self.key else []


@dataclass
class Attack:
    """An attack and its hooks: the server's settings, what to prepare before the server starts, what to
    summarize after it stops (``finish`` runs even when the attack failed or was cut off), its targets
    (``checks``) and its one-line outcome for the table (``line``, given the outcome)."""

    name: str
    run: Callable[[Ctx], Awaitable[None]]
    good_model: str = "phone-price"
    settings: Callable[[Options], dict[str, str]] = lambda opts: {}
    prepare: Callable[[Ctx], None] = lambda ctx: None
    finish: Callable[[Ctx], None] = lambda ctx: None
    bound: Callable[[Options], float] = lambda opts: opts.seconds + 40
    checks: Callable[[dict, Options], dict[str, bool]] = lambda result, opts: {}
    line: Callable[[dict], str] = lambda outcome: json.dumps(outcome)[:120]
    seconds: float = 10.0  # the default length (Options.seconds None)


def round_two_settings(opts: Options) -> dict[str, str]:
    """The round-two server: two workers, client keys, and the v2 protocol over gRPC on a free port."""
    return {"SERVE_WORKERS": "2", "SERVE_API_KEYS": json.dumps([API_KEY]), "SERVE_GRPC_PORT": str(free_port())}


def turns(names: list[str], first: int, deadline: float) -> Iterator[str]:
    """``names`` in turn from the ``first``-th (so concurrent callers start on different ones): one at least,
    then more while ``deadline`` is ahead when the next is asked for."""
    turn = first
    while turn == first or time.monotonic() < deadline:
        yield names[turn % len(names)]
        turn += 1
