"""The errors a caller can act on: one type, carrying its HTTP status (and Retry-After where it has one).

Raised anywhere (the registry, the batcher, a model, the v2 codec) and mapped once per protocol: the JSON
routes and v2 REST answer the status with ``{"detail": ...}`` (v2 adds the same text as ``"error"``, which
its clients read; ``service/api/errors.py``), gRPC aborts with the code :data:`GRPC_CODES` names
(``service/v2/grpc.py``). MLServer's ``errors.py`` is the model.
"""

from __future__ import annotations


class ServiceError(Exception):
    """An error whose message says what to send instead; ``status`` is its HTTP status."""

    status = 500
    retry_after: int | None = None  # seconds, sent as Retry-After
    headers: dict[str, str] | None = None  # more headers for the answer (a rate limit's state)

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class NotFoundError(ServiceError, LookupError):
    """No model, or no loaded version, of that name (the message lists those there are)."""

    status = 404


class ModelUnavailableError(ServiceError):
    """The model (or the version asked for) is not serving; the message says why."""

    status = 503


class VersionNotFoundError(NotFoundError):
    """A version that is not loaded was asked for by name."""


class QueueFullError(ServiceError):
    """The model's queue (or stream, upload, call places) is full: retry after Retry-After."""

    status = 503
    retry_after = 1


class PredictionTimeoutError(ServiceError):
    """The request's deadline passed before its answer was ready (or it was dropped from the queue unanswered)."""

    status = 504


class DeadlineUnmeetableError(ServiceError):
    """Refused on arrival: the batches ahead of it take longer than the request's deadline leaves."""

    status = 503
    retry_after = 1


class RateLimitedError(ServiceError):
    """The caller's key is over its rate: retry after Retry-After (RateLimit headers say more)."""

    status = 429

    def __init__(self, message: str, retry_after: int, headers: dict[str, str]):
        super().__init__(message)
        self.retry_after, self.headers = retry_after, headers


class InjectedFaultError(ServiceError):
    """A failure made on purpose (SERVE_FAULT_INJECTION) to rehearse a canary's rollback."""

    status = 500


class ProtocolError(ServiceError):
    """A v2 request that does not follow the protocol or the model's tensors (400 unless said otherwise)."""

    status = 400


class InputRejected(ServiceError):
    """An input refused outright with its own status: e.g. 415 (not an image) or 413 (too many pixels)."""

    def __init__(self, status: int, message: str):
        super().__init__(message, status)


class InputError(ServiceError, ValueError):
    """An input that passed schema validation but cannot be predicted on: a 422 shaped like a validation
    error, ``loc`` naming the offending field."""

    status = 422

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.loc = ["body", field] if field else ["body"]


# HTTP status -> gRPC status code name (grpc.StatusCode[name]), the mapping of the v2 protocol's gRPC form
GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def grpc_code_name(status: int) -> str:
    return GRPC_CODES.get(status, "INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")
