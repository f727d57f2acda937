"""ftcnn against PyTorchFI 0.6.0 and MRFI 2.1.0 on the same fault campaign (design §7).

The peers are never dependencies of ftcnn: install them into a separate venv
for this benchmark only, then run it from there:

    python3 -m venv /tmp/peers-venv
    /tmp/peers-venv/bin/pip install torch==2.13.0 pytorchfi==0.6.0 mrfi==2.1.0 -e /path/to/ftcnn
    /tmp/peers-venv/bin/python benchmarks/peers.py [--trials 200] [--models lenet5 vgg11]
    /tmp/peers-venv/bin/python benchmarks/peers.py --precision 0.01 --threads 1   # time to +-1 point

Workload: bit error rates 1e-7, 1e-6, 1e-5, 1e-4, ``--trials`` trials each,
LeNet-5 and VGG-11 (width 1/4), 1,000 mnist5k test inputs (VGG at 3x32x32,
padded), models trained briefly here first (cached in ``--cache``). Every
trial evaluates all inputs in one batch and every tool's metrics come from
the same function (``ftcnn.campaigns.metrics.trial_metrics``), so only fault injection
and inference differ.

- **ftcnn**: ``run_campaign`` with its defaults (exact shortcuts on), then the
  same with ``--workers 2``; its plain path (no shortcut) is run too, to check
  that the numbers are identical.
- **PyTorchFI** has no bit error rate and no IEEE-754 bit flip of its own: it is
  driven with the SAME fault list ftcnn draws for each trial, through its real
  API (``declare_weight_fi(function=..., layer_num=..., k=..., dim1=..., ...)``
  with a function that flips the drawn bit). It cannot inject into biases, so
  the few bias faults of a trial (biases are <0.3% of the bits here) are
  flipped by hand in its corrupted copy. Its numbers should equal ftcnn's.
  It evaluates every trial (it has no fault-free shortcut).
- **MRFI** draws its own faults: ``RandomPositionByRate`` over weights and
  biases of every Conv2d/Linear with ``FloatRandomBitFlip``; its rate is per
  value, so rate = 32 x BER (one random bit of each chosen value). Its numbers
  agree with ftcnn's statistically, not trial by trial (checked: overlapping
  95% confidence intervals of the accuracy mean).

Prints the wall time and trials/s of each tool, ftcnn's speed-up over each,
and the accuracy means with their CIs per BER.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ftcnn import checkpoint, data, train
from ftcnn.injection import faults as F
from ftcnn.campaigns.campaign import CampaignConfig, draw_trial_faults, predict, run_campaign
from ftcnn.campaigns.metrics import Golden, mean_ci, trial_metrics

BERS = (1e-7, 1e-6, 1e-5, 1e-4)
SEED = 0


def workload(name: str, cache: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A briefly trained model and the first 1,000 mnist5k test inputs."""
    xs, ys = data.load("mnist5k", "test").tensors
    x, y = xs[:1000], ys[:1000]
    if name == "lenet5":
        kwargs = dict(num_classes=10, in_channels=1, input_size=28)
    else:
        kwargs = dict(num_classes=10, in_channels=3, input_size=32, width=0.25)
        x = data.pad_to(x, 32, 3)
    path = cache / f"{name}.pt"
    if path.exists():
        return checkpoint.load(path).eval(), x, y
    train.seed_everything(SEED)
    model = checkpoint.build(name, **kwargs)
    train_set = data.load("mnist5k", "train")
    if name != "lenet5":
        tx, ty = train_set.tensors
        train_set = torch.utils.data.TensorDataset(data.pad_to(tx, 32, 3), ty)
    train.fit(model, train_set, epochs=3, seed=SEED, progress=False)
    cache.mkdir(parents=True, exist_ok=True)
    checkpoint.save(model, path, data="mnist5k", epochs=3, seed=SEED)
    return model.eval(), x, y


def rows(results: list[dict]) -> dict[float, list[float]]:
    return {r["ber"]: [r["accuracy_mean"], *r["accuracy_ci"]] for r in results}


