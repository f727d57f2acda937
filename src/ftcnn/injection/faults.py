"""Bit-level faults in a CNN's parameter memory.

The fault model (design §1): every stored bit of every Conv2d/Linear weight and
bias flips independently with probability ``ber``; a fault lasts one whole
evaluation, then the memory is restored exactly. Flips are XOR masks applied
to an integer view of the stored tensor, vectorised per tensor.

Storage formats other than float32 are emulated faithfully: the parameters are
first rounded to what the format can hold (float16, bfloat16, or int8 with a
symmetric per-tensor or per-channel scale), the stored copy is what faults hit,
and each faulted element is decoded back into the float32 parameter the model
computes with. Compute therefore stays float32 on any hardware, while the
faults are exactly those of the stored format.

What a fault does to an element is its *mode*, one entry of ``FAULT_MODES``:
a function ``(old values, bit masks, drawn numbers) -> new values`` (PyTorchFI
users know the shape: a custom error model is one plain function), and, for a
mode that needs random numbers, how it draws them with the faults, from the
trial's seeded generator. ``flip``, ``stuck0`` and ``stuck1`` act on the bits
of each site; ``random-value`` replaces the element with a uniform number in
``RANDOM_VALUE_RANGE``. Adding a mode is one entry there: campaigns, the
CLI's ``--mode``, the shortcut and the stratified design all take it from it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

# What memory faults hit (fault targets, de-duplicated by storage) is the model map's to say;
# these names stay here too, as the public API (``ftcnn.fault_targets``) has always had them.
from ftcnn.injection.graph import (BN_LAYER_TYPES, FAULT_LAYER_TYPES, PROTECTION_ATTR,  # noqa: F401
                         fault_targets, protection_buffers, storage_key, tied_names)
from ftcnn.injection.fault_space import STORAGE_DTYPES, torch_dtype

_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.int8: torch.int8,
    torch.float64: torch.int64,
    torch.int32: torch.int32,  # raw stored words of codes (``ftcnn.protection.codes``): check bits, bitwise copies
}


def bit_width(dtype: torch.dtype) -> int:
    """Bits per stored element of ``dtype``."""
    if dtype not in _INT_VIEW:
        raise ValueError(f"unsupported dtype for bit faults: {dtype}")
    return torch.empty(0, dtype=dtype).element_size() * 8


def bit_masks(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Integer masks with one bit set, typed as the signed view of ``dtype``.

    Built through unsigned numpy integers so that the sign bit (e.g. bit 31)
    becomes the right negative signed value instead of overflowing.
    """
    width = bit_width(dtype)
    unsigned = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}[width]
    signed = {8: np.int8, 16: np.int16, 32: np.int32, 64: np.int64}[width]
    masks = (np.ones(len(bits), dtype=unsigned) << np.asarray(bits, dtype=unsigned)).view(signed)
    return torch.from_numpy(masks.copy())


# --- fault modes ---------------------------------------------------------------

def _words(values: torch.Tensor) -> torch.Tensor:
    """The same bits as signed integers (a view, no copy)."""
    return values.view(_INT_VIEW[values.dtype])


def _flip(values: torch.Tensor, masks: torch.Tensor, drawn: torch.Tensor | None) -> torch.Tensor:
    return (_words(values) ^ masks).view(values.dtype)


def _stuck0(values: torch.Tensor, masks: torch.Tensor, drawn: torch.Tensor | None) -> torch.Tensor:
    return (_words(values) & ~masks).view(values.dtype)


def _stuck1(values: torch.Tensor, masks: torch.Tensor, drawn: torch.Tensor | None) -> torch.Tensor:
    return (_words(values) | masks).view(values.dtype)


RANDOM_VALUE_RANGE = (-1.0, 1.0)
"""Where ``random-value`` draws from (uniform, lower bound included), as PyTorchFI's
``random_value`` does by default."""


