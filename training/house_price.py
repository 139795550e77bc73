"""Train the Ames house-price regressor: ColumnTransformer + MLP on log price, with a ridge baseline.

Data notes (see house_prices/SOURCE.md):
- ``None`` is a real category (MasVnrType) and ``NA`` often means "feature absent", so the CSV is read
  with ``keep_default_na=False, na_values=["NA"]``; absent features become their own one-hot category.
- Houses over 4000 sq ft of living area are removed before splitting, as De Cock (2011) advises: they
  are partial sales or unusual homes that distort a model meant for typical sales. They are counted in
  the manifest.
"""

from __future__ import annotations

import json
import re

import joblib
import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from service import catalog
from service.artifacts import Manifest
from service.models.house_price import FEATURE_TABLE, to_frame
from training.common import Options, plot_history, save_artifact, seed_everything
from training.tabular import fit_mlp, predict

MODEL = catalog.get("house-price")
# Chosen by 5-fold CV on the development data (log-RMSE 0.120 vs 0.123 for one hidden layer of 128).
HYPERPARAMETERS = {"hidden": [256, 64], "out_features": 1, "dropout": 0.5, "skip": True, "lr": 1e-3,
                   "weight_decay": 1e-2, "batch_size": 32, "epochs": 600, "patience": 60,
                   "val_fraction": 0.2, "cv_folds": 5, "max_living_area": 4000, "skew_threshold": 0.75}
DESCRIPTION_NAMES = {"Bedroom": "BedroomAbvGr", "Kitchen": "KitchenAbvGr"}  # Kaggle renamed these two


def read_frame(path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=["NA"])


def feature_table(description_path, train_path) -> list[dict]:
    """Names, kinds, descriptions and allowed categories of the 79 features: the service's input schema.

    Allowed categories are the codes in data_description.txt plus the spellings train.csv really uses
    (Kaggle's data and description disagree on a few, e.g. "NAmes" vs "Names", "C (all)" vs "C").
    """
    described: dict[str, dict] = {}
    current = None
    for line in description_path.read_text().splitlines():
        if (match := re.match(r"^(\w+):\s*(.*)$", line)):
            current = DESCRIPTION_NAMES.get(match.group(1), match.group(1))
            described[current] = {"description": match.group(2).strip(), "codes": []}
        elif current and (match := re.match(r"^\s+(\S[^\t]*?)\s*\t", line)):
            described[current]["codes"].append(match.group(1).strip())
    frame = read_frame(train_path)
    table = []
    for name in frame.columns.drop(["Id", "SalePrice"]):
        info = described[name]
        if name == "MSSubClass" or not pd.api.types.is_numeric_dtype(frame[name]):
            cast = int if name == "MSSubClass" else str
            codes = {cast(c) for c in info["codes"] if c != "NA"} | {cast(v) for v in frame[name].dropna()}
            table.append({"name": name, "kind": "categorical", "description": info["description"],
                          "categories": sorted(codes)})
        else:
            table.append({"name": name, "kind": "numeric", "description": info["description"]})
    return table


def make_preprocessor(train: pd.DataFrame, features: list[dict], skew_threshold: float) -> ColumnTransformer:
    """Impute, log-transform the skewed non-negative columns, scale, and one-hot the categories.

    A categorical column that has missing values in training (NA = "no alley", "no pool", ...) keeps
    "absent" as a category of its own; in any other column a missing value can only mean unknown, so it
    gets the most frequent category rather than an all-zero one-hot row the net never saw.
    """
    numeric = [f["name"] for f in features if f["kind"] == "numeric"]
    categorical = [f["name"] for f in features if f["kind"] == "categorical"]
    skew = train[numeric].skew()
    skewed = [c for c in numeric if abs(skew[c]) > skew_threshold and train[c].min() >= 0]
    plain = [c for c in numeric if c not in skewed]
    absent_is_a_category = [c for c in categorical if train[c].isna().any()]
    always_known = [c for c in categorical if c not in absent_is_a_category]

    def one_hot(imputer: SimpleImputer):
        return make_pipeline(imputer, OneHotEncoder(handle_unknown="ignore", sparse_output=False))

    return ColumnTransformer([
        ("skewed", make_pipeline(SimpleImputer(strategy="median"),
                                 FunctionTransformer(np.log1p, feature_names_out="one-to-one"), StandardScaler()), skewed),
        ("numeric", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), plain),
        ("absent_is_a_category", one_hot(SimpleImputer(strategy="constant", fill_value="absent")), absent_is_a_category),
        ("always_known", one_hot(SimpleImputer(strategy="most_frequent")), always_known),
    ])


