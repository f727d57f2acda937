"""Root pytest configuration: the package's docstring examples run as doctests
(``--doctest-modules`` on src/ftcnn, see pyproject.toml); ``python -m ftcnn``'s
entry module is not a module to import."""

import torch

collect_ignore = ["src/ftcnn/__main__.py"]
torch.set_num_threads(1)  # the examples are tiny: one thread, leave the other core to the rest
