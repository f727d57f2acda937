"""The injector against independent references built with struct/numpy views."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from torch import nn

from ftcnn.injection import faults as F
from ftcnn.campaigns import strata

VALUES = [1.0, -2.5, 3.14159, 1e-30, -7.0e12, 0.0]


def _reference_flip_f32(value: float, bit: int) -> float:
    (as_int,) = struct.unpack("<I", struct.pack("<f", value))
    (flipped,) = struct.unpack("<f", struct.pack("<I", as_int ^ (1 << bit)))
    return flipped


def _reference_flip_f16_bits(value: float, bit: int) -> int:
    (as_int,) = struct.unpack("<H", struct.pack("<e", value))
    return as_int ^ (1 << bit)  # compared as bits: a float round trip would lose NaN payloads


def _reference_flip_f16(value: float, bit: int) -> float:
    return struct.unpack("<e", struct.pack("<H", _reference_flip_f16_bits(value, bit)))[0]


def _reference_flip_bf16(value: float, bit: int) -> int:
    # bfloat16 is the top half of a float32: build it from struct's float32 bytes
    (as_int,) = struct.unpack("<I", struct.pack("<f", value))
    return ((as_int >> 16) ^ (1 << bit)) & 0xFFFF


def _same_bits(a: float, b: float) -> bool:
    return struct.pack("<f", a) == struct.pack("<f", b)


@pytest.mark.parametrize("bit", range(32))
def test_float32_every_bit_matches_struct(bit: int) -> None:
    t = torch.tensor(VALUES, dtype=torch.float32)
    F.flip_bits(t, np.arange(len(VALUES)), np.full(len(VALUES), bit))
    for got, value in zip(t.tolist(), VALUES):
        want = _reference_flip_f32(np.float32(value).item(), bit)
        assert _same_bits(got, want) or (np.isnan(got) and np.isnan(want))


@pytest.mark.parametrize("bit", range(16))
def test_float16_every_bit_matches_struct(bit: int) -> None:
    values = [1.0, -2.5, 0.099975586, 65504.0, 0.0]
    t = torch.tensor(values, dtype=torch.float16)
    F.flip_bits(t, np.arange(len(values)), np.full(len(values), bit))
    got_bits = t.view(torch.int16).numpy().view(np.uint16)
    for g, value in zip(got_bits, values):
        assert g == _reference_flip_f16_bits(value, bit)


@pytest.mark.parametrize("bit", range(16))
def test_bfloat16_every_bit_matches_struct(bit: int) -> None:
    values = [1.0, -2.5, 3.0, -0.5, 0.0]  # exactly representable in bfloat16
    t = torch.tensor(values, dtype=torch.bfloat16)
    F.flip_bits(t, np.arange(len(values)), np.full(len(values), bit))
    got_bits = t.view(torch.int16).numpy().view(np.uint16)
    for g, value in zip(got_bits, values):
        assert g == _reference_flip_bf16(value, bit)


@pytest.mark.parametrize("bit", range(8))
def test_int8_every_bit_matches_numpy(bit: int) -> None:
    values = np.array([0, 1, -1, 127, -128, 42], dtype=np.int8)
    t = torch.from_numpy(values.copy())
    F.flip_bits(t, np.arange(len(values)), np.full(len(values), bit))
    want = (values.view(np.uint8) ^ np.uint8(1 << bit)).view(np.int8)
    assert np.array_equal(t.numpy(), want)


def test_several_bits_in_one_element_all_apply() -> None:
    t = torch.tensor([1.0], dtype=torch.float32)
    F.flip_bits(t, [0, 0, 0], [0, 5, 31])
    (as_int,) = struct.unpack("<I", struct.pack("<f", 1.0))
    (want,) = struct.unpack("<f", struct.pack("<I", as_int ^ 1 ^ 32 ^ (1 << 31)))
    assert _same_bits(t.item(), want)


def test_stuck_at_modes() -> None:
    t = torch.tensor([1.0, 1.0], dtype=torch.float32)  # 0x3F800000: bit 30 = 0, bit 29 = 1
    F.flip_bits(t, [0], [29], mode="stuck0")
    F.flip_bits(t, [1], [30], mode="stuck1")
    ints = t.view(torch.int32).numpy().view(np.uint32)
    assert ints[0] == 0x3F800000 & ~(1 << 29)
    assert ints[1] == 0x3F800000 | (1 << 30)
    t2 = torch.tensor([1.0])
    F.flip_bits(t2, [0], [29], mode="stuck1")  # already 1: unchanged
    assert t2.item() == 1.0


def test_out_of_range_positions_are_refused() -> None:
    t = torch.zeros(4)
    with pytest.raises(ValueError, match="bit position"):
        F.flip_bits(t, [0], [32])
    with pytest.raises(ValueError, match="element index"):
        F.flip_bits(t, [4], [0])


@pytest.fixture
def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 10))


def _bits_of(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().clone().numpy().tobytes() for k, v in model.state_dict().items()}


def test_fault_targets_are_conv_and_linear(small_model: nn.Module) -> None:
    assert list(F.fault_targets(small_model)) == ["0.weight", "0.bias", "4.weight", "4.bias"]
    assert "1.weight" in F.fault_targets(small_model, include_bn=True)
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        F.fault_targets(small_model, layers=["nope"])


@pytest.mark.parametrize("dtype", F.STORAGE_DTYPES)
def test_inject_and_restore_is_bit_identical(small_model: nn.Module, dtype: str) -> None:
    memory = F.parameter_memory(small_model, dtype)
    before = _bits_of(small_model)
    rng = np.random.default_rng(0)
    faults = F.draw_faults(memory, rng, count=50)
    undo = F.inject(memory, faults)
    assert _bits_of(small_model) != before
    F.restore(memory, undo)
    assert _bits_of(small_model) == before
    with F.injected(memory, F.draw_faults(memory, rng, ber=0.01, mode="stuck1")):
        pass
    assert _bits_of(small_model) == before


def test_int8_memory_decodes_flipped_code(small_model: nn.Module) -> None:
    memory = F.parameter_memory(small_model, "int8", per_channel=True)
    w = small_model[0].weight
    q = memory.stored["0.weight"]
    scale = memory.scales["0.weight"]
    assert torch.equal(w, q.float() * scale)  # the float model is the int8 model
    code = int(q.view(-1)[3])
    with F.injected(memory, F.targeted([("0.weight", 3, 7)])):
        flipped = np.int8(np.uint8(np.int8(code).view(np.uint8) ^ np.uint8(128)).view(np.int8))
        assert w.view(-1)[3].item() == pytest.approx(float(flipped) * scale.view(-1)[0].item())
    assert int(q.view(-1)[3]) == code


def test_float16_memory_rounds_model_and_flips_storage(small_model: nn.Module) -> None:
    memory = F.parameter_memory(small_model, "float16")
    w = small_model[4].weight
    assert torch.equal(w, w.half().float())
    original = w.view(-1)[0].item()
    with F.injected(memory, F.targeted([("4.weight", 0, 14)])):
        assert w.view(-1)[0].item() == _reference_flip_f16(original, 14)
    assert w.view(-1)[0].item() == original


def test_binomial_fault_count_matches_theory() -> None:
    """Mean and variance of the per-draw fault count against Binomial(n*b, p)."""
    model = nn.Linear(100, 50)  # 5,050 parameters, 161,600 bits
    memory = F.parameter_memory(model)
    n_bits, ber, draws = memory.total_bits(), 2e-5, 4000
    rng = np.random.default_rng(1234)
    counts = np.array([F.draw_faults(memory, rng, ber=ber).count for _ in range(draws)])
    mean, var = n_bits * ber, n_bits * ber * (1 - ber)
    # the sample mean is within 4 standard errors of the theory ...
    assert abs(counts.mean() - mean) < 4 * np.sqrt(var / draws)
    # ... and the sample variance within 4 of its own standard errors (~var*sqrt(2/(N-1)))
    assert abs(counts.var(ddof=1) - var) < 4 * var * np.sqrt(2 / (draws - 1))
    # a tautology check would not catch int(n*b*ber); make sure small tensors still get faults
    tiny = F.parameter_memory(nn.Linear(2, 1))  # 96 bits: int(96 * 1e-3) == 0
    hits = sum(F.draw_faults(tiny, rng, ber=1e-3).count for _ in range(5000))
    assert 300 < hits < 680  # expectation 480


def test_draw_sites_are_distinct_and_respect_bit_filter() -> None:
    memory = F.parameter_memory(nn.Linear(4, 2))  # 10 elements
    faults = F.draw_faults(memory, np.random.default_rng(0), count=20, bits=[30, 31])
    sites = faults.as_list()
    assert len(sites) == 20 == len(set(sites))  # all 20 eligible bits, each once
    assert {b for _, _, b in sites} == {30, 31}
    with pytest.raises(ValueError, match="outside"):
        F.draw_faults(memory, np.random.default_rng(0), ber=1.5)
    with pytest.raises(ValueError, match="outside"):
        F.draw_faults(memory, np.random.default_rng(0), count=21, bits=[30, 31])


# --- fault modes: the registry and random-value ------------------------------------------------

def test_modes_are_one_registry() -> None:
    assert F.MODES == tuple(F.FAULT_MODES) == ("flip", "stuck0", "stuck1", "random-value")
    assert all(F.fault_mode(m) is F.FAULT_MODES[m] for m in F.MODES)
    with pytest.raises(ValueError, match="unknown fault mode 'nope'; choose from flip, stuck0, stuck1, random-value"):
        F.fault_mode("nope")
    with pytest.raises(ValueError, match="unknown fault mode"):
        F.flip_bits(torch.zeros(2), [0], [0], mode="nope")


def test_random_value_replaces_the_element_with_its_drawn_number() -> None:
    t = torch.tensor(VALUES, dtype=torch.float32)
    # element 1 hit at two sites: it takes its first site's number; the bits say nothing
    before = F.flip_bits(t, [4, 1, 1], [3, 30, 0], mode="random-value", values=[0.3, -0.7, 0.9])
    want = np.array(VALUES, dtype=np.float32)
    want[4], want[1] = np.float32(0.3), np.float32(-0.7)
    assert t.numpy().tobytes() == want.tobytes()
    assert before.numpy().view(np.float32).tolist() == [np.float32(-2.5), np.float32(-7.0e12)]


def test_random_value_needs_its_numbers_and_others_take_none() -> None:
    t = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="needs one drawn value per site"):
        F.flip_bits(t, [0], [0], mode="random-value")
    with pytest.raises(ValueError, match="2 drawn values for 1 sites"):
        F.flip_bits(t, [0], [0], mode="random-value", values=[0.1, 0.2])
    with pytest.raises(ValueError, match="takes no drawn values"):
        F.flip_bits(t, [0], [0], mode="flip", values=[0.1])
    assert t.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_random_value_in_every_storage_format_and_exact_restore(small_model: nn.Module, dtype: str) -> None:
    memory = F.parameter_memory(small_model, dtype)
    before = _bits_of(small_model)
    faults = F.targeted([("0.weight", 5, 7), ("4.bias", 2, 0)], mode="random-value", values=[0.6, -0.25])
    with F.injected(memory, faults):
        w, b = small_model[0].weight.view(-1)[5].item(), small_model[4].bias[2].item()
        if dtype == "int8":  # the code round(127 v), decoded with the element's scale
            scale_w = memory.scales["0.weight"].expand_as(small_model[0].weight).reshape(-1)[5].item()
            assert memory.stored["0.weight"].view(-1)[5].item() == int(np.rint(127 * 0.6)) == 76
            assert w == np.float32(76 * np.float32(scale_w))
            assert memory.stored["4.bias"][2].item() == int(np.rint(127 * -0.25)) == -32
        elif dtype == "bfloat16":  # bfloat16 is float32's top 16 bits, rounded to nearest even
            assert w == float(torch.tensor(0.6, dtype=torch.float64).to(torch.bfloat16))
        else:
            rounded = {"float32": np.float32, "float16": np.float16}[dtype]
            assert (w, b) == (float(rounded(0.6)), float(rounded(-0.25)))
    assert _bits_of(small_model) == before


def test_random_value_draws_after_the_sites_from_the_trials_generator(small_model: nn.Module) -> None:
    """The same sites as a bit flip of that seed, then one uniform number per site, tensor by
    tensor, from the same generator: recomputed here by hand from a fresh generator."""
    memory = F.parameter_memory(small_model)
    for kw in ({"ber": 0.01}, {"count": 7}):
        faults = F.draw_faults(memory, np.random.default_rng(11), mode="random-value", **kw)
        flips = F.draw_faults(memory, np.random.default_rng(11), mode="flip", **kw)
        assert faults.as_list() == flips.as_list() and faults.count > 0 and flips.values is None
        rng = np.random.default_rng(11)
        F.draw_faults(memory, rng, mode="flip", **kw)  # the same draws of the sites
        want = {name: rng.uniform(-1.0, 1.0, size=len(index)) for name, (index, _) in faults.sites.items()}
        assert faults.values.keys() == want.keys()
        assert all(np.array_equal(faults.values[n], want[n]) for n in want)
        before = _bits_of(small_model)
        with F.injected(memory, faults):
            for name, (index, _) in faults.sites.items():
                flat = memory.params[name].view(-1)
                first = {}
                for i, v in zip(index.tolist(), want[name].tolist()):
                    first.setdefault(i, v)
                assert all(flat[i].item() == np.float32(v) for i, v in first.items())
                assert all(abs(v) <= 1 for v in first.values())
        assert _bits_of(small_model) == before


def test_random_value_in_a_stratified_trial(small_model: nn.Module) -> None:
    memory = F.parameter_memory(small_model)
    faults = strata.draw_faults(memory, np.random.default_rng(3), 0.01, 3, mode="random-value")
    assert faults.count > 0 and {n: len(v) for n, v in faults.values.items()} == \
        {n: len(i) for n, (i, _) in faults.sites.items()}
    assert strata.draw_faults(memory, np.random.default_rng(3), 0.01, 0, mode="random-value").count == 0