# --- ftcnn ------------------------------------------------------------------------

def run_ftcnn(model, x, y, trials: int, folder: Path, **settings) -> tuple[float, dict]:
    config = CampaignConfig(bers=BERS, trials=trials, seed=SEED, **settings)
    start = time.perf_counter()
    summary = run_campaign(model, x, y, config, folder, progress=False)
    return time.perf_counter() - start, summary


# --- PyTorchFI ----------------------------------------------------------------------

def run_pytorchfi(model, x, y, trials: int) -> tuple[float, dict[float, list[dict]]]:
    """Every trial through declare_weight_fi with ftcnn's fault list."""
    from pytorchfi.core import fault_injection

    start = time.perf_counter()
    model = copy.deepcopy(model).eval()
    golden = Golden(y, predict(model, x).argmax(1))
    fi = fault_injection(model, len(x), input_shape=list(x.shape[1:]),
                         layer_types=[nn.Conv2d, nn.Linear], use_cuda=False)
    memory = F.parameter_memory(copy.deepcopy(model))  # only to draw ftcnn's faults
    layer_of = {name: i for i, name in enumerate(
        n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))}
    config = CampaignConfig(bers=BERS, trials=trials, seed=SEED)
    results: dict[float, list[dict]] = {}
    for ber in BERS:
        results[ber] = []
        for trial in range(trials):
            faults = draw_trial_faults(memory, config, ber, trial)
            corrupted = _pytorchfi_trial(fi, model, faults, layer_of)
            with torch.no_grad():
                logits = corrupted(x)
            results[ber].append(trial_metrics(logits, golden))
    return time.perf_counter() - start, results


def _pytorchfi_trial(fi, model: nn.Module, faults: F.Faults, layer_of: dict[str, int]) -> nn.Module:
    weight_sites = sorted(
        ((layer_of[name.rsplit(".", 1)[0]], int(i), int(b), name)
         for name, (idx, bits) in faults.sites.items() if name.endswith(".weight")
         for i, b in zip(idx, bits)), key=lambda s: s[0])  # PyTorchFI visits layers in order
    shapes = dict(model.named_parameters())
    layer_num, k, c, h, w, bits = [], [], [], [], [], []
    for layer, flat, bit, name in weight_sites:
        pos = np.unravel_index(flat, tuple(shapes[name].shape))
        layer_num.append(layer)
        k.append(int(pos[0]))
        c.append(int(pos[1]))
        h.append(int(pos[2]) if len(pos) > 2 else None)
        w.append(int(pos[3]) if len(pos) > 3 else None)
        bits.append(bit)
    queue = iter(bits)

    def flip(weight: torch.Tensor, index: tuple) -> torch.Tensor:
        value = weight[index].detach().clone()
        _flip_inplace(value, next(queue))
        return value

    corrupted = fi.declare_weight_fi(function=flip, layer_num=layer_num, k=k, dim1=c, dim2=h, dim3=w)
    bias_sites = [(name, int(i), int(b)) for name, (idx, bits_) in faults.sites.items()
                  if not name.endswith(".weight") for i, b in zip(idx, bits_)]
    if bias_sites:  # PyTorchFI has no bias injection: the same flips, by hand
        params = dict(corrupted.named_parameters())
        with torch.no_grad():
            for name, i, b in bias_sites:
                _flip_inplace(params[name].data.view(-1)[i:i + 1], b)
    return corrupted


def _flip_inplace(value: torch.Tensor, bit: int) -> None:
    ints = value.view(torch.int32)
    mask = np.array([1 << bit], dtype=np.uint64).astype(np.uint32).view(np.int32)[0]
    ints ^= int(mask)


# --- MRFI ---------------------------------------------------------------------------

MRFI_CONFIG = """
faultinject:
  - type: weight
    name: [weight, bias]
    enabled: True
    selector:
      method: RandomPositionByRate
      poisson: True
      rate: {rate}
    error_mode:
      method: FloatRandomBitFlip
      floattype: float32
    module_type: [Conv2d, Linear]
"""


