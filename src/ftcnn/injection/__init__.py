"""Where faults are drawn and injected: the model map (``graph``), the one fault-space interface (``fault_space``), parameter memory and its storage formats (``faults``) and the exact campaign shortcut (``fastpath``). Imports no other folder.

Modules: ``graph``, ``fault_space``, ``faults``, ``fastpath``. Each is imported when first asked for
(``ftcnn.injection.graph``), so importing this folder costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ['graph', 'fault_space', 'faults', 'fastpath']


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
