"""The fast weight-check and restriction paths (issue 21: batch-1 latency) give the numbers
of a plain reference and of the ops they replace, under faults too: values with NaN, Inf,
huge and signed-zero entries, checked against bound copies that bit flips, NaN, Inf, sign
flips and crossed bounds (low > high) have hit."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ftcnn.protection import hardening as H
from ftcnn.models import MODELS


pytestmark = pytest.mark.usefixtures("one_thread")

SPECIAL = (math.nan, math.inf, -math.inf, 3e38, -3e38, 0.0, -0.0, 1e-40)


def _reference_bound(copies: list[torch.Tensor], side: str) -> torch.Tensor:
    """The bound a protection uses, written plainly: NaN opens its side, then the looser of
    two copies or the median of three."""
    fill = -math.inf if side == "low" else math.inf
    opened = [torch.where(torch.isnan(c), fill, c) for c in copies]
    if len(opened) == 1:
        return opened[0]
    if len(opened) == 2:
        return torch.minimum(*opened) if side == "low" else torch.maximum(*opened)
    return torch.stack(opened).median(dim=0).values


def _reference_check(v: torch.Tensor, low: torch.Tensor, high: torch.Tensor, mode: str) -> torch.Tensor:
    """``zero``: v where clamping it to [low, high] leaves it unchanged, else 0; ``clamp``: the
    clamped value; NaN -> 0 in both. (Crossed bounds, low > high, clamp everything to high,
    so only v == high is kept: the rule the protection has always had.)"""
    clamped = torch.minimum(torch.maximum(v, low), high)
    out = torch.where(clamped == v, v, 0.0) if mode == "zero" else clamped
    return torch.where(torch.isnan(out), 0.0, out)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, equal NaN positions, equal shape."""
    return a.shape == b.shape and torch.equal(torch.isnan(a), torch.isnan(b)) and \
        torch.equal(torch.nan_to_num(a, 0.0), torch.nan_to_num(b, 0.0))


def _bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (signed zeros and NaN payloads included)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def _flip(t: torch.Tensor, rate: float, g: torch.Generator) -> torch.Tensor:
    """``t`` with each bit flipped with probability ``rate``."""
    bits = t.clone().view(torch.int32)
    for b in range(32):
        hit = (torch.rand(t.shape, generator=g) < rate).to(torch.int32)
        bits ^= hit << b
    return bits.view(torch.float32)


