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
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fault injection, vulnerability analysis, hardening and pruning for CNNs.")
console = Console()

# options that take several values after one flag, as in `--ber 1e-6 1e-5`
MULTI_VALUE_OPTIONS = {"--ber", "--count", "--bits", "--layers"}


def _load_data(spec: str, split: str, seed: int = 0):
    from ftcnn import data
    return data.load(spec, split, seed=seed)


def _data_spec(data: Optional[str], model_meta: dict) -> str:
    spec = data or model_meta.get("data")
    if not spec:
        raise ValueError("no --data given and the checkpoint does not record its data set")
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
    data: Optional[str] = typer.Option(None, help="data set (default: the one the model was trained on)"),
    ber: List[float] = typer.Option([], help="bit error rates, e.g. --ber 1e-6 1e-5 1e-4"),
    count: List[int] = typer.Option([], help="exact fault counts per trial instead of --ber"),
    trials: str = typer.Option("100", help="trials per point, or 'auto' (Leveugle sizing + early stop)"),
    margin: float = typer.Option(0.01, help="with --trials auto: target half-width of the accuracy CI"),
    confidence: float = typer.Option(0.95),
    seed: int = typer.Option(0),
    dtype: str = typer.Option("float32", help="storage format faults hit: float32, float16, bfloat16, int8"),
    bits: List[int] = typer.Option([], help="only these bit positions (default: all)"),
    mode: str = typer.Option("flip", help="flip, stuck0 or stuck1"),
    include_bn: bool = typer.Option(False, help="also inject into BatchNorm affine parameters"),
    layers: List[str] = typer.Option([], help="only these layers (module names)"),
    limit: Optional[int] = typer.Option(None, min=1, help="use only the first N test inputs"),
    batch_size: int = typer.Option(1000, min=1),
    device: str = typer.Option("cpu"),
    output: Path = typer.Option(..., "-o", "--output", help="run folder (resumed if it exists)"),
) -> None:
    """Run (or resume) a statistical fault-injection campaign.

    Example: ftcnn inject lenet5.pt --data mnist5k --ber 1e-6 1e-5 1e-4 --trials 100 --seed 0 -o runs/inj
    """
    from ftcnn import campaign, checkpoint

    config = campaign.CampaignConfig(
        bers=tuple(ber), counts=tuple(count), trials=_parse_trials(trials), margin=margin,
        confidence=confidence, seed=seed, dtype=dtype, bits=tuple(bits) or None, mode=mode,
        include_bn=include_bn, layers=tuple(layers) or None, batch_size=batch_size)
    model = checkpoint.load(checkpoint_path).to(device)
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


@app.command()
def demo(
    output: Path = typer.Option(Path("runs/demo"), "-o", "--output", help="folder for the model and results"),
    epochs: int = typer.Option(5, min=1),
    trials: int = typer.Option(30, min=1),
    seed: int = typer.Option(0),
) -> None:
    """The main job on built-in data: train LeNet-5 on the MNIST digits, then a fault campaign.

    Example: ftcnn demo -o runs/demo
    """
    from ftcnn import campaign, checkpoint, data as data_mod, train as train_mod

    output.mkdir(parents=True, exist_ok=True)
    model_path = output / "lenet5.pt"
    if model_path.exists():
        model = checkpoint.load(model_path)
        console.print(f"reusing {model_path}")
    else:
        info = data_mod.info("mnist5k")
        train_mod.seed_everything(seed)
        model = checkpoint.build("lenet5", num_classes=info.num_classes, in_channels=info.in_channels,
                                 input_size=info.input_size)
        train_mod.fit(model, _load_data("mnist5k", "train"), epochs=epochs, seed=seed)
        accuracy = train_mod.evaluate(model, _load_data("mnist5k", "test"))
        checkpoint.save(model, model_path, data="mnist5k", test_accuracy=accuracy, epochs=epochs, seed=seed)
        console.print(f"LeNet-5 on mnist5k: test accuracy {accuracy:.2%} -> {model_path}")
    inputs, labels = campaign.stack_dataset(_load_data("mnist5k", "test"))
    config = campaign.CampaignConfig(bers=(1e-6, 1e-5, 1e-4), trials=trials, seed=seed)
    summary = campaign.run_campaign(model, inputs, labels, config, output / "campaign",
                                    record={"checkpoint": str(model_path), "data": "mnist5k"})
    console.print(campaign.format_table(summary))
    console.print(f"results: {output / 'campaign' / 'summary.json'}")


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
            _is_number(token) if flag != "--layers"
            else not token.startswith("-") and not token.endswith(".pt"))
        if takes:
            out.extend([flag, token])
            continue
        flag = token if token in MULTI_VALUE_OPTIONS else None
        if flag is None:
            out.append(token)
    return out


def main() -> None:
    argv = _expand_multi_values(sys.argv[1:])
    try:
        app(args=argv, prog_name="ftcnn")
    except (ValueError, FileNotFoundError, PermissionError, OSError, KeyError) as exc:
        if os.environ.get("FTCNN_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


# --- commands added by later features are appended below this line ---------
