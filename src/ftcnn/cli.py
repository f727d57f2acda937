"""The ``ftcnn`` command line: parses arguments, calls the API, prints.

Every user mistake ends in one line on stderr and exit status 2; set
FTCNN_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ftcnn import progress

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fault injection, vulnerability analysis, hardening and pruning for CNNs.")
console = progress.console()  # full-width tables, no escape codes, when not a terminal

# options that take several values after one flag, as in `--ber 1e-6 1e-5`
MULTI_VALUE_OPTIONS = {"--ber", "--count", "--bits", "--layers"}
# ...of them, those whose values are names (not numbers)
NAME_VALUE_OPTIONS = {"--layers"}


def _load_data(spec: str, split: str, seed: int = 0):
    from ftcnn import data
    return data.load(spec, split, seed=seed)


# `--model` on the commands that load a checkpoint: the opt-in to a user builder
MODEL_TRUST_HELP = ("trust the checkpoint's user builder package.module:fn (importing it runs its code); "
                    "must equal the name the checkpoint stores")


# `--threads` on every long command (issue 13)
THREADS_HELP = ("torch threads of this job (default: 1 for a model under 1M parameters, all cores for a "
                "bigger one; worker processes split the cores)")


def _threads(threads: Optional[int], model=None, workers: int = 1) -> int:
    """Fit torch's intra-op threads to the machine (``distributed.apply_threads``) before the work."""
    from ftcnn import distributed
    return distributed.apply_threads(threads, model, workers)


def _data_spec(data: Optional[str], model_meta: dict) -> str:
    """--data, else the checkpoint's data set if it is a built-in one: a spec with a
    path comes from the file, and reading it (CIFAR batches are pickles) can run code."""
    from ftcnn import data as data_mod

    if data:
        return data
    spec = model_meta.get("data")
    if spec is None or spec == "":
        raise ValueError("no --data given and the checkpoint does not record its data set")
    if not isinstance(spec, str) or spec not in data_mod.BUILTINS:
        raise ValueError(f"the checkpoint records the data set {str(spec)[:80]!r}, which is read from files: "
                         f"give --data explicitly to use it (only {', '.join(data_mod.BUILTINS)} are taken "
                         "from a checkpoint)")
    return spec


@app.command()
def train(
    model: str = typer.Option(..., help="registry name (lenet5, vgg11, ...) or package.module:builder"),
    data: str = typer.Option("mnist5k", help="mnist5k, digits, cifar10:PATH, cifar100:PATH, imagefolder:PATH, npz:PATH"),
    epochs: int = typer.Option(5, min=0),
    lr: float = typer.Option(2e-3),
    batch_size: int = typer.Option(64, min=1),
    width: float = typer.Option(1.0, help="channel width multiplier"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="checkpoint to write"),
) -> None:
    """Train a model on a data set and save a checkpoint.

    Example: ftcnn train --model lenet5 --data mnist5k --epochs 5 --seed 0 -o lenet5.pt
    """
    from ftcnn import checkpoint, data as data_mod, train as train_mod

    _check_output_file(output)
    info = data_mod.info(data)
    train_set = _load_data(data, "train")
    test_set = _load_data(data, "test")
    train_mod.seed_everything(seed)
    net = checkpoint.build(model, num_classes=info.num_classes, in_channels=info.in_channels,
                           input_size=info.input_size, width=width)
    _threads(threads, net)
    losses = train_mod.fit(net, train_set, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    accuracy = train_mod.evaluate(net, test_set)
    checkpoint.save(net, output, data=data, test_accuracy=accuracy, epochs=epochs, seed=seed,
                    lr=lr, batch_size=batch_size, losses=losses)
    console.print(f"{model} on {data}: test accuracy {accuracy:.2%} -> {output}")


def _check_output_file(path: Path) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"output folder {folder} is not writable")


def _parse_trials(trials: str) -> Optional[int]:
    if trials == "auto":
        return None
    try:
        n = int(trials)
    except ValueError:
        raise ValueError(f"--trials must be a positive integer or 'auto' (got {trials!r})") from None
    if n < 1:
        raise ValueError(f"--trials must be >= 1 (got {n})")
    return n


