"""``python -m service [--host H] [--port P] [--workers N]``: serve the committed artifacts.

One worker runs uvicorn in this process; several run gunicorn's arbiter with uvicorn workers that share
one copy of the weights (service/workers.py). Either way SIGTERM stops accepting, finishes in-flight
requests (up to 30 s), then drains the batchers.
"""

import argparse
import os

from service.memory import large_allocations_returned_at_once
from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    large_allocations_returned_at_once()  # before any thread starts (service/memory.py says why)
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=settings.host, help="bind address (default: %(default)s, SERVE_HOST)")
    parser.add_argument("--port", type=int, default=settings.port, help="port (default: %(default)s, SERVE_PORT)")
    parser.add_argument("--workers", type=int, default=settings.workers, help=(
        "worker processes (default: SERVE_WORKERS, else the CPUs this process may use)"))
    args = parser.parse_args(argv)
    from service.workers import usable_cpus  # noqa: PLC0415 - gunicorn only when needed

    cpus = usable_cpus()
    workers = args.workers or cpus
    # The app reads its settings itself: pass the address on, so its "ready" line shows the real URL.
    os.environ.update(SERVE_HOST=args.host, SERVE_PORT=str(args.port), SERVE_WORKERS=str(workers))
    if workers > 1 and not settings.torch_threads:  # workers x threads = the cores, not more
        os.environ["SERVE_TORCH_THREADS"] = str(max(1, cpus // workers))
    settings = Settings()
    if workers == 1:
        import uvicorn  # noqa: PLC0415

        # The protocol adds a deadline for each request to arrive and a cap on connections (service/server.py).
        uvicorn.run("service.app:app", host=args.host, port=args.port, http="service.server:GuardedHttpProtocol",
                    timeout_keep_alive=settings.keep_alive_s, timeout_graceful_shutdown=30, log_level="warning")
    else:
        from service.workers import serve  # noqa: PLC0415

        serve(settings, workers)


if __name__ == "__main__":
    main()
