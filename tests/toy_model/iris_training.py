"""Train the toy iris model (copied to training/iris.py by tests/e2e/test_adding_a_model.py): scaler + MLP."""

import pandas as pd
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from service import catalog
from service.artifacts import Manifest
from training.common import Options, save_artifact, save_preprocessor, seed_everything
from training.tabular import fit_mlp, predict

MODEL = catalog.get("iris")
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
HYPERPARAMETERS = {
    "in_features": 4,
    "hidden": [8],
    "out_features": 3,
    "dropout": 0.0,
    "lr": 1e-2,
    "weight_decay": 1e-4,
    "batch_size": 16,
    "epochs": 200,
    "patience": 20,
}


def train(opts: Options) -> Manifest:
    seed_everything(opts.seed)
    hp = dict(HYPERPARAMETERS, seed=opts.seed, **({"epochs": 30, "patience": 5} if opts.quick else {}))
    data_file = opts.data_file("iris", "iris.csv")
    frame = pd.read_csv(data_file)
    x, y = frame[FEATURES].to_numpy(float), frame["species"].to_numpy()
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=opts.seed)
    scaler = StandardScaler().fit(x_train)
    net, history = fit_mlp(
        scaler.transform(x_train),
        y_train,
        scaler.transform(x_val),
        y_val,
        hp,
        classify=True,
        device=opts.torch_device(),
        desc="iris",
    )
    accuracy = float((predict(net, scaler.transform(x_val)).argmax(1) == y_val).mean())
    folder = opts.artifact_dir(MODEL.folder)
    save_preprocessor(scaler, folder / "preprocessor.skops")
    return save_artifact(
        folder,
        net,
        name=MODEL.name,
        hyperparameters=hp,
        metrics={"val_accuracy": accuracy},
        metrics_method=f"stratified 20 % validation split ({len(y_val)} rows)",
        data_files=[data_file],
        history=history,
        quick=opts.quick,
    )
