from __future__ import annotations

import torch
from torch import nn

from ftcnn import cost


def test_macs_of_a_known_network() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    m = cost.macs(model, (1, 8, 8))
    # conv: 4 out channels x 64 positions x 9 MACs; linear: 256 x 10
    assert m["layer_macs"] == 4 * 64 * 9 + 256 * 10
    assert m["macs"] == m["layer_macs"] and m["elementwise"] == 0


class _Counted(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(x, x)

    def elementwise_ops(self, output: torch.Tensor) -> int:
        return output[0].numel()


def test_elementwise_ops_are_added() -> None:
    model = nn.Sequential(nn.Linear(3, 5), _Counted())
    m = cost.macs(model, (3,))
    assert m == {"macs": 15 + 5, "layer_macs": 15, "elementwise": 5, "weight_checks": 0}


def test_measure_and_relative() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    c = cost.measure(model, (1, 4, 4), repeats=3)
    assert c["params"] == 68 and c["latency_b1_ms"] > 0 and c["latency_b128_ms"] > 0
    doubled = {**c, "params": 2 * c["params"], "macs": 0}
    rel = cost.relative(doubled, c)
    assert rel["params"] == 2.0 and rel["macs"] == 0.0
    # a zero baseline has no ratio: NaN, never a division error or a fake 1.0
    zero = cost.relative(c, {**c, "params": 0})
    assert zero["params"] != zero["params"]
