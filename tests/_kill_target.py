"""A campaign run in a child process so that a test can SIGKILL it midway."""

import sys

import torch

from conftest import make_tiny_model
from ftcnn.campaigns.campaign import CampaignConfig, run_campaign

if __name__ == "__main__":  # pytest --doctest-modules imports this file: run only as a script
    out = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    config = CampaignConfig(bers=(1e-3, 1e-2), trials=400, seed=7)
    run_campaign(make_tiny_model(), x, y, config, out, progress=False)
