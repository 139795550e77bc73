"""Every served model and its versions: verified, loaded, warmed up and switched without a request lost.

A model's folder is a repository of versions (``artifacts/<model>/<version>/``, see service/artifacts.py).
Which of them serve is a small desired state per model: a pinned version (else the newest that loads),
an optional weighted split between versions (a canary), and versions loaded on request for direct calls.
:meth:`Registry.reconcile` moves the loaded versions towards it: a version is loaded, verified and warmed
up (one real batch through its own batcher) while the old one serves; the switch is one assignment on the
event loop; a version no longer wanted leaves the rotation at once, and is stopped and freed only after
the requests that picked it have finished. A version that fails to load is recorded and never serves.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel

from service.artifacts import (
    MANIFEST,
    Artifact,
    ArtifactError,
    Manifest,
    MissingArtifactError,
    version_folders,
    version_key,
)
from service.catalog import Model
from service.errors import (
    InjectedFaultError,
    ModelUnavailableError,
    NotFoundError,
    QueueFullError,
    RateLimitedError,
    VersionNotFoundError,
)
from service.models.base import InputError, Predictor, return_freed_memory
from service.runtime import golden
from service.runtime.batching import Batcher, Pieces
from service.runtime.context import CURRENT
from service.runtime.drift import DriftWatcher, not_watched, watch
from service.runtime.generation import ContinuousBatcher
from service.runtime.metrics import Metrics
from service.runtime.payloads import PayloadLog
from service.runtime.quotas import RateLimits
from service.runtime.rollouts import Outcomes, Shadows
from service.runtime.tracing import Tracing
from service.settings import PRIORITY_RANK, Settings

log = logging.getLogger("service.runtime.registry")


@dataclass
class ModelVersion:
    """One version of a model: its verified artifact, its loaded predictor and its own batcher."""

    name: str
    predictor: Predictor | None  # None once retired (its weights freed)
    artifact: Artifact | None = None
    state: Literal["loading", "ready", "failed", "unloading"] = "loading"
    reason: str | None = None
    batcher: Batcher | None = None
    active: int = 0  # requests and streams that picked this version and have not finished
    loaded_at: float | None = None
    drift: DriftWatcher | None = None  # its window against the artifact's profile.json (service/runtime/drift.py)
    drift_reason: str | None = None  # why it has none
    golden: str = ""  # what its golden set's replay at load found (service/runtime/golden.py)

    @property
    def manifest(self) -> Manifest | None:
        return self.artifact.manifest if self.artifact else None

    @property
    def live_predictor(self) -> Predictor:
        """The predictor of a version not yet retired (retiring frees it)."""
        assert self.predictor is not None, f"version {self.name} was unloaded"
        return self.predictor

    @property
    def live_batcher(self) -> Batcher:
        """The batcher of a version that has started and is not yet retired."""
        assert self.batcher is not None, f"version {self.name} has no batcher (not started, or unloaded)"
        return self.batcher


@dataclass
class Desired:
    """What should serve, per model (the admin API and settings set it; every worker process applies it)."""

    pin: str | None = None  # None: the newest (up to `newest`) that loads
    split: dict[str, int] = field(default_factory=dict)  # version -> weight; empty: all to the default
    extra: list[str] = field(default_factory=list)  # also loaded, for POST /{m}/versions/{v}
    # The newest version agreed on when not pinned: newer folders on disk are ignored until an admin load or a
    # SERVE_MODEL_POLL_S scan raises it, so a worker that restarts serves what the others do, not what it finds.
    newest: str | None = None
    guard: dict | None = None  # the split's guard (service/runtime/rollouts.py Guard), while it runs
    guard_since: float | None = None  # when the guarded split began (time.time(): the same in every worker)
    decisions: list[dict] = field(default_factory=list)  # the guards' rollbacks and promotions, newest last
    shadow: dict | None = None  # {"version": V, "share": s}: that share of requests mirrored to V (rollouts.py)

    @classmethod
    def from_settings(cls, settings: Settings, model: str) -> Desired:
        """What the settings ask for: the starting point of the admin API's changes."""
        return cls(pin=settings.model_versions.get(model), split=dict(settings.traffic.get(model, {})))

    def consider(self, version: str | None) -> None:
        """Raise :attr:`newest` to ``version`` (never lowers it: a version once agreed on stays eligible)."""
        if version is not None and (self.newest is None or version_key(version) > version_key(self.newest)):
            self.newest = version


