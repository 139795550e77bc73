"""The poem net: embedding -> recurrent layers -> linear over the vocabulary, and its serving precision."""

import warnings
from typing import Any

import torch
from torch import nn

UNK, BOS = "<unk>", "<bos>"  # vocabulary ids 0 and 1; every other token is one character


class CharRNN(nn.Module):
    """The course notes' character model.

    ``cell`` picks the recurrent layer: "gru" is what is served; "rnn" (plain tanh nn.RNN) is the course
    baseline that training compares against. ``features`` is split from ``head`` so the sampler can
    advance the hidden state through a forced character without paying for the vocabulary projection.
    """

    CELLS = {"gru": nn.GRU, "rnn": nn.RNN}

    def __init__(
        self, vocab_size: int, embedding: int, hidden: int, layers: int, cell: str = "gru", dropout: float = 0.0
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding)
        self.rnn = self.CELLS[cell](embedding, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def features(self, tokens: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """(N, T) token ids -> ((N, T, hidden) outputs of the last layer, new recurrent state)."""
        out, state = self.rnn(self.drop(self.embed(tokens)), state)
        return self.drop(out), state

    def forward(self, tokens: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """(N, T) token ids -> ((N, T, vocab) logits of the next token, new recurrent state)."""
        out, state = self.features(tokens, state)
        return self.head(out), state


def build(hyperparameters: dict[str, Any], vocab_size: int) -> CharRNN:
    """The net described by a manifest's hyperparameters (training writes the same keys)."""
    return CharRNN(
        vocab_size,
        hyperparameters["embedding"],
        hyperparameters["hidden"],
        hyperparameters["layers"],
        hyperparameters["cell"],
        hyperparameters["dropout"],
    )


def for_serving(net: CharRNN, device: torch.device) -> CharRNN:
    """The trained net in the form the service runs (training reports its held-out perplexity too).

    Sampling reads every weight once per character, so it is bound by memory traffic. On a CPU the GRU
    and the head get int8 weights (dynamic quantization): 64 steps took 58 ms in float16 and 16-22 ms in
    int8 on the target machine, and float32 -> int8 moved validation perplexity from 149.52 to 149.59. The
    int8 kernels are CPU-only, so a GPU gets float16.
    """
    net = net.eval().requires_grad_(False)
    if device.type != "cpu":
        return net.to(device, torch.float16)
    with warnings.catch_warnings():  # eager-mode quantization is deprecated for torchao; the pinned torch has it
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(net, {nn.Linear, nn.GRU}, dtype=torch.qint8)


def serving_precision(device: torch.device) -> str:
    return "int8 (dynamic quantization)" if device.type == "cpu" else "float16"
