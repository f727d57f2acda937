"""One fault-space interface (issue 20): parameters and activations are two implementations of
``fault_space.FaultSpace`` that the one trial runner, the strata, the store and the estimates use;
one seed derivation gives the draws each path gave before; a new fault target is one class."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ContextManager, Mapping, Sequence

import numpy as np
import pytest
import torch
from torch import nn

from ftcnn.campaigns import activations as A
from ftcnn.campaigns import campaign, strata, trials
from ftcnn.injection import fault_space
from ftcnn.injection import faults as F
from ftcnn.campaigns.metrics import Golden, golden_predictions, trial_metrics
from ftcnn.train import predict

from conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 7


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = make_tiny_model().eval()(x).argmax(1)   # labels the model gets right: faults can only hurt
    return x, y


def _spaces() -> list[fault_space.FaultSpace]:
    x, y = _data()
    parameters = trials.prepare(make_tiny_model(), x, y, trials.CampaignConfig(bers=(1e-3,), seed=SEED))
    layer_outputs = A.prepare(make_tiny_model(), x, y, seed=SEED)
    return [parameters.space, layer_outputs.space]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(torch.int32)


def test_both_spaces_satisfy_the_interface() -> None:
    """Every member the runner, the strata and the store ask for, on both implementations: the
    space's size, a draw that is a pure function of (point, trial, stratum), faults that change the
    logits and are gone after the block, the strata's layout over exactly the space's bits."""
    x, _ = _data()
    for space in _spaces():
        assert isinstance(space, fault_space.FaultSpace), type(space)
        golden = space.golden_logits()
        assert torch.equal(golden, predict(space.model, x, 1000))             # float32: the plain model
        before = {name: _bits(p) for name, p in space.model.named_parameters()}
        layout = space.strata_layout(None)
        assert layout.n_msb + layout.n_other == space.total_bits() > 0
        trial = next(t for t in range(50) if space.draw(1e-3, t).count)
        drawn = space.draw(1e-3, trial)
        assert isinstance(drawn, fault_space.Drawn) and len(drawn.as_list()) == drawn.count > 0
        assert drawn.as_list() == space.draw(1e-3, trial).as_list()           # a pure function
        assert drawn.as_list() != space.draw(1e-3, trial + 1).as_list()
        stratified = space.draw(1e-3, 0, stratum=2)                           # exactly one MSB flip
        assert sum(site[-1] == 30 for site in stratified.as_list()) == 1
        changed = 0
        for index in range(10):                                               # >= 2 MSB flips each
            faults = space.draw(1e-3, index, stratum=3)
            logits, extra = space.faulty_logits(faults)
            with space.injected(faults):                                      # the plain forward
                plain = predict(space.model, x, 1000)
            assert torch.equal(logits.nan_to_num(), plain.nan_to_num())
            changed += not torch.equal(logits.nan_to_num(), golden)
            assert set(extra) == set(space.fault_free(space.draw(0.0, 0)))
        assert changed
        assert all(torch.equal(before[n], _bits(p)) for n, p in space.model.named_parameters())
        assert torch.equal(space.golden_logits(), golden)                     # restored bit for bit
    parameters, layer_outputs = _spaces()
    assert isinstance(parameters, fault_space.BatchedSpace) and not isinstance(layer_outputs, fault_space.BatchedSpace)
    assert set(parameters.stored) == {n for n, _ in parameters.model.named_parameters()} and not layer_outputs.stored


# --- the one seed derivation: the same draws as before, written out with numpy alone -------------

def _generator(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(words)))


def _float_bits(value: float) -> int:
    return int(np.float64(value).view(np.uint64))


def test_a_parameter_trial_draws_what_numpy_draws_from_seed_rate_and_trial() -> None:
    """A plain parameter trial at a BER: per tensor (in memory order), Binomial(numel x 32, ber)
    distinct (element, bit) positions, from one generator seeded by [seed, the rate's bits, trial]."""
    space = _spaces()[0]
    ber, trial = 2e-3, 5
    rng = _generator(SEED, _float_bits(ber), trial)
    expected = []
    for name, tensor in space.stored.items():
        size = tensor.numel() * 32
        k = int(rng.binomial(size, ber))
        if k:
            pos = rng.choice(size, size=k, replace=False)
            expected += [(name, int(p // 32), int(p % 32)) for p in pos]
    assert expected and space.draw(ber, trial).as_list() == expected


def test_a_stratified_trial_and_a_block_use_their_own_keys() -> None:
    """``--precision`` trials: [seed, rate bits, 0x5354, stratum, index]; a trial's block of inputs:
    [seed, rate bits, 0x424C4B, stratum + 1 (0 for plain), trial]; the input order: [seed, 0x424C4B, n]."""
    ber = 1e-3
    ours = fault_space.trial_rng(SEED, ber, 4, stratum=2).integers(0, 2**62, 5)
    assert np.array_equal(ours, _generator(SEED, _float_bits(ber), 0x5354, 2, 4).integers(0, 2**62, 5))
    assert np.array_equal(strata.trial_rng(SEED, ber, 2, 4).integers(0, 2**62, 5), ours)
    plain = fault_space.trial_rng(SEED, ber, 4).integers(0, 2**62, 5)
    assert not np.array_equal(plain, ours)
    config = trials.CampaignConfig(bers=(ber,), seed=SEED, inputs_per_trial=10)
    sizes = np.array([10, 10, 10, 10, 8], dtype=np.float64)
    for stratum in (None, 1):
        picked = _generator(SEED, _float_bits(ber), 0x424C4B, 0 if stratum is None else stratum + 1, 9)
        assert trials.trial_block(config, ber, 9, stratum, 48) == int(picked.choice(5, p=sizes / 48))
    assert np.array_equal(trials.input_order(SEED, 48), _generator(SEED, 0x424C4B, 48).permutation(48))


def test_an_activation_trial_draws_what_numpy_draws_from_its_layer_key() -> None:
    """A permanent activation trial: per layer, Binomial(values x 32, rate) distinct sorted (value,
    bit) sites from [0x41435450, seed, trial, sha256(layer)[:8], the rate's bits, block 0]."""
    x, y = _data()
    runner = A.prepare(make_tiny_model(), x, y, seed=SEED, mode="permanent")
    rate, trial = 5e-3, 3
    plan = runner.draw(rate, trial)
    seen = 0
    for name, out in runner.outputs.items():
        layer = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        rng = _generator(0x41435450, SEED, trial, layer, _float_bits(rate), 0)
        size = out.numel * 32
        k = int(rng.binomial(size, rate))
        pos = np.sort(rng.choice(size, size=k, replace=False)) if k else np.zeros(0, np.int64)
        assert np.array_equal(plan.layers[name].index, pos // 32) and np.array_equal(plan.layers[name].bit, pos % 32)
        seen += k
    assert seen == plan.count > 0


def test_key_words_are_checked() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        fault_space.rng(0, -1)
    with pytest.raises(TypeError):
        fault_space.rng(True)
    assert fault_space.key_word(1.0) == _float_bits(1.0) != fault_space.key_word(1)


def test_one_dtype_table() -> None:
    """Storage formats, activation formats and the strata's bit all come from ``FORMATS``."""
    assert F.STORAGE_DTYPES == fault_space.STORAGE_DTYPES == ("float32", "float16", "bfloat16", "int8")
    assert trials.ACTIVATION_DTYPES == ("float32", "float16", "bfloat16")
    assert [strata.strata_bit(d) for d in F.STORAGE_DTYPES] == [30, 14, 14, 7]
    for name, fmt in fault_space.FORMATS.items():
        assert fmt.activations == fmt.torch.is_floating_point, name
        one = torch.ones(1, dtype=fmt.torch)
        words = one.view(F._INT_VIEW[fmt.torch]) ^ F.bit_masks(np.array([fmt.stratum_bit]), fmt.torch)
        hit = float(words.view(fmt.torch).float())
        assert (hit == float("inf")) if fmt.activations else hit == -127, name    # the catastrophic bit


# --- a third fault target in one small class ---------------------------------------------------------

@dataclass
class InputBufferSpace:
    """Bit faults in the input images as they sit in a sensor buffer (not in the model): a dict of
    named tensors, drawn at a BER like parameter memory. This class is all a new target needs."""

    model: nn.Module
    buffers: dict[str, torch.Tensor]
    seed: int = 0

    def __post_init__(self) -> None:
        self.memory = F.ParameterMemory("float32", self.buffers, self.buffers)

    @property
    def stored(self) -> Mapping[str, torch.Tensor]:
        return {}                                   # none of the model's tensors is attacked

    @property
    def catastrophic(self) -> None:
        return None

    def total_bits(self) -> int:
        return self.memory.total_bits()

    def strata_layout(self, bits: Sequence[int] | None = None) -> strata.Layout:
        return strata.Layout.of(self.memory, bits)

    def draw(self, point: float, trial: int, stratum: int | None = None) -> F.Faults:
        rng = fault_space.trial_rng(self.seed, point, trial, stratum)
        if stratum is not None:
            return strata.draw_faults(self.memory, rng, point, stratum)
        return F.draw_faults(self.memory, rng, ber=point)

    def injected(self, faults: F.Faults) -> ContextManager[Any]:
        return F.injected(self.memory, faults)

    def faulty_logits(self, faults: F.Faults, block: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        with self.injected(faults):
            return self.golden_logits(), {}

    def fault_free(self, faults: F.Faults) -> dict[str, Any]:
        return {}

    def golden_logits(self) -> torch.Tensor:
        return predict(self.model, self.buffers["images"], 16)


BER = 2e-4   # about 20 faults per trial: few enough that each trial's sites are stored


def test_a_new_fault_target_plugs_into_the_runner_the_store_and_the_stopping_rules(tmp_path) -> None:
    """The toy space above runs through ``trials.Runner`` and ``run_campaign`` unchanged: fixed
    trials whose numbers an independent flip of the same bits reproduces, and a ``--precision``
    campaign over its strata."""
    x, y = _data()
    model = make_tiny_model().eval()
    space = InputBufferSpace(model, {"images": x.clone()}, seed=SEED)
    assert isinstance(space, fault_space.FaultSpace)
    runner = trials.Runner(space, Golden(y, golden_predictions(space.golden_logits())))
    assert runner.golden_metrics["accuracy"] == 1.0
    results = runner.run_many([(BER, t) for t in range(6)])
    assert [r.n_faults for r in results] == [space.draw(BER, t).count for t in range(6)]
    assert torch.equal(space.buffers["images"], x)                          # every trial undone
    faulty = next(r for r in results if r.n_faults)
    flipped = x.clone().numpy()
    words = flipped.reshape(-1).view(np.uint32)
    for _, index, bit in faulty.sites:
        words[index] ^= np.uint32(1 << bit)
    assert faulty.metrics == trial_metrics(predict(model, torch.from_numpy(flipped), 16), runner.golden)
    config = campaign.CampaignConfig(bers=(BER,), trials=6, seed=SEED)
    summary = campaign.run_campaign(model, x, y, config, tmp_path / "fixed", runner=runner, progress=False)
    row = summary["results"][0]
    assert row["trials"] == 6 and row["accuracy_mean"] == pytest.approx(np.mean([r.metrics["accuracy"]
                                                                                for r in results]))
    assert summary["memory"]["fault_target_bits"] == x.numel() * 32
    precise = campaign.CampaignConfig(bers=(1e-3,), precision=0.05, seed=SEED)
    row = campaign.run_campaign(model, x, y, precise, tmp_path / "precision", runner=runner,
                                progress=False)["results"][0]
    assert row["ci_method"] == strata.CI_STRATIFIED and row["trials"] >= strata.PILOT
    assert [s["weight"] for s in row["strata"]] == pytest.approx(list(strata.weights(space.strata_layout(), 1e-3)))
