"""Connection limits of the real server (uvicorn with service.server's protocol): slow requests and too many
connections are refused, and the server keeps answering everyone else."""

import socket
import time

import httpx

from tests.conftest import running_server


def read_status(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """The status line the server sent (b"" if it closed without one) and how long it took."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        data = sock.recv(200)
    except ConnectionResetError:
        data = b""
    return data.split(b"\r\n")[0], time.monotonic() - start


def test_slow_requests_get_408_and_too_many_connections_503():
    with running_server(request_read_timeout_s="1.5", max_connections="12", models='["phone-price"]') as server:
        connect = lambda: socket.create_connection(("127.0.0.1", server.port))  # noqa: E731
        silent = connect()
        trickle = connect()
        trickle.sendall(b"POST /phone-price HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        slow_body = connect()
        slow_body.sendall(b"POST /phone-price HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 5000\r\n\r\n{")
        for sock in (silent, trickle, slow_body):
            status, waited = read_status(sock, 10)
            assert status == b"HTTP/1.1 408 Request Timeout" and waited < 4, (status, waited)

        with httpx.Client(base_url=server.url) as keep_alive:  # a well-behaved client keeps its connection
            assert keep_alive.get("/healthz").status_code == 200
            held = [connect() for _ in range(14)]  # with the client's, over the cap of 12
            time.sleep(0.3)
            refused = [read_status(sock, 0.5)[0] for sock in held[-3:]]
            assert refused.count(b"HTTP/1.1 503 Service Unavailable") >= 2, refused
            assert keep_alive.get("/healthz").status_code == 200
            for sock in held:
                sock.close()
        time.sleep(0.3)
        assert httpx.get(server.url + "/healthz").status_code == 200
        for sock in (silent, trickle, slow_body):
            sock.close()
