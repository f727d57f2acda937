"""What protects a model and what it costs: vulnerability scores, hardening (duplication, restriction, weight checks, TMR), stored-word codes, BatchNorm folding, pruning, measured costs and the budgeted search (``protect``).

Modules: ``vulnerability``, ``hardening``, ``codes``, ``fold``, ``pruning``, ``cost``, ``protect``. Each is imported when first asked for
(``ftcnn.protection.vulnerability``), so importing this folder costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ['vulnerability', 'hardening', 'codes', 'fold', 'pruning', 'cost', 'protect']


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
