"""Prometheus metrics, one registry per app (so several apps in one process never clash).

With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set, see service/runtime/workers.py) each worker writes
its values to files there and :meth:`Metrics.exposition` adds up every worker's, so ``/metrics`` describes
the whole server whichever worker answers; the queue depth and open connections are kept per live worker (a
``pid`` label): a dead worker's series leave with it (service/runtime/workers.py), so their sum is the server's now.
"""

import math
import os
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

FORGETTABLE = ("model_feature_drift_psi", "model_drift_window_size")  # gauges whose retired series are NaN there
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "http_requests", "HTTP requests by route, method and status.", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "http_request_duration_seconds", "Request latency by route.", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "model_batch_size", "Items per forward pass.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "model_inference_seconds",
            "Time of one batched forward pass.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "model_queue_depth",
            "Items waiting for a forward pass (per worker process).",
            ["model"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.queue_capacity = Gauge(
            "model_queue_capacity",
            "Places in the model's queue (SERVE_MAX_QUEUE, per worker process): the queue is full at this depth.",
            ["model"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.open_connections = Gauge(
            "http_open_connections",
            "Open HTTP connections (per worker process).",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.model_up = Gauge(
            "model_up",
            "1 if the model is loaded and serving, else 0.",
            ["model"],
            registry=r,
            multiprocess_mode="livemin",
        )  # 0 if any live worker lacks the model

        # Versions: compare a canary with the version it may replace (same buckets as the routes' latency).
        self.version_requests = Counter(
            "model_version_requests",
            "Model requests by version and outcome (ok, invalid: the input was refused, error: anything else).",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.version_latency = Histogram(
            "model_version_request_duration_seconds",
            "Model request latency by version (queue and forward pass).",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.version_loads = Counter(
            "model_version_loads",
            "Versions loaded at run time, by outcome (ready, failed).",
            ["model", "outcome"],
            registry=r,
        )
        self.version_share = Gauge(
            "model_version_traffic_share",
            "Share of a model's requests each version gets "
            "(1 for the default, the split's weights during a canary, 0 once replaced).",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.shadow_requests = Counter(
            "model_shadow_requests",
            "Items mirrored to a shadow version, by how its answer compared with the serving version's: agree, "
            "disagree, error, shed (not mirrored: too many in flight, or dropped from the queue).",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.shadow_error = Histogram(
            "model_shadow_relative_error",
            "A shadow version's price against the serving version's, relative.",
            ["model", "version"],
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1),
            registry=r,
        )
        self.shadow_latency = Histogram(
            "model_shadow_latency_seconds",
            "A mirrored request's time in its shadow version (queue and forward pass).",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.canary_decisions = Counter(
            "model_canary_decisions",
            "Guarded canaries ended by the server: rolled_back (a guard crossed) or promoted.",
            ["model", "version", "decision"],
            registry=r,
        )
        self.golden_checks = Counter(
            "model_golden_checks",
            "Versions loaded by what their golden set's replay found: passed, failed (the version never serves), "
            "absent (trained before golden sets).",
            ["model", "outcome"],
            registry=r,
        )
        self.dropped = Counter(
            "model_requests_dropped",
            "Items not computed, by reason: expired (the deadline passed in the queue or while waiting), unmeetable "
            "(refused on arrival: the batches ahead take longer than its deadline leaves), shed (gave its place to a "
            "higher-priority request), queue_full.",
            ["model", "reason"],
            registry=r,
        )
        self.key_instances = Counter(
            "api_key_instances",
            "Instances sent per client key (its name, never the key): admitted, or limited (over its rate: 429).",
            ["key_name", "outcome"],
            registry=r,
        )
        self.payload_sent = Counter(
            "payload_log_sent", "Payload records (CloudEvents) delivered to SERVE_PAYLOAD_LOG_URL.", registry=r
        )
        self.payload_dropped = Counter(
            "payload_log_dropped",
            "Payload records dropped: queue_full (the sink is slower than the traffic), sink_error (it failed).",
            ["reason"],
            registry=r,
        )
        self.spans_sent = Counter(
            "trace_spans_sent", "Spans the OTLP endpoint accepted (OTEL_EXPORTER_OTLP_*ENDPOINT).", registry=r
        )
        self.spans_dropped = Counter(
            "trace_spans_dropped",
            "Spans dropped: queue_full (the exporter is slower than the traffic), export_error (the endpoint "
            "refused them or is down), sender_down (the exporter process is not running).",
            ["reason"],
            registry=r,
        )
        self._versions: dict[str, set[str]] = {}

        # Drift (service/runtime/drift.py): each version's recent rows against the reference profile in its
        # artifact. Every worker process watches the rows it serves; the largest value of the live ones is kept.
        self.drift_psi = Gauge(
            "model_feature_drift_psi",
            "Population stability index of a feature's recent values (feature 'output': the answers) against the "
            "version's training profile: < 0.1 stable, 0.1-0.25 watch, > 0.25 drifted.",
            ["model", "version", "feature"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.drift_window = Gauge(
            "model_drift_window_size",
            "Rows in the sliding window the drift PSI is computed over (per worker process: the largest).",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.before_scrape: list[Callable[[], None]] = []  # drift watchers publish what changed since last time

    def known_versions(self, model: str) -> set[str]:
        """Versions this process has given a traffic share (so a replaced one can be set back to 0)."""
        return self._versions.setdefault(model, set())

    def forget(self, gauge: Gauge, *labels: str) -> None:
        """Stop reporting one series of a gauge (a retired version's). prometheus-client cannot remove a series in
        multiprocess mode, so there it becomes NaN, which :meth:`exposition` leaves out."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            gauge.labels(*labels).set(math.nan)
        else:
            gauge.remove(*labels)

    def exposition(self) -> tuple[bytes, str]:
        """The text of /metrics and its content type: this app's registry, or every worker's values."""
        for publish in list(self.before_scrape):
            publish()
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            merged = CollectorRegistry()
            merged.register(_WithoutForgotten(MultiProcessCollector(None)))
            return generate_latest(merged), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def canary_decided(self, model: str, version: str, decision: str) -> None:
        self.canary_decisions.labels(model, version, decision).inc()

    def drop_counter(self, model: str):
        """A callback for the batcher: count items it did not compute, by reason."""

        def dropped(reason: str, count: int) -> None:
            if count:
                self.dropped.labels(model, reason).inc(count)

        return dropped

    def batch_observer(self, model: str):
        """A callback for the batcher: record one forward pass."""
        size, seconds, depth = (
            self.batch_size.labels(model),
            self.inference.labels(model),
            self.queue_depth.labels(model),
        )

        def observe(batch: int, elapsed: float, waiting: int) -> None:
            size.observe(batch)
            seconds.observe(elapsed)
            depth.set(waiting)

        return observe


class _WithoutForgotten:
    """Every worker's values, less the series :meth:`Metrics.forget` set to NaN (a retired version's drift)."""

    def __init__(self, collector: MultiProcessCollector):
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        for metric in self.collector.collect():
            if metric.name in FORGETTABLE:
                metric.samples = [s for s in metric.samples if not math.isnan(s.value)]
            yield metric
