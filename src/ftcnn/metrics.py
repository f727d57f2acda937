"""Per-trial metrics against the golden model, and campaign statistics (design §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import stats

METRIC_NAMES = ("accuracy", "top5", "sdc", "critical_sdc", "due")


@dataclass(frozen=True)
class Golden:
    """What every trial is compared with: labels and the fault-free predictions."""

    labels: torch.Tensor
    predictions: torch.Tensor

    @property
    def correct(self) -> torch.Tensor:
        return self.predictions == self.labels

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean())


def safe_predictions(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 class per row, -1 where the logits hold NaN/Inf, and the finite mask.

    argmax over NaN returns the NaN's index, so a raw argmax would score a
    detected-unrecoverable error as a lucky guess.
    """
    finite = torch.isfinite(logits).all(dim=1)
    pred = logits.argmax(dim=1)
    return torch.where(finite, pred, torch.full_like(pred, -1)), finite


def trial_metrics(logits: torch.Tensor, golden: Golden) -> dict[str, float]:
    """Accuracy, top-5, SDC, critical SDC and DUE of one faulty evaluation."""
    pred, finite = safe_predictions(logits)
    labels = golden.labels
    correct = pred == labels
    if logits.shape[1] >= 10:
        k = 5
        top = torch.nan_to_num(logits, nan=-math.inf).topk(k, dim=1).indices
        top5 = ((top == labels[:, None]).any(dim=1) & finite).float().mean().item()
    else:
        top5 = float("nan")
    changed = pred != golden.predictions
    return {
        "accuracy": correct.float().mean().item(),
        "top5": top5,
        "sdc": changed.float().mean().item(),
        "critical_sdc": (golden.correct & ~correct).float().mean().item(),
        "due": (~finite).float().mean().item(),
    }


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, tuple[float, float]]:
    """Mean, sample std and Student-t confidence interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), (float("nan"), float("nan"))
    mean = float(x.mean())
    if n == 1:
        return mean, 0.0, (mean, mean)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, (mean - half, mean + half)


def leveugle_sample_size(population: int, margin: float = 0.01, confidence: float = 0.95,
                         p: float = 0.5) -> int:
    """Fault-injection sample size of Leveugle et al. (DATE 2009).

    n = N / (1 + e^2 (N - 1) / (t^2 p (1 - p))), t the two-sided normal quantile.
    """
    if not 0 < margin < 1 or not 0 < confidence < 1:
        raise ValueError("margin and confidence must lie in (0, 1)")
    t = float(stats.norm.ppf(0.5 + confidence / 2))
    n = population / (1 + margin ** 2 * (population - 1) / (t ** 2 * p * (1 - p)))
    return max(1, math.ceil(n))
