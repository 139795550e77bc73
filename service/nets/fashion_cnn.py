"""The Fashion-MNIST net: a small VGG-style CNN over 28x28 grayscale pixels, and its faster serving form."""

import itertools
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

SIDE = 28
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CHUNK_PER_THREAD = 128  # images (mirror views included) per CPU thread in one serving pass (InferenceCNN._in_chunks)
MEAN, STD = 0.2860, 0.3530  # of the training pixels on a 0-1 scale; kept in the net so callers send raw pixels


class FashionCNN(nn.Module):
    """Stages of conv-BN-ReLU layers, each closed by 2x2 max pooling and dropout, then a dropout MLP head.

    The input is pixels on a 0-1 scale, normalised inside the net by fixed buffers, so the service and
    training feed it the same thing and no preprocessing parameters live outside ``model.pt``.

    With ``mirror_average``, evaluation averages the log-probabilities of each image and its mirror image
    (the net is trained on random flips, so both are garments it knows): on the 6,000 validation images
    this took the 40-epoch net from 0.9463 to 0.9498, for twice the arithmetic per image. Training mode
    sees one view, as before.
    """

    mean: torch.Tensor  # buffers (register_buffer), typed for the checker
    std: torch.Tensor

    def __init__(
        self, stages: list[list[int]], hidden: int, dropout: float, head_dropout: float, mirror_average: bool = False
    ):
        super().__init__()
        self.mirror_average = mirror_average
        self.register_buffer("mean", torch.tensor(MEAN))
        self.register_buffer("std", torch.tensor(STD))
        layers: list[nn.Module] = []
        width = 1
        for stage in stages:
            for out in stage:  # no conv bias: the batch norm that follows has its own
                layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                width = out
            layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
        self.features = nn.Sequential(*layers)
        side = SIDE // 2 ** len(stages)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(width * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(head_dropout),
            nn.Linear(hidden, len(NAMES)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) pixels in 0-1 -> (N, 10) logits (log-probabilities when mirror-averaged)."""
        if self.mirror_average and not self.training:
            return mirror_averaged(self._logits, x)
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - self.mean) / self.std))


def mirror_averaged(logits: Any, x: torch.Tensor) -> torch.Tensor:
    """The mean of the log-probabilities ``logits`` gives each image and its mirror image, in one pass."""
    both = logits(torch.cat([x, x.flip(-1)])).float().log_softmax(1)
    return (both[: len(x)] + both[len(x) :]) / 2


def build(hyperparameters: dict[str, Any]) -> FashionCNN:
    """The net described by a manifest's hyperparameters (training writes the same keys)."""
    return FashionCNN(
        [list(s) for s in hyperparameters["stages"]],
        hyperparameters["hidden"],
        hyperparameters["dropout"],
        hyperparameters["head_dropout"],
        hyperparameters.get("mirror_average", False),
    )


class InferenceCNN(nn.Module):
    """A trained FashionCNN in the form the service evaluates: the same function, about a third less work.

    - each conv folded with the batch norm after it (the same affine maths in one pass), dropout removed;
    - weights stored in ``dtype`` (bfloat16 where the hardware multiplies it natively) rather than cast by
      autocast on every call;
    - where a 2x2 max pool follows a conv, the pool runs first and the ReLU after it, on a quarter of the
      values (ReLU is monotonic, so max and ReLU commute exactly), and the pool is the max of four strided
      views: PyTorch's CPU max pool also computes indices, which inference never reads (its bfloat16 kernel
      took a fifth of the net's time);
    - channels_last activations, the layout oneDNN's CPU convolutions prefer.

    On the 2-core target machine, one thread, 32 images mirror-averaged: 8.4 ms with the previous form
    (folded batch norms under autocast), 6.1 ms with this one (README, Fashion under Models).
    """

    mean: torch.Tensor  # buffers (register_buffer), typed for the checker
    std: torch.Tensor

    def __init__(self, net: FashionCNN, dtype: torch.dtype):
        super().__init__()
        self.mirror_average, self.dtype = net.mirror_average, dtype
        layers = list(net.features)
        self.convs = nn.ModuleList()
        self.pooled: list[bool] = []  # whether a max pool follows each conv
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d):
                norm = layers[i + 1]
                assert isinstance(norm, nn.BatchNorm2d)  # FashionCNN puts one after each conv
                self.convs.append(fuse_conv_bn_eval(layer, norm))
                self.pooled.append(
                    any(
                        isinstance(later, nn.MaxPool2d)
                        for later in itertools.takewhile(lambda m: not isinstance(m, nn.Conv2d), layers[i + 1 :])
                    )
                )
        self.hidden, self.out = (m for m in net.head if isinstance(m, nn.Linear))
        # memory_format is a documented argument of Module.to that its typed overloads leave out
        self.to(dtype=dtype, memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.register_buffer("mean", net.mean.detach().float())  # normalising stays in float32, before the cast
        self.register_buffer("std", net.std.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) float pixels in 0-1 -> (N, 10) float32 logits (log-probabilities when mirror-averaged)."""
        x = ((x - self.mean) / self.std).to(self.dtype)
        return mirror_averaged(self._in_chunks, x) if self.mirror_average else self._in_chunks(x)

    def _in_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation on a CPU in passes of at most 128 images per thread: a larger pass falls out of the
        cache (one thread, this form, per image: 201 µs in passes of 64, 195 in 128, 202 in 256; 212 in 32)."""
        size = CHUNK_PER_THREAD * torch.get_num_threads()
        if x.device.type != "cpu" or len(x) <= size:
            return self._logits(x)
        return torch.cat([self._logits(chunk) for chunk in x.split(size)])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        for conv, pooled in zip(self.convs, self.pooled):
            x = conv(x)
            x = max_pool_2x2(x).relu_() if pooled else x.relu_()
        x = self.hidden(x.flatten(1)).relu_()
        return self.out(x).float()


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` without the indices: the largest of the four strided views (odd sides drop
    their last row or column, as the pool's floor mode does)."""
    x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
    return torch.maximum(
        torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]), torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2])
    )


def for_inference(net: FashionCNN, device: torch.device) -> InferenceCNN:
    """The trained net (in eval mode, on ``device``) in its serving form, in bfloat16 where that is fast."""
    return InferenceCNN(net, torch.bfloat16 if bf16_is_fast(device) else torch.float32).eval()


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 matrix maths runs natively here (AVX512-BF16 or AMX on a CPU, or a recent GPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(
        getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
