"""Conformal prediction sets: the threshold's rank, sets that grow as alpha falls, and coverage close to
1 - alpha on answers drawn from the model's own probabilities (where it is calibrated by construction)."""

from __future__ import annotations

import numpy as np
import pytest

from service.models.conformal import ConformalSets, held_out_coverage, label_sets, scores_of


def calibrated(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a calibrated classifier and labels drawn from them."""
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.full(classes, 0.3), size=n)
    labels = np.array([rng.choice(classes, p=p) for p in probabilities])
    return probabilities, labels


def test_the_threshold_is_the_ceil_n_plus_1_times_1_minus_alpha_th_score():
    sets = ConformalSets(np.arange(1, 100) / 100)  # 99 scores 0.01 .. 0.99
    assert sets.threshold(0.1) == pytest.approx(0.90)  # ceil(100 * 0.9) = 90th
    assert sets.threshold(0.5) == pytest.approx(0.50)
    assert ConformalSets(np.arange(1, 21) / 100).threshold(0.01) == float("inf")  # too few scores: every label


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_sets_cover_about_1_minus_alpha_on_new_answers(alpha):
    calibration, truth = calibrated(4000, 10, seed=1)
    new, new_truth = calibrated(4000, 10, seed=2)
    conformal = ConformalSets(scores_of(calibration, truth))
    sets = conformal.sets(new, alpha)
    coverage = np.mean([y in s for y, s in zip(new_truth, sets)])
    assert 1 - alpha - 0.02 <= coverage <= 1 - alpha + 0.02
    for row, chosen in zip(new[:50], sets[:50]):  # most probable first, and nothing less likely left out
        assert chosen == sorted(chosen, key=lambda k: -row[k])
        assert all(row[k] >= max((row[j] for j in range(10) if j not in chosen), default=0) for k in chosen)


def test_a_lower_alpha_never_gives_a_smaller_set():
    calibration, truth = calibrated(1000, 4, seed=3)
    conformal = ConformalSets(scores_of(calibration, truth))
    new, _ = calibrated(200, 4, seed=4)
    for loose, strict in zip(conformal.sets(new, 0.5), conformal.sets(new, 0.01)):
        assert set(loose) <= set(strict)


def test_label_sets_name_labels_and_say_null_without_a_calibration():
    conformal = ConformalSets(np.linspace(0, 0.2, 50))
    probabilities = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]])
    assert label_sets(conformal, probabilities, [0.1, 0.1], ["a", "b", "c"])[0] == ["a"]
    assert label_sets(None, probabilities, [0.1, 0.1], ["a", "b", "c"]) == [None, None]


def test_held_out_coverage_measures_on_rows_it_did_not_calibrate_on():
    probabilities, labels = calibrated(2000, 10, seed=5)
    measured = held_out_coverage(probabilities, labels, 0.1)
    assert 0.87 <= measured["coverage"] <= 0.93 and 1 <= measured["mean_set_size"] <= 10


@pytest.mark.parametrize("data", [None, {"kind": "other", "scores": [0.1] * 30}, {"kind": None}, [1, 2]])
def test_a_bad_calibration_file_is_refused(data):
    with pytest.raises(ValueError):
        ConformalSets.from_json(data)
    good = ConformalSets(np.linspace(0, 1, 30)).to_json()
    assert ConformalSets.from_json(good).threshold(0.1) == pytest.approx(np.linspace(0, 1, 30)[27], abs=1e-6)
