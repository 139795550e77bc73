"""Loads every model's verified artifact onto the device; a model that fails is reported, not fatal."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel

from service.artifacts import Artifact, Manifest, MissingArtifactError
from service.batching import Batcher
from service.catalog import Model
from service.metrics import Metrics
from service.models.base import Predictor
from service.settings import Settings

log = logging.getLogger("service.registry")


class ModelUnavailableError(RuntimeError):
    """The model did not load; its routes answer 503 with the reason."""


@dataclass
class ModelEntry:
    model: Model
    predictor: Predictor
    Input: type[BaseModel]              # the schema of one instance, from the class or from its artifact
    artifact: Artifact | None = None    # verified when the entry was described; None if that failed
    state: Literal["loading", "ready", "failed"] = "loading"
    reason: str | None = None
    batcher: Batcher | None = None
    streams: int = 0                    # Server-Sent-Event streams open now (capped by SERVE_MAX_STREAMS)
    uploads: int = 0                    # uploaded files held in memory now (capped by SERVE_MAX_UPLOADS)

    @classmethod
    def describe(cls, model: Model, artifacts_dir: Path, public_key: str | None = None) -> ModelEntry:
        """Verify the model's artifact (its manifest's signature too, given ``public_key``) and read its input
        schema (the routes need it before start-up)."""
        predictor_cls = model.predictor_class()
        entry = cls(model, predictor_cls(), predictor_cls.Input)
        folder = artifacts_dir / model.folder
        try:
            entry.artifact = Artifact(folder, public_key)
            entry.Input = predictor_cls.input_schema(entry.artifact)
            predictor_cls.check_example(entry.Input)
        except MissingArtifactError as exc:
            entry.fail(MissingArtifactError(f"{exc}: train it with `python -m training {model.name}`, or leave it out "
                                            "of SERVE_MODELS"), folder)
        except Exception as exc:  # one broken model must not take the others down
            entry.fail(exc, folder)
        if entry.artifact and entry.artifact.manifest.quick:
            log.warning("serving %s from a --quick artifact (trained on a data slice as a smoke test): retrain it "
                        "with `python -m training %s` before relying on its answers", model.name, model.name)
        return entry

    def load(self, device: torch.device, settings: Settings) -> None:
        """Load the weights onto ``device``; a failure is recorded, not raised."""
        if self.state != "loading":
            return
        try:
            self.predictor.load(self.artifact, device, settings)
            self.state = "ready"
            log.info("loaded %s version %s on %s", self.name, self.artifact.manifest.version, device)
        except Exception as exc:
            self.fail(exc)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def manifest(self) -> Manifest | None:
        return self.artifact.manifest if self.artifact and self.state == "ready" else None

    def fail(self, exc: Exception, folder: Path | None = None) -> None:
        """Record why the model is not served; the reason reaches clients, so the server's path is only logged."""
        self.state, self.reason = "failed", f"{type(exc).__name__}: {exc}"
        log.error("could not load %s from %s: %s", self.name, folder or "its artifact", self.reason)

    def streams_full(self, max_streams: int) -> str | None:
        """Why a new stream is refused now (SERVE_MAX_STREAMS reached), or None."""
        if self.streams < max_streams:
            return None
        return (f"{self.name} is already streaming to its limit of {max_streams} clients (SERVE_MAX_STREAMS); retry "
                f"after the seconds in Retry-After, or call POST /{self.name} for the whole answer at once")

    def batcher_or_raise(self) -> Batcher:
        if self.state != "ready" or self.batcher is None:
            raise ModelUnavailableError(f"model '{self.name}' is not available: {self.reason or self.state}")
        return self.batcher


def open_model(model: Model, artifacts_dir: Path, device: str = "cpu") -> ModelEntry:
    """One model described and loaded outside a server (tests, benchmarks, tools); raises if it cannot be."""
    settings = Settings()
    entry = ModelEntry.describe(model, artifacts_dir, settings.manifest_public_key)
    entry.load(torch.device(device), settings)
    if entry.state != "ready":
        raise ModelUnavailableError(f"model '{model.name}' did not load: {entry.reason}")
    return entry


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SERVE_DEVICE=cuda but no CUDA device is visible")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


class Registry:
    """Every served model's entry: described when the app is built, loaded at start-up, then batched."""

    def __init__(self, models: list[Model], settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.device = resolve_device(settings.device)
        self.entries = {model.name: ModelEntry.describe(model, settings.artifacts_dir, settings.manifest_public_key)
                        for model in models}

    def load_all(self) -> None:
        for name, entry in self.entries.items():
            entry.load(self.device, self.settings)
            self.metrics.model_up.labels(name).set(1 if entry.state == "ready" else 0)

    def start(self) -> None:
        """Start a batcher for every loaded model (needs the running event loop)."""
        for name, entry in self.entries.items():
            if entry.state == "ready":
                policy = self.settings.policy(name)
                cap = entry.predictor.max_batch_size
                if cap and policy.max_batch_size > cap:
                    policy = policy.model_copy(update={"max_batch_size": cap})
                threads = policy.threads or entry.predictor.threads or torch.get_num_threads()
                entry.batcher = Batcher(name, entry.predictor.run, policy, threads=threads,
                                        max_queue=self.settings.max_queue, timeout_s=self.settings.request_timeout_s,
                                        observe=self.metrics.batch_observer(name))
                entry.batcher.start()

    async def stop(self) -> None:
        for entry in self.entries.values():
            if entry.batcher is not None:
                await entry.batcher.stop()
            self.metrics.model_up.labels(entry.name).set(0)
