"""The v2 codec's answer tensors: numbers as numeric tensors, anything else (lists of strings, empty lists,
nested objects) as one JSON string per row, whatever the values of this batch happen to be."""

from __future__ import annotations

from pydantic import BaseModel

from service.v2.codec import output_tensors


class Answer(BaseModel):
    score: float
    probabilities: list[float]
    prediction_set: list[str]
    warnings: list[str]


def test_lists_of_strings_are_json_even_when_every_row_is_empty():
    rows = [
        Answer(score=1.0, probabilities=[0.2, 0.8], prediction_set=[], warnings=[]),
        Answer(score=2.0, probabilities=[0.6, 0.4], prediction_set=["a", "b"], warnings=[]),
    ]
    tensors = {t.name: t for t in output_tensors(rows, ["score", "probabilities", "prediction_set", "warnings"])}
    assert (tensors["score"].datatype, tensors["score"].shape) == ("FP64", [2])
    assert (tensors["probabilities"].datatype, tensors["probabilities"].shape) == ("FP64", [2, 2])
    assert tensors["prediction_set"].datatype == "BYTES" and tensors["prediction_set"].values == ["[]", '["a", "b"]']
    assert tensors["warnings"].datatype == "BYTES" and tensors["warnings"].values == ["[]", "[]"]
