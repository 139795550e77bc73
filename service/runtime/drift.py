"""Drift alarms in process: each served version's recent rows against the reference profile in its artifact.

Training writes ``profile.json`` into every new version (training/profile.py): per input feature the bins of
its values on the reference rows (ten quantile bins of a number, one slot per category of a few-valued or
categorical one) and the share of the reference rows in each, and the same for the model's answers (the
feature ``output``). A version whose artifact has one keeps a sliding window of the bin of every feature of
its last ``SERVE_DRIFT_WINDOW`` rows, and once the window holds ``SERVE_DRIFT_MIN_COUNT`` rows it exports each
feature's population stability index against the reference,

    PSI = sum over bins of (window share - reference share) * ln(window share / reference share),

as ``model_feature_drift_psi{model,version,feature}``, with ``model_drift_window_size{model,version}``. Below
0.1 the feature is as in training, 0.1-0.25 worth watching, above 0.25 it has drifted.

The cost is on the model's worker thread, right after a batch's forward pass (``Predictor.run``): the batch's
columns become bin indices by ``searchsorted`` (or a dictionary look-up for text categories), written into a
ring buffer while running counts per bin are updated by ``bincount``. The PSI values are recomputed from the
counts and the gauges set at most every ``PUBLISH_S`` seconds, and at each scrape of ``/metrics``.

The binning of both sides is this module's :class:`Bins`, so the reference shares and the live ones are
counted by the same code.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import chain, repeat
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from service.artifacts import Artifact, ArtifactError

if TYPE_CHECKING:
    from service.models.base import Predictor
    from service.runtime.metrics import Metrics
    from service.settings import Settings

log = logging.getLogger("service.runtime.drift")

PROFILE = "profile.json"  # in the artifact, listed in the manifest like every other file
FORMAT = 1
OUTPUT = "output"  # the feature name of the model's answers
FLOOR = 1e-4  # a share below this counts as this, so an empty bin on either side keeps the PSI finite
PUBLISH_S = 0.5  # the gauges are set at most this often from the worker thread (and at every scrape)


@dataclass(frozen=True, eq=False)
class Bins:
    """How one feature's values fall into slots, and the reference share of each slot.

    ``numeric``: ``edges`` e_0 < e_1 < ... < e_k make the slots (-inf, e_0], (e_0, e_1], ..., (e_k, inf), then
    one slot for missing values (NaN). ``categorical``: one slot per category (``None`` is the category of a
    missing value where the reference has such values), then one for any value not among them ("other")."""

    name: str
    kind: Literal["numeric", "categorical"]
    edges: np.ndarray | None = None
    categories: tuple[Any, ...] = ()
    shares: np.ndarray | None = None  # per slot; None until counted

    @classmethod
    def numeric(cls, name: str, edges: Sequence[float] | np.ndarray) -> Bins:
        values = np.asarray(edges, np.float64)
        if values.ndim != 1 or not np.isfinite(values).all() or (np.diff(values) <= 0).any():
            raise ValueError(f"{name}: bin edges must be finite and strictly increasing")
        return cls(name, "numeric", edges=values)

    @classmethod
    def categorical(cls, name: str, categories: Sequence[Any]) -> Bins:
        if len(set(categories)) != len(categories):
            raise ValueError(f"{name}: categories must be distinct")
        kinds = {type(c) for c in categories if c is not None}
        if not kinds <= {int, float} and not kinds <= {str}:
            raise ValueError(f"{name}: categories must be all numbers or all strings (and null)")
        return cls(name, "categorical", categories=tuple(categories))

    @property
    def slots(self) -> int:
        if self.kind == "numeric":
            assert self.edges is not None
            return len(self.edges) + 2  # the bins, then missing
        return len(self.categories) + 1  # the categories, then other

    @property
    def labels(self) -> list[str]:
        """A name per slot, for people reading the profile."""
        if self.kind == "numeric":
            assert self.edges is not None
            bounds = ["-inf", *(f"{e:g}" for e in self.edges), "inf"]
            return [f"({low}, {high}]" for low, high in zip(bounds, bounds[1:])] + ["missing"]
        return [("missing" if c is None else str(c)) for c in self.categories] + ["other"]

    def index(self, values: Any) -> np.ndarray:
        """The slot of each value (as :class:`Binner` finds them for many features at once)."""
        return self._binner.slots({self.name: values})[:, 0]

    @cached_property
    def _binner(self) -> Binner:
        return Binner((self,))

    def counted(self, values: Any) -> Bins:
        """These bins with the share of ``values`` in each slot: the reference (training calls this)."""
        counts = np.bincount(self.index(values), minlength=self.slots)
        return Bins(self.name, self.kind, self.edges, self.categories, counts / max(1, counts.sum()))

    def to_json(self) -> dict:
        assert self.shares is not None, f"{self.name}: count the reference first (counted)"
        shape = {"edges": self.edges.tolist()} if self.edges is not None else {"categories": list(self.categories)}
        return {
            "kind": self.kind,
            **shape,
            "shares": [round(float(s), 6) for s in self.shares],
            "slots": self.labels,
        }

    @classmethod
    def from_json(cls, name: str, data: Any) -> Bins:
        if not isinstance(data, dict) or data.get("kind") not in ("numeric", "categorical"):
            raise ValueError(f"{name}: kind must be numeric or categorical")
        if data["kind"] == "numeric":
            bins = cls.numeric(name, data.get("edges", []))
        else:
            bins = cls.categorical(name, data.get("categories", []))
        shares = np.asarray(data.get("shares"), np.float64)
        if shares.shape != (bins.slots,) or not np.isfinite(shares).all() or (shares < 0).any():
            raise ValueError(f"{name}: shares must be {bins.slots} non-negative numbers, one per slot")
        if abs(shares.sum() - 1) > 1e-3:
            raise ValueError(f"{name}: shares must add up to 1, not {shares.sum():.4f}")
        return Bins(name, bins.kind, bins.edges, bins.categories, shares)


class Binner:
    """The slots of a batch's values for many features at once, vectorised by kind: every number column binned
    by one broadcast comparison with its edges (padded with +inf), every few-valued number column by one
    broadcast equality with its categories (padded with NaN), a text column by a dictionary look-up per value."""

    def __init__(self, features: Sequence[Bins]):
        self.features = tuple(features)
        numeric = [j for j, f in enumerate(self.features) if f.kind == "numeric"]
        numbered = [
            j
            for j, f in enumerate(self.features)
            if f.kind == "categorical" and any(isinstance(c, (int, float)) for c in f.categories)
        ]
        self.numeric, self.numbered = np.array(numeric, np.intp), np.array(numbered, np.intp)
        self.text = [j for j, f in enumerate(self.features) if j not in numeric and j not in numbered]
        edges = [np.asarray(self.features[j].edges) for j in numeric]  # a numeric feature always has its edges
        self.edges = np.full((len(edges), max(map(len, edges), default=0)), np.inf)
        for row, e in enumerate(edges):
            self.edges[row, : len(e)] = e
        self.numeric_missing = np.array([len(e) + 1 for e in edges], np.intp)
        categories = [self.features[j].categories for j in numbered]
        self.categories = np.full((len(numbered), max(map(len, categories), default=0)), np.nan)
        for row, cs in enumerate(categories):
            self.categories[row, : len(cs)] = [np.nan if c is None else c for c in cs]
        self.numbered_other = np.array([len(cs) for cs in categories], np.intp)
        self.numbered_missing = np.array([cs.index(None) if None in cs else len(cs) for cs in categories], np.intp)
        self.lookups = {j: self.lookup(self.features[j].categories) for j in self.text}

    @staticmethod
    def lookup(categories: tuple[Any, ...]) -> dict[Any, int]:
        """Each category's slot; None and NaN (as numpy and the house table spell missing) go to missing's."""
        missing = categories.index(None) if None in categories else len(categories)
        return {None: missing, np.nan: missing, **{c: i for i, c in enumerate(categories) if c is not None}}

    def slots(self, columns: Mapping[str, Any], keep: np.ndarray | None = None) -> np.ndarray:
        """(rows, features) slot indices of ``columns`` (name -> values), of the rows ``keep`` marks (all: None)."""

        def block(features: np.ndarray) -> np.ndarray:  # (rows, features), the fastest way for a few rows
            x = np.array([columns[self.features[j].name] for j in features], np.float64).T
            return x if keep is None else x[keep]

        rows = int(keep.sum()) if keep is not None else len(columns[self.features[0].name])
        slots = np.empty((rows, len(self.features)), np.intp)
        if len(self.numeric):
            x = block(self.numeric)
            binned = (x[:, :, None] > self.edges[None]).sum(axis=2)  # edges below: (e_i-1, e_i] holds e_i
            slots[:, self.numeric] = np.where(np.isnan(x), self.numeric_missing, binned)
        if len(self.numbered):
            x = block(self.numbered)
            equal = x[:, :, None] == self.categories[None]
            absent = np.where(np.isnan(x), self.numbered_missing, self.numbered_other)
            slots[:, self.numbered] = np.where(equal.any(axis=2), equal.argmax(axis=2), absent)
        if self.text:  # one look-up per value, every text column in one pass
            texts = [np.asarray(columns[self.features[j].name], object) for j in self.text]
            texts = texts if keep is None else [values[keep] for values in texts]
            looked_up = (map(self.lookups[j].get, values, repeat(-1)) for j, values in zip(self.text, texts))
            found = np.fromiter(chain.from_iterable(looked_up), np.intp, count=rows * len(self.text))
            found = found.reshape(len(self.text), rows)
            for k, i in zip(*np.nonzero(found < 0)):  # a value the reference never had, or another NaN object
                value, categories = texts[k][i], self.features[self.text[k]].categories
                missing = value != value and None in categories
                found[k, i] = categories.index(None) if missing else len(categories)
            slots[:, self.text] = found.T
        return slots


def psi_terms(reference: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Each slot's term of the population stability index, (q - p) ln(q / p), every share floored at FLOOR."""
    p, q = np.maximum(reference, FLOOR), np.maximum(window, FLOOR)
    return (q - p) * np.log(q / p)


