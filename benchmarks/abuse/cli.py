"""``python -m benchmarks.abuse``: the command line over ``run_suite``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .catalog import ATTACKS
from .options import RESULTS, Options
from .report import table
from .runner import run_suite


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run the attacks asked for, print the table and write the JSON."""
    # --help shows the package's docstring: what each attack does and what it checks
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.abuse",
        description=sys.modules[__package__].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(ATTACKS),
        metavar="NAME",
        help=f"attacks to run (default: all): {', '.join(ATTACKS)}",
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="length of each attack (default: 10, the round-two attacks 15)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="monitoring after each attack; memory 'after' is read at its end (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "abuse.json", help="JSON report (default: %(default)s)")
    parser.add_argument("--slow-connections", type=int, default=1000, help="slowloris connections")
    parser.add_argument("--read-timeout", type=float, default=5.0, help="SERVE_REQUEST_READ_TIMEOUT_S for slowloris")
    parser.add_argument(
        "--slow-max-connections",
        type=int,
        default=None,
        help="SERVE_MAX_CONNECTIONS for slowloris (default: the server's own default)",
    )
    parser.add_argument("--connection-cap", type=int, default=256, help="SERVE_MAX_CONNECTIONS for conn-cap")
    parser.add_argument("--streams", type=int, default=500, help="stream-flood concurrency")
    parser.add_argument("--uploads", type=int, default=8, help="big-uploads concurrency")
    parser.add_argument("--json-keys", type=int, default=800_000, help="unique keys in the json-key-flood body")
    parser.add_argument("--rate", type=float, default=20.0, help="the good client's requests per second")
    parser.add_argument("--grpc-streams", type=int, default=10_000, help="grpc-streams-unread: calls left hanging")
    parser.add_argument("--mix-clients", type=int, default=64, help="broken-upload-mix concurrency")
    parser.add_argument("--no-control", action="store_true", help="skip proving the tampered payloads live")
    parser.add_argument("--keep", action="store_true", help="keep each attack's folder (server log, artifacts)")
    args = parser.parse_args(argv)
    opts = Options(
        seconds=args.seconds,
        slow_connections=args.slow_connections,
        read_timeout_s=args.read_timeout,
        slow_max_connections=args.slow_max_connections,
        connection_cap=args.connection_cap,
        streams=args.streams,
        uploads=args.uploads,
        json_keys=args.json_keys,
        good_rate=args.rate,
        control=not args.no_control,
        keep_work=args.keep,
        settle_s=args.settle,
        grpc_streams=args.grpc_streams,
        mix_clients=args.mix_clients,
    )
    results = run_suite(args.only or list(ATTACKS), opts, args.out)
    print()
    print(table(results))
    print(f"\nwrote {args.out}")
    return 0
