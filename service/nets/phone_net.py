"""The phone price-band net: one score from a few selected inputs, cut into ordered bands by learnt thresholds.

The bands are ordered ranges of one underlying price, so the net is a cumulative-logit ("ordinal") model:
P(band > k) = sigmoid(score - threshold_k). It needs one score and three thresholds where a softmax head
needs four unrelated class scores. Under 5x5 repeated CV on the same 5 features it scores 0.979 where a
tuned logistic regression scores 0.976 (0.978 at its best, on 7); a ReLU(16) residual added to the score
overfits (0.958). training/phone_price.py measures all of them.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class OrdinalNet(nn.Module):
    """Standardised rows of all features in, log-probabilities of the ``classes`` bands out.

    ``inputs`` are the column indices the score reads (the feature selection, inside the net so callers
    send every column). The outputs are log-probabilities, so ``softmax(outputs)`` is the probabilities,
    as for a net with a softmax head. ``hidden > 0`` adds a one-layer ReLU residual to the linear score.
    """

    inputs: torch.Tensor  # a buffer (register_buffer), typed for the checker

    def __init__(self, inputs: list[int], classes: int, hidden: int = 0):
        super().__init__()
        self.register_buffer("inputs", torch.tensor(inputs, dtype=torch.long), persistent=False)
        self.linear = nn.Linear(len(inputs), 1, bias=False)  # the thresholds play the bias's part
        self.residual = (
            nn.Sequential(nn.Linear(len(inputs), hidden), nn.ReLU(), nn.Linear(hidden, 1)) if hidden else None
        )
        self.first = nn.Parameter(torch.zeros(1))
        self.gaps = nn.Parameter(torch.zeros(classes - 2))  # softplus: thresholds stay strictly increasing

    def score(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, self.inputs]
        score = self.linear(x)
        return score if self.residual is None else score + self.residual(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.score(x)
        gaps = F.softplus(self.gaps)
        thresholds = torch.cat([self.first, self.first + torch.cumsum(gaps, 0)])
        # P(band k) = sigmoid(s - t[k-1]) - sigmoid(s - t[k]), in logs without cancellation:
        # sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a)), where b - a = -gap.
        lowest = F.logsigmoid(thresholds[:1] - score)
        middle = (
            F.logsigmoid(score - thresholds[:-1])
            + F.logsigmoid(thresholds[1:] - score)
            + torch.log(-torch.expm1(-gaps))
        )
        highest = F.logsigmoid(score - thresholds[-1:])
        return torch.cat([lowest, middle, highest], dim=1)


def build(hyperparameters: dict[str, Any]) -> OrdinalNet:
    """The net described by a manifest's hyperparameters (training writes the same keys)."""
    return OrdinalNet(list(hyperparameters["inputs"]), hyperparameters["classes"], hyperparameters.get("hidden", 0))
