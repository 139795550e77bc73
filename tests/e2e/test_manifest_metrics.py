"""The committed tabular models' claims recomputed from the data: their accuracy or error on the development
rows, their weights refitted from the manifest's recipe, and that recipe's cross-validated scores (training
runs of a kind; the artifacts' own checks: tests/unit/test_artifacts.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import committed
from training.common import Options
from training.selection import Protocol
from training.tabular import predict


def test_phone_manifest_metrics_reproduce(data_dir):
    """The committed phone net's claims, recomputed from the data: its accuracy on the development rows, its
    inputs and weights refitted from the manifest's recipe, and that recipe's repeated-CV accuracy and ECE."""
    from training import phone_price
    from training.selection import cross_validate

    predictor = committed("phone-price").predictor
    hp, metrics = predictor.artifact.manifest.hyperparameters, predictor.artifact.manifest.metrics
    _, x, y = phone_price.load(Options(data_dir=data_dir))
    outputs = predict(predictor.net, predictor.preprocessor.transform(x))
    assert float((outputs.argmax(1) == y).mean()) == pytest.approx(metrics["train_accuracy"], abs=1e-4)

    with phone_price.single_threaded():  # about 5 s: 25 folds of L-BFGS fits
        scaler, ranking = phone_price.prepare(x, y, hp)
        net, _ = phone_price.fit_net(scaler.transform(x), y, hp)
        recipe = phone_price.recipe(phone_price.Choice.served(hp), phone_price.Folds(x, y, hp), hp)
        cv = cross_validate(y, {"served": recipe}, phone_price.NET_SCORES, phone_price.PROTOCOL)["served"]
    assert ranking[: hp["features"]].tolist() == hp["inputs"]
    assert np.allclose(scaler.mean_, predictor.preprocessor.mean)
    assert np.allclose(scaler.scale_, predictor.preprocessor.scale)
    committed_weights = predictor.net.state_dict()
    for name, value in net.float().state_dict().items():
        assert torch.allclose(value, committed_weights[name], rtol=1e-3, atol=1e-4), name

    table, served = metrics["cv"]["candidates"], metrics["cv"]["served"]
    assert metrics["cv"]["protocol"] == phone_price.PROTOCOL.describe(len(y))
    assert cv == pytest.approx(table[served], abs=1e-4)
    assert cv == pytest.approx(
        {
            "accuracy_mean": metrics["cv_accuracy_mean"],
            "accuracy_sd": metrics["cv_accuracy_sd"],
            "ece_mean": metrics["ece_mean"],
            "ece_sd": metrics["ece_sd"],
        },
        abs=1e-4,
    )
    baselines = [row["accuracy_mean"] for name, row in table.items() if not name.startswith(phone_price.NET)]
    assert len(baselines) >= 2 * len(phone_price.CS) and cv["accuracy_mean"] >= max(baselines)
    assert cv["accuracy_mean"] >= 0.975


def test_house_manifest_metrics_reproduce(data_dir):
    """The CV claims recompute from the committed out-of-fold predictions and the data, the interval's
    quantile from the same predictions, and the served weights reproduce their training RMSE."""
    from training import house_price

    predictor = committed("house-price").predictor
    manifest = predictor.artifact.manifest
    hp, metrics, cv = manifest.hyperparameters, manifest.metrics, manifest.metrics["cv"]
    _, frame, y, _ = house_price.load(Options(data_dir=data_dir), hp)
    fitted = house_price.predict(predictor.net, predictor.preprocessor.transform(frame))
    assert house_price.rmse(fitted, y) == pytest.approx(metrics["train_rmse_log_price"], abs=1e-4)

    recorded = predictor.artifact.load_json(house_price.CV_PREDICTIONS)
    protocol = Protocol(recorded["folds"], recorded["repeats"], stratified=False, seed=recorded["seed"])
    assert recorded["candidate"] == cv["served"] and cv["protocol"] == protocol.describe(len(y))
    out_of_fold = np.array(recorded["log_price"])
    scores = [
        house_price.rmse(out_of_fold[k // protocol.folds, val], y[val]) for k, (_, val) in enumerate(protocol.splits(y))
    ]
    assert np.mean(scores) == pytest.approx(metrics["cv_rmse_log_price_mean"], abs=1e-4)
    assert np.std(scores) == pytest.approx(metrics["cv_rmse_log_price_sd"], abs=1e-4)
    assert cv["candidates"][cv["served"]]["rmse_log_price_mean"] == metrics["cv_rmse_log_price_mean"]
    assert hp["interval_90_log_halfwidth"] == house_price.conformal_halfwidth(y - out_of_fold, hp["interval_level"])
    interval = house_price.interval_under_cv(y, out_of_fold, protocol, hp["interval_level"])
    assert interval == {key: metrics[key] for key in interval}

    means = {name: row["rmse_log_price_mean"] for name, row in cv["candidates"].items()}
    baselines = [name for name in means if not name.startswith("net")]
    assert {"ridge", "lasso", "gradient"} <= {name.split()[0] for name in baselines}
    assert means[cv["best_baseline"]] == min(means[name] for name in baselines)
    assert metrics["cv_rmse_log_price_mean"] <= 0.105 and metrics["cv_rmse_log_price_mean"] < means[cv["best_baseline"]]
    assert 0.88 <= metrics["interval_90_coverage_mean"] <= 0.92
