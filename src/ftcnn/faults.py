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
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

FAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
BN_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
STORAGE_DTYPES = ("float32", "float16", "bfloat16", "int8")
MODES = ("flip", "stuck0", "stuck1")

_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.int8: torch.int8,
    torch.float64: torch.int64,
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


def flip_bits(tensor: torch.Tensor, index: np.ndarray | Sequence[int], bits: np.ndarray | Sequence[int],
              mode: str = "flip") -> torch.Tensor:
    """Apply bit faults in place to ``tensor`` at flat ``index``/``bits`` pairs.

    Several bits of one element are combined into one mask first, because an
    indexed XOR with repeated indices would apply only one of them. Returns the
    previous integer values of the touched elements (for an exact restore).
    """
    if mode not in MODES:
        raise ValueError(f"unknown fault mode {mode!r}; choose from {', '.join(MODES)}")
    index = np.asarray(index, dtype=np.int64)
    bits = np.asarray(bits, dtype=np.int64)
    if not tensor.is_contiguous():
        raise ValueError("bit faults need a contiguous tensor")
    width = bit_width(tensor.dtype)
    if bits.size and (bits.min() < 0 or bits.max() >= width):
        raise ValueError(f"bit position out of range [0, {width}) for {tensor.dtype}")
    if index.size and (index.min() < 0 or index.max() >= tensor.numel()):
        raise ValueError(f"element index out of range [0, {tensor.numel()})")
    view = tensor.view(-1).view(_INT_VIEW[tensor.dtype])
    elements, inverse = np.unique(index, return_inverse=True)
    masks = bit_masks(bits, tensor.dtype).numpy()
    combined = np.zeros(len(elements), dtype=masks.dtype)
    np.bitwise_or.at(combined, inverse, masks)
    where = torch.from_numpy(elements).to(tensor.device)
    mask = torch.from_numpy(combined).to(tensor.device)
    before = view[where].clone()
    if mode == "flip":
        view[where] = before ^ mask
    elif mode == "stuck0":
        view[where] = before & ~mask
    else:
        view[where] = before | mask
    return before


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

    @property
    def bits_per_element(self) -> int:
        return bit_width(_storage_torch_dtype(self.dtype))

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


def _storage_torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16, "int8": torch.int8}[name]


PROTECTION_ATTR = "fault_buffers"


