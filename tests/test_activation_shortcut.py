"""The activation-fault shortcut (issue 24): trials start at their first faulted layer, input by
input, from cached golden activations, and give the plain path's numbers bit for bit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ftcnn.campaigns import activations as A
from ftcnn.campaigns import campaign as C

# the same models (BatchNorm statistics made non-trivial) and inputs as the parameter shortcut's tests
from test_fastpath import _model, digits  # noqa: F401  (digits: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = [("lenet5", {}), ("resnet20", {"width": 0.25})]



def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN and Inf included."""
    return torch.equal(torch.nan_to_num(a, 1.0, 2.0, 3.0), torch.nan_to_num(b, 1.0, 2.0, 3.0)) \
        and torch.equal(a.isnan(), b.isnan())


def _pair(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> tuple[A.ActivationRunner, A.ActivationRunner]:
    fast = A.prepare(model, x, y, seed=3, batch_size=64, **kw)
    plain = A.prepare(model, x, y, seed=3, batch_size=64, shortcut=False, **kw)
    assert plain.fast is None
    return fast, plain


@pytest.mark.parametrize("name, kw", MODELS)
def test_transient_trials_equal_plain_bit_for_bit(name, kw, digits) -> None:
    """Per trial: the same logits, predictions, metrics and faults written per layer; and the
    shortcut really skipped work (untouched inputs, inputs started past the first layer)."""
    x, y = digits
    fast, plain = _pair(_model(name, **kw), x, y)
    assert fast.fast is not None and fast.fast.cuts and fast.fast.min_rows is not None
    skipped = late = 0
    for ber in (1e-7, 1e-6, 1e-5, 1e-4, 1e-3):
        for trial in range(4):
            plan = fast.draw(ber, trial)
            if plan.count == 0:
                continue
            a, applied_fast = fast.faulty_logits(plan)
            b, applied_plain = plain.faulty_logits(plan)
            assert _same(a, b), (ber, trial)
            assert torch.equal(a.argmax(1), b.argmax(1))
            assert applied_fast == applied_plain
            assert fast.run(ber, trial)[1] == plain.run(ber, trial)[1]
            touched = np.unique(np.concatenate([plan.layers[n].sample for n in plan.hooked()]))
            skipped += len(x) - len(touched)
            first = plan.layers[next(iter(plan.layers))]
            late += len(np.setdiff1d(touched, first.sample))   # inputs whose first fault is past layer 1
    assert skipped > 0 and late > 0


@pytest.mark.parametrize("settings", [dict(mode="permanent"), dict(mode="permanent", kind="stuck1"),
                                      dict(dtype="float16"), dict(layers=["layer1.0", "fc"])],
                         ids=["permanent", "stuck1", "float16", "inlined-block"])
def test_other_plans_equal_plain_bit_for_bit(settings, digits) -> None:
    """Permanent faults (every input: a whole-batch cut), an emulated format (every output
    rounded) and a layer fx inlines (a residual block: its hook fires only in the model)."""
    x, y = digits
    fast, plain = _pair(_model("resnet20", width=0.25), x, y, **settings)
    assert fast.fast is not None
    compared = 0
    for ber in (1e-5, 1e-4, 1e-3):
        for trial in range(3):
            plan = fast.draw(ber, trial)
            if plan.count == 0 and not settings.get("dtype"):
                continue
            a, applied_fast = fast.faulty_logits(plan)
            b, applied_plain = plain.faulty_logits(plan)
            assert _same(a, b) and applied_fast == applied_plain, (ber, trial)
            compared += 1
    assert compared >= 3


def test_exact_counts_and_targeted_sites(digits) -> None:
    """``by="count"`` plans and hand-placed sites, one input late in a truncated batch."""
    x, y = digits
    model = _model("lenet5")
    fast, plain = _pair(model, x, y, by="count")
    for count in (1, 5, 40):
        plan = fast.draw(count, 0)
        assert _same(fast.faulty_logits(plan)[0], plain.faulty_logits(plan)[0])
    sites = [("classifier.2", 199, 3, 30), ("classifier.0", 70, 0, 31), ("features.3", 5, 17, 29)]
    plan = A.targeted_activation_faults(fast.outputs, sites, mode="transient", n_inputs=len(x))
    a, b = fast.faulty_logits(plan)[0], plain.faulty_logits(plan)[0]
    assert _same(a, b)
    changed = set(torch.nonzero((a != fast.golden_output).any(1)).flatten().tolist())
    assert changed and changed <= {199, 70, 5}   # the other inputs kept their golden logits


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


def test_untraceable_model_says_so_once_and_runs_the_plain_path(tiny_data) -> None:
    x, y = tiny_data
    torch.manual_seed(0)
    model = Untraceable().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = A.prepare(model, x, y, seed=1)
    said = [str(w.message) for w in caught if "activation shortcut off" in str(w.message)]
    assert len(said) == 1 and "cannot trace" in said[0]
    assert runner.fast is None
    plan = runner.draw(1e-3, 0)
    with A.activation_faults(model, plan), torch.inference_mode():
        expected = model(x)
    assert plan.count and _same(runner.faulty_logits(plan)[0], expected)


def test_campaign_summaries_equal_with_and_without_the_shortcut(digits, tmp_path) -> None:
    x, y = digits
    model = _model("lenet5")
    base = dict(bers=(1e-6, 1e-4, 1e-3), trials=6, seed=5, batch_size=64, target="activations")
    runs = {label: C.run_campaign(model, x, y, C.CampaignConfig(**base, shortcut=on), tmp_path / label,
                                  progress=False)["results"]
            for label, on in (("plain", False), ("shortcut", True))}
    assert runs["shortcut"] == runs["plain"]
    assert runs["plain"][-1]["sdc_mean"] > 0   # faults did bite


def test_a_last_batch_smaller_than_min_rows(digits) -> None:
    """195 inputs in batches of 64: the last holds 3, fewer than LeNet-5's ``min_rows`` here,
    so its faulty inputs run padded with repeats past the plan's last input."""
    x, y = digits
    fast, plain = _pair(_model("lenet5"), x[:195], y[:195])
    assert fast.fast is not None and fast.fast.min_rows is not None
    sites = [("classifier.0", 194, 1, 30), ("features.0", 193, 7, 31), ("classifier.4", 10, 0, 30)]
    plan = A.targeted_activation_faults(fast.outputs, sites, mode="transient", n_inputs=195)
    assert _same(fast.faulty_logits(plan)[0], plain.faulty_logits(plan)[0])
    for trial in range(4):
        plan = fast.draw(1e-5, trial)
        assert _same(fast.faulty_logits(plan)[0], plain.faulty_logits(plan)[0])
        assert fast.faulty_logits(plan)[1] == plain.faulty_logits(plan)[1]
