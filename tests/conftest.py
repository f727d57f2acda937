from __future__ import annotations

from typing import Iterator

import torch
import pytest
from torch import nn

from ftcnn.distributed import using_threads

torch.set_num_threads(2)


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
