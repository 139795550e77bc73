"""A fitted scikit-learn preprocessor turned into plain array operations when the model loads.

scikit-learn checks and converts its input on every call, which costs the house model ~14 ms for one row,
two orders of magnitude above its net. The fitted numbers are all that matter: each imputer's fill
values, the log transform, each scaler's mean and scale, each one-hot encoder's categories. This module
reads them once and applies them to columns of numpy arrays. It knows exactly the steps the training
code uses; a preprocessor holding any other step is refused at load with the step's name, so a change
in training cannot make the service answer with a silently different transform.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Columns = dict[str, np.ndarray]  # one array per column: float64 (NaN = missing) or object (None = missing)


class UnknownStepError(ValueError):
    """The preprocessor holds a step (or a setting of one) this module does not compile."""


@dataclass(frozen=True)
class NumericBlock:
    columns: list[str]
    fill: np.ndarray  # the imputer's statistics, one per column
    log1p: bool
    mean: np.ndarray
    scale: np.ndarray

    def apply(self, data: Columns) -> np.ndarray:
        x = np.column_stack([data[c].astype(np.float64) for c in self.columns])
        x = np.where(np.isnan(x), self.fill, x)
        if self.log1p:
            x = np.log1p(x)
        return (x - self.mean) / self.scale


@dataclass(frozen=True)
class OneHotBlock:
    columns: list[str]
    fill: list[Any]  # the imputer's value for a missing category, per column
    categories: list[dict[Any, int]]  # per column: category -> its position in the output

    def apply(self, data: Columns) -> np.ndarray:
        n = len(next(iter(data.values())))
        parts = []
        for column, fill, positions in zip(self.columns, self.fill, self.categories):
            out = np.zeros((n, len(positions)))
            for row, given in enumerate(data[column]):
                value = fill if given is None or given != given else given  # None or NaN: missing
                if (at := positions.get(value)) is not None:  # an unknown category stays all zeros
                    out[row, at] = 1.0
            parts.append(out)
        return np.hstack(parts) if parts else np.zeros((n, 0))


@dataclass(frozen=True)
class CompiledPreprocessor:
    derive: Callable[[Columns], Columns] | None  # the leading FunctionTransformer's function, if any
    blocks: list[NumericBlock | OneHotBlock]

    def transform(self, data: Columns) -> np.ndarray:
        if self.derive is not None:
            data = self.derive(data)
        return np.hstack([block.apply(data) for block in self.blocks])


def compile_preprocessor(pipeline: Any) -> CompiledPreprocessor:
    """``Pipeline([FunctionTransformer(f)?, ColumnTransformer([...])])`` as array operations, where each
    column group is ``SimpleImputer -> [FunctionTransformer(np.log1p)] -> StandardScaler`` or
    ``SimpleImputer -> OneHotEncoder(handle_unknown="ignore")``. Raises UnknownStepError otherwise."""
    steps = [step for _, step in _steps(pipeline)]
    derive = None
    if steps and _name(steps[0]) == "FunctionTransformer":
        first = steps.pop(0)
        if first.inverse_func is not None or first.kw_args:
            raise UnknownStepError("a FunctionTransformer with arguments or an inverse")
        derive = first.func
    if len(steps) != 1 or _name(steps[0]) != "ColumnTransformer":
        raise UnknownStepError(f"steps {[_name(s) for s in steps]} where one ColumnTransformer was expected")
    columns = steps[0]
    if columns.remainder != "drop" and any(name == "remainder" for name, *_ in columns.transformers_):
        raise UnknownStepError("a ColumnTransformer that passes other columns through")
    blocks = []
    for name, group, selected in columns.transformers_:
        if name == "remainder" or group == "drop":
            continue
        blocks.append(_block(name, [str(c) for c in selected], [step for _, step in _steps(group)]))
    return CompiledPreprocessor(derive, blocks)


def _block(name: str, columns: list[str], steps: list[Any]) -> NumericBlock | OneHotBlock:
    kinds = [_name(step) for step in steps]
    if not kinds or kinds[0] != "SimpleImputer" or getattr(steps[0], "add_indicator", False):
        raise UnknownStepError(f"column group {name!r} is {kinds}, not an imputer first")
    fill = list(steps[0].statistics_)
    if len(fill) != len(columns):
        raise UnknownStepError(f"column group {name!r}: {len(fill)} fill values for {len(columns)} columns")
    if kinds[1:] == ["OneHotEncoder"]:
        encoder = steps[1]
        if encoder.handle_unknown != "ignore" or encoder.drop_idx_ is not None or _grouped(encoder):
            raise UnknownStepError(f"column group {name!r}: a OneHotEncoder other than handle_unknown='ignore'")
        categories = [{value: i for i, value in enumerate(cats.tolist())} for cats in encoder.categories_]
        return OneHotBlock(columns, fill, categories)
    log1p = kinds[1:] == ["FunctionTransformer", "StandardScaler"]
    if not (log1p or kinds[1:] == ["StandardScaler"]):
        raise UnknownStepError(f"column group {name!r} is {kinds}, which this module does not compile")
    if log1p and (steps[1].func is not np.log1p or steps[1].kw_args):
        raise UnknownStepError(f"column group {name!r}: a FunctionTransformer other than np.log1p")
    scaler = steps[-1]
    mean = scaler.mean_ if scaler.with_mean else np.zeros(len(columns))
    scale = scaler.scale_ if scaler.with_std else np.ones(len(columns))
    # scikit-learn imputes 0 in a column that was empty at fit time (keep_empty_features): its statistic is NaN
    return NumericBlock(
        columns,
        np.nan_to_num(np.asarray(fill, np.float64)),
        log1p,
        np.asarray(mean, np.float64),
        np.asarray(scale, np.float64),
    )


def _steps(estimator: Any) -> list[tuple[str, Any]]:
    if _name(estimator) != "Pipeline":
        raise UnknownStepError(f"a {_name(estimator)} where a Pipeline was expected")
    return list(estimator.steps)


def _grouped(encoder: Any) -> bool:  # infrequent categories merged into one column
    return getattr(encoder, "max_categories", None) is not None or getattr(encoder, "min_frequency", None) is not None


def _name(step: Any) -> str:
    return type(step).__name__
