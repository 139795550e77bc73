"""Rollouts that check answers: shadow traffic and automatic canary analysis.

**Shadow traffic** (``PUT /admin/models/{m}/shadow``, ``{"version": "V", "share": 0.2}``): that share of the
model's requests is mirrored to V once the caller's answer is ready; the caller sees only the serving version's
answer and never waits for V. Shadow work is shed first: a copy starts only while the serving version has no
request queued or running, it is queued below every caller's (dropped after SHADOW_DEADLINE_S), and at most
MAX_SHADOW_ITEMS items are in flight per model; what is shed is counted. How V's answers compare is exported
(``model_shadow_requests_total{outcome}``: agree, disagree, error, shed; ``model_shadow_relative_error`` for
prices; ``model_shadow_latency_seconds``) and shown on ``/admin/models``: the same label for classifiers, a
price within PRICE_AGREEMENT for house prices, the same form (lines and their lengths) for poems.

**Automatic canary analysis**: a split may carry a guard, and the server ends the split on its own when the canary
crosses it (or promotes the canary once it has held long enough).

``PUT /admin/models/{m}/split`` with ``{"weights": {"A": 90, "B": 10}, "guard": {...}}``: the stable version
is the one with the largest weight, the others are canaries. Every worker records each request's version,
outcome and latency while a guard is set; :class:`CanaryWatch` compares, every second, each canary with the
stable version over the last ``window_s``:

- ``max_error_ratio``: the canary's share of requests that failed with a server error (not a refused input);
- ``max_p99_ratio``: the canary's p99 latency over the stable version's;

with at least ``min_requests`` of the canary's requests in the window. Crossing either rolls back: the stable
version is pinned and the split ends, in every worker (the admin API's own path, :class:`Control`). With
``promote_after_s``, a canary that has served that long without crossing a guard is pinned instead. Every
decision is logged, counted (``model_canary_decisions_total``) and listed on ``/admin/models``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from service.errors import DeadlineUnmeetableError, PredictionTimeoutError, QueueFullError
from service.runtime.batching import SIDE_RANK

if TYPE_CHECKING:
    from service.runtime.control import Control
    from service.runtime.metrics import Metrics
    from service.runtime.registry import Desired, ModelEntry, ModelVersion

log = logging.getLogger("service.rollouts")
SHADOW_RANK = SIDE_RANK  # below every caller's priority in the batcher, on its lowest-priority thread
MAX_SHADOW_ITEMS = 64  # mirrored items in flight per model; more are shed
SHADOW_DEADLINE_S = 2.0
PRICE_AGREEMENT = 0.05  # a shadow's price within 5 % of the serving version's agrees
SHED = (QueueFullError, DeadlineUnmeetableError, PredictionTimeoutError)  # mirrored work given up, not failed
CHECK_EVERY_S = 1.0
KEEP_DECISIONS = 20


class Guard(BaseModel):
    """When the server ends a canary split on its own."""

    model_config = ConfigDict(extra="forbid")

    max_error_ratio: float | None = Field(
        None, ge=0, le=1, description="Roll back when the canary's share of server errors over the window is above."
    )
    max_p99_ratio: float | None = Field(
        None, gt=0, description="Roll back when the canary's p99 latency over the stable version's is above."
    )
    min_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description=(
            "Roll back when the canary's answers agree with the stable version's less often than this (each canary "
            "answer is replayed on the stable version, on the side, as shadow traffic is)."
        ),
    )
    window_s: float = Field(30, ge=1, le=3600, description="The sliding window the guards are judged over.")
    min_requests: int = Field(20, ge=1, description="Judge a canary only once it has this many requests in the window.")
    promote_after_s: float | None = Field(
        None, gt=0, description="Pin the canary (end the split) once it has served this long without crossing a guard."
    )


class Outcomes:
    """Each guarded model's recent requests in this worker: (when, version, failed, seconds)."""

    def __init__(self) -> None:
        self.seen: dict[str, deque[tuple[float, str, bool, float]]] = {}
        self.compared: dict[str, deque[tuple[float, str, bool]]] = {}  # a canary's answers replayed on the stable

    def add(self, model: str, version: str, failed: bool, seconds: float) -> None:
        self.seen.setdefault(model, deque(maxlen=100_000)).append((time.monotonic(), version, failed, seconds))

    def agreed(self, model: str, version: str, agree: bool) -> None:
        self.compared.setdefault(model, deque(maxlen=100_000)).append((time.monotonic(), version, agree))

    def window(self, model: str, seconds: float) -> dict[str, Stats]:
        """Per version, over the last ``seconds``: requests, errors, p99 latency, and answers compared with the
        stable version's and how many agreed."""
        since = time.monotonic() - seconds
        seen, compared = self.seen.get(model, deque()), self.compared.get(model, deque())
        while seen and seen[0][0] < since:
            seen.popleft()
        while compared and compared[0][0] < since:
            compared.popleft()
        by_version: dict[str, list[tuple[bool, float]]] = {}
        for _, version, failed, took in seen:
            by_version.setdefault(version, []).append((failed, took))
        stats = {}
        for version, rows in by_version.items():
            latencies = sorted(took for _, took in rows)
            stats[version] = Stats(
                len(rows), sum(failed for failed, _ in rows), latencies[int(0.99 * (len(latencies) - 1))]
            )
        for _, version, agree in self.compared.get(model, ()):
            found = stats.setdefault(version, Stats(0, 0, 0.0))
            found.compared += 1
            found.agreed += agree
        return stats