def protection_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The float buffers ``module`` declares as attackable protection memory.

    A protection module (``ftcnn.harden.Correction``, ``Restrict``) lists in a
    class attribute ``fault_buffers`` the names of the float values it adds
    to the model (range bounds, thresholds): they sit in the same memory as
    the weights, so faults hit them like any parameter. Unset names (None)
    are skipped; a declared buffer that is not floating point is a bug.
    """
    out: dict[str, torch.Tensor] = {}
    for name in getattr(module, PROTECTION_ATTR, ()):
        buf = module._buffers.get(name)
        if buf is None:
            continue
        if not buf.is_floating_point():
            raise TypeError(f"{type(module).__name__}.{name} is declared a fault buffer but is {buf.dtype}")
        out[name] = buf
    return out


def fault_targets(model: nn.Module, *, include_bn: bool = False,
                  layers: Sequence[str] | None = None,
                  include_protection: bool = True) -> dict[str, torch.Tensor]:
    """Name -> parameter tensor of every fault target, in module order.

    This is the one place that decides what memory faults can hit: weights and
    biases of every Conv2d and Linear (duplicated copies in hardened models are
    such modules too, so they are hit at the same rate), optionally BatchNorm
    affine parameters, and (``include_protection``, the default) the float
    values a protection adds, as its modules declare them (see
    :func:`protection_buffers`; e.g. ``features.0.restrict.low``, listed
    where the module sits in module order). ``layers`` restricts to modules
    with those names (protection modules can be named too). A tensor that
    several modules share (tied weights) is one piece of memory, listed once
    under its first name in module order (``tied_names`` gives the others).
    """
    kinds = FAULT_LAYER_TYPES + (BN_LAYER_TYPES if include_bn else ())
    modules = {name: m for name, m in model.named_modules()
               if isinstance(m, kinds) or include_protection and protection_buffers(m)}
    if layers is not None:
        unknown = [name for name in layers if name not in modules]
        if unknown:
            raise ValueError(f"unknown layer {unknown[0]!r}; fault-target layers are: "
                             + ", ".join(modules))
        modules = {name: modules[name] for name in layers}
    targets: dict[str, torch.Tensor] = {}
    seen: set[tuple[Any, ...]] = set()

    def add(full: str, tensor: torch.Tensor, value: torch.Tensor) -> None:
        # a tensor shared by several modules (tied weights) is one piece of
        # memory: listed once, under its first name, or it would take twice the BER
        key = storage_key(tensor)
        if key not in seen:
            seen.add(key)
            targets[full] = value

    for name, module in modules.items():
        for pname, param in module.named_parameters(recurse=False):
            if param is not None:
                add(f"{name}.{pname}" if name else pname, param, param.data)
        if include_protection:
            for bname, buf in protection_buffers(module).items():
                add(f"{name}.{bname}" if name else bname, buf, buf)
    return targets


def storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What identifies ``tensor``'s memory: two tensors with equal keys are one piece of memory.

    The storage, byte offset, shape, strides and dtype: tied parameters (one
    Parameter registered in two modules) and their ``.data`` share all of it.
    Tensors without real memory (the ``meta`` device, zero elements) have no
    address to compare, so there the tensor object stands for itself.
    """
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return ("object", id(tensor))
    storage = tensor.untyped_storage()
    return (str(tensor.device), storage.data_ptr(), tensor.storage_offset() * tensor.element_size(),
            tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def tied_names(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Per tensor of ``tensors``: every parameter/buffer name of ``module`` that holds its memory.

    A weight tied between two modules is read by both; whatever follows a
    tensor through the model (the first layer that uses it, the modules a
    fault in it reaches) must follow all its names. The tensor's own name
    comes first.
    """
    by_key: dict[tuple[Any, ...], list[str]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False),
                    *module.named_buffers(remove_duplicate=False)]:
        by_key.setdefault(storage_key(t), []).append(name)
    return {name: [name] + [n for n in by_key.get(storage_key(t), []) if n != name]
            for name, t in tensors.items()}


def protection_memory(model: nn.Module, targets: Iterable[str]) -> dict[str, Any]:
    """What the protection modules add to memory, split by whether faults hit it.

    A protection module is one that declares ``fault_buffers`` (even empty,
    like ``harden.Hardened``). ``targets`` are the attacked tensor names (a
    ``ParameterMemory``'s). Returns ``protection_values``: attacked float
    elements; ``unattacked_memory``: buffer name -> elements of protection
    memory faults do not hit (int64 indices always; the float bounds too when
    excluded); ``unattacked_bits``: their size in bits.
    """
    attacked = set(targets)
    values, unattacked, bits = 0, {}, 0
    for name, module in model.named_modules():
        if not hasattr(module, PROTECTION_ATTR):
            continue
        for bname, buf in module.named_buffers(recurse=False):
            full = f"{name}.{bname}" if name else bname
            if full in attacked:
                values += buf.numel()
            else:
                unattacked[full] = buf.numel()
                bits += buf.numel() * buf.element_size() * 8
    return {"protection_values": values, "unattacked_memory": unattacked, "unattacked_bits": bits}


def _int8_scale(tensor: torch.Tensor, per_channel: bool) -> torch.Tensor:
    if per_channel and tensor.dim() > 1:
        amax = tensor.abs().reshape(tensor.shape[0], -1).amax(dim=1)
        amax = amax.reshape((-1,) + (1,) * (tensor.dim() - 1))
    else:
        amax = tensor.abs().amax().reshape((1,) * max(tensor.dim(), 1))
    return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))


def parameter_memory(model: nn.Module, dtype: str = "float32", *, include_bn: bool = False,
                     layers: Sequence[str] | None = None, per_channel: bool = True,
                     include_protection: bool = True) -> ParameterMemory:
    """Map ``model``'s fault targets to a storage format (design §1).

    For any format but float32 this rounds the model's parameters in place to
    the values the format stores, so the fault-free model is the one deployed
    in that format; the golden reference must be computed after this call.
    Protection values (``include_protection``) are stored in the same format;
    in int8 each gets its own scale (a bound shares no range with its
    neighbours: a shared scale would move small bounds by up to half a step
    and change the fault-free model), and an infinite (unprofiled) bound,
    which int8 cannot hold, is refused.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
    params = fault_targets(model, include_bn=include_bn, layers=layers,
                           include_protection=include_protection)
    protection = {b.data_ptr() for m in model.modules() for b in protection_buffers(m).values()}
    for name, p in params.items():
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
    with torch.no_grad():
        for name, p in params.items():
            if dtype == "int8" and p.data_ptr() in protection:
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
                s = p.to(_storage_torch_dtype(dtype)).contiguous()
                p.copy_(s.to(p.dtype))
                stored[name] = s
    return ParameterMemory(dtype, params, stored, scales, aliases)


@dataclass(frozen=True)
class Faults:
    """Fault positions: per tensor name, flat element indices and bit numbers."""

    sites: Mapping[str, tuple[np.ndarray, np.ndarray]]
    mode: str = "flip"

    @property
    def count(self) -> int:
        return int(sum(len(idx) for idx, _ in self.sites.values()))

    def as_list(self) -> list[tuple[str, int, int]]:
        return [(name, int(i), int(b)) for name, (idx, bits) in self.sites.items()
                for i, b in zip(idx, bits)]


def targeted(faults: Sequence[tuple[str, int, int]], mode: str = "flip") -> Faults:
    """Faults at given (tensor name, flat index, bit) sites."""
    sites: dict[str, tuple[list[int], list[int]]] = {}
    for name, index, bit in faults:
        sites.setdefault(name, ([], []))
        sites[name][0].append(index)
        sites[name][1].append(bit)
    return Faults({n: (np.asarray(i, dtype=np.int64), np.asarray(b, dtype=np.int64))
                   for n, (i, b) in sites.items()}, mode)


def _allowed_bits(memory: ParameterMemory, bits: Sequence[int] | None) -> np.ndarray:
    width = memory.bits_per_element
    if bits is None:
        return np.arange(width, dtype=np.int64)
    allowed = np.unique(np.asarray(list(bits), dtype=np.int64))
    if allowed.size == 0 or allowed.min() < 0 or allowed.max() >= width:
        raise ValueError(f"bit positions must lie in [0, {width}) for {memory.dtype}")
    return allowed


def draw_faults(memory: ParameterMemory, rng: np.random.Generator, *, ber: float | None = None,
                count: int | None = None, bits: Sequence[int] | None = None,
                mode: str = "flip") -> Faults:
    """Draw random fault sites at a bit error rate or as an exact count.

    With ``ber``, each tensor's number of faults is Binomial(bits, ber) over its
    eligible bits (never ``int(n*ber)``, which is zero for small tensors). With
    ``count``, exactly that many distinct sites over the whole memory. Sites
    are always distinct (element, bit) pairs.
    """
    if (ber is None) == (count is None):
        raise ValueError("give exactly one of ber or count")
    if mode not in MODES:
        raise ValueError(f"unknown fault mode {mode!r}; choose from {', '.join(MODES)}")
    allowed = _allowed_bits(memory, bits)
    nb = len(allowed)
    names = list(memory.stored)
    sizes = np.array([memory.numel(n) * nb for n in names], dtype=np.int64)
    sites: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if ber is not None:
        if not 0.0 <= ber <= 1.0:
            raise ValueError(f"bit error rate {ber} outside [0, 1]")
        for name, size in zip(names, sizes):
            k = int(rng.binomial(size, ber))
            if k:
                pos = rng.choice(size, size=k, replace=False)
                sites[name] = (pos // nb, allowed[pos % nb])
        return Faults(sites, mode)
    total = int(sizes.sum())
    if not 0 <= count <= total:
        raise ValueError(f"fault count {count} outside [0, {total}]")
    pos = np.sort(rng.choice(total, size=count, replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(starts, pos, side="right") - 1
    for t in np.unique(which):
        local = pos[which == t] - starts[t]
        sites[names[t]] = (local // nb, allowed[local % nb])
    return Faults(sites, mode)


Undo = list[tuple[str, torch.Tensor, torch.Tensor]]
"""What ``restore`` needs: per faulted tensor, in the order of injection, its
canonical name, the flat indices touched and their integer bits before."""


def _checked_sites(memory: ParameterMemory, faults: Faults) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Every site of ``faults`` resolved and validated, before any bit is touched."""
    if faults.mode not in MODES:
        raise ValueError(f"unknown fault mode {faults.mode!r}; choose from {', '.join(MODES)}")
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
        plan.append((target, index.astype(np.int64), bits.astype(np.int64)))
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
        for name, index, bits in plan:
            stored = memory.stored[name]
            where = torch.from_numpy(np.unique(index)).to(stored.device)
            undo.append((name, where, stored.view(-1).view(_INT_VIEW[stored.dtype])[where].clone()))
            flip_bits(stored, index, bits, faults.mode)
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


def first_faulted_target(memory: ParameterMemory, faults: Faults) -> str | None:
    """The earliest (in module order) tensor the faults touch, or None."""
    touched = {memory.aliases.get(name, name) for name, (index, _) in faults.sites.items() if len(index)}
    return next((name for name in memory.stored if name in touched), None)
