"""Fail-safe protection memory (issue 21): every bound a protection adds is stored
``bound_copies`` times, every copy is attacked, and one flip in one copy can no
longer cut a channel (two copies: the looser is used; three: the median)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ftcnn.campaigns import campaign as C
from ftcnn import checkpoint, data
from ftcnn.protection import cost
from ftcnn.injection import faults as F
from ftcnn.protection import hardening as H


pytestmark = pytest.mark.usefixtures("one_thread")

# what a one-copy bound can be turned into by one flip that tightens it: bit 29 of a bound
# below 1 divides it by 2^64, the sign bit moves it to the other side
SHRINKING_BITS = (29, 28, 31)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """100 test inputs and 300 calibration inputs from the training split."""
    return data.load("digits", "test").tensors[0][:100], data.load("digits", "train").tensors[0][:300]


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    torch.manual_seed(0)
    return checkpoint.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.5).eval()


def _scores(model: nn.Module) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.rand(H._out_channels(m), generator=g).tolist() for n, m in H.target_layers(model).items()}


def _harden(lenet: nn.Module, calibration: torch.Tensor, copies: int) -> nn.Module:
    """Every kind of bound: weight checks (originals and copies), range corrections, restrictions."""
    return H.harden(lenet, _scores(lenet), ratio=0.5, correction="range", restrict="zero",
                    check_weights="zero", calibration=calibration, bound_copies=copies).eval()


@pytest.fixture(scope="module")
def hardened(lenet, digits) -> dict[int, nn.Module]:
    return {k: _harden(lenet, digits[1], k) for k in H.BOUND_COPIES}


def _bound_names(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every stored bound buffer (primary and copies) of every protection module, by full name."""
    return {f"{m_name}.{b_name}": buf for m_name, m in model.named_modules() if isinstance(m, H._StoredBounds)
            for b_name, buf in m._buffers.items() if buf is not None and buf.is_floating_point()}


def test_every_copy_is_a_fault_target_and_counted(hardened) -> None:
    one, three = hardened[1], hardened[3]
    targets = F.fault_targets(three)
    stored = _bound_names(three)
    assert any(n.endswith("_copies") for n in stored)
    for name, buf in stored.items():
        assert targets[name] is buf, name  # the memory itself: a fault there is a fault in the model
    # three copies of every bound a one-copy protection holds, in memory, costs and fault bits
    assert sum(b.numel() for b in stored.values()) == 3 * sum(b.numel() for b in _bound_names(one).values())
    assert cost.protection_values(three) == 3 * cost.protection_values(one)
    extra = F.parameter_memory(three).total_bits() - F.parameter_memory(one).total_bits()
    assert extra == 32 * 2 * cost.protection_values(one)
    # not attacked means none of them, copies included
    unattacked = F.fault_targets(three, include_protection=False)
    assert not set(unattacked) & set(stored)


def test_no_fault_output_is_bit_identical(lenet, hardened, digits) -> None:
    """Fault-free, every layout computes what one copy does (the restriction cuts test inputs
    outside the profiled ranges alike), and on the calibration inputs what the model does."""
    x, calibration = digits
    for model in hardened.values():
        assert torch.equal(model(x), hardened[1](x))
        assert torch.equal(model(calibration), lenet(calibration))


def test_one_flipped_copy_does_not_change_the_output(hardened, digits) -> None:
    """A flip of bit 29, 28 or the sign of one stored copy (the first channel of every bound)
    bites with one copy and leaves the output bit for bit with two or three. On the
    calibration inputs, which lie inside every bound, so a flip that loosens a bound (which
    two copies allow) changes nothing either, while one that tightens it cuts values."""
    x = digits[1][:50]
    bitten = {}
    for copies, model in hardened.items():
        golden = model(x)
        memory = F.parameter_memory(model)
        changed = 0
        for name in _bound_names(model):
            for bit in SHRINKING_BITS:
                with F.injected(memory, F.targeted([(name, 0, bit)])):
                    changed += int(not torch.equal(model(x), golden))
        bitten[copies] = changed
        assert torch.equal(model(x), golden)  # restored bit for bit
    assert bitten[1] > 0  # the weak link this fixes
    assert bitten[2] == 0 and bitten[3] == 0


@pytest.mark.parametrize("value", [1e-30, -math.inf, math.inf, math.nan])
def test_median_of_three_outvotes_any_value_in_one_copy(hardened, digits, value) -> None:
    """Three copies: whatever one copy holds (tiny as after bit 29, infinite, NaN), the median
    is the fault-free bound, in any one of the three copies."""
    model = hardened[3]
    x = digits[0][:50]
    golden = model(x)
    for name, buf in _bound_names(model).items():
        flat = buf.view(-1)
        for index in {0, flat.numel() - 1}:
            saved = flat[index].clone()
            flat[index] = value
            try:
                assert torch.equal(model(x), golden), (name, index)
            finally:
                flat[index] = saved


