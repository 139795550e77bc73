"""Model selection that can be trusted: repeated K-fold of a whole recipe, the same folds for every candidate.

A single validation split of a few hundred rows is too noisy to choose models with (the phone and house
nets' one-split scores did not carry over to held-back rows), so every choice and every baseline is
scored by repeated K-fold cross-validation, with the preprocessing fitted inside each fold, and reported
as mean ± standard deviation over all folds of all repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import RepeatedKFold, RepeatedStratifiedKFold
from tqdm.auto import tqdm

# fit_predict(train_rows, validation_rows) -> predictions for the validation rows
FitPredict = Callable[[np.ndarray, np.ndarray], np.ndarray]
Score = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Protocol:
    """Which folds: ``folds`` x ``repeats`` splits of ``rows`` rows, stratified on the target or not."""

    folds: int
    repeats: int
    stratified: bool
    seed: int = 0

    def splits(self, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        kind = RepeatedStratifiedKFold if self.stratified else RepeatedKFold
        splitter = kind(n_splits=self.folds, n_repeats=self.repeats, random_state=self.seed)
        return list(splitter.split(np.zeros((len(y), 1)), y))

    def describe(self, rows: int) -> str:
        return (
            f"{self.repeats}x repeated {'stratified ' if self.stratified else ''}{self.folds}-fold "
            f"cross-validation of the whole recipe (preprocessing fitted inside each fold) on {rows} rows, "
            f"seed {self.seed}; mean and standard deviation over all {self.folds * self.repeats} folds"
        )


def cross_validate(
    y: np.ndarray, candidates: dict[str, FitPredict], scores: dict[str, Score], protocol: Protocol, desc: str = "cv"
) -> dict[str, dict[str, float]]:
    """Each candidate on the same folds: ``{candidate: {score_mean, score_sd, ...}}``, rounded for a manifest."""
    splits = protocol.splits(y)
    table: dict[str, dict[str, float]] = {}
    for name, fit_predict in candidates.items():
        per_fold: dict[str, list[float]] = {score: [] for score in scores}
        for train_rows, val_rows in tqdm(splits, desc=f"{desc}: {name}", unit="fold"):
            predicted = fit_predict(train_rows, val_rows)
            for score, function in scores.items():
                per_fold[score].append(function(y[val_rows], predicted))
        table[name] = {
            key: round(float(value), 4)
            for score, values in per_fold.items()
            for key, value in ((f"{score}_mean", np.mean(values)), (f"{score}_sd", np.std(values)))
        }
    return table


def markdown(table: dict[str, dict[str, float]], score: str) -> str:
    """The table as README rows: | candidate | mean ± sd |."""
    return "\n".join(
        f"| {name} | {row[f'{score}_mean']:.4f} ± {row[f'{score}_sd']:.4f} |" for name, row in table.items()
    )
