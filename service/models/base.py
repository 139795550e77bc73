"""The one class every served model implements: load once, then predict a batch.

A model supplies plain functions; the server owns HTTP, batching, the worker thread, metrics and SSE
framing. Required: ``Input``, ``Output``, ``example``, ``summary``, ``setup`` and ``predict``. Optional:
``upload`` + ``decode`` (an extra route taking a file), ``stream_event`` + ``stream`` (Server-Sent Events),
``input_schema`` (an input schema read from the artifact), ``drift_columns`` (what drift is watched on, against
the artifact's profile.json), ``generates`` + ``running_batch`` (a generator served by continuous batching).
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from service.artifacts import Artifact
from service.errors import InputError, InputRejected
from service.runtime.drift import DriftWatcher
from service.runtime.memory import return_freed_memory
from service.settings import Settings


def json_number(value: Any) -> Any:
    """Refuse booleans and strings where a number is documented; 842.0 still passes for an integer."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"must be a JSON number, not {type(value).__name__}")
    return value


JsonInt = Annotated[int, BeforeValidator(json_number)]
JsonFloat = Annotated[float, BeforeValidator(json_number)]


def undecodable(exc: Exception) -> InputError | InputRejected:
    """A decoder's failure as the upload's own 4xx: its InputError or InputRejected as raised, anything else
    (Pillow raises SyntaxError, struct.error, ... for damaged files) a 422, so it never fails the items
    batched with it. Without traceback and context: they reach the frames holding the upload's bytes, which
    would then live until a full garbage collection."""
    if not isinstance(exc, (InputError, InputRejected)):
        exc = InputError(
            f"the file could not be decoded ({type(exc).__name__}: {str(exc)[:200]}); send an undamaged image", "file"
        )
    exc.__context__ = exc.__cause__ = None
    return exc.with_traceback(None)


MANY_UNKNOWN_KEYS = 20  # beyond this many unknown keys in one instance, one error lists a few and counts them


class StrictInput(BaseModel):
    """An instance that refuses keys it does not know. A few are reported one error each, as pydantic does;
    beyond MANY_UNKNOWN_KEYS they are one error, found with one set difference before any field is
    validated: a body of thousands of unknown keys would otherwise cost thousands of error objects on the
    event loop (256 instances x 1,000 keys: 1.1 s before, see the README)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _refuse_many_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > MANY_UNKNOWN_KEYS and cls.model_config.get("extra") == "forbid":
            fields = cls.model_fields.values()
            known = set(cls.model_fields) | {f.alias for f in fields if f.alias}
            unknown = data.keys() - known
            if len(unknown) > MANY_UNKNOWN_KEYS:
                listed = ", ".join(sorted(map(str, unknown))[:5])
                raise ValueError(
                    f"{len(unknown)} unknown fields ({listed}, ...); send only the fields of the "
                    "input schema (GET /models/{name})"
                )
        return data


class RunningBatch(ABC):
    """The requests a generating model is answering now, advanced together one piece per :meth:`step`
    (continuous batching, service/runtime/generation.py): requests join and leave between steps."""

    @abstractmethod
    def __len__(self) -> int:
        """Requests running."""

    @abstractmethod
    def join(self, key: Hashable, item: Any) -> None:
        """Start answering ``item`` at the next step; raise InputError (a 422) for an input it cannot answer."""

    @abstractmethod
    def step(self) -> list[tuple[Hashable, str | BaseModel]]:
        """One piece (text) for each running request, then the whole Output of each that is complete (which
        has left the batch)."""

    @abstractmethod
    def leave(self, key: Hashable) -> None:
        """Stop answering ``key`` (its caller has gone)."""


@dataclass(frozen=True)
class UploadRoute:
    """``POST /{name}/{path}``: a multipart file plus query options, decoded by ``Predictor.decode``."""

    path: str
    summary: str
    description: str
    file_description: str
    media_types: tuple[str, ...]  # what the part may be, for the docs page and generated clients
    Options: type[BaseModel]  # query parameters, validated like a body
    errors: dict[int, str] = field(default_factory=dict)  # extra statuses (from InputRejected) and what they mean


@dataclass
class Upload:
    """An uploaded file as it waits in the queue: decoded on the model's worker thread, in its batch."""

    data: bytes
    options: BaseModel


