"""Train the poem model: a character-level GRU, beside the course notes' plain nn.RNN on the same budget.

Reads ``poems/poems.txt`` (one poem per line, grouped by author, so it is shuffled before the split). The
vocabulary is fitted on the training poems only: characters seen fewer than ``min_count`` times become
``<unk>``. Every poem is one sequence, ``<bos>`` + its characters, and a batch holds poems of one length
(the corpus has four: 24, 32, 48 and 64), so nothing is padded and the hidden state starts from zero
exactly as it does when the service samples. Both nets get the same number of Adam steps.
"""

from __future__ import annotations

import copy
import ctypes
import itertools
import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service import catalog
from service.artifacts import Manifest
from service.nets import char_rnn
from service.nets.char_rnn import BOS, UNK, CharRNN, StepNet, for_serving, serving_precision
from training.common import History, Options, plot_history, pyplot, save_artifact, seed_everything, train_loop

MODEL = catalog.get("poem")

# Size and precision chosen by held-out perplexity after the same 3 minutes of training on the 2-core target
# machine: 2-layer GRU-384 with bf16 matrix products 350, GRU-512 bf16 380, GRU-512 fp32 440. In the committed
# run 1000 steps took 626 s for the GRU and 366 s for the baseline (993 s for both, validation included).
HYPERPARAMETERS: dict[str, Any] = {
    "cell": "gru",
    "embedding": 256,
    "hidden": 384,
    "layers": 2,
    "dropout": 0.0,
    "min_count": 2,
    "val_fraction": 0.05,
    "batch_size": 128,
    "lr": 3e-3,
    "final_lr_fraction": 0.05,
    "clip": 1.0,
    "bf16": True,
    "steps": 1000,
    "eval_every": 125,
    "patience": 3,
}
BASELINE: dict[str, Any] = {"cell": "rnn"}  # everything else as above: the comparison is the recurrent cell alone
QUICK: dict[str, Any] = {"steps": 200, "eval_every": 50, "embedding": 64, "hidden": 128, "batch_size": 32}
THREADS = 2  # the target machine has 2 cores; more threads than cores only thrash
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt() parameters


