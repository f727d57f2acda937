from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
import pytest
from torch import nn

from ftcnn.injection import fastpath
from ftcnn.protection import cost
from ftcnn.campaigns.distributed import using_threads

from _helpers import train_digits_model

# One torch thread per test process: `pytest -n auto` already runs one worker per core, and a second
# thread per worker oversubscribes the cores (measured on a busy 2-core machine: test_report's comparison
# took 39.5 s of CPU with 2 threads, 15.9 s with 1). Tests about threads set their own.
torch.set_num_threads(1)

# Latency timing rounds outside tests/test_cost.py: ``cost.stable_latency`` times until two timings of
# the same model agree within 3% or 60 rounds are spent; on a busy CI machine they rarely agree, and each
# `harden`, `protect` or `compare` in a test spent ~10 s timing. Timings are volatile (no test compares
# one), the stopping rule itself is tested in test_cost.py with explicit ``max_rounds``.
TEST_TIMING_ROUNDS = 8


@pytest.fixture(autouse=True, scope="session")
def _quick_latency() -> Iterator[None]:
    """At most ``TEST_TIMING_ROUNDS`` rounds wherever a caller leaves ``max_rounds`` at its default."""
    real = cost.stable_latency

    def capped(*args: Any, max_rounds: int = TEST_TIMING_ROUNDS, **kwargs: Any) -> dict[str, Any]:
        return real(*args, max_rounds=max_rounds, **kwargs)

    capped.__wrapped__ = real  # type: ignore[attr-defined]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cost, "stable_latency", capped)
        yield


@pytest.fixture(autouse=True, scope="session")
def _shortcut_wherever_exact() -> Iterator[None]:
    """Build the exact shortcut wherever its cuts could skip any work (``fastpath.SETUP_INFERENCES``
    0): the tests of its exactness run campaigns of a few trials, where the default policy (build it
    only where it pays for its set-up) runs the plain path. tests/test_fastpath.py tests the policy
    with the real value."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fastpath, "SETUP_INFERENCES", 0)
        yield


@pytest.fixture(scope="session")
def digits_lenet5(tmp_path_factory) -> Path:
    """One LeNet-5 trained on the built-in digits (``ftcnn train``, 2 epochs, seed 0) per test worker,
    for the tests that only need some trained checkpoint. Read-only: a test that writes beside it or
    changes it copies it first (``_helpers.copy_of``)."""
    path = tmp_path_factory.mktemp("shared_lenet5") / "lenet.pt"
    r = train_digits_model(path, epochs=2, threads=1)
    assert "test accuracy" in r.stdout
    path.chmod(0o444)
    return path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny forwards on a shared 2-core machine: one torch thread is fastest and leaves the other
    core to the rest. Files use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with using_threads(1):
        yield


def make_tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10))


def grouped_model() -> nn.Module:
    """A user model with a grouped (4 groups) and a depthwise conv."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2, groups=8), nn.ReLU(),   # depthwise, multiplier 2
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


@pytest.fixture
def tiny_model() -> nn.Module:
    return make_tiny_model()


@pytest.fixture
def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    return x, y
