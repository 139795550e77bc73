"""Check the files ``python -m training <model>`` reads before anything is fitted, so a bad file costs a few
lines naming the file, the column, the first lines and the count, not a traceback (or a model fitted to NaN)
minutes later. What a column must hold comes from the serving side: the API's schema of that field.

Light to import: ``python -m training --help`` calls ``expected``; pandas and the trainers' own readers load
only when a check runs.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service import catalog
from service.settings import PROJECT_ROOT

DATA_DIR_ENV = "DATA_DIR"


def default_data_dir() -> Path:
    """``$DATA_DIR`` if set, else ``../shared/data`` beside the project checkout."""
    return Path(os.environ.get(DATA_DIR_ENV) or PROJECT_ROOT.parent / "shared" / "data")


if TYPE_CHECKING:
    import pandas as pd
    from pydantic import BaseModel

SHOWN = 5  # lines listed in one problem, then "and N more"
PHONE_MIN_ROWS = 50  # 5-fold stratified CV over 4 bands: 10 validation rows a fold, about 2 of each band
POEM_MIN = 20  # the 5 % validation split then holds a whole poem and leaves 19 to train on
IDX_MAGIC = {"images": 2051, "labels": 2049}  # big-endian: 0x08 = unsigned bytes, low byte = rank
FASHION = {"images": "train-images-idx3-ubyte.gz", "labels": "train-labels-idx1-ubyte.gz"}  # as training/fashion.py


class DataError(Exception):
    """Problems found in the training data; str() is the report: one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def check(model: str, data_dir: Path, quick: bool = False) -> list[str]:
    """Check the files ``python -m training <model>`` would read from ``data_dir``. Raise DataError listing every
    problem; return notes to print when there is none (a missing file: FileNotFoundError, as training raises)."""
    name = catalog.get(model).name  # a KeyError naming the known models
    checker = {"phone-price": _phone, "house-price": _house, "fashion": _fashion, "poem": _poem}.get(name)
    if checker is None:  # a model added to the catalog (README, "Adding a model") checks its own data
        return [f"no data checks for {name} in training/datacheck.py: its trainer reads the files as they are"]
    problems, notes = checker(Path(data_dir), quick)
    if problems:
        raise DataError(problems)
    return notes


def expected(model: str) -> str:
    """A few lines for ``--help``: the files under the data folder the model reads and what they must hold."""
    name = catalog.get(model).name
    if name == "phone-price":
        from service.models.phone_price import FEATURES, LABELS, Phone

        ranges = ", ".join(f"{c} {_g(lo)}-{_g(hi)}" for c, (_, lo, hi) in _fields(Phone).items() if c in FEATURES)
        return "\n".join(
            [
                f"phone_price/train.csv: CSV, a header line, then at least {PHONE_MIN_ROWS} rows, one phone each;",
                *textwrap.wrap(f"every value of the API's features, in its ranges: {ranges};", 100),
                f"price_range, a whole number 0-{len(LABELS) - 1}, every band present; an id column may be there",
            ]
        )
    if name == "house-price":
        return (
            "house_prices/train.csv: CSV with Id, SalePrice (dollars, within the API's price range) and the 79\n"
            "features data_description.txt documents, no other column; numbers where it lists no text codes, in\n"
            "the API's ranges; only NA marks a missing value (imputed), a blank cell is text; at least 300 rows\n"
            "house_prices/data_description.txt: Kaggle's description of those features and their codes"
        )
    if name == "fashion":
        from service.nets.fashion_cnn import NAMES, SIDE

        return (
            f"fashion_mnist/{FASHION['images']}: gzipped IDX (magic {IDX_MAGIC['images']}), N {SIDE}x{SIDE} images\n"
            f"fashion_mnist/{FASHION['labels']}: gzipped IDX (magic {IDX_MAGIC['labels']}), the N labels "
            f"0-{len(NAMES) - 1}, every class present"
        )
    if name == "poem":
        return f"poems/poems.txt (poems_small.txt with --quick): UTF-8 text, one poem a line, at least {POEM_MIN} poems"
    return f"the files training/{catalog.get(model).folder}.py reads (no data checks for it yet)"