@dataclass
class ModelEntry:
    model: Model
    predictor: Predictor  # the version serving by default; before one loads, an unloaded instance
    Input: type[BaseModel]  # the input schema the routes were built with (every version must agree)
    folder: Path  # the model's repository of versions
    versions: dict[str, ModelVersion] = field(default_factory=dict)  # loaded (or loading) versions
    default: str | None = None  # the version that answers when none is named and no split is set
    split: dict[str, int] = field(default_factory=dict)  # the split in force (all its versions ready)
    desired: Desired = field(default_factory=Desired)
    shadowing: Shadows | None = None  # this worker's shadow comparisons (the registry's)
    failed: dict[str, tuple[int, str]] = field(default_factory=dict)  # version -> (manifest mtime, why)
    held_back: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # version -> (mtime, why), see below
    reason: str | None = None  # why nothing serves
    streams: int = 0  # Server-Sent-Event streams open now (capped by SERVE_MAX_STREAMS)
    uploads: int = 0  # uploaded files held in memory now (capped by SERVE_MAX_UPLOADS)

    @classmethod
    def describe(
        cls, model: Model, artifacts_dir: Path, public_key: str | None = None, desired: Desired | None = None
    ) -> ModelEntry:
        """Verify the version that will serve first and read its input schema (the routes need it before
        start-up); loading comes later (:meth:`Registry.load_all`)."""
        predictor_cls = model.predictor_class()
        entry = cls(
            model, predictor_cls(), predictor_cls.Input, artifacts_dir / model.folder, desired=desired or Desired()
        )
        entry.desired.consider(entry.newest_on_disk())  # what every worker forked from here agrees on
        while (name := entry.target()) is not None:  # the newest that verifies (or the pinned one)
            version = ModelVersion(name, predictor_cls())
            try:
                version.artifact = entry.verify(name, public_key)
                entry.Input = predictor_cls.input_schema(version.artifact)
                predictor_cls.check_example(entry.Input)
            except Exception as exc:  # one broken model (or version) must not take the others down
                entry.record_failure(version, exc)
                if entry.desired.pin is not None:
                    break
                continue
            entry.versions[name] = version
            if version.artifact.manifest.quick:
                log.warning(
                    "serving %s from a --quick artifact (trained on a data slice as a smoke test): retrain "
                    "it with `python -m training %s` before relying on its answers",
                    model.name,
                    model.name,
                )
            return entry
        if entry.reason is None:
            entry.reason = (
                f"{MissingArtifactError.__name__}: no version of {model.name} in the artifacts folder "
                f"'{model.folder}'"
                + (f" named '{entry.desired.pin}'" if entry.desired.pin else " that may serve by default")
                + f": train it with `python -m training {model.name}`, or leave it out of SERVE_MODELS"
            )
            if note := entry.held_back_note():
                entry.reason += f"; {note}"
            if (entry.folder / MANIFEST).is_file():  # the layout before versions: one artifact in the folder itself
                entry.reason += (
                    f"; '{model.folder}' holds a {MANIFEST} itself, the layout before versions: move its "
                    f"files into '{model.folder}/<the manifest's version>/'"
                )
            log.error("cannot serve %s: %s", model.name, entry.reason)
        return entry

    @property
    def name(self) -> str:
        return self.model.name

    # The default version's view, as the routes, /models and the v2 protocol read it.
    @property
    def serving(self) -> ModelVersion | None:
        version = self.versions.get(self.default) if self.default else None
        return version if version is not None and version.state == "ready" else None

    @property
    def state(self) -> str:
        if self.serving:
            return "ready"
        return "loading" if any(v.state == "loading" for v in self.versions.values()) else "failed"

    @property
    def artifact(self) -> Artifact | None:
        return self.serving.artifact if self.serving else None

    @property
    def manifest(self) -> Manifest | None:
        return self.serving.manifest if self.serving else None

    @property
    def batcher(self) -> Batcher | None:
        return self.serving.batcher if self.serving else None

    @property
    def queue_depth(self) -> int:
        """Items waiting in every loaded version's queue."""
        return sum(v.batcher.depth for v in self.versions.values() if v.batcher is not None)

    def on_disk(self) -> dict[str, Path]:
        return version_folders(self.folder)

    def newest_on_disk(self) -> str | None:
        return next(reversed(self.on_disk()), None)

    def stamp(self, name: str) -> int:
        """When a version's manifest last changed: a failed version is tried again only once it does."""
        try:
            return (self.folder / name / MANIFEST).stat().st_mtime_ns
        except OSError:
            return 0

    def failed_now(self, name: str) -> str | None:
        """Why the version failed, if it did as its files are now (a changed version may be tried again)."""
        failure = self.failed.get(name)
        return failure[1] if failure is not None and failure[0] == self.stamp(name) else None

    def held_back_now(self, name: str) -> str | None:
        """Why a version on disk may not become the default unless pinned (a --quick smoke test, or one that
        failed training's quality gate), read from its manifest once per change. Loading verifies the
        manifest; this read only keeps a version out, so an unreadable one is left for loading to refuse."""
        stamp = self.stamp(name)
        known = self.held_back.get(name)
        if known is None or known[0] != stamp:
            try:
                why = Manifest.model_validate_json((self.folder / name / MANIFEST).read_bytes()).refusal
            except (OSError, ValueError):
                why = None
            self.held_back[name] = known = (stamp, why)
        return known[1]

    def held_back_note(self) -> str | None:
        """The versions newer than the default kept from serving by default, for /readyz and the not-ready reason."""
        newer = [
            f"{v} ({why})"
            for v in self.on_disk()
            if (self.default is None or version_key(v) > version_key(self.default))
            and (why := self.held_back_now(v)) is not None
        ]
        if not newer:
            return None
        return (
            "not made the default, as training marked them: "
            + ", ".join(newer)
            + f"; an admin can still pin one (PUT /admin/models/{self.name}/default)"
        )

    def ready_versions(self) -> list[str]:
        """The versions that can answer, the default first."""
        return sorted((v for v, mv in self.versions.items() if mv.state == "ready"), key=lambda v: v != self.default)

    def target(self) -> str | None:
        """The version that should serve by default: the pinned one, else the newest on disk, up to
        ``desired.newest``, that has not failed (as it is now); None if there is none."""
        disk = self.on_disk()
        if self.desired.pin is not None:
            return self.desired.pin if self.desired.pin in disk else None
        newest = self.desired.newest
        usable = [
            v
            for v in disk
            if self.failed_now(v) is None and newest is not None and version_key(v) <= version_key(newest)
        ]
        return next((v for v in reversed(usable) if self.held_back_now(v) is None), None)

    def verify(self, name: str, public_key: str | None) -> Artifact:
        folder = self.on_disk().get(name)
        if folder is None:
            raise MissingArtifactError(f"no version '{name}' in the artifacts folder '{self.model.folder}'")
        artifact = Artifact(folder, public_key)
        if artifact.manifest.version != name:  # a renamed (or copied) folder is not that version
            raise ArtifactError(
                f"{self.model.folder}/{name}/{MANIFEST} says it is version "
                f"'{artifact.manifest.version}', not '{name}'; versions live in folders named "
                "after their manifest's version"
            )
        if artifact.manifest.name != self.name:
            raise ArtifactError(
                f"{self.model.folder}/{name}/{MANIFEST} is an artifact of "
                f"'{artifact.manifest.name}', not of '{self.name}'"
            )
        return artifact

    def record_failure(self, version: ModelVersion, exc: BaseException) -> None:
        """Record why a version does not serve; the reason reaches clients, so server paths are only logged."""
        version.state, version.reason = "failed", f"{type(exc).__name__}: {exc}"
        self.failed[version.name] = (self.stamp(version.name), version.reason)
        self.versions.pop(version.name, None)
        if self.serving is None:
            self.reason = f"version {version.name}: {version.reason}"
        log.error("could not load %s version %s from %s: %s", self.name, version.name, self.folder, version.reason)

    def streams_full(self, max_streams: int) -> str | None:
        """Why a new stream is refused now (SERVE_MAX_STREAMS reached), or None."""
        if self.streams < max_streams:
            return None
        return (
            f"{self.name} is already streaming to its limit of {max_streams} clients (SERVE_MAX_STREAMS); retry "
            f"after the seconds in Retry-After, or call POST /{self.name} for the whole answer at once"
        )

    @contextmanager
    def upload_place(self, most: int) -> Iterator[None]:
        """One of the model's SERVE_MAX_UPLOADS places for an uploaded file held in memory, while it is."""
        if self.uploads >= most:
            raise QueueFullError(
                f"{self.name} already holds its limit of {most} uploads (SERVE_MAX_UPLOADS); "
                "retry after the seconds in Retry-After"
            )
        self.uploads += 1
        try:
            yield
        finally:
            self.uploads -= 1

    def pick(self, version: str | None = None) -> ModelVersion:
        """The version that answers a request: the one named, else one drawn by the split, else the default."""
        if version is not None:
            chosen = self.versions.get(version)
            if chosen is None or chosen.state != "ready":
                raise VersionNotFoundError(
                    f"version '{version}' of {self.name} is not loaded; loaded: "
                    f"{', '.join(self.ready_versions()) or 'none'} (an admin loads one with POST "
                    f"/admin/models/{self.name}/load)"
                )
            return chosen
        if self.split:
            names, weights = zip(*self.split.items())
            chosen = self.versions.get(random.choices(names, weights)[0])
            if chosen is not None and chosen.state == "ready":
                return chosen
        if self.serving is None:
            raise ModelUnavailableError(f"model '{self.name}' is not available: {self.reason or self.state}")
        return self.serving

    @contextmanager
    def use(self, version: str | None = None) -> Iterator[ModelVersion]:
        """Pick a version and hold it until the request is answered: a version taken out of rotation is
        stopped only once nothing holds it, so queued and running requests finish where they started."""
        chosen = self.pick(version)
        chosen.active += 1
        try:
            yield chosen
        finally:
            chosen.active -= 1

    def status(self) -> dict:
        """Every version's state, for GET /admin/models."""
        disk = self.on_disk()
        names = sorted({*disk, *self.versions, *self.failed}, key=version_key)
        versions = {}
        for name in names:
            loaded = self.versions.get(name)
            if loaded is not None:
                state: str = loaded.state
                reason = loaded.reason
            elif (why := self.failed_now(name)) is not None:
                state, reason = "failed", why
            elif name in disk and (why := self.held_back_now(name)) is not None:
                state, reason = "held back", f"not made the default unless pinned: {why}"
            else:
                state, reason = ("available" if name in disk else "gone"), None
            versions[name] = {
                "state": state,
                "reason": reason,
                "on_disk": name in disk,
                "active_requests": loaded.active if loaded else 0,
                "golden": loaded.golden if loaded else None,
                "drift": (
                    loaded.drift.status()
                    if loaded is not None and loaded.drift is not None
                    else not_watched((loaded and loaded.drift_reason) or "not loaded")
                ),
            }
        return {
            "default": self.default,
            "split": self.split,
            "pinned": self.desired.pin,
            "desired": {
                "pin": self.desired.pin,
                "split": self.desired.split,
                "extra": self.desired.extra,
                "newest": self.desired.newest,
                "guard": self.desired.guard,
                "shadow": self.desired.shadow,
            },
            "shadow": self.shadowing.status(self.name) if self.shadowing else None,
            "canary_decisions": self.desired.decisions,
            "versions": versions,
        }


