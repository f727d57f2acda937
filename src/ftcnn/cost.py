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
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ftcnn import faults as F


def protection_values(model: nn.Module) -> int:
    """Float values protections add to the model (range bounds, thresholds)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        for b in F.protection_buffers(m).values():
            seen[b.data_ptr()] = b.numel()
    return sum(seen.values())


def index_values(model: nn.Module) -> int:
    """Integer buffers of protection modules (channel indices): memory, not attacked."""
    seen: dict[int, int] = {}
    for m in model.modules():
        if hasattr(m, F.PROTECTION_ATTR):
            for b in m.buffers(recurse=False):
                if not b.is_floating_point():
                    seen[b.data_ptr()] = b.numel()
    return sum(seen.values())


def parameters(model: nn.Module) -> int:
    """Parameters plus the protections' float values (see the module doc)."""
    return sum(p.numel() for p in model.parameters()) + protection_values(model)


@torch.inference_mode()
def macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs of one inference on one input of ``input_shape`` (C, H, W).

    Returns ``{"macs": total, "layer_macs": conv/linear only, "elementwise": correction,
    restriction and check ops, "weight_checks": parameter values checked per forward}``.
    Weight checks run once per forward whatever the batch, so at batch B they
    cost ``weight_checks / B`` per input; ``elementwise`` counts them at batch 1.
    """
    model.eval()
    x = torch.zeros((1, *input_shape))
    elementwise, checks = [0], [0]

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        elementwise[0] += int(module.elementwise_ops(output))
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
            "weight_checks": checks[0]}


@torch.inference_mode()
def latency(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, repeats: int = 20,
            warmup: int = 3) -> float:
    """Median seconds of one forward of ``batch`` inputs on the CPU."""
    model.eval()
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model: nn.Module, input_shape: tuple[int, ...], *, batches: tuple[int, ...] = (1, 128),
            repeats: int = 20) -> dict[str, float]:
    """Parameters (protection values included, and apart), MACs and median latency (ms)
    at each batch size."""
    out: dict[str, float] = {"params": parameters(model), "protection_values": protection_values(model),
                             "index_values": index_values(model), **macs(model, input_shape)}
    for b in batches:
        # fewer repeats for big batches: the median of a few long runs is already stable
        out[f"latency_b{b}_ms"] = 1e3 * latency(model, input_shape, b, repeats if b < 32 else max(5, repeats // 4))
    return out


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
                        rounds: int = 15, inner: int | None = None, threads: int | None = None
                        ) -> dict[str, list[float]]:
    """Every round's ms per forward of each model (see :func:`interleaved_latency`)."""
    inner = inner or (20 if batch == 1 else 2)
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))
    names = list(models)
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for m in models.values():
            m.eval()
            for _ in range(3):
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
