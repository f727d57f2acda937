"""Stored-word codes (``ftcnn.protection.codes``, issue 21): SEC-DED against an independent bit-by-bit
reference, every single flip corrected and every double flip detected, TMR majority, parity
semantics, coded models bit-exact without faults, every check word a fault target, the
campaign fast path exact on coded models, and the code in checkpoints and the CLI."""

from __future__ import annotations

import itertools
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ftcnn
from _helpers import assert_one_line_refusal, cli_in_process
from conftest import grouped_model
from ftcnn import checkpoint
from ftcnn.campaigns import campaign as C
from ftcnn.injection import faults as F
from ftcnn.protection import codes as K, cost, hardening as H
from ftcnn.models import MODELS

pytestmark = pytest.mark.usefixtures("one_thread")

SECDED = K.CODES["secded"]


# --- an independent SEC-DED (72,64): positions of a Hamming codeword, bit by bit ------------

POSITIONS = [p for p in range(1, 72) if p & (p - 1)]  # the 64 data positions of a 71-bit Hamming word


def ref_check_byte(data: int) -> int:
    """Check bits of a 64-bit ``data`` int: check bit j is the XOR of the data bits whose
    codeword position has bit j; bit 7 makes the parity of all 72 bits even."""
    check = 0
    for j in range(7):
        bit = 0
        for i, pos in enumerate(POSITIONS):
            if pos >> j & 1:
                bit ^= data >> i & 1
        check |= bit << j
    total = bin(data).count("1") + bin(check).count("1")
    return check | (total % 2) << 7


def ref_decode(data: int, check: int) -> int | None:
    """Corrected data, or None for a detected uncorrectable error: the syndrome is the XOR of
    the positions of every set bit of the codeword (data at POSITIONS, check bit j at 2^j)."""
    syndrome = 0
    for i, pos in enumerate(POSITIONS):
        if data >> i & 1:
            syndrome ^= pos
    for j in range(7):
        if check >> j & 1:
            syndrome ^= 1 << j
    odd = (bin(data).count("1") + bin(check).count("1")) % 2
    if not odd:
        return data if syndrome == 0 else None
    if syndrome == 0 or syndrome & (syndrome - 1) == 0:
        return data  # the flip hit the overall parity bit or a check bit
    if syndrome in POSITIONS:
        return data ^ (1 << POSITIONS.index(syndrome))
    return None


def as_signed(word: int) -> int:
    return word - (1 << 64) if word >= 1 << 63 else word


def decode_pairs(data: list[int], checks: list[int]) -> list[int]:
    """The vectorised decode of 64-bit words given as unsigned Python ints."""
    out = SECDED.decode_words(torch.tensor([as_signed(d) for d in data], dtype=torch.int64),
                              torch.tensor(checks, dtype=torch.int64))
    return [int(v) % (1 << 64) for v in out]


