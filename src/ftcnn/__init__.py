"""ftcnn: cost-effective fault tolerance for CNNs.

The public API is a handful of plain functions; see the README for a tour.
"""

from ftcnn._version import __version__  # one place: ftcnn.store records it in summaries

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

__all__ = [
    "__version__", "build", "load", "save",
    "draw_faults", "fault_targets", "inject", "injected", "parameter_memory", "restore", "targeted",
]