def _draw_uniform(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(*RANDOM_VALUE_RANGE, size=n)


def _random_value(values: torch.Tensor, masks: torch.Tensor, drawn: torch.Tensor | None) -> torch.Tensor:
    """The element replaced by its drawn number: in a float format the number rounded to
    the format; in int8 the code ``round(127 * v)``, i.e. ``v`` times the largest
    magnitude of the element's tensor (or channel), so the range is the format's."""
    assert drawn is not None, "random-value faults carry their drawn numbers"
    if values.dtype == torch.int8:
        return torch.round(drawn * 127).to(torch.int8).to(values.device)
    return drawn.to(values.dtype).to(values.device)


@dataclass(frozen=True)
class FaultMode:
    """One fault mode.

    ``apply(values, masks, drawn) -> new values``: ``values`` are the faulted
    elements of one tensor in its storage dtype (one per element, however many of
    its bits are hit), ``masks`` their hit bits combined into one signed-integer
    mask each, ``drawn`` (a CPU float64 tensor) the numbers ``draw`` drew for them,
    else None. It returns the elements' new values, same dtype; the caller writes
    them and keeps the old bits for an exact restore. ``draw(rng, n)``: ``n``
    numbers, one per fault site, drawn with the faults from the trial's generator
    (after the sites, so the sites of a seed are those of every mode).
    """

    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    draw: Callable[[np.random.Generator, int], np.ndarray] | None = None
    description: str = ""


FAULT_MODES: dict[str, FaultMode] = {
    "flip": FaultMode(_flip, description="the bit inverted"),
    "stuck0": FaultMode(_stuck0, description="the bit set to 0 (unchanged if it is 0)"),
    "stuck1": FaultMode(_stuck1, description="the bit set to 1 (unchanged if it is 1)"),
    "random-value": FaultMode(_random_value, _draw_uniform,
                              "the whole element replaced by a uniform random number in [-1, 1) "
                              "(PyTorchFI's random_value; the site's bit only sets the rate)"),
}
MODES = tuple(FAULT_MODES)  # the modes ftcnn ships, in the order help texts list them


def fault_mode(mode: str) -> FaultMode:
    """The registered mode called ``mode``, or a one-line error naming the choices."""
    try:
        return FAULT_MODES[mode]
    except (KeyError, TypeError):
        raise ValueError(f"unknown fault mode {mode!r}; choose from {', '.join(FAULT_MODES)}") from None


def flip_bits(tensor: torch.Tensor, index: np.ndarray | Sequence[int], bits: np.ndarray | Sequence[int],
              mode: str = "flip", values: np.ndarray | Sequence[float] | None = None) -> torch.Tensor:
    """Apply faults in place to ``tensor`` at flat ``index``/``bits`` pairs, as ``mode`` says.

    Several bits of one element are combined into one mask first, because an
    indexed XOR with repeated indices would apply only one of them. ``values``:
    for a mode that draws numbers (``random-value``), one per site; an element
    faulted at several sites takes its first site's. Returns the previous integer
    values of the touched elements (for an exact restore).
    """
    how = fault_mode(mode)
    index = np.asarray(index, dtype=np.int64)
    bits = np.asarray(bits, dtype=np.int64)
    if not tensor.is_contiguous():
        raise ValueError("bit faults need a contiguous tensor")
    width = bit_width(tensor.dtype)
    if bits.size and (bits.min() < 0 or bits.max() >= width):
        raise ValueError(f"bit position out of range [0, {width}) for {tensor.dtype}")
    if index.size and (index.min() < 0 or index.max() >= tensor.numel()):
        raise ValueError(f"element index out of range [0, {tensor.numel()})")
    drawn = _site_values(how, mode, values, index.shape)
    view = tensor.view(-1).view(_INT_VIEW[tensor.dtype])
    elements, inverse = np.unique(index, return_inverse=True)
    masks = bit_masks(bits, tensor.dtype).numpy()
    combined = np.zeros(len(elements), dtype=masks.dtype)
    np.bitwise_or.at(combined, inverse, masks)
    where = torch.from_numpy(elements).to(tensor.device)
    mask = torch.from_numpy(combined).to(tensor.device)
    before = view[where].clone()
    if drawn is not None:
        drawn = torch.from_numpy(drawn[np.unique(index, return_index=True)[1]])  # each element's first site
    view[where] = _words(how.apply(before.view(tensor.dtype), mask, drawn))
    return before


def _site_values(how: FaultMode, mode: str, values: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """``values`` checked against ``mode``: one float per site where the mode draws, else none."""
    if how.draw is None:
        if values is not None:
            raise ValueError(f"fault mode {mode!r} takes no drawn values")
        return None
    if values is None:
        raise ValueError(f"fault mode {mode!r} needs one drawn value per site (draw_faults draws them)")
    values = np.asarray(values, dtype=np.float64)
    if values.shape != shape:
        raise ValueError(f"fault mode {mode!r}: {values.size} drawn values for {int(np.prod(shape))} sites")
    return values


@dataclass
class ParameterMemory:
    """The fault-target tensors of a model, in their storage format.

    ``params`` are the float parameters the model computes with; ``stored`` is
    the memory faults hit (the parameter itself for float32). ``scales`` holds
    the int8 dequantisation scale per tensor (broadcastable to the tensor).
    ``aliases`` maps the other names of a tied tensor (a weight shared by two
    modules is one piece of memory, listed once under its first name) to that
    name, so faults may name either.
    """

    dtype: str
    params: dict[str, torch.Tensor]
    stored: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    # the (target group, bit) pairs catastrophic for this model (``strata.Sensitivity``), measured
    # for ``--precision`` campaigns; they define its catastrophic stratum (``strata.Layout.of``)
    catastrophic: Any = None
    # targets the draws cover but whose faults are dropped (:func:`spare`): the ablation that leaves
    # protection values unattacked keeps every other fault of the same draw (paired arms)
    spared: frozenset[str] = frozenset()

    @property
    def bits_per_element(self) -> int:
        return bit_width(torch_dtype(self.dtype))

    def canonical(self, name: str) -> str:
        """The name ``stored`` holds ``name``'s memory under; a ValueError if it is no fault target."""
        if name in self.stored:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise ValueError(f"unknown fault target {name!r}")

    def numel(self, name: str) -> int:
        return self.stored[name].numel()

    def total_bits(self) -> int:
        return sum(t.numel() for t in self.stored.values()) * self.bits_per_element

    def decode(self, name: str, where: torch.Tensor) -> None:
        """Write the stored values at flat ``where`` into the float parameter."""
        if self.dtype == "float32":
            return
        stored = self.stored[name].view(-1)[where]
        flat = self.params[name].view(-1)
        if self.dtype == "int8":
            scale = self.scales[name].expand_as(self.params[name]).reshape(-1)[where]
            flat[where] = stored.to(flat.dtype) * scale
        else:
            flat[where] = stored.to(flat.dtype)



def memory_coverage(model: nn.Module, targets: Iterable[str]) -> dict[str, Any]:
    """What faults hit of ``model``'s memory and, truthfully, everything they leave alone.

    ``targets`` are the attacked tensor names (a ``ParameterMemory``'s; none for activation
    faults). Returns ``protection_values``: attacked elements of the float values protection
    modules declare (``fault_buffers``); ``unattacked_memory``: name -> elements of every
    parameter and buffer no fault hits, each piece of memory once under its first name in
    module order (layers that are no fault target such as ``Conv1d``, raw ``nn.Parameter``s,
    BatchNorm parameters and running statistics with ``include_bn=False``, BatchNorm's int64
    ``num_batches_tracked`` counter (eval never reads it), layers left out by
    ``layers``, int64 protection indices, bounds left unattacked); ``unattacked_bits``: their
    size in bits. Why all of it: a summary that says ``{}`` while 80 values are never attacked
    overstates what the campaign measured.
    """
    tensors = dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)])
    attacked = {storage_key(tensors[name]) for name in targets if name in tensors}
    values, unattacked, bits = 0, {}, 0
    seen: set[tuple[Any, ...]] = set()
    for name, module in model.named_modules():
        protection = hasattr(module, PROTECTION_ATTR)
        buffers = dict(module.named_buffers(recurse=False))
        for tname, tensor in [*module.named_parameters(recurse=False), *buffers.items()]:
            key = storage_key(tensor)
            if tensor.numel() == 0 or key in seen:
                continue
            seen.add(key)
            if key not in attacked:
                unattacked[f"{name}.{tname}" if name else tname] = tensor.numel()
                bits += tensor.numel() * tensor.element_size() * 8
            elif protection and tname in buffers:
                values += tensor.numel()
    return {"protection_values": values, "unattacked_memory": unattacked, "unattacked_bits": bits}


