"""Modules imported on first use, not at start-up.

Every ``ftcnn`` command imports the whole package (the CLI imports its flows at
module level, issue 11). scipy.stats (0.76 s) and matplotlib.pyplot (0.39 s)
were a third of each command's 3.5 s start-up, though most commands never draw
a plot or compute a p-value; the test suite starts ~150 such processes. Such
third-party modules come through ``lazy``, a proxy.

ftcnn's own modules come through a proxy only in the command line (issue 24: ``ftcnn
--help`` imported torch, 4.2 s), which names them in an ``if TYPE_CHECKING:`` import as
well, so the checks in tests/ (test_imports.py, test_cli.py, test_startup.py) still read
which modules it uses. A proxy, not ``importlib.util.LazyLoader``: a lazy module in
``sys.modules`` runs whenever anything touches it, e.g. ``inspect.getmodule`` inside
torch's own import, half-way through another ftcnn module (measured: spawned workers
failed to import). ``import_together`` keeps a registry filled now that the package no
longer imports everything up front.

>>> stats = lazy("scipy.stats")
>>> round(float(stats.norm.ppf(0.975)), 2)
1.96
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any, Callable, Sequence


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


class _ThenImport(importlib.abc.Loader):
    """Runs a module with its own loader, then imports its companions."""

    def __init__(self, loader: importlib.abc.Loader, companions: tuple[str, ...]) -> None:
        self._loader, self._companions = loader, companions

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__.loader = module.__loader__ = self._loader  # source and tracebacks as usual
        self._loader.exec_module(module)
        for name in self._companions:
            importlib.import_module(name)


class _CompanionFinder(importlib.abc.MetaPathFinder):
    """Finds ``module`` with the finders after it and has it imported with ``_ThenImport``."""

    def __init__(self, module: str, companions: tuple[str, ...]) -> None:
        self._module, self._companions = module, companions

    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name != self._module:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenImport(spec.loader, self._companions)
                return spec
        return None


def import_together(module: str, *companions: str) -> None:
    """From now on, importing ``module`` also imports ``companions`` right after it (at once if
    it is imported already): for modules that fill ``module``'s registries when they run."""
    if module in sys.modules:
        for name in companions:
            importlib.import_module(name)
        return
    sys.meta_path.insert(0, _CompanionFinder(module, tuple(companions)))
