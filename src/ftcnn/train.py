"""Training and clean evaluation: the models faults are injected into."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ftcnn import progress as progress_mod


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy on ``dataset``."""
    model.eval()
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += (model(x).argmax(dim=1) == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


def fit(model: nn.Module, train: Dataset, *, epochs: int = 5, lr: float = 2e-3,
        batch_size: int = 64, seed: int = 0, weight_decay: float = 0.0,
        progress: bool = True, desc: str = "train") -> list[float]:
    """Adam with cosine decay; returns the mean training loss per epoch.

    Seeded (initialisation of the data order), so a run is reproducible on
    one machine.
    """
    if epochs < 0:
        raise ValueError("epochs must be >= 0")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for epoch in range(epochs):
        model.train()
        total, n = 0.0, 0
        # a bar in a terminal; in a log file a plain line every few seconds at most
        with progress_mod.bar(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", enabled=progress) as bar:
            for x, y in bar:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(y)
                n += len(y)
                bar.set_postfix(loss=f"{total / n:.4f}")
        losses.append(total / max(n, 1))
    model.eval()
    return losses
