"""Selective hardening: duplicated channels, corrections, range restriction, TMR (design §4).

``harden(model, scores, ratio=0.1)`` returns a new model in which the most
vulnerable filters (Conv2d) / neurons (Linear) of every layer are computed
twice and merged back into one channel by a correction rule, so the next layer
sees the original shape. Module surgery, no model names: every protected layer
``m`` at attribute path ``p`` is replaced by a :class:`Hardened` wrapper at the
same path, holding

- ``p.original``: the original module, called untouched on the input, so the
  original parameters keep their names up to the ``.original`` prefix
  (``features.0.weight`` becomes ``features.0.original.weight``);
- ``p.copies``: a SECOND module of the same type (a real ``nn.Conv2d`` /
  ``nn.Linear``, so :func:`ftcnn.injection.faults.fault_targets` lists it and campaigns
  hit the copies at the same bit error rate) holding copies of the protected
  filters/neurons (weights and biases), applied to the same input. For a
  grouped or depthwise conv each copied filter gets its own group, fed the
  input channels of the original filter's group (``p.gather``);
- ``p.correction``: merges original and copies per element (registry
  ``CORRECTIONS``: ``min``, ``range``, ``tmr``);
- ``p.restrict`` (optional): Ranger-style per-channel bounds on all channels.

Parameter-side checks (``check_weights="zero"``/``"clamp"``): the fault sits
in a stored weight, so it is caught there, before any MAC uses it. Every
Conv2d/Linear (copies included) becomes a :class:`ProtectedConv2d` /
:class:`ProtectedLinear` that keeps its ``weight``/``bias`` (same fault-target
names) and adds per-output-channel weight bounds and per-layer bias bounds,
the exact fault-free min/max (no data needed; attacked like the weights).
Measured on a trained LeNet-5/mnist5k (clean 96.70%), 100 trials, bounds
attacked, no other protection, 1.00x layer MACs: 96.48% [96.34, 96.62] at
BER 1e-4 and 91.0% [88.1, 93.9] at 1e-3 (``clamp``: 96.24% / 84.0%;
unprotected: 17.1% / 0.7%).

Speed (latency should track MACs): full duplication (``tmr="full"``, or
ratio 1) computes each copy by a call of the layer's own shape, which gives
the original's bits exactly (every layer of LeNet-5, VGG-11 w0.25, ResNet-20
at batch 128), so the correction is a median (or min) of float ops with no
tolerance test and no index_select/index_copy. Restriction and checks use
float masks only: on this CPU (1 thread) ``torch.where``, ``masked_fill``,
bool comparisons and ``fmin``/``fmax`` are 2-15x slower per element than a
float ``maximum``/``mul``. Not solved: a partial copy of 1-2 channels costs
oneDNN about as much as the whole layer (LeNet-5's first conv at batch 128:
3.4 ms for 1 channel, 3.5 ms for all 6); NNPACK does it in 0.8 ms but
differs from oneDNN by up to 3e-5, beyond the agreement tolerance, so
outputs near 0 would lose bit-exactness (tried, measured, removed).
Measured with ``benchmarks/protection_latency.py`` (batch 128, 1 thread,
interleaved, on 2 CPUs shared with other jobs, so +-20% run to run): full
TMR on LeNet-5 2.0-2.2x the unprotected latency for 3.1x its MACs (5.9x
before this change on the same machine, 16.75x in issue 12), on VGG-11
w0.25 2.9-3.1x for 3.0x; ResNet-20 4.2-4.4x for 3.0x; restriction
1.2-1.3x for 1.02-1.08x; weight checks 1.0-1.1x for 1.00x.

At batch 1 (issue 21) a weight check costs its op count: ``check_two`` resolves and
applies two stored bound copies in 8-10 ops a tensor (``bound`` + ``check_values``: 13
and three export tests), bit for bit the same values. ``benchmarks/weight_check_latency.py``
(1 thread, load average ~6 on 2 CPUs): LeNet-5 weights_zero x2.95 -> x2.18 at batch 1,
+restriction (p90) x3.78 -> x2.75, VGG-11 w0.25 x2.09 -> x1.78, ResNet-20 weights_clamp
x1.49 -> x1.31; what remains is ~17 ops a layer (~3 us each on that machine).

Bit-exactness: a second, smaller conv/linear call can differ from the same
channel of the original call by float rounding (the CPU kernel blocks its work
differently). Measured on CPU: trained LeNet-5 and VGG-11 (w0.25) on mnist5k,
0.08% / 0.02% of copy values differ, by at most 3e-6 (at most 0.24x the
tolerance below); random-init ResNet-50 (w0.5), 3% differ, at most 1e-6
(0.16x the tolerance); LeNet/VGG-11/ResNet-18 at full width, random init: none.
So every correction first tests whether the copies *agree* with the original,
``|a - b| <= RTOL * min(|a|, |b|) + ATOL``, and outputs the ORIGINAL value
where they do; the rule applies only where they disagree. Without faults the
hardened model therefore equals the original bit for bit. A fault that moves
a value by less than that tolerance is, by construction, not corrected, and
harmless (it is below float32 noise of a different kernel). ``min`` (not
``max``) in the tolerance makes an Inf/NaN never agree with anything.
Not checked on GPUs: with TF32 convolutions (PyTorch's cuDNN default) two
calls can differ by ~1e-3, beyond the tolerance; set
``torch.backends.cudnn.allow_tf32 = False`` there for exactness.

Weakness of ``min`` (the paper's rule), tested and kept: it discards a large
POSITIVE corruption, but when the corruption is a large NEGATIVE value the
minimum picks it; the authors rely on the ReLU that follows to zero it, which
bounds the damage but does not restore the value (and a BatchNorm with a
negative scale in between turns it positive again). ``range`` keeps whichever
value lies nearer the profiled range instead, so it handles both signs.

Honest memory: the float bounds of ``range`` corrections and restrictions
are memory like the weights; the modules declare them (``fault_buffers``),
so :func:`ftcnn.injection.faults.fault_targets` lists them and campaigns attack them by
default, and ``ftcnn.protection.cost`` counts them as parameters. The int64 buffers
(``correction.index``, ``gather``) are reported as unattacked memory.

Fail-safe bounds (issue 21): one stored bound is the protection's weak link (a
flip that tightens it cuts its whole channel), so every bound is stored
``bound_copies`` times (default 5; ``name`` and ``name_copies``, all attacked)
and resolved at use by :func:`fail_safe_bound`: the looser of two, or the
median of three or five; weight-check bounds lie ``BOUND_SLACK`` (1/16) outside
the values they bound (:func:`widened`). Two copies fail when one flip loosens a
copy (one faulty weight of that channel then passes), three when two copies of
one triple move the same way, exact bounds when tightening flips of low mantissa
bits cut a channel's extreme weight. Measured paired by trial at BER 1e-3 on
LeNet-5, VGG-11 and ResNet-20 (mnist5k, BN folded) with every layout: the
models' tables: experiments/results/failsafe_bounds.md. A checkpoint without the
``bound_copies`` field (saved before) loads with one copy, as it was saved.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ftcnn import checkpoint
from ftcnn.protection import codes, cost as cost_mod
from ftcnn import rules
from ftcnn.campaigns import trials
from ftcnn.injection import graph
from ftcnn.protection import fold
from ftcnn.protection.vulnerability import Scores, finite_scores, layer_scores

# Agreement tolerance between the original channel and a copy (see module doc).
RTOL = 1e-4
ATOL = 1e-6

RESTRICT_MODES = ("zero", "clamp")
CHECK_MODES = ("zero", "clamp")
TMR_MODES = ("full",)
PROFILE_BATCH = 256
RESTRICT_OPS = 5      # per output value: max, min, compare, multiply, NaN to 0 (``check_values``)
CHECK_OPS = 5         # per checked weight/bias value, the same five


def exporting() -> bool:
    """Whether this forward runs inside an ONNX export. ``torch.onnx.is_in_onnx_export``
    imports two modules at every call (2-4 us, several times per protected layer at
    batch 1); both exporters trace (TorchScript: ``torch.jit``; dynamo: ``torch.export``,
    which sets ``is_compiling``), so an eager forward is told apart by two flag reads."""
    return (torch.jit.is_tracing() or torch.compiler.is_compiling()) and torch.onnx.is_in_onnx_export()


def nan_to(t: torch.Tensor, value: float) -> torch.Tensor:
    """``t`` with NaN replaced by ``value`` (infinities kept), as a new tensor. One
    float pass in PyTorch; in an ONNX export ``IsNaN`` + ``Where`` (``nan_to_num``
    would export as ~8 nodes: Cast, IsInf, IsNaN, Where, ...)."""
    if exporting():
        return torch.where(torch.isnan(t), value, t)
    return t.nan_to_num(value, math.inf, -math.inf)


def open_nan_bounds(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds with a NaN replaced by -inf (low) / +inf (high): a faulted-to-NaN
    bound bounds nothing on its side instead of failing every value."""
    return nan_to(low, -math.inf), nan_to(high, math.inf)


