"""Heavy third-party modules imported on first use, not at start-up.

Every ``ftcnn`` command imports the whole package (the CLI imports its flows at
module level, issue 11). scipy.stats (0.76 s) and matplotlib.pyplot (0.39 s)
were a third of each command's 3.5 s start-up, though most commands never draw
a plot or compute a p-value; the test suite starts ~150 such processes.
ftcnn's own modules are never imported this way (tests/test_imports.py).

>>> stats = lazy("scipy.stats")
>>> round(float(stats.norm.ppf(0.975)), 2)
1.96
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable


class LazyModule:
    """Stands for module ``name``; imports it (after ``setup()``) on the first attribute access."""

    def __init__(self, name: str, setup: Callable[[], None] | None = None) -> None:
        self._name, self._setup, self._module = name, setup, None

    def _load(self) -> ModuleType:
        if self._module is None:
            if self._setup is not None:
                self._setup()
            self._module = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{'' if self._module is None else ' (loaded)'}>"


def lazy(name: str, setup: Callable[[], None] | None = None) -> LazyModule:
    return LazyModule(name, setup)


def headless_matplotlib() -> None:
    """Plots are files: the Agg backend, chosen before pyplot is first imported."""
    import matplotlib

    matplotlib.use("Agg")
