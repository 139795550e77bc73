"""The one list of served models. The service, ``python -m training``, the tests, the benchmarks and the
smoke script all take their model lists from ``MODELS``.

Adding a model (the README's "Adding a model" section walks through it):
1. ``service/models/<folder>.py``: a ``Predictor`` subclass (schemas, ``example``, ``setup``, ``predict``);
2. ``training/<folder>.py``: ``train(options) -> Manifest``, writing ``artifacts/<folder>/``;
3. one line below. ``<folder>`` is the name with "-" written as "_".

This module imports nothing heavy, so tools can list models without loading the web stack or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.models.base import Predictor


@dataclass(frozen=True)
class Model:
    name: str  # URL path, CLI argument and metric label, e.g. "phone-price"
    predictor: str  # "module:Class" of its Predictor subclass

    @property
    def folder(self) -> str:
        """Its folder under artifacts/ and its module name under training/."""
        return self.name.replace("-", "_")

    @property
    def trainer(self) -> str:
        return f"training.{self.folder}"

    def predictor_class(self) -> type[Predictor]:
        """Imported on demand: listing models needs none of their dependencies."""
        module, _, cls = self.predictor.partition(":")
        return getattr(import_module(module), cls)


MODELS: list[Model] = [
    Model("phone-price", "service.models.phone_price:PhonePrice"),
    Model("house-price", "service.models.house_price:HousePrice"),
    Model("poem", "service.models.poem:Poem"),
    Model("fashion", "service.models.fashion:Fashion"),
]


def get(name: str) -> Model:
    for model in MODELS:
        if model.name == name:
            return model
    raise KeyError(f"no model named '{name}'; known models: {', '.join(m.name for m in MODELS)}")
