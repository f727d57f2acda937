"""Settings' defaults, limits and vocabularies that the command line shows in its help.

They live here, in a module that imports nothing, because ``ftcnn --help`` builds every
option's help text at start-up and must not import torch for it (issue 24: 4.2 s for a help
page). The library modules that use them (``trials``, ``faults``, ``campaign_file``) import
them from here; ``tests/test_startup.py`` checks that they agree.
"""

from __future__ import annotations

# --precision's default inputs per trial: on LeNet-5/mnist5k a trial on 100 of 1,000 inputs costs
# 1/6-1/9 of one on all and needs 5-11% more trials (between-trial spread dominates;
# experiments/results/peers_precision_lenet5.txt)
PRECISION_INPUTS_PER_TRIAL = 100

THREADS_PER_CORE = 4  # --threads: at most this many per core (more only thrashes, or fails)

# the fault modes ftcnn ships (faults.FAULT_MODES holds what each does), in the order help lists them
FAULT_MODES = ("flip", "stuck0", "stuck1", "random-value")

# the deployment batch every cost is quoted at and every MACs budget applies at unless --batch says
# otherwise (issue 21: weight checks run once per forward, so their share depends on it)
DEFAULT_BATCH = 128