def _path(data_dir: Path, folder: str, name: str) -> Path:
    path = data_dir / folder / name
    if not path.is_file():
        from training.common import Options  # its FileNotFoundError, word for word (torch loads on this path only)

        Options(data_dir=data_dir).data_file(folder, name)
    return path


def _g(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else _g(value)
    return text if len(text) <= 20 else text[:17] + "..."


def _names(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _where(rows: np.ndarray, values: pd.Series | None = None) -> str:
    """'line 6 ('lots')' or 'lines 3, 5, 7, 9, 11 and 795 more': lines of the file, the header being line 1."""
    shown = [f"{i + 2}" + (f" ({_show(values.iloc[i])})" if values is not None else "") for i in rows]
    return ("line " if len(rows) == 1 else "lines ") + _names(shown)


def _rows(label: str, column: str, mask: pd.Series, what: str, values: pd.Series | None = None) -> list[str]:
    if not len(rows := np.flatnonzero(mask.to_numpy())):
        return []
    return [f"{label}: {column}: {what} in {len(rows)} of {len(mask)} rows: {_where(rows, values)}"]


def _fields(schema: type[BaseModel]) -> dict[str, tuple[str, float, float]]:
    """{field: (JSON type, minimum, maximum)} of an API schema, by alias, a null option left out."""
    fields = {}
    for name, options in schema.model_json_schema()["properties"].items():
        prop = next((p for p in options.get("anyOf", [options]) if p.get("type") != "null"), options)
        fields[name] = (prop.get("type", ""), prop.get("minimum", -math.inf), prop.get("maximum", math.inf))
    return fields


def _read(label: str, path: Path, read: Any) -> tuple[pd.DataFrame | None, list[str]]:
    import pandas as pd

    if path.stat().st_size == 0:
        return None, [f"{label}: is empty (0 bytes); expected a header line, then one row per example"]
    try:
        frame = read(path)
    except ValueError as exc:  # pandas' ParserError and EmptyDataError, UnicodeDecodeError
        return None, [f"{label}: cannot be read as CSV: {str(exc).strip().splitlines()[0][:140]}"]
    if not isinstance(frame.index, pd.RangeIndex):  # pandas took the first columns for row labels: rows too wide
        with path.open(newline="", errors="replace") as handle:
            rows = csv.reader(handle)
            width = len(next(rows))
            wide = np.array([i for i, row in enumerate(rows) if len(row) > width], dtype=int)
        return None, [f"{label}: {len(wide)} row(s) with more fields than the header line: {_where(wide)}"]
    return frame, []


def _table(
    label: str, frame: pd.DataFrame, columns: list[str], allowed: set[str], numeric: dict, unknown: str
) -> tuple[list[str], dict[str, pd.Series]]:
    """Missing ``columns``, unknown ones (neither those nor ``allowed``), values of ``numeric`` columns
    (``{column: (JSON type, minimum, maximum)}``) that are text, fractions where the API takes whole numbers, or
    out of its range. Returns the problems and those columns as numbers (NaN where not one)."""
    import pandas as pd

    problems = []
    if missing := [c for c in columns if c not in frame]:
        problems.append(f"{label}: missing column{'s' * (len(missing) > 1)}: {_names(missing)}")
    if extra := [str(c) for c in frame if c not in columns and c not in allowed]:
        problems.append(f"{label}: unknown column{'s' * (len(extra) > 1)} {_names(extra)} ({unknown})")
    numbers = {}
    for column, (kind, low, high) in numeric.items():
        if column in frame:
            values = frame[column]
            numbers[column] = number = pd.to_numeric(values, errors="coerce")
            problems += _rows(label, column, values.notna() & number.isna(), "not a number", values)
            if kind == "integer":
                problems += _rows(label, column, number.notna() & (number % 1 != 0), "not a whole number", values)
            problems += _rows(label, column, (number < low) | (number > high), f"outside {_g(low)}-{_g(high)}", values)
    return problems, numbers


def _phone(data_dir: Path, quick: bool) -> tuple[list[str], list[str]]:
    import pandas as pd

    from service.models.phone_price import FEATURES, LABELS, Phone, PhonePrediction

    label = "phone_price/train.csv"
    frame, problems = _read(label, _path(data_dir, "phone_price", "train.csv"), pd.read_csv)  # as training reads it
    if frame is None:
        return problems, []
    if len(frame) < PHONE_MIN_ROWS:
        problems.append(
            f"{label}: {len(frame)} data rows{' (header only)' if frame.empty else ''}; training needs at least "
            f"{PHONE_MIN_ROWS} (5-fold stratified CV)"
        )
    fields = _fields(Phone) | {"price_range": _fields(PhonePrediction)["price_range"]}
    columns = [*FEATURES, "price_range"]
    more, numbers = _table(label, frame, columns, {"id"}, fields, "training reads the API's features and price_range")
    problems += more
    if frame.empty:
        return problems, []
    for column in [c for c in columns if c in frame]:
        why = "every row needs its band" if column == "price_range" else "the API requires every feature"
        problems += [f"{p}; {why}" for p in _rows(label, column, frame[column].isna(), "no value")]
    if "price_range" in numbers:
        present = set(numbers["price_range"].dropna())
        absent = [f"{k} ({name})" for k, name in enumerate(LABELS) if k not in present]
        if absent:
            problems.append(f"{label}: price_range: no row of class {_names(absent)}; every band needs rows")
    return problems, []


def _house(data_dir: Path, quick: bool) -> tuple[list[str], list[str]]:
    import training.house_price as trainer  # read and parsed as training does (torch and scikit-learn load here)
    from service.models.house_price import PRICE_RANGE, house_schema

    label = "house_prices/train.csv"
    described = trainer.described_codes(_path(data_dir, "house_prices", "data_description.txt"))
    frame, problems = _read(label, _path(data_dir, "house_prices", "train.csv"), trainer.read_frame)
    if frame is None:
        return problems, []
    # numbers: the features documented without codes or with numbers for codes (OverallQual), as training finds
    # them in the real data; MSSubClass's numbers are codes (training makes it categorical by name)
    numeric = [c for c, d in described.items() if c != "MSSubClass" and all(k.isdigit() for k in d["codes"])]
    schema = house_schema([{"name": c, "kind": "numeric", "description": ""} for c in numeric])
    fields = _fields(schema) | {"MSSubClass": ("integer", -math.inf, math.inf), "SalePrice": ("number", *PRICE_RANGE)}
    fields.pop("Id")  # required (training drops it by name), its values unused
    columns = ["Id", *described, "SalePrice"]
    more, _ = _table(label, frame, columns, set(), fields, "training stops on any not in data_description.txt")
    problems += more
    if len(frame) < trainer.QUICK["rows"]:  # --quick samples that many rows; fewer is no model to speak of
        problems.append(f"{label}: {len(frame)} data rows; training needs at least {trainer.QUICK['rows']}")
    if frame.empty:
        return problems, []
    median: list[str] = []  # make_preprocessor: a number gets the column's median, a category "absent" of its own
    absent: list[str] = []
    for column in [c for c in [*described, "SalePrice"] if c in frame]:
        missing = frame[column].isna()
        if column == "SalePrice" or missing.all():  # the target, or a column with nothing to learn or impute from
            problems += _rows(label, column, missing, "no value")
        elif missing.any():
            (median if column in numeric else absent).append(f"{column} ({missing.sum()})")
    notes = [f"{label}: missing numbers, imputed with the column's median: {_names(median)}"] if median else []
    notes += [f"{label}: missing categories, kept as a category of their own: {_names(absent)}"] if absent else []
    for column in [c for c in described if c in frame and c not in numeric and c != "MSSubClass"]:
        documented: list[str | int] = [code for code in described[column]["codes"] if code != "NA"]
        trained: list[str | int] = sorted({str(v) for v in frame[column].dropna()})
        pairs = trainer.spelling_pairs(documented, trained)  # training takes these for the documented codes
        odd = [repr(v) for v in trained if v not in documented and v not in pairs.values()]
        if odd:
            notes.append(f"{label}: {column}: {_names(odd)} not in data_description.txt: trained as categories")
    return problems, notes


def _idx(label: str, path: Path, kind: str, problems: list[str]) -> np.ndarray | None:
    """The IDX file as a uint8 array, or None after adding what is wrong with it to ``problems``."""
    magic, rank = IDX_MAGIC[kind], IDX_MAGIC[kind] & 0xFF
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:  # not gzip, or cut short
        problems.append(f"{label}: not a whole gzip file: {exc}")
        return None
    found = int.from_bytes(data[:4], "big")
    if len(data) < 4 + 4 * rank or found != magic:
        problems.append(f"{label}: starts with magic number {found}, expected {magic} (IDX {kind})")
        return None
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
    values = np.frombuffer(data, np.uint8, offset=4 + 4 * rank)
    if values.size != math.prod(dims):
        problems.append(f"{label}: holds {values.size} values, but its header says {'x'.join(map(str, dims))}")
        return None
    return values.reshape(dims)


def _fashion(data_dir: Path, quick: bool) -> tuple[list[str], list[str]]:
    from service.nets.fashion_cnn import NAMES, SIDE

    problems: list[str] = []
    found = {
        k: _idx(f"fashion_mnist/{f}", _path(data_dir, "fashion_mnist", f), k, problems) for k, f in FASHION.items()
    }
    images, labels = found["images"], found["labels"]
    if images is not None and images.shape[1:] != (SIDE, SIDE):
        problems.append(f"fashion_mnist/{FASHION['images']}: images of {images.shape[1:]} pixels, not {SIDE}x{SIDE}")
    if images is not None and labels is not None and len(images) != len(labels):
        problems.append(f"fashion_mnist: {len(images)} images but {len(labels)} labels")
    if labels is not None:
        label = f"fashion_mnist/{FASHION['labels']}"
        bad = np.flatnonzero(labels >= len(NAMES))
        if len(bad):
            problems.append(
                f"{label}: {len(bad)} labels outside 0-{len(NAMES) - 1}: items {_names([str(i + 1) for i in bad])}"
            )
        counts = np.bincount(labels, minlength=len(NAMES))
        few = [f"{k} {name} ({counts[k]})" for k, name in enumerate(NAMES) if counts[k] < 2]
        if few:  # the stratified validation split needs two of each
            problems.append(f"{label}: classes with fewer than 2 images: {_names(few)}")
        if quick:
            from training.fashion import QUICK_IMAGES  # --quick takes that many, stratified, and validates on the rest

            if len(labels) < QUICK_IMAGES + len(NAMES):
                problems.append(f"{label}: {len(labels)} images; --quick needs at least {QUICK_IMAGES + len(NAMES)}")
    return problems, []


def _poem(data_dir: Path, quick: bool) -> tuple[list[str], list[str]]:
    name = "poems_small.txt" if quick else "poems.txt"  # as training/poem.py reads them
    label, data = f"poems/{name}", _path(data_dir, "poems", name).read_bytes()
    if not data:
        return [f"{label}: is empty (0 bytes); expected one poem a line"], []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return [f"{label}: not UTF-8 text: line {line} (byte {exc.start}: {data[exc.start : exc.start + 4]!r})"], []
    poems = [line for line in text.splitlines() if line]
    if len(poems) < POEM_MIN:
        return [f"{label}: {len(poems)} poems (non-empty lines); training needs at least {POEM_MIN}"], []
    return [], []
