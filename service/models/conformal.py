"""Conformal prediction sets for the classifiers: every label whose probability is high enough that, on
answers the model had not been fitted on, the true label was in such a set at least 1 - alpha of the time.

The score of a held-out answer is ``1 - p(true label)`` (split conformal with the "least ambiguous" score:
the smallest sets on average). Training stores the sorted scores of held-out answers in the artifact
(``conformal.json``); for a level alpha the threshold is the ``ceil((n + 1)(1 - alpha))``-th smallest score,
and a set holds every label k with ``1 - p_k <= threshold``. On exchangeable data the set covers the true
label with probability between 1 - alpha and 1 - alpha + 1/(n + 1). A set may be empty: at alpha = 0.1 a
classifier right 98 % of the time must leave out about 8 % of answers entirely to cover only 90 %; an empty
set says no label reaches that level of confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from service.artifacts import Artifact, ArtifactError

CONFORMAL_FILE = "conformal.json"
KIND = "split conformal, score 1 - p(true label)"
ALPHA_RANGE = (0.01, 0.5)
DEFAULT_ALPHA = 0.1
ALPHA = (
    "The prediction set's error level: the set holds the true answer at least 1 - alpha of the time (0.1: a 90 % set)."
)
PREDICTION_SET = (
    "Every label the model cannot rule out at level 1 - alpha (a conformal prediction set, most probable "
    "first): on answers the model was not fitted on, such sets held the true label at least 1 - alpha of "
    "the time. One label: confident; several: unsure between them; empty: no label reaches that level. "
    "Null when the serving version was trained before prediction sets."
)


def scores_of(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The nonconformity score of each held-out answer: 1 - the probability given to its true label."""
    return np.sort(1.0 - probabilities[np.arange(len(labels)), labels])


@dataclass(frozen=True)
class ConformalSets:
    scores: np.ndarray  # sorted, ascending

    def threshold(self, alpha: float) -> float:
        rank = math.ceil((len(self.scores) + 1) * (1 - alpha))
        return float(self.scores[rank - 1]) if rank <= len(self.scores) else math.inf

    def sets(self, probabilities: np.ndarray, alpha: float) -> list[list[int]]:
        """Per row of probabilities, the labels in its set, most probable first."""
        limit = self.threshold(alpha)
        inside = 1.0 - probabilities <= limit
        order = np.argsort(-probabilities, axis=1)
        return [[int(k) for k in row_order if row_inside[k]] for row_order, row_inside in zip(order, inside)]

    def to_json(self) -> dict:
        return {"kind": KIND, "scores": [round(float(s), 6) for s in self.scores]}

    @classmethod
    def from_json(cls, data: object) -> ConformalSets:
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise ValueError(f"{CONFORMAL_FILE} must say kind {KIND!r}")
        scores = np.array(data.get("scores"), dtype=np.float64)
        if scores.ndim != 1 or len(scores) < 20 or not np.isfinite(scores).all():
            raise ValueError(f"{CONFORMAL_FILE} must hold at least 20 finite scores")
        return cls(np.sort(scores))


def load_conformal(artifact: Artifact) -> ConformalSets | None:
    """The version's calibration, or None for a version trained before prediction sets."""
    if CONFORMAL_FILE not in artifact.manifest.files:
        return None
    try:
        return ConformalSets.from_json(artifact.load_json(CONFORMAL_FILE))
    except ValueError as exc:
        raise ArtifactError(f"{artifact.label}/{CONFORMAL_FILE}: {exc}") from None


def label_sets(
    conformal: ConformalSets | None, probabilities: np.ndarray, alphas: list[float], labels: list[str]
) -> list[list[str] | None]:
    """Each row's prediction set at its own alpha, as label names (None everywhere without a calibration)."""
    out: list[list[str] | None] = [None] * len(alphas)
    if conformal is None:
        return out
    for alpha in set(alphas):  # one pass per level asked for (usually one: the default)
        rows = [i for i, a in enumerate(alphas) if a == alpha]
        for i, chosen in zip(rows, conformal.sets(probabilities[rows], alpha)):
            out[i] = [labels[k] for k in chosen]
    return out


def held_out_coverage(probabilities: np.ndarray, labels: np.ndarray, alpha: float, seed: int = 0) -> dict:
    """Coverage and mean set size measured honestly: calibrate on one half of the held-out answers, measure on
    the other, and the other way round (training reports these; the artifact keeps the scores of all)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    halves = np.array_split(order, 2)
    covered, sizes = [], []
    for calibrate, measure in (halves, halves[::-1]):
        sets = ConformalSets(scores_of(probabilities[calibrate], labels[calibrate])).sets(probabilities[measure], alpha)
        covered += [int(y) in s for y, s in zip(labels[measure], sets)]
        sizes += [len(s) for s in sets]
    return {"coverage": round(float(np.mean(covered)), 4), "mean_set_size": round(float(np.mean(sizes)), 3)}