def unattacked_warning(model: nn.Module, unattacked: Mapping[str, int]) -> str | None:
    """One line when float parameters of ``model`` are among ``unattacked`` (``memory_coverage``'s
    ``unattacked_memory``): learned values no fault hits, so the campaign measured less than the
    whole model. None when every float parameter is attacked (buffers such as BatchNorm
    statistics or int64 indices are recorded in the summary, not warned about)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    outside = {name: n for name, n in unattacked.items()
               if isinstance(n, int) and name in params and params[name].is_floating_point()}
    if not outside:
        return None
    total = sum(p.numel() for p in model.parameters() if p.is_floating_point())
    names = ", ".join(list(outside)[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
    modules = dict(model.named_modules())
    in_bn = any(isinstance(modules.get(name.rpartition(".")[0]), BN_LAYER_TYPES) for name in outside)
    hint = " (BatchNorm ones: --include-bn, the default, attacks them)" if in_bn else ""
    return (f"{sum(outside.values()):,} of {total:,} float parameter values are never attacked: {names}{hint}; "
            "summary.json lists them under memory.unattacked_memory")


def _int8_scale(tensor: torch.Tensor, per_channel: bool) -> torch.Tensor:
    if per_channel and tensor.dim() > 1:
        amax = tensor.abs().reshape(tensor.shape[0], -1).amax(dim=1)
        amax = amax.reshape((-1,) + (1,) * (tensor.dim() - 1))
    else:
        amax = tensor.abs().amax().reshape((1,) * max(tensor.dim(), 1))
    return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))


def parameter_memory(model: nn.Module, dtype: str = "float32", *, include_bn: bool = True,
                     layers: Sequence[str] | None = None, per_channel: bool = True,
                     include_protection: bool = True) -> ParameterMemory:
    """Map ``model``'s fault targets to a storage format (design §1).

    For any format but float32 this rounds the model's parameters in place to
    the values the format stores, so the fault-free model is the one deployed
    in that format; the golden reference must be computed after this call.
    BatchNorm's parameters and running statistics are memory a deployed network
    reads, so they are attacked unless ``include_bn=False`` (fold them into the
    convolutions, ``ftcnn.protection.fold``, to deploy without them).
    Protection values (``include_protection``) and BatchNorm values are stored in the
    same format; in int8 each gets its own scale (a bound shares no range with its
    neighbours: a shared scale would move small bounds by up to half a step
    and change the fault-free model), and an infinite (unprofiled) bound,
    which int8 cannot hold, is refused.
    Code words (int32 ``fault_words`` of ``ftcnn.protection.codes`` layers) are float32
    storage's own 32-bit words: a coded model is refused in any other format.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
    params = fault_targets(model, include_bn=include_bn, layers=layers,
                           include_protection=include_protection)
    protection = {b.data_ptr() for m in model.modules() for b in protection_buffers(m).values()}
    words = {b.data_ptr() for m in model.modules() for b in protection_buffers(m).values() if b.dtype == torch.int32}
    if words and dtype != "float32":
        raise ValueError(f"the model stores code words (ftcnn.protection.codes), which encode float32 values: "
                         f"use --dtype float32, not {dtype}")
    for name, p in params.items():
        if p.dtype == torch.int32 and p.data_ptr() in words:
            continue  # a code's raw words: every one of their 32 bits is stored memory
        if p.dtype != torch.float32:
            raise ValueError(f"parameter {name} is {p.dtype}; ftcnn computes in float32")
        if not p.is_contiguous():
            raise ValueError(f"parameter {name} is not contiguous")
        if dtype == "int8" and p.data_ptr() in protection and not torch.isfinite(p).all():
            raise ValueError(f"protection value {name} is not finite, which int8 cannot store; "
                             "profile the ranges or leave protection values unattacked")
    aliases = {other: name for name, names in tied_names(model, params).items() for other in names[1:]}
    if dtype == "float32":
        return ParameterMemory(dtype, params, params, aliases=aliases)
    stored: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    # BatchNorm values get their own scale too: a running variance of 1e-3 next to one of 40 (or
    # a mean next to its neighbours) shares no range; a per-tensor scale moved a fault-free
    # ResNet-20's logits by up to 0.48
    bn = {t.data_ptr() for m in model.modules() if isinstance(m, BN_LAYER_TYPES)
          for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    with torch.no_grad():
        for name, p in params.items():
            if dtype == "int8" and (p.data_ptr() in protection or p.data_ptr() in bn):
                scale = _int8_scale(p.reshape(-1, 1), True).reshape(p.shape)
                q = torch.clamp(torch.round(p / scale), -127, 127).to(torch.int8)
                p.copy_(q.to(p.dtype) * scale)
                stored[name], scales[name] = q.contiguous(), scale
            elif dtype == "int8":
                scale = _int8_scale(p, per_channel)
                q = torch.clamp(torch.round(p / scale), -127, 127).to(torch.int8)
                p.copy_(q.to(p.dtype) * scale)
                stored[name], scales[name] = q.contiguous(), scale
            else:
                s = p.to(torch_dtype(dtype)).contiguous()
                p.copy_(s.to(p.dtype))
                stored[name] = s
    return ParameterMemory(dtype, params, stored, scales, aliases)


@dataclass(frozen=True)
class Faults:
    """Fault positions: per tensor name, flat element indices and bit numbers; for a
    mode that draws numbers (``FaultMode.draw``), ``values``: per tensor name, one per site."""

    sites: Mapping[str, tuple[np.ndarray, np.ndarray]]
    mode: str = "flip"
    values: Mapping[str, np.ndarray] | None = None

    @property
    def count(self) -> int:
        return int(sum(len(idx) for idx, _ in self.sites.values()))

    def as_list(self) -> list[tuple[str, int, int]]:
        return [(name, int(i), int(b)) for name, (idx, bits) in self.sites.items()
                for i, b in zip(idx, bits)]


def spare(faults: Faults, names: Iterable[str]) -> Faults:
    """``faults`` without the sites in ``names``: the other sites, bits and drawn values unchanged.

    Why: leaving some memory unattacked by drawing over a smaller memory would change every
    other draw too, so two arms (protection values attacked or not) would differ by more than
    those values' faults. Drawing over the whole memory and dropping theirs pairs the arms
    trial by trial; per-tensor Binomial draws are independent, so the faults kept have exactly
    the distribution of a draw over the smaller memory.

    Example:
        >>> f = targeted([("a", 0, 30), ("b", 1, 2)])
        >>> spare(f, {"b"}).as_list()
        [('a', 0, 30)]
    """
    gone = set(names)
    if not gone & set(faults.sites):
        return faults
    values = None if faults.values is None else {n: v for n, v in faults.values.items() if n not in gone}
    return Faults({n: s for n, s in faults.sites.items() if n not in gone}, faults.mode, values)


def targeted(faults: Sequence[tuple[str, int, int]], mode: str = "flip",
             values: Sequence[float] | None = None) -> Faults:
    """Faults at given (tensor name, flat index, bit) sites; ``values``: one per site,
    for a mode that draws numbers (``random-value``)."""
    sites: dict[str, tuple[list[int], list[int]]] = {}
    drawn: dict[str, list[float]] = {}
    for k, (name, index, bit) in enumerate(faults):
        sites.setdefault(name, ([], []))
        sites[name][0].append(index)
        sites[name][1].append(bit)
        if values is not None:
            drawn.setdefault(name, []).append(values[k])
    if values is not None and len(values) != len(faults):
        raise ValueError(f"{len(values)} values for {len(faults)} fault sites")
    return Faults({n: (np.asarray(i, dtype=np.int64), np.asarray(b, dtype=np.int64))
                   for n, (i, b) in sites.items()}, mode,
                  None if values is None else {n: np.asarray(v, dtype=np.float64) for n, v in drawn.items()})


def drawn_faults(sites: Mapping[str, tuple[np.ndarray, np.ndarray]], mode: str,
                 rng: np.random.Generator) -> Faults:
    """Faults at drawn ``sites``, with the numbers ``mode`` draws (if it draws any) taken
    from ``rng`` after the sites, one per site, tensor by tensor: every sampler of fault
    sites (this module's, ``ftcnn.campaigns.strata``'s) ends here, so each mode works with all."""
    how = fault_mode(mode)
    if how.draw is None:
        return Faults(sites, mode)
    return Faults(sites, mode, {name: np.asarray(how.draw(rng, len(index)), dtype=np.float64)
                                for name, (index, _) in sites.items()})


def bit_positions(width: int, bits: Sequence[int] | None, what: str = "") -> np.ndarray:
    """The bit positions faults may hit in a ``width``-bit value: ``bits`` (sorted,
    checked against the width), or every bit when None. Parameter and activation
    faults share this one rule."""
    if bits is None:
        return np.arange(width, dtype=np.int64)
    allowed = np.unique(np.asarray(list(bits), dtype=np.int64))
    if allowed.size == 0 or allowed.min() < 0 or allowed.max() >= width:
        raise ValueError(f"bit positions must lie in [0, {width}){' for ' + what if what else ''}")
    return allowed


def allowed_bits(memory: ParameterMemory, bits: Sequence[int] | None) -> np.ndarray:
    """The bit positions faults may hit in ``memory``'s storage format (see :func:`bit_positions`)."""
    return bit_positions(memory.bits_per_element, bits, memory.dtype)


def layer_rates(memory: ParameterMemory, ber: float, per_layer: Mapping[str, float]) -> dict[str, float]:
    """The rate of every fault-target tensor: ``ber``, or its module's rate in ``per_layer``
    (MRFI's per-layer rates for parameters; module name -> rate, e.g. ``{"features.0": 1e-3}``).
    A name that owns no fault target is a one-line ValueError naming the modules that do."""
    owners = {name: name.rpartition(".")[0] for name in memory.stored}
    unknown = [layer for layer in per_layer if layer not in set(owners.values())]
    if unknown:
        known = ", ".join(dict.fromkeys(owners.values()))
        raise ValueError(f"per-layer rate for {str(unknown[0])[:60]!r}, which holds no fault target ({known})")
    return {name: float(per_layer.get(owner, ber)) for name, owner in owners.items()}


def draw_faults(memory: ParameterMemory, rng: np.random.Generator, *, ber: float | None = None,
                count: int | None = None, bits: Sequence[int] | None = None,
                mode: str = "flip", rates: Mapping[str, float] | None = None) -> Faults:
    """Draw random fault sites at a bit error rate or as an exact count.

    With ``ber``, each tensor's number of faults is Binomial(bits, ber) over its
    eligible bits (never ``int(n*ber)``, which is zero for small tensors); ``rates``
    (tensor name -> rate, :func:`layer_rates`) gives some tensors another rate, the
    same draws otherwise. With ``count``, exactly that many distinct sites over the
    whole memory. Sites are always distinct (element, bit) pairs.
    """
    if (ber is None) == (count is None):
        raise ValueError("give exactly one of ber or count")
    fault_mode(mode)
    allowed = allowed_bits(memory, bits)
    nb = len(allowed)
    names = list(memory.stored)
    sizes = np.array([memory.numel(n) * nb for n in names], dtype=np.int64)
    sites: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if ber is not None:
        if not 0.0 <= ber <= 1.0:
            raise ValueError(f"bit error rate {ber} outside [0, 1]")
        for name, size in zip(names, sizes):
            k = int(rng.binomial(size, ber if rates is None else rates[name]))
            if k:
                pos = rng.choice(size, size=k, replace=False)
                sites[name] = (pos // nb, allowed[pos % nb])
        return drawn_faults(sites, mode, rng)
    total = int(sizes.sum())
    if not 0 <= count <= total:
        raise ValueError(f"fault count {count} outside [0, {total}]")
    pos = np.sort(rng.choice(total, size=count, replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(starts, pos, side="right") - 1
    for t in np.unique(which):
        local = pos[which == t] - starts[t]
        sites[names[t]] = (local // nb, allowed[local % nb])
    return drawn_faults(sites, mode, rng)


Undo = list[tuple[str, torch.Tensor, torch.Tensor]]
"""What ``restore`` needs: per faulted tensor, in the order of injection, its
canonical name, the flat indices touched and their integer bits before."""


def _checked_sites(memory: ParameterMemory, faults: Faults
                   ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """Every site of ``faults`` resolved and validated, before any bit is touched."""
    how = fault_mode(faults.mode)
    width = memory.bits_per_element
    plan = []
    for name, (index, bits) in faults.sites.items():
        target = memory.canonical(name)
        index, bits = np.asarray(index), np.asarray(bits)
        if index.shape != bits.shape or index.ndim != 1:
            raise ValueError(f"fault sites of {name!r}: indices and bits must be two 1-d arrays of one length")
        if index.size == 0:
            continue
        if not (np.issubdtype(index.dtype, np.integer) and np.issubdtype(bits.dtype, np.integer)):
            raise ValueError(f"fault sites of {name!r}: indices and bits must be integers")
        numel = memory.numel(target)
        if index.min() < 0 or index.max() >= numel:
            raise ValueError(f"fault index out of range [0, {numel}) for {name!r}")
        if bits.min() < 0 or bits.max() >= width:
            raise ValueError(f"bit position out of range [0, {width}) for {name!r} ({memory.dtype})")
        drawn = (faults.values or {}).get(name)
        plan.append((target, index.astype(np.int64), bits.astype(np.int64),
                     _site_values(how, faults.mode, drawn, index.shape)))
    return plan


def inject(memory: ParameterMemory, faults: Faults) -> Undo:
    """Apply ``faults`` to the memory in place; returns what ``restore`` needs.

    All or nothing: every site is validated before the first flip, and any
    exception on the way (a KeyboardInterrupt included) restores what was
    already flipped before it propagates, so a failed call never leaves a
    weight at 3e37. Each tensor's old bits are saved *before* it is touched,
    so an interrupt in the middle of one tensor's flips is undone too.
    """
    plan = _checked_sites(memory, faults)
    undo: Undo = []
    try:
        for name, index, bits, drawn in plan:
            stored = memory.stored[name]
            where = torch.from_numpy(np.unique(index)).to(stored.device)
            undo.append((name, where, stored.view(-1).view(_INT_VIEW[stored.dtype])[where].clone()))
            flip_bits(stored, index, bits, faults.mode, drawn)
            memory.decode(name, where)
    except BaseException:
        restore(memory, undo)
        raise
    return undo


def restore(memory: ParameterMemory, undo: Undo) -> None:
    """Put back the exact bits saved by ``inject``, last record first.

    Reverse order matters when two records touch one word (two undo lists
    joined, or one tensor reached through two names): the first record holds
    the original bits, the later one bits that were already faulty.
    """
    for name, where, before in reversed(undo):
        stored = memory.stored[name]
        stored.view(-1).view(_INT_VIEW[stored.dtype])[where] = before
        memory.decode(name, where)


@contextlib.contextmanager
def injected(memory: ParameterMemory, faults: Faults) -> Iterator[Undo]:
    """Faults present inside the block, restored bit-exactly on exit."""
    undo = inject(memory, faults)
    try:
        yield undo
    finally:
        restore(memory, undo)

