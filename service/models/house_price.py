"""Ames house sale price from the 79 Kaggle features: preprocessor + lasso/MLP-ensemble net on log price,
with a 90 % prediction interval.

The input schema is built from the artifact's ``features.json`` (names, kinds, descriptions, the categories
the model was trained on, accepted alternative spellings, documented codes it never saw), which
``python -m training house-price`` writes from the dataset's ``data_description.txt`` and ``train.csv``:
the schema and the weights come from the same, hash-checked folder.
"""

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Annotated, Any, ClassVar, Literal, overload

import numpy as np
import pandas as pd
import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    create_model,
    model_validator,
)

from service.artifacts import Artifact, ArtifactError
from service.models.base import JsonInt, StrictInput, json_number
from service.models.compiled import Columns, UnknownStepError, compile_preprocessor
from service.models.tabular import TabularPredictor
from service.nets import house_net

FEATURE_TABLE = "features.json"  # in the artifact: [{"name", "kind", "description", "categories"?, ...}, ...]

# Sensible bounds for numeric fields: physical limits, not the training range, so unusual but real
# houses are still accepted.
_YEARS = (1800, 2100)
_BOUNDS = {
    "OverallQual": (1, 10),
    "OverallCond": (1, 10),
    "MoSold": (1, 12),
    "YrSold": _YEARS,
    "YearBuilt": _YEARS,
    "YearRemodAdd": _YEARS,
    "GarageYrBlt": _YEARS,
}
_COUNTS = {
    "BsmtFullBath",
    "BsmtHalfBath",
    "FullBath",
    "HalfBath",
    "BedroomAbvGr",
    "KitchenAbvGr",
    "TotRmsAbvGrd",
    "Fireplaces",
    "GarageCars",
}


