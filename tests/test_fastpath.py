"""Exact shortcuts (design §7): the same numbers as the plain path, bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ftcnn.campaigns import campaign as C
from ftcnn import checkpoint, data
from ftcnn.injection import fastpath
from ftcnn.injection import faults as F

PLAIN = dict(shortcut=False, batch_trials=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = checkpoint.build(name, num_classes=10, in_channels=1, input_size=8, **kw).eval()
    for m in model.modules():  # non-trivial running statistics, so BN is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.load("digits", "test").tensors
    return x[:200], y[:200]


MODELS = [("lenet5", {}), ("resnet20", {"width": 0.25}), ("vgg11", {"width": 0.125})]


@pytest.mark.parametrize("name, kw", MODELS)
def test_shortcut_logits_equal_plain_bit_for_bit(name, kw, digits) -> None:
    """Per trial, the logits from the cut equal a whole forward with the same faults."""
    x, y = digits
    model = _model(name, **kw)
    config = C.CampaignConfig(bers=(1e-4,), trials=1, seed=1, batch_size=64)
    runner = C.prepare(model, x, y, config)
    assert runner.fast is not None and runner.fast.cuts
    started_late = 0
    for ber in (1e-5, 1e-4, 1e-3, 2e-2):
        for trial in range(6):
            faults = C.draw_trial_faults(runner.memory, config, ber, trial)
            if faults.count == 0:
                continue
            with F.injected(runner.memory, faults):
                plain = C.predict(model, x, config.batch_size)
            fast = runner.faulty_logits(faults)
            assert torch.equal(torch.nan_to_num(fast, 1.0, 2.0, 3.0), torch.nan_to_num(plain, 1.0, 2.0, 3.0))
            assert torch.equal(fast.isnan(), plain.isnan())
            started_late += runner.fast.start(faults) is not None
    assert started_late >= 5  # the shortcut was really taken, not only the plain fallback


@pytest.mark.parametrize("name, kw", MODELS)
def test_shortcut_and_batched_summaries_equal_plain(name, kw, digits, tmp_path) -> None:
    x, y = digits
    model = _model(name, **kw)
    base = dict(bers=(1e-4, 1e-3, 1e-2), trials=8, seed=5, batch_size=64)
    runs = {}
    for label, extra in {"plain": PLAIN, "shortcut": {"shortcut": True},
                         "batched": {"shortcut": False, "batch_trials": 3},
                         "both": {"shortcut": True, "batch_trials": 4}}.items():
        config = C.CampaignConfig(**base, **extra)
        runs[label] = C.run_campaign(model, x, y, config, tmp_path / label, progress=False)["results"]
    assert runs["shortcut"] == runs["plain"]
    assert runs["batched"] == runs["plain"]
    assert runs["both"] == runs["plain"]
    assert runs["plain"][-1]["due_mean"] > 0 or runs["plain"][-1]["sdc_mean"] > 0  # faults did bite


def test_batched_logits_equal_one_at_a_time(digits) -> None:
    x, y = digits
    model = _model("resnet20", width=0.25)
    config = C.CampaignConfig(bers=(1e-3,), trials=1, seed=2, batch_size=64, batch_trials=4)
    runner = C.prepare(model, x, y, config)
    assert runner.batch == 4 and runner.fast.batchable
    trials = [C.draw_trial_faults(runner.memory, config, 1e-3, t) for t in range(4)]
    assert all(f.count for f in trials)
    for use_cuts in (False, True):
        batched = runner.fast.batched_logits(trials, use_cuts=use_cuts)
        for faults, logits in zip(trials, batched):
            with F.injected(runner.memory, faults):
                plain = C.predict(model, x, config.batch_size)
            assert torch.equal(torch.nan_to_num(logits), torch.nan_to_num(plain))


def test_auto_trials_unaffected(tiny_model, tiny_data, tmp_path) -> None:
    x, y = tiny_data
    base = dict(bers=(1e-3, 1e-2), trials=None, ci_half_width=0.05, seed=0)
    plain = C.run_campaign(tiny_model, x, y, C.CampaignConfig(**base, **PLAIN), tmp_path / "p", progress=False)
    fast = C.run_campaign(tiny_model, x, y, C.CampaignConfig(**base, batch_trials=5), tmp_path / "f",
                          progress=False)
    assert fast["results"] == plain["results"]
    assert plain["results"][1]["trials"] > 10


class OutOfOrder(nn.Module):
    """Module order (head first) differs from execution order (body first)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8 * 4 * 4, 10)
        self.skip = nn.Conv2d(4, 8, 1)
        self.body = nn.Conv2d(1, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = torch.relu(self.body(x))
        b = nn.functional.max_pool2d(b, 2)
        out = torch.relu(self.mid(b)) + self.skip(b)
        return self.head(torch.flatten(out, 1))


def test_first_faulted_layer_follows_execution_not_module_order(tiny_data) -> None:
    x, y = tiny_data
    torch.manual_seed(0)
    model = OutOfOrder().eval()
    runner = C.prepare(model, x, y, C.CampaignConfig(bers=(1e-3,), trials=1))
    fast = runner.fast
    pos = fast.first_use
    assert pos["body.weight"] < pos["mid.weight"] < pos["skip.weight"] < pos["head.weight"]
    # module order says "head" is first; execution order says "mid" is
    faults = F.targeted([("head.weight", 3, 30), ("mid.weight", 5, 30)])
    module_order = [name for name in runner.memory.stored if name in faults.sites]
    assert module_order[0] == "head.weight"
    assert fast.start(faults).position <= pos["mid.weight"]
    # the skip branch reads the pooled body output: a cut after mid keeps it alive
    cut = fast.start(F.targeted([("skip.weight", 0, 30)]))
    assert cut.position == pos["skip.weight"] and len(cut.live) == 2
    for f in (faults, F.targeted([("skip.weight", 0, 30), ("skip.bias", 1, 29)])):
        with F.injected(runner.memory, f):
            plain = C.predict(model, x)
        assert torch.equal(runner.faulty_logits(f), plain)


def test_cache_budget_falls_back_exactly_with_a_warning(digits, tmp_path) -> None:
    x, y = digits
    model = _model("vgg11", width=0.125)
    with pytest.warns(UserWarning, match="cache budget"):
        runner = C.prepare(model, x, y, C.CampaignConfig(bers=(1e-3,), trials=1, cache_bytes=60_000))
    assert 0 < runner.fast.cache_bytes_used <= 60_000
    assert len(runner.fast.cuts) < len(runner.fast.first_use) // 2
    base = dict(bers=(1e-3,), trials=6, seed=3)
    small = C.run_campaign(model, x, y, C.CampaignConfig(**base, cache_bytes=60_000), tmp_path / "s",
                           progress=False)
    plain = C.run_campaign(model, x, y, C.CampaignConfig(**base, **PLAIN), tmp_path / "p", progress=False)
    assert small["results"] == plain["results"]


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = torch.relu(x)
        return self.fc(x.flatten(1))


def test_untraceable_model_runs_the_plain_path(tiny_data, tmp_path) -> None:
    x, y = tiny_data
    torch.manual_seed(0)
    model = Untraceable().eval()
    with pytest.warns(UserWarning, match="cannot trace"):
        runner = C.prepare(model, x, y, C.CampaignConfig(bers=(1e-2,), trials=1))
    assert runner.fast is None
    base = dict(bers=(1e-2,), trials=5, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = C.run_campaign(model, x, y, C.CampaignConfig(**base), tmp_path / "a", progress=False)
    b = C.run_campaign(model, x, y, C.CampaignConfig(**base, **PLAIN), tmp_path / "b", progress=False)
    assert a["results"] == b["results"]


def test_inplace_relu_does_not_corrupt_the_cache(tiny_data, tmp_path) -> None:
    x, y = tiny_data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3),
                          nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    base = dict(bers=(3e-3,), trials=10, seed=2)
    a = C.run_campaign(model, x, y, C.CampaignConfig(**base), tmp_path / "a", progress=False)
    b = C.run_campaign(model, x, y, C.CampaignConfig(**base, **PLAIN), tmp_path / "b", progress=False)
    assert a["results"] == b["results"]


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_shortcut_exact_for_other_storage_formats(dtype, digits, tmp_path) -> None:
    x, y = digits
    model = _model("lenet5")
    base = dict(bers=(1e-3,), trials=6, seed=4, dtype=dtype, device="cpu")
    a = C.run_campaign(model, x, y, C.CampaignConfig(**base, batch_trials=3), tmp_path / "a", progress=False)
    b = C.run_campaign(model, x, y, C.CampaignConfig(**base, **PLAIN), tmp_path / "b", progress=False)
    assert a["results"] == b["results"]


def test_execution_settings_are_not_identity(tiny_model, tiny_data, tmp_path) -> None:
    """A campaign started plain can be resumed with the shortcut, batching or workers."""
    x, y = tiny_data
    C.run_campaign(tiny_model, x, y, C.CampaignConfig(bers=(1e-2,), trials=4, **PLAIN), tmp_path, progress=False)
    s = C.run_campaign(tiny_model, x, y, C.CampaignConfig(bers=(1e-2,), trials=8, batch_trials=2), tmp_path,
                       progress=False)
    assert s["results"][0]["trials"] == 8
    with pytest.raises(ValueError, match="batch trials"):
        C.CampaignConfig(bers=(1e-2,), batch_trials=0)
    with pytest.raises(ValueError, match="workers"):
        C.CampaignConfig(bers=(1e-2,), workers=0)


def test_auto_batch_is_one_on_cpu(tiny_model, tiny_data) -> None:
    assert fastpath.auto_batch_trials(tiny_model, tiny_data[0], 1000) == 1


def _cli(*args: str):
    from _helpers import run_cli

    return run_cli(*args, threads=1)  # see one_thread()


def test_cli_speed_options_give_the_plain_numbers(digits, tmp_path) -> None:
    import json
    model = _model("lenet5")
    path = tmp_path / "lenet.pt"
    checkpoint.save(model, path, data="digits")
    common = ["inject", str(path), "--ber", "1e-3", "1e-2", "--trials", "6", "--seed", "2", "--limit", "100"]
    fast = _cli(*common, "--batch-trials", "3", "--device", "cpu", "-o", str(tmp_path / "fast"))
    assert fast.returncode == 0, fast.stderr
    plain = _cli(*common, "--no-shortcut", "-o", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    results = [json.loads((tmp_path / d / "summary.json").read_text())["results"] for d in ("fast", "plain")]
    assert results[0] == results[1]
    bad = _cli(*common, "--device", "cuda:7", "-o", str(tmp_path / "gpu"))
    if not torch.cuda.is_available():
        assert bad.returncode == 2 and bad.stderr.strip().startswith("error: device cuda:7 is not available")


def test_hooks_on_traced_through_modules_turn_the_shortcut_off(tiny_data) -> None:
    x, y = tiny_data
    torch.manual_seed(0)
    model = OutOfOrder().eval()
    model.register_forward_hook(lambda mod, args, out: out * 2)  # the root: fx would drop it
    with pytest.warns(UserWarning, match="hooks"):
        runner = C.prepare(model, x, y, C.CampaignConfig(bers=(1e-3,), trials=1))
    assert runner.fast is None


def test_shortcut_built_only_where_its_cuts_pay_for_their_set_up(digits, tmp_path, monkeypatch) -> None:
    """The default policy (``fastpath.SETUP_INFERENCES``, which conftest sets to 0 elsewhere): at a
    rate where nearly every trial faults the first layer the cuts cannot pay for their set-up and
    the plain path runs; at a low rate over many trials they do; the numbers are the same."""
    monkeypatch.setattr(fastpath, "SETUP_INFERENCES", 4)
    x, y = digits
    model = _model("lenet5")
    dense = C.CampaignConfig(bers=(1e-2,), trials=20, seed=3, batch_size=64)
    sparse = C.CampaignConfig(bers=(1e-6,), trials=2000, seed=3, batch_size=64)
    assert C.prepare(model, x, y, dense).fast is None
    assert C.prepare(model, x, y, sparse).fast is not None
    memory = C.prepare(model, x, y, dense).memory
    ok, why = fastpath.pays(model, memory, x, {1e-2: 20}, len(x), 32)
    assert not ok and "at most" in why
    ran = C.run_campaign(model, x, y, dense, tmp_path / "policy", progress=False)["results"]
    monkeypatch.setattr(fastpath, "SETUP_INFERENCES", 0)
    assert C.prepare(model, x, y, dense).fast is not None
    assert C.run_campaign(model, x, y, dense, tmp_path / "always", progress=False)["results"] == ran


def test_expected_skip_counts_work_before_the_first_faulted_target() -> None:
    # one target at node 2 (work 1 before it of 4): hit with certainty -> 1/4 of the work skipped
    assert fastpath.expected_skip({"a": 2}, {"a": 1e9}, [0, 1, 1, 1, 1]) == pytest.approx(0.25)
    # never hit: a fault-free trial, skipped without the shortcut -> nothing counted
    assert fastpath.expected_skip({"a": 2}, {"a": 0.0}, [0, 1, 1, 1, 1]) == 0.0
    # first target (node 1) hit half the time, else the one at node 4
    half = float(-torch.log(torch.tensor(0.5)))
    assert fastpath.expected_skip({"a": 1, "b": 4}, {"a": half, "b": 1e9}, [1, 1, 1, 1, 1]) == pytest.approx(
        0.5 * 1 / 5 + 0.5 * 4 / 5)
