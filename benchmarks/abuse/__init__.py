"""Abuse suite: the attacks of issue 14 replayed against a real server, with a well-behaved client beside them.

Each attack starts a fresh server (``python -m service`` on a free loopback port, its settings as SERVE_*
environment variables), and while it runs a separate monitor process measures what a neighbour would see:

- a liveness prober: ``GET /healthz`` every 20 ms on a new connection each time (as a kubelet probes), and
  every 100 ms on one kept-alive connection: p50/p99/max latency and failures (non-200, error, over 2 s);
- a well-behaved client: steady valid requests (20/s over 4 connections, the model's example from
  ``GET /models``, with the API key when one is set): latency and every non-2xx answer or error;
- the server's memory: PSS (VmRSS without smaps_rollup) of the server process and its worker processes
  summed, from /proc every 50 ms: the peak and the level at the end of a 10 s settle after the attack
  (``--settle``), each also as a rise over the level just before the attack.

Checks common to every attack: the server alive, the good client only 2xx, /healthz never failing and its
p99 under 100 ms, memory peaking at most 500 MB and ending at most 300 MB above the level before the attack.

Attacks (``--only`` picks some; each is bounded in time, the whole suite takes about ten minutes):

    big-uploads        8 concurrent POST /fashion/image of a 6300x6300 RGBA PNG (~190 KB, flat colour) for
                       --seconds, and one more client looping an 8000x6000 photo-like JPEG; target: peak
                       RSS < 1.2 GB for the whole server
    icc-bomb           a valid PNG with a 7 MB ICC profile (random bytes: 7 MB on the wire; zeros: 7 KB);
                       target: 413 or 422 naming the cause, not 415 "not a PNG"
    json-key-flood     7 MB JSON objects with 800k unique unknown keys to /house-price, 3 at a time, without
                       a key and with one (SERVE_API_KEYS set); targets: 401 before the body is read, 413
                       with a key (per-route body limit), both within a second
    slowloris          --slow-connections (1000) connections that send nothing, trickle a header line every
                       3 s, or announce 8 MB and send 1 KB every 3 s, with SERVE_REQUEST_READ_TIMEOUT_S=5;
                       target: each closed within the timeout + 3 s
    conn-cap           SERVE_MAX_CONNECTIONS=256 (one worker: the cap is per process) and 356 idle connections:
                       how many stay open (the longest-waiting are closed to make room), how many get 503
                       or are closed, and what the prober and the client saw meanwhile (they need a
                       connection too)
    stream-flood       500 concurrent POST /poem/stream (a refused one retries after its Retry-After) while
                       the client calls POST /poem: its latency, how many streams got 503, the most that ran
                       at once
    tampered-artifact  a copy of the artifacts where house_price's preprocessor is a payload that creates a
                       marker file when loaded (pickle for .joblib, a ConstructorFromReduceNode for .skops),
                       fashion's weights a pickle payload and poem's manifest lists paths outside its folder,
                       each manifest re-hashed; targets: no marker, those models failed, phone-price serves.
                       A control loads each payload the unsafe way in a throwaway process, to show it is live.

Round two, against two workers with client keys and gRPC on (SERVE_WORKERS=2, SERVE_API_KEYS,
SERVE_GRPC_PORT; --seconds 15 unless given):

    header-flood       16 connections at once (each reconnects) send a request line, then 4 MB of header
                       lines without a key: many short lines, or one huge value; target: 431 and a close;
                       records the statuses and the bytes sent before the answer or the close
    pipeline-unread    8 connections pipeline GET /healthz (60 MB in all) and never read an answer: how much
                       each could send before the server stopped reading, how many answers it wrote, whether
                       it closed the connection; target: it stops reading (answers bounded)
    grpc-big-nokey     32 concurrent ModelInfer calls of 2 MB (fashion pixels as raw_input_contents), no
                       key; target: UNAUTHENTICATED; records the codes and each call's time
    grpc-big-invalid   the same with a key and invalid contents (FP32 bytes one value short of the shape, a
                       wrong shape, a BYTES tensor of empty elements, a message over the cap); target:
                       INVALID_ARGUMENT, RESOURCE_EXHAUSTED over the cap
    grpc-flood         64 callers of small phone-price ModelInfer calls (half without a key) while the good
                       HTTP client runs; targets: OK / UNAUTHENTICATED, the good client's p50 under 100 ms
    grpc-streams-unread  10,000 ModelInfer calls over 16 connections whose request never comes (streams the
                       server must hold), left hanging; how many were held vs ended early (RESOURCE_EXHAUSTED,
                       UNAVAILABLE), memory, and a gRPC probe call every 0.2 s on its own connection; target:
                       the probe served
    v2-bodies          POST /v2/models/{m}/infer with a key: 8 MB binary BYTES tensors of tiny elements
                       (Triton's 4-byte length framing; house-price's MSZoning, fashion's pixels) and JSON
                       arrays of 1M numbers (flat, nested) for fashion;
                       target: 400/413/422, answered within 2 s
    broken-upload-mix  64 clients mixing good requests (POST /fashion, /fashion/batch, /fashion/image of a
                       small PNG), bad ones (invalid JSON, wrong pixels) and a tiny PNG whose eXIf chunk is
                       not TIFF (Pillow's getexif() raises); targets: each good request answered exactly as
                       when sent alone, the broken upload 4xx (never 500), no good request 5xx

    python -m benchmarks.abuse [--only NAME ...] [--seconds S] [--settle 10] [--out benchmarks/results/abuse.json]

Reading the figures: a server that answers early (401, 413) and closes while a body is still arriving
resets the connection, and the reset can discard its answer before the client reads it; such requests are
counted as "reset mid-body" (the server stopped reading; the answer was lost), apart from errors after a
whole body. The fresh-connection prober also counts against SERVE_MAX_CONNECTIONS: while an attack holds
the cap, its failures are what a kubelet's liveness probe would see.

Prints one row per attack and writes the JSON (every figure, each attack's outcome and its checks). It
measures and reports whatever the server does: a refused connection, a timeout or a crashed server is a
result, never a crash of this script. ``run_attack(name, Options(...))`` runs one attack from Python (the
tests do).
"""

from .catalog import ATTACKS
from .cli import main
from .options import Options
from .report import outcome_line, table
from .runner import run_attack, run_suite

__all__ = ["ATTACKS", "Options", "main", "outcome_line", "run_attack", "run_suite", "table"]