@dataclass
class Stats:
    requests: int
    errors: int
    p99_s: float
    compared: int = 0
    agreed: int = 0


def verdict(desired: Desired, stats: dict[str, Stats], now: float) -> tuple[str, str, str] | None:
    """(decision, version, reason) for a guarded split, or None: keep going."""
    guard = Guard(**desired.guard) if desired.guard else None
    if guard is None or len(desired.split) < 2:
        return None
    stable = max(desired.split, key=lambda v: desired.split[v])
    none = Stats(0, 0, 0.0)
    s_count, s_p99 = stats.get(stable, none).requests, stats.get(stable, none).p99_s
    for canary in (v for v in desired.split if v != stable):
        found = stats.get(canary, none)
        count, errors, p99 = found.requests, found.errors, found.p99_s
        if guard.min_agreement is not None and found.compared >= guard.min_requests:
            agreement = found.agreed / found.compared
            if agreement < guard.min_agreement:
                return (
                    "rolled_back",
                    canary,
                    f"its answers agree with the stable version's in {agreement:.3f} of {found.compared} compared over "
                    f"the last {guard.window_s:g} s, below min_agreement {guard.min_agreement:g}",
                )
        if count < guard.min_requests:
            continue
        ratio = errors / count
        if guard.max_error_ratio is not None and ratio > guard.max_error_ratio:
            return (
                "rolled_back",
                canary,
                f"error ratio {ratio:.3f} over the last {guard.window_s:g} s ({errors} of {count} requests) is above "
                f"max_error_ratio {guard.max_error_ratio:g}",
            )
        slower = p99 / s_p99 if s_count >= guard.min_requests and s_p99 > 0 else 0.0
        if guard.max_p99_ratio is not None and slower > guard.max_p99_ratio:
            return (
                "rolled_back",
                canary,
                f"p99 latency {p99 * 1000:.1f} ms is {slower:.2f}x the stable version's {s_p99 * 1000:.1f} ms "
                f"over the last {guard.window_s:g} s, above max_p99_ratio {guard.max_p99_ratio:g}",
            )
    if guard.promote_after_s is not None and desired.guard_since and now - desired.guard_since >= guard.promote_after_s:
        canaries = [v for v in desired.split if v != stable]
        if len(canaries) == 1:
            return "promoted", canaries[0], f"served {guard.promote_after_s:g} s within its guards"
    return None


def apply(desired: Desired, decision: str, version: str, reason: str, now: float) -> None:
    """The decision as a change of the desired state: pin the stable version (rollback) or the canary (promote),
    end the split and its guard, and keep the decision on record."""
    stable = max(desired.split, key=lambda v: desired.split[v])
    desired.pin = stable if decision == "rolled_back" else version
    desired.split, desired.guard, desired.guard_since = {}, None, None
    desired.decisions = [
        *desired.decisions[-(KEEP_DECISIONS - 1) :],
        {"at": now, "decision": decision, "version": version, "reason": reason},
    ]


class CanaryWatch:
    """Judges every guarded split of this worker's traffic once a second; any worker may end it for all."""

    def __init__(self, control: Control, outcomes: Outcomes, decided: Any):
        self.control, self.outcomes, self.decided = control, outcomes, decided
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="canary-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            for entry in list(self.control.registry.entries.values()):
                try:
                    await self.judge(entry)
                except Exception:  # a failed pass is logged; the next one tries again
                    log.exception("judging the canary of %s failed", entry.name)

    async def judge(self, entry: ModelEntry) -> None:
        guard = entry.desired.guard
        if not guard:
            return
        found = verdict(entry.desired, self.outcomes.window(entry.name, Guard(**guard).window_s), time.time())
        if found is None:
            return
        decision, version, reason = found
        async with self.control.exclusive():
            if entry.desired.guard != guard or version not in entry.desired.split:
                return  # another worker (or an admin) got there first
            log.warning("canary %s of %s %s: %s", version, entry.name, decision.replace("_", " "), reason)
            await self.control.change(
                entry.name, lambda desired: apply(desired, decision, version, reason, time.time())
            )
        self.decided(entry.name, version, decision)


def compare(answer: Any, shadow: Any) -> tuple[str, float | None]:
    """Whether the shadow's answer agrees with the serving version's, and the relative error of a price."""
    if isinstance(shadow, SHED):
        return "shed", None
    if isinstance(shadow, Exception):
        return "error", None
    served, mirrored = answer.model_dump(), shadow.model_dump()
    for label in ("label", "price_range"):
        if label in served:
            return ("agree" if served[label] == mirrored.get(label) else "disagree"), None
    if "sale_price" in served:
        error = abs(mirrored["sale_price"] - served["sale_price"]) / served["sale_price"]
        return ("agree" if error <= PRICE_AGREEMENT else "disagree"), error
    if "lines" in served:  # a poem: the same form
        same = [len(line) for line in served["lines"]] == [len(line) for line in mirrored["lines"]]
        return ("agree" if same else "disagree"), None
    return ("agree" if served == mirrored else "disagree"), None


