"""The poem net: embedding -> recurrent layers -> linear over the vocabulary, and its serving precision."""

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


class Int8Linear:
    """A linear layer with int8 weights (one scale per output) applied to int8 rows (one scale per row).

    The products are summed as integers, which is exact in any order, so a row's answer never depends on the
    rows computed beside it, nor on how the kernel blocks the batch; float matrix products do (3 of 64 batch
    sizes changed some of a row's logits on the target machine), and so does dynamic quantization, whose one
    activation scale spans the whole batch.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, device: torch.device):
        if weight.shape[1] > MAX_EXACT_INPUTS:
            raise ValueError(f"{weight.shape[1]} inputs: int8 sums are exact in float32 only up to {MAX_EXACT_INPUTS}")
        scale = weight.float().abs().amax(dim=1).clamp_min(TINY) / 127
        # (out, in) contiguous: the transposed view takes the CPU's fast matrix-vector kernel for one row
        self.weight = (weight.float() / scale[:, None]).round().to(torch.int8).to(device)
        self.scale = scale[None, :].to(device)
        self.bias = bias.float().to(device)
        self.rows_at_least = 17 if device.type == "cuda" else 1  # CUDA's int8 kernel wants more than 16 rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(*quantize_rows(x))

    def apply(self, q: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """The layer on rows already quantized (several layers' rows are quantized in one call)."""
        n = q.shape[0]
        if n < self.rows_at_least:  # zero rows added and dropped again: integer sums, so nothing else changes
            q = torch.cat([q, q.new_zeros(self.rows_at_least - n, q.shape[1])])
        sums = torch._int_mm(q, self.weight.t())[:n]
        return sums.float().mul_(row_scale * self.scale).add_(self.bias)


MAX_EXACT_INPUTS = 1040  # 1040 x 127 x 127 < 2**24: every partial sum is an integer float32 holds exactly
TINY = 1e-12  # the scale of an all-zero row (the first step's hidden state): its values quantize to 0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` as int8 and its scale (x ~ q x scale): exactly rounded operations on the row alone."""
    scale = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_min_(TINY).div_(127)  # max |x|
    return (x / scale).round_().to(torch.int8), scale


class StepNet:
    """The served poem net: one character for each of N rows per call, batch-independent (see Int8Linear).

    A GRU layer is two Int8Linear products and its gates, written out; the gates' sigmoid and tanh run on
    rows of ``hidden`` values, a multiple of 64, so every value takes the same vectorised code path whatever
    the number of rows (a remainder would take a scalar one, which rounds differently). Only rows that
    sample get the vocabulary projection (a forced character needs none).
    """

    def __init__(self, net: CharRNN, device: torch.device):
        if not isinstance(net.rnn, nn.GRU):
            raise ValueError(f"the served poem net is a GRU, not {type(net.rnn).__name__}")
        self.hidden, self.layers, self.device = net.rnn.hidden_size, net.rnn.num_layers, device
        if self.hidden % 64:
            raise ValueError(f"hidden size {self.hidden}: batch-independent sampling needs a multiple of 64")
        self.vocab_size = net.head.out_features
        rnn = net.rnn
        self.inputs = [
            Int8Linear(getattr(rnn, f"weight_ih_l{i}").detach(), getattr(rnn, f"bias_ih_l{i}").detach(), device)
            for i in range(self.layers)
        ]
        # The first layer's input gates depend on the character alone: one row per character, computed once
        # (the same numbers as per step, rows being independent) saves one of five products per step.
        self.first_gates = self.inputs[0](net.embed.weight.detach().float().to(device))
        self.recurrent = [
            Int8Linear(getattr(rnn, f"weight_hh_l{i}").detach(), getattr(rnn, f"bias_hh_l{i}").detach(), device)
            for i in range(self.layers)
        ]
        self.head = Int8Linear(net.head.weight.detach(), net.head.bias.detach(), device)

    def initial_state(self, rows: int) -> torch.Tensor:
        return torch.zeros(self.layers, rows, self.hidden, device=self.device)

    def step(
        self, tokens: torch.Tensor, state: torch.Tensor, sampling: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) token ids and their (layers, N, hidden) state -> (logits of the next token for the rows where
        ``sampling`` is true (all by default), the new state)."""
        x, new, size, rows = tokens, [], self.hidden, tokens.shape[0]
        q, scales = quantize_rows(state.reshape(-1, size))  # every layer's hidden rows at once
        for layer in range(self.layers):
            h, mine = state[layer], slice(layer * rows, (layer + 1) * rows)
            gates_in = self.first_gates[tokens] if layer == 0 else self.inputs[layer](x)
            gates_h = self.recurrent[layer].apply(q[mine], scales[mine])  # gate order: reset, update, new
            r, z = torch.sigmoid(gates_in[:, : 2 * size] + gates_h[:, : 2 * size]).chunk(2, 1)
            n = torch.tanh(gates_in[:, 2 * size :] + r * gates_h[:, 2 * size :])
            x = n + z * (h - n)  # (1 - z) * n + z * h
            new.append(x)
        if sampling is not None:
            x = x[sampling]
        return self.head(x), torch.stack(new)

    def __call__(self, tokens: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T) token ids -> ((N, T, vocab) logits, final state), one step at a time (training's perplexity)."""
        state = self.initial_state(tokens.shape[0]) if state is None else state
        logits = []
        for t in range(tokens.shape[1]):
            step_logits, state = self.step(tokens[:, t].to(self.device), state)
            logits.append(step_logits)
        return torch.stack(logits, 1), state


def for_serving(net: CharRNN, device: torch.device) -> StepNet:
    """The trained net in the form the service runs (training reports its held-out perplexity too).

    Sampling reads every weight once per character, so it is bound by memory traffic: int8 weights, read once
    per step for every row running. The same int8 arithmetic runs on a GPU (torch's int8 matrix product).
    """
    return StepNet(net.eval().requires_grad_(False), device)


def serving_precision(device: torch.device) -> str:
    return "int8 weights per output, int8 activations per row, exact integer sums (batch-independent)"
