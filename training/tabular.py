"""Fitting the MLP of a tabular model on already-preprocessed arrays (shared by phones and houses)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from service.models.tabular import MLP, build_mlp
from training.common import History, fit


def fit_mlp(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, hp: dict, *,
            classify: bool, device: torch.device, desc: str) -> tuple[MLP, History]:
    """Train ``build_mlp(hp)``: cross-entropy for classes, MSE (so RMSE on the log target) for regression."""
    net = build_mlp(hp).to(device)
    as_target = (lambda y: torch.as_tensor(y, dtype=torch.long)) if classify else \
        (lambda y: torch.as_tensor(y, dtype=torch.float32).reshape(-1, 1))
    xt = torch.as_tensor(x_train, dtype=torch.float32, device=device)
    yt = as_target(y_train).to(device)
    xv = torch.as_tensor(x_val, dtype=torch.float32, device=device)
    yv = as_target(y_val).to(device)
    loss_fn = nn.CrossEntropyLoss() if classify else nn.MSELoss()
    generator = torch.Generator().manual_seed(hp.get("seed", 0))

    def batches():
        order = torch.randperm(len(xt), generator=generator)
        for i in range(0, len(order), hp["batch_size"]):
            yield order[i:i + hp["batch_size"]]

    def step(model: nn.Module, index: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(xt[index]), yt[index])

    def evaluate(model: nn.Module) -> dict[str, float]:
        out = model(xv)
        if classify:
            return {"val_loss": float(loss_fn(out, yv)), "val_accuracy": float((out.argmax(1) == yv).float().mean())}
        return {"val_rmse": float(loss_fn(out, yv)) ** 0.5}

    optimizer = torch.optim.AdamW(net.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    history = fit(net, batches, step, evaluate, optimizer, epochs=hp["epochs"], patience=hp["patience"],
                  monitor="val_loss" if classify else "val_rmse", desc=desc)
    return net, history


def predict(net: MLP, x: np.ndarray) -> np.ndarray:
    device = next(net.parameters()).device
    with torch.no_grad():
        return net(torch.as_tensor(x, dtype=torch.float32, device=device)).cpu().numpy()
