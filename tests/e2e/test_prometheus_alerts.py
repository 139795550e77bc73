"""The shipped alerting rules in a real Prometheus scraping a real server: the rules load and evaluate on the
series /metrics really exports, and the drift alert fires on shifted phone traffic, not on in-distribution.

The server serves phone-price only (quick to start) with a drift window of 400 rows; Prometheus scrapes and
evaluates every second. The drift alert's `for:` is 5m in the shipped rules, so this test takes `pending` (the
expression held at an evaluation) as the proof that it fired on real series; that it turns `firing` after its
`for:` is Prometheus' own behaviour, checked on synthetic series by deploy/prometheus/alerts_test.yml.
"""

import csv
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.models.phone_price import FEATURES
from tests.conftest import ROOT, Server, free_port, need_data, running_server

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
WINDOW = 400  # SERVE_DRIFT_WINDOW: rows in the drift window
MIN_COUNT = 200  # SERVE_DRIFT_MIN_COUNT: rows before PSI is exported
EVALUATION_S = 1


class Prometheus:
    """The real `prometheus` binary scraping ``target`` every second, with the shipped rules."""

    def __init__(self, binary: str, target: str, workdir: Path):
        config = {
            "global": {
                "scrape_interval": f"{EVALUATION_S}s",
                "scrape_timeout": f"{EVALUATION_S}s",
                "evaluation_interval": f"{EVALUATION_S}s",
            },
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "serve", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_for(lambda: httpx.get(self.url + "/-/ready", timeout=1).status_code == 200, 30, "ready")

    def wait_for(self, check, seconds: float, what: str):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if result := check():
                    return result
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"prometheus: not {what} within {seconds} s\n{self.log_path.read_text()[-3000:]}")

    def api(self, path: str, **params: str) -> Any:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def alerts(self, name: str) -> list[dict]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[Server, Prometheus]]:
    """A server on phone-price with a small drift window, and a Prometheus scraping it."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not found: apt-get install prometheus (Debian/Ubuntu) brings /usr/bin/prometheus")
    settings = {"models": '["phone-price"]', "drift_window": str(WINDOW), "drift_min_count": str(MIN_COUNT)}
    with running_server(**settings) as server:
        prometheus = Prometheus(binary, f"127.0.0.1:{server.port}", tmp_path_factory.mktemp("prometheus"))
        try:
            yield server, prometheus
        finally:
            prometheus.stop()


def test_prometheus_scrapes_the_server_and_evaluates_every_rule(stack):
    _, prometheus = stack
    prometheus.wait_for(lambda: [s for s in prometheus.query('up{job="serve"}') if s["value"][1] == "1"], 20, "up")

    expected = {
        g["name"]: [r.get("alert") or r["record"] for r in g["rules"]]
        for g in yaml.safe_load(RULES.read_text())["groups"]
    }

    def evaluated() -> list[dict] | None:
        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return groups if rules and all(r["health"] == "ok" for r in rules) else None

    groups = prometheus.wait_for(evaluated, 20, "evaluating every rule with health ok")
    assert {g["name"]: [r["name"] for r in g["rules"]] for g in groups} == expected

    # The recording rules match the real series' labels: Prometheus' own scrapes of /metrics are the traffic
    # (NaN, 0 of 0, until two scrapes have counted some).
    def ratio() -> list[dict]:
        return [
            s for s in prometheus.query('job:http_requests_5xx:ratio_rate5m{job="serve"}') if s["value"][1] != "NaN"
        ]

    assert float(prometheus.wait_for(ratio, 20, "recording the 5xx ratio")[0]["value"][1]) == 0
    (saturation,) = prometheus.query('job_model:model_queue:saturation{job="serve"}')
    assert saturation["metric"]["model"] == "phone-price" and float(saturation["value"][1]) == 0
    latency = prometheus.query('job_route:http_request_duration_seconds:p99_rate5m{route="/metrics"}')
    assert latency and float(latency[0]["value"][1]) < 1
    assert not [a for a in prometheus.api("alerts")["alerts"] if a["state"] in ("pending", "firing")]


def _phones(data_dir: Path, rows: int) -> list[dict]:
    with open(need_data(data_dir, "phone_price", "train.csv"), newline="") as file:
        reader = csv.DictReader(file)
        return [
            {k: float(row[k]) if "." in row[k] else int(row[k]) for k in FEATURES}
            for row, _ in zip(reader, range(rows))
        ]


def _send(server: Server, phones: list[dict]) -> None:
    with server.client() as client:
        for start in range(0, len(phones), 200):
            response = client.post("/phone-price/batch", json={"instances": phones[start : start + 200]})
            assert response.status_code == 200, response.text


def test_the_drift_alert_fires_on_shifted_traffic_only(stack, data_dir):
    server, prometheus = stack
    phones = _phones(data_dir, WINDOW)
    _send(server, phones)  # in distribution: fills the window
    with server.client() as client:
        exported = client.get("/metrics").text
    if "model_feature_drift_psi{" not in exported:
        pytest.skip(
            "model_feature_drift_psi is not in /metrics after a full window of rows: the served phone-price version "
            "has no training profile (profile.json) yet, so its drift is not watched; retrain it to run this part"
        )

    ram = 'model_feature_drift_psi{job="serve", model="phone-price", feature="ram"}'
    (series,) = prometheus.wait_for(lambda: prometheus.query(ram), 20, "scraping model_feature_drift_psi")
    psi = float(series["value"][1])
    assert psi < 0.25, f"PSI of ram {psi} on rows from the training data"
    time.sleep(3 * EVALUATION_S)  # a few evaluations of the rules on those samples
    assert not prometheus.alerts("ModelFeatureDrift"), "the drift alert fired on in-distribution traffic"

    _send(server, [{**phone, "ram": phone["ram"] // 4} for phone in phones])  # the same phones, a quarter the RAM

    def ram_alerts() -> list[dict]:
        alerts = prometheus.alerts("ModelFeatureDrift")
        return [a for a in alerts if a["labels"]["feature"] == "ram" and a["state"] in ("pending", "firing")]

    (alert,) = prometheus.wait_for(ram_alerts, 20, "pending or firing ModelFeatureDrift for ram")
    assert alert["labels"]["model"] == "phone-price" and alert["labels"]["severity"] == "warning"
    assert float(alert["value"]) > 0.25 and "ram has drifted" in alert["annotations"]["summary"]
    # Only what changed: ram, and the predictions that follow it (a phone's band leans on its RAM).
    assert {a["labels"]["feature"] for a in prometheus.alerts("ModelFeatureDrift")} <= {"ram", "output"}
