"""Bit faults in layer outputs (activations, "neuron faults"; design §8b).

Fault model. Parameter faults (``ftcnn.injection.faults``) model the weight memory;
these model the datapath: the values a layer computes, before the next
layer reads them.

- transient: every stored bit of every output value of the chosen layers
  flips independently with probability ``ber``, per value *per inference*
  (per input sample), then is gone. The number of flips in one layer's output
  over a block of inputs is drawn from Binomial(values * inputs * bits, ber)
  (never ``int(n * ber)``, which is zero for small layers), at distinct
  (input, value, bit) positions, like ``faults.draw_faults`` does for a
  tensor of weights.
- permanent: a fixed set of (layer, flat position within one sample's output,
  bit) sites, flipped or stuck at 0/1 for *every* input of the trial (a
  faulty MAC unit or output register), drawn per layer as
  Binomial(values * bits, ber) distinct sites, or given by hand.
- exact counts: ``count`` distinct transient sites over the whole trial (all its
  inputs), or, with ``per_input`` (``--per-input``, PyTorchFI's convention),
  ``count`` in every input image.

Where. By default every ``Conv2d`` and ``Linear`` output (a hardened layer's
copies are such modules too, so duplication is attacked honestly: each copy's
output gets its own faults); any named module can be chosen instead (a ReLU,
a residual block). A module returning a tuple of tensors (a protected layer's
same-shape copies) is one output whose values are its parts' values in order.
``ber`` may be one rate for all chosen layers or a {layer name: rate} mapping;
a layer at rate 0 is never touched.

How. Forward hooks that flip bits with XOR/AND/OR masks on an integer view of
a *copy* of the output (``faults.flip_bits``: the same code as parameter
faults), vectorised per layer and batch, never a Python loop per fault. A
batch without a fault in a layer returns the layer's own tensor untouched, so
``ber = 0`` is bit-exact and costs nothing but the hook call. The hooks live
inside a context manager and are removed whatever happens inside it.

Why drawn up front, in fixed blocks of inputs. A trial's faults are drawn
before it runs (as for parameters: stratification and per-layer reports need
them), from numpy generators seeded by (seed, trial, layer name, that layer's
rate, block of ``BLOCK`` inputs). So input ``i``'s faults in layer ``L``
depend only on those and on the layer's per-sample output shape and the bits
allowed: not on the batch size, not on the number of inputs evaluated (a
truncated last block is drawn over the full block and cut, which is exact for
independent bits), not on the rates of the other layers. Measured (LeNet-5,
the 359 digits test inputs, one thread): drawing a trial's plan takes 0.6 ms
(5 layers x 3 blocks) next to a 2.3 ms plain forward; a whole trial at BER
1e-5 takes 5 ms.

What it measures (same LeNet-5, clean accuracy 96.38%, 30 trials per point,
mean accuracy and 95% t-interval). Transient, every Conv2d/Linear output:
1e-6: 96.27% (96.20..96.34), 1e-5: 95.57% (95.39..95.75), 1e-4: 88.51%
(88.13..88.90), 1e-3: 41.49%; about a third of the critical SDCs at 1e-4
are DUEs (NaN/Inf logits, 2.5% of inputs). Permanent faults are rarer per
trial but hit every input: at 1e-5 a trial holds 0.3 faulty sites on average
and the mean accuracy is 93.8% with a wide interval (89.6..98.1): most
trials are clean, the few faulty ones lose many inputs at once.
Protections against transient activation faults (same model, 30 trials,
BER 1e-4 / 1e-3): range restriction (``harden(restrict="zero")``) keeps
96.26% / 95.05% where the plain model has 88.51% / 41.49%; full TMR (its
copies' outputs faulted too, 3x the values) 96.37% / 95.69%; both 96.38% /
96.36%.

Speed (issue 24). ``prepare`` builds the exact shortcut of the parameter
campaigns for these faults too (``fastpath.ActivationShortcut``, the same
torch.fx cuts and golden cache): a trial's forwards start at the cut before
its first hooked layer, and, transient faults staying in their input, an
input without a fault keeps its golden logits while a faulty one runs from
the cut before its own first faulted layer. Bit for bit the plain path's
numbers (tested on LeNet-5 and ResNet-20); untraceable models run the plain
path, with one warning. Measured (benchmarks/activation_speed.py, LeNet-5 on
1,000 mnist5k inputs, 1 thread, under load): 11x at BER 1e-7, 5x at 1e-6,
1.2x at 1e-5, none at 1e-4, where nearly every input has a fault in the
first layer.

``--precision`` (``draw_stratum``): the parameter campaigns' strata
(``ftcnn.campaigns.strata``) over this fault space, every hooked value (of every input,
for transient faults) an element and its exponent MSB the stratum bit; exact
weights need one rate in one format, so per-layer rates are refused. Valid
(coverage tested against a long plain run), but rarely faster than plain
trials for transient faults: a trial averages independent faults over all
inputs, so its accuracy barely varies (on the trained LeNet-5 above, +-1
point takes 2-8 plain trials where the design's pilot alone takes 45).

Storage formats: flips hit the dtype the layer computes in (float32, float16,
bfloat16). ``dtype="float16"``/``"bfloat16"`` on a float32 model emulates a
datapath in that format: every hooked output is rounded to it (faulty or
not), flipped there and decoded back, so the golden run is the model with
rounded outputs (``run_trial`` computes it that way).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields
from typing import Any, ContextManager, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ftcnn.campaigns import strata
from ftcnn.injection import fault_space, fastpath, graph
from ftcnn.injection import faults as F
from ftcnn.injection.fastpath import ActivationShortcut
from ftcnn.campaigns.metrics import METRIC_NAMES, Golden, golden_predictions, trial_metrics
from ftcnn.train import predict
# activations sits above trials: trials must never import it (campaign and distributed may)
from ftcnn.campaigns.trials import ACTIVATION_DTYPES, ACTIVATION_KINDS, ACTIVATION_MODES, Runner
from ftcnn.campaigns.trials import prepare as prepare_parameters

# the layers whose outputs are the default targets: graph.py's fault-target layers (the one model map)
ACTIVATION_LAYER_TYPES: tuple[type[nn.Module], ...] = graph.FAULT_LAYER_TYPES
# defined in trials (below this module: CampaignConfig checks them), named here for this module's users
MODES = ACTIVATION_MODES
KINDS = ACTIVATION_KINDS              # faults.flip_bits modes (stuck-at only for permanent faults)
DTYPES = ACTIVATION_DTYPES
BLOCK = 128                # inputs per generator: the unit a transient draw is a function of
_DOMAIN = {"transient": 0x41435431, "permanent": 0x41435450}  # keeps these draws apart from others

_TORCH_DTYPE = {name: fault_space.torch_dtype(name) for name in DTYPES}   # the one table's floats


# --- where ------------------------------------------------------------------------------------------

def activation_layers(model: nn.Module, layers: Sequence[str] | None = None) -> list[str]:
    """Names of the modules whose outputs are fault targets, in module order.

    Default: every Conv2d and Linear. ``layers`` names any modules instead (an
    unknown name is a one-line ValueError listing the default targets); the
    root module is named ``""``.
    """
    default = [layer.name for layer in graph.layers(model)]   # graph.py's layer walk
    if layers is None:
        if not default:
            raise ValueError("model has no Conv2d/Linear layer whose outputs faults could hit; name layers")
        return default
    modules = dict(model.named_modules())
    out: list[str] = []
    for name in layers:
        if not isinstance(name, str) or name not in modules:
            raise ValueError(f"unknown layer {name!r}; Conv2d/Linear layers are: {', '.join(default)}")
        if name not in out:
            out.append(name)
    order = {name: i for i, name in enumerate(modules)}
    return sorted(out, key=order.__getitem__)


@dataclass(frozen=True)
class LayerOutput:
    """One layer's output for one input: the per-sample shape of each part
    (one part for a tensor, several for a tuple of tensors) and its dtype."""

    parts: tuple[tuple[int, ...], ...]
    dtype: str

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(p) for p in self.parts)

    @property
    def numel(self) -> int:
        """Values per sample (all parts)."""
        return sum(self.sizes)


def _tensors(output: Any, name: str) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)) and output and all(isinstance(t, torch.Tensor) for t in output):
        return list(output)
    raise ValueError(f"layer {name!r} returns {type(output).__name__}, not a tensor or a tuple of "
                     "tensors: its output cannot take activation faults")


def _dtype_name(dtype: torch.dtype, name: str) -> str:
    for key, value in _TORCH_DTYPE.items():
        if value == dtype:
            return key
    raise ValueError(f"layer {name!r} outputs {dtype}; activation faults support {', '.join(DTYPES)}")


@torch.inference_mode()
def probe(model: nn.Module, inputs: torch.Tensor, layers: Sequence[str] | None = None
          ) -> dict[str, LayerOutput]:
    """Per fault-target layer (module order), the shape and dtype of its output
    for one input, from one forward of ``inputs[:1]``. Plans are drawn from
    this, so it is computed once per campaign, not per trial."""
    names = activation_layers(model, layers)
    outputs = graph.first_outputs(model, names, lambda: model(inputs[:1]))
    return {name: _layer_output(name, output) for name, output in outputs.items()}


def _layer_output(name: str, output: Any) -> LayerOutput:
    """Shape (per input) and dtype of one layer's output for one input, checked."""
    parts = _tensors(output, name)
    if len({t.dtype for t in parts}) != 1:
        raise ValueError(f"layer {name!r} returns tensors of several dtypes")
    for t in parts:
        if t.dim() == 0 or t.shape[0] != 1:
            raise ValueError(f"layer {name!r} output has no batch dimension first "
                             f"(shape {tuple(t.shape)} for one input)")
    return LayerOutput(tuple(tuple(t.shape[1:]) for t in parts), _dtype_name(parts[0].dtype, name))


