"""Shared pieces of the two tabular models: the MLP and a predictor that feeds it a fitted preprocessor."""

from abc import abstractmethod
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from service.artifacts import Artifact
from service.models.base import Predictor


class MLP(nn.Module):
    """Fully connected net: Linear-ReLU-Dropout blocks, then a linear head.

    With ``skip=True`` a linear path from input to output is added ("wide and deep"): when the signal
    is mostly linear, as for phones, the hidden layers only learn the residual and overfit less.
    """

    def __init__(self, in_features: int, hidden: list[int], out_features: int, dropout: float = 0.0,
                 skip: bool = False):
        super().__init__()
        self.skip = nn.Linear(in_features, out_features) if skip else None
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out if self.skip is None else out + self.skip(x)


def build_mlp(hyperparameters: dict[str, Any]) -> MLP:
    """The net described by a manifest's hyperparameters (training writes the same keys)."""
    return MLP(hyperparameters["in_features"], list(hyperparameters["hidden"]), hyperparameters["out_features"],
               hyperparameters["dropout"], hyperparameters.get("skip", False))


class TabularPredictor(Predictor):
    """Rows -> fitted scikit-learn preprocessor -> MLP -> outputs. Subclasses say how rows and outputs look."""

    def setup(self, artifact: Artifact, device: torch.device) -> None:
        self.preprocessor = artifact.load_joblib("preprocessor.joblib")
        self.net = build_mlp(artifact.manifest.hyperparameters)
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

    @torch.inference_mode()
    def predict(self, batch: list[BaseModel]) -> list[BaseModel]:
        features = self.transform(self.to_table(batch))
        x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=self.device)
        return self.from_outputs(self.net(x).float().cpu().numpy())
