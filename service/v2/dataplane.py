"""The v2 protocol's one inference path: REST (service/v2/rest.py) and gRPC (service/v2/grpc.py) both call
:class:`DataPlane` with a decoded :class:`~service.v2.codec.InferRequest` and encode what it returns, so the
same request meets the same model lookup, validation, batcher, queue, metrics and errors whichever way it
came (MLServer's ``handlers/dataplane.py`` is the model). Every refusal is a
:class:`~service.errors.ServiceError` carrying its status; each transport maps it once.
"""

from __future__ import annotations

from typing import Any

from service.errors import InputError, NotFoundError, ProtocolError
from service.runtime.registry import ModelEntry, Registry
from service.runtime.threads import off_loop
from service.v2 import codec
from service.v2.metadata import field_tensors, model_config, output_descriptions

EXTENSIONS = ["binary_tensor_data"]


class DataPlane:
    def __init__(self, registry: Registry, name: str, version: str):
        self.registry, self.name, self.version = registry, name, version

    def ready(self) -> bool:
        return self.registry.ready()

    def server_metadata(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "extensions": EXTENSIONS}

    def model(self, name: str, version: str | None = None) -> ModelEntry:
        """The served model, checking that a version named is loaded (404 otherwise)."""
        entry = self.registry.entry(name)
        if version and version not in entry.ready_versions():
            raise NotFoundError(
                f"model '{name}' has no version '{version[:100]}' loaded (loaded: "
                f"{', '.join(entry.ready_versions()) or 'none'})"
            )
        return entry

    def model_ready(self, name: str, version: str | None = None) -> bool:
        entry = self.model(name, version)
        return bool(entry.ready_versions()) and (version is not None or entry.state == "ready")

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        entry = self.model(name, version)
        return {
            "name": entry.name,
            "versions": entry.ready_versions(),
            "platform": "pytorch",
            "inputs": field_tensors(entry),
            "outputs": output_descriptions(entry),
        }

    def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        return model_config(self.model(name, version))

    async def infer(
        self, name: str, version: str | None, request: codec.InferRequest, size: int
    ) -> codec.InferResponse:
        """The answer to one request of ``size`` bytes (decoded on a thread when large), from the version
        named, else as the model's default and split choose; the version that answered is in the response."""
        entry = self.model(name, version)
        limit = self.registry.settings.max_batch_instances
        instances = await off_loop(size, codec.instances, entry, request, limit)
        wanted = codec.wanted_outputs(entry, request)
        outputs, answered_by = await self.registry.submit(entry, instances, version)
        for i, out in enumerate(outputs):
            if isinstance(out, InputError):
                raise ProtocolError(f"instance {i}: {out}", 422)
            if isinstance(out, Exception):
                raise out
        return codec.InferResponse(entry.name, answered_by, request.id, codec.output_tensors(outputs, wanted))
