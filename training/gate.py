"""The quality gate a new version passes before it is published as servable.

Each trainer writes ``metrics["baselines"]``: plain models scored the same way as the served one (on the same
folds, or the same validation split). The gate compares the new score with those baselines, with the newest
servable version trained on the same data (if any), and with a floor kept here per model. A version that
loses is not published unless ``--force`` is given; then its manifest says so and the server never makes it
the default on its own (``Manifest.refusal``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.artifacts import MANIFEST, Manifest, QualityGate, sha256_file, version_folders


@dataclass(frozen=True)
class Rule:
    metric: str  # a key of the manifest's metrics
    higher_is_better: bool
    floor: float  # the worst score this model may have and still serve
    tolerance: float  # how much worse than the version before it (same data) still passes: CV noise, not a loss


# Floors: well below the committed versions (phone 0.979, house 0.104, fashion 0.952, poem 149.5) and well
# above what a broken run gives (a near-random phone model: 0.29; a house model that predicts the mean: 0.40).
RULES = {
    "phone-price": Rule("cv_accuracy_mean", True, floor=0.90, tolerance=0.01),
    "house-price": Rule("cv_rmse_log_price_mean", False, floor=0.16, tolerance=0.005),
    "fashion": Rule("val_accuracy", True, floor=0.85, tolerance=0.01),
    "poem": Rule("val_perplexity", False, floor=300.0, tolerance=10.0),
}


def previous_score(repository: Path, rule: Rule, data: dict[str, str]) -> dict | None:
    """The newest servable version in ``repository`` trained on the same data files, with its score: only
    then are the two scores comparable."""
    for name, folder in reversed(version_folders(repository).items()):
        try:
            manifest = Manifest.model_validate_json((folder / MANIFEST).read_bytes())
        except (OSError, ValueError):
            continue
        if manifest.refusal is None and manifest.data == data and rule.metric in manifest.metrics:
            return {"version": name, "score": float(manifest.metrics[rule.metric])}
    return None


def judge(model: str, metrics: dict, data_files: list[Path], repository: Path) -> QualityGate | None:
    """The verdict on a new version's metrics; None for a model without a rule (not judged)."""
    rule = RULES.get(model)
    if rule is None:
        return None
    score = float(metrics[rule.metric])
    baselines = {name: float(value) for name, value in metrics.get("baselines", {}).items()}
    committed = previous_score(repository, rule, {p.name: sha256_file(p) for p in data_files})

    def worse(a: float, b: float) -> bool:
        return a < b if rule.higher_is_better else a > b

    reasons = [
        f"{rule.metric} {score:g} is worse than {name}'s {value:g}"
        for name, value in baselines.items()
        if worse(score, value)
    ]
    if worse(score, rule.floor):
        reasons.append(f"{rule.metric} {score:g} is worse than this model's floor {rule.floor:g}")
    if committed is not None:
        allowed = committed["score"] - rule.tolerance if rule.higher_is_better else committed["score"] + rule.tolerance
        if worse(score, allowed):
            reasons.append(
                f"{rule.metric} {score:g} is worse than version {committed['version']}'s {committed['score']:g} "
                f"on the same data by more than {rule.tolerance:g}"
            )
    return QualityGate(
        metric=rule.metric,
        higher_is_better=rule.higher_is_better,
        score=score,
        baselines=baselines,
        floor=rule.floor,
        committed=committed,
        passed=not reasons,
        reasons=reasons,
    )


def table(gate: QualityGate) -> str:
    """The short table a training run ends with: score, baselines, floor, verdict."""
    better = "higher" if gate.higher_is_better else "lower"
    rows = [("this version", gate.score), *gate.baselines.items(), ("floor", gate.floor)]
    if gate.committed:
        rows.append((f"version {gate.committed['version']} (same data)", gate.committed["score"]))
    width = max(len(name) for name, _ in rows)
    lines = [f"quality gate: {gate.metric} ({better} is better)"]
    lines += [f"  {name:<{width}}  {value:.4f}" for name, value in rows]
    verdict = "PASS" if gate.passed else "FAIL: " + "; ".join(gate.reasons)
    lines.append(f"  verdict: {verdict}")
    return "\n".join(lines)