def layer_bers(names: Sequence[str], ber: float | Mapping[str, float],
               overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """The rate of every layer of ``names``: ``ber`` for all (a float) or as
    mapped (a mapping: unmapped layers get 0), then ``overrides`` on top (what
    a campaign file's ``[ber_per_layer]`` does to a swept ``ber`` point).
    A name in a mapping that is not among ``names`` is a ValueError."""
    if isinstance(ber, Mapping):
        out = {n: 0.0 for n in names}
        extra = dict(ber)
    else:
        out = {n: ber for n in names}
        extra = {}
    extra.update(overrides or {})
    for name, rate in extra.items():
        if name not in out:
            raise ValueError(f"per-layer rate for {name!r}, which is not a fault-target layer "
                             f"({', '.join(names)})")
        out[name] = rate
    for name, rate in out.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"bit error rate {rate!r} of layer {name!r} outside [0, 1]")
        out[name] = float(rate)
    return out


# --- what -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerFaults:
    """The faults of one layer. ``sample`` is the input index (transient; sorted)
    or None (permanent: every input); ``index`` the flat position within one
    sample's output (parts in order); ``bit`` the bit number."""

    output: LayerOutput
    index: np.ndarray
    bit: np.ndarray
    sample: np.ndarray | None = None

    @property
    def count(self) -> int:
        return int(len(self.index))