class Predictor(ABC):
    """A served model. Subclasses set the class attributes and write ``setup`` and ``predict``."""

    Input: ClassVar[type[BaseModel]]  # one instance, validated at the edge
    Output: ClassVar[type[BaseModel]]  # one prediction
    example: ClassVar[dict[str, Any]]  # a valid Input: the docs page, tests, benchmarks and smoke script use it
    summary: ClassVar[str]  # one line for the docs page
    description: ClassVar[str] = ""
    threads: ClassVar[int | None] = None  # intra-op threads of this model's worker unless settings say otherwise
    max_batch_size: ClassVar[int | None] = None  # cap on the batching policy, for a model that gains nothing above it
    # A generator: the server runs ``running_batch`` under continuous batching (requests join and leave between
    # steps, at most the policy's max_batch_size at once) instead of calling ``predict`` once per batch.
    generates: ClassVar[bool] = False
    upload: ClassVar[UploadRoute | None] = None  # an extra route taking a file; write ``decode`` too
    stream_event: ClassVar[str | None] = (
        None  # set to stream: POST /{name}/stream (and "stream": true); write ``stream``
    )
    # The largest valid JSON body of one instance, with room for pretty-printing: a bigger body is refused (413)
    # before it is parsed; the batch route allows max_batch_instances of these.
    max_instance_bytes: ClassVar[int] = 16 * 1024
    # Open Inference Protocol v2 (service/v2/codec.py): the datatype and shape of a list-valued input field, and
    # fields left out of the model's v2 metadata.
    v2_tensors: ClassVar[dict[str, tuple[str, list[int]]]] = {}
    v2_hidden: ClassVar[tuple[str, ...]] = ()
    # An optional packed input: one [-1, len(fields)] tensor holding those fields, column by column, in place
    # of one named input each (fewer, larger tensors are cheaper to read).
    v2_packed: ClassVar[tuple[str, tuple[str, ...]] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A concrete model without its required parts fails at import, saying what to write."""
        super().__init_subclass__(**kwargs)
        if inspect.isabstract(cls):
            return
        missing = [name for name in ("Input", "Output", "example", "summary") if not hasattr(cls, name)]
        if missing:
            raise TypeError(
                f"{cls.__name__} must set {', '.join(missing)}, e.g.\n"
                "    Input = MyInput                  # pydantic model of one instance\n"
                "    Output = MyOutput                # pydantic model of one prediction\n"
                "    example = {...}                  # one valid Input, as JSON\n"
                '    summary = "what it predicts"     # one line for the docs page'
            )
        if len(json.dumps(cls.example, indent=2)) > cls.max_instance_bytes:
            raise TypeError(
                f"{cls.__name__}.example is larger than max_instance_bytes ({cls.max_instance_bytes}); "
                "raise max_instance_bytes to the largest valid body"
            )
        if inspect.getattr_static(cls, "input_schema") is inspect.getattr_static(Predictor, "input_schema"):
            # a static schema: check the example now
            cls.check_example(cls.Input)

    @classmethod
    def check_example(cls, schema: type[BaseModel]) -> None:
        try:
            schema.model_validate(cls.example)
        except ValidationError as exc:
            raise TypeError(f"{cls.__name__}.example is not a valid {schema.__name__}: {exc}") from None

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.artifact: Artifact | None = None
        self.settings = Settings.model_construct()  # the defaults until load() gives the server's settings
        self.drift: DriftWatcher | None = None  # set by the registry when the version's artifact has a profile

    @classmethod
    def input_schema(cls, artifact: Artifact) -> type[BaseModel]:
        """The schema of one instance, called before the routes are built. Override to build it from files
        in the artifact (the server then checks ``example`` against it)."""
        return cls.Input

    def load(self, artifact: Artifact, device: torch.device, settings: Settings | None = None) -> None:
        """Called once at start-up by the registry, with the artifact already verified."""
        self.artifact, self.device, self.settings = artifact, device, settings or self.settings
        self.setup(artifact, device)

    @abstractmethod
    def setup(self, artifact: Artifact, device: torch.device) -> None:
        """Load weights and preprocessors from ``artifact`` onto ``device``."""

    @abstractmethod
    def predict(self, batch: list[Any]) -> Sequence[BaseModel | Exception]:
        """Preprocess a batch, run one forward pass, return one output (or InputError) per item, in order."""

    def running_batch(self) -> RunningBatch:
        """For models that set ``generates``: an empty batch of requests to advance step by step."""
        raise NotImplementedError(f"{type(self).__name__} does not generate")

    def decode(self, data: bytes, options: Any) -> Any:
        """For models with ``upload``: turn the file into an item ``predict`` takes (``options``: an instance of
        ``upload.Options``).

        Runs on the model's worker thread; raise InputError (422) or InputRejected (its status)."""
        raise NotImplementedError(f"{type(self).__name__} declares no upload route")

    def stream(self, item: Any) -> Iterator[str | BaseModel]:
        """For models with ``stream_event``: check the input now (raise InputError: a 422, not a broken
        stream), then return an iterator of pieces (strings) ending with the whole Output.

        The iterator runs on the model's worker thread, one piece at a time between batches."""
        raise NotImplementedError(f"{type(self).__name__} does not stream")

    def drift_columns(self, batch: list[Any], outputs: Sequence[Any]) -> dict[str, Any]:
        """For drift watching (service/runtime/drift.py): ``batch``'s raw feature columns as the API received
        them (before any scaling or encoding), and its answers as the column ``output``, one value per item (an
        item whose output is an exception may hold anything: its row is dropped). The names and values are those
        of the artifact's ``profile.json``, which the model's training module writes (training/profile.py).
        Called on the worker thread right after ``predict``, only for a version whose artifact has a profile."""
        raise NotImplementedError(f"{type(self).__name__} has no drift columns")

    @torch.inference_mode()
    def run(self, batch: list[Any]) -> list[BaseModel | Exception]:
        """What the batcher calls on the worker thread: decode the uploads, then one ``predict`` for all,
        without autograd."""
        outputs: list[Any] = [None] * len(batch)
        ready: list[tuple[int, Any]] = []
        uploads = False
        for i, item in enumerate(batch):
            if isinstance(item, Upload):
                uploads = True
                try:
                    ready.append((i, self.decode(item.data, item.options)))
                except Exception as exc:  # whatever a decoder raises on odd bytes is this item's 4xx
                    outputs[i] = undecodable(exc)
            else:
                ready.append((i, item))
        if uploads:
            return_freed_memory()
        if ready:
            items = [item for _, item in ready]
            predicted = self.predict(items)
            for (i, _), output in zip(ready, predicted, strict=True):
                outputs[i] = output
            if self.drift is not None:  # the batch's bins into the version's drift window (cheap, vectorised)
                self.drift.observe(self, items, predicted)
        return outputs
