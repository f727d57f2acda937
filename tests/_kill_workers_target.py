"""A campaign on two worker processes, run in a child so a test can kill it midway."""

import sys

import torch

from conftest import make_tiny_model
from ftcnn.campaigns.campaign import CampaignConfig, run_campaign

if __name__ == "__main__":  # spawned workers re-import this file: run only in the parent
    out = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    config = CampaignConfig(bers=(1e-3, 1e-2), trials=150, seed=7, workers=2)
    run_campaign(make_tiny_model(), x, y, config, out, progress=False)
