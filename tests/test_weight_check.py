"""Parameter-side weight checks (``harden(..., check_weights=...)``): bit-exact without
faults, flipped weights neutralised before the MACs, bounds attacked, shortcut exact, I/O."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import grouped_model
from ftcnn import checkpoint
from ftcnn.campaigns import campaign as C
from ftcnn.injection import faults as F
from ftcnn.protection import cost, hardening as H
from ftcnn.models import MODELS



def model_28(name: str) -> nn.Module:
    torch.manual_seed(0)
    width = 0.25 if name == "vgg11" else 1.0
    return MODELS[name](num_classes=10, in_channels=1, input_size=28, width=width).eval()


def ones_scores(model: nn.Module) -> dict[str, list[float]]:
    return {n: [float(i) for i in range(H._out_channels(m))] for n, m in H.target_layers(model).items()}


# --- no fault: bit for bit ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["lenet5", "vgg11", "resnet20"])
def test_fault_free_bit_exact(name: str) -> None:
    model = model_28(name)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        golden = model(x)
        for mode in H.CHECK_MODES:
            for extra in ({}, dict(restrict="zero", calibration=x), dict(tmr="full"),
                          dict(ratio=0.2, scores=ones_scores(model), correction="min")):
                kw = {"ratio": 0.0, **extra}
                hm = H.harden(model, check_weights=mode, **kw)
                assert torch.equal(hm(x), golden), (name, mode, extra)
    assert torch.equal(model(x), golden)  # the input model is untouched


def test_fault_free_bit_exact_grouped_and_depthwise() -> None:
    model = grouped_model()
    x = torch.randn(5, 3, 12, 12)
    golden = model(x)
    for extra in ({}, dict(tmr="full"), dict(ratio=0.5, scores=ones_scores(model), correction="tmr")):
        hm = H.harden(model, check_weights="zero", **{"ratio": 0.0, **extra})
        assert torch.equal(hm(x), golden), extra
        checked = [m for m in hm.modules() if isinstance(m, H._ProtectedLayer)]
        assert checked and all(m.check == "zero" for m in checked)


def test_bounds_are_min_max_per_channel_widened_by_the_slack() -> None:
    """Each bound is its channel's extreme moved outwards by BOUND_SLACK of its magnitude, in every copy."""
    model = model_28("lenet5")
    hm = H.harden(model, ratio=0.0, check_weights="zero")
    s = H.BOUND_SLACK
    for name, layer in H.target_layers(model).items():
        checked = hm.get_submodule(name).original
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        low, high = w.amin(1), w.amax(1)
        assert torch.equal(checked.weight_low.reshape(-1), low - low.abs() * s)
        assert torch.equal(checked.weight_high.reshape(-1), high + high.abs() * s)
        assert (checked.weight_low.reshape(-1) < low).all() and (checked.weight_high.reshape(-1) > high).all()
        for copy_ in checked.weight_low_copies:
            assert torch.equal(copy_, checked.weight_low)
        b_low, b_high = layer.bias.min(), layer.bias.max()
        assert checked.bias_low.item() == (b_low - b_low.abs() * s).item()
        assert checked.bias_high.item() == (b_high + b_high.abs() * s).item()
        assert checked.weight is not layer.weight  # harden copies the model


def test_a_small_tightening_flip_in_most_copies_cuts_nothing() -> None:
    """The failure the slack removes (ResNet-20, 1e-3): copies of a bound tightened by low mantissa
    flips used to cut the channel's extreme weight; now outputs stay those of the fault-free model.
    With the bounds exact (slack 0) the same flips change the output: the test can fail."""
    model = model_28("lenet5")
    x = torch.randn(8, 1, 28, 28)
    layer = model.get_submodule("features.0")
    channel = int(layer.weight.reshape(layer.weight.shape[0], -1).amin(1).argmin())
    n = layer.weight.shape[0]

    def faulty_output(slack: float) -> torch.Tensor:
        old = H.BOUND_SLACK
        H.BOUND_SLACK = slack
        try:
            hm = H.harden(model, ratio=0.0, check_weights="zero", bound_copies=5)
        finally:
            H.BOUND_SLACK = old
        memory = F.parameter_memory(hm)
        # set mantissa bits of the bound's magnitude: clearing one shrinks |low|, i.e. tightens it
        word = int(hm.get_submodule("features.0").original.weight_low.reshape(-1)[channel].view(torch.int32))
        bits = [b for b in range(18, 4, -1) if word >> b & 1][:3]
        assert len(bits) == 3
        flips = [("features.0.original.weight_low", channel, bits[0])] + \
            [("features.0.original.weight_low_copies", k * n + channel, bits[k + 1]) for k in range(2)]
        with F.injected(memory, F.targeted(flips)), torch.no_grad():
            return hm(x)

    with torch.no_grad():
        clean = model(x)
    assert torch.equal(faulty_output(H.BOUND_SLACK), clean)
    assert not torch.equal(faulty_output(0.0), clean)


