"""Every figure (``plots``) and the HTML report of any run folder (``report``).

Modules: ``report``, ``plots``. Each is imported when first asked for
(``ftcnn.reporting.report``), so importing this folder costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ['report', 'plots']


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
