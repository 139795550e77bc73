"""The reference profile a new version carries, ``profile.json``: how its inputs and answers are spread over
bins on reference rows, as the server will see them for traffic like the training data (raw values, as the
API receives them, before any scaling or encoding). The server compares its recent traffic with it
(service/runtime/drift.py, which also owns the format and the binning, so both sides count alike).

Per feature: a number with more than FEW_VALUES distinct values gets up to ten quantile bins (edges at the
reference's deciles, each a value of the reference, repeated edges merged), a number with fewer (a 0/1 flag,
a count of cores) and a text column one slot per value seen; each also has a slot for values the reference
never had (missing for numbers, "other" for categories). The answers are the feature ``output``: a
classifier's classes, or a regression's predictions in quantile bins.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from service.runtime.drift import OUTPUT, PROFILE, Bins, Profile

BINS = 10  # quantile bins of a number: ten reference rows in a hundred each
FEW_VALUES = 10  # a number with at most this many distinct values is profiled as categories


def bins_of(name: str, values: Any, classes: Sequence[Any] | None = None) -> Bins:
    """The bins of one feature, with the share of ``values`` in each: ``classes`` (a classifier's answers)
    as categories, else categories or quantile bins as the values call for."""
    column = pd.Series(values)
    if classes is not None:
        bins = Bins.categorical(name, [plain(c) for c in classes])
    elif pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        numbers = column.to_numpy(np.float64)
        known = numbers[~np.isnan(numbers)]
        distinct = np.unique(known)
        if len(distinct) <= FEW_VALUES:
            bins = Bins.categorical(name, [plain(v) for v in distinct] + ([None] if len(known) < len(numbers) else []))
        else:
            # deciles that are values of the reference (no edge between two neighbouring values, so no empty bin)
            deciles = np.quantile(known, np.arange(1, BINS) / BINS, method="inverted_cdf")
            bins = Bins.numeric(name, np.unique(deciles))
    else:
        values = np.array([None if v is None or v != v else str(v) for v in column], dtype=object)
        seen = sorted({v for v in values if v is not None})
        bins = Bins.categorical(name, [*seen, *([None] if any(v is None for v in values) else [])])
    return bins.counted(values if classes is None else np.asarray(values, np.float64))


def plain(value: Any) -> int | float | str:
    """A numpy scalar as the JSON number (an integer where it is one) or text it stands for."""
    if isinstance(value, str):
        return value
    number = float(value)
    return int(number) if number.is_integer() else number


def build(
    columns: Mapping[str, Any], outputs: Any, source: str, classes: Sequence[Any] | None = None
) -> dict[str, Any]:
    """The profile of the reference rows: ``columns`` (name -> raw values, one per row) and the model's
    ``outputs`` on them (``classes``: the classifier's class values; None: a number, binned by quantiles)."""
    if OUTPUT in columns:
        raise ValueError(f"an input feature may not be called {OUTPUT!r}: the answers are profiled under that name")
    rows = {len(values) for values in columns.values()} | {len(outputs)}
    if len(rows) != 1:
        raise ValueError(f"every column and the outputs need one value per reference row, not {sorted(rows)}")
    features = [bins_of(name, values) for name, values in columns.items()]
    features.append(bins_of(OUTPUT, outputs, classes))
    return Profile(tuple(features), rows.pop(), source).to_json()


def write(
    folder: Path, columns: Mapping[str, Any], outputs: Any, source: str, classes: Sequence[Any] | None = None
) -> Path:
    """Write ``profile.json`` into a version's folder (before its manifest, which hashes it)."""
    profile = build(columns, outputs, source, classes)
    Profile.from_json(profile)  # what the server will read: refused here rather than there
    path = folder / PROFILE
    path.write_text(json.dumps(profile, indent=1) + "\n")
    return path