def keep_freed_memory() -> None:
    """Let glibc reuse freed blocks instead of handing them back to the kernel.

    A step allocates and frees hundreds of MB of activations (the logits alone are batch x length x vocab);
    by default glibc unmaps every block over 32 MB, and faulting the pages back in cost a fifth of the step
    time on the target machine (600 -> 485 ms a GRU step with this). A no-op where there is no mallopt().
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, 1 << 30)


def load(opts: Options, hp: dict) -> tuple[Path, list[str], list[str]]:
    """(data file, training poems, validation poems), split after a seeded shuffle."""
    data_file = opts.data_file("poems", "poems_small.txt" if opts.quick else "poems.txt")
    poems = [line for line in data_file.read_text(encoding="utf-8").splitlines() if line]
    random.Random(opts.seed).shuffle(poems)
    n_val = max(1, round(len(poems) * hp["val_fraction"]))
    return data_file, poems[n_val:], poems[:n_val]


def fit_vocabulary(poems: list[str], min_count: int) -> list[str]:
    """<unk>, <bos>, then every character seen at least ``min_count`` times, most frequent first."""
    counts = Counter(itertools.chain.from_iterable(poems))
    return [UNK, BOS] + sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], c))


def encode(poems: list[str], tokens: list[str]) -> dict[int, torch.Tensor]:
    """Poems grouped by length: {length: (poems, 1 + length) ids, each row <bos> + the poem}."""
    ids = {t: i for i, t in enumerate(tokens)}
    unk, bos = ids[UNK], ids[BOS]
    groups: dict[int, list[list[int]]] = {}
    for poem in poems:
        groups.setdefault(len(poem), []).append([bos] + [ids.get(c, unk) for c in poem])
    return {n: torch.tensor(rows) for n, rows in sorted(groups.items())}


def batches_forever(buckets: dict[int, torch.Tensor], batch_size: int, generator: torch.Generator):
    """Shuffled same-length batches, epoch after epoch."""
    while True:
        chunks = [
            rows[order]
            for rows in buckets.values()
            for order in torch.randperm(len(rows), generator=generator).split(batch_size)
        ]
        for k in torch.randperm(len(chunks), generator=generator).tolist():
            yield chunks[k]


def loss_of(net: nn.Module | StepNet, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each next character given <bos> and the characters before it."""
    logits, _ = net(batch[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def perplexity(
    net: nn.Module | StepNet, buckets: dict[int, torch.Tensor], batch_size: int = 512
) -> tuple[float, float]:
    """(mean cross-entropy, perplexity) per predicted character over every poem in ``buckets``."""
    total, count = 0.0, 0
    for rows in buckets.values():
        for batch in rows.split(batch_size):
            total += float(loss_of(net, batch)) * batch[:, 1:].numel()
            count += batch[:, 1:].numel()
    return total / count, math.exp(total / count)


def train_net(
    hp: dict,
    vocab_size: int,
    train: dict[int, torch.Tensor],
    val: dict[int, torch.Tensor],
    seed: int,
    device: torch.device,
    desc: str,
) -> tuple[CharRNN, History]:
    """``hp['steps']`` Adam steps with gradient clipping and a cosine learning rate; validation every
    ``eval_every`` steps, keeping the weights with the lowest validation loss."""
    seed_everything(seed)
    net = char_rnn.build(hp, vocab_size).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=hp["lr"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, hp["steps"], hp["lr"] * hp["final_lr_fraction"])
    batches = (
        batch.to(device) for batch in batches_forever(train, hp["batch_size"], torch.Generator().manual_seed(seed))
    )

    def train_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        # bf16 matrix products with fp32 weights, state and loss: about 1.5x the steps per second on a CPU
        # with AVX512-BF16; evaluation stays in fp32, as served.
        with torch.autocast(device.type, torch.bfloat16, enabled=hp["bf16"]):
            return loss_of(model, batch)

    def evaluate(model: nn.Module) -> dict[str, float]:
        val_loss, val_perplexity = perplexity(model, val)
        return {"val_loss": val_loss, "val_perplexity": val_perplexity}

    history = train_loop(
        net,
        batches,
        train_loss,
        evaluate,
        optimizer,
        steps=hp["steps"],
        eval_every=hp["eval_every"],
        patience=hp["patience"],
        monitor="val_loss",
        scheduler=scheduler,
        clip=hp["clip"],
        desc=desc,
    )
    return net, history


def plot_comparison(ours: History, baseline: History, eval_every: int, path: Path) -> None:
    """Validation perplexity against training steps for both nets."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for history, label in ((ours, "GRU (served)"), (baseline, "plain nn.RNN (course baseline)")):
        ax.plot(
            [m["epoch"] * eval_every for m in history.epochs],
            [m["val_perplexity"] for m in history.epochs],
            marker=".",
            label=label,
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("validation perplexity per character")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def train(opts: Options) -> Manifest:
    torch.set_num_threads(THREADS)
    keep_freed_memory()
    hp = dict(HYPERPARAMETERS, seed=opts.seed, **(QUICK if opts.quick else {}))
    baseline_hp = dict(hp, **BASELINE)
    data_file, train_poems, val_poems = load(opts, hp)
    tokens = fit_vocabulary(train_poems, hp["min_count"])
    device = opts.torch_device()
    train_set = encode(train_poems, tokens)
    val_set = {n: rows.to(device) for n, rows in encode(val_poems, tokens).items()}
    val_chars = sum(rows[:, 1:].numel() for rows in val_set.values())

    start = time.perf_counter()
    net, history = train_net(hp, len(tokens), train_set, val_set, opts.seed, device, "poem GRU")
    base_net, base_history = train_net(
        baseline_hp, len(tokens), train_set, val_set, opts.seed, device, "poem plain RNN"
    )
    seconds = round(time.perf_counter() - start, 1)
    with torch.no_grad():
        val_loss, val_ppl = perplexity(net, val_set)
        base_loss, base_ppl = perplexity(base_net, val_set)
        cpu = torch.device("cpu")  # the precision the service uses on a CPU
        _, served_ppl = perplexity(
            for_serving(copy.deepcopy(net).to(cpu), cpu), {n: r.cpu() for n, r in val_set.items()}
        )
    metrics = {
        "val_perplexity": round(val_ppl, 2),
        "baseline_plain_rnn_val_perplexity": round(base_ppl, 2),
        "baselines": {"plain RNN": round(base_ppl, 2)},  # the quality gate's
        "val_perplexity_as_served_on_cpu": round(served_ppl, 2),
        "serving_precision_on_cpu": serving_precision(cpu),
        "val_loss": round(val_loss, 4),
        "baseline_plain_rnn_val_loss": round(base_loss, 4),
        "parameters": sum(p.numel() for p in net.parameters()),
        "baseline_plain_rnn_parameters": sum(p.numel() for p in base_net.parameters()),
        "train_seconds": history.seconds,
        "baseline_plain_rnn_train_seconds": base_history.seconds,
        "total_seconds_both": seconds,
        "steps": hp["steps"],
        "vocabulary": len(tokens),
        "val_unknown_rate": round(sum(int((r[:, 1:] == 0).sum()) for r in val_set.values()) / val_chars, 5),
    }
    method = (
        f"perplexity per character (punctuation included) of the {len(val_poems)} held-out poems "
        f"({val_chars} characters, {hp['val_fraction']:.0%} of {data_file.name} after a shuffle with seed "
        f"{opts.seed}), each predicted from <bos> and the characters before it; the baseline is the same "
        f"model with a plain tanh nn.RNN, trained for the same {hp['steps']} steps; weights of the "
        "validation round with the lowest loss"
    )

    folder = opts.artifact_dir(MODEL.folder)
    (folder / "vocab.json").write_text(
        json.dumps({"tokens": tokens, "min_count": hp["min_count"]}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    plot_history(
        history,
        folder / "learning_curves.png",
        ["train_loss", "val_loss", "val_perplexity"],
        f"poem GRU (one epoch = {hp['eval_every']} steps)",
    )
    plot_comparison(history, base_history, hp["eval_every"], folder / "baseline_comparison.png")
    return save_artifact(
        folder,
        net,
        name=MODEL.name,
        hyperparameters=hp,
        metrics=metrics,
        metrics_method=method,
        data_files=[data_file],
        history=history,
        quick=opts.quick,
        extra={"baseline": {"hyperparameters": baseline_hp, "history": base_history.epochs}},
        golden_inputs=[  # seeded, so each answer is one poem: free, rhymed, acrostic and regulated verse
            {"start": "月", "line_num": 2, "line_length": 5, "seed": 1},
            {"start": "春", "line_num": 4, "line_length": 7, "seed": 2, "temperature": 0.5, "top_k": 20},
            {"acrostic": "春夏秋冬", "line_num": 2, "line_length": 5, "seed": 3},
            {"line_num": 2, "line_length": 5, "meter": "regulated", "seed": 4},
            {"start": "月", "line_num": 2, "line_length": 5, "seed": 5, "rhyme": False},
        ],
        golden_tolerance={"abs": 1e-9, "rel": 0.0},
    )
