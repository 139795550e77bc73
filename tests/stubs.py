"""A stub model for testing the runtime fast, without real weights (MLServer's ``SumModel`` habit).

``Doubler`` doubles a number, can be told to take its time (``sleep_ms``) and refuses negative numbers
per item, which is all the batching, shedding, timeout, auth, limit, metric and log tests need. It also
takes the number as an uploaded text file and streams the digits of its answer, to test those layers.
``uvicorn --factory tests.stubs:create_stub_app`` serves it with settings from ``SERVE_*`` variables.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from service.app import create_app
from service.artifacts import QualityGate, publish_version, staging_folder, write_artifact
from service.catalog import Model
from service.models.base import InputError, InputRejected, Predictor, UploadRoute
from service.settings import Settings


class Number(BaseModel):
    model_config = ConfigDict(extra="forbid")

    x: float = Field(ge=-1e6, le=1e6, description="The number to double; negative ones are refused (422).")
    sleep_ms: float = Field(0, ge=0, le=5000, description="How long the forward pass takes.")


class Doubled(BaseModel):
    y: float


class Scale(BaseModel):
    times: int = Field(1, ge=1, le=10, description="Multiply the uploaded number by this first.")


class Doubler(Predictor):
    Input = Number
    Output = Doubled
    example = {"x": 21}
    summary = "Double x: a stub model for the runtime's tests"
    upload = UploadRoute(
        path="text",
        summary="Double the number in a text file",
        description="x as plain text.",
        file_description="A text file holding one number.",
        media_types=("text/plain",),
        Options=Scale,
        errors={415: "The file is not a number."},
    )
    stream_event = "digit"

    def setup(self, artifact, device) -> None:
        # a version with "fail_every": n fails (a server error) on every x divisible by n: a canary's bug
        self.fail_every = artifact.manifest.hyperparameters.get("fail_every")
        self.offset = artifact.manifest.hyperparameters.get("offset", 0)  # a version that answers differently
        self.batch_sizes: list[int] = []
        self.decoded_on: set[str] = set()
        self.streamed_on: set[str] = set()  # the threads streams were planned on

    def decode(self, data: bytes, options: Scale) -> Number:
        self.decoded_on.add(threading.current_thread().name)
        try:
            return Number(x=float(data) * options.times)
        except ValueError:
            raise InputRejected(415, "the file must hold one number") from None

    def stream(self, item: Number) -> Iterator[str | Doubled]:
        self.streamed_on.add(threading.current_thread().name)
        if item.x < 0:
            raise InputError("x must not be negative", "x")
        answer = Doubled(y=2 * item.x)

        def pieces() -> Iterator[str | Doubled]:  # each takes sleep_ms, like a slow model's tokens
            for piece in [*str(answer.y), answer]:
                time.sleep(item.sleep_ms / 1000)
                yield piece

        return pieces()

    def predict(self, batch: list[Number]) -> list[Doubled | Exception]:
        self.batch_sizes.append(len(batch))
        time.sleep(max(item.sleep_ms for item in batch) / 1000)
        return [
            RuntimeError("this version's bug")
            if self.fail_every and item.x % self.fail_every == 0
            else Doubled(y=2 * item.x + self.offset)
            if item.x >= 0
            else InputError("x must not be negative", "x")
            for item in batch
        ]


DOUBLER = Model("doubler", "tests.stubs:Doubler")


def write_stub_artifacts(
    artifacts_dir: Path,
    quick: bool = False,
    version: str | None = None,
    gate: QualityGate | None = None,
    hyperparameters: dict | None = None,
) -> Path:
    """An artifacts folder holding the stub's (empty, but verified like any other) artifact."""
    folder = staging_folder(artifacts_dir / DOUBLER.folder)
    write_artifact(
        folder,
        name=DOUBLER.name,
        hyperparameters=hyperparameters or {},
        metrics={},
        metrics_method="none: a stub",
        data_files=[],
        quick=quick,
        version=version,
        gate=gate,
    )
    publish_version(folder)
    return artifacts_dir


def create_stub_app() -> FastAPI:
    return create_app(Settings(), models=[DOUBLER])