def run_mrfi(model, x, y, trials: int) -> tuple[float, dict[float, list[dict]]]:
    """Every trial is one forward of the MRFI-wrapped model (one fresh draw per call)."""
    import logging

    from mrfi import MRFI, EasyConfig

    logging.getLogger().setLevel(logging.ERROR)
    start = time.perf_counter()
    torch.manual_seed(SEED)
    np.random.seed(SEED)  # MRFI's Poisson counts come from scipy, i.e. numpy's global RNG
    golden = Golden(y, predict(model, x).argmax(1))
    results: dict[float, list[dict]] = {}
    for ber in BERS:
        fi_model = MRFI(copy.deepcopy(model).eval(), EasyConfig.load_string(MRFI_CONFIG.format(rate=32 * ber)))
        results[ber] = [trial_metrics(fi_model(x), golden) for _ in range(trials)]
    return time.perf_counter() - start, results


# --- time to precision (issue 13) ---------------------------------------------------------

MIN_PLAIN = 30  # a peer's plain run checks its t-interval from this many trials on


def _pytorchfi_trials(model, x, y, ber: float):
    """PyTorchFI trials at ``ber`` one after the other, with ftcnn's fault draws (seed SEED)."""
    from pytorchfi.core import fault_injection

    model = copy.deepcopy(model).eval()
    golden = Golden(y, predict(model, x).argmax(1))
    fi = fault_injection(model, len(x), input_shape=list(x.shape[1:]),
                         layer_types=[nn.Conv2d, nn.Linear], use_cuda=False)
    memory = F.parameter_memory(copy.deepcopy(model))
    layer_of = {name: i for i, name in enumerate(
        n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))}
    config = CampaignConfig(bers=(ber,), trials=1, seed=SEED)
    trial = 0
    while True:
        corrupted = _pytorchfi_trial(fi, model, draw_trial_faults(memory, config, ber, trial), layer_of)
        with torch.no_grad():
            yield trial_metrics(corrupted(x), golden)["accuracy"]
        trial += 1


def _mrfi_trials(model, x, y, ber: float):
    import logging

    from mrfi import MRFI, EasyConfig

    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    golden = Golden(y, predict(model, x).argmax(1))
    fi_model = MRFI(copy.deepcopy(model).eval(), EasyConfig.load_string(MRFI_CONFIG.format(rate=32 * ber)))
    while True:
        yield trial_metrics(fi_model(x), golden)["accuracy"]


EXTRAPOLATED: set[tuple[str, float]] = set()  # (tool, ber) cells estimated past --max-trials


def plain_until_precise(trials, precision: float, max_trials: int, key: tuple[str, float] | None = None
                        ) -> tuple[int, float]:
    """Plain Monte Carlo as a peer user would run it: trials until the Student-t half-width
    is <= ``precision`` (checked after every trial from ``MIN_PLAIN`` on; generous to the
    peer: a t-interval checked on the data is not valid at its stop, ftcnn's are).
    Returns (trials, CPU seconds of this process). A run stopped at ``max_trials`` before it
    is that narrow is extrapolated: the trials a t-interval of that half-width needs at the
    measured std, at the measured CPU seconds per trial (``key`` is then put in EXTRAPOLATED)."""
    start = time.process_time()
    values: list[float] = []
    for value in trials:
        values.append(value)
        if len(values) >= MIN_PLAIN:
            _, std, (low, high) = mean_ci(values)
            if (high - low) / 2 <= precision:
                break
            if len(values) >= max_trials:
                seconds = time.process_time() - start
                needed = max(len(values), math.ceil((1.96 * std / precision) ** 2))
                if key is not None:
                    EXTRAPOLATED.add(key)
                return needed, seconds / len(values) * needed
    return len(values), time.process_time() - start