def _canonical(feature: dict[str, Any]):
    """A before-validator mapping data_description.txt's spellings to the trained ones ("Names" to "NAmes").
    Only these exact spellings: anything else must match the enum, so the schema still says what is refused
    (fuzzers check that it is)."""
    aliases = feature["aliases"]

    def canonical(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return value
        return aliases.get(value, value)

    return canonical


def _accepted_spellings(feature: dict[str, Any]) -> str:
    aliases = ", ".join(f"{alias!r} for {code!r}" for alias, code in feature["aliases"].items())
    unseen = ", ".join(repr(code) for code in feature["unseen"])
    return (f" Also accepted, as data_description.txt spells them: {aliases}." if aliases else "") + (
        f" Documented, but no training house had them: {unseen}; such a value is priced as if it were missing, "
        "the answer says so in `warnings` and its interval is wider."
        if unseen
        else ""
    )


def _field_for(feature: dict[str, Any]) -> tuple[Any, Any]:
    name, description = feature["name"], feature["description"]
    if feature["kind"] == "categorical":
        # the artifact's categories, then the documented codes no training house had (priced as missing)
        values = Literal[tuple([*feature["categories"], *feature["unseen"]])]  # type: ignore[valid-type]
        return (
            Annotated[values | None, BeforeValidator(_canonical(feature))],
            Field(None, alias=name, description=description + _accepted_spellings(feature)),
        )
    low, high = _BOUNDS.get(name, (0, 100 if name in _COUNTS else 10_000_000))
    # bounds before the number check, inside the Optional, so the schema shows minimum/maximum
    bounded = Annotated[float, Field(ge=low, le=high), BeforeValidator(json_number)]
    return bounded | None, Field(None, alias=name, description=f"{description} (range {low}-{high})")


class _HouseBase(StrictInput):
    model_config = ConfigDict(allow_inf_nan=False, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _na_means_missing(cls, data: Any) -> Any:
        """The dataset writes missing values as "NA"; accept that spelling as null."""
        if isinstance(data, dict):
            return {key: (None if value == "NA" else value) for key, value in data.items()}
        return data


def house_schema(features: list[dict[str, Any]]) -> type[BaseModel]:
    """The input model for a feature table: every feature optional, categories as enums, unknown keys refused."""
    fields: dict[str, Any] = {
        "Id": (JsonInt | None, Field(None, description="Optional row id, as in the Kaggle files; ignored.")),
        **{f"f_{f['name']}": _field_for(f) for f in features},
    }
    return create_model(
        "House",
        __base__=_HouseBase,
        __doc__="One house, keyed by the Kaggle column names. Every feature is optional: a missing or null "
        '(or "NA") value is imputed exactly as in training. Categorical values must be one of the codes '
        "data_description.txt documents (its spellings are accepted too); a code no training house had is "
        "priced as if it were missing, with a warning and a wider interval.",
        **fields,
    )


class HouseWithoutTable(_HouseBase):
    """Any object: the artifact's feature table could not be read, so the model is not served (503)."""

    model_config = ConfigDict(extra="allow")


PRICE_RANGE = (1_000.0, 100_000_000.0)
Price = Annotated[float, Field(ge=PRICE_RANGE[0], le=PRICE_RANGE[1])]


class HousePrediction(BaseModel):
    sale_price: Price = Field(
        examples=[208500.0],
        description="Predicted sale price, US dollars (capped to 1,000-100,000,000 for inputs "
        "far outside the training data).",
    )
    interval_90: list[Price] = Field(
        min_length=2,
        max_length=2,
        examples=[[178600.0, 243400.0]],
        description="90 % prediction interval [low, high] for the sale price, US dollars: the prediction times "
        "exp(-q) and exp(+q), where q is the split-conformal 90 % quantile of the absolute log-price "
        "errors on houses the net was not trained on (out-of-fold). Under repeated cross-validation "
        "about 90 % of sales fell inside; the artifact's metrics give the measured coverage and width. "
        "Each field priced as missing (see `warnings`) widens it by an amount measured the same way.",
    )
    warnings: list[str] = Field(
        [],
        description="What was done to price this house that the caller should know: each documented code no "
        "training house had, priced as if the field were missing.",
        examples=[["Condition2: 'PosN' is documented, but no training house had it: priced as if missing"]],
    )


def _number(value: Any) -> float:
    return np.nan if value is None else float(value)


def _category(value: Any) -> Any:
    """A category code as a string: 60, 60.0 and "60" are the same MSSubClass; None/NaN stay missing."""
    if value is None or value != value:
        return np.nan
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def to_frame(rows: list[dict[str, Any]] | pd.DataFrame, features: list[dict[str, Any]]) -> pd.DataFrame:
    """The feature columns with the dtypes the preprocessor expects (categoricals as strings).

    Values are normalised per row in plain Python and the frame is built once (per-column pandas
    operations cost ~20 ms even for a single row), with object dtype so one row's null never turns
    another row's integer code into a float.
    """
    dicts: Sequence[Mapping[Any, Any]] = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else rows
    columns = [f["name"] for f in features]
    categorical = {f["name"] for f in features if f["kind"] == "categorical"}
    numeric = [c for c in columns if c not in categorical]
    records = [[_category(row.get(c)) if c in categorical else _number(row.get(c)) for c in columns] for row in dicts]
    return pd.DataFrame(records, columns=columns, dtype=object).astype(dict.fromkeys(numeric, np.float64))


_QUALITY = {"Po": 1, "Fa": 2, "TA": 3, "Gd": 4, "Ex": 5}
_FINISH = {"Unf": 1, "LwQ": 2, "Rec": 3, "BLQ": 4, "ALQ": 5, "GLQ": 6}
# Ordered categories also given as numbers, so a linear path sees "better is pricier" in one coefficient.
ORDINALS = {
    **dict.fromkeys(
        [
            "ExterQual",
            "ExterCond",
            "BsmtQual",
            "BsmtCond",
            "HeatingQC",
            "KitchenQual",
            "FireplaceQu",
            "GarageQual",
            "GarageCond",
            "PoolQC",
        ],
        _QUALITY,
    ),
    "BsmtExposure": {"No": 1, "Mn": 2, "Av": 3, "Gd": 4},
    "BsmtFinType1": _FINISH,
    "BsmtFinType2": _FINISH,
    "GarageFinish": {"Unf": 1, "RFn": 2, "Fin": 3},
    "Functional": {"Sal": 0, "Sev": 1, "Maj2": 2, "Maj1": 3, "Mod": 4, "Min2": 5, "Min1": 6, "Typ": 7},
}
_PORCHES = ["OpenPorchSF", "EnclosedPorch", "3SsnPorch", "ScreenPorch", "WoodDeckSF"]


@overload
def engineer(frame: pd.DataFrame) -> pd.DataFrame: ...
@overload
def engineer(frame: Columns) -> Columns: ...
def engineer(frame: pd.DataFrame | Columns) -> pd.DataFrame | Columns:
    """The 79 columns plus derived ones: total floor area, bathrooms and porch area, age and years since
    remodelling at sale, and the ordered categories as numbers. A sum over a missing part is missing (then
    imputed); a missing ordered category stays missing for the preprocessor to treat like its category.

    The fitted preprocessor starts with this function, so training and the service derive the columns
    with the same code from the same validated input. It takes a DataFrame (training, scikit-learn) or
    columns of numpy arrays (the service's compiled preprocessor), with the same arithmetic on both."""
    porches = frame[_PORCHES[0]]
    for name in _PORCHES[1:]:
        porches = porches + frame[name]  # NaN in any part stays NaN
    derived: dict[str, Any] = {  # Series from a DataFrame, arrays from Columns
        "TotalSF": frame["TotalBsmtSF"] + frame["1stFlrSF"] + frame["2ndFlrSF"],
        "TotalBath": frame["FullBath"] + frame["BsmtFullBath"] + 0.5 * (frame["HalfBath"] + frame["BsmtHalfBath"]),
        "PorchSF": porches,
        "AgeAtSale": np.maximum(frame["YrSold"] - frame["YearBuilt"], 0),  # NaN stays NaN
        "YearsSinceRemodel": np.maximum(frame["YrSold"] - frame["YearRemodAdd"], 0),
        **{f"{name}Rank": _rank(frame[name], ranks) for name, ranks in ORDINALS.items()},
    }
    if isinstance(frame, pd.DataFrame):
        return pd.concat([frame, pd.DataFrame(derived, index=frame.index)], axis=1)
    return {**frame, **derived}


def _rank(values: pd.Series | np.ndarray, ranks: dict[str, int]) -> pd.Series | np.ndarray:
    if isinstance(values, pd.Series):
        return values.map(ranks).astype(np.float64)
    return np.array([ranks.get(v, np.nan) for v in values], np.float64)


def to_columns(rows: list[dict[str, Any]], features: list[dict[str, Any]]) -> Columns:
    """The feature columns as numpy arrays, normalised as ``to_frame`` does, for the compiled preprocessor."""
    return {
        f["name"]: (
            np.array([_category(row.get(f["name"])) for row in rows], dtype=object)
            if f["kind"] == "categorical"
            else np.array([_number(row.get(f["name"])) for row in rows], dtype=np.float64)
        )
        for f in features
    }


class HousePrice(TabularPredictor):
    net_module: ClassVar[ModuleType] = house_net
    Input = HouseWithoutTable  # replaced by the artifact's own schema (input_schema)
    Output = HousePrediction
    example = {
        "MSSubClass": 60,
        "MSZoning": "RL",
        "LotFrontage": 65,
        "LotArea": 8450,
        "Street": "Pave",
        "LotShape": "Reg",
        "Neighborhood": "CollgCr",
        "BldgType": "1Fam",
        "HouseStyle": "2Story",
        "OverallQual": 7,
        "OverallCond": 5,
        "YearBuilt": 2003,
        "YearRemodAdd": 2003,
        "ExterQual": "Gd",
        "TotalBsmtSF": 856,
        "1stFlrSF": 856,
        "2ndFlrSF": 854,
        "GrLivArea": 1710,
        "FullBath": 2,
        "HalfBath": 1,
        "BedroomAbvGr": 3,
        "KitchenQual": "Gd",
        "GarageCars": 2,
        "GarageArea": 548,
        "YrSold": 2008,
        "SaleCondition": "Normal",
    }
    summary = "Predict an Ames house's sale price, with a 90 % interval, from the Kaggle features"
    v2_hidden = ("Id",)
    description = (
        "Lasso path blended with an MLP ensemble on log price, over imputed, scaled and one-hot "
        "encoded Ames features plus derived ones (total area, age, bathrooms); the interval is "
        "split-conformal on out-of-fold errors."
    )

    @classmethod
    def input_schema(cls, artifact: Artifact) -> type[BaseModel]:
        return house_schema(artifact.load_json(FEATURE_TABLE))

    def setup(self, artifact: Artifact, device: torch.device) -> None:
        super().setup(artifact, device)
        self.features = artifact.load_json(FEATURE_TABLE)
        try:  # scikit-learn's transform took ~14 ms for one row; the same numbers as arrays take well under 1
            self.compiled = compile_preprocessor(self.preprocessor)
        except UnknownStepError as exc:
            raise ArtifactError(
                f"{self.preprocessor_file} cannot be served: it holds {exc}; the service compiles "
                "only the steps training writes (see service/models/compiled.py)"
            ) from None
        hp = artifact.manifest.hyperparameters
        self.interval_log_halfwidth = float(hp["interval_90_log_halfwidth"])
        # How much wider a field priced as missing makes the interval, measured under CV by training; a version
        # trained before that widens by its whole half-width per such field (the interval's width doubles).
        self.unseen_log_widening = float(hp.get("interval_90_unseen_extra_log", self.interval_log_halfwidth))
        self.unseen = {f["name"]: set(f["unseen"]) for f in self.features if f.get("unseen")}

    def unseen_codes(self, house: BaseModel) -> dict[str, Any]:
        """The house's documented codes that no training house had, by field (read off the few fields that
        have such codes, not a dump of all 79)."""
        values = {name: getattr(house, f"f_{name}", None) for name in self.unseen}
        return {name: value for name, value in values.items() if value in self.unseen[name]}

    def to_table(self, batch: list[BaseModel]) -> Columns:
        rows = [house.model_dump(by_alias=True, exclude={"Id"}) for house in batch]
        for row, house in zip(rows, batch):  # a documented code no training house had: imputed like a missing value
            for name in self.unseen_codes(house):
                row[name] = None
        return to_columns(rows, self.features)

    def transform(self, table: Columns) -> np.ndarray:
        return self.compiled.transform(table)

    def raw_columns(self, table: Columns, batch: list[BaseModel]) -> dict[str, np.ndarray]:
        """The table, with each documented code no training house had as sent (the table holds it as missing;
        only its missing values of the few fields that have such codes are looked up)."""
        columns = dict(table)
        for name, unseen in self.unseen.items():
            column = table[name]
            for i in np.flatnonzero(column != column):  # NaN: missing, or such a code
                if (code := getattr(batch[i], f"f_{name}", None)) in unseen:
                    if columns[name] is column:
                        columns[name] = column.copy()
                    columns[name][i] = code
        return columns

    def answer_column(self, outputs: Sequence[Any]) -> np.ndarray:
        """The predicted sale price, dollars."""
        return np.array([getattr(out, "sale_price", np.nan) for out in outputs], np.float64)

    def from_outputs(self, outputs: np.ndarray, batch: list) -> list[HousePrediction]:
        unseen = [self.unseen_codes(house) for house in batch]
        halfwidth = self.interval_log_halfwidth + self.unseen_log_widening * np.array([len(u) for u in unseen])
        # Far outside the training range the net extrapolates without limit and exp() would overflow,
        # so the answer is capped to a documented range instead of becoming inf/null.
        log_price = outputs[:, :1].astype(np.float64) + np.stack([0 * halfwidth, -halfwidth, halfwidth], axis=1)
        price = np.round(np.exp(np.clip(log_price, *np.log(PRICE_RANGE))), 2)
        return [
            HousePrediction(
                sale_price=point,
                interval_90=[low, high],
                warnings=[
                    f"{name}: {code!r} is documented, but no training house had it: priced as if missing, "
                    "with a wider interval"
                    for name, code in codes.items()
                ],
            )
            for (point, low, high), codes in zip(price.tolist(), unseen)
        ]
