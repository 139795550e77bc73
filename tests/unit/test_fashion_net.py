"""The fashion net and its data reader, without the committed model: the serving form (``InferenceCNN``)
computes the trained function, its pool equals max-pool, and the IDX reader checks what it reads."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch

from service.nets import fashion_cnn
from training.fashion import read_idx


def test_idx_reader_checks_the_magic_number(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(struct.pack(">II", 2049, 3) + bytes([1, 2, 3])))
    assert read_idx(path, 2049).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        read_idx(path, 2051)
    path.write_bytes(gzip.compress(struct.pack(">II", 2049, 4) + bytes([1, 2, 3])))
    with pytest.raises(ValueError, match="holds 3 values"):
        read_idx(path, 2049)


@pytest.mark.parametrize("mirror", [False, True])
def test_the_serving_form_computes_the_trained_function(mirror):
    """``InferenceCNN`` (batch norms folded, ReLU after the pool, the pool as four strided views) gives the
    trained net's own eval-mode answer, in float32, for odd pooled sides too (3 stages: 28 -> 14 -> 7 -> 3)."""
    torch.manual_seed(0)
    net = fashion_cnn.build(
        {"stages": [[8], [8, 16], [16]], "hidden": 32, "dropout": 0.1, "head_dropout": 0.4, "mirror_average": mirror}
    )
    for layer in net.modules():  # batch norms with statistics of their own, not the identity they start as
        if isinstance(layer, torch.nn.BatchNorm2d):
            (
                layer.running_mean.uniform_(-0.5, 0.5),
                layer.running_var.uniform_(0.5, 2),
                layer.weight.data.uniform_(0.5, 2),
            )
    net.eval()
    x = torch.rand(300, 1, 28, 28)  # more than one serving pass of a thread
    with torch.inference_mode():
        expected, served = net(x), fashion_cnn.InferenceCNN(net, torch.float32).eval()(x)
    assert served.dtype == torch.float32
    assert torch.allclose(served, expected, atol=1e-4), (served - expected).abs().max()


def test_the_pool_without_indices_equals_max_pool():
    x = torch.randn(2, 3, 7, 9).contiguous(memory_format=torch.channels_last)
    assert torch.equal(fashion_cnn.max_pool_2x2(x), torch.nn.functional.max_pool2d(x, 2))
