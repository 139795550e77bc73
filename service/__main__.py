"""``python -m service [--host H] [--port P] [--workers N]``: serve the committed artifacts.

One worker runs uvicorn in this process; several run gunicorn's arbiter with uvicorn workers that share
one copy of the weights (service/runtime/workers.py). Either way SIGTERM stops accepting, finishes in-flight
requests (up to 30 s), then drains the batchers.
"""

import argparse

from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=settings.host, help="bind address (default: %(default)s, SERVE_HOST)")
    parser.add_argument("--port", type=int, default=settings.port, help="port (default: %(default)s, SERVE_PORT)")
    parser.add_argument(
        "--workers",
        type=int,
        default=settings.workers,
        help=("worker processes (default: SERVE_WORKERS, else the CPUs this process may use)"),
    )
    args = parser.parse_args(argv)
    from service.runtime.workers import usable_cpus  # gunicorn only when needed

    cpus = usable_cpus()
    workers = args.workers or cpus
    threads = settings.torch_threads or (max(1, cpus // workers) if workers > 1 else None)  # workers x threads = cores
    settings = settings.model_copy(
        update={"host": args.host, "port": args.port, "workers": workers, "torch_threads": threads}
    )
    if workers == 1:
        import uvicorn

        from service.app import create_app

        # The protocol adds a deadline for each request to arrive and a cap on connections (service/api/server.py).
        uvicorn.run(
            create_app(settings),
            host=args.host,
            port=args.port,
            http="service.api.server:GuardedHttpProtocol",
            timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # int in uvicorn's annotation, but only handed to loop.call_later: a fraction works
            timeout_graceful_shutdown=30,
            log_level="warning",
        )
    else:
        from service.runtime.workers import serve

        serve(settings, workers)


if __name__ == "__main__":
    main()
