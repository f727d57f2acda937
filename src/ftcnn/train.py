"""Training and clean evaluation: the models faults are injected into.

``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...) says where the arithmetic runs; the model
is lent to it for the call (:func:`on_device`) and given back where it was, so a caller's CPU
model stays a CPU model and what is saved is the same whatever the device.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ftcnn import progress as progress_mod


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s tensors are (CPU for a model without any)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_device(model: nn.Module, device: str = "cpu") -> Iterator[nn.Module]:
    """Lend ``model`` to ``device`` (in place, as ``nn.Module.to`` does) for the ``with`` block,
    then move it back where it was. On its own device it is a no-op."""
    where = model_device(model)
    model.to(device)
    try:
        yield model
    finally:
        model.to(where)


@torch.inference_mode()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits of ``model`` on all ``inputs``, ``batch_size`` at a time: the one batched inference
    (campaign trials, activation trials, ``vulnerability.fi`` and :func:`evaluate` call it), so
    every path feeds the model the same batches and gets the same bits."""
    return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1000, device: str = "cpu") -> float:
    """Top-1 accuracy on ``dataset``, computed on ``device`` (the model is given back where it was)."""
    model.eval()
    correct = total = 0
    # moved outside inference mode: parameters moved inside it could not be trained later
    with on_device(model, device), torch.inference_mode():
        for x, y in DataLoader(dataset, batch_size=batch_size):  # streamed: a user's split may not fit
            x, y = x.to(device), y.to(device)
            correct += (predict(model, x, batch_size).argmax(dim=1) == y).sum().item()
            total += len(y)
    return correct / max(total, 1)


def fit(model: nn.Module, train: Dataset, *, epochs: int = 5, lr: float = 2e-3,
        batch_size: int = 64, seed: int = 0, weight_decay: float = 0.0,
        progress: bool = True, desc: str = "train", device: str = "cpu") -> list[float]:
    """Adam with cosine decay, on ``device``; returns the mean training loss per epoch.

    Seeded (initialisation of the data order), so a run is reproducible on
    one machine and device. The model is trained in place and given back where it was.
    """
    if epochs < 0:
        raise ValueError("epochs must be >= 0")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator)
    with on_device(model, device):
        return _fit(model, loader, epochs, lr, weight_decay, progress, desc, device)


def _fit(model: nn.Module, loader: DataLoader, epochs: int, lr: float, weight_decay: float,
         progress: bool, desc: str, device: str) -> list[float]:
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
                x, y = x.to(device), y.to(device)
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
