"""Regenerate ``experiments/results/study.md`` and ``study.json`` (issue 22): ``ftcnn study`` with the
reported settings (three models, seeds 0 1 2; memory faults at BERs 1e-6 1e-5 1e-4 and activation faults
at 1e-7 1e-6 1e-5; 100 trials), resumable.

Extra arguments go to ``ftcnn study`` and override these (e.g. ``--data cifar10:PATH``, ``--models lenet5``).

Example:
    python experiments/study.py                      # the reported run (see README: "Reproduce the study")
"""

from __future__ import annotations

import sys

from ftcnn import cli

if __name__ == "__main__":
    # the defaults of `ftcnn study` are the reported settings; only where it writes differs
    sys.argv = ["ftcnn", "study", "-o", "runs/study", "--results", "experiments/results", *sys.argv[1:]]
    cli.main()