class Stream:
    """One stream's hold on its model, from :meth:`Registry.open_stream` until :meth:`close`: a place under
    SERVE_MAX_STREAMS and its version (never unloaded under it), counted per version like any request."""

    def __init__(self, registry: Registry, entry: ModelEntry, version: ModelVersion):
        self.registry, self.entry, self.version = registry, entry, version
        self.pieces: Iterator[Any] = iter(())
        self.written: Pieces | None = None  # instead of pieces, for a generating model (service/runtime/generation.py)
        self.meta: dict[str, Any] = {}  # its batch timing (a generating model's), for its trace
        self.enqueued_ns = 0
        self.item: Any = None  # what was asked (its payload record, with the whole answer)
        self.rank, self.deadline = PRIORITY_RANK["normal"], 0.0  # its caller's priority and deadline
        self.started, self.outcome, self.closed = time.perf_counter(), "error", False
        entry.streams += 1
        version.active += 1

    async def next_piece(self) -> Any:
        """The next piece (text; the whole answer last), or None once the answer is complete."""
        if self.closed:
            return None
        if self.written is not None:  # a generating model's: written by its running batch, step by step
            piece = await self.written.get()
            if isinstance(piece, Exception):
                raise piece
        else:
            piece = await self.call(next, self.pieces, None)
        if isinstance(piece, BaseModel):  # the whole answer
            if self.registry.payloads.on:  # the stream's record
                self.registry.payloads.record(self.entry.name, self.version.name, [self.item], [piece])
            # done with its place and its version before the last event is sent: a client that opens its next
            # stream as soon as it has read this one finds the place free
            self.close("ok")
        return piece

    def has_piece(self) -> bool:
        """A piece is ready now (a generating model's stream): the next ``next_piece`` returns without waiting."""
        return self.written is not None and not self.written.empty()

    async def call(self, function: Callable, *args: Any) -> Any:
        """One of the stream's steps on its version's worker, in its turn in the queue (traced like a batch)."""
        tracing, meta = self.registry.tracing, dict[str, Any]()
        enqueued_ns = time.time_ns() if tracing.on else 0
        try:  # each step within the request's deadline, as far as that reaches (the stream's own timeout ends it)
            deadline = max(self.deadline, time.monotonic() + self.registry.settings.request_timeout_s)
            return await self.version.live_batcher.call(function, *args, meta=meta, rank=self.rank, deadline=deadline)
        finally:
            if enqueued_ns and "batches" in meta:
                tracing.model_spans(self.entry.name, self.version.name, enqueued_ns, meta["batches"])

    def close(self, outcome: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.written is not None:
            self.written.gone = True  # leaves the running batch at its next step, if still there
            batches = [b for b in self.meta.get("batches", ()) if b is not None and b.ended_ns]
            if self.enqueued_ns and batches:
                self.registry.tracing.model_spans(self.entry.name, self.version.name, self.enqueued_ns, batches)
        self.entry.streams -= 1
        self.version.active -= 1
        self.registry.count(self.entry, self.version, outcome or self.outcome, self.started)


def open_model(model: Model, artifacts_dir: Path, device: str = "cpu", settings: Settings | None = None) -> ModelEntry:
    """One model's newest version described and loaded outside a server (tests, benchmarks, tools), even one
    a server would hold back (a --quick smoke test): the tool asked for that folder. Raises if it cannot be.
    ``settings`` default to the environment's, as a tool's entry point reads them."""
    settings = settings or Settings()
    newest = next(reversed(version_folders(artifacts_dir / model.folder)), None)
    entry = ModelEntry.describe(model, artifacts_dir, settings.manifest_public_key, Desired(pin=newest))
    load_first(entry, torch.device(device), settings)
    if entry.serving is None:
        raise ModelUnavailableError(f"model '{model.name}' did not load: {entry.reason}")
    return entry


def load_version(
    entry: ModelEntry, name: str, device: torch.device, settings: Settings, metrics: Metrics | None = None
) -> ModelVersion | None:
    """Verify one version's files and load its weights (no batcher yet), and watch its drift where its artifact
    has a profile (exported to ``metrics``); a failure is recorded, not raised."""
    version = entry.versions.get(name) or ModelVersion(name, entry.model.predictor_class()())
    entry.versions[name] = version
    try:
        if version.artifact is None:
            version.artifact = entry.verify(name, settings.manifest_public_key)
        schema = entry.model.predictor_class().input_schema(version.artifact)
        if schema.model_json_schema() != entry.Input.model_json_schema():
            raise ArtifactError(
                "its input schema differs from the one the routes were built with; a version that "
                "changes what clients send needs a restart of the server"
            )
        version.live_predictor.load(version.artifact, device, settings)
        # its own reference answers, replayed before anything else runs on it (a mismatch: never serves)
        version.golden = golden.check(version.live_predictor, version.artifact, device)
    except Exception as exc:
        entry.record_failure(version, exc)
        if metrics is not None and isinstance(exc, golden.GoldenMismatch):
            metrics.golden_checks.labels(entry.name, "failed").inc()
        return None
    if metrics is not None:
        metrics.golden_checks.labels(entry.name, "absent" if version.golden.startswith("no ") else "passed").inc()
    if version.golden.startswith("no "):
        log.warning("%s version %s: %s", entry.name, name, version.golden)
    version.drift, version.drift_reason = watch(
        entry.name, name, version.artifact, version.live_predictor, settings, metrics
    )
    version.live_predictor.drift = version.drift
    log.info("loaded %s version %s on %s", entry.name, name, device)
    return version


def load_first(entry: ModelEntry, device: torch.device, settings: Settings, metrics: Metrics | None = None) -> None:
    """Load the described version and make it the default (at start-up, before anything is served)."""
    for name in list(entry.versions):
        if (version := load_version(entry, name, device, settings, metrics)) is not None:
            version.state = "ready"
            entry.default, entry.predictor, entry.reason = name, version.live_predictor, None
            return


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SERVE_DEVICE=cuda but no CUDA device is visible")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


class Registry:
    """Every served model's entry: described when the app is built, loaded at start-up, then batched; its
    versions follow each entry's desired state (:meth:`reconcile`)."""

    def __init__(self, models: list[Model], settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.shadows = Shadows(metrics)  # this worker's mirrored requests and how their answers compare
        self._faults: dict[str, int] = {}  # instances answered per model by a version under SERVE_FAULT_INJECTION
        self.device = resolve_device(settings.device)
        self.entries = {
            model.name: ModelEntry.describe(
                model, settings.artifacts_dir, settings.manifest_public_key, Desired.from_settings(settings, model.name)
            )
            for model in models
        }
        self._lock: asyncio.Lock | None = None
        for entry in self.entries.values():
            entry.shadowing = self.shadows
        self.tracing = Tracing.from_environment(metrics)
        self.outcomes = Outcomes()  # each guarded model's recent requests, for its canary's guard
        self.rate_limits = RateLimits(settings.api_keys)  # shared memory: made here, before any worker forks
        self.payloads = PayloadLog(settings, metrics)

    def ready(self) -> bool:
        """Every model serving: readiness for /readyz, the v2 protocol and gRPC's health service alike."""
        return all(e.state == "ready" and e.batcher is not None for e in self.entries.values())

    def entry(self, name: str) -> ModelEntry:
        """The served model of that name, or a 404 that lists them."""
        entry = self.entries.get(name)
        if entry is None:
            raise NotFoundError(f"no model named '{name[:100]}'; served models: {', '.join(self.entries)}")
        return entry

    def load_all(self) -> None:
        """Load each model's first version (before the event loop runs, and before worker processes fork)."""
        for name, entry in self.entries.items():
            if entry.default is None:
                load_first(entry, self.device, self.settings, self.metrics)
            self.metrics.model_up.labels(name).set(1 if entry.serving else 0)

    def start(self) -> None:
        """Start a batcher for every loaded version (needs the running event loop)."""
        for entry in self.entries.values():
            for version in entry.versions.values():
                if version.state == "ready" and version.batcher is None:
                    self._start_batcher(entry, version)
            self._publish(entry)
            self.metrics.queue_capacity.labels(entry.name).set(self.settings.max_queue)

    async def submit(
        self, entry: ModelEntry, items: list, version: str | None = None, meta: dict | None = None
    ) -> tuple[list, str]:
        """``items`` through the batcher of the version picked for them (named, drawn by the split, or the
        default), held until answered; returns the outputs (an exception in place of an item that failed) and
        the version's name. Counted per version: outcome ok, invalid (an InputError) or error."""
        rank, deadline = self.admit(entry, len(items))
        with entry.use(version) as chosen:
            started, outcome = time.perf_counter(), "error"
            enqueued_ns = time.time_ns() if self.tracing.on else 0
            meta = {} if meta is None else meta
            try:
                outputs = await chosen.live_batcher.submit(items, meta, rank, deadline)
                if (fault := self.settings.fault_injection.get(entry.name)) and fault.version == chosen.name:
                    outputs = self._inject_faults(entry, outputs, fault.error_ratio)
                failed = [out for out in outputs if isinstance(out, Exception)]
                outcome = (
                    "ok" if not failed else "invalid" if all(isinstance(f, InputError) for f in failed) else "error"
                )
                if self.payloads.on:
                    if (call := CURRENT.get()) is not None and call.sent is not None:
                        call.answered_by = (entry.name, chosen.name)  # a JSON route's: its bodies, by the middleware
                    else:
                        self.payloads.record(entry.name, chosen.name, items, outputs)
                if entry.desired.shadow:  # mirrored after the answer, on the side: the caller never waits for it
                    self.shadows.mirror(entry, chosen.name, items, outputs)
                if entry.desired.guard:  # a guarded canary's answer, compared with the stable version's
                    self.shadows.replay_canary(entry, chosen.name, items, outputs, self.outcomes)
                return outputs, chosen.name
            finally:
                self.count(entry, chosen, outcome, started)
                if enqueued_ns and "batches" in meta:
                    self.tracing.model_spans(entry.name, chosen.name, enqueued_ns, meta["batches"])

    def _inject_faults(self, entry: ModelEntry, outputs: list, ratio: float) -> list:
        """SERVE_FAULT_INJECTION: ``ratio`` of the version's instances, spread evenly (the n-th fails when n x ratio
        passes a whole number), answered with an InjectedFaultError in place of what it computed."""
        injected, message = [], f"injected fault: SERVE_FAULT_INJECTION fails {ratio:.0%} of this version's answers"
        for output in outputs:
            n = self._faults[entry.name] = self._faults.get(entry.name, 0) + 1
            fails = math.floor(n * ratio) > math.floor((n - 1) * ratio)
            injected.append(InjectedFaultError(message) if fails else output)
        return injected

    def admit(self, entry: ModelEntry, instances: int) -> tuple[int, float]:
        """The caller's place in the model's queue, its priority rank and its deadline (its X-Request-Timeout or
        gRPC deadline, within the model's default), once its key's rate limit admits ``instances`` (else 429)."""
        call = CURRENT.get()
        deadline = time.monotonic() + (self.settings.policy(entry.name).deadline_s or self.settings.request_timeout_s)
        if call is None:
            return PRIORITY_RANK["normal"], deadline
        if call.deadline is not None:
            deadline = min(deadline, call.deadline)
        key = call.key
        if key is None:
            return PRIORITY_RANK["normal"], deadline
        if key.rate_per_s:
            try:
                headers = self.rate_limits.admit(key, instances)
            except RateLimitedError:
                self.metrics.key_instances.labels(key.name, "limited").inc(instances)
                raise
            call.headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        self.metrics.key_instances.labels(key.name, "admitted").inc(instances)
        return PRIORITY_RANK[key.priority], deadline

    async def open_stream(self, entry: ModelEntry, item: Any, version: str | None = None) -> Stream:
        """A stream of ``item``'s answer from the version picked for it, as :meth:`submit` picks one: it holds
        one of the model's SERVE_MAX_STREAMS places and its version until closed. The answer is planned (a
        regulated poem's tones and rhymes) and each piece computed on the model's worker, in its turn in the
        queue; a bad input raises its InputError here, before anything is sent."""
        chosen = entry.pick(version)
        if refusal := entry.streams_full(self.settings.max_streams):
            raise QueueFullError(refusal)
        stream = Stream(self, entry, chosen)
        stream.item = item
        stream.rank, stream.deadline = self.admit(entry, 1)
        try:
            batcher = chosen.live_batcher
            if isinstance(batcher, ContinuousBatcher):  # joins the running batch; pieces come as steps complete
                stream.written, stream.enqueued_ns = Pieces(), time.time_ns() if self.tracing.on else 0
                await batcher.stream(item, stream.written, stream.meta, stream.rank, stream.deadline)
            else:
                stream.pieces = await stream.call(chosen.live_predictor.stream, item)
        except BaseException as exc:
            stream.close("invalid" if isinstance(exc, InputError) else "error")
            raise
        return stream

    def count(self, entry: ModelEntry, version: ModelVersion, outcome: str, started: float) -> None:
        """One request (or stream) in the per-version metrics: its outcome and its duration."""
        elapsed = time.perf_counter() - started
        self.metrics.version_requests.labels(entry.name, version.name, outcome).inc()
        self.metrics.version_latency.labels(entry.name, version.name).observe(elapsed)
        if entry.desired.guard:  # a guarded canary: what its guard judges (service/runtime/rollouts.py)
            self.outcomes.add(entry.name, version.name, outcome == "error", elapsed)

    def _start_batcher(self, entry: ModelEntry, version: ModelVersion) -> None:
        policy = self.settings.policy(entry.name)
        predictor = version.live_predictor
        cap = predictor.max_batch_size
        if cap and policy.max_batch_size > cap:
            policy = policy.model_copy(update={"max_batch_size": cap})
        threads = policy.threads or predictor.threads or torch.get_num_threads()
        options: dict[str, Any] = {
            "threads": threads,
            "max_queue": self.settings.max_queue,
            "timeout_s": self.settings.request_timeout_s,
            "observe": self.metrics.batch_observer(entry.name),
            "dropped": self.metrics.drop_counter(entry.name),
        }
        version.batcher = (
            ContinuousBatcher(entry.name, predictor, policy, **options)
            if predictor.generates
            else Batcher(entry.name, predictor.run, policy, **options)
        )
        version.batcher.start()
        version.loaded_at = time.time()

    async def stop(self) -> None:
        for entry in self.entries.values():
            for version in list(entry.versions.values()):
                if version.batcher is not None:
                    await version.batcher.stop()
            self.metrics.model_up.labels(entry.name).set(0)

    # -- versions at run time -------------------------------------------------------------------------

    async def reconcile(self, names: list[str] | None = None, retry: frozenset[str] = frozenset()) -> None:
        """Bring the named models (default: all) to their desired state. ``retry`` names versions to try
        again even if they failed before (an admin asked for them)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one change at a time: loads are slow, switches must not interleave
            for name in names or list(self.entries):
                await self._reconcile(self.entries[name], retry)

    async def _reconcile(self, entry: ModelEntry, retry: frozenset[str]) -> None:
        for name in retry:
            entry.failed.pop(name, None)
        desired = entry.desired
        target = entry.target()
        shadow = desired.shadow["version"] if desired.shadow else None
        wanted = [v for v in [target, *desired.split, *desired.extra, shadow] if v is not None]
        for name in dict.fromkeys(wanted):  # each once, the default first
            current = entry.versions.get(name)
            if current is not None and current.state == "ready":
                continue
            if entry.failed_now(name) is not None:
                continue  # failed as it is now: reported, not retried on every pass
            await self._load(entry, name)
        # The switch: plain assignments on the event loop, so every request sees either the old or the new state.
        if target is not None and target in entry.versions and entry.versions[target].state == "ready":
            entry.default, entry.predictor, entry.reason = target, entry.versions[target].live_predictor, None
        elif target is None and entry.serving is not None:
            entry.reason = None  # nothing (new) on disk to serve: the loaded default keeps serving
        ready_split = desired.split and all(
            v in entry.versions and entry.versions[v].state == "ready" for v in desired.split
        )
        entry.split = dict(desired.split) if ready_split else {}
        keep = {entry.default, *entry.split, *desired.extra, shadow}
        for name in [v for v in entry.versions if v not in keep]:
            await self._retire(entry, name)
        self._publish(entry)

    async def _load(self, entry: ModelEntry, name: str) -> None:
        """Load, verify and warm up one version beside the serving one; it serves only if all of that worked."""
        started = time.perf_counter()
        version = ModelVersion(name, entry.model.predictor_class()())
        entry.versions[name] = version  # "loading" in /admin/models; never picked until "ready"
        loaded = await asyncio.to_thread(load_version, entry, name, self.device, self.settings, self.metrics)
        if loaded is None:
            self.metrics.version_loads.labels(entry.name, "failed").inc()
            return
        self._start_batcher(entry, version)
        try:
            example = entry.Input.model_validate(version.live_predictor.example)
            (answer,) = await version.live_batcher.submit([example])  # one real batch, on the version's own worker
            if isinstance(answer, Exception):
                raise answer
        except Exception as exc:
            await version.live_batcher.stop()
            if version.drift is not None:
                version.drift.close()
            entry.record_failure(version, RuntimeError(f"warm-up failed: {type(exc).__name__}: {exc}"))
            self.metrics.version_loads.labels(entry.name, "failed").inc()
            return
        if version.drift is not None:
            version.drift.reset()  # the warm-up's example is not traffic
        version.state = "ready"
        self.metrics.version_loads.labels(entry.name, "ready").inc()
        log.info(
            "version %s of %s is ready (loaded and warmed up in %.2f s)",
            name,
            entry.name,
            time.perf_counter() - started,
        )

    async def _retire(self, entry: ModelEntry, name: str) -> None:
        """Out of rotation now; stopped and freed once the requests holding it are done."""
        version = entry.versions.pop(name)
        version.state = "unloading"
        deadline = time.monotonic() + self.settings.request_timeout_s + self.settings.stream_timeout_s
        while version.active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if version.batcher is not None:
            await version.batcher.stop()  # finishes anything still queued
        if version.drift is not None:
            version.drift.close()  # its series stop being reported
        version.predictor = version.batcher = version.artifact = version.drift = None
        return_freed_memory()
        log.info("unloaded %s version %s", entry.name, name)

    def _publish(self, entry: ModelEntry) -> None:
        """The serving version(s) in the metrics: each one's share of the traffic."""
        shares: dict[str, float] = {}
        if entry.split:
            shares = {v: w / sum(entry.split.values()) for v, w in entry.split.items()}
        elif entry.serving and entry.default is not None:  # serving: the default is set
            shares = {entry.default: 1.0}
        known = self.metrics.known_versions(entry.name)
        known.update(shares)
        for version in known:
            self.metrics.version_share.labels(entry.name, version).set(shares.get(version, 0.0))
        self.metrics.model_up.labels(entry.name).set(1 if entry.serving else 0)