@dataclass(frozen=True)
class ActivationPlan:
    """A trial's activation faults, drawn before it runs.

    ``n_inputs``: the inputs a transient plan covers (None: permanent, any).
    ``dtype``: the format faults hit (None: each layer's own output dtype).
    ``kind``: flip, stuck0 or stuck1 (stuck-at only for permanent plans).
    ``bers``: the rate per layer the plan was drawn at (reports).
    """

    mode: str
    layers: Mapping[str, LayerFaults]
    n_inputs: int | None = None
    dtype: str | None = None
    kind: str = "flip"
    bers: Mapping[str, float] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Drawn fault sites: transient, over all inputs; permanent, per input."""
        return sum(lf.count for lf in self.layers.values())

    def counts(self) -> dict[str, int]:
        return {name: lf.count for name, lf in self.layers.items()}

    def as_list(self) -> list[tuple[Any, ...]]:
        """(layer, sample, index, bit) per transient site; (layer, index, bit) per permanent one."""
        out: list[tuple[Any, ...]] = []
        for name, lf in self.layers.items():
            if lf.sample is None:
                out += [(name, int(i), int(b)) for i, b in zip(lf.index, lf.bit)]
            else:
                out += [(name, int(s), int(i), int(b)) for s, i, b in zip(lf.sample, lf.index, lf.bit)]
        return out

    def emulated(self, output_dtype: torch.dtype) -> bool:
        return self.dtype is not None and _TORCH_DTYPE[self.dtype] != output_dtype

    def faulty_inputs(self) -> dict[str, np.ndarray] | None:
        """Per hooked layer, the inputs it changes (sorted, with repeats); None when it changes
        every input (permanent faults, an emulated format). An input no layer changes keeps
        its golden logits: transient faults of one input never reach another."""
        if self.mode != "transient" or any(self.emulated(_TORCH_DTYPE[lf.output.dtype])
                                           for lf in self.layers.values()):
            return None
        return {name: self.layers[name].sample for name in self.hooked()}

    def hooked(self) -> list[str]:
        """The layers whose outputs this plan changes (faults, or rounding to an emulated
        format): the only ones it hooks, so every layer before them gives its golden value."""
        return [name for name, lf in self.layers.items()
                if lf.count or self.emulated(_TORCH_DTYPE[lf.output.dtype])]


def layer_rng(mode: str, seed: int, trial: int, layer: str, rate: float, block: int = 0
              ) -> np.random.Generator:
    """The generator of one (trial, layer, block of inputs): a pure function of its arguments
    (``fault_space.rng``: the layer by its name's hash, the rate by its bits)."""
    return fault_space.rng(_DOMAIN[mode], seed, trial, layer, float(rate), block)


def _check_common(mode: str, kind: str, dtype: str | None) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown activation fault mode {mode!r}; choose from {', '.join(MODES)}")
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; choose from {', '.join(KINDS)}")
    if mode == "transient" and kind != "flip":
        raise ValueError("transient activation faults are bit flips; stuck-at faults are permanent")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown activation dtype {dtype!r}; choose from {', '.join(DTYPES)}")


def draw_activation_faults(outputs: Mapping[str, LayerOutput], *, ber: float | Mapping[str, float] | None = None,
                           count: int | None = None, n_inputs: int | None = None, mode: str = "transient",
                           bits: Sequence[int] | None = None, seed: int = 0, trial: int = 0,
                           dtype: str | None = None, kind: str = "flip", per_input: bool = False) -> ActivationPlan:
    """Draw one trial's activation faults (see the module docstring for the model).

    ``outputs``: the fault-target layers and their output shapes (``probe``).
    ``ber``: one rate, or a {layer: rate} mapping (unmapped layers: 0).
    ``count``: instead of ``ber``, exactly that many distinct sites, uniform
    over the whole fault space of the trial (every layer of ``outputs``;
    transient: every input too), as ``faults.draw_faults`` does for counts.
    ``per_input`` (transient counts only): ``count`` distinct sites in *each* input's
    fault space instead (PyTorchFI's convention: faults per image), see :func:`_draw_count_per_input`.
    ``n_inputs``: inputs the trial evaluates (transient only).
    ``bits``: only these bit positions (default: all of the format).
    Transient: per layer and block of ``BLOCK`` inputs, Binomial(BLOCK * values *
    bits, rate) distinct (input, value, bit) sites; permanent: per layer,
    Binomial(values * bits, rate) distinct (value, bit) sites.
    """
    _check_common(mode, kind, dtype)
    if mode == "transient":
        if n_inputs is None or isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 0:
            raise ValueError("transient activation faults need n_inputs >= 0 (the inputs of the trial)")
    if (ber is None) == (count is None):
        raise ValueError("give exactly one of ber or count")
    if per_input and (count is None or mode != "transient"):
        raise ValueError("faults per input (--per-input) need an exact --count of transient activation faults")
    if count is not None:
        if per_input:
            return _draw_count_per_input(outputs, count, n_inputs, bits, seed, trial, dtype)
        return _draw_count(outputs, count, n_inputs, mode, bits, seed, trial, dtype, kind)
    rates = layer_bers(list(outputs), ber)
    layers: dict[str, LayerFaults] = {}
    for name, out in outputs.items():
        rate = rates[name]
        width = F.bit_width(_TORCH_DTYPE[dtype or out.dtype])
        allowed = F.bit_positions(width, bits)
        nb = len(allowed)
        per_input = out.numel * nb
        empty = np.zeros(0, dtype=np.int64)
        if mode == "permanent":
            pos = empty
            if rate > 0 and per_input:
                rng = layer_rng(mode, seed, trial, name, rate)
                k = int(rng.binomial(per_input, rate))
                pos = np.sort(rng.choice(per_input, size=k, replace=False)) if k else empty
            layers[name] = LayerFaults(out, pos // nb, allowed[pos % nb])
            continue
        chunks: list[np.ndarray] = []
        if rate > 0 and per_input:
            size = BLOCK * per_input
            for block in range(-(-n_inputs // BLOCK)):
                rng = layer_rng(mode, seed, trial, name, rate, block)
                k = int(rng.binomial(size, rate))
                if k:
                    pos = np.sort(rng.choice(size, size=k, replace=False)) + block * size
                    chunks.append(pos)
        pos = np.concatenate(chunks) if chunks else empty
        sample = pos // per_input
        keep = sample < n_inputs                      # a truncated last block, drawn whole
        pos, sample = pos[keep], sample[keep]
        rem = pos % per_input
        layers[name] = LayerFaults(out, rem // nb, allowed[rem % nb], sample)
    return ActivationPlan(mode, layers, n_inputs if mode == "transient" else None, dtype, kind, rates)


_PER_INPUT_TAG = 0x50455249  # in the seeds of per-input counts: never those of a whole-trial count
_COUNT_TAG = 0x434F554E      # in the seeds of whole-trial counts: never those of a rate's draw


def _draw_count_per_input(outputs: Mapping[str, LayerOutput], count: int, n_inputs: int,
                          bits: Sequence[int] | None, seed: int, trial: int, dtype: str | None) -> ActivationPlan:
    """``count`` distinct transient sites in each input's fault space (every bit of every hooked
    value of that input), uniform there: PyTorchFI users count faults per image, where ``_draw_count``
    spreads ``count`` over the whole evaluation (``--count 1``: one fault in 1,000 inputs). Drawn per
    block of ``BLOCK`` inputs (a truncated last block drawn whole and cut), so input ``i``'s faults
    do not depend on how many inputs the trial evaluates."""
    _check_count(count)
    names = list(outputs)
    widths = [F.bit_positions(F.bit_width(_TORCH_DTYPE[dtype or outputs[n].dtype]), bits) for n in names]
    sizes = np.array([outputs[n].numel * len(w) for n, w in zip(names, widths)], dtype=np.int64)
    per_sample = int(sizes.sum())
    if count > per_sample:
        raise ValueError(f"fault count {count} per input outside [0, {per_sample}]")
    chunks = []
    for block in range(-(-n_inputs // BLOCK)):
        rng = fault_space.rng(_DOMAIN["transient"], seed, trial, _PER_INPUT_TAG, int(count), block)
        if count == 1:  # the usual case (PyTorchFI's one fault per image): one draw per block
            chunks.append(rng.integers(0, per_sample, size=(BLOCK, 1)))
        else:
            chunks += [rng.choice(per_sample, size=(1, int(count)), replace=False) for _ in range(BLOCK)]
    pos = np.concatenate(chunks)[:n_inputs] if chunks and count else np.zeros((n_inputs, 0), np.int64)
    sample = np.repeat(np.arange(n_inputs, dtype=np.int64), pos.shape[1])
    pos = pos.reshape(-1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(starts, pos, side="right") - 1
    layers: dict[str, LayerFaults] = {}
    for t, (name, allowed) in enumerate(zip(names, widths)):
        mine = which == t
        local, rows = pos[mine] - starts[t], sample[mine]
        order = np.lexsort((local, rows))                     # by input, then site: what the hooks expect
        local, rows = local[order], rows[order]
        nb = len(allowed)
        layers[name] = LayerFaults(outputs[name], local // nb, allowed[local % nb], rows)
    return ActivationPlan("transient", layers, n_inputs, dtype, "flip")


def _check_count(count: Any) -> None:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"fault count {count!r} must be an integer >= 0")


def _draw_count(outputs: Mapping[str, LayerOutput], count: int, n_inputs: int | None, mode: str,
                bits: Sequence[int] | None, seed: int, trial: int, dtype: str | None, kind: str) -> ActivationPlan:
    _check_count(count)
    names = list(outputs)
    widths = [F.bit_positions(F.bit_width(_TORCH_DTYPE[dtype or outputs[n].dtype]), bits) for n in names]
    inputs = n_inputs if mode == "transient" else 1
    sizes = np.array([outputs[n].numel * len(w) * inputs for n, w in zip(names, widths)], dtype=np.int64)
    total = int(sizes.sum())
    if count > total:
        raise ValueError(f"fault count {count} outside [0, {total}]")
    rng = fault_space.rng(_DOMAIN[mode], seed, trial, _COUNT_TAG, int(count))
    pos = np.sort(rng.choice(total, size=int(count), replace=False)) if count else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(starts, pos, side="right") - 1
    layers: dict[str, LayerFaults] = {}
    for t, (name, allowed) in enumerate(zip(names, widths)):
        local = pos[which == t] - starts[t]
        nb, per_input = len(allowed), outputs[name].numel * len(allowed)
        rem = local % per_input
        sample = local // per_input if mode == "transient" else None
        layers[name] = LayerFaults(outputs[name], rem // nb, allowed[rem % nb], sample)
    return ActivationPlan(mode, layers, n_inputs if mode == "transient" else None, dtype, kind)


def targeted_activation_faults(outputs: Mapping[str, LayerOutput], sites: Sequence[tuple[Any, ...]], *,
                               mode: str = "permanent", kind: str = "flip", dtype: str | None = None,
                               n_inputs: int | None = None) -> ActivationPlan:
    """Faults at given sites: (layer, index, bit) for permanent plans,
    (layer, sample, index, bit) for transient ones (then ``n_inputs`` needed)."""
    _check_common(mode, kind, dtype)
    arity = 3 if mode == "permanent" else 4
    by_layer: dict[str, list[tuple[int, ...]]] = {}
    for site in sites:
        if len(site) != arity:
            raise ValueError(f"{mode} activation fault sites are {arity}-tuples, got {site!r}")
        if site[0] not in outputs:
            raise ValueError(f"unknown layer {site[0]!r}; fault-target layers are: {', '.join(outputs)}")
        by_layer.setdefault(site[0], []).append(tuple(int(v) for v in site[1:]))
    if mode == "transient" and (n_inputs is None or n_inputs < 0):
        raise ValueError("transient activation faults need n_inputs >= 0")
    layers: dict[str, LayerFaults] = {}
    for name, out in outputs.items():
        rows = np.asarray(sorted(set(by_layer.get(name, []))), dtype=np.int64).reshape(-1, arity - 1)
        width = F.bit_width(_TORCH_DTYPE[dtype or out.dtype])
        index, bit = rows[:, -2], rows[:, -1]
        if index.size and (index.min() < 0 or index.max() >= out.numel):
            raise ValueError(f"activation index out of range [0, {out.numel}) for layer {name!r}")
        if bit.size and (bit.min() < 0 or bit.max() >= width):
            raise ValueError(f"bit position out of range [0, {width}) for layer {name!r}")
        sample = None
        if mode == "transient":
            sample = rows[:, 0]
            if sample.size and (sample.min() < 0 or sample.max() >= n_inputs):
                raise ValueError(f"input index out of range [0, {n_inputs}) for layer {name!r}")
        layers[name] = LayerFaults(out, index.copy(), bit.copy(), sample)
    return ActivationPlan(mode, layers, n_inputs if mode == "transient" else None, dtype, kind)


# --- how --------------------------------------------------------------------------------------------

class ActivationInjector:
    """Live state of :func:`activation_faults`: where in the inputs the next
    forward starts (``offset``, advanced by each forward of the model by its
    batch size; set it by hand to run a slice), and the faults applied so far
    per layer (``applied``: bit faults written, for reports)."""

    def __init__(self, model: nn.Module, plan: ActivationPlan, offset: int = 0) -> None:
        self.model, self.plan, self.offset = model, plan, int(offset)
        self.applied: dict[str, int] = {name: 0 for name in plan.layers}
        self.rows: np.ndarray | None = None   # the inputs of the current forward, when not consecutive
        self._batch: int | None = None
        self._calls: dict[str, int] = {}

    def begin(self, offset: int, rows: np.ndarray | None = None) -> None:
        """Start a forward that the model's root hooks do not see (the shortcut runs a cut
        of the model's graph, not the model): of the inputs from ``offset`` on, or of the
        inputs ``rows`` only (sorted input indices, one per row of the forward)."""
        self.offset = int(offset)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._start(self.model, ())

    # root hooks: one forward = one batch of consecutive inputs
    def _start(self, module: nn.Module, args: Any) -> None:
        self._batch = None
        self._calls = {}

    def _end(self, module: nn.Module, args: Any, output: Any) -> None:
        n = self._batch
        if n is None and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            n = args[0].shape[0]
        self.offset += n or 0
        self._batch = None

    def _layer_hook(self, name: str):
        faults = self.plan.layers[name]

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            return self._apply(name, faults, output)
        return hook

    def _apply(self, name: str, lf: LayerFaults, output: Any) -> Any:
        parts = _tensors(output, name)
        batch = parts[0].shape[0] if parts[0].dim() else 0
        if tuple(tuple(t.shape[1:]) for t in parts) != lf.output.parts or any(t.shape[0] != batch for t in parts):
            raise ValueError(f"layer {name!r} output per input is {[tuple(t.shape[1:]) for t in parts]}, "
                             f"the plan was drawn for {list(lf.output.parts)}")
        if self._batch is None:
            self._batch = batch
        elif self._batch != batch:
            raise ValueError(f"layer {name!r} sees {batch} inputs where an earlier layer saw {self._batch}")
        self._calls[name] = self._calls.get(name, 0) + 1
        if self._calls[name] > 1 and self.plan.mode == "transient":
            raise ValueError(f"layer {name!r} runs more than once per forward: transient faults need "
                             "one call per inference; name the modules that call it instead")
        start = self.offset
        if lf.sample is None:                                       # permanent: every input
            rows = np.repeat(np.arange(batch, dtype=np.int64), lf.count)
            index, bit = np.tile(lf.index, batch), np.tile(lf.bit, batch)
        elif self.rows is not None:                                  # some inputs only (the shortcut)
            if len(self.rows) != batch:
                raise ValueError(f"layer {name!r} sees {batch} inputs where {len(self.rows)} run")
            lo, hi = np.searchsorted(lf.sample, [self.rows[0], self.rows[-1] + 1]) if batch else (0, 0)
            sample = lf.sample[lo:hi]
            at = np.minimum(np.searchsorted(self.rows, sample), max(batch - 1, 0))
            hit = self.rows[at] == sample                            # repeated rows: the first copy
            rows, index, bit = at[hit], lf.index[lo:hi][hit], lf.bit[lo:hi][hit]
        else:
            if self.plan.n_inputs is not None and start + batch > self.plan.n_inputs and lf.count:
                raise ValueError(f"inputs {start}..{start + batch - 1} run, but the plan covers "
                                 f"{self.plan.n_inputs} inputs")
            lo, hi = np.searchsorted(lf.sample, [start, start + batch])
            rows, index, bit = lf.sample[lo:hi] - start, lf.index[lo:hi], lf.bit[lo:hi]
        emulate = self.plan.emulated(parts[0].dtype)
        if not len(index) and not emulate:
            return None                                              # untouched: bit-exact, no copy
        self.applied[name] += int(len(index))
        out = []
        offset = 0
        for t, size in zip(parts, lf.output.sizes):
            sel = (index >= offset) & (index < offset + size)
            flat = rows[sel] * size + (index[sel] - offset)
            offset += size
            if not len(flat) and not emulate:
                out.append(t)
                continue
            work = t.to(_TORCH_DTYPE[self.plan.dtype]) if emulate else t
            work = work.clone(memory_format=torch.contiguous_format)
            if len(flat):
                F.flip_bits(work, flat, bit[sel], self.plan.kind)
            out.append(work.to(t.dtype) if emulate else work)
        return out[0] if isinstance(output, torch.Tensor) else type(output)(out)


@contextlib.contextmanager
def activation_faults(model: nn.Module, plan: ActivationPlan, *, offset: int = 0
                      ) -> Iterator[ActivationInjector]:
    """``plan``'s faults in the outputs of its layers for every forward of
    ``model`` inside the block; the hooks are removed on exit, whatever happens.

    Forwards must take the inputs in order (batch after batch, as
    ``predict`` does), starting at input ``offset``; each forward advances
    the injector's ``offset`` by its batch size (the batch size itself does
    not change the faults an input gets).
    """
    injector = ActivationInjector(model, plan, offset)
    handles = []
    try:
        handles.append(model.register_forward_pre_hook(injector._start))
        for name in plan.hooked():
            handles.append(model.get_submodule(name).register_forward_hook(injector._layer_hook(name)))
        handles.append(model.register_forward_hook(injector._end))   # after the layer hooks
        yield injector
    finally:
        for h in handles:
            h.remove()


# --- trials -----------------------------------------------------------------------------------------

def golden_logits(model: nn.Module, inputs: torch.Tensor, outputs: Mapping[str, LayerOutput], *,
                  dtype: str | None = None, batch_size: int = 1000) -> torch.Tensor:
    """Fault-free logits; with an emulated ``dtype``, of the model whose hooked outputs are rounded to it."""
    model.eval()
    if not _emulates(outputs, dtype):
        return predict(model, inputs, batch_size)
    empty = {name: LayerFaults(o, np.zeros(0, np.int64), np.zeros(0, np.int64)) for name, o in outputs.items()}
    with activation_faults(model, ActivationPlan("permanent", empty, None, dtype)):
        return predict(model, inputs, batch_size)


def _emulates(outputs: Mapping[str, LayerOutput], dtype: str | None) -> bool:
    """Whether ``dtype`` rounds some hooked output (a format the layer does not compute in)."""
    return dtype is not None and any(_TORCH_DTYPE[dtype] != _TORCH_DTYPE[o.dtype] for o in outputs.values())


@dataclass
class ActivationSettings:
    """What an activation campaign's faults depend on: the space's settings, declared once for
    :class:`ActivationSpace` and :class:`ActivationRunner` (which builds its space from them)."""

    model: nn.Module
    inputs: torch.Tensor
    outputs: Mapping[str, LayerOutput]
    mode: str = "transient"
    kind: str = "flip"
    bits: Sequence[int] | None = None
    dtype: str | None = None
    seed: int = 0
    batch_size: int = 1000
    overrides: Mapping[str, float] | None = None
    by: str = "ber"                       # campaign points are rates ("ber") or exact counts ("count")
    per_input: bool = False               # counts per input image (PyTorchFI), not per trial
    fast: ActivationShortcut | None = None    # start trials at their first hooked layer (exact)


@dataclass
class ActivationSpace(ActivationSettings):
    """Layer outputs as a ``fault_space.FaultSpace``: the activation faults of a campaign.

    The space holds every bit of every hooked value of every input (transient) or of one input
    (permanent); no parameter memory is attacked (``stored`` is empty, so every parameter and
    buffer is reported as unattacked memory). A trial at campaign point ``point`` uses rate
    ``point`` in every layer of ``outputs`` except those in ``overrides`` (a campaign file's
    ``[ber_per_layer]``); ``point`` may also be a {layer: rate} mapping, or (``by="count"``) an
    exact number of sites. ``faulty_logits`` hooks the layers (:func:`activation_faults`) and
    runs the trial from the cut before its first hooked layer when the shortcut (``fast``) has
    one; its extra field is ``faults_per_layer`` (bit faults written per layer).
    """


    def __post_init__(self) -> None:
        _check_common(self.mode, self.kind, self.dtype)
        if self.by not in ("ber", "count"):
            raise ValueError(f"campaign points are 'ber' or 'count', not {self.by!r}")
        layer_bers(list(self.outputs), 0.0, self.overrides)      # names and rates checked up front

    @property
    def stored(self) -> Mapping[str, torch.Tensor]:
        """No parameter memory: layer outputs are computed, not stored."""
        return {}

    @property
    def catastrophic(self) -> None:
        """Not measured: the strata count the format's exponent-MSB flips (``strata_layout``)."""
        return None

    def rates(self, point: float | Mapping[str, float]) -> dict[str, float]:
        return layer_bers(list(self.outputs), point, self.overrides)

    def draw(self, point: float | Mapping[str, float], trial: int, stratum: int | None = None) -> ActivationPlan:
        """Trial ``trial``'s plan at ``point``, or (``stratum`` set) trial ``trial`` of the stratum."""
        if stratum is not None:
            return self.draw_stratum(point, trial, stratum)
        if self.by == "count":
            return draw_activation_faults(self.outputs, count=int(point), n_inputs=len(self.inputs),
                                          mode=self.mode, bits=self.bits, seed=self.seed, trial=trial,
                                          dtype=self.dtype, kind=self.kind, per_input=self.per_input)
        return draw_activation_faults(self.outputs, ber=self.rates(point), n_inputs=len(self.inputs),
                                      mode=self.mode, bits=self.bits, seed=self.seed, trial=trial,
                                      dtype=self.dtype, kind=self.kind)

    def total_bits(self) -> int:
        """The fault space of one trial (Leveugle's population): every bit of every
        hooked value of every input (transient) or of one input (permanent)."""
        per_input = sum(o.numel * len(F.bit_positions(F.bit_width(_TORCH_DTYPE[self.dtype or o.dtype]), self.bits))
                        for o in self.outputs.values())
        return per_input * (len(self.inputs) if self.mode == "transient" else 1)

    def strata_layout(self, bits: Sequence[int] | None = None) -> strata.Layout:
        """The ``--precision`` strata's fault space: every hooked value (transient: of every
        input) is an element, its exponent MSB the stratum bit (``strata.strata_bit``), as for
        parameters. The strata weights are exact only where every site flips at one rate in
        one format, so per-layer rates and mixed formats have none (a ValueError says why).
        ``bits``: the campaign's (None: the space's own)."""
        if self.overrides:
            raise ValueError("--precision for activation faults needs one rate for every layer "
                             "(the strata weights come from one binomial); drop the per-layer rates")
        formats = {self.dtype or o.dtype for o in self.outputs.values()}
        if len(formats) != 1:
            raise ValueError(f"--precision for activation faults needs one format, the layers output "
                             f"{sorted(formats)}")
        fmt = formats.pop()
        allowed = F.bit_positions(F.bit_width(_TORCH_DTYPE[fmt]), self.bits if bits is None else bits)
        msb = strata.strata_bit(fmt)
        per = len(self.inputs) if self.mode == "transient" else 1
        return strata.Layout(tuple(self.outputs), tuple(o.numel * per for o in self.outputs.values()),
                             msb if msb in allowed else None, allowed[allowed != msb])

    def draw_stratum(self, point: float, index: int, stratum: int) -> ActivationPlan:
        """Trial ``index`` of ``stratum`` at rate ``point`` (``--precision``): the plain fault
        model conditioned on the stratum (``strata.draw_sites``), a pure function of
        (seed, point, stratum, index), drawn apart from every plain trial."""
        layout = self.strata_layout()
        sites = strata.draw_sites(layout, fault_space.trial_rng(self.seed, point, index, stratum), point, stratum)
        transient = self.mode == "transient"
        empty = np.zeros(0, dtype=np.int64)
        layers: dict[str, LayerFaults] = {}
        for name, out in self.outputs.items():
            element, bit = sites.get(name, (empty, empty))
            order = np.lexsort((bit, element))            # by input, value, bit: what the hooks expect
            element, bit = element[order], bit[order]
            layers[name] = LayerFaults(out, element % out.numel, bit, element // out.numel if transient else None)
        return ActivationPlan(self.mode, layers, len(self.inputs) if transient else None, self.dtype, self.kind,
                              self.rates(point))

    def injected(self, plan: ActivationPlan) -> ContextManager[ActivationInjector]:
        return activation_faults(self.model, plan)

    def faulty_logits(self, plan: ActivationPlan, block: int | None = None
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Logits with ``plan``'s faults, from the cut before its first hooked layer when the
        shortcut has one (the same bits), and ``faults_per_layer``: the bit faults written per
        layer. Every input: a transient plan is drawn per input (no blocks)."""
        if block is not None:
            raise ValueError("activation trials evaluate every input (no blocks of inputs)")
        with activation_faults(self.model, plan) as injector:
            logits = None if self.fast is None else self.fast.logits(plan.hooked(), plan.faulty_inputs(),
                                                                     injector.begin)
            if logits is None:
                logits = predict(self.model, self.inputs, self.batch_size)
        return logits, {"faults_per_layer": dict(injector.applied)}

    def fault_free(self, plan: ActivationPlan) -> dict[str, Any]:
        return {"faults_per_layer": dict.fromkeys(plan.layers, 0)}

    def golden_logits(self) -> torch.Tensor:
        """The fault-free logits (an emulated format's include its rounding)."""
        return golden_logits(self.model, self.inputs, self.outputs, dtype=self.dtype, batch_size=self.batch_size)


@dataclass
class ActivationRunner(ActivationSettings, Runner):
    """The runner of an activation campaign: a ``trials.Runner`` over the ``ActivationSpace``
    of these settings (see there), so the campaign loop, its store and its workers take it as
    they take a parameter runner; built from its fields (``dataclasses.replace(runner,
    seed=...)`` gives another seed's runner)."""

    golden: Golden = field(kw_only=True)
    skip_fault_free: bool = True          # exact: a plan with no fault is the golden result
    golden_output: torch.Tensor | None = None
    golden_metrics: dict[str, float] = field(init=False)
    batch: int = 1                            # trials per forward (activation trials run one at a time)

    def __post_init__(self) -> None:
        self.space = ActivationSpace(**{f.name: getattr(self, f.name) for f in fields(ActivationSettings)})
        self._golden_metrics(self.golden_output)

    @property
    def memory(self) -> ActivationSpace:
        """The space (what a parameter runner's ``memory`` is to ``trial_budget`` and the strata)."""
        return self.space

    def rates(self, point: float | Mapping[str, float]) -> dict[str, float]:
        return self.space.rates(point)

    def draw(self, point: float | Mapping[str, float], trial: int) -> ActivationPlan:
        return self.space.draw(point, trial)

    def draw_stratum(self, point: float, index: int, stratum: int) -> ActivationPlan:
        return self.space.draw_stratum(point, index, stratum)

    def total_bits(self) -> int:
        return self.space.total_bits()

    def faulty_logits(self, plan: ActivationPlan) -> tuple[torch.Tensor, dict[str, int]]:
        """Logits with ``plan``'s faults and the bit faults written per layer."""
        logits, extra = self.space.faulty_logits(plan)
        return logits, extra["faults_per_layer"]


def prepare(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
            layers: Sequence[str] | None = None, mode: str = "transient", kind: str = "flip",
            bits: Sequence[int] | None = None, dtype: str | None = None, seed: int = 0,
            batch_size: int = 1000, overrides: Mapping[str, float] | None = None,
            device: str | torch.device | None = None, skip_fault_free: bool = True,
            by: str = "ber", shortcut: bool = True,
            cache_bytes: int = fastpath.DEFAULT_CACHE_BYTES, per_input: bool = False) -> ActivationRunner:
    """Probe the layers, compute the golden run once, and return the trial runner
    (what ``trials.prepare`` does for parameter faults). ``shortcut``: start each
    trial at the cut before its first hooked layer, from golden activations cached
    within ``cache_bytes`` (``fastpath.ActivationShortcut``; the same bits)."""
    model.eval()
    if device is not None:
        model, inputs, labels = model.to(device), inputs.to(device), labels.to(device)
    outputs = probe(model, inputs, layers)
    logits = golden_logits(model, inputs, outputs, dtype=dtype, batch_size=batch_size)
    golden = Golden(labels, golden_predictions(logits))
    fast = None
    if shortcut and cache_bytes > 0:
        # the trace is checked against the model with no hook: with an emulated format, unrounded
        plain = predict(model, inputs, batch_size) if _emulates(outputs, dtype) else logits
        fast = fastpath.build_for_activations(model, list(outputs), inputs, batch_size, plain, cache_bytes)
    return ActivationRunner(model, inputs, outputs, mode, kind, bits, dtype, seed, batch_size, overrides, by,
                            per_input, fast, golden=golden, skip_fault_free=skip_fault_free, golden_output=logits)


def campaign_runner(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, config: Any
                    ) -> Runner:
    """The trial runner of a campaign: ``trials.prepare`` for parameter faults,
    :func:`prepare` for activation faults, chosen by ``config.target``.

    ``config`` is a ``CampaignConfig``; the activation settings are read as
    ``target`` ("parameters" when absent), ``activation_mode`` ("transient")
    and ``ber_per_layer`` (pairs or a mapping of layer -> rate), so the
    campaign code calls this where it called ``trials.prepare``.
    """
    target = getattr(config, "target", "parameters")
    if target == "parameters":
        return prepare_parameters(model, inputs, labels, config)
    if target != "activations":  # "both" is combined.campaign_runner's (combined sits above this module)
        raise ValueError(f"unknown fault target {target!r} here; choose from parameters, activations "
                         "(both: ftcnn.campaigns.combined.campaign_runner)")
    # the rest of the settings were checked by CampaignConfig (precision, include_bn, dtype)
    return prepare(model, inputs, labels, layers=config.layers,
                   mode=getattr(config, "activation_mode", "transient"), kind=config.mode, bits=config.bits,
                   dtype=None if config.dtype == "float32" else config.dtype, seed=config.seed,
                   batch_size=config.batch_size, overrides=dict(getattr(config, "ber_per_layer", None) or {}),
                   device=config.device, skip_fault_free=config.skip_fault_free, by=config.by,
                   shortcut=config.shortcut, cache_bytes=config.cache_bytes,
                   per_input=getattr(config, "per_input", False))


def run_trial(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, golden: Golden | None = None,
              *, ber: float | Mapping[str, float] | None = None, count: int | None = None,
              layers: Sequence[str] | None = None, mode: str = "transient",
              bits: Sequence[int] | None = None, seed: int = 0, trial: int = 0, batch_size: int = 1000,
              dtype: str | None = None, kind: str = "flip",
              outputs: Mapping[str, LayerOutput] | None = None) -> dict[str, Any]:
    """One activation-fault trial over all ``inputs``: draw (at ``ber``, or
    exactly ``count`` sites), inject, evaluate.

    Returns ``metrics.trial_metrics``' dict (accuracy, top5, sdc, critical_sdc,
    due: the keys of a parameter-fault trial) plus ``n_faults`` (sites drawn;
    per input for permanent plans) and ``faults_per_layer`` (bit faults
    written per layer). ``golden`` defaults to the fault-free model on
    ``inputs``/``labels``; ``outputs`` (``probe``) saves a forward when
    running many trials (a campaign uses :func:`prepare` and the runner). The
    faults a trial draws are a pure function of (seed, trial, ber, layers and
    their output shapes, number of inputs, mode, bits, dtype, kind), not of
    ``batch_size`` (the logits are too wherever the kernels give each input
    the same bits at any batch size, as on this CPU: tested).
    """
    model.eval()
    if outputs is None:
        outputs = probe(model, inputs, layers)
    elif layers is not None:
        outputs = {name: outputs[name] for name in activation_layers(model, layers)}
    if golden is None:
        golden = Golden(labels, golden_predictions(golden_logits(model, inputs, outputs, dtype=dtype,
                                                                 batch_size=batch_size)))
    elif not torch.equal(golden.labels.cpu(), labels.cpu()):
        raise ValueError("golden.labels differ from labels")
    plan = draw_activation_faults(outputs, ber=ber, count=count, n_inputs=len(inputs), mode=mode, bits=bits,
                                  seed=seed, trial=trial, dtype=dtype, kind=kind)
    with activation_faults(model, plan) as injector:
        faulty = predict(model, inputs, batch_size)
    result: dict[str, Any] = trial_metrics(faulty, golden)
    assert set(METRIC_NAMES) <= set(result)
    result["n_faults"] = plan.count
    result["faults_per_layer"] = dict(injector.applied)
    return result