@app.command()
def inject(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT"),
    data: Optional[str] = typer.Option(None, help="data set (default: the checkpoint's, if built-in)"),
    model_spec: Optional[str] = typer.Option(None, "--model", help=MODEL_TRUST_HELP),
    ber: List[float] = typer.Option([], help="bit error rates, e.g. --ber 1e-6 1e-5 1e-4"),
    count: List[int] = typer.Option([], help="exact fault counts per trial instead of --ber"),
    trials: str = typer.Option("100", help="trials per point, or 'auto' (stop when the accuracy CI, a "
                               "betting confidence sequence valid under early stopping, is narrow enough; "
                               "at most Leveugle's size)"),
    margin: float = typer.Option(0.01, help="with --trials auto: target half-width of the accuracy CI"),
    confidence: float = typer.Option(0.95, help="level of every reported CI"),
    seed: int = typer.Option(0),
    dtype: str = typer.Option("float32", help="storage format faults hit: float32, float16, bfloat16, int8"),
    bits: List[int] = typer.Option([], help="only these bit positions (default: all)"),
    mode: str = typer.Option("flip", help="flip, stuck0 or stuck1"),
    include_bn: bool = typer.Option(False, help="also inject into BatchNorm affine parameters"),
    attack_protection: bool = typer.Option(True, help="also inject into the float values protections add "
                                           "(correction and restriction bounds); reported in the summary"),
    layers: List[str] = typer.Option([], help="only these layers (module names)"),
    limit: Optional[int] = typer.Option(None, min=1, help="use only the first N test inputs"),
    batch_size: int = typer.Option(1000, min=1),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ... (same results within float tolerance)"),
    shortcut: bool = typer.Option(True, help="start each trial at its first faulted layer (exact)"),
    batch_trials: Optional[int] = typer.Option(None, min=1, help="faulty trials per batched forward "
                                               "(exact; default: automatic, 1 on CPU)"),
    workers: int = typer.Option(1, min=1, help="worker processes on this machine"),
    ray: bool = typer.Option(False, "--ray", help="run on a local Ray started for the campaign "
                             "(needs the optional Ray extra of ftcnn)"),
    ray_address: Optional[str] = typer.Option(None, help="run on an existing Ray cluster at this address"),
    precision: Optional[float] = typer.Option(None, help="time to precision: stratified trials until the "
                                              "accuracy CI half-width is at most this (e.g. 0.01), per BER point; "
                                              "replaces --trials"),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="run folder (resumed if it exists)"),
) -> None:
    """Run (or resume) a statistical fault-injection campaign.

    Example: ftcnn inject lenet5.pt --data mnist5k --ber 1e-6 1e-5 1e-4 --trials 100 --seed 0 -o runs/inj

    Faster, same numbers: --workers 2, --ray, --ray-address HOST:6379, --batch-trials 8 --device cuda
    """
    from ftcnn import campaign, checkpoint

    _check_device(device)
    config = campaign.CampaignConfig(
        bers=tuple(ber), counts=tuple(count), trials=None if precision else _parse_trials(trials),
        margin=margin, precision=precision, threads=threads,
        confidence=confidence, seed=seed, dtype=dtype, bits=tuple(bits) or None, mode=mode,
        include_bn=include_bn, attack_protection=attack_protection, layers=tuple(layers) or None,
        batch_size=batch_size,
        shortcut=shortcut, batch_trials=batch_trials, workers=workers, ray=ray,
        ray_address=ray_address, device=device)
    model = _load_model(checkpoint_path, model_spec, data).to(device)
    _threads(threads, model, workers)
    spec = _data_spec(data, checkpoint.meta(model))
    inputs, labels = campaign.stack_dataset(_load_data(spec, "test"), device)
    if limit:
        inputs, labels = inputs[:limit], labels[:limit]
    campaign.check_input_shape(model, inputs)
    record = {"checkpoint": str(checkpoint_path), "data": spec, "inputs": len(inputs),
              "architecture": checkpoint.get_spec(model)}
    summary = campaign.run_campaign(model, inputs, labels, config, output, record=record)
    console.print(campaign.format_table(summary))
    console.print(f"results: {output}/summary.json")


def _check_device(device: str) -> None:
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} is not available here (no CUDA GPU); use --device cpu")


