"""Activation (neuron) faults: agreement with an independent plain computation,
statistics of the draw, per-layer rates, hook hygiene, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ftcnn.campaigns import activations as A
from ftcnn.campaigns.metrics import METRIC_NAMES, Golden, trial_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def data(n: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def bits_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy().view(np.uint32)


def hand_flip(out: torch.Tensor, sites, start: int, kind: str = "flip") -> torch.Tensor:
    """Plain: copy to numpy, one (sample, index, bit) at a time on a uint32 view."""
    a = out.detach().numpy().copy()
    u = a.reshape(a.shape[0], -1).view(np.uint32)
    for sample, index, bit in sites:
        row = sample - start
        if not 0 <= row < a.shape[0]:
            continue
        mask = np.uint32(1) << np.uint32(bit)
        if kind == "flip":
            u[row, index] ^= mask
        elif kind == "stuck0":
            u[row, index] &= ~mask
        else:
            u[row, index] |= mask
    return torch.from_numpy(a)


def hand_forward(model: nn.Sequential, x: torch.Tensor, sites_by_layer: dict, start: int,
                 kind: str = "flip") -> torch.Tensor:
    """The Sequential's layers one by one in plain Python, flipping after the faulted ones."""
    with torch.inference_mode():
        for name, layer in model.named_children():
            x = layer(x)
            if name in sites_by_layer:
                x = hand_flip(x, sites_by_layer[name], start, kind)
    return x


def hooked(model: nn.Module, x: torch.Tensor, plan: A.ActivationPlan, batch: int) -> torch.Tensor:
    with A.activation_faults(model, plan), torch.inference_mode():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def transient_sites(plan: A.ActivationPlan) -> dict:
    return {name: list(zip(lf.sample.tolist(), lf.index.tolist(), lf.bit.tolist()))
            for name, lf in plan.layers.items()}


@pytest.mark.parametrize("batch", [20, 7])
def test_transient_agrees_with_plain_computation(batch):
    model = small_cnn()
    x, _ = data(20)
    outputs = A.probe(model, x)
    assert list(outputs) == ["0", "4", "6"]
    assert outputs["0"].parts == ((4, 8, 8),)
    plan = A.draw_activation_faults(outputs, ber=2e-3, n_inputs=len(x), seed=3, trial=1)
    assert all(lf.count > 0 for lf in plan.layers.values())       # every layer faulted: a real check
    sites = transient_sites(plan)
    hand = torch.cat([hand_forward(model, x[i:i + batch], sites, i) for i in range(0, len(x), batch)])
    got = hooked(model, x, plan, batch)
    assert np.array_equal(bits_of(got), bits_of(hand))
    with torch.inference_mode():
        assert not np.array_equal(bits_of(got), bits_of(model(x)))


@pytest.mark.parametrize("kind", ["flip", "stuck0", "stuck1"])
def test_permanent_agrees_with_plain_computation(kind):
    model = small_cnn()
    x, _ = data(12)
    outputs = A.probe(model, x)
    plan = A.draw_activation_faults(outputs, ber=5e-3, mode="permanent", seed=1, kind=kind)
    assert plan.count > 0 and plan.n_inputs is None
    sites = {name: [(s, i, b) for s in range(len(x)) for i, b in zip(lf.index.tolist(), lf.bit.tolist())]
             for name, lf in plan.layers.items()}
    hand = torch.cat([hand_forward(model, x[i:i + 5], sites, i, kind) for i in range(0, len(x), 5)])
    got = hooked(model, x, plan, 5)
    assert np.array_equal(bits_of(got), bits_of(hand))


def test_targeted_sites_by_hand_struct():
    """One flip of the exponent MSB of a known value, checked against struct."""
    import struct

    model = small_cnn()
    x, _ = data(3)
    outputs = A.probe(model, x)
    plan = A.targeted_activation_faults(outputs, [("4", 1, 5, 30)], mode="transient", n_inputs=3)
    seen = {}
    handle = model[4].register_forward_hook(lambda m, a, o: seen.setdefault("clean", o.clone()))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
    probe = model[5].register_forward_pre_hook(lambda m, a: seen.setdefault("faulty", a[0].clone()))
    try:
        hooked(model, x, plan, 3)
    finally:
        probe.remove()
    value = float(seen["clean"][1, 5])
    (word,) = struct.unpack("<I", struct.pack("<f", value))
    (expected,) = struct.unpack("<f", struct.pack("<I", word ^ (1 << 30)))
    assert float(seen["faulty"][1, 5]) == expected
    clean, faulty = seen["clean"].clone(), seen["faulty"].clone()
    faulty[1, 5] = clean[1, 5]
    assert torch.equal(clean, faulty)                               # nothing else touched


