"""Service settings, read from environment variables prefixed with ``SERVE_`` (see README)."""

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# A canary split's weight: a whole number (not "50", not true) small enough that drawing by the weights
# cannot overflow a float (10**400 would fail every request to the model).
SplitWeight = Annotated[int, Field(strict=True, ge=1, le=1_000_000)]


class BatchPolicy(BaseModel):
    """How one model gathers concurrent requests into a forward pass (Triton-style dynamic batching)."""

    max_batch_size: int = Field(
        64, ge=1, le=4096, description="Largest batch for one forward pass; 1 turns batching off."
    )
    max_wait_ms: float = Field(0.0, ge=0, le=1000, description="Extra wait for a fuller batch; 0 adds no latency.")
    deadline_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description=(
            "A request's deadline unless it sends X-Request-Timeout (or a gRPC deadline): past it, it is dropped "
            "from the queue (504); unset: SERVE_REQUEST_TIMEOUT_S."
        ),
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description=(
            "torch intra-op threads on this model's worker thread; unset: the model's own default, else "
            "SERVE_TORCH_THREADS, else torch's default."
        ),
    )


Priority = Literal["high", "normal", "low"]


class FaultInjection(BaseModel):
    """One version made to fail a share of its answers (SERVE_FAULT_INJECTION), as Istio's fault injection does."""

    version: str = Field(description="The version that fails (the canary under test).")
    error_ratio: float = Field(gt=0, le=1, description="The share of its instances answered 500, spread evenly.")


PRIORITY_RANK: dict[str, int] = {"high": 0, "normal": 1, "low": 2}  # a model's queue serves the lowest first