def within(v: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """1.0 where ``low <= v <= high`` (broadcast), else 0.0 (NaN: 0.0), as a new
    float tensor: max, min and compare written into one fresh buffer.

    Float masks, not bool: on this CPU (1 thread, 602k floats) a float
    max/min/compare pass takes ~0.5 ms, while a bool comparison takes
    1.3 ms, ``torch.where`` 7 ms, ``masked_fill`` 8 ms and ``torch.fmin``
    3 ms (they are not vectorised for these shapes)."""
    m = torch.maximum(v, low)
    m.clamp_max_(high)
    return m.eq_(v)


def check_values(v: torch.Tensor, low: torch.Tensor, high: torch.Tensor, mode: str) -> torch.Tensor:
    """``v`` with every value outside [low, high] (broadcast) set to 0 (``zero``) or
    to the nearest bound (``clamp``); NaN becomes 0 in both modes; values inside
    come back bit for bit (``1.0 * v``, and ``clamp`` returns its input there).
    A NaN bound bounds nothing on its side. Five float passes for ``zero``
    (``within``, multiply, NaN to 0: an infinite ``v`` outside gives
    ``0 * inf = NaN``), three for ``clamp``."""
    low, high = open_nan_bounds(low, high)
    if exporting():  # the same values in 4-5 ONNX nodes (Where is fast in ONNX Runtime)
        if mode == "zero":
            return torch.where((v >= low) & (v <= high), v, 0.0)
        return torch.where(torch.isnan(v), 0.0, torch.minimum(torch.maximum(v, low), high))
    return check_opened(v, low, high, mode)


# Checked tensors of at most this many values take ``check_two``'s NaN-ignoring path in
# ``zero`` mode (``torch.fmax``/``fmin`` are not vectorised here: ~4 ns a value, against
# ~2 us for each of the two NaN-opening passes over the bounds they save)
SMALL_CHECK = 512


def check_two(v: torch.Tensor, low: torch.Tensor, low_copy: torch.Tensor, high: torch.Tensor,
              high_copy: torch.Tensor, mode: str, small: bool = False) -> torch.Tensor:
    """``check_values(v, fail_safe_bound([low, *low_copy]), ...)``, bit for bit, for bounds
    stored twice (the default ``bound_copies``; ``low_copy`` is the ``(1, *shape)`` stack
    of the second copy), eager only.

    At batch 1 a weight check costs its op count, not its element work (LeNet-5's largest
    weight, 48k floats, takes ~5 us a pass; any op ~2 us), so this takes 10 ops a tensor
    where ``bound`` + ``check_values`` took 13 and three export tests (each as slow as an
    op): the looser copy computed on the stacked
    copy as stored (no select per bound: the result gains its leading 1, dropped once at
    the end), the NaN of a bound opened in place, and no export test per pass. ``small``
    (``zero`` mode): the mask from ``fmax``/``fmin``, which skip a NaN bound as the open
    side does (and map a NaN value to a bound, which it never equals), so the bounds
    need no opening: 8 ops. The result has the broadcast shape of ``v`` and the
    ``(1, *shape)`` bounds: the caller drops or views away the leading 1."""
    lo = torch.minimum(low, low_copy)  # NaN where either copy is: opened below
    hi = torch.maximum(high, high_copy)
    if small and mode == "zero":
        out = torch.fmin(torch.fmax(v, lo), hi)
    else:
        lo.nan_to_num_(-math.inf, math.inf, -math.inf)
        hi.nan_to_num_(math.inf, math.inf, -math.inf)
        out = torch.maximum(v, lo)
        out.clamp_max_(hi)
    if mode == "zero":
        out.eq_(v).mul_(v)
    return out.nan_to_num_(0.0, math.inf, -math.inf)


def check_opened(v: torch.Tensor, low: torch.Tensor, high: torch.Tensor, mode: str) -> torch.Tensor:
    """``check_values`` for bounds already opened (no NaN: ``_StoredBounds.open_bound``),
    eager only: the float passes themselves, each but the first in place on this call's
    own tensor. The result has the broadcast shape of ``v`` and the bounds."""
    if mode == "zero":
        out = within(v, low, high).mul_(v)  # the mask is this call's own buffer: one allocation
    else:
        out = torch.maximum(v, low)
        out.clamp_max_(high)
    return out.nan_to_num_(0.0, math.inf, -math.inf)  # out is this call's own tensor


# --- fail-safe protection memory ----------------------------------------------

# How many copies of every bound a protection stores (1, 2 or 3) when ``harden``
# is not told: see ``fail_safe_bound``.
BOUND_COPIES = (1, 2, 3, 5)
DEFAULT_BOUND_COPIES = 5  # median of five: the only layout with no measurable cost of its own faults at 1e-3 (ResNet-20)
BOUND_OPS = {1: 0, 2: 1, 3: 7, 5: 7}  # float passes per stored bound value to resolve it at use


def fail_safe_bound(copies: Sequence[torch.Tensor], side: str) -> torch.Tensor:
    """The bound to use from its stored ``copies`` (``side``: ``"low"`` or ``"high"``),
    chosen so that one flip in one copy cannot cut a channel.

    A single stored bound is the protection's weak link: a flip of exponent bit
    27-29 of a bound below 1 divides it by 2^16-2^64 and a sign flip moves it to
    the other side, and either zeroes (or clamps) its whole channel for every
    input (measured on LeNet-5 at BER 1e-3: 93.1% with the bounds attacked,
    96.1% without). Two copies: the looser of the two (min of the lows, max of
    the highs; a NaN stays NaN, which ``check_values`` opens), so a flip can only
    loosen a bound, never tighten it: 1 pass. Three copies: the median after
    NaN -> the open side, so a flip either way is outvoted: 7 passes. The passes
    run over the bounds, not the values they bound (a few hundred floats per
    layer). Fault-free copies are equal, and the min, max or median of equal
    values is that value, so outputs stay bit for bit those of one copy."""
    if len(copies) == 1:
        return copies[0]
    loosest = torch.minimum if side == "low" else torch.maximum
    if len(copies) == 2:
        return loosest(copies[0], copies[1])
    if len(copies) == 3:
        a, b, c = (nan_to(t, -math.inf if side == "low" else math.inf) for t in copies)
        return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))
    return median_of(torch.stack(list(copies)), side)