# --- faults ------------------------------------------------------------------------------

def test_flipped_weight_is_neutralised() -> None:
    """A bit-30 flip (exponent MSB: |w| < 1 becomes ~1e38) gives exactly the output
    of the model with that weight zeroed (``zero``) or set to its channel's bound (``clamp``)."""
    model = model_28("lenet5")
    x = torch.randn(16, 1, 28, 28)
    for layer_name, index in (("features.0", 7), ("classifier.0", 1234), ("classifier.4", 3)):
        layer = model.get_submodule(layer_name)
        channel = index // layer.weight[0].numel()
        for mode in H.CHECK_MODES:
            hm = H.harden(model, ratio=0.0, check_weights=mode)
            memory = F.parameter_memory(hm)
            with F.injected(memory, F.targeted([(f"{layer_name}.original.weight", index, 30)])):
                flipped = hm.get_submodule(layer_name).original.weight.reshape(-1)[index].item()
                with torch.no_grad():
                    faulty = hm(x)
            assert abs(flipped) > 1e30
            reference = copy.deepcopy(model)
            with torch.no_grad():
                w = reference.get_submodule(layer_name).weight.reshape(-1)
                flat = layer.weight.reshape(layer.weight.shape[0], -1)
                edge = flat[channel].max() if flipped > 0 else flat[channel].min()
                w[index] = 0.0 if mode == "zero" else H.widened(edge, "high" if flipped > 0 else "low")
                assert torch.equal(faulty, reference(x)), (layer_name, mode)
            # unprotected: the same flip wrecks the output
            with F.injected(F.parameter_memory(model), F.targeted([(f"{layer_name}.weight", index, 30)])):
                with torch.no_grad():
                    assert not torch.equal(model(x), faulty)


def test_flipped_bias_and_nan_weight_are_neutralised() -> None:
    model = model_28("lenet5")
    x = torch.randn(4, 1, 28, 28)
    hm = H.harden(model, ratio=0.0, check_weights="zero")
    memory = F.parameter_memory(hm)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.get_submodule("classifier.2").bias[5] = 0.0
        with F.injected(memory, F.targeted([("classifier.2.original.bias", 5, 30)])):
            assert torch.equal(hm(x), reference(x))
        # a NaN weight (every exponent bit set) is zeroed too
        w = hm.get_submodule("features.3").original.weight
        saved = w.reshape(-1)[10].item()
        w.reshape(-1)[10] = math.nan
        out = hm(x)
        w.reshape(-1)[10] = saved
        reference = copy.deepcopy(model)
        reference.get_submodule("features.3").weight.reshape(-1)[10] = 0.0
        assert torch.equal(out, reference(x))


def test_nan_bound_bounds_nothing_and_a_sign_flip_cuts_the_channel() -> None:
    model = model_28("lenet5")
    x = torch.randn(4, 1, 28, 28)
    hm = H.harden(model, ratio=0.0, check_weights="zero")
    with torch.no_grad():
        golden = model(x)
        conv = hm.get_submodule("features.0").original
        conv.weight_low[2] = math.nan
        conv.weight_high[3] = math.nan
        assert torch.equal(hm(x), golden)
        conv.profile_bounds()
        assert torch.equal(hm(x), golden)


def test_bounds_are_fault_targets_and_counted() -> None:
    model = model_28("lenet5")
    hm = H.harden(model, ratio=0.0, check_weights="zero", bound_copies=1)  # more copies: test_failsafe_bounds.py
    targets = F.fault_targets(hm)
    layers = H.target_layers(model)
    for name in layers:
        for suffix in ("weight", "bias", "weight_low", "weight_high", "bias_low", "bias_high"):
            assert f"{name}.original.{suffix}" in targets
    bounds = sum(2 * layer.weight.shape[0] + 2 for layer in layers.values())
    assert cost.protection_values(hm) == bounds
    assert cost.parameters(hm) == cost.parameters(model) + bounds
    assert F.parameter_memory(hm).total_bits() == F.parameter_memory(model).total_bits() + 32 * bounds
    assert "features.0.original.weight_low" not in F.fault_targets(hm, include_protection=False)


