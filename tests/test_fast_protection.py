"""Fast protected inference: same-shape copies, exact corrections, float-only restriction
and checks, NNPACK copies; bit-exact without faults, still correcting faults, same values
as the slower reference formulations, shortcut == plain path."""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from ftcnn.campaigns import campaign as C
from ftcnn.injection import faults as F
from ftcnn.protection import cost, hardening as H
from ftcnn.models import MODELS


def model_28(name: str) -> nn.Module:
    torch.manual_seed(0)
    width = 0.25 if name == "vgg11" else 1.0
    return MODELS[name](num_classes=10, in_channels=1, input_size=28, width=width).eval()


def grouped_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2, groups=8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def random_scores(model: nn.Module, seed: int = 0) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(H._out_channels(m), generator=g).tolist() for n, m in H.target_layers(model).items()}


# --- full TMR: copies by same-shape calls, exact median ----------------------------------

@pytest.mark.parametrize("name", ["lenet5", "vgg11", "resnet20", "grouped"])
def test_full_tmr_structure_and_bit_exact(name: str) -> None:
    model = grouped_model() if name == "grouped" else model_28(name)
    x = torch.randn(6, 3, 12, 12) if name == "grouped" else torch.randn(6, 1, 28, 28)
    hm = H.harden(model, tmr="full")
    for wrapper in (m for m in hm.modules() if isinstance(m, H.Hardened)):
        assert wrapper.correction.exact and wrapper.gather is None
        assert isinstance(wrapper.copies, H._ProtectedLayer) and wrapper.copies.parts == 2
        assert wrapper.copies.groups == wrapper.original.groups if isinstance(wrapper.copies, nn.Conv2d) else True
    with torch.no_grad():
        golden = model(x)
        assert torch.equal(hm(x), golden)
        # every copy equals the original bit for bit (what lets the median replace the tolerance)
        for wrapper in (m for m in hm.modules() if isinstance(m, H.Hardened)):
            inp = torch.randn(2, *(wrapper.original.weight.shape[1:2]), 9, 9) if isinstance(
                wrapper.original, nn.Conv2d) else torch.randn(2, wrapper.original.in_features)
            if isinstance(wrapper.original, nn.Conv2d):
                inp = torch.randn(2, wrapper.original.in_channels, 9, 9)
            a = wrapper.original(inp)
            b, c = wrapper.copies(inp)
            assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("target", ["original", "copies"])
def test_full_tmr_corrects_a_fault_in_one_copy_exactly(target: str) -> None:
    model = model_28("lenet5")
    x = torch.randn(16, 1, 28, 28)
    hm = H.harden(model, tmr="full")
    memory = F.parameter_memory(hm)
    with torch.no_grad():
        golden = model(x)
        for layer, index in (("features.0", 3), ("features.3", 500), ("classifier.0", 9000)):
            for bit in (30, 31, 23):
                with F.injected(memory, F.targeted([(f"{layer}.{target}.weight", index, bit)])):
                    assert torch.equal(hm(x), golden), (layer, bit)
        # a NaN in one copy's output is outvoted too
        w = hm.get_submodule("features.0").copies.weight
        saved = w[8, 0, 0, 0].item()  # second copy of channel 2
        w[8, 0, 0, 0] = math.nan
        assert torch.equal(hm(x), golden)
        w[8, 0, 0, 0] = saved


