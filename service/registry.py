"""Loads every model's verified artifact onto the device; a model that fails is reported, not fatal."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from service.artifacts import Artifact, Manifest
from service.batching import Batcher
from service.metrics import Metrics
from service.models.base import Predictor
from service.settings import Settings

log = logging.getLogger("service.registry")


class ModelUnavailableError(RuntimeError):
    """The model did not load; its routes answer 503 with the reason."""


@dataclass
class ModelEntry:
    predictor: Predictor
    state: Literal["loading", "ready", "failed"] = "loading"
    reason: str | None = None
    manifest: Manifest | None = None
    batcher: Batcher | None = None

    def batcher_or_raise(self) -> Batcher:
        if self.state != "ready" or self.batcher is None:
            raise ModelUnavailableError(f"model '{self.predictor.name}' is not available: {self.reason or self.state}")
        return self.batcher


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SERVE_DEVICE=cuda but no CUDA device is visible")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


class Registry:
    def __init__(self, predictors: list[type[Predictor]], settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.device = resolve_device(settings.device)
        self.entries = {cls.name: ModelEntry(cls()) for cls in predictors}

    def load_all(self) -> None:
        for name, entry in self.entries.items():
            try:
                artifact = Artifact(self.settings.artifacts_dir / entry.predictor.folder)
                entry.predictor.load(artifact, self.device)
                entry.manifest, entry.state, entry.reason = artifact.manifest, "ready", None
                log.info("loaded %s version %s on %s", name, artifact.manifest.version, self.device)
            except Exception as exc:  # one broken model must not take the others down
                entry.state, entry.reason = "failed", f"{type(exc).__name__}: {exc}"
                log.error("could not load %s: %s", name, entry.reason)
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
                entry.batcher = Batcher(name, entry.predictor.predict, policy, threads=threads,
                                        max_queue=self.settings.max_queue, timeout_s=self.settings.request_timeout_s,
                                        observe=self.metrics.batch_observer(name))
                entry.batcher.start()

    async def stop(self) -> None:
        for entry in self.entries.values():
            if entry.batcher is not None:
                await entry.batcher.stop()
            self.metrics.model_up.labels(entry.predictor.name).set(0)
