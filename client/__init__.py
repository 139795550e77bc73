"""A small typed Python client for this service, sync and async, on httpx.

    from client import Client
    with Client("http://127.0.0.1:8000", api_key=None) as client:
        client.predict("phone-price", phone)                     # one instance -> one answer
        client.predict_many("house-price", houses)               # any number, sent in /batch requests
        client.upload("fashion", "shirt.png", top_k=2)           # POST /fashion/image
        for event, data in client.stream("poem", {"line_num": 2}):   # Server-Sent Events
            ...

``AsyncClient`` has the same methods as coroutines (``stream`` is an async iterator). A 503 (queue full,
model loading) is retried after the server's ``Retry-After``, up to ``retries`` times; any other error
raises ``ServiceError`` with the status and the server's ``detail``, which says what to send instead.
It needs only httpx, so an application can copy this one file.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import httpx

MAX_INSTANCES = 256  # the server's default SERVE_MAX_BATCH_INSTANCES
Json = dict[str, Any]


class ServiceError(Exception):
    """An error answer: ``status`` and the server's ``detail`` (a message, or a list of field errors)."""

    def __init__(self, status: int, detail: Any):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


def _detail(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail", response.text)
    except ValueError:
        return response.text


def _retry_after(response: httpx.Response, attempt: int, max_wait_s: float) -> float:
    """The server's Retry-After in seconds, else an exponential back-off; never more than ``max_wait_s``."""
    try:
        wait = float(response.headers.get("retry-after", ""))
    except ValueError:
        wait = 0.5 * 2**attempt
    return min(max(wait, 0.0), max_wait_s)


def _file_part(file: str | Path | bytes, name: str = "upload") -> tuple[str, bytes]:
    return (name, file) if isinstance(file, bytes) else (Path(file).name, Path(file).read_bytes())


def _chunks(instances: Iterable[Json], size: int) -> Iterator[list[Json]]:
    chunk: list[Json] = []
    for instance in instances:
        chunk.append(instance)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _events(lines: Iterable[str]) -> Iterator[tuple[str, Json]]:
    """(event name, JSON data) for each Server-Sent Event in ``lines``."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


class _HttpOptions(TypedDict):
    """What both clients hand to httpx."""

    base_url: str
    timeout: float
    headers: dict[str, str]


class _Settings:
    def __init__(self, base_url: str, api_key: str | None, timeout: float, retries: int, max_wait_s: float):
        self.retries, self.max_wait_s = retries, max_wait_s
        self.options: _HttpOptions = {
            "base_url": base_url,
            "timeout": timeout,
            "headers": {"X-API-Key": api_key} if api_key else {},
        }

    def result(self, response: httpx.Response) -> Any:
        if response.is_success:
            return response.json()
        raise ServiceError(response.status_code, _detail(response))


class Client:
    """Blocking client; use as a context manager or call ``close()``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        max_wait_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self._settings = _Settings(base_url, api_key, timeout, retries, max_wait_s)
        self._http = httpx.Client(transport=transport, **self._settings.options)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self._settings.retries + 1):
            response = self._http.request(method, path, **kwargs)
            if response.status_code != 503 or attempt == self._settings.retries:
                return response
            time.sleep(_retry_after(response, attempt, self._settings.max_wait_s))
        raise AssertionError("unreachable")

    def predict(self, model: str, instance: Json) -> Json:
        return self._settings.result(self._send("POST", f"/{model}", json=instance))

    def predict_many(self, model: str, instances: Iterable[Json], batch_size: int = MAX_INSTANCES) -> list[Json]:
        """Answers for any number of instances, in order, sent ``batch_size`` at a time to ``/{model}/batch``."""
        return [
            answer
            for chunk in _chunks(instances, batch_size)
            for answer in self._settings.result(self._send("POST", f"/{model}/batch", json={"instances": chunk}))[
                "predictions"
            ]
        ]

    def upload(self, model: str, file: str | Path | bytes, route: str = "image", **params: Any) -> Json:
        files = {"file": _file_part(file)}
        return self._settings.result(self._send("POST", f"/{model}/{route}", files=files, params=params))

    def stream(self, model: str, instance: Json) -> Iterator[tuple[str, Json]]:
        """Server-Sent Events of ``POST /{model}/stream`` as (event, data); the last one is the whole answer."""
        with self._http.stream("POST", f"/{model}/stream", json=instance) as response:
            if not response.is_success:
                response.read()
                raise ServiceError(response.status_code, _detail(response))
            yield from _events(response.iter_lines())

    def models(self) -> list[Json]:
        return self._settings.result(self._send("GET", "/models"))

    def ready(self) -> bool:
        return self._send("GET", "/readyz").status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The same calls for asyncio code; ``async with AsyncClient(...) as client``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        max_wait_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self._settings = _Settings(base_url, api_key, timeout, retries, max_wait_s)
        self._http = httpx.AsyncClient(transport=transport, **self._settings.options)

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self._settings.retries + 1):
            response = await self._http.request(method, path, **kwargs)
            if response.status_code != 503 or attempt == self._settings.retries:
                return response
            await asyncio.sleep(_retry_after(response, attempt, self._settings.max_wait_s))
        raise AssertionError("unreachable")

    async def predict(self, model: str, instance: Json) -> Json:
        return self._settings.result(await self._send("POST", f"/{model}", json=instance))

    async def predict_many(self, model: str, instances: Iterable[Json], batch_size: int = MAX_INSTANCES) -> list[Json]:
        """Answers in order; the ``/batch`` requests are sent concurrently."""
        replies = await asyncio.gather(
            *(
                self._send("POST", f"/{model}/batch", json={"instances": chunk})
                for chunk in _chunks(instances, batch_size)
            )
        )
        return [answer for reply in replies for answer in self._settings.result(reply)["predictions"]]

    async def upload(self, model: str, file: str | Path | bytes, route: str = "image", **params: Any) -> Json:
        files = {"file": _file_part(file)}
        return self._settings.result(await self._send("POST", f"/{model}/{route}", files=files, params=params))

    async def stream(self, model: str, instance: Json) -> AsyncIterator[tuple[str, Json]]:
        async with self._http.stream("POST", f"/{model}/stream", json=instance) as response:
            if not response.is_success:
                await response.aread()
                raise ServiceError(response.status_code, _detail(response))
            event_lines: list[str] = []
            async for line in response.aiter_lines():
                event_lines.append(line)
                if not line:
                    for event in _events(event_lines):
                        yield event
                    event_lines = []

    async def models(self) -> list[Json]:
        return self._settings.result(await self._send("GET", "/models"))

    async def ready(self) -> bool:
        return (await self._send("GET", "/readyz")).status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
