"""``--precision`` strata for protected models (issue 22 item 9) and BatchNorm in int8.

The catastrophic stratum is no longer "a bit-30 flip": a single-flip sensitivity pass in the
pilot (``strata.measure_sensitivity``) finds the (target group, bit) pairs that are catastrophic
for the model measured (a bound's shrinking flips of bits 23-29, not its bit 30), the strata
split draws by them with exact binomial weights, and summary.json records them. Coverage is
tested on a hardened LeNet-5 (weight check + restriction, digits) at BER 1e-3 against a long
plain reference run. Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from ftcnn.campaigns import campaign as C
from ftcnn import checkpoint, data, train
from ftcnn.campaigns import strata
from ftcnn.protection import hardening
from ftcnn.injection import faults as F

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the measured set defines the stratum -----------------------------------------------------------

class Cap(nn.Module):
    """One upper bound on a whole activation (a protection value, declared like ``Restrict``'s):
    a bound of 1.0 has exponent bits 23-29 set, so their flips shrink it towards 0 (everything
    clipped: catastrophic) while a bit-30 flip only makes it infinite (harmless)."""

    fault_buffers = ("high",)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("high", torch.tensor([1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(x, self.high)


def capped_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), Cap(), nn.Linear(32, 10)).eval()
    x = 0.3 * torch.randn(200, 1, 8, 8)     # activations mostly below the bound: it rarely clips
    with torch.no_grad():
        y = model(x).argmax(dim=1)          # the model is right on its own labels
    return model, x, y


def test_a_bounds_shrinking_flips_are_measured_catastrophic_and_recorded(tmp_path):
    """The issue's case: flips of bits 27-29 of a bound are catastrophic and used to land in
    the "no MSB flip" stratum. Measured now: they (not bit 30) define the bound's catastrophic
    sites, the layout counts them, and the campaign's summary.json records the set."""
    model, x, y = capped_model()
    config = C.CampaignConfig(bers=(1e-4,), precision=0.05, seed=3)
    runner = C.prepare(model, x, y, config)
    found = runner.memory.catastrophic.groups
    assert {27, 28, 29} <= set(found["Cap.high"]) and 30 not in found["Cap.high"], found
    layout = strata.Layout.of(runner.memory, None)
    cap = layout.names.index("3.high")
    assert set(layout.bits_of(cap)[0].tolist()) == set(found["Cap.high"])
    assert layout.n_msb == sum(runner.memory.numel(n) * len(runner.memory.catastrophic.bits_of(n))
                               for n in layout.names)
    assert layout.n_msb + layout.n_other == runner.memory.total_bits()
    summary = C.run_campaign(model, x, y, config, tmp_path / "run", progress=False)
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert stored["results"][0]["catastrophic"]["bits"]["Cap.high"] == list(found["Cap.high"])
    assert summary["results"][0]["catastrophic"] == stored["results"][0]["catastrophic"]


def _synthetic(memory: F.ParameterMemory, hot: dict[str, tuple[int, ...]]) -> strata.Sensitivity:
    groups = {name: name.rpartition(".")[2] for name in memory.stored}
    return strata.Sensitivity(hot, groups, {g: {} for g in hot})


def test_strata_draws_count_the_measured_sites_and_their_weights_are_exact(tiny_model):
    """With per-group catastrophic bits (weights: 30; biases: 27-29), a stratum's draws hold
    exactly its number of catastrophic sites, and the exact weights match the frequencies of
    plain draws classified by the same sites (4 sigma, 4,000 draws)."""
    memory = F.parameter_memory(tiny_model)
    memory.catastrophic = _synthetic(memory, {"weight": (30,), "bias": (27, 28, 29)})
    hot = {name: set(memory.catastrophic.bits_of(name)) for name in memory.stored}
    layout = strata.Layout.of(memory, None)
    assert layout.hot is not None
    assert layout.n_msb == sum(memory.numel(n) * len(hot[n]) for n in memory.stored)

    def catastrophic(faults: F.Faults) -> int:
        return sum(int(np.isin(bits, list(hot[name])).sum()) for name, (_, bits) in faults.sites.items())

    ber = 2e-3
    for h, check in ((1, lambda n, c: n >= 1 and c == 0), (2, lambda n, c: c == 1), (3, lambda n, c: c >= 2)):
        for i in range(40):
            faults = strata.draw_faults(memory, strata.trial_rng(0, ber, h, i), ber, h)
            assert check(faults.count, catastrophic(faults)), (h, i)
            for idx, bits in faults.sites.values():
                assert len(set(zip(idx.tolist(), bits.tolist()))) == len(idx)
    weights = strata.weights(layout, ber)
    counts, n = np.zeros(4), 4000
    for t in range(n):
        faults = F.draw_faults(memory, np.random.default_rng([11, t]), ber=ber)
        c = catastrophic(faults)
        counts[0 if faults.count == 0 else 1 if c == 0 else 2 if c == 1 else 3] += 1
    sigma = np.sqrt(weights * (1 - weights) / n)
    assert np.all(np.abs(counts / n - weights) <= 4 * sigma + 1e-12), (counts / n, weights)
    # the same memory measured as "bit 30 everywhere" draws exactly what the unmeasured one draws
    memory.catastrophic = _synthetic(memory, {"weight": (30,), "bias": (30,)})
    measured = strata.draw_faults(memory, strata.trial_rng(0, ber, 2, 5), ber, 2)
    memory.catastrophic = None
    assert measured.as_list() == strata.draw_faults(memory, strata.trial_rng(0, ber, 2, 5), ber, 2).as_list()


# --- coverage on a protected model at 1e-3 ---------------------------------------------------------------

BER = 1e-3


@pytest.fixture(scope="module")
def hardened(one_thread) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """LeNet-5/digits (5 epochs) with weight checks and output restriction (clamp), one copy of
    each bound: with the default copies no single flip is catastrophic (the measured set is empty
    and the design is one stratum), with one a restriction bound's sign flip is."""
    info = data.info("digits")
    train.seed_everything(0)
    net = checkpoint.build("lenet5", num_classes=info.num_classes, in_channels=info.in_channels,
                           input_size=info.input_size)
    train.fit(net, data.load("digits", "train"), epochs=5, seed=0, progress=False)
    calibration, _ = C.stack_dataset(data.load("digits", "train"))
    x, y = C.stack_dataset(data.load("digits", "test"))
    model = hardening.harden(net, ratio=0, restrict="clamp", check_weights="clamp", calibration=calibration,
                             bound_copies=1)
    return model.eval(), x, y


def _coverage(hardened, precision: float, runs: int, reference_trials: int) -> tuple[int, list, float]:
    """``runs`` seeded --precision runs (real trials, each seed its own) and a plain reference of
    ``reference_trials`` trials on every input: how many intervals cover the reference mean."""
    model, x, y = hardened
    config = C.CampaignConfig(bers=(BER,), precision=precision, seed=0)
    runner = C.prepare(model, x, y, config)
    plain = C.prepare(model, x, y, C.CampaignConfig(bers=(BER,), seed=0))
    reference = float(np.mean([r.metrics["accuracy"] for r in plain.run_many([(BER, t) for t in range(reference_trials)])]))
    budget = C.trial_budget(config, runner.memory)
    stops = []
    for k in range(runs):
        other = dataclasses.replace(runner, config=dataclasses.replace(runner.config, seed=100 + k))
        stops.append(C.precision_stop(other.config, other.memory, BER, budget,
                                      lambda asked, other=other: [r.metrics["accuracy"] for r in other.run_many(
                                          [(BER, i, h) for h, i in asked])],
                                      other.golden_metrics["accuracy"]))
    covered = sum(s.low <= reference <= s.high for s in stops)
    print(f"\nhardened LeNet-5/digits at {BER:g}: catastrophic {runner.memory.catastrophic.record()['bits']}; "
          f"weights {np.round(stops[0].weights, 4).tolist()}; reference {reference:.4f} ({reference_trials} "
          f"trials); {runs} runs at +-{precision}: covered {covered}, mean {np.mean([s.mean for s in stops]):.4f}, "
          f"trials {np.mean([s.total for s in stops]):.0f}, half-width {np.mean([s.half_width for s in stops]):.4f}")
    return covered, stops, reference


@pytest.mark.parametrize("runs,covered_at_least,bias", [
    (5, 4, 0.02),                                              # P(<= 3 of 5 | 95%) ~ 2%
    pytest.param(10, 8, 0.015, marks=pytest.mark.slow),        # P(<= 7 of 10 | 95%) ~ 1%
])
def test_precision_covers_on_a_protected_model(hardened, runs, covered_at_least, bias):
    """Seeded runs at +-0.03 against a 400-trial plain reference: 5 by default (real trials cost
    ~0.02 s each), 10 with ``slow``. Either fails if the measured stratum's weight or its draws are
    off: the mean of the estimates must lie within ``bias`` (~2 standard errors) of the reference."""
    covered, stops, reference = _coverage(hardened, 0.03, runs, 400)
    assert covered >= covered_at_least
    assert abs(np.mean([s.mean for s in stops]) - reference) < bias
    assert reference < hardened_golden(hardened) - 0.01       # faults did bite
    assert sum(s.weights[2] + s.weights[3] for s in stops[:1]) > 0.1  # the measured stratum is live


@pytest.mark.slow
def test_precision_covers_on_a_protected_model_at_length(hardened):
    """The issue's test, as tests/test_precision.py runs it: real trials of each stratum (500,
    seed 0) and a 2,000-trial plain reference on every input, then 200 seeded runs of the
    campaign's own procedure at +-0.01 drawing from the real pools: >= 93% of the intervals
    cover the truth, and the estimates and the truth agree with the long reference."""
    from test_precision import _coverage as pooled_coverage
    from test_precision import _pools
    model, x, y = hardened
    runner = C.prepare(model, x, y, C.CampaignConfig(bers=(BER,), precision=0.01, seed=0))
    p = _pools(runner, BER, 500, 2000, C.prepare(model, x, y, C.CampaignConfig(bers=(BER,), seed=0)))
    out = pooled_coverage(runner, p, BER, 200)
    _, ref_low, ref_high, _ = out["ref"]
    assert out["coverage"] >= 0.93
    assert ref_low <= out["estimates"] <= ref_high
    assert ref_low <= p["truth"] <= ref_high


def hardened_golden(hardened) -> float:
    model, x, y = hardened
    with torch.inference_mode():
        return float((model(x).argmax(dim=1) == y).float().mean())


# --- BatchNorm in int8 -------------------------------------------------------------------------------

def test_int8_batchnorm_values_get_their_own_scale():
    """A fault-free ResNet-20 (width 0.25, BatchNorm statistics far from 0/1) stored in int8:
    its BatchNorm values move its logits by < 1e-4 (per-tensor scales moved them by ~0.4)."""
    torch.manual_seed(0)
    net = checkpoint.build("resnet20", num_classes=10, in_channels=3, input_size=32, width=0.25)
    x = torch.randn(32, 3, 32, 32)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(x * 3 + 1)                                  # running statistics of their own
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 2.0)
                m.bias.uniform_(-1, 1)
    net.eval()

    def logits(include_bn: bool, per_tensor_bn: bool = False) -> torch.Tensor:
        m = copy.deepcopy(net)
        F.parameter_memory(m, "int8", include_bn=include_bn)
        if per_tensor_bn:  # the former storage: one scale per BatchNorm tensor
            with torch.no_grad():
                for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
                    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                        scale = t.abs().max() / 127
                        t.copy_(torch.round(t / scale) * scale)
        with torch.no_grad():
            return m(x)

    without_bn = logits(False)                          # only the conv/linear weights rounded
    moved = (logits(True) - without_bn).abs().max().item()
    before = (logits(False, per_tensor_bn=True) - without_bn).abs().max().item()
    print(f"\nint8 BatchNorm: logits moved by {moved:.2e} (per-tensor scales: {before:.3f})")
    assert moved < 1e-4
    assert before > 0.05                                # the check can tell the two apart
    memory = F.parameter_memory(copy.deepcopy(net), "int8")
    assert all(memory.scales[n].shape == memory.params[n].shape for n in memory.stored if "bn" in n)
