"""Prometheus metrics, one registry per app (so several apps in one process never clash)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("http_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("http_request_duration_seconds", "Request latency by route.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("model_batch_size", "Items per forward pass.", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("model_inference_seconds", "Time of one batched forward pass.", ["model"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("model_queue_depth", "Items waiting for a forward pass.", ["model"], registry=r)
        self.model_up = Gauge("model_up", "1 if the model is loaded and serving, else 0.", ["model"], registry=r)

    def batch_observer(self, model: str):
        """A callback for the batcher: record one forward pass."""
        size, seconds, depth = (self.batch_size.labels(model), self.inference.labels(model),
                                self.queue_depth.labels(model))

        def observe(batch: int, elapsed: float, waiting: int) -> None:
            size.observe(batch)
            seconds.observe(elapsed)
            depth.set(waiting)
        return observe