def median_of(stacked: torch.Tensor, side: str) -> torch.Tensor:
    """The median over the first dim of an odd number of stacked copies, NaN -> the open side
    first: five copies outvote two flips. Why five: at BER 1e-3 a ResNet-20 stores ~2,700
    bound values per copy, and two copies of one triple moving the same way (a sign flip and a
    shrinking exponent flip of a low bound) is common enough to cut channels; three of five
    rarely coincide (experiments/results/failsafe_bounds.md: three copies' worst ResNet-20 trial
    lost 18.5 points, five copies' gap over 1,000 pairs is -0.01 point)."""
    fill = -math.inf if side == "low" else math.inf
    # the middle of a sort (ONNX TopK), not ``median`` (no ONNX op): the same value for an odd count
    return stacked.nan_to_num(fill, math.inf, -math.inf).sort(dim=0).values[stacked.shape[0] // 2]


# How far a weight check's bounds lie outside the values they bound, relative to the bound (1/16).
BOUND_SLACK = 0.0625


def widened(bound: torch.Tensor, side: str) -> torch.Tensor:
    """``bound`` moved outwards by ``BOUND_SLACK`` of its magnitude.

    Why: a bound equal to its channel's extreme weight is cut by ANY flip that tightens it,
    the lowest mantissa bit included, and then zeroes that weight, the channel's largest
    (seen on ResNet-20 at BER 1e-3 with five copies: two copies tightened, one by mantissa
    bit 15, cut conv1's most negative weight of a channel in one trial;
    ``tests/test_weight_check.py`` shows the mechanism). With 1/16 of slack no flip of mantissa bits 0-18 of a copy (a relative change below
    2^-4) can cut a value; a value faulted to anywhere beyond 1.0625x its channel's extreme
    is still caught, and fault-free every value passes bit for bit as before.

    Example:
        >>> widened(torch.tensor([-0.5, 0.5]), "low").tolist(), widened(torch.tensor([-0.5, 0.5]), "high").tolist()
        ([-0.53125, 0.46875], [-0.46875, 0.53125])
    """
    step = bound.abs() * BOUND_SLACK
    return bound - step if side == "low" else bound + step


class _StoredBounds:
    """Bounds stored as ``bound_copies`` copies, fault targets all (a mixin of the
    protection modules). Bound ``name`` keeps its primary copy in the buffer
    ``name`` (the layout of one copy, so one-copy checkpoints load unchanged) and
    the others stacked in ``name_copies`` (``bound_copies - 1`` along a new first
    dim; None with one copy). Subclasses list both in ``fault_buffers``."""

    bound_copies: int = 1

    def _register_bound(self, name: str, fill: torch.Tensor, bound_copies: int) -> None:
        self.bound_copies = int(bound_copies)
        self.register_buffer(name, fill)
        spare = fill.unsqueeze(0).repeat(self.bound_copies - 1, *(1,) * fill.dim())
        self.register_buffer(f"{name}_copies", spare if self.bound_copies > 1 else None)

    def bound(self, name: str) -> torch.Tensor | None:
        """Bound ``name`` as the protection uses it (``fail_safe_bound`` of its copies)."""
        primary = getattr(self, name)
        spare = getattr(self, f"{name}_copies", None)
        if primary is None or spare is None:
            return primary
        return fail_safe_bound([primary, *spare.unbind(0)], "low" if name.endswith("low") else "high")

    def open_bound(self, name: str) -> torch.Tensor:
        """``open_nan_bounds`` of ``bound(name)``, the values ``check_values`` compares with,
        as a new tensor in fewer ops (the batch-1 cost of a check is its op count): one
        copy: 1; two: 3 (select, the looser, NaN opened in place; ``check_two`` saves the
        select); three: the median, which has no NaN left to open."""
        primary = self._buffers[name]
        spare = self._buffers.get(f"{name}_copies")
        low = name.endswith("low")
        fill = -math.inf if low else math.inf
        if spare is None:
            return primary.nan_to_num(fill, math.inf, -math.inf)
        if self.bound_copies == 2:
            loosest = (torch.minimum if low else torch.maximum)(primary, spare[0])
            return loosest.nan_to_num_(fill, math.inf, -math.inf)  # loosest is this call's own tensor
        if self.bound_copies > 3:
            return median_of(torch.cat([primary.unsqueeze(0), spare]), "low" if low else "high")
        return fail_safe_bound([primary, *spare.unbind(0)], "low" if low else "high")

    @torch.no_grad()
    def set_bound(self, name: str, value: torch.Tensor) -> None:
        """Write ``value`` into every stored copy of bound ``name``."""
        primary = getattr(self, name)
        primary.copy_(value.reshape(primary.shape))
        spare = getattr(self, f"{name}_copies", None)
        if spare is not None:
            spare.copy_(primary.unsqueeze(0).expand_as(spare))

    def bound_ops(self) -> int:
        """Float ops that resolve the stored copies into the bounds used, per forward."""
        primary = sum(b.numel() for n, b in self._buffers.items()
                      if b is not None and n in getattr(self, "fault_buffers", ()) and not n.endswith("_copies"))
        return primary * BOUND_OPS[self.bound_copies]


# --- element-wise rules -------------------------------------------------------

def agree(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where ``a`` and ``b`` are equal up to float rounding (False for NaN/Inf)."""
    return (a - b).abs() <= RTOL * torch.minimum(a.abs(), b.abs()) + ATOL


def nan_min(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum that ignores a NaN operand (NaN only if both are)."""
    return torch.where(torch.isnan(a), b, torch.where(torch.isnan(b), a, torch.minimum(a, b)))


def nan_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(a), b, torch.where(torch.isnan(b), a, torch.maximum(a, b)))


def correct_min(a: torch.Tensor, copies: Sequence[torch.Tensor], low: torch.Tensor | None,
                high: torch.Tensor | None) -> torch.Tensor:
    """The paper's rule: element-wise minimum of original and copy (NaN ignored)."""
    (b,) = copies
    return torch.where(agree(a, b), a, nan_min(a, b))


def range_distance(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """How far ``x`` lies outside [low, high]: 0 inside, +inf for NaN/Inf.

    A non-finite output of a layer with finite parameters and inputs is
    never a legitimate value, so it is the farthest of all. Unprofiled (or
    faulted-to-NaN) bounds compare False, i.e. do not bound that side.
    """
    below, above = x < low, x > high
    d = torch.where(below, low - x, torch.where(above, x - high, torch.zeros_like(x)))
    return torch.where(torch.isfinite(x), d, torch.full_like(x, math.inf))


def correct_range(a: torch.Tensor, copies: Sequence[torch.Tensor], low: torch.Tensor | None,
                  high: torch.Tensor | None) -> torch.Tensor:
    """Where original ``a`` and copy ``b`` disagree, keep whichever lies closer to
    the channel's profiled range; on a tie (both inside, or equally far) the original.

    So the copy replaces the original only on evidence that the original is
    wrong: it is non-finite, or outside the range while the copy is inside
    or nearer. This corrects the faults that matter (an exponent flip of the
    original throws it far out of range; the copy is inside, or just beside
    it) and is never worse than the unprotected layer where the original is
    right: (1) the output is always one of the two computed values, never a
    made-up one (the old rule output 0 when neither was in range, i.e.
    destroyed a legitimate out-of-range original whose copy was faulted
    further out); (2) where the original is inside the range, or both are
    and merely disagree, the output is the original (the paper's ``min``
    would take a copy faulted downwards); (3) the one case the two copies
    cannot tell apart, an original legitimately outside the range whose copy
    a fault moved nearer to it (e.g. halved by an exponent flip), gives the
    copy, whose error is bounded (at most the range's width plus twice the
    original's distance from it), unlike an unbounded corrupted original.
    A fault in ``low``/``high`` alone never changes the output: the bounds are
    consulted only where the copies disagree.
    """
    (b,) = copies
    take_copy = range_distance(b, low, high) < range_distance(a, low, high)
    return torch.where(agree(a, b) | ~take_copy, a, b)


def correct_tmr(a: torch.Tensor, copies: Sequence[torch.Tensor], low: torch.Tensor | None,
                high: torch.Tensor | None) -> torch.Tensor:
    """Majority vote of three: the original if a copy agrees with it, else the copies
    if they agree with each other, else the (NaN-ignoring) median."""
    b, c = copies
    median = nan_max(nan_min(a, b), nan_min(nan_max(a, b), c))
    return torch.where(agree(a, b) | agree(a, c), a, torch.where(agree(b, c), b, median))


def exact_min(a: torch.Tensor, copies: Sequence[torch.Tensor], low: torch.Tensor | None,
              high: torch.Tensor | None) -> torch.Tensor:
    """``min`` for a copy computed by a call of the original's shape (bit-identical
    without faults, so no tolerance test): the minimum after NaN -> +inf."""
    (b,) = copies
    return torch.minimum(nan_to(a, math.inf), nan_to(b, math.inf))


def exact_tmr(a: torch.Tensor, copies: Sequence[torch.Tensor], low: torch.Tensor | None,
              high: torch.Tensor | None) -> torch.Tensor:
    """Median of three bit-identical (fault-free) values, ``max(min(a, b),
    min(max(a, b), c))``, after NaN -> +inf (so a NaN operand is outvoted).
    Where two agree bit for bit the median is that value, so this is the
    majority vote. Seven float passes: 3.4-4.5 ms on a LeNet-5 first-conv
    output at batch 128 (1 thread) against 11 ms for the same median with the
    NaN-ignoring ``fmin``/``fmax``, which are not vectorised. The last three
    write into the two tensors this function allocated (an in-place pass
    costs 0.5 ms where an allocating one costs 0.75 ms, 1.6M floats), never
    into ``a``, ``b``, ``c``, which others may hold (a campaign's golden cache)."""
    b, c = copies
    a, b, c = (nan_to(t, math.inf) for t in (a, b, c))
    if torch.is_grad_enabled():  # autograd needs the inputs of each pass unchanged
        return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))
    low = torch.minimum(a, b)
    high = a.clamp_min_(b).clamp_max_(c)  # min(max(a, b), c), in a's sanitised copy
    return low.clamp_min_(high)


def correct_median0(a: torch.Tensor, copies: Sequence[torch.Tensor], low: torch.Tensor | None,
                    high: torch.Tensor | None) -> torch.Tensor:
    """Where original ``a`` and copy ``b`` disagree, the median of the two and zero
    (NaN counts as +inf): the value nearer zero when both have one sign, zero when
    their signs differ. No ranges and no third copy: a fault that blows a value up
    (an exponent flip) is outvoted by the other value or by zero, which ReLU
    networks read as "no evidence". The extension-point example of issue 11: this
    function and one ``CORRECTIONS`` line are all a new correction needs."""
    (b,) = copies
    x, y = nan_to(a, math.inf), nan_to(b, math.inf)
    median = torch.maximum(torch.minimum(x, y), torch.minimum(torch.maximum(x, y), torch.zeros_like(x)))
    return torch.where(agree(a, b), a, median)


@dataclass(frozen=True)
class CorrectionRule:
    """One correction: how many copies it needs, whether it needs profiled
    ranges, its element-wise function, and its element-wise ops per corrected
    value (for ``ftcnn.protection.cost.macs``; the agreement test counts 6). ``exact_fn``
    (with ``exact_ops``) replaces ``fn`` where every channel is copied and the
    copies come from calls of the original's own shape (see ``Correction``)."""

    copies: int
    needs_ranges: bool
    fn: Callable[..., torch.Tensor]
    ops: int
    exact_fn: Callable[..., torch.Tensor] | None = None
    exact_ops: int | None = None


CORRECTIONS: dict[str, CorrectionRule] = {
    "min": CorrectionRule(1, False, correct_min, 6 + 5, exact_min, 3),
    "range": CorrectionRule(1, True, correct_range, 6 + 2 * 8 + 3),
    "tmr": CorrectionRule(2, False, correct_tmr, 18 + 8, exact_tmr, 7),
    "median0": CorrectionRule(1, False, correct_median0, 6 + 2 + 4),
}


# --- modules ---------------------------------------------------------------------

def _channel_dim(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Conv2d) else -1


def _bound_shape(layer: nn.Module, n: int) -> tuple[int, ...]:
    return (n, 1, 1) if isinstance(layer, nn.Conv2d) else (n,)


