"""Ames house sale price from the 79 Kaggle features: ColumnTransformer + MLP regressor on log price.

The input schema is built from the artifact's ``features.json`` (names, kinds, descriptions, allowed
categories), which ``python -m training house-price`` writes from the dataset's ``data_description.txt``
and ``train.csv``: the schema and the weights come from the same, hash-checked folder.
"""

from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

from service.artifacts import Artifact
from service.models.base import JsonInt, json_number
from service.models.tabular import TabularPredictor

FEATURE_TABLE = "features.json"  # in the artifact: [{"name", "kind", "description", "categories"?}, ...]

# Sensible bounds for numeric fields: physical limits, not the training range, so unusual but real
# houses are still accepted.
_YEARS = (1800, 2100)
_BOUNDS = {"OverallQual": (1, 10), "OverallCond": (1, 10), "MoSold": (1, 12), "YrSold": _YEARS,
           "YearBuilt": _YEARS, "YearRemodAdd": _YEARS, "GarageYrBlt": _YEARS}
_COUNTS = {"BsmtFullBath", "BsmtHalfBath", "FullBath", "HalfBath", "BedroomAbvGr", "KitchenAbvGr",
           "TotRmsAbvGrd", "Fireplaces", "GarageCars"}


def _field_for(feature: dict[str, Any]) -> tuple[Any, Any]:
    name, description = feature["name"], feature["description"]
    if feature["kind"] == "categorical":
        values = tuple(feature["categories"])
        return Literal[values] | None, Field(None, alias=name, description=description)  # type: ignore[valid-type]
    low, high = _BOUNDS.get(name, (0, 100 if name in _COUNTS else 10_000_000))
    # bounds before the number check, inside the Optional, so the schema shows minimum/maximum
    bounded = Annotated[float, Field(ge=low, le=high), BeforeValidator(json_number)]
    return bounded | None, Field(None, alias=name, description=f"{description} (range {low}-{high})")


class _HouseBase(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _na_means_missing(cls, data: Any) -> Any:
        """The dataset writes missing values as "NA"; accept that spelling as null."""
        if isinstance(data, dict):
            return {key: (None if value == "NA" else value) for key, value in data.items()}
        return data


def house_schema(features: list[dict[str, Any]]) -> type[BaseModel]:
    """The input model for a feature table: every feature optional, categories as enums, unknown keys refused."""
    return create_model(
        "House",
        __base__=_HouseBase,
        __doc__="One house, keyed by the Kaggle column names. Every feature is optional: a missing or null "
                "(or \"NA\") value is imputed exactly as in training. Categorical values must be one of the "
                "codes in data_description.txt.",
        Id=(JsonInt | None, Field(None, description="Optional row id, as in the Kaggle files; ignored.")),
        **{f"f_{f['name']}": _field_for(f) for f in features},
    )


class HouseWithoutTable(_HouseBase):
    """Any object: the artifact's feature table could not be read, so the model is not served (503)."""

    model_config = ConfigDict(extra="allow")


PRICE_RANGE = (1_000.0, 100_000_000.0)


class HousePrediction(BaseModel):
    sale_price: float = Field(ge=PRICE_RANGE[0], le=PRICE_RANGE[1], examples=[208500.0],
                              description="Predicted sale price, US dollars (capped to 1,000-100,000,000 for inputs "
                                          "far outside the training data).")


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
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict("records")
    columns = [f["name"] for f in features]
    categorical = {f["name"] for f in features if f["kind"] == "categorical"}
    numeric = [c for c in columns if c not in categorical]
    records = [[_category(row.get(c)) if c in categorical else _number(row.get(c)) for c in columns] for row in rows]
    return pd.DataFrame(records, columns=columns, dtype=object).astype(dict.fromkeys(numeric, np.float64))


class HousePrice(TabularPredictor):
    Input = HouseWithoutTable  # replaced by the artifact's own schema (input_schema)
    Output = HousePrediction
    example = {"MSSubClass": 60, "MSZoning": "RL", "LotFrontage": 65, "LotArea": 8450, "Street": "Pave",
               "LotShape": "Reg", "Neighborhood": "CollgCr", "BldgType": "1Fam", "HouseStyle": "2Story",
               "OverallQual": 7, "OverallCond": 5, "YearBuilt": 2003, "YearRemodAdd": 2003, "ExterQual": "Gd",
               "TotalBsmtSF": 856, "1stFlrSF": 856, "2ndFlrSF": 854, "GrLivArea": 1710, "FullBath": 2,
               "HalfBath": 1, "BedroomAbvGr": 3, "KitchenQual": "Gd", "GarageCars": 2, "GarageArea": 548,
               "YrSold": 2008, "SaleCondition": "Normal"}
    summary = "Predict an Ames house's sale price from the Kaggle features"
    description = "MLP regressor on log price over imputed, scaled and one-hot encoded Ames features."

    @classmethod
    def input_schema(cls, artifact: Artifact) -> type[BaseModel]:
        return house_schema(artifact.load_json(FEATURE_TABLE))

    def setup(self, artifact: Artifact, device) -> None:
        super().setup(artifact, device)
        self.features = artifact.load_json(FEATURE_TABLE)

    def to_table(self, batch: list[BaseModel]) -> pd.DataFrame:
        return to_frame([house.model_dump(by_alias=True, exclude={"Id"}) for house in batch], self.features)

    def from_outputs(self, outputs: np.ndarray) -> list[HousePrediction]:
        # Far outside the training range the net extrapolates without limit and exp() would overflow,
        # so the answer is capped to a documented range instead of becoming inf/null.
        log_price = np.clip(outputs[:, 0].astype(np.float64), np.log(PRICE_RANGE[0]), np.log(PRICE_RANGE[1]))
        return [HousePrediction(sale_price=round(float(np.exp(v)), 2)) for v in log_price]
