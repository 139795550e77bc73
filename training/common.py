"""What every training script shares: options, data location, seeds, device, the loop, reports."""

from __future__ import annotations

import copy
import json
import random
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn
from tqdm.auto import tqdm

from service.artifacts import TRUSTED_TYPES, Manifest, skops_types, staging_folder, write_artifact
from service.settings import PROJECT_ROOT
from training import golden
from training.datacheck import DATA_DIR_ENV, default_data_dir
from training.gate import judge


@dataclass
class Options:
    """Command-line options every training script takes."""

    data_dir: Path = field(default_factory=default_data_dir)
    out_dir: Path = PROJECT_ROOT / "artifacts"
    device: str = "auto"
    seed: int = 0
    quick: bool = False  # a tiny slice and a few epochs, for smoke tests
    staged: Path | None = None  # the folder the last artifact_dir() made

    def data_file(self, dataset: str, name: str) -> Path:
        path = self.data_dir / dataset / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: pass --data-dir (or set ${DATA_DIR_ENV}) to the folder "
                f"that holds {dataset}/{name}; the README's 'Data' section says where the "
                "datasets come from"
            )
        return path

    def artifact_dir(self, folder: str) -> Path:
        """A fresh hidden folder for the new version of ``folder``'s model; ``python -m training`` signs it and
        moves it to ``<out>/<folder>/<version>/`` once it is whole, beside the older versions."""
        self.staged = staging_folder(self.out_dir / folder)
        return self.staged

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@contextmanager
def single_threaded() -> Iterator[None]:
    """One intra-op thread for torch and BLAS/OpenMP while fitting small tabular nets: on tensors this
    small, threads only contend (one phone net fit: 0.04 s on one thread, 4 s on two threads of a busy
    2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class History:
    """Metrics of every evaluation, the best one, and wall time."""

    epochs: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation ("epoch")
    best_epoch: int = 0
    seconds: float = 0.0


def train_loop(
    net: nn.Module,
    batches: Iterator,
    loss_of: Callable[[nn.Module, Any], torch.Tensor],
    evaluate: Callable[[nn.Module], dict[str, float]],
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    eval_every: int,
    patience: int,
    monitor: str,
    maximize: bool = False,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    clip: float | None = None,
    desc: str = "train",
) -> History:
    """``steps`` optimizer steps on ``next(batches)``, an evaluation every ``eval_every`` steps, early
    stopping after ``patience`` evaluations without a better ``monitor``; returns with the best weights loaded.

    ``loss_of(net, batch)`` is the training loss of one batch; ``evaluate(net)`` returns validation
    metrics (it runs in eval mode without gradients).
    """
    history, best, best_state, waited = History(), None, None, 0
    start, total, count = time.perf_counter(), 0.0, 0
    net.train()
    bar = tqdm(range(1, steps + 1), desc=desc, unit="step")
    for step in bar:
        loss = loss_of(net, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()  # learning-rate schedules here are per step
        total, count = total + loss.item(), count + 1
        if step % eval_every and step != steps:
            continue

        net.eval()  # evaluation
        epoch = len(history.epochs) + 1
        with torch.no_grad():
            metrics = {"epoch": epoch, "step": step, "train_loss": total / count, **evaluate(net)}
        net.train()
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        history.epochs.append(metrics)
        total, count = 0.0, 0
        bar.set_postfix(
            {k: round(v, 4) for k, v in metrics.items() if k not in ("epoch", "step", "seconds")}, refresh=False
        )

        score = metrics[monitor]  # checkpoint: the best weights so far, kept in memory
        if best is None or (score > best if maximize else score < best):
            best, best_state, waited, history.best_epoch = score, copy.deepcopy(net.state_dict()), 0, epoch
        elif (waited := waited + 1) >= patience:
            break
    history.seconds = round(time.perf_counter() - start, 2)
    assert best_state is not None  # the last step always evaluates
    net.load_state_dict(best_state)
    net.eval()
    return history


def epochs_of(data_size: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of shuffled passes over ``data_size`` rows, pass after pass (the last batch may be short)."""
    while True:
        yield from torch.randperm(data_size, generator=generator).split(batch_size)