def bench_precision(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    args: argparse.Namespace) -> None:
    """CPU seconds (this process; 1 thread recommended) to +-``args.precision`` at each BER:
    ftcnn --precision (stratified, exact shortcuts), ftcnn --trials auto, and the peers'
    plain Monte Carlo until their t-interval is that narrow. Peers not installed are skipped."""
    print(f"\n{name}: time to +-{args.precision:g} at 95%, CPU seconds (trials), "
          f"load average {os.getloadavg()[0]:.1f}")
    table: dict[str, dict[float, tuple[int, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tool, settings in (("ftcnn --precision", {"precision": args.precision}),
                               ("ftcnn --precision, all inputs", {"precision": args.precision,
                                                                  "inputs_per_trial": len(x)}),
                               ("ftcnn --trials auto", {"ci_half_width": args.precision})):
            if tool == "ftcnn --trials auto" and "ftcnn-auto" not in args.tools:
                continue
            if tool.endswith("all inputs") and "ftcnn-precision-all" not in args.tools:
                continue
            table[tool] = {}
            for ber in BERS:
                config = CampaignConfig(bers=(ber,), trials=None, seed=SEED, **settings)
                start = time.process_time()
                summary = run_campaign(model, x, y, config, Path(tmp) / f"{len(table)}-{ber:g}", progress=False)
                table[tool][ber] = (summary["results"][0]["trials"], time.process_time() - start)
    for tool, trials in (("pytorchfi", _pytorchfi_trials), ("mrfi", _mrfi_trials)):
        if tool not in args.tools:
            continue
        try:
            table[tool] = {ber: plain_until_precise(trials(model, x, y, ber), args.precision, args.max_trials,
                                                    (tool, ber))
                           for ber in BERS}
        except ImportError as exc:
            print(f"  {tool}: skipped ({exc})")
    print(f"  {'tool':30}" + "".join(f"{b:>16g}" for b in BERS) + f"{'total CPU s':>14}")
    for tool, cells in table.items():
        print(f"  {tool:30}" + "".join(f"{'~' if (tool, b) in EXTRAPOLATED else ' '}{s:>8.1f} ({n:>4})"
                                       for b, (n, s) in ((b, cells[b]) for b in BERS))
              + f"{sum(s for _, s in cells.values()):>14.1f}")
    if EXTRAPOLATED:
        print(f"  ~: not that narrow after --max-trials {args.max_trials}; trials a t-interval needs at the "
              "measured std, at the measured CPU s per trial")
    ours = sum(s for _, s in table["ftcnn --precision"].values())
    for tool in [t for t in table if t != "ftcnn --precision"]:
        print(f"  ftcnn --precision uses {sum(s for _, s in table[tool].values()) / ours:.1f}x less CPU than {tool}")


def summarize(per_trial: dict[float, list[dict]]) -> dict[float, list[float]]:
    out = {}
    for ber, ms in per_trial.items():
        mean, _, (low, high) = mean_ci([m["accuracy"] for m in ms])
        out[ber] = [mean, low, high]
    return out


# --- main ---------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="trials per BER (200: the full workload)")
    parser.add_argument("--models", nargs="+", default=["lenet5", "vgg11"], choices=["lenet5", "vgg11"])
    tools = ["ftcnn", "ftcnn-workers", "ftcnn-auto", "ftcnn-precision-all", "pytorchfi", "mrfi"]
    parser.add_argument("--tools", nargs="+", default=tools, choices=tools,
                        help="ftcnn-precision-all: --precision with every input in every trial "
                             "(its default evaluates a block of 100 per trial)")
    parser.add_argument("--precision", type=float, default=None,
                        help="time-to-precision mode: CPU time of each tool to this CI half-width per BER "
                             "(e.g. 0.01); --trials is then ignored")
    parser.add_argument("--max-trials", type=int, default=20_000,
                        help="time-to-precision mode: a peer's plain run stops here at the latest")
    parser.add_argument("--no-plain-check", action="store_true",
                        help="skip re-running ftcnn's plain path to check the numbers are identical")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ftcnn-peers-models")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in this process (default: torch's; worker processes "
                             "always get cores // workers)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"BERs {', '.join(f'{b:g}' for b in BERS)}, {args.trials} trials each")
    for name in args.models:
        model, x, y = workload(name, args.cache)
        (bench_precision if args.precision else bench)(name, model, x, y, args)


def bench(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> None:
    n = len(BERS) * args.trials
    golden = (predict(model, x).argmax(1) == y).float().mean().item()
    print(f"\n{name}: {sum(p.numel() for p in model.parameters()):,} parameters, golden accuracy "
          f"{golden:.2%}, {len(x)} inputs of {'x'.join(map(str, x.shape[1:]))}, "
          f"load average {os.getloadavg()[0]:.1f}")
    times: dict[str, float] = {}
    load: dict[str, float] = {}  # other jobs on the machine skew timings: shown per tool
    accuracy: dict[str, dict[float, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "ftcnn" in args.tools:
            load["ftcnn"] = os.getloadavg()[0]
            times["ftcnn"], fast = run_ftcnn(model, x, y, args.trials, Path(tmp) / "fast")
            accuracy["ftcnn"] = rows(fast["results"])
            if not args.no_plain_check:
                load["ftcnn plain"] = os.getloadavg()[0]
                plain_s, plain = run_ftcnn(model, x, y, args.trials, Path(tmp) / "plain",
                                           shortcut=False, skip_fault_free=False, batch_trials=1)
                times["ftcnn plain"] = plain_s
                print(f"  ftcnn shortcuts == ftcnn plain path: "
                      f"{'yes' if plain['results'] == fast['results'] else 'NO'}")
        if "ftcnn-workers" in args.tools:
            load["ftcnn 2 workers"] = os.getloadavg()[0]
            times["ftcnn 2 workers"], par = run_ftcnn(model, x, y, args.trials, Path(tmp) / "par", workers=2)
            accuracy["ftcnn 2 workers"] = rows(par["results"])
            if "ftcnn" in accuracy:
                print(f"  ftcnn 2 workers == ftcnn: {'yes' if par['results'] == fast['results'] else 'NO'}")
    if "pytorchfi" in args.tools:
        load["pytorchfi"] = os.getloadavg()[0]
        times["pytorchfi"], res = run_pytorchfi(model, x, y, args.trials)
        accuracy["pytorchfi"] = summarize(res)
    if "mrfi" in args.tools:
        load["mrfi"] = os.getloadavg()[0]
        times["mrfi"], res = run_mrfi(model, x, y, args.trials)
        accuracy["mrfi"] = summarize(res)
    print(f"  {'tool':16} {'wall s':>9} {'trials/s':>9} {'load at start':>14}")
    for tool, t in times.items():
        print(f"  {tool:16} {t:>9.1f} {n / t:>9.2f} {load[tool]:>14.1f}")
    peers = [t for t in ("pytorchfi", "mrfi") if t in times]
    for ours in ("ftcnn", "ftcnn 2 workers"):
        if ours in times:
            for peer in peers:
                print(f"  {ours} speed-up over {peer}: {times[peer] / times[ours]:.2f}x")
    print("  accuracy mean [95% CI] per BER:")
    for ber in BERS:
        cells = "  ".join(f"{tool} {m:.4f} [{lo:.4f}, {hi:.4f}]" for tool, acc in accuracy.items()
                          for m, lo, hi in [acc[ber]])
        print(f"    {ber:g}: {cells}")
    if "ftcnn" in accuracy:
        ref = accuracy["ftcnn"]
        for tool in [t for t in accuracy if t != "ftcnn"]:
            agree = all(_overlap(ref[b], accuracy[tool][b]) for b in BERS)
            same = all(abs(ref[b][0] - accuracy[tool][b][0]) < 1e-12 for b in BERS)
            print(f"  {tool} vs ftcnn: means {'identical' if same else 'differ'}, "
                  f"CIs {'overlap at every BER' if agree else 'DO NOT overlap somewhere'}")


def _overlap(a: list[float], b: list[float]) -> bool:
    return a[1] <= b[2] and b[1] <= a[2]


if __name__ == "__main__":  # the guard matters: ftcnn's worker processes re-import this file
    main()
