"""The flows the commands run end to end: ``pipeline`` (train, analyze, harden, prune, inject, prune-and-protect), ``compare`` (every protection side by side) and ``study`` (the claims as tests).

Modules: ``pipeline``, ``compare``, ``study``. Each is imported when first asked for
(``ftcnn.flows.pipeline``), so importing this folder costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ['pipeline', 'compare', 'study']


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