@app.command()
def demo(
    output: Path = typer.Option(Path("runs/demo"), "-o", "--output", help="run folder (resumed if it exists)"),
    epochs: int = typer.Option(5, min=1),
    trials: int = typer.Option(10, min=1, help="trials per variant and BER"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
) -> None:
    """The main job on built-in data: train LeNet-5 on the MNIST digits, then compare every protection
    (a small `ftcnn compare`), ending with the report's path and a short table. A few minutes on 2 cores.

    Example: ftcnn demo -o runs/demo
    """
    from ftcnn import checkpoint, compare as compare_mod, data as data_mod, fingerprint, train as train_mod

    _threads(threads)  # LeNet-5: a small model
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output folder {output}: {exc.strerror}") from None
    model_path = output / "model.pt"
    train_set = _load_data("mnist5k", "train")
    # reused only if trained from the same settings and training data (content, not names)
    trained_from = {"model": "lenet5", "epochs": epochs, "seed": seed, "data": "mnist5k",
                    "train data": fingerprint.data_digest(*train_set.tensors)}
    if compare_mod.is_current(model_path, trained_from, "model.pt"):
        model = checkpoint.load(model_path)
        console.print(f"reusing {model_path}")
    else:
        info = data_mod.info("mnist5k")
        train_mod.seed_everything(seed)
        model = checkpoint.build("lenet5", num_classes=info.num_classes, in_channels=info.in_channels,
                                 input_size=info.input_size)
        train_mod.fit(model, train_set, epochs=epochs, seed=seed, desc="train lenet5")
        accuracy = train_mod.evaluate(model, _load_data("mnist5k", "test"))
        checkpoint.save(model, model_path, data="mnist5k", test_accuracy=accuracy, epochs=epochs, seed=seed)
        compare_mod.store_key(model_path, trained_from)
        console.print(f"LeNet-5 on mnist5k: test accuracy {accuracy:.2%} -> {model_path}")
    config = compare_mod.CompareConfig(bers=(1e-6, 1e-5, 3e-5, 1e-4, 3e-4), trials=trials, seed=seed,
                                       bit_trials=5, bits=tuple(range(20, 32)), report_ber=1e-4)
    summary = compare_mod.run_compare(model, "mnist5k", output, config,
                                      record={"checkpoint": str(model_path), "model_name": "lenet5"})
    console.print(compare_mod.headline(summary))
    console.print(f"report: {output / 'report.html'}")


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _expand_multi_values(argv: list[str]) -> list[str]:
    """Turn `--ber 1e-6 1e-5` into `--ber 1e-6 --ber 1e-5` (click takes one value per flag).

    Numeric options take following numbers; --layers takes following names
    that are not options and not checkpoint paths.
    """
    out: list[str] = []
    flag: Optional[str] = None
    for token in argv:
        takes = flag is not None and (
            _is_number(token) if flag not in NAME_VALUE_OPTIONS
            else not token.startswith("-") and not token.endswith(".pt"))
        if takes:
            out.extend([flag, token])
            continue
        flag = token if token in MULTI_VALUE_OPTIONS else None
        if flag is None:
            out.append(token)
    return out


def _user_module_importable(argv: list[str]) -> None:
    """Make the current folder importable when, and only when, the user names a
    ``package.module:fn`` with ``--model`` (as ``python script.py`` would see
    ``mymodels.py`` beside it); otherwise no file of the folder is ever imported."""
    for i, token in enumerate(argv):
        value = token.partition("=")[2] if token.startswith("--model=") else \
            argv[i + 1] if token == "--model" and i + 1 < len(argv) else ""
        if ":" in value and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
            return


def _load_model(path: Path, model_spec: Optional[str], data: Optional[str]):
    """An ftcnn checkpoint, or, with ``--model package.module:fn``, a plain state
    dict (``torch.save(model.state_dict())``) built for --data's shapes."""
    from ftcnn import checkpoint, data as data_mod

    try:
        return checkpoint.load(path, allow_builder=model_spec)
    except checkpoint.NotACheckpoint:
        if not model_spec or ":" not in model_spec:
            raise
    if not data:
        raise ValueError(f"{path} is not an ftcnn checkpoint and records no data set: give --data, whose "
                         f"shapes {model_spec} is built with, to load it as a plain state dict")
    info = data_mod.info(data)
    return checkpoint.from_state_dict(path, model_spec, num_classes=info.num_classes,
                                      in_channels=info.in_channels, input_size=info.input_size)


def main() -> None:
    argv = _expand_multi_values(sys.argv[1:])
    _user_module_importable(argv)
    try:
        app(args=argv, prog_name="ftcnn")
    except (ValueError, FileNotFoundError, PermissionError, OSError, KeyError) as exc:
        if os.environ.get("FTCNN_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


# --- commands added by later features are appended below this line ---------


@app.command()
def compare(
    checkpoint_path: Optional[Path] = typer.Argument(None, metavar="[CHECKPOINT]",
                                                     help="model to protect (or use --model to train one)"),
    model: Optional[str] = typer.Option(None, help="without CHECKPOINT: train this model first (registry name "
                                        "or package.module:fn); with CHECKPOINT: " + MODEL_TRUST_HELP),
    data: Optional[str] = typer.Option(None, help="data set (default: the checkpoint's, if built-in)"),
    epochs: int = typer.Option(5, min=1, help="with --model: training epochs"),
    width: float = typer.Option(1.0, help="with --model: width multiplier"),
    ber: List[float] = typer.Option([], help="BER sweep (default: 9 log-spaced points 1e-7 ... 1e-3)"),
    trials: int = typer.Option(30, min=1, help="trials per variant and BER"),
    bit_trials: int = typer.Option(20, min=0, help="single-flip trials per bit position (0: skip)"),
    bits: List[int] = typer.Option([], help="bit positions for the bit-sensitivity chart (default: all 32)"),
    harden_ratio: float = typer.Option(0.1),
    prune_ratio: float = typer.Option(0.3),
    restrict: str = typer.Option("zero", help="range restriction mode: zero or clamp"),
    margin: float = typer.Option(0.1, help="range restriction margin (share of the profiled range)"),
    finetune_epochs: int = typer.Option(2, min=0),
    report_ber: Optional[float] = typer.Option(None, help="BER of the overview table and overhead plot"),
    variants: Optional[str] = typer.Option(None, help="comma-separated subset of variants"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="run folder (resumed if it exists)"),
) -> None:
    """Compare every protection side by side: baseline, range restriction, full and selective TMR,
    hardened (min/range, with and without restriction), pruned+hardened (vulnerability vs L1).

    Writes summary.json, summary.csv, plots (PNG+SVG) and a self-contained report.html into the run
    folder; re-running resumes. Examples:

      ftcnn compare lenet5.pt --data mnist5k -o runs/cmp

      ftcnn compare --model vgg11 --width 0.25 --data mnist5k --trials 20 -o runs/cmp_vgg
    """
    from ftcnn import checkpoint, compare as compare_mod, data as data_mod, fingerprint, train as train_mod

    if checkpoint_path is None and model is None:
        raise ValueError("give a CHECKPOINT, or --model to train one first")
    if checkpoint_path is not None:  # refuse a bad checkpoint before creating anything
        net = _load_model(checkpoint_path, model, data)
        spec = _data_spec(data, checkpoint.meta(net))
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output folder {output}: {exc.strerror}") from None
    if checkpoint_path is None:
        spec = data or "mnist5k"
        path = output / "model.pt"
        train_set = _load_data(spec, "train")
        # reused only if trained from the same settings and training data (content, not names)
        trained_from = {"model": model, "width": width, "epochs": epochs, "seed": seed, "data": spec,
                        "train data": fingerprint.data_digest(*train_set.tensors)}
        if compare_mod.is_current(path, trained_from, "model.pt"):
            net = checkpoint.load(path, allow_builder=model)
        else:
            info = data_mod.info(spec)
            train_mod.seed_everything(seed)
            net = checkpoint.build(model, num_classes=info.num_classes, in_channels=info.in_channels,
                                   input_size=info.input_size, width=width)
            _threads(threads, net)
            train_mod.fit(net, train_set, epochs=epochs, seed=seed, desc=f"train {model}")
            checkpoint.save(net, path, data=spec, epochs=epochs, seed=seed,
                            test_accuracy=train_mod.evaluate(net, _load_data(spec, "test")))
            compare_mod.store_key(path, trained_from)
    _threads(threads, net)
    config = compare_mod.CompareConfig(
        **({"bers": tuple(ber)} if ber else {}), trials=trials, seed=seed, harden_ratio=harden_ratio,
        prune_ratio=prune_ratio, restrict=restrict, margin=margin, finetune_epochs=finetune_epochs,
        bit_trials=bit_trials, **({"bits": tuple(bits)} if bits else {}), report_ber=report_ber,
        variants=tuple(v.strip() for v in variants.split(",")) if variants else None)
    with checkpoint.allowing(model):  # the variants it saved and reloads share the trusted builder
        summary = compare_mod.run_compare(net, spec, output, config,
                                          record={"checkpoint": str(checkpoint_path or output / "model.pt"),
                                                  "model_name": checkpoint.get_spec(net)["builder"]})
    console.print(compare_mod.headline(summary))
    console.print(f"report: {output / 'report.html'}")


@app.command()
def report(run: Path = typer.Argument(..., help="a run folder written by `ftcnn compare`")) -> None:
    """Rebuild the plots, summary.csv and report.html of a comparison from its stored results.

    Example: ftcnn report runs/cmp
    """
    from ftcnn import report as report_mod

    console.print(f"report: {report_mod.build_report(run)}")


@app.command()
def harden(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT"),
    scores: Optional[Path] = typer.Option(None, help="vulnerability scores JSON (from `ftcnn analyze`); "
                                          "not needed for --tmr full or --ratio 0"),
    ratio: float = typer.Option(0.1, help="share of each layer's channels to duplicate (top by score)"),
    budget: Optional[float] = typer.Option(None, help="instead of --ratio: extra MACs allowed, e.g. 0.2 = +20%"),
    correction: str = typer.Option("min", help="min (the paper's), range or tmr (selective TMR)"),
    tmr: Optional[str] = typer.Option(None, help="'full': full TMR of every layer (baseline)"),
    restrict: Optional[str] = typer.Option(None, help="range restriction of every layer: zero or clamp"),
    margin: float = typer.Option(0.0, help="widen profiled ranges by this share of their width"),
    check_weights: Optional[str] = typer.Option(None, help="parameter-side check of every layer's weights "
                                                "against their fault-free per-channel bounds, at use: "
                                                "zero or clamp out-of-bound values"),
    data: Optional[str] = typer.Option(None, help="data set (default: the checkpoint's, if built-in)"),
    model_spec: Optional[str] = typer.Option(None, "--model", help=MODEL_TRUST_HELP),
    calibration_size: int = typer.Option(1000, min=1, help="training inputs to profile ranges on"),
    seed: int = typer.Option(0, help="seed of the calibration subset"),
    onnx: Optional[Path] = typer.Option(None, help="also export the hardened model to this ONNX file"),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="hardened checkpoint to write"),
) -> None:
    """Duplicate the most vulnerable filters/neurons (or TMR, or range restriction) and save the model.

    Prints parameters, MACs and CPU latency relative to the original, and both clean accuracies.
    Examples:

      ftcnn harden lenet5.pt --scores scores.json --ratio 0.1 --correction min -o hardened.pt

      ftcnn harden lenet5.pt --tmr full -o tmr.pt

      ftcnn harden lenet5.pt --ratio 0 --restrict zero --margin 0.1 -o ranger.pt

      ftcnn harden lenet5.pt --ratio 0 --check-weights zero -o checked.pt
    """
    from ftcnn import campaign, checkpoint, harden as harden_mod, train as train_mod
    from ftcnn.splits import calibration_subset

    _check_output_file(output)
    if onnx is not None:
        _check_output_file(onnx)
    net = _load_model(checkpoint_path, model_spec, data)
    _threads(threads, net)
    spec = _data_spec(data, checkpoint.meta(net))
    layer_scores = harden_mod.load_scores(scores) if scores is not None else None
    train_x, _ = campaign.stack_dataset(_load_data(spec, "train"))
    calibration = calibration_subset(train_x, calibration_size, seed)  # the one rule (ftcnn.splits)
    hardened = harden_mod.harden(net, layer_scores, ratio=ratio, budget=budget, correction=correction,
                                 tmr=tmr, restrict=restrict, margin=margin, calibration=calibration,
                                 check_weights=check_weights)
    test_set = _load_data(spec, "test")
    input_shape = tuple(train_x.shape[1:])
    acc_original = train_mod.evaluate(net, test_set)
    acc_hardened = train_mod.evaluate(hardened, test_set)
    cost = harden_mod.overheads(net, hardened, input_shape)
    record = {"scores": str(scores) if scores else None, "ratio": ratio, "budget": budget,
              "correction": "tmr" if tmr == "full" else correction, "tmr": tmr, "restrict": restrict,
              "margin": margin, "check_weights": check_weights,
              "calibration_size": len(calibration), "seed": seed,
              "protected": harden_mod.protected(hardened),
              "original_test_accuracy": acc_original, "overheads": cost}
    checkpoint.save(hardened, output, data=spec, test_accuracy=acc_hardened, hardening=record)
    if onnx is not None:
        harden_mod.export_onnx(hardened, onnx, input_shape)
    rel = cost["relative"]
    n_protected = sum(len(v) for v in record["protected"].values())
    console.print(f"protected channels: {n_protected} in {len(record['protected'])} layers")
    console.print(f"parameters x{rel['params']:.3f}, MACs x{rel['macs']:.3f} "
                  f"(correction {cost['hardened']['elementwise']:,} ops), latency x{rel['latency_b1_ms']:.2f} "
                  f"at batch 1, x{rel['latency_b128_ms']:.2f} at batch 128 (CPU)")
    console.print(f"clean test accuracy: original {acc_original:.2%}, hardened {acc_hardened:.2%} -> {output}")
    if onnx is not None:
        console.print(f"ONNX: {onnx}")


def _print_protection(result, title: str) -> None:
    """The candidates of a protection search: costs, validation accuracy, front, choice."""
    from rich.table import Table

    ber = result.config["ber"]
    table = Table(title=title)
    for col in ("candidate", "MACs x", "latency x", f"val acc @{ber:g}", "95% CI", "front", "fits"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for r in result.records:
        v = r["validation"]
        lat = r.get("latency_ratio")
        table.add_row(("* " if r["chosen"] else "") + r["name"], f"{r['macs_ratio']:.3f}" if r.get("built") else "-",
                      "-" if lat is None else f"{lat:.2f}", "-" if v is None else f"{v['accuracy']:.2%}",
                      "-" if v is None else f"[{v['accuracy_ci'][0]:.2%}, {v['accuracy_ci'][1]:.2%}]",
                      "yes" if r["pareto"] else "", "yes" if r["within_budget"] else "no")
    console.print(table)
    console.print(f"chosen: {result.chosen} ({result.reason})")
    for name, t in (result.test or {}).items():
        at = ", ".join(f"{p['accuracy']:.2%} [{p['accuracy_ci'][0]:.2%}, {p['accuracy_ci'][1]:.2%}] at BER {b}"
                       for b, p in t["bers"].items())
        console.print(f"test split, {name}: clean {t['clean']:.2%}; {at}")


@app.command()
def protect(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT"),
    data: Optional[str] = typer.Option(None, help="data set (default: the checkpoint's, if built-in)"),
    model_spec: Optional[str] = typer.Option(None, "--model", help=MODEL_TRUST_HELP),
    ber: float = typer.Option(1e-4, help="bit error rate the protection is chosen for"),
    max_macs: float = typer.Option(1.15, help="MACs allowed relative to the model's (checks included)"),
    max_latency: Optional[float] = typer.Option(None, help="latency allowed relative to the model's "
                                                "(batch 128, 1 thread, CPU)"),
    trials: int = typer.Option(100, help="fault-injection trials per candidate"),
    seed: int = typer.Option(0),
    output: Path = typer.Option(..., "-o", "--output", help="output folder"),
) -> None:
    """Search the protections within a cost budget; choose on a validation split, report on test.

    Writes protected.pt, front.json (every candidate, the Pareto front, the choice and why) and front.png.

    Example: ftcnn protect lenet5.pt --data mnist5k --ber 1e-4 --max-macs 1.15 --max-latency 1.2 -o runs/protect
    """
    from ftcnn import checkpoint, protect as protect_mod

    protect_mod.check_budget(max_macs, max_latency, ber, trials)
    net = _load_model(checkpoint_path, model_spec, data)
    spec = _data_spec(data, checkpoint.meta(net))
    result = protect_mod.protect_run(net, spec, output, ber=ber, max_macs=max_macs, max_latency=max_latency,
                                     trials=trials, seed=seed, allow_builder=model_spec,
                                     source=str(checkpoint_path), log=console.print)
    _print_protection(result, f"protections within x{max_macs:g} MACs"
                      + (f", x{max_latency:g} latency" if max_latency else "") + f" (BER {ber:g})")
    console.print(f"results: {output}/front.json, {output}/front.png, model {output}/protected.pt")


# `ftcnn prune ... --protect a b --layer-ratio a=0.5 b=0.2`
MULTI_VALUE_OPTIONS.update({"--protect", "--layer-ratio"})
NAME_VALUE_OPTIONS.update({"--protect", "--layer-ratio"})


def _parse_layer_ratios(items: List[str]) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--layer-ratio takes name=ratio, e.g. features.3=0.5 (got {item!r})")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--layer-ratio {item!r}: {value!r} is not a number") from None
    return out


@app.command("prune")
def prune_command(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT"),
    data: Optional[str] = typer.Option(None, help="data set (default: the checkpoint's, if built-in)"),
    model_spec: Optional[str] = typer.Option(None, "--model", help=MODEL_TRUST_HELP),
    scores: Optional[Path] = typer.Option(None, help="vulnerability scores JSON (`ftcnn analyze`); "
                                          "default: gain scores on training inputs"),
    ratio: float = typer.Option(0.3, help="share of each layer's output channels to remove (rounded down)"),
    layer_ratio: List[str] = typer.Option([], help="per-layer ratios instead of --ratio: name=0.5 ..."),
    criterion: str = typer.Option("vulnerability", help="vulnerability (lowest score goes) or l1"),
    protect: List[str] = typer.Option([], help="layers never pruned (default: the first conv/linear; "
                                      "'none' for no layer); the output layer is always kept"),
    finetune_epochs: int = typer.Option(3, min=0),
    lr: float = typer.Option(1e-3, help="fine-tuning learning rate"),
    samples: int = typer.Option(256, min=1, help="training inputs for gain scores (without --scores)"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="checkpoint to write"),
) -> None:
    """Structured channel pruning (least vulnerable or smallest-L1 filters), then a short fine-tune.

    Prints and stores in the checkpoint's metadata the clean accuracy before pruning, after
    pruning and after fine-tuning, and the parameters and MACs before and after.

    Example: ftcnn prune lenet5.pt --data mnist5k --scores scores.json --ratio 0.3 --finetune-epochs 3 -o pruned.pt
    """
    from ftcnn import checkpoint, cost, prune as prune_mod, train as train_mod, vulnerability

    _check_output_file(output)
    if criterion not in prune_mod.CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; choose from {', '.join(prune_mod.CRITERIA)}")
    net = _load_model(checkpoint_path, model_spec, data)
    _threads(threads, net)
    spec = _data_spec(data, checkpoint.meta(net))
    train_set, test_set = _load_data(spec, "train"), _load_data(spec, "test")
    from ftcnn import campaign
    campaign.check_input_shape(net, test_set.tensors[0][:1])
    input_shape = tuple(train_set.tensors[0].shape[1:])
    protected = None if not protect else [] if protect == ["none"] else protect
    ratios = _parse_layer_ratios(layer_ratio) if layer_ratio else ratio
    prune_mod.check_arguments(net, ratio=ratios, criterion=criterion, protect=protected, input_shape=input_shape)
    if criterion == "l1":
        vuln = None
    elif scores is not None:
        vuln = vulnerability.load_scores(scores)
    else:
        vuln = vulnerability.analyze(net, *train_set.tensors, method="gain", samples=samples, seed=seed)
    before = train_mod.evaluate(net, test_set)
    pruned = prune_mod.prune(net, ratio=ratios, criterion=criterion, scores=vuln, protect=protected,
                             input_shape=input_shape)
    after = train_mod.evaluate(pruned, test_set)
    train_mod.seed_everything(seed)
    losses = prune_mod.finetune(pruned, train_set, finetune_epochs, lr=lr, seed=seed)
    tuned = train_mod.evaluate(pruned, test_set)
    cost_before = {"params": cost.parameters(net), "macs": cost.macs(net, input_shape)["macs"]}
    cost_after = {"params": cost.parameters(pruned), "macs": cost.macs(pruned, input_shape)["macs"]}
    checkpoint.save(pruned, output, data=spec, test_accuracy=tuned, accuracy_original=before,
                    accuracy_before_finetune=after, params_before=cost_before["params"],
                    params_after=cost_after["params"], macs_before=cost_before["macs"],
                    macs_after=cost_after["macs"], criterion=criterion, ratio=ratios,
                    finetune_epochs=finetune_epochs, finetune_losses=losses, seed=seed,
                    removed_channels=prune_mod.removed_channels(pruned))
    console.print(f"accuracy: original {before:.2%}, pruned {after:.2%}, fine-tuned ({finetune_epochs} "
                  f"epochs) {tuned:.2%}")
    console.print(f"params {cost_before['params']:,} -> {cost_after['params']:,} "
                  f"({cost_after['params'] / cost_before['params']:.1%}); MACs {cost_before['macs']:,} -> "
                  f"{cost_after['macs']:,} ({cost_after['macs'] / cost_before['macs']:.1%})")
    console.print(f"removed channels: {prune_mod.removed_channels(pruned)} -> {output}")


@app.command()
def pipeline(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT"),
    data: Optional[str] = typer.Option(None, help="data set (default: the checkpoint's, if built-in)"),
    model_spec: Optional[str] = typer.Option(None, "--model", help=MODEL_TRUST_HELP),
    prune_ratio: float = typer.Option(0.3, help="share of each layer's output channels to remove"),
    harden_ratio: float = typer.Option(0.1, help="share of each layer's channels to duplicate"),
    correction: str = typer.Option("min", help="hardening correction: min, range or tmr"),
    criterion: str = typer.Option("vulnerability", help="pruning criterion: vulnerability or l1 (baseline)"),
    restrict: Optional[str] = typer.Option(None, help="also range-restrict: zero or clamp"),
    finetune_epochs: int = typer.Option(3, min=0),
    lr: float = typer.Option(1e-3, help="fine-tuning learning rate"),
    samples: int = typer.Option(256, min=1, help="training inputs for the gain scores"),
    seed: int = typer.Option(0),
    max_macs: Optional[float] = typer.Option(None, help="end-to-end mode: prune -> fine-tune -> protect "
                                             "within this many MACs relative to the ORIGINAL model (e.g. 1.0)"),
    max_latency: Optional[float] = typer.Option(None, help="end-to-end mode: latency allowed relative to "
                                                "the original (batch 128, 1 thread)"),
    ber: float = typer.Option(1e-4, help="end-to-end mode: bit error rate the protection is chosen for"),
    trials: int = typer.Option(100, help="end-to-end mode: trials per candidate campaign"),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="run folder (resumed if it exists)"),
) -> None:
    """The paper's pipeline: score -> prune -> fine-tune -> re-score -> harden, vs hardening unpruned.

    Writes scores_original.json, pruned.pt, scores_pruned.json, hardened.pt, hardened_unpruned.pt
    and summary.json (params, MACs, CPU latency, clean accuracy per stage); re-running resumes.
    With --max-macs (end-to-end mode): prune -> fine-tune -> protect (``ftcnn protect``'s search)
    within a budget relative to the original model; writes pruned.pt, protected.pt, front.json, front.png.

    Example: ftcnn pipeline lenet5.pt --data mnist5k --prune-ratio 0.3 --harden-ratio 0.1 --correction min -o runs/pipe

    Example: ftcnn pipeline lenet5.pt --data mnist5k --prune-ratio 0.3 --max-macs 1.0 --ber 1e-4 -o runs/e2e
    """
    from rich.table import Table

    from ftcnn import campaign, checkpoint, prune as prune_mod

    if max_macs is not None:
        from ftcnn import protect as protect_mod
        protect_mod.check_budget(max_macs, max_latency, ber, trials)
    net = _load_model(checkpoint_path, model_spec, data)
    _threads(threads, net)
    spec = _data_spec(data, checkpoint.meta(net))
    train_set, test_set = _load_data(spec, "train"), _load_data(spec, "test")
    campaign.check_input_shape(net, test_set.tensors[0][:1])
    if max_macs is not None:
        from ftcnn import pipeline as pipeline_mod
        with checkpoint.allowing(model_spec):
            result = pipeline_mod.prune_and_protect(
                net, train_set, test_set, output, prune_ratio=prune_ratio, criterion=criterion,
                finetune_epochs=finetune_epochs, lr=lr, max_macs=max_macs, max_latency=max_latency, ber=ber,
                trials=trials, seed=seed, samples=samples,
                record={"data": spec, "checkpoint": str(checkpoint_path)}, log=console.print)
        _print_protection(result, f"{criterion} pruning {prune_ratio}, then protections within x{max_macs:g} "
                          f"of the ORIGINAL's MACs (BER {ber:g})")
        e2e = result.extra["end_to_end"]
        console.print(f"clean test accuracy: original {e2e['clean_test']['original']:.2%}, pruned "
                      f"{e2e['clean_test']['pruned']:.2%}, protected {e2e['clean_test']['protected']:.2%}")
        console.print(f"results: {output}/front.json, {output}/front.png, model {output}/protected.pt")
        return
    with checkpoint.allowing(model_spec):  # the stages it saved and reloads share the trusted builder
        summary = prune_mod.pipeline(net, train_set, test_set, output, prune_ratio=prune_ratio,
                                     harden_ratio=harden_ratio, correction=correction, criterion=criterion,
                                     finetune_epochs=finetune_epochs, lr=lr, samples=samples, seed=seed,
                                     restrict=restrict, record={"data": spec, "checkpoint": str(checkpoint_path)},
                                     log=console.print)
    table = Table(title=f"pipeline ({criterion} pruning {prune_ratio}, hardening {harden_ratio} {correction})")
    for col in ("stage", "accuracy", "params", "MACs", "latency b1 (ms)", "latency b128 (ms)"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, row in summary["stages"].items():
        acc = row.get("accuracy")
        table.add_row(stage, "-" if acc is None else f"{acc:.2%}", f"{row['params']:,}", f"{row['macs']:,}",
                      f"{row['latency_b1_ms']:.3f}", f"{row['latency_b128_ms']:.2f}")
    console.print(table)
    rel = summary["relative"]["hardened_pruned_vs_hardened_unpruned"]
    console.print(f"hardened-pruned vs hardened-unpruned: params {rel['params']:.2f}x, MACs {rel['macs']:.2f}x, "
                  f"latency b1 {rel['latency_b1_ms']:.2f}x, b128 {rel['latency_b128_ms']:.2f}x")
    console.print(f"results: {output}/summary.json")


# --- analyze (vulnerability scores, design §3) --------------------------------

def _analyze_settings(method: str, samples: Optional[int], seed: int, margin: Optional[float],
                      confidence: Optional[float], bits: List[int], pilot: Optional[int]) -> dict:
    """The options the user gave that ``method`` takes (the others keep its defaults)."""
    from ftcnn import vulnerability

    given = {"samples": samples, "seed": seed, "margin": margin, "confidence": confidence,
             "bits": list(bits) or None, "pilot": pilot}
    takes = vulnerability.settings_of(method)
    return {k: v for k, v in given.items() if k in takes and v is not None}


def _analyze_inputs(method: str, spec: str, limit: Optional[int]):
    """gain learns from TRAINING inputs; fi measures on TEST inputs; l1 needs none."""
    from ftcnn import campaign

    split = "train" if method == "gain" else "test"
    x, y = campaign.stack_dataset(_load_data(spec, split))
    return (x[:limit], y[:limit]) if limit else (x, y)


def _analyze_one(net, method: str, spec: str, limit: Optional[int], settings: dict,
                 checkpoint_path: Path) -> dict:
    from ftcnn import campaign, vulnerability

    vulnerability.get_method(method)  # unknown method: one clear line before loading data
    x, y = _analyze_inputs(method, spec, limit)
    campaign.check_input_shape(net, x)
    scores = vulnerability.analyze(net, x, y, method=method, **settings)
    scores.update(checkpoint=str(checkpoint_path), data=spec, inputs=len(x))
    return scores


@app.command()
def analyze(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT"),
    data: Optional[str] = typer.Option(None, help="data set (default: the checkpoint's, if built-in)"),
    model_spec: Optional[str] = typer.Option(None, "--model", help=MODEL_TRUST_HELP),
    method: str = typer.Option("gain", help="gain (gradient, training inputs), fi (fault injection, "
                                            "test inputs) or l1 (weight norm)"),
    samples: Optional[int] = typer.Option(None, min=1, help="gain: inputs used (default 256); "
                                                            "fi: max faults per channel (default 256)"),
    seed: int = typer.Option(0),
    margin: Optional[float] = typer.Option(None, help="fi: Leveugle error margin (default 0.05)"),
    confidence: Optional[float] = typer.Option(None, help="fi: Leveugle confidence (default 0.95)"),
    bits: List[int] = typer.Option([], help="fi: only these bit positions (default: all 32)"),
    pilot: Optional[int] = typer.Option(None, min=0, help="fi: pilot faults per bit position that steer "
                                                          "the sample to the bits that matter (default 16; "
                                                          "0: equal share per bit)"),
    limit: Optional[int] = typer.Option(None, min=1, help="use only the first N inputs"),
    compare: Optional[str] = typer.Option(None, help="comma-separated methods to rank against --against"),
    against: str = typer.Option("fi", help="with --compare: the reference method"),
    scores_dir: Optional[Path] = typer.Option(None, help="with --compare: take METHOD.json from here "
                                                         "if present, and store computed scores here"),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="scores JSON (plot beside it as .png); "
                                                                        "with --compare: the agreement JSON"),
) -> None:
    """Score every filter/neuron's vulnerability, or rank methods against each other.

    gain uses the data set's training inputs, fi its test inputs (critical SDCs
    are measured where accuracy is), l1 only the weights.

    Example: ftcnn analyze lenet5.pt --data mnist5k --method gain -o scores.json

    Example: ftcnn analyze lenet5.pt --compare gain,l1 --against fi --scores-dir scores -o agreement.json
    """
    from ftcnn import checkpoint, vulnerability

    if compare is None and output is None:
        raise ValueError("give -o/--output for the scores file (or --compare to rank methods)")
    if output is not None:
        _check_output_file(output)
    net = _load_model(checkpoint_path, model_spec, data)
    _threads(threads, net)
    spec = _data_spec(data, checkpoint.meta(net))
    if compare is None:
        settings = _analyze_settings(method, samples, seed, margin, confidence, bits, pilot)
        scores = _analyze_one(net, method, spec, limit, settings, checkpoint_path)
        vulnerability.save_scores(scores, output)
        for name, values in scores["layers"].items():
            top = ", ".join(f"#{i} {v:.4g}" for i, v in vulnerability.top_channels(values))
            console.print(f"{name}: {len(values)} channels, top {top}")
        console.print(f"{method} scores in {scores['seconds']:.1f}s -> {output} "
                      f"(plot {output.with_suffix('.png')})")
        return
    methods = [m.strip() for m in compare.split(",") if m.strip()]
    if not methods:
        raise ValueError("--compare needs at least one method, e.g. --compare gain,l1")
    for m in methods + [against]:
        vulnerability.get_method(m)
    if scores_dir is not None:
        scores_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for m in dict.fromkeys(methods + [against]):
        cached = scores_dir / f"{m}.json" if scores_dir is not None else None
        if cached is not None and cached.exists():
            results[m] = vulnerability.load_scores(cached)
            if results[m].get("checkpoint") not in (None, str(checkpoint_path)):
                console.print(f"note: {cached} was computed for {results[m]['checkpoint']}")
            console.print(f"{m}: scores from {cached}")
            continue
        settings = _analyze_settings(m, samples, seed, margin, confidence, bits, pilot)
        results[m] = _analyze_one(net, m, spec, limit, settings, checkpoint_path)
        console.print(f"{m}: computed in {results[m]['seconds']:.1f}s")
        if cached is not None:
            vulnerability.save_scores(results[m], cached)
    agreement = {m: vulnerability.rank_agreement(results[m], results[against]) for m in methods}
    _print_agreement(agreement, methods, against)
    if output is not None:
        blob = {"against": against, "checkpoint": str(checkpoint_path), "data": spec,
                "agreement": agreement,
                "settings": {m: results[m].get("settings", {}) for m in results}}
        from ftcnn import files
        files.write_json(output, blob, indent=1)  # strict: an undefined rho is null, never NaN
        console.print(f"rank agreement -> {output}")


def _print_agreement(agreement: dict, methods: list, against: str) -> None:
    from rich.table import Table

    def fmt(r: Optional[float]) -> str:
        return "-" if r is None else f"{r:+.3f}"

    table = Table(title=f"Spearman rank correlation with {against}")
    table.add_column("layer")
    table.add_column("channels", justify="right")
    for m in methods:
        table.add_column(m, justify="right")
    first = agreement[methods[0]]
    for name, row in first["layers"].items():
        table.add_row(name, str(row["n"]), *(fmt(agreement[m]["layers"][name]["rho"]) for m in methods))
    table.add_row("all channels (pooled)", str(first["overall"]["n"]),
                  *(fmt(agreement[m]["overall"]["rho"]) for m in methods))
    table.add_row("mean over layers", "", *(fmt(agreement[m]["mean_layer_rho"]) for m in methods))
    console.print(table)
