"""The one class every served model implements: load once, then predict a batch."""

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar

import torch
from pydantic import BaseModel, BeforeValidator

from service.artifacts import Artifact


def json_number(value: Any) -> Any:
    """Refuse booleans and strings where a number is documented; 842.0 still passes for an integer."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"must be a JSON number, not {type(value).__name__}")
    return value


JsonInt = Annotated[int, BeforeValidator(json_number)]
JsonFloat = Annotated[float, BeforeValidator(json_number)]


class InputError(ValueError):
    """An input that passed schema validation but cannot be predicted on; becomes a 422 for its caller.

    ``field`` names the offending field, so the answer has the same shape as any other validation error.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.loc = ["body", field] if field else ["body"]


class Predictor(ABC):
    """A served model. Subclasses set the class attributes and write ``setup`` and ``predict``.

    The server owns everything else: routes (``POST /{name}`` and ``POST /{name}/batch``), dynamic
    batching on a worker thread under ``torch.inference_mode()``, metrics and health.
    """

    name: ClassVar[str]                   # URL path and metric label, e.g. "phone-price"
    folder: ClassVar[str]                 # artifacts/<folder>/
    Input: ClassVar[type[BaseModel]]      # one instance, validated at the edge
    Output: ClassVar[type[BaseModel]]     # one prediction
    summary: ClassVar[str]                # one line for the docs page
    description: ClassVar[str] = ""
    threads: ClassVar[int | None] = None  # intra-op threads of this model's worker unless settings say otherwise
    streams: ClassVar[bool] = False       # True: also POST /{name}/stream and {"stream": true} (see ``events``)
    max_batch_size: ClassVar[int | None] = None  # cap on the batching policy, for a model that gains nothing above it

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.artifact: Artifact | None = None

    def load(self, artifact: Artifact, device: torch.device) -> None:
        """Called once at start-up by the registry, with the artifact already verified."""
        self.artifact, self.device = artifact, device
        self.setup(artifact, device)

    @abstractmethod
    def setup(self, artifact: Artifact, device: torch.device) -> None:
        """Load weights and preprocessors from ``artifact`` onto ``device``."""

    @abstractmethod
    def predict(self, batch: list[Any]) -> list[BaseModel | Exception]:
        """Preprocess a batch, run one forward pass, return one output (or InputError) per item, in order."""

    def input_schema(self) -> dict:
        """JSON schema of one input, for GET /models/{name}."""
        return self.Input.model_json_schema()

    def events(self, item: Any) -> Iterator[str]:
        """Server-Sent Events for one instance, for models with ``streams = True``.

        Check the input before returning (raise InputError then, so the caller gets a 422 and not a broken
        stream); the returned iterator yields each event's text and runs on a worker thread.
        """
        raise NotImplementedError(f"{self.name} does not stream")

    def add_routes(self, router, submit) -> None:
        """Hook for routes beyond the two standard ones; ``submit(items)`` runs items through the batcher."""