def steps_per_epoch(data_size: int, batch_size: int) -> int:
    return -(-data_size // batch_size)


def pyplot():
    """matplotlib, headless (reports are files), imported only when a report is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: History, path: Path, keys: list[str], title: str) -> None:
    """Learning curves: one panel per metric, with the restored best epoch marked."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    epochs = [m["epoch"] for m in history.epochs]
    for ax, key in zip(np.atleast_1d(axes), keys):
        ax.plot(epochs, [m[key] for m in history.epochs], marker=".")
        ax.axvline(history.best_epoch, color="grey", linestyle="--", linewidth=1, label="best epoch")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(labels), 0.8 + 0.55 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if value > matrix.max() / 2 else "black",
        )
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_preprocessor(preprocessor: Any, path: Path) -> None:
    """Write a fitted scikit-learn preprocessor with skops (no pickle), checking that the service will load
    it: every type in the file must be in service.artifacts.TRUSTED_TYPES."""
    import skops.io

    data = skops.io.dumps(preprocessor)
    new = sorted(skops_types(data) - set(TRUSTED_TYPES))
    if new:
        raise ValueError(
            f"{path.name} would hold types the service does not trust, so it would refuse to load it: "
            f"{', '.join(new)}; add them to TRUSTED_TYPES in service/artifacts.py if they are safe"
        )
    path.write_bytes(data)


def save_artifact(
    folder: Path,
    net: nn.Module,
    *,
    name: str,
    hyperparameters: dict,
    metrics: dict,
    metrics_method: str,
    data_files: list[Path],
    history: History,
    quick: bool,
    extra: dict | None = None,
    golden_inputs: list[dict] | None = None,
    golden_tolerance: dict[str, float] | None = None,
) -> Manifest:
    """Write ``model.pt`` (a CPU state_dict), ``report.json``, the golden set (``golden_inputs`` answered by the
    serving code from these very files) and the manifest that hashes every file."""
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, folder / "model.pt")
    report = {
        "metrics": metrics,
        "metrics_method": metrics_method,
        "best_epoch": history.best_epoch,
        "train_seconds": history.seconds,
        "history": history.epochs,
    }
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    gate = judge(name, metrics, data_files, folder.parent)  # against the versions beside the new one
    write = partial(
        write_artifact,
        folder,
        name=name,
        hyperparameters=hyperparameters,
        metrics=metrics,
        metrics_method=metrics_method,
        data_files=data_files,
        extra=extra,
        quick=quick,
        gate=gate,
    )
    manifest = write()
    if golden_inputs:  # answered by the version as written (its manifest), then hashed with the rest
        cases = golden.write(folder, name, golden_inputs, golden_tolerance or {"abs": 1e-6, "rel": 1e-6})
        manifest = write(version=manifest.version)
        print(f"golden set: {cases} reference answers")
    print(
        f"wrote {name} version {manifest.version}: "
        + ", ".join(f"{k}={v}" for k, v in metrics.items() if not isinstance(v, dict))
    )
    return manifest


def plot_predicted_vs_actual(
    actual: np.ndarray, predicted: np.ndarray, halfwidth: float, path: Path, title: str
) -> None:
    """Actual against predicted, both given as logs (log price), drawn in dollars on log axes: the identity
    line and the interval band ``predicted -/+ halfwidth`` in log space (a constant ratio exp(halfwidth) on
    these axes); the points outside the band are drawn in another colour and their share named."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    actual, predicted = np.asarray(actual, dtype=np.float64).ravel(), np.asarray(predicted, dtype=np.float64).ravel()
    outside = np.abs(actual - predicted) > halfwidth
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    line = np.linspace(min(actual.min(), predicted.min()), max(actual.max(), predicted.max()), 100)
    ax.fill_between(
        np.exp(line),
        np.exp(line - halfwidth),
        np.exp(line + halfwidth),
        color="tab:blue",
        alpha=0.15,
        label=f"interval: predicted ×/÷ {np.exp(halfwidth):.3f}",
    )
    ax.plot(np.exp(line), np.exp(line), color="black", linewidth=1, label="actual = predicted")
    ax.scatter(np.exp(predicted[~outside]), np.exp(actual[~outside]), s=4, alpha=0.35, color="tab:blue")
    ax.scatter(
        np.exp(predicted[outside]),
        np.exp(actual[outside]),
        s=6,
        alpha=0.6,
        color="tab:red",
        label=f"outside the band: {outside.mean():.1%} of {len(actual)}",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # $50k, $100k, $200k ... rather than crowded powers of ten
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"${value / 1000:,.0f}k"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("predicted (log scale)")
    ax.set_ylabel("actual (log scale)")
    ax.set_title(textwrap.fill(title, 60), fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
