"""What a protection costs: parameters, MACs and latency, measured (design §4).

MACs come from ``torch.utils.flop_counter`` (convolutions and matrix
products; one MAC = 2 FLOPs) plus the element-wise work of correction and
range-restriction layers, which declare it through an ``elementwise_ops(output)
-> int`` method that this module calls from a forward hook.

Parameters count every stored float value the model computes with: its
parameters plus the values protections add (correction and restriction
bounds, declared through ``faults.protection_buffers``), which are memory
faults hit too. On a LeNet-5 with every layer range-restricted these are
2 x 236 bounds = 472 values (+0.8% of its 61,706 parameters). The int64
index buffers of corrections are counted apart (``index_values``).

Parameter-side weight checks (``harden(..., check_weights=...)``) cost one
pass over every checked weight and bias per forward, whatever the batch:
``macs`` reports their number as ``weight_checks`` beside the MACs and
counts their ops (5 per value) in ``elementwise`` at batch 1.

One price (issue 21): a cost means nothing without the batch it was measured
at. Work done once per forward (weight checks, resolving stored bound copies)
is shared by the batch, so :func:`macs_at_batch` is THE count of MACs per input
at a deployment batch (x1.006 at batch 128 is x1.74 at batch 1 for the same
LeNet-5 weight check); ``harden``, ``protect``, ``pipeline`` and ``compare`` all
call it, and :func:`price` gives the labelled cost object they record
(``batch``, ``macs_ratio``, ``latency_ratio``, ``memory_ratio`` and the batch-1
latency beside them). Latency comes from :func:`stable_latency`: interleaved
rounds until two timings of the same model agree, or a time budget is spent
(``max_seconds``; issue 24: timing every candidate of a ResNet-20 until agreement
took 19.8 of ``protect``'s 52 minutes).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ftcnn import constants
from ftcnn.injection import faults as F

DEFAULT_BATCH = constants.DEFAULT_BATCH  # the deployment batch costs are quoted at unless told
AGREEMENT = 0.03         # two timings of the same model must agree within this ratio (stable_latency)
MAX_TIMING_ROUNDS = 60   # ...or stop after this many interleaved rounds (recorded as not converged)


def protection_values(model: nn.Module) -> int:
    """Stored values protections add to the model (range bounds, thresholds; a code's int32
    check words and copies, each one 32-bit value like a float)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        for b in F.protection_buffers(m).values():
            seen[b.data_ptr()] = b.numel()
    return sum(seen.values())


def index_values(model: nn.Module) -> int:
    """Integer buffers of protection modules (channel indices): memory, not attacked. A code's
    int32 words (``ftcnn.protection.codes``) are attacked memory, counted in ``protection_values`` instead."""
    seen: dict[int, int] = {}
    for m in model.modules():
        if hasattr(m, F.PROTECTION_ATTR):
            declared = {b.data_ptr() for b in F.protection_buffers(m).values()}
            for b in m.buffers(recurse=False):
                if not b.is_floating_point() and b.data_ptr() not in declared:
                    seen[b.data_ptr()] = b.numel()
    return sum(seen.values())


def parameters(model: nn.Module) -> int:
    """Parameters plus the protections' float values (see the module doc)."""
    return sum(p.numel() for p in model.parameters()) + protection_values(model)


def _doubled(output: Any) -> Any:
    """``output`` as if the forward had seen two inputs (tensors repeated along the batch)."""
    if isinstance(output, torch.Tensor):
        return output.repeat(2, *(1,) * (output.dim() - 1)) if output.dim() else output
    if isinstance(output, (tuple, list)):
        return type(output)(_doubled(o) for o in output)
    return output


