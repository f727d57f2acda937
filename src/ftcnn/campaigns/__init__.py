"""Campaigns and their statistics: seeds per role, intervals and sequences (``metrics``), paired comparisons (``paired``), the trial runner (``trials``) over parameter or layer-output (``activations``) faults, stopping rules (``stopping``), strata, the run folder's store, executors and the thread policy, ``run_campaign`` and campaign files.

Modules: ``seeds``, ``metrics``, ``paired``, ``trials``, ``activations``, ``stopping``, ``strata``, ``store``, ``distributed``, ``parallelism``, ``campaign``, ``campaign_file``. Each is imported when first asked for
(``ftcnn.campaigns.seeds``), so importing this folder costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ['seeds', 'metrics', 'paired', 'trials', 'activations', 'stopping', 'strata', 'store', 'distributed', 'parallelism', 'campaign', 'campaign_file']


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
