"""Per-key rate limits: a token bucket per limited client key, counted in instances, shared by every worker.

The buckets live in shared memory made before the workers fork (``multiprocessing.RawArray`` and a lock, both
inherited by every worker and by any replacement the arbiter forks later), so a key's limit holds for the
server as a whole whichever worker answers. Each bucket holds up to ``burst`` instances and refills at
``rate_per_s``; a request takes as many tokens as it has instances, or is refused with 429 and ``Retry-After``.

Every answer to a limited key carries the IETF draft's ``RateLimit-Policy`` (the bucket's size ``q`` and the
seconds ``w`` it takes to refill) and ``RateLimit`` (``r`` instances left now, ``t`` seconds until the bucket
is full again) headers, the quota counted in instances.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from dataclasses import dataclass

from service.errors import InputRejected, RateLimitedError
from service.settings import ApiKey


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    headers: dict[str, str]
    retry_after_s: float = 0.0


class RateLimits:
    """The buckets of the limited keys among ``keys`` (made once, before any fork)."""

    def __init__(self, keys: list[ApiKey]):
        self.keys = {k.name: k for k in keys if k.rate_per_s}
        self.slot = {name: i for i, name in enumerate(self.keys)}
        # tokens and the time they were counted, per key; a full bucket to start with
        self._state = multiprocessing.RawArray("d", 2 * len(self.keys))
        self._lock = multiprocessing.Lock()
        now = time.monotonic()
        for name, i in self.slot.items():
            self._state[2 * i], self._state[2 * i + 1] = self.keys[name].capacity, now

    def take(self, key: ApiKey, instances: int) -> Verdict:
        """Take ``instances`` tokens from the key's bucket if it has them."""
        rate, size, i = key.rate_per_s or 0.0, key.capacity, self.slot[key.name]
        if instances > size:
            raise InputRejected(
                413,
                f"this request has {instances} instances and key '{key.name}' may send at most {size} at once "
                f"(its burst); send at most {size} per request",
            )
        with self._lock:
            now = time.monotonic()
            tokens = min(size, self._state[2 * i] + (now - self._state[2 * i + 1]) * rate)
            allowed = tokens >= instances
            if allowed:
                tokens -= instances
            self._state[2 * i], self._state[2 * i + 1] = tokens, now
        policy = f'"{key.name}";q={size};w={max(1, math.ceil(size / rate))}'
        state = f'"{key.name}";r={math.floor(tokens)};t={math.ceil((size - tokens) / rate)}'
        headers = {"RateLimit-Policy": policy, "RateLimit": state}
        return Verdict(allowed, headers, 0.0 if allowed else (instances - tokens) / rate)

    def admit(self, key: ApiKey, instances: int) -> dict[str, str]:
        """The rate-limit headers of an admitted request, or RateLimitedError (429) with them."""
        verdict = self.take(key, instances)
        if not verdict.allowed:
            retry = max(1, math.ceil(verdict.retry_after_s))
            raise RateLimitedError(
                f"key '{key.name}' is over its rate of {key.rate_per_s:g} instances per second (burst "
                f"{key.capacity}); retry after {retry} s, or send fewer instances",
                retry,
                verdict.headers,
            )
        return verdict.headers
