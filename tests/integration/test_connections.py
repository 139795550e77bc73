"""Connection limits of the real server (uvicorn with service.api.server's protocol): slow requests and too many
connections are refused, and the server keeps answering everyone else."""

import functools
import re
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
        connect = functools.partial(socket.create_connection, ("127.0.0.1", server.port))
        silent = connect()
        trickle = connect()
        trickle.sendall(b"POST /phone-price HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        slow_body = connect()
        slow_body.sendall(
            b"POST /phone-price HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"
        )
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


def answers_on(sock: socket.socket, timeout: float) -> tuple[list[bytes], bool]:
    """The status lines read from ``sock`` within ``timeout`` and whether the server closed it."""
    sock.settimeout(timeout)
    data, closed = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
    except (TimeoutError, ConnectionResetError) as exc:
        closed = isinstance(exc, ConnectionResetError)
    return re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", data), closed  # bodies do not end in a line break


def send_until_refused(sock: socket.socket, data: bytes, seconds: float) -> int:
    """Send ``data`` as long as the server reads it (or ``seconds``); the bytes it took."""
    sock.settimeout(0.5)
    sent, deadline = 0, time.monotonic() + seconds
    try:
        while sent < len(data) and time.monotonic() < deadline:
            sent += sock.send(data[sent : sent + 65536])
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass
    return sent


def test_header_floods_get_431_and_a_close_and_the_server_keeps_answering():
    with running_server(models='["phone-price"]', max_header_bytes="8192", max_headers="50") as server:
        connect = functools.partial(socket.create_connection, ("127.0.0.1", server.port))
        floods = {
            "many lines": b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 8_000_000,
            "one long value": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 64_000_000,
            "too many headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 60 + b"\r\n",
            "a long URL": b"GET /healthz?" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        }
        for label, flood in floods.items():
            sock = connect()
            sent = send_until_refused(sock, flood, 5)
            statuses, closed = answers_on(sock, 3)
            sock.close()
            assert statuses == [b"HTTP/1.1 431 Request Header Fields Too Large"] and closed, (label, statuses, sent)
            # it stopped reading: the 64 MB floods stopped once the kernel's buffers (up to 36 MB here) were full
            assert sent < 48_000_000, (label, sent)
        # a request just under the limits is served
        headers = {f"x-h{i}": "v" * 100 for i in range(40)}
        assert httpx.get(server.url + "/healthz", headers=headers).status_code == 200


def test_pipelined_requests_are_bounded_and_the_connection_closes_after_their_answers():
    with running_server(models='["phone-price"]', max_pipelined="4", request_read_timeout_s="2") as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        sent = send_until_refused(sock, request * 200_000, 4)  # 7 MB, never reading
        assert sent < 7_000_000, sent  # the server stopped reading once its queue for this connection was full
        statuses, closed = answers_on(sock, 5)
        # the first request plus at most the 4 pipelined behind it were answered, then the connection closed
        assert 1 <= len(statuses) <= 5 and set(statuses) == {b"HTTP/1.1 200 OK"} and closed, (len(statuses), closed)
        sock.close()
        # a client that pipelines politely (a few at a time) gets every answer
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(request * 3)
        statuses, _ = answers_on(sock, 1)
        assert statuses == [b"HTTP/1.1 200 OK"] * 3
        sock.close()


def test_a_client_that_reads_no_answers_is_dropped_after_the_read_timeout():
    """Answers a client does not read fill the kernel's buffers (megabytes on loopback), then the transport's;
    once writing has waited the read timeout the server drops the connection instead of holding the rest."""
    with running_server(models='["phone-price"]', request_read_timeout_s="1", max_pipelined="256") as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.connect(("127.0.0.1", server.port))
        asked = 200  # the OpenAPI document (about 37 KB) 200 times: 7 MB, more than the buffers hold
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * asked)
        dropped = "dropped a connection that read none of its answers for 1 s"
        deadline = time.monotonic() + 15
        while dropped not in server.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        statuses, closed = answers_on(sock, 5)  # what the buffers held, then the end of the connection
        sock.close()
        assert dropped in server.output()
        assert closed and 0 < len(statuses) < asked, (len(statuses), closed)
        assert httpx.get(server.url + "/healthz").status_code == 200
