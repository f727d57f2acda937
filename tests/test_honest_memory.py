"""Honest memory (design §4, issue 10): what a protection adds to memory is attacked and counted.

The float values protections add (correction and restriction bounds) are fault
targets by default, the shortcut and batched trials stay exact when they are
hit, costs count them, the int64 index buffers are reported as unattacked
memory, and the ``range`` correction never does worse than the unprotected
layer where the original value is right.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ftcnn.campaigns import campaign as C
from ftcnn import checkpoint, data
from ftcnn.protection import cost
from ftcnn.injection import faults as F
from ftcnn.protection import hardening as H


pytestmark = pytest.mark.usefixtures("one_thread")


def _scores(model: nn.Module, seed: int = 0) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(H._out_channels(m), generator=g).tolist() for n, m in H.target_layers(model).items()}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """200 test inputs and labels, 300 calibration inputs from the training split."""
    x, y = data.load("digits", "test").tensors
    calib = data.load("digits", "train").tensors[0][:300]
    return x[:200], y[:200], calib


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    torch.manual_seed(0)
    return checkpoint.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.5).eval()


@pytest.fixture(scope="module")
def hardened(lenet, digits) -> nn.Module:
    """Half the channels duplicated with the range correction, every layer restricted; one
    stored copy of each bound, the layout these counts describe (more: test_failsafe_bounds.py)."""
    return H.harden(lenet, _scores(lenet), ratio=0.5, correction="range", restrict="zero",
                    calibration=digits[2], bound_copies=1).eval()


def _expected_protection_values(model: nn.Module, ratio: float = 0.5) -> int:
    """Independent count: 2 restriction bounds per channel, 2 correction bounds per protected channel."""
    return sum(2 * H._out_channels(m) + 2 * math.ceil(ratio * H._out_channels(m))
               for m in H.target_layers(model).values())


# --- what faults can hit ---------------------------------------------------------------

def test_fault_targets_list_the_bounds_by_default(lenet, hardened) -> None:
    names = list(F.fault_targets(hardened))
    # module order: a layer's original, copies, correction bounds, restriction bounds, then the next layer
    assert names[:8] == ["features.0.original.weight", "features.0.original.bias", "features.0.copies.weight",
                         "features.0.copies.bias", "features.0.correction.low", "features.0.correction.high",
                         "features.0.restrict.low", "features.0.restrict.high"]
    assert names[8] == "features.3.original.weight"
    assert "features.0.correction.index" not in names  # int64 indices are not value memory
    bounds = [n for n in names if n.endswith((".low", ".high"))]
    assert sum(F.fault_targets(hardened)[n].numel() for n in bounds) == _expected_protection_values(lenet)
    # the buffers themselves, so a fault in the memory is a fault in the model
    assert F.fault_targets(hardened)["features.0.restrict.low"] is hardened.features[0].restrict.low

    without = list(F.fault_targets(hardened, include_protection=False))
    assert without == [n for n in names if n not in bounds]
    assert (F.parameter_memory(hardened).total_bits() - F.parameter_memory(hardened, include_protection=False)
            .total_bits()) == 32 * _expected_protection_values(lenet)
    # a protection module can be named like a layer
    assert list(F.fault_targets(hardened, layers=["classifier.0.restrict"])) == [
        "classifier.0.restrict.low", "classifier.0.restrict.high"]
    # the min rule keeps no bounds: nothing to list
    plain_min = H.harden(lenet, _scores(lenet), ratio=0.5, correction="min")
    assert not [n for n in F.fault_targets(plain_min) if n.endswith((".low", ".high"))]


def test_a_single_flip_in_a_restriction_bound_bites(hardened, digits) -> None:
    """A sign flip of one bound zeroes (nearly) a whole channel for every input."""
    x = digits[0]
    golden = hardened(x)
    memory = F.parameter_memory(hardened)
    changed = 0
    for ch in range(6):
        with F.injected(memory, F.targeted([("classifier.0.restrict.high", ch, 31)])):
            changed += int(not torch.equal(hardened(x), golden))
    assert changed >= 4
    assert torch.equal(hardened(x), golden)  # restored bit for bit


def test_correction_bounds_alone_never_change_the_output(hardened, digits) -> None:
    """The range rule reads its bounds only where original and copy disagree, which needs a
    second fault: any flip of a correction bound alone leaves the output bit for bit."""
    x = digits[0]
    golden = hardened(x)
    memory = F.parameter_memory(hardened)
    for name in ("features.0.correction.low", "classifier.0.correction.high", "classifier.4.correction.low"):
        for bit in (31, 30, 23, 0):
            with F.injected(memory, F.targeted([(name, 0, bit)])):
                assert torch.equal(hardened(x), golden)


def test_infinite_bounds_are_memory_too(digits) -> None:
    """Unprofiled bounds are -inf/+inf, valid float patterns: a mantissa flip makes NaN
    (that side then bounds nothing), a sign flip makes the bound cut everything."""
    y = torch.randn(16, 3)
    for mode in ("zero", "clamp"):
        restrict = H.Restrict(mode, (3,))
        assert torch.equal(restrict(y), y)
        memory = F.parameter_memory(restrict)
        assert list(memory.stored) == ["low", "high"]
        with F.injected(memory, F.targeted([("high", 1, 0)])):
            assert torch.isnan(restrict.high[1]) and torch.equal(restrict(y), y)
        with F.injected(memory, F.targeted([("high", 1, 31)])):
            assert restrict.high[1] == -math.inf
            out = restrict(y)
            assert torch.equal(out[:, [0, 2]], y[:, [0, 2]])
            assert torch.equal(out[:, 1], torch.zeros(16) if mode == "zero" else torch.full((16,), -math.inf))
    # profiled finite bounds: a NaN bound (exponent all ones) bounds nothing, in both modes
    for mode in ("zero", "clamp"):
        restrict = H.Restrict(mode, (3,))
        restrict.low.fill_(-0.5)
        restrict.high.fill_(0.5)
        ref = restrict(y)
        restrict.high[1] = math.nan
        out = restrict(y)
        assert torch.equal(out[:, 1], torch.where(y[:, 1] < -0.5, 0.0 if mode == "zero" else -0.5, y[:, 1]))
        assert torch.equal(out[:, [0, 2]], ref[:, [0, 2]])
    # int8 cannot hold an infinite bound: refused in one line, unless the bounds are left unattacked
    with pytest.raises(ValueError, match="not finite"):
        F.parameter_memory(restrict, "int8")
    assert F.parameter_memory(restrict, "int8", include_protection=False).total_bits() == 0


def test_bounds_in_other_storage_formats(hardened, digits) -> None:
    """float16 rounds the bounds like the weights; int8 gives each bound its own scale, so it
    moves by float rounding only (a shared scale would move small bounds by half a step)."""
    for dtype in ("float16", "int8"):
        hm = copy.deepcopy(hardened)
        memory = F.parameter_memory(hm, dtype)
        low = hm.classifier[0].restrict.low
        ref = hardened.classifier[0].restrict.low
        if dtype == "int8":
            assert set(memory.stored["classifier.0.restrict.low"].abs().unique().tolist()) <= {0, 127}
            torch.testing.assert_close(low, ref, rtol=1e-6, atol=0)
        else:
            assert torch.equal(low, ref.half().float())
        with F.injected(memory, F.targeted([("classifier.0.restrict.high", 0, 7)])):
            assert not torch.equal(hm.classifier[0].restrict.high, hardened.classifier[0].restrict.high)


# --- campaigns ---------------------------------------------------------------------------

def test_campaign_attacks_bounds_and_reports_memory(lenet, hardened, digits, tmp_path: Path) -> None:
    x, y, _ = digits
    # one sign flip per trial, only in one layer's restriction bounds: the campaign hits them
    config = C.CampaignConfig(counts=(1,), trials=8, seed=0, bits=(31,), layers=("classifier.0.restrict",))
    summary = C.run_campaign(hardened, x, y, config, tmp_path / "bounds", progress=False)
    row = summary["results"][0]
    assert row["n_faults_mean"] == 1 and row["sdc_mean"] > 0
    assert summary["config"]["attack_protection"] is True

    memory = F.parameter_memory(hardened)
    on = C.run_campaign(hardened, x, y, C.CampaignConfig(bers=(1e-3,), trials=2, seed=0), tmp_path / "on",
                        progress=False)["memory"]
    off = C.run_campaign(hardened, x, y, C.CampaignConfig(bers=(1e-3,), trials=2, seed=0, attack_protection=False),
                         tmp_path / "off", progress=False)["memory"]
    n_bounds = _expected_protection_values(lenet)
    assert on["attack_protection"] is True and off["attack_protection"] is False
    assert on["fault_target_bits"] == memory.total_bits()
    assert on["fault_target_bits"] - off["fault_target_bits"] == 32 * n_bounds
    assert on["protection_values"] == n_bounds and off["protection_values"] == 0
    # int64 indices are listed as unattacked memory, by name; the bounds too when excluded
    layers = H.target_layers(lenet)
    indices = {f"{n}.correction.index": math.ceil(0.5 * H._out_channels(m)) for n, m in layers.items()}
    assert on["unattacked_memory"] == indices and on["unattacked_bits"] == 64 * sum(indices.values())
    assert set(off["unattacked_memory"]) == set(indices) | {
        f"{n}.{kind}.{side}" for n in layers for kind in ("correction", "restrict") for side in ("low", "high")}
    # excluding them is another campaign: not resumed into the same folder
    with pytest.raises(ValueError):
        C.run_campaign(hardened, x, y, C.CampaignConfig(bers=(1e-3,), trials=2, seed=0, attack_protection=False),
                       tmp_path / "on", progress=False)


def test_shortcut_and_batched_trials_exact_when_bounds_are_hit(hardened, digits, tmp_path: Path) -> None:
    """Restriction bounds are read by their module's call, so a trial faulting one starts
    right before it, batched trials still apply, and both equal the plain path bit for bit."""
    x, y, _ = digits
    config = C.CampaignConfig(bers=(1e-3,), trials=1, seed=0, batch_size=64, batch_trials=3)
    runner = C.prepare(hardened, x, y, config)
    fast = runner.fast
    assert fast is not None and fast.batchable and runner.batch == 3
    position = {str(n.target): i for i, n in enumerate(fast.nodes) if n.op == "call_module"}
    assert fast.first_use["classifier.2.restrict.low"] == position["classifier.2.restrict"]
    assert fast.first_use["classifier.2.correction.high"] == position["classifier.2.correction"]
    assert position["classifier.2.original"] < position["classifier.2.correction"] < position["classifier.2.restrict"]

    trials = [F.targeted([("classifier.2.restrict.high", 0, 31)]),
              F.targeted([("classifier.0.restrict.low", 3, 31), ("classifier.0.original.weight", 5, 30)]),
              F.targeted([("features.3.correction.low", 1, 31), ("features.3.copies.weight", 2, 30)]),
              F.targeted([("classifier.4.restrict.high", 2, 30)])]
    for faults in trials:
        with F.injected(runner.memory, faults):
            plain = C.predict(hardened, x, 64)
        assert torch.equal(runner.faulty_logits(faults).nan_to_num(), plain.nan_to_num())
    assert fast.start(trials[0]) is not None and fast.start(trials[0]).position > position["classifier.0.restrict"]
    batched = fast.batched_logits(trials[:3])
    for faults, logits in zip(trials[:3], batched):
        with F.injected(runner.memory, faults):
            assert torch.equal(logits.nan_to_num(), C.predict(hardened, x, 64).nan_to_num())

    # whole campaigns: plain == shortcut == batched, with bound faults among the draws
    base = dict(bers=(3e-3, 1e-2), trials=6, seed=3, batch_size=64)
    runs = {label: C.run_campaign(hardened, x, y, C.CampaignConfig(**base, **extra), tmp_path / label,
                                  progress=False)["results"]
            for label, extra in {"plain": dict(shortcut=False, batch_trials=1), "shortcut": {},
                                 "batched": dict(batch_trials=3)}.items()}
    assert runs["shortcut"] == runs["plain"] and runs["batched"] == runs["plain"]
    hit = [C.draw_trial_faults(runner.memory, C.CampaignConfig(**base), p, t) for p in base["bers"]
           for t in range(6)]
    assert any(n.endswith((".low", ".high")) for f in hit for n in f.sites)


# --- the range rule ----------------------------------------------------------------------

def test_range_rule_cases() -> None:
    low, high = torch.zeros(1), torch.ones(1)
    inf, nan = math.inf, math.nan
    cases = [  # (original, copy, expected)
        (0.5, 0.5, 0.5),        # agree
        (1.5, 1e30, 1.5),       # original legitimately out of range, copy faulted further: original (old: 0)
        (1.5, nan, 1.5),        # ... copy NaN: original (old: 0)
        (-0.5, -inf, -0.5),     # ... copy -inf: original (old: 0)
        (1e30, 0.5, 0.5),       # faulted original, copy in range: copy
        (nan, 0.5, 0.5),
        (inf, 1.5, 1.5),        # faulted original, copy legitimately out of range: the copy, nearer (old: 0)
        (-3e38, -0.2, -0.2),    # huge negative corruption (min's weakness): corrected
        (0.2, 0.1, 0.2),        # both inside, disagreeing: the original (old: the min)
        (0.5, 7.0, 0.5),        # copy out of range: original
        (nan, nan, nan),
    ]
    a = torch.tensor([c[0] for c in cases])
    b = torch.tensor([c[1] for c in cases])
    want = torch.tensor([c[2] for c in cases])
    out = H.correct_range(a, [b], low, high)
    assert torch.equal(out.nan_to_num(), want.nan_to_num()) and torch.equal(out.isnan(), want.isnan())


def test_range_rule_is_always_one_of_the_two_and_keeps_an_in_range_original() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10_000, generator=g) * 2
    b = torch.where(torch.rand(10_000, generator=g) < 0.5, a, torch.randn(10_000, generator=g) * 1e3)
    low, high = torch.full((1,), -1.0), torch.full((1,), 1.0)
    out = H.correct_range(a, [b], low, high)
    assert torch.all((out == a) | (out == b))
    inside = (a >= low) & (a <= high)
    assert torch.equal(out[inside], a[inside])
    took = out != a
    assert took.any()
    assert torch.all(H.range_distance(b, low, high)[took] < H.range_distance(a, low, high)[took])


def test_range_never_worse_than_unprotected_outside_the_profiled_range() -> None:
    """Profiled on small inputs with no margin, so test inputs drive many values out of range.
    A fault in the copy leaves the output exactly as without protection (the old rule output 0
    at every element where neither value was in range); a fault in the original is corrected."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 8 * 8, 10)).eval()
    x = torch.randn(32, 1, 8, 8)
    inp = model[:2](x)
    golden = model[2](inp)
    hm = H.harden(model, _scores(model), ratio=0.5, correction="range", calibration=0.1 * torch.randn(64, 1, 8, 8))
    layer = hm[2]
    ch = int(layer.correction.index[0])
    ref = golden[:, ch]
    low, high = layer.correction.low[0], layer.correction.high[0]
    assert ((ref < low) | (ref > high)).float().mean() > 0.5  # mostly legitimately out of range
    w = layer.copies.weight[0].reshape(-1)
    k = int(torch.where((w > 0) & (w < 1), w, torch.zeros_like(w)).argmax())
    memory = F.parameter_memory(hm)
    with F.injected(memory, F.targeted([("2.copies.weight", k, 30)])):
        assert not torch.equal(layer.copies(inp)[:, 0], ref)  # the copy is corrupted
        assert torch.equal(hm[2](inp), golden)
    # the same fault in the original's filter: the copy replaces it (up to the second call's rounding)
    w = layer.original.weight[ch].reshape(-1)
    k = ch * w.numel() + int(torch.where((w > 0) & (w < 1), w, torch.zeros_like(w)).argmax())
    with F.injected(memory, F.targeted([("2.original.weight", k, 30)])):
        assert layer.original(inp)[:, ch].abs().max() > 1e30
        torch.testing.assert_close(hm[2](inp), golden, rtol=1e-5, atol=1e-5)


# --- costs -------------------------------------------------------------------------------

def test_costs_count_the_bounds(lenet, hardened) -> None:
    n_bounds = _expected_protection_values(lenet)
    n_index = sum(math.ceil(0.5 * H._out_channels(m)) for m in H.target_layers(lenet).values())
    assert cost.protection_values(hardened) == n_bounds and cost.protection_values(lenet) == 0
    assert cost.index_values(hardened) == n_index
    assert cost.parameters(hardened) == sum(p.numel() for p in hardened.parameters()) + n_bounds
    assert cost.parameters(hardened) == cost.parameters(lenet) + H.duplicated_parameters(hardened) + n_bounds
    over = H.overheads(lenet, hardened, (1, 8, 8))
    assert over["hardened"]["protection_values"] == n_bounds and over["hardened"]["index_values"] == n_index
    assert over["hardened"]["params"] == cost.parameters(hardened)
    assert over["relative"]["params"] == pytest.approx(cost.parameters(hardened) / cost.parameters(lenet))