def test_ber_zero_is_bit_exact():
    model = small_cnn()
    x, y = data(30)
    with torch.inference_mode():
        clean = model(x)
    outputs = A.probe(model, x)
    for mode in A.MODES:
        plan = A.draw_activation_faults(outputs, ber=0.0, n_inputs=len(x), mode=mode, seed=5)
        assert plan.count == 0
        assert np.array_equal(bits_of(hooked(model, x, plan, 8)), bits_of(clean))
    golden = Golden(y, clean.argmax(1))
    r = A.run_trial(model, x, y, golden, ber=0.0, seed=0, batch_size=8)
    assert {k: r[k] for k in METRIC_NAMES if k != "top5"} == \
        {k: v for k, v in trial_metrics(clean, golden).items() if k != "top5"}
    assert r["n_faults"] == 0 and r["faults_per_layer"] == {"0": 0, "4": 0, "6": 0}


def test_binomial_count_matches_the_rate():
    model = small_cnn()
    x, _ = data(4)
    outputs = A.probe(model, x)
    n_inputs, ber, trials = 50, 2e-4, 400
    bits = 32
    for name, out in outputs.items():
        n = out.numel * n_inputs * bits
        counts = []
        for t in range(trials):
            plan = A.draw_activation_faults({name: out}, ber=ber, n_inputs=n_inputs, seed=0, trial=t)
            lf = plan.layers[name]
            keys = (lf.sample * out.numel + lf.index) * bits + lf.bit
            assert len(np.unique(keys)) == lf.count                # distinct sites
            assert lf.sample.max(initial=0) < n_inputs and lf.index.max(initial=0) < out.numel
            counts.append(lf.count)
        mean, expected = float(np.mean(counts)), n * ber
        se = math.sqrt(n * ber * (1 - ber) / trials)
        assert abs(mean - expected) < 4 * se, (name, mean, expected, se)
    # permanent: Binomial(values * bits, ber) per layer
    out = outputs["0"]
    counts = [A.draw_activation_faults({"0": out}, ber=1e-3, mode="permanent", trial=t).count
              for t in range(400)]
    n = out.numel * 32
    assert abs(np.mean(counts) - n * 1e-3) < 4 * math.sqrt(n * 1e-3 / 400)


def test_bits_restrict_positions():
    outputs = A.probe(small_cnn(), data(2)[0])
    plan = A.draw_activation_faults(outputs, ber=0.05, n_inputs=10, bits=[30, 31], seed=2)
    assert plan.count > 0
    assert all(set(lf.bit.tolist()) <= {30, 31} for lf in plan.layers.values())
    with pytest.raises(ValueError, match="bit positions"):
        A.draw_activation_faults(outputs, ber=0.05, n_inputs=10, bits=[32])


def test_per_layer_ber_honoured():
    model = small_cnn()
    x, y = data(20)
    outputs = A.probe(model, x)
    for t in range(20):
        plan = A.draw_activation_faults(outputs, ber={"0": 0.0, "6": 1e-2}, n_inputs=len(x), trial=t)
        assert plan.layers["0"].count == 0 and plan.layers["4"].count == 0   # unmapped: 0
        assert plan.bers == {"0": 0.0, "4": 0.0, "6": 1e-2}
    assert plan.layers["6"].count > 0
    seen = []
    handle = model[0].register_forward_hook(lambda m, a, o: seen.append(o.clone()))
    try:
        hooked(model, x, plan, 20)
    finally:
        handle.remove()
    with torch.inference_mode():
        assert torch.equal(seen[0], model[0](x))
    r = A.run_trial(model, x, y, ber={"0": 0.0, "6": 1e-2}, trial=19)
    assert r["faults_per_layer"]["0"] == 0 and r["faults_per_layer"]["6"] == plan.layers["6"].count
    # overrides on top of a swept point (what a campaign file's [ber_per_layer] does)
    assert A.layer_bers(["0", "4", "6"], 1e-5, {"4": 0.0}) == {"0": 1e-5, "4": 0.0, "6": 1e-5}
    with pytest.raises(ValueError, match="not a fault-target layer"):
        A.layer_bers(["0", "4"], {"9": 1e-3})
    with pytest.raises(ValueError, match="outside"):
        A.layer_bers(["0"], {"0": 2.0})


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_removed_after_an_exception():
    model = small_cnn()
    x, _ = data(8)
    plan = A.draw_activation_faults(A.probe(model, x), ber=1e-2, n_inputs=8)
    with pytest.raises(RuntimeError, match="boom"):
        with A.activation_faults(model, plan):
            assert not _no_hooks(model)
            raise RuntimeError("boom")
    assert _no_hooks(model)
    # an error raised inside a forward (more inputs than the plan covers) too
    with pytest.raises(ValueError, match="plan covers 8 inputs"):
        hooked(model, torch.cat([x, x]), plan, 16)
    assert _no_hooks(model)
    # and a plan drawn for another shape is refused, not misapplied
    other = A.draw_activation_faults(A.probe(small_cnn(), x), ber=1e-2, n_inputs=8)
    with pytest.raises(ValueError, match="plan was drawn for"):
        hooked(model, torch.randn(8, 1, 10, 10), other, 8)
    assert _no_hooks(model)


