"""Iris species from four flower measurements: the toy fifth model that tests/e2e/test_adding_a_model.py adds
to a copy of the project, by exactly the README's steps. It is copied to service/models/iris.py there."""

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from service.models.base import JsonFloat
from service.models.tabular import TabularPredictor

SPECIES = ["setosa", "versicolor", "virginica"]


def _length(what: str) -> object:
    return Field(gt=0, le=100, description=f"{what}, cm.")


class Flower(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sepal_length: JsonFloat = _length("Sepal length")
    sepal_width: JsonFloat = _length("Sepal width")
    petal_length: JsonFloat = _length("Petal length")
    petal_width: JsonFloat = _length("Petal width")


class Species(BaseModel):
    species: str = Field(description="The most likely species.")
    probabilities: list[float] = Field(description="Probability of each species, in the order of SPECIES.")


class Iris(TabularPredictor):
    Input = Flower
    Output = Species
    example = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    summary = "Predict an iris's species from its measurements"

    def to_table(self, batch: list[Flower]) -> np.ndarray:
        return np.array([[f.sepal_length, f.sepal_width, f.petal_length, f.petal_width] for f in batch])

    def from_outputs(self, outputs: np.ndarray, batch: list) -> list[Species]:
        probabilities = torch.softmax(torch.from_numpy(outputs), dim=1).numpy().astype(np.float64).round(6)
        return [Species(species=SPECIES[int(p.argmax())], probabilities=p.tolist()) for p in probabilities]
