"""Shared serving side of the two tabular models: rows -> fitted preprocessor -> MLP -> outputs.

Preprocessors load without unpickling anything: a ``skops`` file restricted to the trusted types
(service/artifacts.py), or, for a plain standard scaler, its numbers in JSON (:class:`Standardiser`)."""

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel

from service.artifacts import Artifact, ArtifactError
from service.models.base import Predictor
from service.nets import mlp


@dataclass(frozen=True)
class Standardiser:
    """A fitted standard scaler as plain numbers, ``(x - mean) / scale`` per column, stored as JSON: loading
    it builds nothing but arrays. ``from_scaler`` takes scikit-learn's fitted StandardScaler (training)."""

    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray

    KIND: ClassVar[str] = "StandardScaler"

    @classmethod
    def from_scaler(cls, scaler: Any, features: list[str]) -> "Standardiser":
        if not (scaler.with_mean and scaler.with_std) or len(scaler.mean_) != len(features):
            raise ValueError(f"need a StandardScaler with mean and std over {len(features)} columns, not {scaler!r}")
        return cls(tuple(features), np.asarray(scaler.mean_, np.float64), np.asarray(scaler.scale_, np.float64))

    def to_json(self) -> dict:
        # Python floats in JSON round-trip exactly, so the served formula gives the fitted scaler's numbers.
        return {
            "kind": self.KIND,
            "features": list(self.features),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Standardiser":
        def check(ok: bool, why: str) -> None:
            if not ok:
                raise ArtifactError(f"{where} must be a {cls.KIND} with mean and std ({why})")

        check(isinstance(data, dict) and data.get("kind") == cls.KIND, f"its kind is not {cls.KIND}")
        features, mean, scale = data.get("features"), data.get("mean"), data.get("scale")
        check(isinstance(features, list) and all(isinstance(f, str) for f in features), "no list of feature names")
        try:
            mean, scale = np.array(mean, dtype=np.float64), np.array(scale, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            check(False, f"mean and scale must be lists of numbers: {exc}")
        check(mean.shape == scale.shape == (len(features),), "mean, scale and features differ in length")
        check(
            bool(np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()),
            "a mean or scale is not finite, or a scale is not positive",
        )
        return cls(tuple(features), mean, scale)

    def transform(self, table: np.ndarray) -> np.ndarray:
        return (table - self.mean) / self.scale


class TabularPredictor(Predictor):
    """Subclasses say how validated rows become a table and how the net's outputs become answers."""

    net_module: ClassVar[ModuleType] = mlp  # the service/nets module whose build(hyperparameters) makes the net
    preprocessor_file: ClassVar[str] = "preprocessor.skops"

    def load_preprocessor(self, artifact: Artifact) -> Any:
        """The fitted preprocessor: by default a skops file holding only trusted types (never a pickle)."""
        return artifact.load_skops(self.preprocessor_file)

    def setup(self, artifact: Artifact, device: torch.device) -> None:
        self.preprocessor = self.load_preprocessor(artifact)
        self.net = self.net_module.build(artifact.manifest.hyperparameters)
        self.net.load_state_dict(artifact.load_state_dict("model.pt", device))
        self.net.to(device).eval()

    @abstractmethod
    def to_table(self, batch: list[Any]) -> Any:
        """Turn validated inputs into what the preprocessor was fitted on (array or DataFrame)."""

    def transform(self, table: Any) -> Any:
        """The fitted preprocessor's transform (a subclass may apply the same formula more cheaply)."""
        return self.preprocessor.transform(table)

    @abstractmethod
    def from_outputs(self, outputs: np.ndarray, batch: list[Any]) -> Sequence[BaseModel]:
        """Turn the net's raw outputs (one row per input of ``batch``) into response objects."""

    def predict(self, batch: list[Any]) -> Sequence[BaseModel]:
        table = self.to_table(batch)
        features = self.transform(table)
        x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=self.device)
        if self.drift is not None:  # kept for drift_columns, called next on this thread: not built twice
            self.last_table = table
        return self.from_outputs(self.net(x).float().cpu().numpy(), batch)

    def drift_columns(self, batch: list[Any], outputs: Sequence[Any]) -> dict[str, Any]:
        """The raw columns of the batch just predicted (its table, before the preprocessor) and its answers."""
        return {**self.raw_columns(self.last_table, batch), "output": self.answer_column(outputs)}

    def raw_columns(self, table: Any, batch: list[Any]) -> dict[str, Any]:
        """``to_table``'s table as one array per input feature, named as in the artifact's profile.json."""
        raise NotImplementedError(f"{type(self).__name__} has no drift columns")

    def answer_column(self, outputs: Sequence[Any]) -> np.ndarray:
        """The answer drift is watched on, one per output (NaN where an item failed)."""
        raise NotImplementedError(f"{type(self).__name__} has no drift columns")
