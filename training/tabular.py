"""Fitting the MLP of a tabular model on already-preprocessed arrays (shared by phones and houses)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from service.nets import mlp
from training.common import History, epochs_of, steps_per_epoch, train_loop


def fit_mlp(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    hp: dict,
    *,
    classify: bool,
    device: torch.device,
    desc: str,
) -> tuple[mlp.MLP, History]:
    """Train ``mlp.build(hp)``: cross-entropy for classes, MSE (so RMSE on the log target) for regression.

    One evaluation per pass over the training rows; ``hp["epochs"]`` passes at most, early stopping after
    ``hp["patience"]`` passes without a lower validation loss."""
    net = mlp.build(hp).to(device)
    as_target = (
        (lambda y: torch.as_tensor(y, dtype=torch.long))
        if classify
        else (lambda y: torch.as_tensor(y, dtype=torch.float32).reshape(-1, 1))
    )
    xt = torch.as_tensor(x_train, dtype=torch.float32, device=device)
    yt = as_target(y_train).to(device)
    xv = torch.as_tensor(x_val, dtype=torch.float32, device=device)
    yv = as_target(y_val).to(device)
    loss_fn = nn.CrossEntropyLoss() if classify else nn.MSELoss()

    def loss_of(model: nn.Module, index: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(xt[index]), yt[index])

    def evaluate(model: nn.Module) -> dict[str, float]:
        out = model(xv)
        if classify:
            return {"val_loss": float(loss_fn(out, yv)), "val_accuracy": float((out.argmax(1) == yv).float().mean())}
        return {"val_rmse": float(loss_fn(out, yv)) ** 0.5}

    optimizer = torch.optim.AdamW(net.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    per_epoch = steps_per_epoch(len(xt), hp["batch_size"])
    batches = epochs_of(len(xt), hp["batch_size"], torch.Generator().manual_seed(hp.get("seed", 0)))
    history = train_loop(
        net,
        batches,
        loss_of,
        evaluate,
        optimizer,
        steps=hp["epochs"] * per_epoch,
        eval_every=per_epoch,
        patience=hp["patience"],
        monitor="val_loss" if classify else "val_rmse",
        desc=desc,
    )
    return net, history


def predict(net: mlp.MLP, x: np.ndarray) -> np.ndarray:
    device = next(net.parameters()).device
    with torch.no_grad():
        return net(torch.as_tensor(x, dtype=torch.float32, device=device)).cpu().numpy()
