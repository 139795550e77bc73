"""``python -m service [--host H] [--port P]``: run the server with uvicorn on the committed artifacts."""

import argparse
import os

import uvicorn

from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default=settings.host, help="bind address (default: %(default)s, SERVE_HOST)")
    parser.add_argument("--port", type=int, default=settings.port, help="port (default: %(default)s, SERVE_PORT)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default: 1)")
    args = parser.parse_args(argv)
    # The app reads its settings itself: pass the address on, so its "ready" line shows the real URL.
    os.environ.update(SERVE_HOST=args.host, SERVE_PORT=str(args.port))
    # SIGTERM: uvicorn stops accepting, finishes in-flight requests, then runs the lifespan shutdown.
    # The protocol adds a deadline for each request to arrive and a cap on connections (service/server.py).
    uvicorn.run("service.app:app", host=args.host, port=args.port, workers=args.workers,
                http="service.server:GuardedHttpProtocol", timeout_keep_alive=settings.keep_alive_s,
                timeout_graceful_shutdown=30, log_level="warning")


if __name__ == "__main__":
    main()