def psi(reference: np.ndarray, window: np.ndarray) -> float:
    """Population stability index of the shares ``window`` against ``reference`` (the same slots)."""
    return float(psi_terms(reference, window).sum())


@dataclass(frozen=True)
class Profile:
    """A version's reference: the bins of every feature (the answers last, as ``output``)."""

    features: tuple[Bins, ...]
    rows: int
    source: str

    @classmethod
    def from_json(cls, data: Any) -> Profile:
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("features"), dict):
            raise ValueError(f"not a profile of format {FORMAT} with a 'features' object")
        features = tuple(Bins.from_json(str(name), value) for name, value in data["features"].items())
        if not features:
            raise ValueError("it profiles no feature")
        return cls(features, int(data.get("rows", 0)), str(data.get("source", "")))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "rows": self.rows,
            "source": self.source,
            "features": {f.name: f.to_json() for f in self.features},
        }

    @classmethod
    def of(cls, artifact: Artifact) -> Profile | None:
        """The artifact's profile, read through its hash check; None when it has none (an older version)."""
        if PROFILE not in artifact.manifest.files:
            return None
        try:
            return cls.from_json(artifact.load_json(PROFILE))
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"{artifact.label}/{PROFILE} is not a valid profile: {exc}") from None


class DriftWatcher:
    """One version's sliding window of bin indices against its profile, and its gauges.

    ``observe`` runs on the version's worker thread; ``refresh`` (a scrape) and ``status`` (the admin API) on
    the event loop: the counts and the gauges change under one lock."""

    def __init__(
        self,
        model: str,
        version: str,
        profile: Profile,
        *,
        window: int,
        min_count: int,
        metrics: Metrics | None = None,
    ):
        self.model, self.version, self.profile = model, version, profile
        self.window, self.min_count, self.metrics = window, min_count, metrics
        self.features = profile.features
        self.binner = Binner(self.features)
        slots = np.array([f.slots for f in self.features])
        self.offsets = np.concatenate([[0], np.cumsum(slots)[:-1]])  # where each feature's slots start
        self.reference = np.concatenate([f.shares for f in self.features if f.shares is not None])
        self.ring = np.zeros((window, len(self.features)), np.intp)  # flat slot per row and feature
        self.counts = np.zeros(int(slots.sum()), np.int64)
        self.head = self.size = 0  # next place to write; rows held
        self.lock = threading.Lock()
        self.dirty, self.published_at, self.closed = False, -math.inf, False
        self.failure: str | None = None  # why it stopped watching, if it did
        self.psi: dict[str, float] = {}  # as last published
        self._gauges: dict[str, Any] = {}
        self._window_gauge: Any = None
        if metrics is not None:
            metrics.before_scrape.append(self.refresh)

    # -- on the worker thread ----------------------------------------------------------------------------

    def observe(self, predictor: Predictor, batch: list[Any], outputs: Sequence[Any]) -> None:
        """Count a batch: its items that did not fail, as ``predictor.drift_columns`` gives them. Never raises:
        a failure stops the watching (logged, and shown by /admin/models), never a request."""
        if self.closed or self.failure is not None:
            return
        try:
            ok = np.fromiter((not isinstance(out, BaseException) for out in outputs), bool, count=len(outputs))
            if not ok.any():
                return
            columns = predictor.drift_columns(batch, outputs)
            slots = self.binner.slots(columns, None if ok.all() else ok) + self.offsets
            with self.lock:
                self.push(slots)
                if time.monotonic() - self.published_at >= PUBLISH_S:
                    self._publish()
        except Exception as exc:  # a bug here must not fail answers that are already made
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("stopped watching drift of %s version %s", self.model, self.version)

    def push(self, slots: np.ndarray) -> None:
        """Add rows of flat slot indices, the oldest leaving once the window is full (call under the lock)."""
        if self.window == 0:
            return
        slots = slots[-self.window :]
        n = len(slots)
        at = (self.head + np.arange(n)) % self.window
        overwritten = max(0, self.size + n - self.window)  # the last ones of `at` held the oldest rows
        if overwritten:
            self.counts -= np.bincount(self.ring[at[n - overwritten :]].ravel(), minlength=len(self.counts))
        self.counts += np.bincount(slots.ravel(), minlength=len(self.counts))
        self.ring[at] = slots
        self.head, self.size = (self.head + n) % self.window, min(self.window, self.size + n)
        self.dirty = True

    # -- anywhere ----------------------------------------------------------------------------------------

    def values(self) -> dict[str, float]:
        """Each feature's PSI over the window as it is now (call under the lock)."""
        per_feature = np.add.reduceat(psi_terms(self.reference, self.counts / max(1, self.size)), self.offsets)
        return {f.name: float(v) for f, v in zip(self.features, per_feature)}

    def _publish(self) -> None:
        """Recompute and set the gauges, once the window holds min_count rows (call under the lock)."""
        self.published_at, self.dirty = time.monotonic(), False
        if self.size < self.min_count or self.closed:
            return
        self.psi = self.values()
        if self.metrics is None:
            return
        if self._window_gauge is None:  # the series exist from the first export on, never before
            self._window_gauge = self.metrics.drift_window.labels(self.model, self.version)
            self._gauges = {f: self.metrics.drift_psi.labels(self.model, self.version, f) for f in self.psi}
        for feature, value in self.psi.items():
            self._gauges[feature].set(value)
        self._window_gauge.set(self.size)

    def refresh(self) -> None:
        """Publish what changed since the last time (before a scrape: the gauges then match the window)."""
        with self.lock:
            if self.dirty:
                self._publish()

    def reset(self) -> None:
        """Forget every row (the warm-up's example is no traffic)."""
        with self.lock:
            self.counts[:] = 0
            self.head = self.size = 0
            self.psi = {}

    def close(self) -> None:
        """The version is retired: its series stop being reported."""
        with self.lock:
            self.closed = True
            if self.metrics is not None:
                if self.refresh in self.metrics.before_scrape:
                    self.metrics.before_scrape.remove(self.refresh)
                if self._window_gauge is not None:
                    self.metrics.forget(self.metrics.drift_window, self.model, self.version)
                    for feature in self._gauges:
                        self.metrics.forget(self.metrics.drift_psi, self.model, self.version, feature)
            self._gauges, self._window_gauge = {}, None

    def status(self) -> dict[str, Any]:
        """For GET /admin/models: the window and its largest PSI, as of now."""
        self.refresh()
        worst = max(self.psi.items(), key=lambda kv: kv[1], default=(None, None))
        return {
            "watched": self.failure is None,
            "reason": f"stopped: {self.failure}" if self.failure else None,
            "window_size": self.size,
            "window": self.window,
            "min_count": self.min_count,
            "max_psi": None if worst[1] is None else round(worst[1], 4),
            "max_psi_feature": worst[0],
        }


def not_watched(reason: str) -> dict[str, Any]:
    """The drift status of a version without a watcher."""
    return {"watched": False, "reason": reason}


def watch(
    model: str, version: str, artifact: Artifact, predictor: Predictor, settings: Settings, metrics: Metrics | None
) -> tuple[DriftWatcher | None, str | None]:
    """A watcher for a loaded version, or (None, why not): no profile in its artifact (trained before
    profiles), a model without drift columns, a window of 0 (watching turned off) or a profile that does
    not read (logged; the version still serves)."""
    from service.models.base import Predictor  # the models import the runtime, not the other way round

    if settings.drift_window == 0:
        return None, "off (SERVE_DRIFT_WINDOW=0)"
    if type(predictor).drift_columns is Predictor.drift_columns:
        return None, "the model has no drift columns"
    try:
        profile = Profile.of(artifact)
    except ArtifactError as exc:
        log.error("not watching drift of %s version %s: %s", model, version, exc)
        return None, str(exc)
    if profile is None:
        return None, f"its artifact has no {PROFILE} (trained before profiles): retrain it to watch drift"
    watcher = DriftWatcher(
        model, version, profile, window=settings.drift_window, min_count=settings.drift_min_count, metrics=metrics
    )
    return watcher, None