@torch.inference_mode()
def _count(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """One forward at batch 1 under the FLOP counter; every module declaring
    ``elementwise_ops`` is asked for its ops at batch 1 and at batch 2, and the ops
    that do not double (``2 * ops(1) - ops(2)``) are those run once per forward."""
    model.eval()
    x = torch.zeros((1, *input_shape))
    elementwise, checks, per_forward = [0], [0], [0]

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        ops = int(module.elementwise_ops(output))
        elementwise[0] += ops
        per_forward[0] += max(0, 2 * ops - int(module.elementwise_ops(_doubled(output))))
        if hasattr(module, "weight_checks"):
            checks[0] += int(module.weight_checks())

    handles = [m.register_forward_hook(hook) for m in model.modules() if hasattr(m, "elementwise_ops")]
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    layer = counter.get_total_flops() // 2
    return {"macs": layer + elementwise[0], "layer_macs": layer, "elementwise": elementwise[0],
            "weight_checks": checks[0], "per_forward": per_forward[0]}


def macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs of one inference on one input of ``input_shape`` (C, H, W), at batch 1.

    Returns ``{"macs": total, "layer_macs": conv/linear only, "elementwise": correction,
    restriction and check ops, "weight_checks": parameter values checked per forward}``.
    Weight checks run once per forward whatever the batch, so at batch B they
    cost ``weight_checks / B`` per input; ``elementwise`` counts them at batch 1.
    For the count at a deployment batch: :func:`macs_at_batch`.
    """
    counted = _count(model, input_shape)
    del counted["per_forward"]
    return counted


def macs_at_batch(model: nn.Module, input_shape: tuple[int, ...], batch: int = DEFAULT_BATCH) -> float:
    """MACs per input when ``batch`` inputs share one forward: the one count every
    budget and every reported MACs ratio uses (issue 21).

    Per-input work (convolutions, restriction and correction of each output) is
    counted whole; work done once per forward whatever the batch (weight checks,
    resolving stored bound copies) is divided by ``batch``. At batch 1 this is
    ``macs(...)["macs"]``.

        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5))
        >>> macs_at_batch(net, (3,), 128)
        15.0
    """
    check_batch(batch)
    return _shared_by(_count(model, input_shape), batch)


def _shared_by(counted: Mapping[str, int], batch: int) -> float:
    """MACs per input from a :func:`_count`: the once-per-forward ops divided by ``batch``."""
    shared = counted["per_forward"]
    return counted["macs"] - shared + shared / batch


def check_batch(batch: Any) -> int:
    """A deployment batch size, refused in one line unless an integer >= 1."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1 (got {batch!r})")
    return batch


def memory_bits(model: nn.Module) -> int:
    """Every stored bit of the model: parameters and buffers (protection bounds and
    their copies, check values, int64 index buffers, BatchNorm statistics), each
    tensor once, at its real element size."""
    seen: dict[tuple[int, int], int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t is not None and t.numel():
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size() * 8
    return sum(seen.values())


def relative(cost: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """Each cost as a ratio to the baseline's (1.0 = no overhead)."""
    return {k: (cost[k] / baseline[k] if baseline.get(k) else float("nan"))
            for k in cost if isinstance(cost[k], (int, float))}


def interleaved_latency(models: "dict[str, nn.Module]", input_shape: tuple[int, ...], batch: int = 1,
                        rounds: int = 15, inner: int | None = None, threads: int | None = None
                        ) -> dict[str, float]:
    """Median ms per forward of each model, timed round by round in rotating order.

    For comparing models on a shared machine: a load change then hits every
    model alike instead of whichever happened to be measured at the time.
    ``threads`` sets torch's intra-op threads for the measurement (1 is far
    less disturbed by other processes); ``inner`` forwards are averaged per
    timing (default 20 at batch 1, 2 otherwise). :func:`interleaved_timings`
    gives every round's time (for a spread: :func:`iqr`).
    """
    times = interleaved_timings(models, input_shape, batch, rounds, inner, threads)
    return {n: statistics.median(t) for n, t in times.items()}


def iqr(times: "list[float]") -> list[float]:
    """The interquartile range ``[p25, p75]`` of timings (linear interpolation between
    the sorted values, as numpy's default; one value gives ``[v, v]``).

        >>> iqr([1.0, 2.0, 3.0, 4.0, 5.0])
        [2.0, 4.0]
    """
    if len(times) == 1:
        return [times[0], times[0]]
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return [q1, q3]


@torch.inference_mode()
def interleaved_timings(models: "dict[str, nn.Module]", input_shape: tuple[int, ...], batch: int = 1,
                        rounds: int = 15, inner: int | None = None, threads: int | None = None,
                        warmup: int = 3) -> dict[str, list[float]]:
    """Every round's ms per forward of each model (see :func:`interleaved_latency`), after
    ``warmup`` untimed forwards of each (0: the caller has just run them)."""
    inner = inner or (20 if batch == 1 else 2)
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))
    names = list(models)
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for m in models.values():
            m.eval()
            for _ in range(warmup):
                m(x)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                for _ in range(inner):
                    models[n](x)
                times[n].append((time.perf_counter() - start) / inner * 1e3)
    finally:
        torch.set_num_threads(saved)
    return times


