"""Phone price band (0-3) from 20 hardware features: standard scaling + an ordinal net on the informative few."""

from collections.abc import Sequence
from operator import attrgetter
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from service.artifacts import Artifact, ArtifactError
from service.models.base import JsonFloat, JsonInt, StrictInput
from service.models.conformal import ALPHA, ALPHA_RANGE, DEFAULT_ALPHA, PREDICTION_SET, label_sets, load_conformal
from service.models.tabular import Standardiser, TabularPredictor
from service.nets import phone_net

LABELS = ["low cost", "medium cost", "high cost", "very high cost"]


def _flag(what: str) -> Any:
    return Field(ge=0, le=1, description=f"1 if the phone has {what}, else 0.", examples=[1])


class Phone(StrictInput):
    """One phone, with the Kaggle dataset's column names."""

    model_config = ConfigDict(allow_inf_nan=False)

    battery_power: JsonInt = Field(ge=100, le=20000, description="Battery capacity, mAh.", examples=[842])
    blue: JsonInt = _flag("Bluetooth")
    clock_speed: JsonFloat = Field(ge=0.1, le=10, description="CPU clock speed, GHz.", examples=[2.2])
    dual_sim: JsonInt = _flag("dual SIM support")
    fc: JsonInt = Field(ge=0, le=200, description="Front camera resolution, megapixels.", examples=[1])
    four_g: JsonInt = _flag("4G")
    int_memory: JsonInt = Field(ge=0, le=4096, description="Internal memory, GB.", examples=[7])
    m_dep: JsonFloat = Field(ge=0, le=5, description="Mobile depth (thickness), cm.", examples=[0.6])
    mobile_wt: JsonInt = Field(ge=1, le=2000, description="Weight, grams.", examples=[188])
    n_cores: JsonInt = Field(ge=1, le=128, description="Number of CPU cores.", examples=[2])
    pc: JsonInt = Field(ge=0, le=400, description="Primary camera resolution, megapixels.", examples=[2])
    px_height: JsonInt = Field(ge=0, le=20000, description="Screen resolution height, pixels.", examples=[20])
    px_width: JsonInt = Field(ge=0, le=20000, description="Screen resolution width, pixels.", examples=[756])
    ram: JsonInt = Field(ge=0, le=131072, description="RAM, MB.", examples=[2549])
    sc_h: JsonFloat = Field(ge=0, le=100, description="Screen height, cm.", examples=[9])
    sc_w: JsonFloat = Field(ge=0, le=100, description="Screen width, cm.", examples=[7])
    talk_time: JsonInt = Field(ge=0, le=500, description="Longest talk time on one charge, hours.", examples=[19])
    three_g: JsonInt = _flag("3G")
    touch_screen: JsonInt = _flag("a touch screen")
    wifi: JsonInt = _flag("Wi-Fi")
    id: JsonInt | None = Field(None, description="Optional row id (as in the Kaggle test file); ignored.")
    alpha: JsonFloat = Field(DEFAULT_ALPHA, ge=ALPHA_RANGE[0], le=ALPHA_RANGE[1], description=ALPHA)


FEATURES = [name for name in Phone.model_fields if name not in ("id", "alpha")]
_features = attrgetter(*FEATURES)


class PhonePrediction(BaseModel):
    price_range: int = Field(ge=0, le=3, description="Predicted price band, 0 (cheapest) to 3.")
    label: str = Field(description="The band in words.", examples=["high cost"])
    probabilities: list[float] = Field(
        min_length=4, max_length=4, description="Probability of each band, index = band."
    )
    prediction_set: list[str] | None = Field(description=PREDICTION_SET, examples=[["high cost"]])


class PhonePrice(TabularPredictor):
    Input = Phone
    v2_packed = ("features", tuple(FEATURES))  # FP32/FP64 [-1, 20] in this order
    v2_hidden = ("id",)
    Output = PhonePrediction
    example = {
        "battery_power": 842,
        "blue": 0,
        "clock_speed": 2.2,
        "dual_sim": 0,
        "fc": 1,
        "four_g": 0,
        "int_memory": 7,
        "m_dep": 0.6,
        "mobile_wt": 188,
        "n_cores": 2,
        "pc": 2,
        "px_height": 20,
        "px_width": 756,
        "ram": 2549,
        "sc_h": 9,
        "sc_w": 7,
        "talk_time": 19,
        "three_g": 0,
        "touch_screen": 0,
        "wifi": 1,
    }
    summary = "Predict a phone's price band (0-3) from its specs"
    net_module: ClassVar[ModuleType] = phone_net  # selects its input columns itself
    description = (
        "Ordinal (cumulative-logit) net over the standardised features of the Kaggle Mobile Price "
        "dataset that CV selected (all 20 are accepted); chosen by 5x5 repeated cross-validation."
    )

    def to_table(self, batch: list[Phone]) -> np.ndarray:
        return np.array([_features(phone) for phone in batch], dtype=np.float64)

    preprocessor_file = "preprocessor.json"  # the fitted StandardScaler's mean and scale, as plain numbers

    def load_preprocessor(self, artifact: Artifact) -> Standardiser:
        where = f"{artifact.label}/{self.preprocessor_file}"
        scaler = Standardiser.from_json(artifact.load_json(self.preprocessor_file), where)
        if list(scaler.features) != FEATURES:
            raise ArtifactError(
                f"{where} must be a StandardScaler over the {len(FEATURES)} phone features in the "
                f"order of the API, not over {list(scaler.features)}"
            )
        return scaler

    def transform(self, table: np.ndarray) -> np.ndarray:
        # The fitted StandardScaler's own formula, without sklearn's per-call input checks: those cost
        # more than the forward pass at serving batch sizes (the inputs are already validated).
        return self.preprocessor.transform(table)

    def setup(self, artifact: Artifact, device: torch.device) -> None:
        super().setup(artifact, device)
        self.conformal = load_conformal(artifact)

    def raw_columns(self, table: np.ndarray, batch: list[Phone]) -> dict[str, np.ndarray]:
        return dict(zip(FEATURES, table.T))

    def answer_column(self, outputs: Sequence[Any]) -> np.ndarray:
        """The predicted band (the profile's output classes)."""
        return np.array([getattr(out, "price_range", np.nan) for out in outputs], np.float64)

    def from_outputs(self, outputs: np.ndarray, batch: list[Phone]) -> list[PhonePrediction]:
        # The net's outputs are log-probabilities: softmax gives the probabilities back, normalised.
        probabilities = torch.softmax(torch.from_numpy(outputs), dim=1).numpy().astype(np.float64)
        bands = probabilities.argmax(axis=1).tolist()
        sets = label_sets(self.conformal, probabilities, [phone.alpha for phone in batch], LABELS)
        return [
            PhonePrediction(price_range=band, label=LABELS[band], probabilities=p, prediction_set=labels)
            for band, p, labels in zip(bands, probabilities.round(6).tolist(), sets)
        ]