class Shadows:
    """This worker's mirrored requests: sent on the side, compared, counted."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.in_flight: Counter[str] = Counter()  # items per model
        self.outcomes: dict[tuple[str, str], Counter[str]] = {}
        self.latencies: dict[tuple[str, str], deque[float]] = {}
        self._tasks: set[asyncio.Task] = set()

    def mirror(self, entry: ModelEntry, answered_by: str, items: list, outputs: list) -> None:
        """Maybe mirror one answered request to the model's shadow version (on the event loop: cheap). Shed
        when callers are waiting: a copy starts only while the version that answered has nothing queued or
        running, so it takes no CPU from a caller's request."""
        spec = entry.desired.shadow
        if not spec or spec["version"] == answered_by or random.random() >= spec["share"]:
            return
        target = entry.versions.get(spec["version"])
        if target is None or target.state != "ready" or target.batcher is None:
            return
        pairs = [(item, out) for item, out in zip(items, outputs) if not isinstance(out, Exception)]
        if not pairs:
            return
        serving = entry.versions.get(answered_by)
        busy = serving is not None and serving.batcher is not None and serving.batcher.busy
        if busy or self.in_flight[entry.name] + len(pairs) > MAX_SHADOW_ITEMS:
            self._count(entry.name, target.name, "shed", len(pairs))
            return
        self._start(entry.name, target, pairs, None)

    def replay_canary(
        self, entry: ModelEntry, answered_by: str, items: list, outputs: list, outcomes: Outcomes
    ) -> None:
        """A guarded canary's answer, replayed on the stable version on the side, for its ``min_agreement``."""
        guard, split = entry.desired.guard, entry.desired.split
        if not guard or guard.get("min_agreement") is None or answered_by not in split:
            return
        stable = max(split, key=lambda v: split[v])
        target = entry.versions.get(stable)
        if answered_by == stable or target is None or target.state != "ready" or target.batcher is None:
            return
        pairs = [(item, out) for item, out in zip(items, outputs) if not isinstance(out, Exception)]
        if pairs and self.in_flight[entry.name] + len(pairs) <= MAX_SHADOW_ITEMS:
            self._start(entry.name, target, pairs, lambda agree: outcomes.agreed(entry.name, answered_by, agree))

    def _start(self, model: str, target: ModelVersion, pairs: list, agreed: Callable[[bool], None] | None) -> None:
        self.in_flight[model] += len(pairs)
        task = asyncio.get_running_loop().create_task(self._run(model, target, pairs, agreed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self, model: str, target: ModelVersion, pairs: list[tuple[Any, Any]], agreed: Callable[[bool], None] | None
    ) -> None:
        """Answer ``pairs``' items with ``target`` below every caller and compare: as shadow traffic (counted), or
        for a canary's guard (``agreed`` hears each comparison)."""
        started = time.perf_counter()
        target.active += 1  # held like a request: not unloaded under it
        try:
            answers = await target.live_batcher.submit(
                [item for item, _ in pairs], None, SHADOW_RANK, time.monotonic() + SHADOW_DEADLINE_S
            )
        except Exception as exc:  # shed, dropped or failed as a whole
            if agreed is None:
                self._count(model, target.name, "shed" if isinstance(exc, SHED) else "error", len(pairs))
            return
        finally:
            target.active -= 1
            self.in_flight[model] -= len(pairs)
        if agreed is not None:
            for (_, served), replayed in zip(pairs, answers):
                outcome, _ = compare(served, replayed)
                if outcome in ("agree", "disagree"):
                    agreed(outcome == "agree")
            return
        seconds = time.perf_counter() - started
        self.metrics.shadow_latency.labels(model, target.name).observe(seconds)
        self.latencies.setdefault((model, target.name), deque(maxlen=1000)).append(seconds)
        for (_, served), mirrored in zip(pairs, answers):
            outcome, error = compare(served, mirrored)
            self._count(model, target.name, outcome, 1)
            if error is not None:
                self.metrics.shadow_error.labels(model, target.name).observe(error)

    def _count(self, model: str, version: str, outcome: str, n: int) -> None:
        self.outcomes.setdefault((model, version), Counter())[outcome] += n
        self.metrics.shadow_requests.labels(model, version, outcome).inc(n)

    def status(self, model: str) -> dict[str, Any]:
        """Per shadow version of ``model`` seen by this worker: counts, agreement and latency."""
        found = {}
        for (name, version), counts in self.outcomes.items():
            if name != model:
                continue
            compared = counts["agree"] + counts["disagree"]
            latencies = sorted(self.latencies.get((name, version), ()))
            found[version] = {
                **dict(counts),
                "agreement": round(counts["agree"] / compared, 4) if compared else None,
                "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None,
            }
        return found
