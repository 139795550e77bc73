"""Shared serving side of the two tabular models: rows -> fitted preprocessor -> MLP -> outputs."""

from abc import abstractmethod
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel

from service.artifacts import Artifact
from service.models.base import Predictor
from service.nets import mlp


class TabularPredictor(Predictor):
    """Subclasses say how validated rows become a table and how the net's outputs become answers."""

    net_module: ClassVar[ModuleType] = mlp  # the service/nets module whose build(hyperparameters) makes the net

    def setup(self, artifact: Artifact, device: torch.device) -> None:
        self.preprocessor = artifact.load_joblib("preprocessor.joblib")
        self.net = self.net_module.build(artifact.manifest.hyperparameters)
        self.net.load_state_dict(artifact.load_state_dict("model.pt", device))
        self.net.to(device).eval()

    @abstractmethod
    def to_table(self, batch: list[BaseModel]) -> Any:
        """Turn validated inputs into what the preprocessor was fitted on (array or DataFrame)."""

    def transform(self, table: Any) -> Any:
        """The fitted preprocessor's transform (a subclass may apply the same formula more cheaply)."""
        return self.preprocessor.transform(table)

    @abstractmethod
    def from_outputs(self, outputs: np.ndarray) -> list[BaseModel]:
        """Turn the net's raw outputs (one row per input) into response objects."""

    def predict(self, batch: list[BaseModel]) -> list[BaseModel]:
        features = self.transform(self.to_table(batch))
        x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=self.device)
        return self.from_outputs(self.net(x).float().cpu().numpy())