def test_reproducible_and_independent_of_batch_size_and_input_count():
    model = small_cnn()
    x, y = data(300)
    outputs = A.probe(model, x)
    a = A.draw_activation_faults(outputs, ber=1e-4, n_inputs=300, seed=7, trial=4)
    b = A.draw_activation_faults(outputs, ber=1e-4, n_inputs=300, seed=7, trial=4)
    assert a.as_list() == b.as_list() and a.count > 0
    c = A.draw_activation_faults(outputs, ber=1e-4, n_inputs=300, seed=8, trial=4)
    assert c.as_list() != a.as_list()
    # the first 100 inputs get the same faults whether 100 or 300 are evaluated
    short = A.draw_activation_faults(outputs, ber=1e-4, n_inputs=100, seed=7, trial=4)
    assert short.as_list() == [s for s in a.as_list() if s[1] < 100]
    # another layer's rate does not move a layer's draws
    d = A.draw_activation_faults(outputs, ber={"0": 1e-4, "4": 1e-4, "6": 0.0}, n_inputs=300, seed=7, trial=4)
    assert d.layers["0"].index.tolist() == a.layers["0"].index.tolist()
    # run_trial: same numbers and the same faults applied at any batch size
    r1 = A.run_trial(model, x, y, ber=1e-4, seed=7, trial=4, batch_size=300)
    r2 = A.run_trial(model, x, y, ber=1e-4, seed=7, trial=4, batch_size=37)
    assert r1["faults_per_layer"] == r2["faults_per_layer"] == a.counts()
    assert r1 == r2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.skip = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.conv1(x)))
        out += self.skip(x)                                 # in-place residual add
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = Block()
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.block(self.stem(x)), 1))


def resnet_by_hand(model: TinyResNet, x: torch.Tensor, sites: dict, start: int, kind: str = "flip"):
    f = lambda name, t: hand_flip(t, sites[name], start, kind) if name in sites else t  # noqa: E731
    with torch.inference_mode():
        h = f("stem", model.stem(x))
        skip = f("block.skip", h.clone())
        out = f("block.conv2", model.block.conv2(f("block.conv1", model.block.conv1(h)).relu()))
        out = (out + skip).relu()
        return f("head", model.head(torch.flatten(out, 1)))


def test_residual_model_with_in_place_add():
    model = TinyResNet().eval()
    x, y = data(10)
    x_before = x.clone()
    layers = ["stem", "block.conv1", "block.conv2", "block.skip", "head"]
    outputs = A.probe(model, x, layers)
    assert list(outputs) == layers
    plan = A.draw_activation_faults(outputs, ber=3e-3, n_inputs=10, seed=2)
    assert all(lf.count for lf in plan.layers.values())
    got = hooked(model, x, plan, 4)
    hand = torch.cat([resnet_by_hand(model, x[i:i + 4], transient_sites(plan), i) for i in range(0, 10, 4)])
    assert np.array_equal(bits_of(got), bits_of(hand))
    assert torch.equal(x, x_before)                          # the identity's input was copied, not hit
    perm = A.draw_activation_faults(outputs, ber=5e-3, mode="permanent", seed=4, kind="stuck1")
    sites = {n: [(s, i, b) for s in range(10) for i, b in zip(lf.index.tolist(), lf.bit.tolist())]
             for n, lf in perm.layers.items()}
    got = hooked(model, x, perm, 3)
    hand = torch.cat([resnet_by_hand(model, x[i:i + 3], sites, i, "stuck1") for i in range(0, 10, 3)])
    assert np.array_equal(bits_of(got), bits_of(hand))
    r = A.run_trial(model, x, y, ber=1e-3, mode="transient", seed=0)
    assert set(r["faults_per_layer"]) == {"stem", "block.conv1", "block.conv2", "head"}  # default layers