def random_words(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [0, (1 << 64) - 1, 1 << 63] + [rng.getrandbits(64) for _ in range(n - 3)]


def test_secded_check_bits_match_the_reference() -> None:
    words = random_words(300)
    values = torch.tensor([as_signed(w) for w in words], dtype=torch.int64).view(torch.float32)  # NaNs too
    assert torch.equal(SECDED.data_words(values), torch.tensor([as_signed(w) for w in words]))
    got = SECDED.check_bytes(SECDED.data_words(values)).tolist()
    assert got == [ref_check_byte(w) for w in words]
    packed = SECDED.encode(values)
    assert packed.dtype == torch.int32 and packed.numel() == SECDED.words(values.numel()) == 75
    assert K.unpack_bits(packed, 8, len(words)).tolist() == got


def test_secded_decode_matches_the_reference_on_random_corruptions() -> None:
    """Random data and check bits with 0-4 random flips: the vectorised decode gives what the
    reference gives (a correction, or the word zeroed where the reference detects)."""
    rng = random.Random(1)
    data, checks, expected = [], [], []
    for w in random_words(600, seed=2):
        c = ref_check_byte(w)
        for bit in rng.sample(range(72), rng.randint(0, 4)):
            if bit < 64:
                w ^= 1 << bit
            else:
                c ^= 1 << (bit - 64)
        data.append(w)
        checks.append(c)
        ref = ref_decode(w, c)
        expected.append(0 if ref is None else ref)
    assert decode_pairs(data, checks) == expected


def test_secded_corrects_every_single_and_detects_every_double_flip() -> None:
    for word in random_words(6, seed=3):
        check = ref_check_byte(word)
        singles = [(word ^ (1 << b), check) if b < 64 else (word, check ^ (1 << (b - 64))) for b in range(72)]
        assert decode_pairs(*map(list, zip(*singles))) == [word] * 72
        doubles = []
        for a, b in itertools.combinations(range(72), 2):
            w, c = word, check
            for bit in (a, b):
                if bit < 64:
                    w ^= 1 << bit
                else:
                    c ^= 1 << (bit - 64)
            doubles.append((w, c))
        # detected: the word is zeroed, both values (a double flip in the check bits alone too)
        assert decode_pairs(*map(list, zip(*doubles))) == [0] * len(doubles)


def test_secded_decode_of_values_pads_an_odd_tail_and_zeroes_both_values() -> None:
    values = torch.randn(7)
    words = SECDED.encode(values)
    assert torch.equal(SECDED.decode(values, words), values)
    faulty = values.clone()
    faulty.view(torch.int32)[2] ^= 1 << 30
    assert torch.equal(SECDED.decode(faulty, words), values)  # corrected
    faulty.view(torch.int32)[3] ^= 1 << 3                     # a second flip in the same word (values 2, 3)
    decoded = SECDED.decode(faulty, words)
    assert decoded[2:4].tolist() == [0.0, 0.0] and torch.equal(decoded[[0, 1, 4, 5, 6]], values[[0, 1, 4, 5, 6]])


def test_tmr3_majority_corrects_any_one_copy() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(50, generator=g)
    tmr = K.CODES["tmr3"]
    words = tmr.encode(values)
    assert words.dtype == torch.int32 and words.numel() == 100
    noise = torch.randint(-2**31, 2**31 - 1, (50,), generator=g, dtype=torch.int64).to(torch.int32)
    for copy in range(3):  # any bits of any one copy: the weight itself or a stored copy
        v, w = values.clone(), words.clone()
        if copy == 0:
            v.view(torch.int32).bitwise_xor_(noise)
        else:
            w[(copy - 1) * 50:copy * 50] ^= noise
        assert torch.equal(tmr.decode(v, w), values)
    v = values.clone()
    v.view(torch.int32)[0] ^= 1 << 30
    w = words.clone()
    w[0] ^= 1 << 30  # the same bit lost in two copies: the vote takes it
    assert tmr.decode(v, w)[0] != values[0]


def test_parity_zeroes_a_failed_value_and_parity_exponent_only_sign_and_exponent_flips() -> None:
    values = torch.randn(40, generator=torch.Generator().manual_seed(1))
    full, exponent = K.CODES["parity"], K.CODES["parity_exponent"]
    assert full.encode(values).numel() == exponent.encode(values).numel() == 2
    for bit, exponent_acts in ((3, False), (22, False), (23, True), (30, True), (31, True)):
        faulty = values.clone()
        faulty.view(torch.int32)[33] ^= 1 << bit
        for scheme, acts in ((full, True), (exponent, exponent_acts)):
            decoded = scheme.decode(faulty, scheme.encode(values))
            assert torch.equal(decoded[:33], values[:33]) and torch.equal(decoded[34:], values[34:])
            assert decoded[33] == (0.0 if acts else faulty[33]), (scheme.name, bit)
    words = full.encode(values)
    words[1] ^= 1 << 4  # a flipped check bit: value 36 fails its check and is zeroed
    assert full.decode(values, words)[36] == 0.0


# --- coded models ----------------------------------------------------------------------

def lenet(input_size: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return MODELS["lenet5"](num_classes=10, in_channels=1, input_size=input_size).eval()


@pytest.mark.parametrize("code", list(K.CODES))
def test_fault_free_coded_model_is_bit_exact(code: str) -> None:
    model = lenet(28)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        golden = model(x)
        for kw in (dict(ratio=0.0), dict(ratio=0.0, check_weights="zero"), dict(tmr="full", check_weights="zero")):
            assert torch.equal(H.harden(model, code=code, **kw)(x), golden), kw
        user = grouped_model()
        xg = torch.randn(4, 3, 8, 8)
        assert torch.equal(H.harden(user, ratio=0.0, code=code)(xg), user(xg))


@pytest.mark.parametrize("code", list(K.CODES))
def test_every_code_word_is_a_fault_target_and_counted(code: str) -> None:
    model = lenet()
    hm = H.harden(model, tmr="full", code=code)
    targets = F.fault_targets(hm)
    coded = [(n, m) for n, m in hm.named_modules() if isinstance(m, (H.CodedConv2d, H.CodedLinear))]
    assert len(coded) == 2 * len(H.target_layers(model))  # originals and copies
    words = 0
    for name, module in coded:
        for pname in ("weight", "bias"):
            assert targets[f"{name}.{pname}_code"] is getattr(module, f"{pname}_code")
            words += getattr(module, f"{pname}_code").numel()
    coverage = F.memory_coverage(hm, targets)
    assert not [n for n in coverage["unattacked_memory"] if n.endswith("_code")]
    assert coverage["unattacked_bits"] == 64 * sum(m.correction.index.numel() for m in hm.modules()
                                                    if isinstance(m, H.Hardened))  # only the int64 indices
    memory = F.parameter_memory(hm)
    assert memory.total_bits() == 32 * (3 * sum(p.numel() for p in model.parameters()) + words)
    assert cost.protection_values(hm) == words and cost.index_values(hm) == coverage["unattacked_bits"] // 64
    assert "features.0.original.weight_code" not in F.fault_targets(hm, include_protection=False)
    with pytest.raises(ValueError, match="float32"):
        F.parameter_memory(hm, "float16")


def test_memory_ratios_and_decode_cost() -> None:
    model = lenet()
    params = sum(p.numel() for p in model.parameters())
    base = cost.macs(model, (1, 8, 8))
    for code, ratio in (("secded", 1.125), ("parity", 33 / 32), ("parity_exponent", 33 / 32), ("tmr3", 3.0)):
        hm = H.harden(model, ratio=0.0, code=code)
        assert cost.parameters(hm) / cost.parameters(model) == pytest.approx(ratio, abs=1e-3)
        m = cost.macs(hm, (1, 8, 8))
        assert m["layer_macs"] == base["layer_macs"]
        assert m["elementwise"] == params * K.CODES[code].ops_per_value
        # one decode per forward, shared by the batch like the weight check
        assert cost.macs_at_batch(hm, (1, 8, 8), 128) == pytest.approx(base["macs"] + m["elementwise"] / 128)
        assert cost.memory_bits(hm) / cost.memory_bits(model) == pytest.approx(ratio, abs=1e-3)


def test_one_flip_anywhere_in_a_secded_model_changes_nothing() -> None:
    """100 draws of exactly one flip over all its memory (weights, biases, check words): the
    logits are the fault-free ones bit for bit; two flips in one word zero both values."""
    hm = H.harden(lenet(), ratio=0.0, code="secded", check_weights="zero")
    x = torch.randn(32, 1, 8, 8)
    memory = F.parameter_memory(hm)
    assert any(n.endswith("_code") for n in memory.stored)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        golden = hm(x)
        hit_words = 0
        for _ in range(100):
            faults = F.draw_faults(memory, rng, count=1)
            hit_words += any(n.endswith("_code") for n in faults.sites)
            with F.injected(memory, faults):
                assert torch.equal(hm(x), golden), faults.as_list()
        for bit in range(32):  # every bit of one check word, alone
            with F.injected(memory, F.targeted([("classifier.0.original.weight_code", 5, bit)])):
                assert torch.equal(hm(x), golden)
        layer = hm.get_submodule("classifier.0.original")
        with F.injected(memory, F.targeted([("classifier.0.original.weight", 10, 30),
                                            ("classifier.0.original.weight", 11, 2)])):
            w, _ = layer.stored_values()
            assert w.view(-1)[10:12].tolist() == [0.0, 0.0]
            assert torch.equal(w.view(-1)[12:], layer.weight.view(-1)[12:])
    assert hit_words > 0


def test_campaign_with_one_flip_in_a_check_word_leaves_the_output_unchanged(tmp_path: Path) -> None:
    hm = H.harden(lenet(), ratio=0.0, code="secded")
    x = torch.randn(64, 1, 8, 8)
    y = hm(x).argmax(1).detach()
    summary = C.run_campaign(hm, x, y, C.CampaignConfig(counts=(1,), trials=20, seed=0, bits=(31,),
                                                          layers=["classifier.0.original"]),
                             tmp_path / "run", progress=False)
    r = summary["results"][0]
    assert r["accuracy_mean"] == summary["golden_accuracy"] == 1.0 and r["sdc_mean"] == 0.0


@pytest.mark.parametrize("code", ["secded", "parity_exponent"])
def test_shortcut_and_batched_trials_equal_the_plain_path(code: str, tmp_path: Path) -> None:
    model = lenet()
    x = torch.randn(96, 1, 8, 8)
    y = model(x).argmax(1).detach()
    hm = H.harden(model, ratio=0.0, code=code, check_weights="zero", restrict="zero", calibration=x)
    runner = C.prepare(hm, x, y, C.CampaignConfig(bers=(1e-3,), trials=1, batch_size=32))
    fast = runner.fast
    assert fast is not None
    position = {str(n.target): i for i, n in enumerate(fast.nodes) if n.op == "call_module"}
    assert fast.first_use["classifier.0.original.weight_code"] == position["classifier.0.original"]
    base = dict(bers=(3e-3, 3e-2), trials=6, seed=1, batch_size=32)
    runs = {label: C.run_campaign(hm, x, y, C.CampaignConfig(**base, **extra), tmp_path / label,
                                  progress=False)["results"]
            for label, extra in {"plain": dict(shortcut=False, batch_trials=1), "shortcut": {},
                                 "batched": dict(batch_trials=3)}.items()}
    assert runs["shortcut"] == runs["plain"] and runs["batched"] == runs["plain"]


# --- checkpoints and the CLI ---------------------------------------------------------------

def test_bad_code_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    model = lenet()
    with pytest.raises(ValueError, match="unknown code 'hamming'"):
        H.harden(model, ratio=0.0, code="hamming")
    transform = {"kind": "harden", "correction": "min", "layers": {}, "code": "bogus"}
    with pytest.raises(checkpoint.CheckpointError, match="code must be one of secded"):
        H.check_transform(model, transform)
    H.check_transform(model, {**transform, "code": "secded"})
    H.check_transform(model, {k: v for k, v in transform.items() if k != "code"})  # older files
    built = checkpoint.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.5)
    ftcnn.save(H.harden(built, ratio=0.0, code="parity"), tmp_path / "c.pt", data="digits")
    blob = torch.load(tmp_path / "c.pt", weights_only=True)
    spec = json.loads(blob["spec"])
    for bad in ("bogus", ["secded"], 3):
        spec["transforms"][-1]["code"] = bad
        torch.save({**blob, "spec": json.dumps(spec)}, tmp_path / "forged.pt")
        r = cli_in_process(monkeypatch, capsys, "inject", str(tmp_path / "forged.pt"), "--data", "digits",
                           "--ber", "1e-3", "--trials", "1", "-o", str(tmp_path / "run"))
        assert_one_line_refusal(r, "code must be one of")
    # the words encode float32 bits: another storage format is refused, not silently wrong
    r = cli_in_process(monkeypatch, capsys, "inject", str(tmp_path / "c.pt"), "--data", "digits", "--dtype",
                       "float16", "--ber", "1e-3", "--trials", "1", "-o", str(tmp_path / "run16"))
    assert_one_line_refusal(r, "use --dtype float32")
    # gradients do not flow through a bit-level decode: gain scores are refused, not all zero
    with warnings.catch_warnings(), pytest.raises(ValueError, match="score the model before harden"):
        warnings.simplefilter("error")
        ftcnn.analyze(ftcnn.load(tmp_path / "c.pt"), torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))