def stable_latency(models: "Mapping[str, nn.Module]", input_shape: tuple[int, ...], batch: int = DEFAULT_BATCH,
                   *, agreement: float = AGREEMENT, min_rounds: int = 5, max_rounds: int = MAX_TIMING_ROUNDS,
                   threads: int | None = 1, inner: int | None = None, max_seconds: float | None = None,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Median ms per forward of each model, timed interleaved until the timing is
    trustworthy: the first model is also timed as a second candidate (the same
    module under another name), and rounds are added until the two medians of that
    one model agree within ``agreement`` (a ratio), or ``max_rounds`` are spent, or
    ``max_seconds`` are (``min_rounds`` always run; no round is started that the rounds
    so far say would end past the budget).

    Why: identical operations timed once each moved by +-0.15 (issue 21), more than
    the differences a budget decides on. Why a time budget (issue 24): on a loaded
    machine the pair may never agree, and 60 rounds of 17 ResNet-20 variants at batch
    128 took 19.8 minutes; a timing that ran out of time says so (``converged`` False,
    ``stopped_by`` "time"), with the spread it reached. Returns ``{"ms": name -> median,
    "iqr": name -> [p25, p75], "rounds", "agreement": |ratio - 1| of the control pair,
    "converged", "stopped_by": "agreement" | "rounds" | "time", "seconds" (by ``clock``,
    warm-up included), "max_seconds", "batch", "threads"}``; the control pair is not
    among the names. Warm-up forwards run once, before the first round.
    """
    check_batch(batch)
    names = list(models)
    if not names:
        raise ValueError("no model to time")
    if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                    or not max_seconds >= 0):
        raise ValueError(f"max_seconds must be a number >= 0 or None (got {max_seconds!r})")
    control = "\0control"
    timed = {**models, control: models[names[0]]}
    times: dict[str, list[float]] = {n: [] for n in timed}
    spread = math.inf
    start = clock()
    while True:
        done = len(times[control])
        step = min_rounds if not done else max(1, min(min_rounds, max_rounds - done))
        if done and max_seconds is not None:  # only rounds that fit what is left of the budget
            spent = clock() - start
            step = max(1, min(step, int((max_seconds - spent) / (spent / done))))
        for n, t in interleaved_timings(timed, input_shape, batch, rounds=step, inner=inner, threads=threads,
                                        warmup=0 if done else 3).items():
            times[n].extend(t)
        spread = abs(statistics.median(times[names[0]]) / statistics.median(times[control]) - 1.0)
        rounds = len(times[control])
        if spread <= agreement or rounds >= max_rounds:
            break
        if max_seconds is not None:
            spent = clock() - start
            if spent >= max_seconds or spent / rounds > max_seconds - spent:  # the next round would not fit
                break
    seconds = clock() - start
    stopped_by = "agreement" if spread <= agreement else "rounds" if rounds >= max_rounds else "time"
    return {"ms": {n: statistics.median(times[n]) for n in names}, "iqr": {n: iqr(times[n]) for n in names},
            "rounds": rounds, "agreement": spread, "converged": spread <= agreement, "stopped_by": stopped_by,
            "seconds": seconds, "max_seconds": max_seconds, "batch": batch, "threads": threads}


def price(model: nn.Module, reference: nn.Module, input_shape: tuple[int, ...], batch: int = DEFAULT_BATCH,
          latency: Mapping[int, Mapping[str, Any]] | None = None, name: str = "model",
          reference_name: str = "reference") -> dict[str, Any]:
    """What ``model`` costs relative to ``reference`` at the deployment ``batch``: the
    one cost object every command records and prints (issue 21).

    ``macs_ratio``: :func:`macs_at_batch` ratio at ``batch`` (``macs_ratio_batch1``
    beside it); ``memory_ratio``: :func:`memory_bits` ratio (all stored bits);
    ``latency_ratio`` / ``latency_ratio_batch1``: from ``latency`` (batch ->
    :func:`stable_latency` result holding ``name`` and ``reference_name``), with the
    rounds and IQRs they came from; None where not timed.
    """
    check_batch(batch)
    ours, theirs = _count(model, input_shape), _count(reference, input_shape)
    out: dict[str, Any] = {
        "batch": batch,
        "macs_ratio": _shared_by(ours, batch) / _shared_by(theirs, batch),
        "macs_ratio_batch1": ours["macs"] / theirs["macs"],
        "memory_ratio": memory_bits(model) / memory_bits(reference),
        "latency_ratio": None, "latency_ratio_batch1": None,
    }
    for b, key in ((batch, "latency_ratio"), (1, "latency_ratio_batch1")):
        timing = (latency or {}).get(b)
        if timing is None or name not in timing["ms"] or reference_name not in timing["ms"]:
            continue
        out[key] = timing["ms"][name] / timing["ms"][reference_name]
        suffix = "" if key == "latency_ratio" else "_batch1"
        out[f"latency_ms{suffix}"] = timing["ms"][name]
        out[f"latency_iqr_ms{suffix}"] = timing["iqr"][name]
        out[f"latency_rounds{suffix}"] = timing["rounds"]
        out[f"latency_agreement{suffix}"] = timing["agreement"]
    return out