def test_exact_median_matches_the_tolerance_vote() -> None:
    """Where copies are bit-identical, the fast median is the old majority vote."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, generator=g)
    special = torch.tensor([math.nan, math.inf, -math.inf, 1e38, -1e38, 0.0, -0.0])
    for which in range(3):
        vals = [a.clone(), a.clone(), a.clone()]
        bad = vals[which]
        bad[:7] = special
        bad[7:200] = torch.randn(193, generator=g) * 100
        fast = H.exact_tmr(vals[0], vals[1:], None, None)
        slow = H.correct_tmr(vals[0], vals[1:], None, None)
        assert torch.equal(fast, a), which
        assert torch.equal(fast, slow), which


def test_ratio_one_min_is_exact_and_corrects() -> None:
    model = model_28("lenet5")
    x = torch.randn(8, 1, 28, 28)
    hm = H.harden(model, {n: [1.0] * H._out_channels(m) for n, m in H.target_layers(model).items()},
                  ratio=1.0, correction="min")
    assert all(m.correction.exact for m in hm.modules() if isinstance(m, H.Hardened))
    with torch.no_grad():
        golden = model(x)
        assert torch.equal(hm(x), golden)
        # features.0 feeds a ReLU: a huge positive corruption of the copy is discarded by min
        with F.injected(F.parameter_memory(hm), F.targeted([("classifier.4.copies.bias", 2, 30)])):
            assert torch.equal(hm(x), golden)


# --- float-only restriction and checks match the reference formulation ------------------

def reference_restrict(y: torch.Tensor, low: torch.Tensor, high: torch.Tensor, mode: str) -> torch.Tensor:
    """The former seven-pass restriction (bool masks and torch.where)."""
    zero = torch.zeros_like(y)
    below, above = y < low, y > high
    if mode == "zero":
        return torch.where(below | above | torch.isnan(y), zero, y)
    clamped = torch.where(above, high, torch.where(below, low, y))
    return torch.where(torch.isnan(y), zero, clamped)


@pytest.mark.parametrize("mode", H.RESTRICT_MODES)
def test_restriction_matches_reference(mode: str) -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.randn(8, 6, 5, 5, generator=g) * 3
    y.view(-1)[:9] = torch.tensor([math.nan, math.inf, -math.inf, 1e38, -1e38, 0.0, -0.0, 2.0, -2.0])
    low = -torch.rand(6, 1, 1, generator=g) * 2
    high = torch.rand(6, 1, 1, generator=g) * 2
    low[1], high[2] = math.nan, math.nan             # a NaN bound bounds nothing on its side
    low[3], high[4] = -math.inf, math.inf            # unprofiled bounds
    low[5] = high[5] = 0.5                           # a degenerate range
    r = H.Restrict(mode, (6, 1, 1))
    r.low.copy_(low)
    r.high.copy_(high)
    got, want = r(y), reference_restrict(y, low, high, mode)
    assert torch.equal(got, want)
    inside = (y >= low.nan_to_num(-math.inf)) & (y <= high.nan_to_num(math.inf))
    assert torch.equal(got[inside], y[inside])   # values in range come back bit for bit
    assert torch.equal(H.check_values(y, low, high, mode), want)


def test_float_paths_keep_gradients() -> None:
    model = model_28("lenet5")
    x = torch.randn(4, 1, 28, 28)
    hm = H.harden(model, tmr="full", check_weights="zero", restrict="zero", calibration=x)
    hm(x).sum().backward()
    assert hm.get_submodule("features.0").original.weight.grad is not None


# --- partial copies: tolerance test kept ----------------------------------------------------

def test_partial_copies_stay_on_the_tolerance_path_and_exact() -> None:
    for model, x in ((model_28("lenet5"), torch.randn(32, 1, 28, 28)), (grouped_model(), torch.randn(5, 3, 12, 12))):
        for correction in ("min", "range", "tmr"):
            hm = H.harden(model, random_scores(model), ratio=0.5, correction=correction, calibration=x)
            wrappers = [m for m in hm.modules() if isinstance(m, H.Hardened)]
            assert wrappers and not any(w.correction.exact for w in wrappers)
            with torch.no_grad():
                assert torch.equal(hm(x), model(x)), correction


def test_elementwise_ops_follow_the_fast_paths() -> None:
    model = model_28("lenet5")
    x = torch.randn(8, 1, 28, 28)
    full = cost.macs(H.harden(model, tmr="full"), (1, 28, 28))
    outputs = 6 * 28 * 28 + 16 * 10 * 10 + 120 + 84 + 10
    assert full["elementwise"] == outputs * H.CORRECTIONS["tmr"].exact_ops
    rst = cost.macs(H.harden(model, ratio=0.0, restrict="zero", calibration=x, bound_copies=1), (1, 28, 28))
    assert rst["elementwise"] == outputs * H.RESTRICT_OPS


# --- shortcut and ONNX ---------------------------------------------------------------------

def test_shortcut_equals_plain_path_full_tmr_and_partial(tmp_path) -> None:
    model = model_28("lenet5")
    x = torch.randn(64, 1, 28, 28)
    y = model(x).argmax(1).detach()
    for label, kw in {"tmr": dict(tmr="full", check_weights="zero"),
                      "min": dict(scores=random_scores(model), ratio=0.1, correction="min",
                                  restrict="zero", calibration=x)}.items():
        hm = H.harden(model, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "shortcut off" fallback
            assert C.prepare(hm, x, y, C.CampaignConfig(bers=(1e-3,), trials=1, batch_size=32)).fast is not None
        base = dict(bers=(3e-3, 1e-2), trials=5, seed=2, batch_size=32)
        runs = {mode: C.run_campaign(hm, x, y, C.CampaignConfig(**base, **extra), tmp_path / f"{label}_{mode}",
                                     progress=False)["results"]
                for mode, extra in {"plain": dict(shortcut=False, batch_trials=1), "shortcut": {}}.items()}
        assert runs["shortcut"] == runs["plain"], label


def test_onnx_export_matches_eager(tmp_path) -> None:
    model = model_28("lenet5")
    x = torch.randn(16, 1, 28, 28)
    for kw in (dict(tmr="full"), dict(ratio=0.0, check_weights="zero", restrict="zero", calibration=x, range_margin=0.1),
               dict(scores=random_scores(model), ratio=0.1, correction="min", restrict="clamp", calibration=x,
                    range_margin=0.1)):
        hm = H.harden(model, **kw)
        path = tmp_path / "m.onnx"
        H.export_onnx(hm, path, (1, 28, 28))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, hm(x).numpy(), rtol=1e-4, atol=1e-5)