def test_cli_harden_code_round_trips_through_a_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    model = checkpoint.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.5)
    ftcnn.save(model, tmp_path / "m.pt", data="digits")
    r = cli_in_process(monkeypatch, capsys, "harden", str(tmp_path / "m.pt"), "--ratio", "0", "--code", "secded",
                       "--check-weights", "zero", "-o", str(tmp_path / "c.pt"))
    assert r.returncode == 0, r.stderr
    loaded = ftcnn.load(tmp_path / "c.pt")
    assert checkpoint.read(tmp_path / "c.pt")["spec"]["transforms"][-1]["code"] == "secded"
    assert checkpoint.meta(loaded)["hardening"]["code"] == "secded"
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        again = H.harden(model, ratio=0.0, code="secded", check_weights="zero")
        assert loaded.state_dict().keys() == again.state_dict().keys()
        for k, v in again.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
        memory = F.parameter_memory(loaded)
        with F.injected(memory, F.targeted([("features.0.original.weight", 3, 30)])):
            assert torch.equal(loaded(x), model(x))  # the stored code corrects the flip
    r = cli_in_process(monkeypatch, capsys, "harden", str(tmp_path / "m.pt"), "--ratio", "0", "--code", "crc",
                       "-o", str(tmp_path / "d.pt"))
    assert_one_line_refusal(r, "unknown code 'crc'")
    r = cli_in_process(monkeypatch, capsys, "harden", str(tmp_path / "m.pt"), "--ratio", "0", "--code", "tmr3",
                       "--onnx", str(tmp_path / "d.onnx"), "-o", str(tmp_path / "d.pt"))
    assert_one_line_refusal(r, "--onnx cannot export a model with --code")
    assert not (tmp_path / "d.pt").exists() and not (tmp_path / "d.onnx").exists()
