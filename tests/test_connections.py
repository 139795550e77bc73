"""Connection limits of the real server (uvicorn with service.server's protocol): slow requests and too many
connections are refused, and the server keeps answering everyone else."""

import socket
import time

import httpx

from tests.conftest import running_server


def read_status(sock: socket.socket, timeout: float) -> tuple[bytes | None, float]:
    """The status line the server sent (b"" if it closed without one, None if it is still open after
    ``timeout``) and how long it took."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        data = sock.recv(200)
    except ConnectionResetError:
        data = b""
    except TimeoutError:
        return None, time.monotonic() - start
    return data.split(b"\r\n")[0], time.monotonic() - start


def test_slow_requests_get_408_and_held_places_go_to_new_connections():
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
            sock.close()

        # 20 connections that send nothing, over the cap of 12: each new one closes the one that has waited
        # longest, so the newest 12 stay open and a liveness probe (a new connection) is still answered.
        held = []
        for _ in range(20):
            held.append(connect())
            time.sleep(0.02)
        time.sleep(0.3)
        closed = [read_status(sock, 0.2)[0] == b"" for sock in held]
        assert closed[:8] == [True] * 8 and not any(closed[-11:]), closed
        assert httpx.get(server.url + "/healthz").status_code == 200
        for sock in held:
            sock.close()