def test_cost_counts_the_checks() -> None:
    model = model_28("lenet5")
    params = sum(p.numel() for p in model.parameters())
    base = cost.macs(model, (1, 28, 28))
    assert base["weight_checks"] == 0
    hm = H.harden(model, ratio=0.0, check_weights="zero", bound_copies=1)  # copies' passes: test_failsafe_bounds.py
    m = cost.macs(hm, (1, 28, 28))
    assert m["layer_macs"] == base["layer_macs"]
    assert m["weight_checks"] == params
    assert m["elementwise"] == params * H.CHECK_OPS
    # with full TMR the copies are checked too
    m3 = cost.macs(H.harden(model, tmr="full", check_weights="zero", bound_copies=1), (1, 28, 28))
    assert m3["weight_checks"] == 3 * params


def test_shortcut_equals_plain_path_in_a_campaign(tmp_path) -> None:
    torch.manual_seed(0)
    model = model_28("lenet5")
    x = torch.randn(96, 1, 28, 28)
    y = model(x).argmax(1).detach()
    hm = H.harden(model, ratio=0.0, check_weights="zero", restrict="zero", calibration=x)
    runner = C.prepare(hm, x, y, C.CampaignConfig(bers=(1e-3,), trials=1, batch_size=32))
    fast = runner.fast
    assert fast is not None
    position = {str(n.target): i for i, n in enumerate(fast.nodes) if n.op == "call_module"}
    # the checked layer is one leaf call that reads its weight and its bounds
    assert fast.first_use["classifier.0.original.weight"] == position["classifier.0.original"]
    assert fast.first_use["classifier.0.original.weight_low"] == position["classifier.0.original"]
    faults = F.targeted([("classifier.0.original.weight_high", 3, 30), ("classifier.2.original.weight", 7, 30)])
    with F.injected(runner.memory, faults):
        plain = C.predict(hm, x, 32)
    assert torch.equal(runner.faulty_logits(faults).nan_to_num(), plain.nan_to_num())
    base = dict(bers=(1e-3, 1e-2), trials=6, seed=1, batch_size=32)
    runs = {label: C.run_campaign(hm, x, y, C.CampaignConfig(**base, **extra), tmp_path / label,
                                  progress=False)["results"]
            for label, extra in {"plain": dict(shortcut=False, batch_trials=1), "shortcut": {},
                                 "batched": dict(batch_trials=3)}.items()}
    assert runs["shortcut"] == runs["plain"] and runs["batched"] == runs["plain"]


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = checkpoint.build("lenet5", num_classes=10, in_channels=1, input_size=28).eval()
    x = torch.randn(4, 1, 28, 28)
    for kw in (dict(ratio=0.0, check_weights="zero"), dict(tmr="full", check_weights="clamp"),
               dict(ratio=0.0, check_weights="zero", restrict="clamp", calibration=x)):
        hm = H.harden(model, **kw)
        # a stored bound differs from a fresh profile: it must come from the file
        hm.get_submodule("features.0").original.weight_low[0] -= 0.5
        path = tmp_path / "hard.pt"
        checkpoint.save(hm, path)
        loaded = checkpoint.load(path)
        assert torch.equal(loaded(x), hm(x))
        assert loaded.state_dict().keys() == hm.state_dict().keys()
        for k, v in hm.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
        assert loaded.get_submodule("features.0").original.check == kw["check_weights"]


def test_transform_validation() -> None:
    model = model_28("lenet5")
    with pytest.raises(ValueError, match="unknown weight check"):
        H.harden(model, ratio=0.0, check_weights="nope")
    transform = {"kind": "harden", "correction": "min", "check_weights": "bogus", "layers": {}}
    with pytest.raises(checkpoint.CheckpointError, match="check_weights"):
        H.check_transform(model, transform)
    H.check_transform(model, {**transform, "check_weights": "zero"})
    H.check_transform(model, {k: v for k, v in transform.items() if k != "check_weights"})  # old files
