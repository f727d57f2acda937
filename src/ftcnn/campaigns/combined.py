"""Memory and datapath faults in one trial (``CampaignConfig(target="both")``; issue 22, item 8).

Why: a deployed accelerator suffers both at once. A protection chosen or compared under one fault
model alone can look best where the other dominates (output TMR masks compute faults and is blind to
nothing in memory but pays 3x; a weight check or a code sees no datapath fault), so the protection
tables need a row where both are present, and ``ftcnn protect --target both`` a search that ranks
candidates under it.

The fault model: each trial draws its parameter faults at the campaign point (the memory BER, every
stored bit once per trial, as ``target="parameters"``) and its activation faults at
``activation_ber`` (transient flips in every Conv2d/Linear output, per value per inference, as
``target="activations"``). The two draws come from the keys their own campaigns use: trial ``i``
of a combined campaign holds exactly the parameter faults of trial ``i`` of the parameter campaign
at that BER and the activation faults of trial ``i`` of the activation campaign at
``activation_ber`` with the same seed, so the three rows are paired by trial (tested).

How: the parameter faults are written into the memory (``trials.ParameterSpace.injected``: undone
bit for bit), then every input runs with the activation hooks (``activations.ActivationSpace``).
Neither exact shortcut applies: the parameter shortcut's golden activations and the activation
shortcut's both assume the rest of the model fault-free, so a combined trial runs the whole model.
Every input is evaluated (activation faults are drawn per input: no blocks).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ftcnn.campaigns import activations
from ftcnn.campaigns.metrics import Golden, golden_predictions
from ftcnn.campaigns.trials import ParameterSpace, Runner, TrialRunner
from ftcnn.campaigns.trials import prepare as prepare_parameters
from ftcnn.injection import faults as F


@dataclass(frozen=True)
class CombinedFaults:
    """One trial's faults: its parameter faults and its activation plan (``fault_space.Drawn``)."""

    parameters: F.Faults
    activations: activations.ActivationPlan

    @property
    def count(self) -> int:
        return self.parameters.count + self.activations.count

    def as_list(self) -> list[tuple[Any, ...]]:
        """Parameter sites (layer, index, bit), then activation sites (layer, input, index, bit)."""
        return self.parameters.as_list() + self.activations.as_list()


@dataclass
class CombinedSpace:
    """The weight memory and the layer outputs as one ``fault_space.FaultSpace`` (see the module)."""

    parameters: ParameterSpace
    activations: activations.ActivationSpace
    activation_ber: float

    def __post_init__(self) -> None:
        if self.activations.model is not self.parameters.model:
            raise ValueError("a combined fault space hooks the model its parameter faults are written into")
        if self.activations.fast is not None:
            raise ValueError("the activation shortcut assumes fault-free parameters: off in a combined space")

    @property
    def model(self) -> nn.Module:
        return self.parameters.model

    @property
    def stored(self) -> Mapping[str, torch.Tensor]:
        return self.parameters.stored

    @property
    def catastrophic(self) -> None:
        return None

    def total_bits(self) -> int:
        """Memory bits plus the output bits of every input (what both draws range over)."""
        return self.parameters.total_bits() + self.activations.total_bits()

    def strata_layout(self, bits: Sequence[int] | None = None) -> Any:
        raise ValueError("--precision stratifies one fault target; give --trials for target both")

    def draw(self, point: float, trial: int, stratum: int | None = None) -> CombinedFaults:
        if stratum is not None:
            raise ValueError("--precision stratifies one fault target; give --trials for target both")
        return CombinedFaults(self.parameters.draw(point, trial), self.activations.draw(self.activation_ber, trial))

    @contextlib.contextmanager
    def injected(self, faults: CombinedFaults) -> Iterator[None]:
        with self.parameters.injected(faults.parameters), self.activations.injected(faults.activations):
            yield

    def faulty_logits(self, faults: CombinedFaults, block: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Every input's logits with both kinds of faults present; ``faults_per_layer`` as an
        activation trial records it (the activation bit faults written per layer)."""
        if block is not None:
            raise ValueError("combined trials evaluate every input (no blocks of inputs)")
        with self.parameters.injected(faults.parameters):
            return self.activations.faulty_logits(faults.activations)

    def fault_free(self, faults: CombinedFaults) -> dict[str, Any]:
        return self.activations.fault_free(faults.activations)

    def golden_logits(self) -> torch.Tensor:
        return self.activations.golden_logits()


class CombinedRunner(Runner):
    """The runner of a combined campaign: ``trials.Runner`` over a :class:`CombinedSpace`."""

    def __init__(self, space: CombinedSpace, golden: Golden, parameter_runner: TrialRunner, *,
                 skip_fault_free: bool = True, golden_output: torch.Tensor | None = None) -> None:
        super().__init__(space, golden, skip_fault_free=skip_fault_free, golden_output=golden_output)
        self.parameter_runner = parameter_runner

    @property
    def memory(self) -> F.ParameterMemory:
        """The parameter memory (what ``trial_budget`` and the store's memory report read)."""
        return self.parameter_runner.memory

    def total_bits(self) -> int:
        return self.space.total_bits()


def prepare(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, config: Any) -> CombinedRunner:
    """The runner of ``config`` (target "both"): the parameter memory as ``trials.prepare`` builds it
    (storage format, BatchNorm, protection values, spared targets; no shortcut), the activation
    layers probed on that same model, one golden run."""
    if config.activation_ber is None:
        raise ValueError("target both needs an activation BER (--activation-ber)")
    params = prepare_parameters(model, inputs, labels, replace(config, target="parameters", shortcut=False,
                                                               batch_trials=1, activation_ber=None))
    net = params.space.model
    outputs = activations.probe(net, params.inputs, config.layers)
    space = activations.ActivationSpace(net, params.inputs, outputs, "transient", config.mode, config.bits,
                                        None if config.dtype == "float32" else config.dtype, config.seed,
                                        config.batch_size, None, "ber", False, None)
    logits = space.golden_logits()
    golden = Golden(params.golden.labels, golden_predictions(logits))
    return CombinedRunner(CombinedSpace(params.space, space, float(config.activation_ber)), golden, params,
                          skip_fault_free=config.skip_fault_free, golden_output=logits)


def campaign_runner(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, config: Any) -> Runner:
    """The trial runner of any campaign, by ``config.target``: :func:`prepare` for both, else
    ``activations.campaign_runner`` (parameters or activations). What campaign and its executors call."""
    if getattr(config, "target", "parameters") == "both":
        return prepare(model, inputs, labels, config)
    return activations.campaign_runner(model, inputs, labels, config)


def as_activation_config(config: Any) -> Any:
    """The activation campaign whose trials a combined campaign's activation faults equal."""
    return replace(config, target="activations", bers=(config.activation_ber,), activation_ber=None,
                   include_bn=False)