class TwoHeads(nn.Module):
    """Returns a tuple of same-shape parts, like a protected layer's copies."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.a(x), self.b(x)


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = TwoHeads()

    def forward(self, x):
        a, b = self.heads(x)
        return torch.cat([a, b], 1)


def test_tuple_outputs_are_one_output_in_part_order():
    model = TupleModel().eval()
    x = torch.randn(4, 6)
    outputs = A.probe(model, x, ["heads"])
    assert outputs["heads"].parts == ((3,), (2,)) and outputs["heads"].numel == 5
    plan = A.targeted_activation_faults(outputs, [("heads", 1, 31), ("heads", 3, 31)], mode="permanent")
    with torch.inference_mode():
        clean = model(x)
    got = hooked(model, x, plan, 4)
    expected = clean.clone()
    expected[:, 1] = -expected[:, 1]                        # sign bit of part a's value 1
    expected[:, 3] = -expected[:, 3]                        # part b's value 0 (flat 3)
    assert torch.equal(got, expected)


def test_emulated_half_precision_datapath():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(5, 6)
    y = torch.zeros(5, dtype=torch.long)
    outputs = A.probe(model, x)
    for dtype, torch_dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        golden = A.golden_logits(model, x, outputs, dtype=dtype)
        with torch.inference_mode():
            h = model[0](x).to(torch_dtype).float()
            expected = model[2](model[1](h)).to(torch_dtype).float()
        assert torch.equal(golden, expected)
        zero = A.draw_activation_faults(outputs, ber=0.0, n_inputs=5, dtype=dtype)
        assert torch.equal(hooked(model, x, zero, 2), golden)
        plan = A.targeted_activation_faults(outputs, [("0", 2, 3, 15)], mode="transient", n_inputs=5, dtype=dtype)
        with torch.inference_mode():
            h = model[0](x).to(torch_dtype)
            h[2, 3] = -h[2, 3]                               # bit 15: the sign of a 16-bit float
            expected = model[2](model[1](h.float())).to(torch_dtype).float()
        assert torch.equal(hooked(model, x, plan, 5), expected)
        r = A.run_trial(model, x, y, ber=0.0, dtype=dtype)
        assert r["sdc"] == 0.0
        with pytest.raises(ValueError, match="bit position out of range"):
            A.targeted_activation_faults(outputs, [("0", 0, 16)], dtype=dtype)


def test_one_line_errors():
    model = small_cnn()
    x, _ = data(2)
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        A.probe(model, x, ["nope"])
    outputs = A.probe(model, x)
    with pytest.raises(ValueError, match="need n_inputs"):
        A.draw_activation_faults(outputs, ber=1e-3)
    with pytest.raises(ValueError, match="stuck-at faults are permanent"):
        A.draw_activation_faults(outputs, ber=1e-3, n_inputs=2, kind="stuck0")
    with pytest.raises(ValueError, match="unknown activation fault mode"):
        A.draw_activation_faults(outputs, ber=1e-3, mode="sometimes")
    with pytest.raises(ValueError, match="outside"):
        A.draw_activation_faults(outputs, ber=-1.0, n_inputs=2)
    with pytest.raises(ValueError, match="runs more than once"):
        shared = nn.Linear(4, 4)
        m = nn.Sequential(shared, nn.ReLU(), shared).eval()
        plan = A.draw_activation_faults(A.probe(m, torch.randn(1, 4)), ber=0.2, n_inputs=3, seed=0)
        hooked(m, torch.randn(3, 4), plan, 3)
    assert _no_hooks(m)


def test_protections_face_activation_faults():
    """A hardened model's original and copies are separate outputs with their own
    faults: full TMR outvotes a single flipped value, range restriction zeroes
    a huge one, and ber = 0 stays bit-exact."""
    from ftcnn import checkpoint
    from ftcnn.protection import hardening

    torch.manual_seed(0)
    model = checkpoint.build("lenet5", num_classes=10, in_channels=1, input_size=8).eval()
    x, y = data(16)
    tmr = hardening.harden(model, tmr="full").eval()
    outputs = A.probe(tmr, x)
    assert outputs["features.0.copies"].parts == ((6, 8, 8), (6, 8, 8))
    with torch.inference_mode():
        clean = model(x)
    zero = A.draw_activation_faults(outputs, ber=0.0, n_inputs=16)
    assert np.array_equal(bits_of(hooked(tmr, x, zero, 16)), bits_of(clean))
    one = A.targeted_activation_faults(outputs, [("features.0.original", 3, 100, 30),
                                                 ("classifier.0.copies", 5, 120 + 7, 30)],
                                       mode="transient", n_inputs=16)
    assert torch.equal(hooked(tmr, x, one, 16), clean)              # one of three wrong: outvoted
    plain = A.targeted_activation_faults(A.probe(model, x), [("classifier.2", 5, 7, 30)],
                                         mode="transient", n_inputs=16)
    assert not torch.equal(hooked(model, x, plain, 16), clean)      # the same kind of flip unprotected
    restricted = hardening.harden(model, ratio=0, restrict="zero", calibration=x).eval()
    r_out = A.probe(restricted, x)
    hit = A.targeted_activation_faults(r_out, [("classifier.2.original", 5, 7, 30)], mode="transient",
                                       n_inputs=16)
    with torch.inference_mode():
        r_clean = restricted(x)
    got = hooked(restricted, x, hit, 16)
    assert torch.isfinite(got).all()
    assert torch.equal(got[:5], r_clean[:5]) and torch.equal(got[6:], r_clean[6:])
    r = A.run_trial(tmr, x, y, ber=1e-3, seed=1)
    assert r["faults_per_layer"]["features.0.copies"] > 0


def test_native_bfloat16_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).to(torch.bfloat16).eval()
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    outputs = A.probe(model, x)
    assert outputs["0"].dtype == "bfloat16"
    plan = A.targeted_activation_faults(outputs, [("2", 1, 2, 15), ("2", 2, 0, 14)], mode="transient", n_inputs=4)
    with torch.inference_mode():
        clean = model(x)
    got = hooked(model, x, plan, 3)
    u = clean.view(torch.int16).clone()
    u[1, 2] ^= -32768                                             # bit 15 (the sign) as a signed int16
    u[2, 0] ^= 1 << 14
    assert torch.equal(got.view(torch.int16), u)
    drawn = A.draw_activation_faults(outputs, ber=0.05, n_inputs=4, seed=0)
    assert all(lf.bit.max(initial=0) < 16 for lf in drawn.layers.values())


def test_runner_is_a_campaign_trial_runner():
    """The runner a campaign would use: same trials as run_trial, TrialResult rows like
    parameter trials, per-layer overrides on top of the swept point, fault-free shortcut exact."""
    from ftcnn.campaigns.trials import TrialResult

    model = small_cnn()
    x, y = data(40)
    runner = A.prepare(model, x, y, batch_size=16, seed=3, overrides={"0": 0.0})
    assert runner.total_bits() == 40 * 32 * sum(o.numel for o in runner.outputs.values())
    plan, metrics = runner.run(1e-3, 2)
    assert plan.bers == {"0": 0.0, "4": 1e-3, "6": 1e-3} and plan.layers["0"].count == 0
    direct = A.run_trial(model, x, y, runner.golden, ber={"0": 0.0, "4": 1e-3, "6": 1e-3}, seed=3, trial=2)
    assert metrics == {k: v for k, v in direct.items() if k != "n_faults"}
    rows = runner.run_many([(1e-3, 0), (1e-3, 1), (0.0, 0)])
    assert all(isinstance(r, TrialResult) for r in rows)
    assert [r.n_faults for r in rows[:2]] == [runner.draw(1e-3, t).count for t in (0, 1)]
    assert rows[2].n_faults == 0 and {k: rows[2].metrics[k] for k in METRIC_NAMES if k != "top5"} == \
        {k: runner.golden_metrics[k] for k in METRIC_NAMES if k != "top5"}
    runner.skip_fault_free = False
    _, ran = runner.run(0.0, 0)
    assert {k: ran[k] for k in METRIC_NAMES if k != "top5"} == \
        {k: runner.golden_metrics[k] for k in METRIC_NAMES if k != "top5"}
    with pytest.raises(ValueError, match="one rate for every layer"):   # strata need one binomial
        runner.run(1e-3, 0, stratum=1)
    with pytest.raises(ValueError, match="not a fault-target layer"):
        A.prepare(model, x, y, overrides={"nope": 0.0})


def test_exact_counts():
    model = small_cnn()
    x, y = data(30)
    outputs = A.probe(model, x)
    sizes = {n: o.numel * 32 * 30 for n, o in outputs.items()}
    hits = dict.fromkeys(outputs, 0)
    for t in range(600):
        plan = A.draw_activation_faults(outputs, count=1, n_inputs=30, trial=t)
        assert plan.count == 1
        hits[next(n for n, lf in plan.layers.items() if lf.count)] += 1
    total = sum(sizes.values())
    for name, size in sizes.items():                  # uniform over the fault space: layers by size
        p = size / total
        assert abs(hits[name] / 600 - p) < 4 * math.sqrt(p * (1 - p) / 600) + 1e-9, (name, hits)
    plan = A.draw_activation_faults(outputs, count=50, n_inputs=30, seed=1, bits=[30, 31])
    keys = {(n, s, i, b) for n, s, i, b in plan.as_list()}
    assert len(keys) == 50 and all(b in (30, 31) for *_, b in keys)
    sites = transient_sites(plan)
    hand = torch.cat([hand_forward(model, x[i:i + 8], sites, i) for i in range(0, 30, 8)])
    assert np.array_equal(bits_of(hooked(model, x, plan, 8)), bits_of(hand))
    perm = A.draw_activation_faults(outputs, count=3, mode="permanent", seed=2)
    assert perm.count == 3 and all(len(s) == 3 for s in perm.as_list())
    r = A.run_trial(model, x, y, count=4, seed=0, trial=0)
    assert r["n_faults"] == 4 and sum(r["faults_per_layer"].values()) == 4
    runner = A.prepare(model, x, y, by="count")
    assert runner.run(2, 0)[0].count == 2
    with pytest.raises(ValueError, match="exactly one of ber or count"):
        A.draw_activation_faults(outputs, n_inputs=3)
    with pytest.raises(ValueError, match="fault count 99999999 outside"):
        A.draw_activation_faults(outputs, count=99999999, n_inputs=3)


def test_a_campaign_runs_on_activation_faults(tmp_path):
    """campaign_runner is what the campaign calls instead of trials.prepare: with a config
    that says target = activations, run_campaign (unchanged) runs activation trials,
    fixed and sequential, and its numbers are run_trial's."""
    import dataclasses

    from ftcnn.campaigns import campaign

    @dataclasses.dataclass(frozen=True)
    class WiredConfig(campaign.CampaignConfig):     # the three fields the wiring adds
        target: str = "activations"
        activation_mode: str = "transient"
        ber_per_layer: tuple = (("0", 0.0),)

    model = small_cnn()
    x, y = data(120)
    config = WiredConfig
    cfg = config(bers=(1e-4, 1e-3), trials=6, seed=2)
    runner = A.campaign_runner(model, x, y, cfg)
    assert isinstance(runner, A.ActivationRunner) and runner.overrides == {"0": 0.0}
    summary = campaign.run_campaign(model, x, y, cfg, tmp_path / "fixed", runner=runner, progress=False)
    by_ber = {r["ber"]: r for r in summary["results"]}
    expected = np.mean([A.run_trial(model, x, y, runner.golden, ber={"0": 0.0, "4": 1e-3, "6": 1e-3},
                                    seed=2, trial=t)["accuracy"] for t in range(6)])
    assert by_ber[1e-3]["trials"] == 6 and by_ber[1e-3]["accuracy_mean"] == pytest.approx(expected, abs=1e-12)
    assert summary["memory"]["fault_target_bits"] == runner.total_bits()
    auto = config(bers=(1e-3,), trials=None, ci_half_width=0.1, seed=2)
    summary = campaign.run_campaign(model, x, y, auto, tmp_path / "auto",
                                    runner=A.campaign_runner(model, x, y, auto), progress=False)
    assert summary["results"][0]["ci_method"] == "betting confidence sequence"
    assert isinstance(A.campaign_runner(model, x, y, campaign.CampaignConfig(bers=(1e-5,))),
                      campaign.TrialRunner)                         # parameters: unchanged
    with pytest.raises(ValueError, match="precision"):
        A.campaign_runner(model, x, y, config(bers=(1e-5,), precision=0.01))
