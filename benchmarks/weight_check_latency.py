"""Latency of the weight check at batch 1, before and after its fast path (issue 21).

At batch 1 a parameter-side weight check (``harden(check_weights=...)``) costs its op
count, not its element work: every forward resolves the stored bound copies and passes
each weight and bias through the check. ``hardening.check_two`` does that in 8-10 ops a
tensor where ``bound`` + ``check_values`` took 18 (they remain the ONNX export's path).

For each protection ``ftcnn protect`` picks (random init: latency does not depend on the
values), this prints the latency ratio to the unprotected model at batch 1 and 128
(``cost.stable_latency``: 1 thread, interleaved rounds until a control pair agrees) of

- ``before``: the same hardened model with the old forward (``bound`` + ``check_values``
  with the export test at every pass, as the code was), set per module below;
- ``after``: the model as ``harden`` builds it now.

Both are checked first: fault-free, equal to the unprotected model bit for bit; with bit
flips in every weight, bias and bound copy, equal to each other bit for bit.

Example:
    python benchmarks/weight_check_latency.py
    python benchmarks/weight_check_latency.py --cases lenet5 --batches 1
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import types
from typing import Any

import torch
from torch import nn

from ftcnn.protection import cost, hardening as H
from ftcnn.models import MODELS

INPUT = (1, 28, 28)

CASES: dict[str, tuple[str, float, dict[str, Any]]] = {
    "lenet5 weights_zero": ("lenet5", 1.0, {"check_weights": "zero"}),
    "lenet5 weights_zero+restrict_zero_m0.1_p90": ("lenet5", 1.0, {
        "check_weights": "zero", "restrict": "zero", "range_margin": 0.1, "restrict_share": 0.9}),
    "vgg11 w0.25 weights_zero": ("vgg11", 0.25, {"check_weights": "zero"}),
    "resnet20 weights_clamp": ("resnet20", 1.0, {"check_weights": "clamp"}),
}


# --- the forward as it was (the "before" column) ---------------------------------------

def _old_nan_to(t: torch.Tensor, value: float) -> torch.Tensor:
    if torch.onnx.is_in_onnx_export():
        return torch.where(torch.isnan(t), value, t)
    return t.nan_to_num(value, math.inf, -math.inf)


def _old_check_values(v: torch.Tensor, low: torch.Tensor, high: torch.Tensor, mode: str) -> torch.Tensor:
    low, high = _old_nan_to(low, -math.inf), _old_nan_to(high, math.inf)
    if torch.onnx.is_in_onnx_export():
        raise RuntimeError("the old forward is timed eagerly only")
    if mode == "zero":
        out = H.within(v, low, high).mul_(v)
    else:
        out = torch.maximum(v, low)
        out.clamp_max_(high)
    return out.nan_to_num_(0.0, math.inf, -math.inf)


def _old_bound(module: nn.Module, name: str) -> torch.Tensor | None:
    primary = getattr(module, name)
    spare = getattr(module, f"{name}_copies", None)
    if primary is None or spare is None:
        return primary
    return H.fail_safe_bound([primary, *spare.unbind(0)], "low" if name.endswith("low") else "high")


def _old_checked(self: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    w, b = self.stored_values()
    if self.check is not None:
        w = _old_check_values(w, _old_bound(self, "weight_low"), _old_bound(self, "weight_high"), self.check)
        if b is not None:
            b = _old_check_values(b, _old_bound(self, "bias_low"), _old_bound(self, "bias_high"), self.check)
    return w, b


def _old_restrict(self: Any, y: torch.Tensor) -> torch.Tensor:
    return _old_check_values(y, _old_bound(self, "low"), _old_bound(self, "high"), self.mode)


def before(model: nn.Module) -> nn.Module:
    """A copy of a hardened ``model`` whose checks and restrictions run the old forward."""
    old = copy.deepcopy(model)
    for m in old.modules():
        if isinstance(m, H._ProtectedLayer):
            m.checked = types.MethodType(_old_checked, m)
        if isinstance(m, H.Restrict):
            m.forward = types.MethodType(_old_restrict, m)
    return old


# --- checks and timing ------------------------------------------------------------------

def _flipped(model: nn.Module, rate: float, seed: int) -> nn.Module:
    """A copy with every bit of every float parameter and buffer flipped with probability ``rate``."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*out.parameters(), *out.buffers()]:
            if t.dtype == torch.float32:
                bits = t.view(torch.int32)
                for b in range(32):
                    bits ^= (torch.rand(t.shape, generator=g) < rate).to(torch.int32) << b
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def check_numbers(base: nn.Module, old: nn.Module, new: nn.Module, x: torch.Tensor) -> None:
    """Fault-free: all three equal; under bit flips (same flips): old and new equal, bit for bit."""
    with torch.inference_mode():
        assert _same_bits(new(x), base(x)) and _same_bits(old(x), base(x)), "not bit-exact without faults"
        for seed, rate in ((1, 1e-3), (2, 1e-2)):
            a, b = _flipped(old, rate, seed), _flipped(new, rate, seed)
            assert _same_bits(a(x), b(x)), f"old and new forwards differ under faults (rate {rate})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), help=f"of: {', '.join(CASES)}")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 128])
    args = parser.parse_args()

    rows = []
    for case in args.cases:
        name, width, settings = CASES[case]
        torch.manual_seed(0)
        base = MODELS[name](num_classes=10, in_channels=INPUT[0], input_size=INPUT[1], width=width).eval()
        calibration = torch.randn(64, *INPUT)
        new = H.harden(base, ratio=0.0, calibration=calibration, **settings).eval()
        old = before(new)
        check_numbers(base, old, new, calibration[:8])
        nets = {"unprotected": base, "before": old, "after": new}
        row: dict[str, Any] = {"case": case, "macs": cost.price(new, base, INPUT, 1)["macs_ratio"]}
        for batch in args.batches:
            t = cost.stable_latency(nets, INPUT, batch, threads=1)
            ref = t["ms"]["unprotected"]
            row[batch] = (t["ms"]["before"] / ref, t["ms"]["after"] / ref, ref, t["rounds"], t["converged"])
        rows.append(row)

    print(f"1 thread, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end "
          f"(timings on a loaded machine move +-15%); ratios to the unprotected model")
    header = ["protection", "MACs x b1"]
    for b in args.batches:
        header += [f"before b{b}", f"after b{b}", f"unprotected b{b} ms", f"rounds b{b}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row["case"], f"{row['macs']:.3f}"]
        for b in args.batches:
            old_r, new_r, ref, rounds, converged = row[b]
            cells += [f"x{old_r:.2f}", f"x{new_r:.2f}", f"{ref:.3f}", f"{rounds}{'' if converged else ' (not converged)'}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
