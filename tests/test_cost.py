from __future__ import annotations

import pytest
import torch
from torch import nn

from ftcnn.protection import cost


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


def test_relative() -> None:
    c = {"params": 68, "macs": 64, "latency_b1_ms": 0.5}
    doubled = {**c, "params": 2 * c["params"], "macs": 0}
    rel = cost.relative(doubled, c)
    assert rel["params"] == 2.0 and rel["macs"] == 0.0
    # a zero baseline has no ratio: NaN, never a division error or a fake 1.0
    zero = cost.relative(c, {**c, "params": 0})
    assert zero["params"] != zero["params"]


class _PerForward(nn.Module):
    """Declares ops per output value (shared by nothing) and ops once per forward (shared by the batch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def elementwise_ops(self, output: torch.Tensor) -> int:
        return 2 * output.numel() + 1000


def test_macs_at_batch_shares_only_the_once_per_forward_work() -> None:
    """Issue 21: one count of MACs per input at a deployment batch. Work that doubles with the batch
    is counted whole; the rest (weight checks, resolving bound copies) is divided by the batch."""
    model = nn.Sequential(nn.Linear(3, 5), _PerForward())
    assert cost.macs(model, (3,))["macs"] == 15 + 10 + 1000
    assert cost.macs_at_batch(model, (3,), 1) == 15 + 10 + 1000
    assert cost.macs_at_batch(model, (3,), 100) == 15 + 10 + 1000 / 100
    from ftcnn.protection import hardening as H

    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    checked = H.harden(net, ratio=0.0, check_weights="zero", bound_copies=1)
    values = 16 * 4 + 4
    assert cost.macs(checked, (1, 4, 4))["macs"] == 64 + H.CHECK_OPS * values
    assert cost.macs_at_batch(checked, (1, 4, 4), 128) == 64 + H.CHECK_OPS * values / 128
    with pytest.raises(ValueError, match="batch"):
        cost.macs_at_batch(net, (1, 4, 4), 0)


def test_memory_bits_count_every_stored_bit_at_its_real_size() -> None:
    """All stored bits: float parameters and buffers at 32 bits, int64 index buffers at 64, BatchNorm
    statistics included (they are memory a deployed model holds)."""
    from ftcnn.protection import hardening as H

    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3)).eval()
    floats = 2 * 9 + 2 + 4 * 2 + 8 * 3 + 3  # conv, BN weight/bias/mean/var, linear
    assert cost.memory_bits(net) == 32 * floats + 64  # + num_batches_tracked (int64)
    hard = H.harden(net, {"0": [1.0, 0.0], "3": [1.0, 0.0, 0.0]}, ratio=0.5, correction="min", bound_copies=1)
    indices = cost.index_values(hard)
    assert indices == 1 + 2  # ceil(0.5 x 2) + ceil(0.5 x 3) protected channels
    expected = 32 * (floats + H.duplicated_parameters(hard) + cost.protection_values(hard)) + 64 + 64 * indices
    assert cost.memory_bits(hard) == expected


def test_stable_latency_times_the_same_model_twice_until_it_agrees() -> None:
    """Issue 21: identical operations moved +-0.15 between timings. The first model is timed again as a
    hidden control; rounds are added until the two agree within the tolerance (or the cap), and the
    rounds and each model's spread are recorded."""
    small, big = nn.Linear(8, 8), nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    t = cost.stable_latency({"small": small, "big": big}, (8,), batch=4, min_rounds=3, max_rounds=9)
    assert set(t["ms"]) == set(t["iqr"]) == {"small", "big"}
    assert 3 <= t["rounds"] <= 9 and t["converged"] == (t["agreement"] <= cost.AGREEMENT)
    assert all(lo <= t["ms"][n] <= hi for n, (lo, hi) in t["iqr"].items())
    # an impossible agreement (a negative spread) stops at the cap; 0.0 is not impossible: two medians of
    # identical operations can be equal to the timer's resolution (seen in CI)
    capped = cost.stable_latency({"small": small}, (8,), batch=4, agreement=-1.0, min_rounds=2, max_rounds=4)
    assert capped["rounds"] == 4 and not capped["converged"]


def test_price_is_labelled_with_its_batch() -> None:
    from ftcnn.protection import hardening as H

    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    checked = H.harden(net, ratio=0.0, check_weights="zero")
    timing = {b: cost.stable_latency({"reference": net, "model": checked}, (1, 4, 4), b, max_rounds=6)
              for b in (32, 1)}
    p = cost.price(checked, net, (1, 4, 4), 32, timing)
    assert p["batch"] == 32 and p["macs_ratio"] < p["macs_ratio_batch1"]
    assert p["macs_ratio"] == cost.macs_at_batch(checked, (1, 4, 4), 32) / cost.macs_at_batch(net, (1, 4, 4), 32)
    assert p["memory_ratio"] == cost.memory_bits(checked) / cost.memory_bits(net) > 1
    assert p["latency_ratio"] == timing[32]["ms"]["model"] / timing[32]["ms"]["reference"]
    assert p["latency_ratio_batch1"] == timing[1]["ms"]["model"] / timing[1]["ms"]["reference"]
    assert p["latency_rounds"] == timing[32]["rounds"] and len(p["latency_iqr_ms"]) == 2
    untimed = cost.price(checked, net, (1, 4, 4), 32)
    assert untimed["latency_ratio"] is None and untimed["latency_ratio_batch1"] is None


def test_stable_latency_stops_adding_rounds_once_its_time_budget_is_spent(monkeypatch) -> None:
    """Issue 24: timing until agreement took 19.8 minutes on ResNet-20. With ``max_seconds`` no round starts
    that would end past the budget (here every round takes 1 s of a fake clock, and the control pair never
    agrees), ``min_rounds`` always run, warm-up runs once, and the result says why it stopped."""
    now = [0.0]
    warmups: list[int] = []

    def fake_timings(models, input_shape, batch=1, rounds=15, inner=None, threads=None, warmup=3):
        warmups.append(warmup)
        now[0] += rounds * 1.0
        *names, control = list(models)
        return {**{n: [1.0] * rounds for n in names}, control: [2.0] * rounds}

    monkeypatch.setattr(cost, "interleaved_timings", fake_timings)
    model = nn.Linear(4, 4)
    t = cost.stable_latency({"a": model}, (4,), 8, min_rounds=3, max_rounds=60, max_seconds=10.5,
                            clock=lambda: now[0])
    assert t["rounds"] == 10 and t["seconds"] == 10.0 and t["max_seconds"] == 10.5
    assert t["stopped_by"] == "time" and not t["converged"]
    assert warmups[0] == 3 and set(warmups[1:]) == {0}
    # a budget shorter than min_rounds: min_rounds still run
    now[0] = 0.0
    short = cost.stable_latency({"a": model}, (4,), 8, min_rounds=3, max_seconds=0.5, clock=lambda: now[0])
    assert short["rounds"] == 3 and short["stopped_by"] == "time"
    # without a budget the rounds cap stops it, as before
    now[0] = 0.0
    capped = cost.stable_latency({"a": model}, (4,), 8, min_rounds=3, max_rounds=7, clock=lambda: now[0])
    assert capped["rounds"] == 7 and capped["stopped_by"] == "rounds" and capped["seconds"] == 7.0
    with pytest.raises(ValueError, match="max_seconds"):
        cost.stable_latency({"a": model}, (4,), 8, max_seconds=-1.0)
