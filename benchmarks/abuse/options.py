"""The suite's settings: every knob of every attack in one dataclass, so a run (and its JSON report) records
exactly what was asked; and the few constants the modules share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HOST = "127.0.0.1"
API_KEY = "abuse-suite-key-1"
MB = 1024 * 1024


@dataclass
class Options:
    seconds: float | None = 10.0  # how long each attack runs (slowloris: at least the read timeout + 6 s);
    # None: each attack's own default (10 s, the round-two attacks 15 s)
    slow_connections: int = 1000  # slowloris connections (capped by the file-descriptor limit)
    read_timeout_s: float = 5.0  # SERVE_REQUEST_READ_TIMEOUT_S for the slowloris run
    slow_max_connections: int | None = None  # SERVE_MAX_CONNECTIONS for the slowloris run (None: the default)
    connection_cap: int = 256  # SERVE_MAX_CONNECTIONS for the conn-cap run
    cap_extra: int = 100  # conn-cap opens cap + this many idle connections
    streams: int = 500  # stream-flood concurrency
    uploads: int = 8  # big-uploads concurrency
    json_concurrency: int = 3  # json-key-flood: bodies in flight at once
    json_keys: int = 800_000  # json-key-flood: unique unknown keys per body
    good_rate: float = 20.0  # the well-behaved client's requests per second
    probe_interval_s: float = 0.02  # the fresh-connection /healthz prober's period
    baseline_s: float = 1.0  # monitoring before the attack starts
    settle_s: float = 10.0  # monitoring after it ends (RSS "after" is read at the end of it)
    client_timeout_s: float = 30.0  # the attacker's timeout per request
    control: bool = True  # tampered-artifact: prove each payload is live in a throwaway process
    payload_dir: Path | None = None  # cache of the generated images (default: $TMPDIR/abuse-payloads)
    keep_work: bool = False  # keep each attack's folder (server log, tampered artifacts)
    server_nofile: int | None = None  # the server's RLIMIT_NOFILE soft limit (default: this process's at start)
    verbose: bool = False
    # round two (two workers, client keys, gRPC on)
    header_connections: int = 16  # header-flood: connections at once (each reconnects)
    header_bytes: int = 4 * MB  # header-flood: header bytes each connection sends
    pipeline_connections: int = 8  # pipeline-unread: connections
    pipeline_bytes: int = 60 * MB  # pipeline-unread: pipelined GET /healthz bytes over all of them
    grpc_concurrency: int = 32  # grpc-big-*: calls in flight at once
    grpc_message_bytes: int = 2_000_000  # grpc-big-*: raw_input_contents size, under SERVE_GRPC_MAX_MESSAGE_BYTES
    grpc_callers: int = 64  # grpc-flood: concurrent callers (half without a key)
    grpc_streams: int = 10_000  # grpc-streams-unread: calls opened and left hanging
    grpc_channels: int = 4  # gRPC connections the callers share
    grpc_stream_channels: int = 16  # grpc-streams-unread: connections the hanging calls share
    v2_bytes: int = 8_000_000  # v2-bodies: binary BYTES tensor size
    v2_numbers: int = 1_000_000  # v2-bodies: numbers in the JSON arrays
    v2_concurrency: int = 4  # v2-bodies: requests at once
    mix_clients: int = 64  # broken-upload-mix: concurrent clients