def _values(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random values with every special value sprinkled in (about 1 in 6 entries)."""
    v = torch.randn(shape, generator=g)
    flat = v.view(-1)
    picks = torch.randint(0, len(SPECIAL) * 6, (flat.numel(),), generator=g)
    for i, s in enumerate(SPECIAL):
        flat[picks == i] = s
    return v


def _bound_copies(v: torch.Tensor, bound_shape: tuple[int, ...], n: int, g: torch.Generator,
                  cross: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``n`` stored copies of a low and a high bound around ``v``'s finite range, each copy
    hit by random bit flips and by NaN, +-Inf and sign flips; with ``cross``, one bound
    element crossed (low > high) in every copy, and the other hits elsewhere."""
    finite = v[torch.isfinite(v)]
    lo0 = torch.full(bound_shape, float(finite.min()) * 0.5)
    hi0 = torch.full(bound_shape, float(finite.max()) * 0.5)
    size = lo0.numel()
    j = int(torch.randint(0, size, (1,), generator=g))
    lows, highs = [], []
    for k in range(n):
        lo, hi = _flip(lo0, 0.02, g), _flip(hi0, 0.02, g)
        flat_lo, flat_hi = lo.view(-1), hi.view(-1)
        if cross:
            flat_lo[j], flat_hi[j] = hi0.view(-1)[j] + 1.0, lo0.view(-1)[j] - 1.0
        others = [i for i in range(size) if not (cross and i == j)]
        for flat in (flat_lo, flat_hi):
            if others:
                i = [others[int(x)] for x in torch.randint(0, len(others), (3,), generator=g)]
                flat[i[0]] = math.nan
                flat[i[1]] = -flat[i[1]]
                flat[i[2]] = math.inf if k % 2 else -math.inf
        lows.append(lo)
        highs.append(hi)
    return lows, highs


CASES = [((6, 1, 5, 5), (6, 1, 1, 1)), ((16, 6, 5, 5), (16, 1, 1, 1)), ((120, 400), (120, 1)), ((84,), (1,)),
         ((10, 84), (10, 1)), ((4, 6, 7, 7), (6, 1, 1)), ((5, 84), (84,)), ((7,), (1,))]


@pytest.mark.parametrize("mode", H.CHECK_MODES)
@pytest.mark.parametrize("shape,bound_shape", CASES)
def test_check_two_matches_reference_and_old_ops(mode: str, shape: tuple[int, ...],
                                                 bound_shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(H.CHECK_MODES.index(mode) * 1000 + sum(shape) + len(shape))
    for draw in range(4):
        v = _values(shape, g)
        lows, highs = _bound_copies(v, bound_shape, 2, g, cross=draw >= 2)
        low_copy, high_copy = lows[1].unsqueeze(0), highs[1].unsqueeze(0)  # stored stacked: (1, *shape)
        lo, hi = _reference_bound(lows, "low"), _reference_bound(highs, "high")
        if draw >= 2:
            crossed = (lo > hi).expand_as(v)
            first = tuple(crossed.nonzero()[0])  # fails if no bound crossed: the draw is meant to cross one
            crossed = crossed & (torch.rand(v.shape, generator=g) < 0.3)
            crossed[first] = True
            v = torch.where(crossed, hi.expand_as(v), v)  # on a crossed channel only v == high is kept
        want = _reference_check(v, lo, hi, mode)
        old = H.check_values(v, H.fail_safe_bound(lows, "low"), H.fail_safe_bound(highs, "high"), mode)
        assert _same(old, want)
        for small in (False, True):  # both paths, whatever the size
            got = H.check_two(v, lows[0], low_copy, highs[0], high_copy, mode, small).view(shape)
            assert _same(got, want), (small, got, want)
            assert _bits(got, old), small  # signed zeros too: the ops they replace, bit for bit
        assert not torch.isnan(old).any()


@pytest.mark.parametrize("copies", H.BOUND_COPIES)
def test_open_bound_is_the_opened_fail_safe_bound(copies: int) -> None:
    g = torch.Generator().manual_seed(copies)
    r = H.Restrict("zero", (6, 1, 1), bound_copies=copies)
    v = _values((2, 6, 3, 3), g)
    for name in ("low", "high"):
        stored, _ = _bound_copies(v, (6, 1, 1), copies, g)
        r._buffers[name].copy_(stored[0])
        if copies > 1:
            r._buffers[f"{name}_copies"].copy_(torch.stack(stored[1:]))
        before = [b.clone() for b in (r._buffers[name], r._buffers.get(f"{name}_copies")) if b is not None]
        want = _reference_bound(stored, name)
        assert _bits(r.open_bound(name), H.nan_to(r.bound(name), -math.inf if name == "low" else math.inf))
        assert _same(r.open_bound(name), want)
        after = [b for b in (r._buffers[name], r._buffers.get(f"{name}_copies")) if b is not None]
        assert all(_bits(a, b) for a, b in zip(before, after)), "resolving a bound wrote into its copies"


def _model(copies: int, check: str, restrict: str) -> nn.Module:
    torch.manual_seed(0)
    net = MODELS["lenet5"](num_classes=10, in_channels=1, input_size=28).eval()
    return H.harden(net, ratio=0.0, check_weights=check, restrict=restrict, range_margin=0.1,
                    calibration=torch.randn(32, 1, 28, 28), bound_copies=copies).eval()


@pytest.mark.parametrize("copies", H.BOUND_COPIES)
@pytest.mark.parametrize("check,restrict", [("zero", "zero"), ("clamp", "clamp")])
def test_modules_under_faults_match_reference(copies: int, check: str, restrict: str) -> None:
    """Every protected layer's checked weight and bias, and every restriction's output, with
    weights and every stored bound copy hit by bit flips: the reference's values, and the old
    ops' bits (``bound`` + ``check_values``, still the ONNX export's path)."""
    net = _model(copies, check, restrict)
    g = torch.Generator().manual_seed(copies)
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.copy_(_flip(t, 3e-3, g))
    layers = [m for m in net.modules() if isinstance(m, H._ProtectedLayer)]
    restricts = [m for m in net.modules() if isinstance(m, H.Restrict)]
    assert layers and restricts
    stored = {id(t): t.clone() for t in net.buffers()}
    hits = 0
    with torch.inference_mode():
        for layer in layers:
            got = layer.checked()
            for v, name, out in ((layer.weight, "weight", got[0]), (layer.bias, "bias", got[1])):
                copies_ = [layer._buffers[f"{name}_{side}"] for side in ("low", "high")]
                spare = [layer._buffers.get(f"{name}_{side}_copies") for side in ("low", "high")]
                low, high = ([c, *([] if s is None else s.unbind(0))] for c, s in zip(copies_, spare))
                want = _reference_check(v, _reference_bound(low, "low"), _reference_bound(high, "high"), check)
                assert _same(out, want), (name, layer)
                old = H.check_values(v, layer.bound(f"{name}_low"), layer.bound(f"{name}_high"), check)
                assert _bits(out, old), (name, layer)
                hits += int((out != v).sum())
        for r in restricts:
            y = _values((3, *r._buffers["low"].shape[:-2], 5, 5) if r._buffers["low"].dim() == 3
                        else (3, r._buffers["low"].shape[0]), g)
            low = [r._buffers["low"], *([] if copies == 1 else r._buffers["low_copies"].unbind(0))]
            high = [r._buffers["high"], *([] if copies == 1 else r._buffers["high_copies"].unbind(0))]
            want = _reference_check(y, _reference_bound(low, "low"), _reference_bound(high, "high"), restrict)
            out = r(y)
            assert _same(out, want)
            assert _bits(out, H.check_values(y, r.bound("low"), r.bound("high"), restrict))
    assert hits > 0, "the faults changed no checked value: the test would not see a wrong check"
    assert all(_bits(t, stored[id(t)]) for t in net.buffers()), "a check wrote into a bound"


def test_fault_free_hardened_model_is_the_original() -> None:
    torch.manual_seed(0)
    base = MODELS["lenet5"](num_classes=10, in_channels=1, input_size=28).eval()
    x = torch.randn(4, 1, 28, 28)
    for copies in H.BOUND_COPIES:
        net = H.harden(base, ratio=0.0, check_weights="zero", restrict="zero", range_margin=0.1,
                       calibration=x, bound_copies=copies).eval()
        with torch.inference_mode():
            assert _bits(net(x), base(x))
        grad_net = copy.deepcopy(net).train()  # autograd: the same values, and gradients flow
        out = grad_net(x)
        out.sum().backward()
        assert _bits(out.detach(), base(x)) and grad_net.features[0].original.weight.grad is not None


def test_exporting_is_false_in_eager_and_true_in_an_onnx_export(tmp_path) -> None:
    pytest.importorskip("onnx")
    assert not H.exporting()
    seen: list[bool] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(H.exporting())
            return x * self.scale

    H.export_onnx(Probe(), tmp_path / "p.onnx", (3,))
    assert seen and all(seen)
