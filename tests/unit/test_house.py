"""House price in process, on the committed artifact: spelling pairs found by rule and documented in the
artifact, enums of trained spellings only, derived columns, and the compiled preprocessor equal to
scikit-learn's (the HTTP half: tests/e2e/test_house_http.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from service.models.compiled import UnknownStepError, compile_preprocessor
from service.models.house_price import FEATURE_TABLE, engineer, to_columns, to_frame
from tests.conftest import committed, need_data
from training.house_price import same_code, spelling_pairs

# Known pairs: (feature, data_description.txt's spelling, the spelling train.csv uses)
NAMED_PAIRS = [
    ("Neighborhood", "Names", "NAmes"),
    ("BldgType", "Duplx", "Duplex"),
    ("MSZoning", "C", "C (all)"),
    ("Exterior2nd", "CemntBd", "CmentBd"),
    ("BldgType", "TwnhsI", "Twnhs"),
    ("BldgType", "2FmCon", "2fmCon"),
    ("Exterior2nd", "WdShing", "Wd Shng"),
    ("Exterior2nd", "BrkComm", "Brk Cmn"),
]


def features() -> list[dict]:
    return committed("house-price").predictor.artifact.load_json(FEATURE_TABLE)


def aliases() -> list[tuple[str, str, str]]:
    """(feature, alias, trained spelling) for every alias in the committed artifact."""
    return [
        (f["name"], alias, code)
        for f in features()
        if f["kind"] == "categorical"
        for alias, code in f["aliases"].items()
    ]


def test_spelling_pairs_are_found_by_rule_not_listed():
    zoning = spelling_pairs(["A", "C", "FV", "I", "RH", "RL", "RP", "RM"], ["C (all)", "FV", "RH", "RL", "RM"])
    assert zoning == {"C": "C (all)"}
    exterior = spelling_pairs(
        ["BrkComm", "CemntBd", "PreCast", "WdShing", "Stone"], ["Brk Cmn", "CmentBd", "Wd Shng", "Stone"]
    )
    assert exterior == {"BrkComm": "Brk Cmn", "CemntBd": "CmentBd", "WdShing": "Wd Shng"}
    # different codes that merely look alike stay apart: septic tank vs no sewer and water; two railroads
    assert spelling_pairs(["AllPub", "NoSewr", "NoSeWa", "ELO"], ["AllPub", "NoSeWa"]) == {}
    assert spelling_pairs(["RRNn", "RRAn", "RRNe", "RRAe"], ["RRNn", "RRAe"]) == {}
    assert same_code("Names", "NAmes") == 1 and same_code("A", "C (all)") == 0


def test_the_artifact_holds_every_named_pair_and_documents_it():
    table = {f["name"]: f for f in features()}
    assert {(f, a, c) for f, a, c in NAMED_PAIRS} <= set(aliases())
    # the other exterior column shares the code list, so it accepts the other column's spellings too
    assert table["Exterior1st"]["aliases"] == {"Brk Cmn": "BrkComm", "CmentBd": "CemntBd", "Wd Shng": "WdShing"}
    assert {"A", "I", "RP"} == set(table["MSZoning"]["unseen"]) and "C" not in table["MSZoning"]["categories"]
    schema = committed("house-price").Input.model_json_schema()["properties"]
    assert "'Names' for 'NAmes'" in schema["Neighborhood"]["description"]
    unseen = "no training house had them: 'A', 'I', 'RP'; such a value is priced as if it were missing"
    assert unseen in schema["MSZoning"]["description"]


def test_enums_list_the_trained_and_documented_codes_and_never_differ_by_case_alone():
    """Code generators turn enum values into names; 'NAmes' beside 'Names' fails as a duplicate key."""
    for name, spec in committed("house-price").Input.model_json_schema()["properties"].items():
        for option in spec.get("anyOf", []):
            if "enum" in option:
                keys = [str(v).lower().replace(" ", "") for v in option["enum"]]
                assert len(set(keys)) == len(keys), (name, option["enum"])
                feature = next(f for f in features() if f["name"] == name)
                assert set(option["enum"]) == {*feature["categories"], *feature["unseen"]}


def test_derived_columns_come_from_the_validated_fields():
    """The served preprocessor starts with ``engineer``: the API keeps the 79 fields, the service derives the rest."""
    rows = [
        {"TotalBsmtSF": 800, "1stFlrSF": 900, "2ndFlrSF": 0, "YrSold": 2008, "YearBuilt": 1990, "KitchenQual": "Gd"},
        {},
    ]
    derived = engineer(to_frame(rows, features()))
    assert derived.loc[0, ["TotalSF", "AgeAtSale", "KitchenQualRank"]].tolist() == [1700, 18, 4]
    assert derived.loc[1, ["TotalSF", "AgeAtSale", "KitchenQualRank"]].isna().all()  # then imputed as in training
    assert committed("house-price").predictor.preprocessor.steps[0][1].func is engineer


def test_the_compiled_preprocessor_equals_scikit_learn_on_every_development_row(data_dir):
    need_data(data_dir, "house_prices", "train.csv")
    raw = pd.read_csv(data_dir / "house_prices" / "train.csv", keep_default_na=False, na_values=["NA"])
    rows = [
        {k: None if isinstance(v, float) and v != v else v for k, v in row.items()}
        for row in raw.drop(columns=["SalePrice", "Id"]).to_dict("records")
    ]
    predictor = committed("house-price").predictor
    expected = predictor.preprocessor.transform(to_frame(rows, features()))
    compiled = predictor.compiled.transform(to_columns(rows, features()))
    assert compiled.shape == expected.shape == (len(rows), expected.shape[1])
    assert np.array_equal(compiled, expected)  # the same numbers, not merely close


def test_a_preprocessor_step_the_compiler_does_not_know_is_refused():
    x = np.array([[1.0, 2.0], [3.0, np.nan]])
    known = make_pipeline(ColumnTransformer([("n", make_pipeline(SimpleImputer(), StandardScaler()), [0, 1])]))
    assert compile_preprocessor(known.fit(x)).blocks[0].columns == ["0", "1"]
    unknown = make_pipeline(ColumnTransformer([("n", make_pipeline(SimpleImputer(), MinMaxScaler()), [0, 1])]))
    with pytest.raises(UnknownStepError, match="MinMaxScaler"):
        compile_preprocessor(unknown.fit(x))