class ApiKey(BaseModel):
    """A client key and what it may do: its priority in every model's queue and, optionally, a rate limit in
    instances per second (a token bucket of ``burst`` instances, shared by every worker process)."""

    model_config = {"extra": "forbid"}

    key: str = Field(
        min_length=1, repr=False, description="The secret the client sends (X-API-Key or Authorization: Bearer)."
    )
    name: str = Field(
        "",
        pattern=r"^[A-Za-z0-9._-]{0,64}$",
        description="What logs and metrics call the key (never the key itself); unset: key-1, key-2, ... by position.",
    )
    priority: Priority = Field("normal", description="high is served first in a model's queue; low is shed first.")
    rate_per_s: float | None = Field(None, gt=0, description="Instances per second the key may send; unset: no limit.")
    burst: int | None = Field(
        None, ge=1, description="Instances the key may send at once (the bucket's size); unset: one second's worth."
    )

    @property
    def capacity(self) -> int:
        """The bucket's size, in instances (a limited key's largest request)."""
        return self.burst or max(1, math.ceil(self.rate_per_s or 1))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVE_", env_nested_delimiter="__", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 for every interface (the container).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    artifacts_dir: Path = Field(
        PROJECT_ROOT / "artifacts",
        description=("The folder of model folders, each holding versions (artifacts/<model>/<version>/)."),
    )
    models: list[str] | None = Field(
        None,
        description=('Names of the models to serve (JSON list), e.g. ["phone-price", "fashion"]; unset: every model.'),
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=256,
        description=(
            "Worker processes of `python -m service`, sharing the port and one copy of the weights; unset: the CPUs "
            "this process may use (affinity and cgroup quota)."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description=("Where the models run: cuda, cpu, or auto (cuda when a GPU is visible).")
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; None keeps torch's default.")

    # Batching and backpressure; `batching` overrides the default per model, e.g.
    # SERVE_BATCHING='{"fashion": {"max_batch_size": 128, "max_wait_ms": 2}}'.
    default_batching: BatchPolicy = Field(
        BatchPolicy(), description="Every model's batching policy, unless `batching` names it."
    )
    batching: dict[str, BatchPolicy] = Field(
        {},
        description=(
            'A policy per model, replacing the default, e.g. {"fashion": {"max_batch_size": 128, "max_wait_ms": 2}}.'
        ),
    )
    max_queue: int = Field(
        4096,
        ge=1,
        description=(
            "Items waiting per model before new requests get 503: 16 batches of the largest size, so a few clients "
            "sending maximum-size batches at once are queued, not refused."
        ),
    )
    request_timeout_s: float = Field(30.0, gt=0, description="Longest a request may wait for its prediction.")

    # Connections and streams (see service/api/server.py): limits that hold without a proxy in front.
    request_read_timeout_s: float = Field(
        15.0,
        gt=0,
        description=(
            "Longest a request may take to arrive whole (headers and body) once the server waits for it; a slower "
            "one gets 408 and its connection is closed. 15 s carries an 8 MB upload at 4.5 Mbit/s."
        ),
    )
    max_connections: int = Field(
        512,
        ge=1,
        description=(
            "Most open connections per worker process. One beyond it closes the connection that has waited longest "
            "for its request; if every one is busy, it gets 503 and is closed. Keep it under ulimit -n."
        ),
    )
    keep_alive_s: float = Field(5.0, gt=0, description="How long an idle keep-alive connection stays open.")
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description=(
            "Most bytes of one request's line and headers; a longer head gets 431 and the connection is closed."
        ),
    )
    max_headers: int = Field(100, ge=8, description="Most header lines in one request; more get 431 (and a close).")
    max_pipelined: int = Field(
        8,
        ge=1,
        description=(
            "Requests a client may send ahead on one connection before reading its answers (HTTP/1.1 pipelining); "
            "the server stops reading that connection beyond them and closes it once the queued ones are answered. "
            "A client that reads no answer for SERVE_REQUEST_READ_TIMEOUT_S is disconnected."
        ),
    )
    max_streams: int = Field(
        64,
        ge=1,
        description=(
            "Concurrent Server-Sent-Event streams per model (per worker process); more get 503 with Retry-After. "
            "A generating model writes each stream as one request of its running batch, so a stream costs what a "
            "request costs; this bounds the open connections and the pieces held for slow clients."
        ),
    )
    stream_timeout_s: float = Field(60.0, gt=0, description="Longest one stream may run before it is ended.")
    max_uploads: int = Field(
        16,
        ge=1,
        description=(
            "Uploaded files per model held in memory at once (each up to SERVE_MAX_BODY_BYTES); more get 503 with "
            "Retry-After. The README's memory budget shows how this, the body and the pixel caps add up."
        ),
    )

    # Limits and security.
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    max_batch_instances: int = Field(256, ge=1, description="Most instances in one /batch request.")
    max_inflight_body_bytes: int = Field(
        128 * 2**20,
        ge=1024,
        description=(
            "Request bodies being received or handled at once, in bytes (each counts its Content-Length until it is "
            "answered); a request that would go over gets 503 with Retry-After. Requests without a body never do."
        ),
    )
    max_image_pixels: int = Field(
        40_000_000,
        ge=784,
        description=(
            "Pictures that would decode to more pixels are refused before decoding (a JPEG counts at the 1/2-1/8 "
            "scale a large photo is decoded at). One decode peaks at 6 bytes a pixel: 240 MB at the default."
        ),
    )
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description=(
            "If set, model routes need one of these keys (JSON list): plain strings, or objects with a name, a "
            'priority and a rate limit, e.g. [{"key": "k1", "name": "web", "priority": "high"}, {"key": "k2", '
            '"name": "batch-jobs", "rate_per_s": 50, "burst": 100, "priority": "low"}].'
        ),
    )
    public_ops: bool = Field(
        True,
        description=("Keep readiness, models, metrics, the docs pages and /openapi.json open when api_keys is set."),
    )
    public_model_details: bool = Field(
        False,
        description=(
            "Show library versions, the training commit and hyperparameters on /models to callers without a key "
            "(callers with a valid key always see them)."
        ),
    )
    cors_origins: list[str] = Field([], description="Browser origins allowed to call the API (JSON list); unset: none.")
    grpc_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description=(
            "Serve the Open Inference Protocol v2 over gRPC on this port too (the container sets 8001); unset: off."
        ),
    )
    grpc_max_calls: int = Field(
        64,
        ge=1,
        description=(
            "gRPC calls in progress per worker process; more are refused at once with RESOURCE_EXHAUSTED. With "
            "SERVE_GRPC_MAX_MESSAGE_BYTES it bounds what gRPC messages can hold: 64 x 2 MB."
        ),
    )
    grpc_max_message_bytes: int = Field(
        2 * 2**20,
        ge=64 * 1024,
        description=(
            "Largest gRPC message (refused from its length prefix, before it is received). Binary tensors are "
            "compact: 256 Fashion-MNIST pictures as FP64, the largest valid request, take 1.6 MB."
        ),
    )
    grpc_max_calls_per_connection: int = Field(
        32,
        ge=1,
        description=("gRPC calls in progress on one connection (HTTP/2 concurrent streams); a client waits for more."),
    )
    manifest_public_key: str | None = Field(
        None,
        description=(
            "An ed25519 public key (PEM text, or the path of a PEM file): when set, a model loads only if its "
            "manifest.json carries a valid manifest.sig made with the matching private key (see the README)."
        ),
    )

    # Model versions (artifacts/<model>/<version>/): which serve, and how new ones arrive.
    model_versions: dict[str, str] = Field(
        default_factory=dict,
        description=(
            'A pinned version per model, e.g. {"fashion": "2026.11.25.123948"}; a model not named serves its '
            "newest version that loads."
        ),
    )
    traffic: dict[str, dict[str, SplitWeight]] = Field(
        default_factory=dict,
        description=(
            'A weighted split between versions per model (a canary), e.g. {"fashion": {"A": 90, "B": 10}}; '
            "weights are whole numbers from 1 to 1,000,000."
        ),
    )
    fault_injection: dict[str, FaultInjection] = Field(
        default_factory=dict,
        description=(
            "Chaos testing, off by default: per model, one version answers a share of its instances with a 500 "
            '("injected fault") after computing them, e.g. {"fashion": {"version": "2026.11.25.123948", '
            '"error_ratio": 0.2}}: a rehearsal that a guarded canary is rolled back before it reaches everyone.'
        ),
    )
    model_poll_s: float | None = Field(
        None,
        gt=0,
        description=(
            "Look for new versions on disk every this many seconds and switch to them (models not pinned); unset: "
            "only when an admin asks (POST /admin/models/{m}/load)."
        ),
    )
    admin_keys: list[str] = Field(
        default_factory=list,
        description=("Keys for the /admin routes (never the client keys); unset: the admin routes are off."),
    )
    control_dir: Path | None = Field(
        None,
        description=(
            "Where worker processes share the desired model versions and report theirs; `python -m service` sets it "
            "for SERVE_WORKERS > 1. Unset: one process, nothing shared."
        ),
    )

    # Payload records (service/runtime/payloads.py): each prediction's request and response as CloudEvents.
    payload_log_url: str | None = Field(
        None,
        description=(
            "Where payload records go: an http(s) URL (CloudEvents, KServe's logger shape) or a file path (JSON Lines, "
            "one event per line); unset: none are kept."
        ),
    )
    payload_log_sample: float = Field(
        1.0, ge=0, le=1, description="The share of requests whose payloads are recorded (0-1), drawn per request."
    )
    payload_log_redact: list[str] = Field(
        default_factory=list,
        description='Field names whose values are replaced by "[redacted]" in the records, at any depth (JSON list).',
    )
    payload_log_format: Literal["binary", "structured", "batch"] = Field(
        "binary",
        description=(
            "How records are posted to an http(s) sink: binary (one event per POST, attributes as Ce- headers, as "
            "KServe's logger sends), structured (one application/cloudevents+json event per POST) or batch "
            "(application/cloudevents-batch+json, up to 1,000 events per POST)."
        ),
    )
    payload_log_queue: int = Field(
        10_000,
        ge=2,
        description="Records waiting for the sink at most; beyond it new ones are dropped (and counted).",
    )
    payload_log_timeout_s: float = Field(2.0, gt=0, description="Longest one POST to the payload sink may take.")

    # Drift alarms (service/runtime/drift.py): each version whose artifact has a reference profile.
    drift_window: int = Field(
        1000,
        ge=0,
        le=1_000_000,
        description=(
            "Rows per model version (and worker process) in the sliding window whose drift against the training "
            "profile is exported (model_feature_drift_psi); 0 turns drift watching off."
        ),
    )
    drift_min_count: int = Field(
        200,
        ge=1,
        description=(
            "Rows the window must hold before the drift gauges are exported: fewer make a noisy PSI (about 9 / rows "
            "for ten bins of an unchanged feature)."
        ),
    )

    benchmark_routes: bool = Field(False, description="Add POST /{model}/noop (validation only) for benchmarks.")

    log_json: bool = Field(False, description="One JSON object per log line (for log collectors), else plain text.")
    log_level: str = Field("INFO", description="The service's log level: DEBUG, INFO, WARNING or ERROR.")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _named_keys(cls, value: object) -> object:
        """Plain strings become keys of normal priority without a limit; every key gets a name."""
        if not isinstance(value, list):
            return value
        keys = [{"key": k} if isinstance(k, str) else k for k in value]
        return [{**k, "name": k.get("name") or f"key-{i}"} if isinstance(k, dict) else k for i, k in enumerate(keys, 1)]

    @field_validator("api_keys")
    @classmethod
    def _distinct_keys(cls, keys: list[ApiKey]) -> list[ApiKey]:
        for attribute in ("key", "name"):
            values = [getattr(k, attribute) for k in keys]
            if len(set(values)) != len(values):
                raise ValueError(f"two API keys have the same {attribute}; each needs its own")
        return keys

    def policy(self, model: str) -> BatchPolicy:
        return self.batching.get(model, self.default_batching)
