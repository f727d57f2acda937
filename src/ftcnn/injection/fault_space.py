"""What a fault target is to a campaign: one interface, ``FaultSpace`` (issue 20).

Why: parameter and activation faults were two parallel stacks that shared an interface only by
duck typing (a shim standing in for the parameter memory, dummy fields), with a seed derivation
per path and a dtype table per module. A PyTorchFI user sees one object for both; here the one
trial runner (``trials.Runner``), the ``--precision`` strata (``strata.Layout.of``), the store's
memory report and the campaign's estimates ask a fault space only what this protocol names, so a
new fault target is one class (``tests/test_fault_space.py`` plugs a toy one into the runner).

The implementations: ``trials.ParameterSpace`` (the weight memory, ``faults.ParameterMemory``)
and ``activations.ActivationSpace`` (layer outputs, per inference).

Also here, what every space shares so that it exists once:
- ``rng``: the one seed derivation. A trial's random numbers are a pure function of a key of
  integers (seed, a float's bit pattern, a name's hash, the path's tag words), so the same seed
  gives the same faults whatever order or process runs the trials. Each path keeps the key layout
  it always had (the numbers stay byte-identical); ``trial_rng`` is the campaign trial's key
  (plain or stratified), the one both spaces' stratified draws use.
- ``FORMATS``: the one table of storage formats (torch dtype, the strata's bit, whether layer
  outputs can be computed in it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ContextManager, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

# --- the one dtype table -----------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """One storage format: its torch dtype, the bit whose flips define the ``--precision`` strata
    (the exponent MSB of floats, the MSB of int8), and whether layer outputs are computed in it
    (activation faults hit floats only)."""

    torch: torch.dtype
    stratum_bit: int
    activations: bool


FORMATS: dict[str, Format] = {
    "float32": Format(torch.float32, 30, True),
    "float16": Format(torch.float16, 14, True),
    "bfloat16": Format(torch.bfloat16, 14, True),
    "int8": Format(torch.int8, 7, False),
}
STORAGE_DTYPES = tuple(FORMATS)                                          # what parameters are stored in
ACTIVATION_DTYPES = tuple(name for name, f in FORMATS.items() if f.activations)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of the format called ``name``."""
    return FORMATS[name].torch


# --- the one seed derivation -------------------------------------------------------------------

STRATUM_TAG = 0x5354   # in each stratified trial's key: never the key of a plain trial


def key_word(value: int | float | str) -> int:
    """One word of a generator's key: an integer as it is (>= 0), a float as its IEEE-754 bit
    pattern (a rate or a campaign point: 1e-5 and 1.0000000000000001e-5 are different keys), a
    name as the first 8 bytes of its SHA-256 (little-endian)."""
    if isinstance(value, str):
        return int.from_bytes(hashlib.sha256(value.encode()).digest()[:8], "little")
    if isinstance(value, (float, np.floating)):
        return int(np.float64(value).view(np.uint64))
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"a generator key word is an int, a float or a str, not {type(value).__name__}")
    if value < 0:
        raise ValueError("seed, trial and block must be >= 0")
    return int(value)


def rng(*key: int | float | str) -> np.random.Generator:
    """The generator of ``key`` (see :func:`key_word`): every random draw of a campaign (fault
    sites, a trial's block of inputs, the strata's sensitivity pass) comes from one of these."""
    return np.random.default_rng(np.random.SeedSequence([key_word(w) for w in key]))


def trial_rng(seed: int, point: float, trial: int, stratum: int | None = None) -> np.random.Generator:
    """The generator of one campaign trial: ``[seed, point, trial]`` for a plain trial;
    ``[seed, point, STRATUM_TAG, stratum, trial]`` for trial ``trial`` of a ``--precision``
    stratum (the plain model conditioned on the stratum, apart from every plain trial)."""
    if stratum is None:
        return rng(seed, float(point), trial)
    return rng(seed, float(point), STRATUM_TAG, stratum, trial)


# --- the interface ---------------------------------------------------------------------------------


@runtime_checkable
class Drawn(Protocol):
    """One trial's faults as a space draws them: how many sites, and the sites (stored with the
    trial when few enough, ``trials.SITES_KEPT``)."""

    @property
    def count(self) -> int: ...

    def as_list(self) -> list[tuple[Any, ...]]: ...


@runtime_checkable
class FaultSpace(Protocol):
    """A fault target, as the trial runner, the strata, the store and the estimates use it.

    - ``model``: the model it attacks; ``stored``: the tensors of that model the faults are written
      into (none for activations), so the summary reports every other one as unattacked memory;
    - ``total_bits()``: the bits it holds per trial (Leveugle's population, ``fault_target_bits``);
    - ``strata_layout(bits)``: the ``strata.Layout`` its ``--precision`` count sampler splits (a
      ValueError saying why where it has none); ``catastrophic``: the measured catastrophic sites
      (``strata.Sensitivity``) or None;
    - ``draw(point, trial, stratum)``: a trial's faults, a pure function of the arguments and the
      space's settings (seed included);
    - ``injected(faults)``: the faults present inside the block, removed bit-exactly on exit;
    - ``faulty_logits(faults, block)``: inject, evaluate (all inputs, or batch ``block`` of them),
      restore: the logits and the trial's extra fields (e.g. faults written per layer);
      ``fault_free(faults)``: those fields for a trial that runs nothing;
    - ``golden_logits()``: the fault-free logits the golden predictions are taken from.
    """

    model: nn.Module

    @property
    def stored(self) -> Mapping[str, torch.Tensor]: ...

    @property
    def catastrophic(self) -> Any: ...

    def total_bits(self) -> int: ...

    def strata_layout(self, bits: Sequence[int] | None = None) -> Any: ...

    def draw(self, point: Any, trial: int, stratum: int | None = None) -> Drawn: ...

    def injected(self, faults: Any) -> ContextManager[Any]: ...

    def faulty_logits(self, faults: Any, block: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]: ...

    def fault_free(self, faults: Any) -> dict[str, Any]: ...

    def golden_logits(self) -> torch.Tensor: ...


@runtime_checkable
class BatchedSpace(FaultSpace, Protocol):
    """A space that evaluates several trials in one forward (parameter faults, ``fastpath``)."""

    def batched_logits(self, trials: Sequence[Any]) -> list[torch.Tensor]: ...