class Correction(_StoredBounds, nn.Module):
    """Merges the copies of the protected channels ``index`` back into the
    layer's output. The index and the ranges are buffers, so the state dict
    restores them. The ranges are memory like the weights, so campaigns
    attack them (``fault_buffers``, every stored copy: ``_StoredBounds``); the
    int64 index is listed as unattacked memory instead (a flip there is an
    address fault, not a value fault)."""

    fault_buffers: tuple[str, ...] = ("low", "high", "low_copies", "high_copies")

    def __init__(self, rule: str, index: torch.Tensor, dim: int, bound_shape: tuple[int, ...],
                 exact: bool = False, bound_copies: int = 1) -> None:
        super().__init__()
        self.rule, self.dim = rule, dim
        # every channel copied, each copy by a call of the original's shape: no index, no tolerance
        self.exact = bool(exact)
        self.register_buffer("index", index.clone().long())
        if CORRECTIONS[rule].needs_ranges:
            self._register_bound("low", torch.full(bound_shape, -math.inf), bound_copies)
            self._register_bound("high", torch.full(bound_shape, math.inf), bound_copies)
        else:
            self.low = self.high = self.low_copies = self.high_copies = None

    def forward(self, y: torch.Tensor, copies: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        rule = CORRECTIONS[self.rule]
        # a tuple from same-shape calls, or one tensor of stacked copies (fx unpacks it in rule.fn)
        parts = copies if isinstance(copies, (tuple, list)) else copies.chunk(rule.copies, self.dim)
        low, high = self.bound("low"), self.bound("high")
        if self.exact:
            return (rule.exact_fn or rule.fn)(y, parts, low, high)
        a = y.index_select(self.dim, self.index)
        fixed = rule.fn(a, parts, low, high)
        # out of place: y may be a value someone else keeps (e.g. a campaign's golden cache)
        return y.index_copy(self.dim, self.index, fixed)

    def elementwise_ops(self, output: torch.Tensor) -> int:
        per_channel = output.numel() // output.shape[self.dim]
        rule = CORRECTIONS[self.rule]
        ops = (rule.exact_ops or rule.ops) if self.exact else rule.ops
        return per_channel * len(self.index) * ops + self.bound_ops()

    def extra_repr(self) -> str:
        return f"rule={self.rule}, channels={self.index.tolist()}"


class Restrict(_StoredBounds, nn.Module):
    """Ranger-style range restriction: values outside the per-channel
    [low, high] become 0 (``zero``) or the nearest bound (``clamp``); NaN
    becomes 0 in both modes (a NaN carries no value to clamp). With margin 0 a
    calibration input's extreme value sits exactly on a bound, where another
    backend's rounding (e.g. ONNX Runtime) can tip it out: use a margin > 0.

    The bounds are memory a fault can hit (``fault_buffers``), attacked by
    default. The checks are written as "out of range if ``y < low`` or
    ``y > high``", so a NaN bound bounds nothing on its side: one fault in a
    bound then costs the channel its protection, not its values (the naive
    ``low <= y <= high`` test would zero, and clamping with ``minimum`` would
    turn to NaN, the whole channel for every input). NaN bounds are one flip
    away: a mantissa flip of an unprofiled -inf/+inf bound (still a valid
    float pattern), or bit 30 of a bound whose magnitude lies in [1, 2). A
    sign flip, or an exponent flip that shrinks a bound, still cuts the
    channel (zeroed, or clamped to that bound, for every input on the wrong
    side). Measured on LeNet-5/mnist5k at BER 1e-4, paired (the same 200
    draws with and without their faults in bounds; 72-82% of the trials
    had one): the bounds cost -0.005 points [-0.015, +0.005] with
    restriction alone and -0.10 [-0.22, +0.02] with range 10% + restriction
    (worst trial -9.4). With ``bound_copies`` 2 or 3 (``_StoredBounds``) one
    flip no longer cuts a channel: :func:`fail_safe_bound`."""

    fault_buffers: tuple[str, ...] = ("low", "high", "low_copies", "high_copies")

    def __init__(self, mode: str, bound_shape: tuple[int, ...], bound_copies: int = 1) -> None:
        super().__init__()
        self.mode = mode
        self._register_bound("low", torch.full(bound_shape, -math.inf), bound_copies)
        self._register_bound("high", torch.full(bound_shape, math.inf), bound_copies)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        # float passes only (see ``within``): 5 (zero) or 3 (clamp) instead of
        # 7 with bool masks and torch.where; measured on LeNet-5's first conv
        # output at batch 128, 1 thread: 1.3-1.7 ms instead of 8.4-9.4 ms
        if exporting():
            return check_values(y, self.bound("low"), self.bound("high"), self.mode)
        bufs = self._buffers
        if self.bound_copies == 2:  # the result has y's values in y's shape (less a leading 1 of the bounds)
            return check_two(y, bufs["low"], bufs["low_copies"], bufs["high"], bufs["high_copies"],
                             self.mode).view(y.shape)
        return check_opened(y, self.open_bound("low"), self.open_bound("high"), self.mode)

    def elementwise_ops(self, output: torch.Tensor) -> int:
        return output.numel() * RESTRICT_OPS + self.bound_ops()

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


class _ProtectedLayer(_StoredBounds):
    """What :class:`ProtectedConv2d` / :class:`ProtectedLinear` add to their layer type.

    - ``check`` (parameter-side check): per output channel [min, max] of the
      weights (``weight_low``/``weight_high``) and per-layer [min, max] of the
      bias (``bias_low``/``bias_high``), profiled once from the fault-free
      values (:meth:`profile_bounds`, no data). Every forward passes weight
      and bias through :func:`check_values` before any MAC uses them, so a
      flipped exponent bit never reaches the MACs. Fault-free every stored
      value lies within its bounds and comes back bit for bit. The bounds
      are attacked memory (``fault_buffers``). Per-layer bias bounds: a
      per-channel one would be the bias itself, zeroing it for a harmless
      mantissa flip. ``bound_copies`` copies of each (``_StoredBounds``).
    - ``parts`` > 1: the layer holds ``parts`` stacked copies of one layer
      (output channels copy-major) and computes each by a call of that
      layer's own shape, whose result is bit-identical to the original's
      (measured: every conv/linear of LeNet-5, VGG-11 w0.25 and ResNet-20,
      batch 128), unlike one wider call.

    Stays a Conv2d/Linear, so ``faults.fault_targets`` lists its ``weight``
    and ``bias`` under the same names, plus the bounds.
    """

    fault_buffers: tuple[str, ...] = ("weight_low", "weight_high", "bias_low", "bias_high",
                                      "weight_low_copies", "weight_high_copies", "bias_low_copies",
                                      "bias_high_copies")

    def _setup(self, check: str | None, parts: int, bound_copies: int = 1) -> None:
        self.check, self.parts = check, int(parts)
        w = self.weight
        for name in self.fault_buffers:
            self.register_buffer(name, None)
        if check is not None:
            shape = (w.shape[0],) + (1,) * (w.dim() - 1)
            self._register_bound("weight_low", torch.full(shape, -math.inf, dtype=w.dtype, device=w.device),
                                 bound_copies)
            self._register_bound("weight_high", torch.full(shape, math.inf, dtype=w.dtype, device=w.device),
                                 bound_copies)
            if self.bias is not None:
                self._register_bound("bias_low", torch.full((1,), -math.inf, dtype=w.dtype, device=w.device),
                                     bound_copies)
                self._register_bound("bias_high", torch.full((1,), math.inf, dtype=w.dtype, device=w.device),
                                     bound_copies)

    @torch.no_grad()
    def profile_bounds(self) -> None:
        """Set the check's bounds (every stored copy) to the min/max of the current
        (fault-free) values, widened by ``BOUND_SLACK`` (:func:`widened`)."""
        if self.check is None:
            return
        flat = self.weight.reshape(self.weight.shape[0], -1)
        self.set_bound("weight_low", widened(flat.amin(dim=1), "low"))
        self.set_bound("weight_high", widened(flat.amax(dim=1), "high"))
        if self.bias is not None:
            self.set_bound("bias_low", widened(self.bias.min(), "low"))
            self.set_bound("bias_high", widened(self.bias.max(), "high"))

    def stored_values(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias as read from memory (a coded layer decodes them: ``ftcnn.protection.codes``)."""
        return self.weight, self.bias

    def checked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias as the MACs use them: ``check_values`` of each against its bounds
        (eager: ``check_two`` with the default two copies, else ``open_bound`` + ``check_opened``;
        in an ONNX export the ONNX-friendly ops of ``check_values``)."""
        w, b = self.stored_values()
        mode = self.check
        if mode is None:
            return w, b
        if exporting():
            w = check_values(w, self.bound("weight_low"), self.bound("weight_high"), mode)
            if b is not None:
                b = check_values(b, self.bound("bias_low"), self.bound("bias_high"), mode)
            return w, b
        bufs, params = self._buffers, self._parameters
        if self.bound_copies == 2:
            w = check_two(w, bufs["weight_low"], bufs["weight_low_copies"], bufs["weight_high"],
                          bufs["weight_high_copies"], mode, params["weight"].numel() <= SMALL_CHECK)[0]
            if b is not None:
                b = check_two(b, bufs["bias_low"], bufs["bias_low_copies"], bufs["bias_high"],
                              bufs["bias_high_copies"], mode, params["bias"].numel() <= SMALL_CHECK)[0]
            return w, b
        w = check_opened(w, self.open_bound("weight_low"), self.open_bound("weight_high"), mode)
        if b is not None:
            b = check_opened(b, self.open_bound("bias_low"), self.open_bound("bias_high"), mode)
        return w, b

    def weight_checks(self) -> int:
        """Values checked per forward (0 without a check)."""
        if self.check is None:
            return 0
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)

    def elementwise_ops(self, output: Any) -> int:
        return self.weight_checks() * CHECK_OPS + self.bound_ops()

    def _call(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Any:
        w, b = self.checked()
        if self.parts == 1:
            return self._call(x, w, b)
        n = w.shape[0] // self.parts
        return tuple(self._call(x, w[i * n:(i + 1) * n], None if b is None else b[i * n:(i + 1) * n])
                     for i in range(self.parts))


class ProtectedConv2d(_ProtectedLayer, nn.Conv2d):
    """A Conv2d with a parameter-side check and/or same-shape copies (see ``_ProtectedLayer``)."""

    def _call(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, w, b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, check={self.check}, parts={self.parts}"


class ProtectedLinear(_ProtectedLayer, nn.Linear):
    """A Linear with a parameter-side check and/or same-shape copies (see ``_ProtectedLayer``)."""

    def _call(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return nn.functional.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, check={self.check}, parts={self.parts}"


# --- coded layers ---------------------------------------------------------------------

class _Coded:
    """What :class:`CodedConv2d` / :class:`CodedLinear` add to a ``Protected*`` layer: the
    code words of ``weight`` and ``bias`` as int32 buffers declared raw stored words
    (``fault_words``), and the decode at every forward (``stored_values``), before the
    weight check if there is one."""

    fault_words: tuple[str, ...] = ("weight_code", "bias_code")
    code: str

    def _setup_code(self, name: str) -> None:
        self.code = name
        scheme = codes.CODES[name]
        # sizes as plain ints: the decode then runs no size query (traceable, see above)
        self.code_sizes = tuple(0 if p is None else p.numel() for p in (self.weight, self.bias))
        for pname in ("weight", "bias"):
            p = getattr(self, pname)
            words = None if p is None else torch.zeros(scheme.words(p.numel()), dtype=torch.int32, device=p.device)
            self.register_buffer(f"{pname}_code", words)

    @torch.no_grad()
    def encode(self) -> None:
        """Code words of the current (fault-free) ``weight`` and ``bias``."""
        scheme = codes.CODES[self.code]
        for pname in ("weight", "bias"):
            p = getattr(self, pname)
            if p is not None and p.device.type != "meta":
                getattr(self, f"{pname}_code").copy_(scheme.encode(p.detach()))

    def stored_values(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        scheme = codes.CODES[self.code]
        w = scheme.decode(self.weight, self.weight_code, self.code_sizes[0])
        b = None if self.bias is None else scheme.decode(self.bias, self.bias_code, self.code_sizes[1])
        return w, b

    def code_ops(self) -> int:
        """Integer passes of one decode of every value, per forward (shared by the batch)."""
        values = self.weight.numel() + (0 if self.bias is None else self.bias.numel())
        return values * codes.CODES[self.code].ops_per_value

    def elementwise_ops(self, output: Any) -> int:
        return super().elementwise_ops(output) + self.code_ops()  # type: ignore[misc]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, code={self.code}"  # type: ignore[misc]


class CodedConv2d(_Coded, ProtectedConv2d):
    """A Conv2d whose weight and bias are decoded from their stored code at every forward."""


class CodedLinear(_Coded, ProtectedLinear):
    """A Linear whose weight and bias are decoded from their stored code at every forward."""


def coded_layer(layer: nn.Module, name: str) -> nn.Module:
    """``layer`` (a Conv2d/Linear, plain or ``Protected*``) as a coded layer taking over its
    parameters, bounds and copies layout, with the code words of its current values (left
    as zeros on the ``meta`` device, where ``checkpoint.load`` fills them)."""
    codes.code(name)
    if isinstance(layer, _Coded):
        raise ValueError("layer is already coded")
    if isinstance(layer, nn.Conv2d):
        new: Any = CodedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                               padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                               bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta")
    elif isinstance(layer, nn.Linear):
        new = CodedLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    else:
        raise ValueError(f"cannot code a {type(layer).__name__}")
    new.weight, new.bias = layer.weight, layer.bias
    new._setup(getattr(layer, "check", None), getattr(layer, "parts", 1), getattr(layer, "bound_copies", 1))
    for bname in _ProtectedLayer.fault_buffers:  # the check's bounds, as the layer holds them
        if layer._buffers.get(bname) is not None:
            new._buffers[bname] = layer._buffers[bname]
    new._setup_code(name)
    new.encode()
    new.train(layer.training)
    return new


def code_hardened(wrapper: nn.Module, name: str) -> None:
    """Code the original and the copies of a ``hardening.Hardened`` wrapper, in place."""
    wrapper.original = coded_layer(wrapper.original, name)
    if wrapper.copies is not None:
        wrapper.copies = coded_layer(wrapper.copies, name)


def is_coded(model: nn.Module) -> bool:
    """Whether any layer of ``model`` stores code words."""
    return any(isinstance(m, _Coded) for m in model.modules())


def _protected_layer(layer: nn.Module, check: str | None, parts: int = 1, out: int | None = None,
                     take_over: bool = True, bound_copies: int = 1) -> nn.Module:
    """A ``Protected*`` version of ``layer`` (``out`` output channels, default its own)
    taking over its parameters (``take_over`` and ``out`` unchanged), else with
    placeholders; ``layer`` itself when nothing is added and it takes over."""
    w = layer.weight
    same = (out is None or out == w.shape[0]) and take_over
    out = w.shape[0] if out is None else out
    plain = check is None and parts == 1
    if isinstance(layer, nn.Conv2d):
        cls = nn.Conv2d if plain else ProtectedConv2d
        new = cls(layer.in_channels, out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                  dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
                  padding_mode=layer.padding_mode, device="meta")
    elif isinstance(layer, nn.Linear):
        cls = nn.Linear if plain else ProtectedLinear
        new = cls(layer.in_features, out, bias=layer.bias is not None, device="meta")
    else:  # pragma: no cover - guarded by the callers
        raise ValueError(f"cannot protect a {type(layer).__name__}")
    if plain and same:
        return layer
    if same:
        new.weight, new.bias = layer.weight, layer.bias
    else:
        new.weight = nn.Parameter(torch.empty((out, *w.shape[1:]), dtype=w.dtype, device=w.device))
        if layer.bias is not None:
            new.bias = nn.Parameter(torch.empty(out, dtype=w.dtype, device=w.device))
    if not plain:
        new._setup(check, parts, bound_copies)
    new.train(layer.training)
    return new


class Hardened(nn.Module):
    """A protected Conv2d/Linear: ``original`` untouched, ``copies`` of some of
    its channels computed by a second module of the same type on the same
    input, merged by ``correction``, then optionally ``restrict``-ed.
    Declared a protection module with no attackable values: its ``gather``
    buffer (int64 input-channel indices) is listed as unattacked memory."""

    fault_buffers: tuple[str, ...] = ()

    def __init__(self, original: nn.Module, copies: nn.Module | None = None,
                 correction: Correction | None = None, gather: torch.Tensor | None = None,
                 restrict: Restrict | None = None) -> None:
        super().__init__()
        self.original = original
        self.copies = copies
        self.correction = correction
        if gather is not None:
            self.register_buffer("gather", gather.long())
        else:
            self.gather = None
        self.restrict = restrict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.original(x)
        if self.copies is not None:
            xc = x if self.gather is None else x.index_select(1, self.gather)
            copies = self.copies(xc)
            parts = getattr(self.copies, "parts", 1)
            if parts > 1:  # a tuple of same-shape calls; indexed, so torch.fx sees its items
                copies = tuple(copies[i] for i in range(parts))
            y = self.correction(y, copies)
        if self.restrict is not None:
            y = self.restrict(y)
        return y


def _copies_module(layer: nn.Module, index: torch.Tensor, n: int, check: str | None = None,
                   bound_copies: int = 1) -> tuple[nn.Module, torch.Tensor | None]:
    """A new Conv2d/Linear computing ``n`` copies of ``layer``'s channels ``index``
    (copy-major order), and the input-channel gather a grouped conv needs.

    When ``index`` is every channel, the module holds ``n`` stacked copies of
    the layer and computes each by a call of the layer's own shape
    (``parts=n``, any groups, no gather): bit-identical to the original
    without faults, so the correction needs no tolerance and no index."""
    rep = index.repeat(n)
    has_bias = layer.bias is not None
    if len(index) == _out_channels(layer) and (isinstance(layer, nn.Linear) or layer.padding_mode == "zeros"):
        mod = _protected_layer(layer, check, parts=n, out=len(rep), take_over=False,
                               bound_copies=bound_copies)
        with torch.no_grad():
            mod.weight.copy_(layer.weight[rep])
            if has_bias:
                mod.bias.copy_(layer.bias[rep])
        return mod, None
    if isinstance(layer, nn.Linear):
        mod = nn.Linear(layer.in_features, len(rep), bias=has_bias)
        gather = None
    elif isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise ValueError(f"padding_mode {layer.padding_mode!r} is not supported for hardening")
        groups = layer.groups
        if groups == 1:
            in_ch, mod_groups, gather = layer.in_channels, 1, None
        else:
            # each copied filter becomes its own group, fed the input channels of its original group
            per_in, per_out = layer.in_channels // groups, layer.out_channels // groups
            group = rep // per_out
            gather = (group[:, None] * per_in + torch.arange(per_in)[None, :]).reshape(-1)
            in_ch, mod_groups = len(gather), len(rep)
        mod = nn.Conv2d(in_ch, len(rep), layer.kernel_size, stride=layer.stride, padding=layer.padding,
                        dilation=layer.dilation, groups=mod_groups, bias=has_bias)
    else:  # pragma: no cover - guarded by the callers
        raise ValueError(f"cannot duplicate a {type(layer).__name__}")
    with torch.no_grad():
        mod.weight.copy_(layer.weight[rep])
        if has_bias:
            mod.bias.copy_(layer.bias[rep])
    mod = mod.to(layer.weight.device, layer.weight.dtype)
    return (mod if check is None else _protected_layer(mod, check, bound_copies=bound_copies)), gather


def _out_channels(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def _wrap(layer: nn.Module, index: Sequence[int], correction: str | None, restrict: str | None,
          check: str | None = None, bound_copies: int = 1) -> Hardened:
    """The Hardened wrapper's structure (values are copies or placeholders); every bound
    stored ``bound_copies`` times (``fail_safe_bound``)."""
    copies = corr = gather = None
    c = _out_channels(layer)
    if index:
        idx = torch.as_tensor(sorted(index), dtype=torch.long)
        copies, gather = _copies_module(layer, idx, CORRECTIONS[correction].copies, check, bound_copies)
        # every channel copied: the copies come from calls of the layer's own shape (_copies_module)
        corr = Correction(correction, idx, _channel_dim(layer), _bound_shape(layer, len(idx)),
                          exact=len(idx) == c, bound_copies=bound_copies)
    rst = Restrict(restrict, _bound_shape(layer, c), bound_copies) if restrict else None
    device = layer.weight.device
    original = _protected_layer(layer, check, bound_copies=bound_copies) if check is not None else layer
    return Hardened(original, copies, corr, gather, rst).to(device)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# --- choosing channels ------------------------------------------------------------

def target_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d/Linear by module name (the model map's ``graph.layers``): the layers
    hardening can protect."""
    return {layer.name: layer.module for layer in graph.layers(model) if layer.name}


def aligned_names(model: nn.Module) -> nn.Module:
    """A copy of ``model`` computing the same thing with every Conv2d/Linear ``X`` moved to
    ``X.original`` (a :class:`Hardened` wrapper with nothing added: ``forward`` is the layer's).
    Why: activation fault draws are keyed by layer name, and every protected model holds its layers
    there, so the unprotected model then draws the very faults they draw (common random numbers:
    ``protect`` under activation faults, ``experiments/datapath.py``)."""
    out = copy.deepcopy(model)
    for name, layer in target_layers(out).items():
        parent, _, child = name.rpartition(".")
        if not child:
            raise ValueError("a model that is itself one Conv2d/Linear cannot be aligned")
        setattr(out.get_submodule(parent) if parent else out, child, Hardened(layer))
    return out.eval()


def check_scores(layers: Mapping[str, nn.Module], scores: Mapping[str, Sequence[float]]
                 ) -> dict[str, np.ndarray]:
    """Scores as arrays, one per layer, checked against the model.

    Takes the layer map or the whole result of ``vulnerability.analyze`` (its
    ``"layers"``), so ``harden(model, analyze(model, x, y))`` composes.
    """
    scores = layer_scores(scores)
    unknown = [n for n in scores if n not in layers]
    if unknown:
        raise ValueError(f"scores name unknown layer {unknown[0]!r}; the model's Conv2d/Linear "
                         f"layers are: {', '.join(layers)}")
    out = {}
    for name, layer in layers.items():
        if name not in scores:
            raise ValueError(f"no scores for layer {name!r}")
        s = np.asarray(scores[name], dtype=np.float64).reshape(-1)
        if len(s) != _out_channels(layer):
            raise ValueError(f"layer {name!r} has {_out_channels(layer)} output channels but "
                             f"{len(s)} scores")
        out[name] = finite_scores(name, s)  # prune's rule: NaN and Inf refused (Infinity in a JSON file)
    return out


def _ranked(s: np.ndarray) -> np.ndarray:
    """Channel indices by descending score, ties by lower index."""
    return np.argsort(-s, kind="stable")


def select_by_ratio(scores: Mapping[str, np.ndarray], ratio: float) -> dict[str, list[int]]:
    """Top ``ceil(ratio * channels)`` channels of each layer (so any ratio > 0
    protects at least one channel per layer; ratio 0 protects nothing)."""
    out = {}
    for name, s in scores.items():
        k = min(len(s), math.ceil(ratio * len(s) - 1e-9))
        if k > 0:
            out[name] = sorted(int(i) for i in _ranked(s)[:k])
    return out


def channel_macs(model: nn.Module, layers: Mapping[str, nn.Module], input_shape: Sequence[int]
                 ) -> dict[str, int]:
    """MACs of one output channel of each layer for one input (a copy costs that)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        outputs = graph.first_outputs(model, list(layers),
                                      lambda: _eval_forward(model, torch.zeros((1, *input_shape), device=device)))
    positions = {n: outputs[n][:1].numel() // _out_channels(m) for n, m in layers.items()}
    return {n: positions[n] * (m.weight[0].numel()) for n, m in layers.items()}


def select_by_budget(scores: Mapping[str, np.ndarray], cost: Mapping[str, float],
                     allowed: float) -> dict[str, list[int]]:
    """Fill ``allowed`` extra MACs greedily by score per extra MAC, ``cost[layer]``
    being what protecting one channel of that layer adds; a channel that does
    not fit is skipped, cheaper ones may still fit."""
    items = [(float(s[i]) / cost[n], n, int(i)) for n, s in scores.items() for i in range(len(s))]
    items.sort(key=lambda t: -t[0])  # stable: ties keep layer order, then channel order
    spent, out = 0.0, {}
    for _, name, i in items:
        if spent + cost[name] <= allowed:
            spent += cost[name]
            out.setdefault(name, []).append(i)
    return {n: sorted(v) for n, v in out.items()}


def _total_macs(model: nn.Module, layers: Mapping[str, nn.Module], transform: Mapping[str, Any],
                input_shape: Sequence[int], batch: int) -> float:
    """``cost.macs_at_batch`` of ``model`` hardened by ``transform`` (structure only: no
    values are profiled, op counts do not depend on them): what the reported cost counts."""
    net = copy.deepcopy(model)
    _apply(net, transform)
    return cost_mod.macs_at_batch(net, tuple(input_shape), batch)


def select_within_total(model: nn.Module, layers: Mapping[str, nn.Module], scores: Mapping[str, np.ndarray],
                        max_macs: float, transform: Mapping[str, Any], input_shape: Sequence[int],
                        batch: int = cost_mod.DEFAULT_BATCH) -> dict[str, list[int]]:
    """Channels to duplicate so that the hardened model's MACs per input at the
    deployment ``batch`` (``cost.macs_at_batch``: copies, their corrections, range
    restriction, and weight checks shared by the batch) stay within ``max_macs`` x
    the model's (issue 21: one price, a ratio; ``max_macs=1.2`` means +20%, all in).

    The fixed part (restriction, checks of the originals) is measured first; the
    rest is filled greedily by score per extra MAC of one channel (its copies,
    the correction's element-wise ops on its outputs, the copies' checks shared by
    the batch); the result is measured again and trimmed, lowest score per MAC
    first, until it fits."""
    base = cost_mod.macs_at_batch(model, tuple(input_shape), batch)
    allowed = (max_macs - 1.0) * base
    rule = CORRECTIONS[transform["correction"]]
    fixed_layers = {n: [] for n in layers} if transform["restrict"] or transform["check_weights"] \
        or transform.get("code") else {}
    fixed = _total_macs(model, layers, {**transform, "layers": fixed_layers}, input_shape, batch) - base
    if fixed > allowed + 1e-9 * base:
        raise ValueError(f"max MACs x{max_macs:g} (batch {batch}) is below what restriction/weight checks alone "
                         f"cost (x{1 + fixed / base:.3f}): raise it or drop them")
    per_copy = channel_macs(model, layers, input_shape)
    checks = CHECK_OPS / batch if transform["check_weights"] else 0
    cost = {n: rule.copies * (per_copy[n] + checks * layers[n].weight[0].numel())
            + rule.ops * per_copy[n] // layers[n].weight[0].numel() for n in layers}
    selected = select_by_budget(scores, cost, allowed - fixed)
    order = sorted(((float(scores[n][i]) / cost[n], n, i) for n, v in selected.items() for i in v),
                   key=lambda t: t[0])
    while selected:
        chosen = {n: selected.get(n, []) for n in layers if selected.get(n) or n in fixed_layers}
        if _total_macs(model, layers, {**transform, "layers": chosen}, input_shape, batch) - base <= allowed:
            break
        _, name, i = order.pop(0)
        selected[name].remove(i)
        if not selected[name]:
            del selected[name]
    return selected


# --- profiling --------------------------------------------------------------------

def _eval_forward(model: nn.Module, x: torch.Tensor) -> Any:
    was = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was)


def _check_calibration_fits(model: nn.Module, calibration: torch.Tensor) -> None:
    """Inject's one-line shape check (a 28x28 model given 8x8 digits), run in eval mode so
    that it changes no BatchNorm statistic and draws no dropout mask."""
    was = model.training
    model.eval()
    try:
        trials.check_input_shape(model, calibration[:1])
    finally:
        model.train(was)


@torch.inference_mode()
def profile_ranges(model: nn.Module, calibration: torch.Tensor, layers: Sequence[str] | None = None
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-output-channel (min, max) of each Conv2d/Linear over ``calibration``."""
    mods = target_layers(model)
    names = list(mods) if layers is None else list(layers)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str) -> Callable[..., None]:
        dim = _channel_dim(mods[name])

        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            flat = output.movedim(dim, 0).reshape(output.shape[dim], -1)
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)
            if name in stats:
                lo, hi = torch.minimum(stats[name][0], lo), torch.maximum(stats[name][1], hi)
            stats[name] = (lo, hi)
        return record

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        for i in range(0, len(calibration), PROFILE_BATCH):
            _eval_forward(model, calibration[i:i + PROFILE_BATCH])
    finally:
        for h in handles:
            h.remove()
    return stats


def _widen(lo: torch.Tensor, hi: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    width = hi - lo
    return lo - margin * width, hi + margin * width


# --- the API ----------------------------------------------------------------------

def _input_shape(model: nn.Module, calibration: torch.Tensor | None,
                 input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(input_shape)
    if calibration is not None:
        return tuple(calibration.shape[1:])
    spec = getattr(model, checkpoint.SPEC_ATTR, None)
    kw = (spec or {}).get("kwargs", {})
    if "in_channels" in kw and "input_size" in kw:
        return (kw["in_channels"], kw["input_size"], kw["input_size"])
    raise ValueError("a MAC budget needs the input shape: give calibration inputs or input_shape")


def restriction_layers(model: nn.Module, share: float, input_shape: Sequence[int]) -> list[str]:
    """The layers to range-restrict for a share of the protection at a fraction of its cost:
    fewest output values per parameter first (restriction costs per output value, while the
    faults it catches arrive in proportion to the parameters), until the chosen layers hold at
    least ``share`` of the Conv2d/Linear parameters. In CNNs the early layers have large outputs
    and few parameters: on ResNet-20, 0.9 leaves out the 7 layers of the first stage, which hold
    6% of the parameters and 61% of the restricted values.

    Example:
        >>> import ftcnn
        >>> net = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=28)
        >>> restriction_layers(net, 0.9, (1, 28, 28))  # LeNet-5's two large Linear layers
        ['classifier.0', 'classifier.2']
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"restriction share {share} outside (0, 1]")
    layers = target_layers(model)
    x = torch.zeros((1, *input_shape), device=next(model.parameters()).device)
    with torch.no_grad():
        outs = graph.first_outputs(model, list(layers), lambda: _eval_forward(model, x))
    params = {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in layers.items()}
    order = sorted(layers, key=lambda n: (outs[n].numel() / max(params[n], 1), list(layers).index(n)))
    total, chosen, held = sum(params.values()), [], 0
    for name in order:
        if held >= share * total:
            break
        chosen.append(name)
        held += params[name]
    return [n for n in layers if n in chosen]  # in model order


BUDGET_HINT = "budget was an extra share; give the ratio: max_macs={ratio:g} (at the deployment batch)"


def check_max_macs(max_macs: Any, flag: str = "max_macs") -> None:
    """A MACs budget is a ratio to the model's MACs (1.2 = +20%): one line unless a finite number >= 1."""
    if isinstance(max_macs, bool) or not isinstance(max_macs, (int, float)) or not math.isfinite(max_macs):
        raise ValueError(f"{flag} must be a finite ratio >= 1, e.g. 1.2 for +20% MACs (got {max_macs!r})")
    if max_macs < 1:
        raise ValueError(f"{flag} {max_macs:g} is below 1: it is a ratio to the model's MACs (1.2 = +20%), "
                         "not an extra share")


def _validate(ratio: float, max_macs: float | None, correction: str, tmr: str | None,
              restrict: str | None, margin: float, check_weights: str | None = None) -> None:
    rules.check("harden_ratio", ratio, "ratio")
    if max_macs is not None:
        check_max_macs(max_macs)
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose from {', '.join(CORRECTIONS)}")
    if tmr is not None and tmr not in TMR_MODES:
        raise ValueError(f"unknown tmr mode {tmr!r}; choose from {', '.join(TMR_MODES)} (or none)")
    if restrict is not None and restrict not in RESTRICT_MODES:
        raise ValueError(f"unknown restriction {restrict!r}; choose from {', '.join(RESTRICT_MODES)}")
    rules.check("range_margin", margin, "range_margin")
    if check_weights is not None and check_weights not in CHECK_MODES:
        raise ValueError(f"unknown weight check {check_weights!r}; choose from {', '.join(CHECK_MODES)} (or none)")


def scores_needed(ratio: float, max_macs: float | None, tmr: str | None) -> bool:
    """Whether ``harden`` with these settings duplicates channels, and so needs scores to choose them
    (full TMR takes every channel; ratio 0 or max_macs 1 takes none)."""
    return tmr != "full" and (max_macs is not None and max_macs > 1 or max_macs is None and ratio > 0)


def harden(model: nn.Module, scores: Mapping[str, Sequence[float]] | None = None, *, ratio: float = 0.1,
           max_macs: float | None = None, batch: int = cost_mod.DEFAULT_BATCH, correction: str = "min",
           tmr: str | None = None,
           restrict: str | None = None, range_margin: float = 0.0, calibration: torch.Tensor | None = None,
           input_shape: Sequence[int] | None = None, check_weights: str | None = None,
           restrict_layers: Sequence[str] | None = None, restrict_share: float | None = None,
           margin: float | None = None, bound_copies: int = DEFAULT_BOUND_COPIES,
           fold_bn: bool = False, budget: float | None = None, code: str | None = None) -> nn.Module:
    """A hardened copy of ``model`` (the input is left untouched).

    Args:
        model: any model built of Conv2d/Linear layers.
        scores: what ``ftcnn.protection.vulnerability.analyze`` returns (``Scores``, or its
            dict, e.g. ``load_scores(p)``) or a plain module name -> one score per
            output channel, for every Conv2d/Linear. Not needed for
            ``tmr="full"`` or when nothing is duplicated.
        ratio: share of each layer's channels to duplicate, the top
            ``ceil(ratio * channels)`` by score (0: none).
        max_macs: instead of ``ratio``, the MACs per input allowed, as a ratio to the
            model's, at the deployment ``batch`` (copies, corrections, restriction and
            weight checks all in, counted by ``cost.macs_at_batch``): 1.2 = at most +20%.
            Filled greedily by score per extra MAC. (The old ``budget=0.2``, an extra
            share, is refused with this hint.)
        batch: the deployment batch ``max_macs`` applies at (work done once per
            forward, such as weight checks, is shared by it). Recorded with ``max_macs``.
        correction: ``min`` (the paper's), ``range`` (needs ``calibration``) or
            ``tmr`` (two copies, majority vote).
        tmr: ``"full"``: every channel of every layer gets two copies and the
            vote (full TMR baseline; ``scores``, ``ratio``, ``max_macs`` and
            ``correction`` are ignored).
        restrict: ``zero`` or ``clamp``: every Conv2d/Linear output channel is
            checked against its range profiled on ``calibration``, after the
            correction; NaN becomes 0 in both modes.
        range_margin: widen every profiled range by this share of its width (used by
            ``restrict`` and by the ``range`` correction).
        calibration: inputs to profile ranges on (training data).
        input_shape: (C, H, W) for ``max_macs``; default: from ``calibration``
            or the model's checkpoint spec.
        check_weights: ``zero`` or ``clamp``: parameter-side checks on every
            Conv2d/Linear (copies included): each weight outside its output
            channel's fault-free [min, max], and each bias outside the layer's,
            is zeroed (or clamped) at use, before any MAC (NaN: 0). The bounds
            come from the weights (no data) and are attacked like them.
        restrict_layers: restrict only these layers' outputs (default: every one).
        restrict_share: instead, the layers :func:`restriction_layers` picks to
            hold this share of the parameters at the fewest restricted values
            (e.g. 0.9; the chosen names are recorded).
        bound_copies: how many copies of every bound (restriction, correction
            range, weight check) to store, all attacked: 1 (one flip can cut a
            channel), 2 (the looser is used: a flip can only loosen) or 3 (the
            median: a flip is outvoted). See :func:`fail_safe_bound`.
        code: a stored-word code on every Conv2d/Linear (copies included), its words
            attacked like the weights, decoded at every forward before any check:
            ``secded``, ``parity``, ``parity_exponent`` or ``tmr3`` (``ftcnn.protection.codes.CODES``).
        fold_bn: first fold every BatchNorm that follows a conv into it
            (``ftcnn.protection.fold.fold_batchnorm``; the model must be in eval mode): the
            deployed form, whose memory is all weights and biases, protected and
            attacked like them. Scores must then name the folded model's layers
            (the same names: folding keeps them).

    Returns:
        The hardened model; with no fault its outputs equal the original's bit
        for bit. Its checkpoint spec (if the model has one) records a
        ``{"kind": "harden"}`` transform, so ``ftcnn.save``/``ftcnn.load`` work.

    Example (without faults the hardened model computes exactly what the original does):
        >>> import torch, ftcnn
        >>> model = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8).eval()
        >>> x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        >>> hard = harden(model, ftcnn.analyze(model, x, y, samples=16), ratio=0.1, correction="min")
        >>> torch.equal(hard(x), model(x))
        True
    """
    if margin is not None:  # the old name, for one release
        warnings.warn("harden(margin=...) is deprecated; use range_margin=...", DeprecationWarning, stacklevel=2)
        range_margin = margin
    if budget is not None:  # the old convention (issue 21): refused before any work, with the new spelling
        raise ValueError(BUDGET_HINT.format(ratio=1 + budget if isinstance(budget, (int, float)) else 1.2))
    cost_mod.check_batch(batch)
    _validate(ratio, max_macs, correction, tmr, restrict, range_margin, check_weights)
    if type(bound_copies) is not int or bound_copies not in BOUND_COPIES:
        raise ValueError(f"bound_copies {bound_copies!r} must be one of {', '.join(map(str, BOUND_COPIES))}")
    if code is not None:
        codes.code(code)
    if any(isinstance(m, Hardened) for m in model.modules()):
        raise ValueError("model is already hardened")
    if fold_bn:  # the deployed form: recorded in the checkpoint spec as a fold_bn transform
        model = fold.fold_batchnorm(model)
    layers = target_layers(model)
    if not layers:
        raise ValueError("model has no Conv2d/Linear layers to harden")
    if calibration is not None:  # before any profile or MAC count runs the model on it
        _check_calibration_fits(model, calibration)
    if restrict_share is not None:
        if restrict_layers is not None:
            raise ValueError("give restrict_layers or restrict_share, not both")
        restrict_layers = restriction_layers(model, restrict_share, _input_shape(model, calibration, input_shape))
    if restrict_layers is not None:
        if restrict is None:
            raise ValueError("restrict_layers/restrict_share need a restriction mode (restrict='zero' or 'clamp')")
        unknown = [n for n in restrict_layers if n not in layers]
        if unknown:
            raise ValueError(f"restrict_layers names unknown layer {unknown[0]!r}; the model's Conv2d/Linear "
                             f"layers are: {', '.join(layers)}")
        restrict_layers = [n for n in layers if n in set(restrict_layers)]
    restricted = set(layers if restrict_layers is None else restrict_layers) if restrict else set()
    if tmr == "full":
        correction = "tmr"
        selected = {n: list(range(_out_channels(m))) for n, m in layers.items()}
    else:
        needs_scores = scores_needed(ratio, max_macs, tmr)
        if scores is None and needs_scores:
            raise ValueError("scores are needed to choose the channels to protect "
                             "(or use tmr='full', or ratio=0)")
        checked = check_scores(layers, scores) if scores is not None else {}
        if not needs_scores:
            selected = {}
        elif max_macs is not None:
            selected = select_within_total(
                model, layers, checked, max_macs,
                {"correction": correction, "restrict": restrict, "check_weights": check_weights,
                 "restrict_layers": restrict_layers, "bound_copies": bound_copies, "code": code},
                _input_shape(model, calibration, input_shape), batch)
        else:
            selected = select_by_ratio(checked, ratio)
    needs_ranges = restrict is not None or (bool(selected) and CORRECTIONS[correction].needs_ranges)
    if needs_ranges and calibration is None:
        raise ValueError("range restriction and the 'range' correction need calibration inputs")
    ranges = profile_ranges(model, calibration) if needs_ranges else {}

    transform = {
        "kind": "harden", "correction": correction, "tmr": tmr, "restrict": restrict,
        # "budget" (the old extra share) stays null: older checkpoints hold a number there, a record
        "margin": range_margin, "ratio": ratio, "budget": None, "check_weights": check_weights,
        "layers": {n: selected.get(n, []) for n in layers
                   if selected.get(n) or n in restricted or check_weights or code},
    }
    if code is not None:  # recorded only when given: older files and digests stay as they were
        transform["code"] = code
    if restrict_layers is not None:  # recorded only when given: older files and digests stay as they were
        transform["restrict_layers"] = list(restrict_layers)
    if bound_copies != 1:  # absent in older files: one stored copy, the layout they were saved with
        transform["bound_copies"] = bound_copies
    if max_macs is not None:  # recorded only when given (older files and digests stay as they were)
        transform["max_macs"], transform["batch"] = max_macs, batch
    hardened = copy.deepcopy(model)
    _apply(hardened, transform)
    with torch.no_grad():
        for name, wrapper in hardened.named_modules():
            if not isinstance(wrapper, Hardened):
                continue
            lo, hi = _widen(*ranges[name], range_margin) if name in ranges else (None, None)
            if wrapper.restrict is not None:
                wrapper.restrict.set_bound("low", lo)
                wrapper.restrict.set_bound("high", hi)
            corr = wrapper.correction
            if corr is not None and corr.low is not None:
                corr.set_bound("low", lo[corr.index])
                corr.set_bound("high", hi[corr.index])
            for layer in (wrapper.original, wrapper.copies):
                if isinstance(layer, _ProtectedLayer):
                    layer.profile_bounds()
    if getattr(model, checkpoint.SPEC_ATTR, None) is not None:
        checkpoint.with_transform(hardened, transform)
    hardened.train(model.training)
    return hardened


def _apply(model: nn.Module, transform: Mapping[str, Any]) -> None:
    """Wrap the layers a transform names, in place (copies hold the current values)."""
    layers = target_layers(model)
    only = transform.get("restrict_layers")
    for name, index in transform["layers"].items():
        if name not in layers:
            raise checkpoint.CheckpointError(f"hardening names unknown layer {name!r}")
        restrict = transform["restrict"] if only is None or name in only else None
        wrapper = _wrap(layers[name], index, transform["correction"], restrict,
                        transform.get("check_weights"), transform.get("bound_copies", 1))
        if transform.get("code") is not None:  # decode first, then any check: ftcnn.protection.codes
            code_hardened(wrapper, transform["code"])
        _set_module(model, name, wrapper)


# the fields of a {"kind": "harden"} transform (a checkpoint naming any other is refused)
TRANSFORM_FIELDS = ("kind", "correction", "tmr", "restrict", "margin", "ratio", "budget", "max_macs", "batch",
                    "layers",
                    "check_weights", "restrict_layers", "bound_copies", "code")


def check_transform(model: nn.Module, transform: Any) -> None:
    """A stored hardening transform, checked against ``model`` before anything is
    built: it comes from a file, so every field gets a one-line ``CheckpointError``."""
    error = checkpoint.CheckpointError
    checkpoint.check_fields(transform, TRANSFORM_FIELDS, "harden transform")

    def choice(key: str, options: Sequence[str], optional: bool) -> None:
        value = transform.get(key)
        if not (value is None and optional or isinstance(value, str) and value in options):
            raise error(f"harden transform: {key} must be one of {', '.join(options)}"
                        f"{' or null' if optional else ''}, got {str(value)[:60]!r}")

    def number(key: str, low: float, high: float, optional: bool) -> None:
        value = transform.get(key)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not (math.isfinite(value) and low <= value <= high):
            raise error(f"harden transform: {key} must be a number in [{low:g}, {high:g}], got {str(value)[:60]!r}")

    choice("correction", tuple(CORRECTIONS), optional=False)
    choice("tmr", TMR_MODES, optional=True)
    choice("restrict", RESTRICT_MODES, optional=True)
    choice("check_weights", CHECK_MODES, optional=True)
    choice("code", tuple(codes.CODES), optional=True)
    number("margin", 0.0, math.inf, optional=True)
    number("ratio", 0.0, 1.0, optional=True)
    number("budget", 0.0, math.inf, optional=True)  # the old extra share: a record of older checkpoints
    number("max_macs", 1.0, math.inf, optional=True)
    batch = transform.get("batch")
    if batch is not None and (type(batch) is not int or not 1 <= batch <= 2**31):
        raise error(f"harden transform: batch must be an integer >= 1 or null, got {str(batch)[:60]!r}")
    copies = transform.get("bound_copies", 1)
    if type(copies) is not int or copies not in BOUND_COPIES:
        raise error(f"harden transform: bound_copies must be one of {', '.join(map(str, BOUND_COPIES))}, "
                    f"got {str(copies)[:60]!r}")
    if any(isinstance(m, Hardened) for m in model.modules()):
        raise error("harden transform on a model that is already hardened")
    chosen = transform.get("layers")
    if not isinstance(chosen, Mapping):
        raise error(f"harden transform: layers must be a JSON object of layer name -> channel indices, "
                    f"not {type(chosen).__name__}")
    layers = target_layers(model)
    only = transform.get("restrict_layers")
    if only is not None and not (isinstance(only, list) and len(only) <= len(layers)
                                 and all(isinstance(n, str) and n in layers for n in only)
                                 and len(set(only)) == len(only)):
        raise error("harden transform: restrict_layers must be a list of distinct names of the model's "
                    "Conv2d/Linear layers, or null")
    for name, index in chosen.items():
        if name not in layers:
            raise error(f"hardening names unknown layer {str(name)[:80]!r}")
        channels = _out_channels(layers[name])
        if not isinstance(index, list) or not all(type(i) is int and 0 <= i < channels for i in index):
            raise error(f"harden transform: channels of layer {name!r} must be a list of indices "
                        f"in [0, {channels})")
        if len(set(index)) != len(index):
            raise error(f"harden transform: channels of layer {name!r} repeat an index")


def rebuild(model: nn.Module, transform: Mapping[str, Any]) -> nn.Module:
    """Recreate a hardened structure on a fresh model (for ``checkpoint.load``,
    which runs it on the ``meta`` device first); the transform is checked first,
    and the values, ranges included, then come from the state dict."""
    check_transform(model, transform)
    _apply(model, transform)
    return model


def check_loaded(model: nn.Module, transform: Mapping[str, Any]) -> None:
    """After ``checkpoint.load`` filled the values: the integer buffers that steer the
    forward pass (protected channel indices, grouped-conv gathers) are the ones the
    transform describes, so a tampered file cannot make inference index out of range."""
    for name in transform["layers"]:
        wrapper = model.get_submodule(name)
        if wrapper.correction is not None and \
                wrapper.correction.index.tolist() != sorted(transform["layers"][name]):
            raise checkpoint.CheckpointError(f"protected channel indices of {name!r} differ from its hardening")
        if wrapper.gather is not None and wrapper.gather.numel() and not (
                0 <= int(wrapper.gather.min()) and int(wrapper.gather.max()) < wrapper.original.in_channels):
            raise checkpoint.CheckpointError(f"input gather of {name!r} is out of range")


checkpoint.register_transform("harden", rebuild, check_loaded)


def protected(model: nn.Module) -> dict[str, list[int]]:
    """Protected channels per (original) layer name of a hardened model."""
    return {n: m.correction.index.tolist() for n, m in model.named_modules()
            if isinstance(m, Hardened) and m.correction is not None}


def duplicated_parameters(model: nn.Module) -> int:
    """Number of parameters held by copy modules (the extra memory faults can hit)."""
    return sum(p.numel() for m in model.modules() if isinstance(m, Hardened) and m.copies is not None
               for p in m.copies.parameters())


def overheads(original: nn.Module, hardened: nn.Module, input_shape: Sequence[int],
              batch: int = cost_mod.DEFAULT_BATCH) -> dict[str, Any]:
    """Measured cost of both models, the hardened one's relative to the original, and
    ``cost``: the one price (``cost.price``) at the deployment ``batch`` that ``protect``
    records for the same protection. Latency: ``cost.stable_latency`` (interleaved
    rounds until two timings of the same model agree) at batch 1 and ``batch``."""
    shape = tuple(input_shape)
    nets = {"original": original, "hardened": hardened}
    timings = {b: cost_mod.stable_latency(nets, shape, b) for b in dict.fromkeys((1, batch))}
    out: dict[str, Any] = {}
    for name, net in nets.items():
        out[name] = {"params": cost_mod.parameters(net), "protection_values": cost_mod.protection_values(net),
                     "index_values": cost_mod.index_values(net), **cost_mod.macs(net, shape)}
        for b, timing in timings.items():
            out[name][f"latency_b{b}_ms"] = timing["ms"][name]
            out[name][f"latency_b{b}_ms_iqr"] = timing["iqr"][name]
    out["relative"] = cost_mod.relative(out["hardened"], out["original"])
    out["cost"] = cost_mod.price(hardened, original, shape, batch, timings, name="hardened",
                                 reference_name="original")
    return out


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: Sequence[int],
                opset: int = 17) -> None:
    """Export to ONNX (TorchScript exporter, dynamic batch), written atomically."""
    model.eval()
    x = torch.zeros((1, *input_shape), device=next(model.parameters()).device)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), tmp, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    checkpoint.atomic_write(path, write)


def load_scores(path: str | os.PathLike) -> dict[str, list[float]]:
    """The ``layers`` of a scores JSON (``vulnerability.Scores.load``)."""
    return dict(Scores.load(path).layers)
