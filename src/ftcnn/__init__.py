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

from ftcnn._version import __version__
from ftcnn.campaign import CampaignConfig, run_campaign  # noqa: E402
from ftcnn.checkpoint import build, load, save  # noqa: E402
from ftcnn.faults import (  # noqa: E402
    draw_faults,
    fault_targets,
    inject,
    injected,
    parameter_memory,
    restore,
    targeted,
)
from ftcnn.hardening import harden  # noqa: E402
from ftcnn.pruning import prune  # noqa: E402
from ftcnn.vulnerability import analyze  # noqa: E402

__all__ = [
    "__version__", "build", "load", "save",
    "analyze", "harden", "prune", "CampaignConfig", "run_campaign",
    "draw_faults", "fault_targets", "inject", "injected", "parameter_memory", "restore", "targeted",
]
