"""``python -m service`` with several worker processes: one port, weights loaded once before the fork,
metrics of the whole server, a killed worker replaced while the others answer (its gauges gone from the
metrics), SIGTERM drains all."""

import os
import signal
import socket
import sys
import time

import httpx
import pytest

from tests.conftest import children, start_workers


def memory_mb(pid: int, field: str) -> float:
    path = f"/proc/{pid}/smaps_rollup" if field == "Pss" else f"/proc/{pid}/status"
    return sum(int(line.split()[1]) for line in open(path) if line.startswith(field + ":")) / 1024


@pytest.mark.skipif(
    not os.path.exists("/proc/self/smaps_rollup") or sys.platform != "linux",
    reason="needs Linux /proc to find the workers and read their memory",
)
def test_workers_share_weights_and_metrics_and_replace_a_dead_worker():
    server, url = start_workers(models='["phone-price", "fashion"]')
    port = int(url.rsplit(":", 1)[1])
    try:
        workers = children(server.pid)
        assert len(workers) == 2
        info = httpx.get(url + "/models/phone-price").json()
        assert info["workers"] == 2
        body = info["input_schema"]["examples"][0]

        # each request on a new connection, so both workers answer; /metrics counts them all
        assert {httpx.post(url + "/phone-price", json=body).status_code for _ in range(40)} == {200}
        metrics = httpx.get(url + "/metrics").text
        assert 'http_requests_total{method="POST",route="/phone-price",status="200"} 40.0' in metrics
        depths = {
            line.split('pid="')[1].split('"')[0]
            for line in metrics.splitlines()
            if line.startswith('model_queue_depth{model="phone-price"')
        }
        assert depths == {str(pid) for pid in workers}, depths  # one queue depth per worker

        # 64 keep-alive connections opened at once spread over both workers (each has its own socket)
        held = []
        for _ in range(64):
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append(conn)
        for conn in held:
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        per_worker = {
            line.split('pid="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in httpx.get(url + "/metrics").text.splitlines()
            if line.startswith("http_open_connections{")
        }
        for conn in held:
            conn.close()
        counts = [per_worker.get(str(pid), 0) for pid in workers]  # (the arbiter reports its 0 too)
        assert min(counts) >= 12, per_worker  # with one socket shared, one worker could take them all

        # the weights were loaded once, before the fork: the workers share their pages
        one = memory_mb(workers[0], "VmRSS")
        together = sum(memory_mb(pid, "Pss") for pid in [server.pid, *workers])
        assert together < 1.5 * one, (together, one)

        os.kill(workers[0], signal.SIGKILL)
        killed_at, answered = time.monotonic(), 0
        while time.monotonic() - killed_at < 5:
            answered += httpx.post(url + "/phone-price", json=body).status_code == 200
            now = children(server.pid)
            if len(now) == 2 and workers[0] not in now:
                break
            time.sleep(0.05)
        assert len(now) == 2 and workers[0] not in now, "the killed worker was not replaced within 5 s"
        assert answered >= 1
        # the dead worker's queue depth and connections leave /metrics (KEDA scales on their sum)
        metrics = httpx.get(url + "/metrics").text
        assert f'pid="{workers[0]}"' not in metrics
        assert f'model_queue_depth{{model="phone-price",pid="{now[0]}"}}' in metrics
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(45) == 0
