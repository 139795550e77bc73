"""Train the phone price-band classifier: StandardScaler + MLP, with a logistic-regression baseline.

Reads ``phone_price/train.csv``; fits the scaler on the training split only, early-stops on a
stratified 20 % validation split, and cross-validates the same recipe with 5 folds.
"""

from __future__ import annotations

import joblib
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler

from service import catalog
from service.artifacts import Manifest
from service.models.phone_price import FEATURES, LABELS
from training.common import Options, plot_confusion, plot_history, save_artifact, seed_everything
from training.tabular import fit_mlp, predict

MODEL = catalog.get("phone-price")
# Chosen by 5-fold CV on the development data: a small hidden layer beside a linear skip path.
HYPERPARAMETERS = {"in_features": len(FEATURES), "hidden": [16], "out_features": 4, "dropout": 0.2,
                   "skip": True, "lr": 1e-3, "weight_decay": 1e-3, "batch_size": 32, "epochs": 1000, "patience": 100,
                   "val_fraction": 0.2, "cv_folds": 5}


def fit_recipe(x_train, y_train, x_val, y_val, hp, opts: Options, desc: str):
    """Scaler fitted on the training rows only, then the MLP; returns (scaler, net, history)."""
    scaler = StandardScaler().fit(x_train)
    net, history = fit_mlp(scaler.transform(x_train), y_train, scaler.transform(x_val), y_val, hp,
                           classify=True, device=opts.torch_device(), desc=desc)
    return scaler, net, history


def load(opts: Options, hp: dict) -> tuple:
    """(data file, x, y, x_train, x_val, y_train, y_val): the rows and the exact validation split used."""
    data_file = opts.data_file("phone_price", "train.csv")
    frame = pd.read_csv(data_file)
    if opts.quick:
        frame = frame.sample(n=min(400, len(frame)), random_state=opts.seed)
    x, y = frame[FEATURES].to_numpy(np.float64), frame["price_range"].to_numpy()
    split = train_test_split(x, y, test_size=hp["val_fraction"], stratify=y, random_state=opts.seed)
    return (data_file, x, y, *split)


def train(opts: Options) -> Manifest:
    seed_everything(opts.seed)
    hp = dict(HYPERPARAMETERS, seed=opts.seed)
    if opts.quick:
        hp.update(epochs=15, patience=5)
    data_file, x, y, x_train, x_val, y_train, y_val = load(opts, hp)

    scaler, net, history = fit_recipe(x_train, y_train, x_val, y_val, hp, opts, "phone-price")
    val_pred = predict(net, scaler.transform(x_val)).argmax(1)
    baseline = LogisticRegression(max_iter=5000).fit(scaler.transform(x_train), y_train)
    metrics = {
        "val_accuracy": round(accuracy_score(y_val, val_pred), 4),
        "baseline_logistic_regression_val_accuracy": round(baseline.score(scaler.transform(x_val), y_val), 4),
    }
    method = f"stratified {hp['val_fraction']:.0%} validation split of {data_file.name} ({len(y_val)} rows, seed {opts.seed})"
    if not opts.quick:
        folds = StratifiedKFold(hp["cv_folds"], shuffle=True, random_state=opts.seed).split(x, y)
        scores = []
        for k, (tr, va) in enumerate(folds):
            fold_scaler, fold_net, _ = fit_recipe(x[tr], y[tr], x[va], y[va], hp, opts, f"cv fold {k + 1}")
            scores.append(accuracy_score(y[va], predict(fold_net, fold_scaler.transform(x[va])).argmax(1)))
        metrics.update(cv_accuracy_mean=round(float(np.mean(scores)), 4), cv_accuracy_std=round(float(np.std(scores)), 4))
        method += f"; plus {hp['cv_folds']}-fold stratified cross-validation of the whole recipe on all {len(y)} rows"

    folder = opts.artifact_dir(MODEL.folder)
    joblib.dump(scaler, folder / "preprocessor.joblib")
    plot_history(history, folder / "learning_curves.png", ["train_loss", "val_loss", "val_accuracy"],
                 "phone-price MLP")
    plot_confusion(confusion_matrix(y_val, val_pred, labels=range(4)), LABELS, folder / "confusion_matrix.png",
                   f"validation accuracy {metrics['val_accuracy']:.3f}")
    return save_artifact(folder, net, name=MODEL.name, hyperparameters=hp, metrics=metrics,
                         metrics_method=method, data_files=[data_file], history=history)
