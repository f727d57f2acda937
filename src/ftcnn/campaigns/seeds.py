"""One seed per role of a campaign: selection, test and end-to-end faults never coincide (issue 22).

Why: a trial's faults are a pure function of (seed, fault rate, trial) (``fault_space.trial_rng``).
When the test campaigns of ``ftcnn protect`` ran with the seed its validation campaigns
chose on, every test trial had exactly a validation trial's fault set: only the inputs were
fresh, and at BERs where the spread between fault draws dominates, the winner's curse of
choosing among many candidates carried into the test numbers. Each role now draws from its
own stream.

How: ``role_seed(seed, role)`` is the user's seed for ``validation`` (the search's numbers
stay what they were), and for every other role the first 63 bits of the state of
``np.random.SeedSequence([seed, ROLE_TAG, role's number])``, a campaign seed like any other
(recorded with the role in the protect run's ``config["fault_seeds"]`` and its test rows).
The tag keeps these sequences apart from every trial's ``[seed, rate, trial]``, and a derived
seed differs from the user's except with probability 2^-63, so the roles' trials come from
different SeedSequences: their fault sets coincide only by chance (nil at any BER with faults
in most trials; ``tests/test_roles_and_intervals.py`` draws 200 trials per role and checks).
Campaigns that share a role share its seed, so trial ``i`` of two candidates (or of the
protected and the original model) still shares its random numbers: the pairing of
``ftcnn.campaigns.paired`` holds within a role.
"""

from __future__ import annotations

import numpy as np

ROLES = ("validation", "test", "end_to_end")
ROLE_TAG = 0x524F4C45  # "ROLE": in the seeds derived here, never in a trial's own seed sequence


def role_seed(seed: int, role: str) -> int:
    """The campaign seed of ``role`` (one of :data:`ROLES`) for the user's ``seed``."""
    if role not in ROLES:
        raise ValueError(f"unknown campaign role {role!r}; choose from {', '.join(ROLES)}")
    if role == "validation":
        return int(seed)
    state = np.random.SeedSequence([int(seed), ROLE_TAG, ROLES.index(role)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))  # 63 bits: a campaign seed is stored as a signed 64-bit integer


def role_seeds(seed: int) -> dict[str, int]:
    """Every role's campaign seed for ``seed`` (what a protect run records)."""
    return {role: role_seed(seed, role) for role in ROLES}
