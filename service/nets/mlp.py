"""The tabular models' net: a fully connected MLP, optionally beside a linear skip path."""

from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    """Linear-ReLU-Dropout blocks, then a linear head.

    With ``skip=True`` a linear path from input to output is added ("wide and deep"): when the signal
    is mostly linear, as for phones, the hidden layers only learn the residual and overfit less.
    """

    def __init__(
        self, in_features: int, hidden: list[int], out_features: int, dropout: float = 0.0, skip: bool = False
    ):
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


def build(hyperparameters: dict[str, Any]) -> MLP:
    """The net described by a manifest's hyperparameters (training writes the same keys)."""
    return MLP(
        hyperparameters["in_features"],
        list(hyperparameters["hidden"]),
        hyperparameters["out_features"],
        hyperparameters["dropout"],
        hyperparameters.get("skip", False),
    )
