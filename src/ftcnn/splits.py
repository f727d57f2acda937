"""The two seeded rules that carve training data: calibration subsets and validation splits.

One rule each, so the same model gets the same restriction ranges from every
command (issue 11 measured three rules before: ``randperm(seed)[:N]`` in the
CLI, a numpy permutation of fixed size 1000 in the pruning pipeline, the
first N in ``compare``). The calibration rule is the CLI's, so ``ftcnn
harden`` keeps its numbers.

A validation split is what protections are tuned on (design §4: "tune on a
validation split carved from the training data; report on the test split
only"). It is stratified by class like ``data``'s train/test split, so a
small split still holds every class.

These live below every module that uses them (``protect``, ``pipeline``)
so no import cycle is needed; ``ftcnn.flows.pipeline`` re-exports them as the
orchestration home's rules.
"""

from __future__ import annotations

import numpy as np
import torch


def calibration_subset(x: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """The calibration inputs: ``size`` rows of ``x`` picked by a seeded permutation.

    Args:
        x: training inputs (N, ...).
        size: rows to keep (all of ``x`` when ``size >= N``).
        seed: seed of the permutation.

    Returns:
        ``x[torch.randperm(N, seed)[:size]]``.

    Example:
        >>> x = torch.arange(10.0).reshape(10, 1)
        >>> calibration_subset(x, 3, seed=0).shape
        torch.Size([3, 1])
    """
    if size < 1:
        raise ValueError(f"calibration size must be >= 1 (got {size})")
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size]
    return x[pick]


def validation_split(x: torch.Tensor, y: torch.Tensor, fraction: float = 0.2, seed: int = 0
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Split training data into (fit, validation), stratified by class and seeded.

    Per class, ``round(fraction * n)`` rows go to validation (at least one and
    at most ``n - 1`` when a class has two or more rows); both sides are then
    shuffled (seeded).

    Args:
        x: training inputs (N, ...).
        y: integer labels (N,).
        fraction: share of each class held out for validation, in (0, 1).
        seed: seed of the split.

    Returns:
        ``((x_fit, y_fit), (x_val, y_val))``, disjoint, together all of ``x``.

    Example:
        >>> x, y = torch.randn(20, 1, 4, 4), torch.arange(20) % 2
        >>> (xf, yf), (xv, yv) = validation_split(x, y, 0.2, seed=0)
        >>> len(xf), len(xv), int(yv.sum())
        (16, 4, 2)
    """
    if not (0.0 < fraction < 1.0):
        raise ValueError(f"validation fraction must lie in (0, 1) (got {fraction})")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    labels = y.cpu().numpy()
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    f = torch.from_numpy(rng.permutation(np.concatenate(fit)))
    v = torch.from_numpy(rng.permutation(np.concatenate(val)))
    if len(v) == 0 or len(f) == 0:
        raise ValueError(f"too little data ({len(x)} rows) for a validation split of {fraction}")
    return (x[f], y[f]), (x[v], y[v])