def test_fail_safe_bound_rules() -> None:
    """The rule per layout, on its own: equal copies give that value; two copies the looser;
    three the median, with a NaN outvoted (and NaN left to open the bound with two)."""
    b = torch.tensor([0.5, -0.25, math.inf])
    for n in H.BOUND_COPIES:
        for side in ("low", "high"):
            assert torch.equal(H.fail_safe_bound([b] * n, side), b)
    small, big = torch.tensor([0.1]), torch.tensor([0.3])
    assert H.fail_safe_bound([small, big], "high").item() == big.item()
    assert H.fail_safe_bound([small, big], "low").item() == small.item()
    assert torch.isnan(H.fail_safe_bound([small, torch.tensor([math.nan])], "high"))
    nan = torch.tensor([math.nan])
    for side in ("low", "high"):
        assert H.fail_safe_bound([nan, big, big], side).item() == big.item()
        assert H.fail_safe_bound([big, torch.tensor([1e-30]), big], side).item() == big.item()


def test_bound_copies_default_and_refusals(lenet, digits) -> None:
    model = H.harden(lenet, ratio=0.0, restrict="zero", calibration=digits[1])
    assert model.get_submodule("features.0").restrict.bound_copies == H.DEFAULT_BOUND_COPIES > 1
    for bad in (0, 4, True, 2.0):
        with pytest.raises(ValueError, match="bound_copies"):
            H.harden(lenet, ratio=0.0, restrict="zero", calibration=digits[1], bound_copies=bad)


def test_cost_counts_resolving_the_copies(hardened) -> None:
    """Resolving the copies costs a pass or seven per bound and forward, counted with the checks."""
    shape = (1, 8, 8)
    base = cost.macs(hardened[1], shape)
    primaries = cost.protection_values(hardened[1])
    for k in (2, 3):
        m = cost.macs(hardened[k], shape)
        assert m["layer_macs"] == base["layer_macs"] and m["weight_checks"] == base["weight_checks"]
        assert m["elementwise"] - base["elementwise"] == H.BOUND_OPS[k] * primaries


def test_the_shortcut_stays_exact_when_copies_are_hit(hardened, digits) -> None:
    model = hardened[3]
    x = digits[0]
    y = model(x).argmax(1)
    runner = C.prepare(model, x, y, C.CampaignConfig(bers=(1e-3,), trials=1, batch_size=50))
    assert runner.fast is not None
    name = "classifier.0.original.weight_high_copies"
    assert name in runner.fast.first_use
    # two copies of one bound tightened: the median follows them, in the shortcut as in the full forward
    faults = F.targeted([(name, 0, 31), (name, 16, 31), ("classifier.0.original.weight_high", 5, 29)])
    with F.injected(runner.memory, faults):
        plain = C.predict(model, x, 50)
    assert torch.equal(runner.faulty_logits(faults).nan_to_num(), plain.nan_to_num())


# --- checkpoints -------------------------------------------------------------------------

def _set_layout(path, bound_copies) -> None:
    """Rewrite the ``bound_copies`` a checkpoint's hardening records, as a tampered file would."""
    blob = torch.load(path, weights_only=True)
    spec = json.loads(blob["spec"])
    spec["transforms"][-1]["bound_copies"] = bound_copies
    blob["spec"] = json.dumps(spec)
    torch.save(blob, path)


def test_new_checkpoint_records_the_layout_and_round_trips(hardened, digits, tmp_path) -> None:
    model = hardened[3]
    assert checkpoint.get_spec(model)["transforms"][-1]["bound_copies"] == 3
    # a stored copy that differs from the others must come from the file, not a fresh profile
    model.get_submodule("features.0").restrict.high_copies[0, 1] = -1.0
    try:
        path = tmp_path / "three.pt"
        checkpoint.save(model, path)
        loaded = checkpoint.load(path)
        assert loaded.state_dict().keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
        assert torch.equal(loaded(digits[0]), model(digits[0]))
    finally:
        model.get_submodule("features.0").restrict.set_bound("high", model.get_submodule("features.0").restrict.high)


def test_checkpoint_of_the_one_copy_layout_loads_as_it_was_saved(hardened, digits, tmp_path) -> None:
    """Files saved before fail-safe bounds hold one copy and no ``bound_copies`` field:
    they load with that layout (same keys, same outputs, same fault targets)."""
    model = hardened[1]
    transform = checkpoint.get_spec(model)["transforms"][-1]
    assert "bound_copies" not in transform  # what older files hold
    assert not any(k.endswith("_copies") for k in model.state_dict())
    path = tmp_path / "old.pt"
    checkpoint.save(model, path)
    loaded = checkpoint.load(path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert list(F.fault_targets(loaded)) == list(F.fault_targets(model))
    assert torch.equal(loaded(digits[0]), model(digits[0]))


@pytest.mark.parametrize("bad", [0, 4, "3", 2.5, True, None])
def test_a_tampered_layout_is_refused_in_one_line(hardened, tmp_path, bad) -> None:
    path = tmp_path / "t.pt"
    checkpoint.save(hardened[3], path)
    _set_layout(path, bad)
    with pytest.raises(checkpoint.CheckpointError, match="bound_copies") as info:
        checkpoint.load(path)
    assert "\n" not in str(info.value)


def test_a_layout_that_disagrees_with_the_stored_copies_is_refused(hardened, tmp_path) -> None:
    """A file that says three copies but holds one (or the reverse) does not load half-built."""
    path = tmp_path / "t.pt"
    checkpoint.save(hardened[3], path)
    _set_layout(path, 2)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(path)