def fit_recipe(train: pd.DataFrame, y_train, val: pd.DataFrame, y_val, features: list[dict], hp, opts: Options,
               desc: str):
    """Preprocessor fitted on the training rows only, then the MLP; returns (preprocessor, net, history)."""
    pre = make_preprocessor(train, features, hp["skew_threshold"]).fit(train)
    x_train, x_val = pre.transform(train), pre.transform(val)
    hp["in_features"] = x_train.shape[1]
    net, history = fit_mlp(x_train, y_train, x_val, y_val, hp, classify=False, device=opts.torch_device(), desc=desc)
    return pre, net, history


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a).ravel() - np.asarray(b).ravel()) ** 2)))


def load(opts: Options, hp: dict) -> tuple:
    """(feature table, features, log prices, train rows, validation rows, outliers removed): the exact split used.

    The feature table comes from all of train.csv and data_description.txt, also with ``--quick``."""
    data_file = opts.data_file("house_prices", "train.csv")
    features = feature_table(opts.data_file("house_prices", "data_description.txt"), data_file)
    raw = read_frame(data_file)
    outliers = int((raw["GrLivArea"] > hp["max_living_area"]).sum())
    raw = raw[raw["GrLivArea"] <= hp["max_living_area"]]
    if opts.quick:
        raw = raw.sample(n=min(300, len(raw)), random_state=opts.seed)
    train_rows, val_rows = train_test_split(np.arange(len(raw)), test_size=hp["val_fraction"], random_state=opts.seed)
    frame = to_frame(raw, features)
    return features, frame, np.log(raw["SalePrice"].to_numpy(np.float64)), train_rows, val_rows, outliers


def train(opts: Options) -> Manifest:
    seed_everything(opts.seed)
    hp = dict(HYPERPARAMETERS, seed=opts.seed)
    data_file = opts.data_file("house_prices", "train.csv")
    description_file = opts.data_file("house_prices", "data_description.txt")
    if opts.quick:
        hp.update(epochs=15, patience=5)
    features, frame, y, train_rows, val_rows, outliers = load(opts, hp)

    pre, net, history = fit_recipe(frame.iloc[train_rows], y[train_rows], frame.iloc[val_rows], y[val_rows],
                                   features, hp, opts, "house-price")
    x_train, x_val = pre.transform(frame.iloc[train_rows]), pre.transform(frame.iloc[val_rows])
    ridge = RidgeCV(alphas=np.logspace(-1, 3, 30)).fit(x_train, y[train_rows])
    metrics = {
        "val_rmse_log_price": round(rmse(predict(net, x_val), y[val_rows]), 4),
        "baseline_ridge_val_rmse_log_price": round(rmse(ridge.predict(x_val), y[val_rows]), 4),
        "outliers_removed": outliers,
    }
    method = (f"RMSE of log(SalePrice) on a {hp['val_fraction']:.0%} random validation split of {data_file.name} "
              f"({len(val_rows)} rows, seed {opts.seed}) after removing houses over {hp['max_living_area']} sq ft")
    if not opts.quick:
        scores = []
        for k, (tr, va) in enumerate(KFold(hp["cv_folds"], shuffle=True, random_state=opts.seed).split(frame)):
            fold_pre, fold_net, _ = fit_recipe(frame.iloc[tr], y[tr], frame.iloc[va], y[va], features, dict(hp), opts,
                                               f"cv fold {k + 1}")
            scores.append(rmse(predict(fold_net, fold_pre.transform(frame.iloc[va])), y[va]))
        metrics.update(cv_rmse_log_price_mean=round(float(np.mean(scores)), 4),
                       cv_rmse_log_price_std=round(float(np.std(scores)), 4))
        method += f"; plus {hp['cv_folds']}-fold cross-validation of the whole recipe on all {len(y)} rows"

    folder = opts.artifact_dir(MODEL.folder)
    (folder / FEATURE_TABLE).write_text(json.dumps(features, indent=1) + "\n")
    joblib.dump(pre, folder / "preprocessor.joblib")
    plot_history(history, folder / "learning_curves.png", ["train_loss", "val_rmse"], "house-price MLP (log price)")
    return save_artifact(folder, net, name=MODEL.name, hyperparameters=hp, metrics=metrics,
                         metrics_method=method, data_files=[data_file, description_file], history=history)
