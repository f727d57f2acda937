"""ftcnn: cost-effective fault tolerance for CNNs.

The public API is a handful of plain verbs, in the order of the data flow:

>>> import torch, ftcnn
>>> model = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8)
>>> x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
>>> scores = ftcnn.analyze(model, x, y, method="gain", samples=16)      # which channels hurt most
>>> hardened = ftcnn.harden(model, scores, ratio=0.1, correction="min")  # duplicate the top 10%
>>> pruned = ftcnn.prune(model, scores, ratio=0.25, input_shape=(1, 8, 8))
>>> config = ftcnn.CampaignConfig(bers=(1e-4,), trials=2, seed=0)
>>> import tempfile; run = tempfile.mkdtemp()
>>> summary = ftcnn.run_campaign(hardened, x, y, config, run, progress=False)
>>> 0.0 <= summary["results"][0]["accuracy_mean"] <= 1.0
True

``ftcnn.inject(model, faults)`` flips the bits of one drawn fault set in place
(``ftcnn.draw_faults``) and returns what ``ftcnn.restore`` undoes; campaigns do
that per trial. Modules are named for their idea (``hardening``, ``pruning``,
``vulnerability``, ``campaign``, ``graph``...) so no verb shadows a module.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from ftcnn._version import __version__
from ftcnn.lazy import import_together

# checkpoint.load replays the transforms that hardening and pruning register when they run;
# the package used to import all three up front (and torch with them, seconds). Now whoever
# imports checkpoint gets them too, and `ftcnn --help` none of them (issue 24).
import_together("ftcnn.checkpoint", "ftcnn.protection.hardening", "ftcnn.protection.pruning")

# the public verbs and the module each comes from: imported on first use, so `import ftcnn`
# (and `ftcnn --help`, which imports ftcnn.cli) costs no torch import (issue 24)
_API = {
    "build": "checkpoint", "load": "checkpoint", "save": "checkpoint",
    "analyze": "protection.vulnerability", "harden": "protection.hardening", "prune": "protection.pruning",
    "CampaignConfig": "campaigns.campaign", "run_campaign": "campaigns.campaign",
    "draw_faults": "injection.faults", "fault_targets": "injection.faults", "inject": "injection.faults",
    "injected": "injection.faults", "parameter_memory": "injection.faults", "restore": "injection.faults",
    "targeted": "injection.faults",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """A public verb, or a submodule (``ftcnn.injection.faults``), imported when first asked for."""
    if name in _API:
        value = getattr(importlib.import_module(f"ftcnn.{_API[name]}"), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"ftcnn.{name}") is not None:
        return importlib.import_module(f"ftcnn.{name}")
    raise AttributeError(f"module 'ftcnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
