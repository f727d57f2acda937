"""ftcnn: cost-effective fault tolerance for CNNs.

The public API is a handful of plain functions; see the README for a tour.
"""

__version__ = "0.1.0"

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
