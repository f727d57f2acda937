"""Exactness holes (issue 10, items 6-8), each test built as the reproduction that failed:

- a write into a value computed before the cut (``out=``, an in-place op on a
  view) made the shortcut and fi's prefix reuse read stale or trial-corrupted
  golden activations;
- a weight shared by two modules was listed twice, restored in the wrong
  order, and the shortcut started at its second user;
- an exception inside ``inject`` left earlier flips in the model.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ftcnn.campaigns import campaign as C
from ftcnn.injection import graph
from ftcnn.injection import faults as F
from ftcnn.protection import vulnerability as V

PLAIN = dict(shortcut=False, batch_trials=1)
TRIALS = 200


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN where NaN."""
    return torch.equal(torch.nan_to_num(a, 1.0, 2.0, 3.0), torch.nan_to_num(b, 1.0, 2.0, 3.0)) and \
        torch.equal(a.isnan(), b.isnan())


class PreCutWrite(nn.Module):
    """Five cuts (c2, c3, c4, f1, f2; the shortcut verifies the first, middle and
    last); a value ``a`` computed before the cut at c3 is written after it:

    - ``out``: ``a = torch.add(a, relu(b), out=a)``: the golden run leaves the cached
      ``a`` at a + b (stale for a trial starting at c3), and every such trial
      writes its faulty sum into the cache that the next one reads;
    - ``view``: ``a[:, :4].mul_(...)``: the view is computed before the cut too,
      so copying the cached values one by one (the old remedy for in-place ops)
      cut the write off from ``a``.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 5, padding=2)
        self.c4 = nn.Conv2d(8, 4, 3, padding=1)
        self.f1 = nn.Linear(4 * 8 * 8, 8)
        self.f2 = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c2(torch.relu(self.c1(x))))
        if self.kind == "out":
            b = self.c3(a)
            a = torch.add(a, torch.relu(b), out=a)
            c = torch.relu(self.c4(a))
        else:
            v = a[:, :4]
            b = self.c3(a)
            v.mul_(torch.sigmoid(b[:, :4]))
            c = torch.relu(self.c4(a * 2))  # a fresh value after the write: the cut at c4 is clean
        return self.f2(torch.relu(self.f1(torch.flatten(c, 1))))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return PreCutWrite(kind).eval()


def _trials_equal_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: C.CampaignConfig
                        ) -> tuple[int, int]:
    """Per trial, the shortcut's logits against a whole forward with the same faults;
    returns (trials that differ, trials that started after the first layer)."""
    runner = C.prepare(model, x, y, config)
    assert runner.fast is not None
    differ = late = 0
    point = (config.bers or config.counts)[0]
    for trial in range(TRIALS):
        faults = C.draw_trial_faults(runner.memory, config, point, trial)
        with F.injected(runner.memory, faults):
            plain = C.predict(model, x, config.batch_size)
        differ += not _same(runner.faulty_logits(faults), plain)
        late += runner.fast.start(faults) is not None
    return differ, late


@pytest.mark.parametrize("kind", ["out", "view"])
def test_shortcut_exact_when_the_suffix_writes_a_pre_cut_value(kind, data, tmp_path) -> None:
    x, y = data
    model = _model(kind)
    config = C.CampaignConfig(counts=(1,), trials=TRIALS, seed=0, batch_size=32)
    with pytest.warns(UserWarning, match="1 of 5 layers cannot start a trial"):
        differ, late = _trials_equal_plain(model, x, y, config)
        runs = [C.run_campaign(model, x, y, C.CampaignConfig(counts=(1,), trials=TRIALS, seed=1, **extra),
                               tmp_path / label, progress=False)["results"]
                for label, extra in (("fast", {}), ("plain", PLAIN))]
    assert differ == 0
    assert late > TRIALS // 2  # the shortcut still starts late where that is exact
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kind", ["out", "view"])
def test_hazardous_cuts_are_the_ones_left_out(kind, data) -> None:
    """Only the cut between the value's computation and the write is unsafe; trials
    whose first fault lies there start at the cut before (c2)."""
    x, y = data
    with pytest.warns(UserWarning, match="writes into relu_1, a value computed before it"):
        runner = C.prepare(_model(kind), x, y, C.CampaignConfig(counts=(1,), trials=1))
    fast = runner.fast
    cut_layers = {pos: name for name, pos in fast.first_use.items()}
    assert sorted(cut_layers[c.position].split(".")[0] for c in fast.cuts) == ["c2", "c4", "f1", "f2"]
    assert fast.start(F.targeted([("c3.weight", 0, 30)])).position == fast.first_use["c2.weight"]


@pytest.mark.parametrize("kind", ["out", "view"])
def test_fi_reuse_exact_when_the_suffix_writes_a_pre_cut_value(kind, data) -> None:
    x, _ = data
    model = _model(kind)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    settings = dict(samples=6, seed=2, bits=[22, 30, 31], pilot=2)
    with pytest.warns(UserWarning, match="activation reuse off for c3") as record:
        fast = V.analyze(model, x, y, "fi", reuse=True, **settings)["layers"]
    assert [str(w.message).split(":")[0] for w in record if "reuse off" in str(w.message)] == \
        ["activation reuse off for c3"]  # the other layers keep their reuse
    plain = V.analyze(model, x, y, "fi", reuse=False, **settings)["layers"]
    assert fast == plain
    assert any(v > 0 for vs in fast.values() for v in vs)


def test_write_analysis_sees_the_usual_patterns() -> None:
    """Writes and aliases the analysis must see; a clean graph has none."""
    class Patterns(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = x * 2
            v = a.view(-1).narrow(0, 0, 3).t().detach()
            v.add_(1)                                   # method ending in _ on an alias of a
            b = a + 1
            b += 1                                      # fx records this out of place: no write
            c = self.act(b * 3)                         # inplace module
            d = nn.functional.relu(c + 1, True)         # inplace passed by position
            e = torch.sigmoid(d)
            torch.mul(e, 2, out=e)                      # out=
            return e

    gm = torch.fx.symbolic_trace(Patterns())
    effects = graph.memory_effects(gm)
    written = {m.name: sorted(r.name for r in roots) for m, roots in effects.writes.items()}
    assert written == {"add_": ["mul"], "act": ["mul_1"], "relu": ["add_2"], "mul_2": ["sigmoid"]}
    assert not effects.state_writers
    clean = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten()))
    assert not graph.memory_effects(clean).writes
    stateful = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2).train()))
    assert graph.memory_effects(stateful).state_writers  # running statistics are model state


class Block(nn.Module):
    """torchvision's BasicBlock: in-place ReLUs (one module used twice) and ``out += identity``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def test_usual_in_place_ops_keep_every_cut(data) -> None:
    """Writes into values the suffix itself computed (in-place ReLU after a conv or
    BN, a residual sum) are safe: no cut is lost, and the numbers are the plain path's."""
    x, y = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), Block(4),
                          Block(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    config = C.CampaignConfig(counts=(1,), trials=TRIALS, seed=0, batch_size=32, include_bn=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="shortcut")
        runner = C.prepare(model, x, y, config)
    start = runner.fast._first_compute()
    assert len(runner.fast.cuts) == len({p for p in runner.fast.first_use.values() if p > start})
    assert graph.memory_effects(runner.fast.traced).writes  # the in-place ReLUs are seen...
    differ, late = _trials_equal_plain(model, x, y, config)
    assert differ == 0 and late > TRIALS // 2  # ...and judged harmless


# --- tied parameters ----------------------------------------------------------------

class Tied(nn.Module):
    """``late`` is registered (module order) before ``early`` but runs after it;
    both use one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.late = nn.Linear(16, 16)
        self.fc = nn.Linear(4 * 8 * 8, 16)
        self.early = nn.Linear(16, 16)
        self.early.weight = self.late.weight
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(torch.flatten(torch.relu(self.conv(x)), 1)))
        return self.head(torch.relu(self.late(torch.relu(self.early(h)))))


def _tied() -> nn.Module:
    torch.manual_seed(0)
    return Tied().eval()


def test_a_tied_weight_is_one_fault_target() -> None:
    model = _tied()
    names = list(F.fault_targets(model))
    assert names == ["conv.weight", "conv.bias", "late.weight", "late.bias", "fc.weight", "fc.bias",
                     "early.bias", "head.weight", "head.bias"]
    memory = F.parameter_memory(model)
    unique = sum(p.numel() for p in model.parameters())  # parameters() lists a tied one once
    assert memory.total_bits() == unique * 32
    assert memory.canonical("early.weight") == "late.weight"


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_two_faults_in_one_word_via_both_names_restore_exactly(dtype) -> None:
    model = _tied()
    memory = F.parameter_memory(model, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stored = {k: v.clone() for k, v in memory.stored.items()}
    faults = F.targeted([("late.weight", 5, 3), ("early.weight", 5, 6)])
    with F.injected(memory, faults):
        assert not torch.equal(model.late.weight, before["late.weight"])
        assert model.early.weight is model.late.weight
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.int32) if v.is_floating_point() else v,
                           before[k].view(torch.int32) if v.is_floating_point() else before[k]), k
    for k, v in memory.stored.items():
        assert torch.equal(v, stored[k]), k


def test_shortcut_starts_at_the_first_user_of_a_tied_weight(data, tmp_path) -> None:
    x, y = data
    model = _tied()
    config = C.CampaignConfig(counts=(1,), trials=TRIALS, seed=0, batch_size=32)
    runner = C.prepare(model, x, y, config)
    pos = runner.fast.first_use
    assert pos["late.weight"] == pos["early.bias"] < pos["late.bias"]
    assert not runner.fast.batchable  # one weight, two module calls: no per-trial module runs
    differ, late = _trials_equal_plain(model, x, y, config)
    assert differ == 0 and late > TRIALS // 2
    runs = [C.run_campaign(model, x, y, C.CampaignConfig(counts=(1, 3), trials=TRIALS, seed=2, **extra),
                           tmp_path / label, progress=False)["results"]
            for label, extra in (("fast", {}), ("plain", PLAIN))]
    assert runs[0] == runs[1]


def test_fi_reuse_exact_with_a_tied_weight(data) -> None:
    x, _ = data
    model = _tied()
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    settings = dict(samples=4, seed=1, bits=[30, 31], pilot=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="activation reuse off")
        fast = V.analyze(model, x, y, "fi", reuse=True, **settings)["layers"]
    plain = V.analyze(model, x, y, "fi", reuse=False, **settings)["layers"]
    assert fast == plain
    assert list(fast) == ["conv", "late", "fc", "early", "head"]


# --- inject is all-or-nothing ---------------------------------------------------------

def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()


def _bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().view(torch.int32) for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v.detach().view(torch.int32), before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [("nope.weight", 0, 1), ("3.weight", 10_000, 3), ("0.bias", 1, 32),
                                 ("0.bias", -1, 3)])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_bad_site_after_good_ones_changes_nothing(bad, dtype) -> None:
    model = _small()
    memory = F.parameter_memory(model, dtype)
    before, stored = _bits(model), {k: v.clone() for k, v in memory.stored.items()}
    faults = F.targeted([("0.weight", 3, 6), ("3.weight", 1, 7), ("3.bias", 2, 5), bad])  # int8-valid bits
    with pytest.raises(ValueError):
        F.inject(memory, faults)
    assert _unchanged(model, before)
    assert all(torch.equal(v, stored[k]) for k, v in memory.stored.items())


def test_an_interrupt_mid_inject_restores_what_was_flipped(monkeypatch) -> None:
    model = _small()
    memory = F.parameter_memory(model)
    before = _bits(model)
    real, calls = F.flip_bits, []

    def flaky(tensor, index, bits, mode="flip", values=None):
        calls.append(1)
        out = real(tensor, index, bits, mode, values)
        if len(calls) == 2:  # the second tensor is already flipped: the worst moment
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(F, "flip_bits", flaky)
    faults = F.targeted([("0.weight", 3, 30), ("3.weight", 1, 30), ("3.bias", 2, 30)])
    with pytest.raises(KeyboardInterrupt):
        with F.injected(memory, faults):
            pytest.fail("the block must not run")
    assert len(calls) == 2
    assert _unchanged(model, before)


def test_restore_undoes_in_reverse_order() -> None:
    """Two records of one word (as a caller combining undo lists can produce) come back exactly."""
    model = _small()
    memory = F.parameter_memory(model)
    before = _bits(model)
    first = F.inject(memory, F.targeted([("0.weight", 0, 30)]))
    second = F.inject(memory, F.targeted([("0.weight", 0, 29)]))
    F.restore(memory, first + second)
    assert _unchanged(model, before)
    assert np.isfinite(model[0].weight.detach().numpy()).all()
