"""The ``ftcnn`` command line: parses arguments, calls one library function per command, prints.

The commands follow the data flow: train, analyze, harden, prune, pipeline,
inject, compare, report, demo, protect, study. Every flow they run lives in
``ftcnn.flows.pipeline`` (or ``protect.protect_run``, ``compare.compare_run``,
``report.build_report``, ``study.run_study``); nothing here trains, evaluates, calibrates or
scores (``tests/test_cli.py`` checks it).

Every user mistake ends in one line on stderr and exit status 2; set
FTCNN_DEBUG=1 to see the traceback instead. A ``--device`` that is not there
(``cuda`` without a GPU) is such a mistake, refused before any work.

Start-up imports no torch (issue 24): the library modules are proxies (``ftcnn.lazy``)
imported when a command first uses them, so ``ftcnn --help`` and ``--version`` take a
fraction of a second; help texts take their library numbers from ``ftcnn.constants``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional

import typer
from rich.table import Table

from ftcnn import constants, progress, rules
from ftcnn._version import __version__
from ftcnn.lazy import lazy

if TYPE_CHECKING:  # what the proxies below stand for (the checks in tests/ read this import)
    import torch

    from ftcnn import checkpoint
    from ftcnn.campaigns import campaign, campaign_file, distributed
    from ftcnn.flows import compare as compare_mod, pipeline as flows, study as study_mod
    from ftcnn.protection import protect as protect_mod, vulnerability
    from ftcnn.reporting import report as report_mod
else:  # each imported on first use, inside the command that needs it
    torch = lazy("torch")
    campaign, campaign_file, checkpoint, compare_mod, distributed, flows, protect_mod, report_mod, vulnerability = (
        lazy(f"ftcnn.{name}") for name in ("campaigns.campaign", "campaigns.campaign_file", "checkpoint",
                                           "flows.compare", "campaigns.distributed", "flows.pipeline",
                                           "protection.protect", "reporting.report", "protection.vulnerability"))
    study_mod = lazy("ftcnn.flows.study")  # `ftcnn study` (issue 22)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fault injection, vulnerability analysis, hardening and pruning for CNNs.")
console = progress.console()  # full-width tables, no escape codes, when not a terminal

# options that take several values after one flag, as in `--ber 1e-6 1e-5`
MULTI_VALUE_OPTIONS = {"--ber", "--count", "--bits", "--layers", "--keep", "--protect", "--layer-ratio",
                       "--ber-per-layer", "--models", "--seeds", "--activation-ber", "--targets", "--prune-grid"}
# ...of them, those whose values are names (not numbers)
NAME_VALUE_OPTIONS = {"--layers", "--keep", "--protect", "--layer-ratio", "--ber-per-layer", "--models",
                      "--targets"}

# `--margin` meant three things (issue 11); its old spelling is accepted for one release
MARGIN_RENAMED = {"inject": "--ci-half-width", "analyze": "--sample-margin", "harden": "--range-margin",
                  "compare": "--range-margin"}
# command -> {old spelling: new}: accepted for one release, with one line on stderr; `prune --protect`
# (layers never pruned) read as `ftcnn protect` (issue 23): now `prune --keep`
RENAMED_OPTIONS = {**{command: {"--margin": new} for command, new in MARGIN_RENAMED.items()},
                   "prune": {"--protect": "--keep"}}

# `--model` on the commands that load a checkpoint: the opt-in to a user builder
MODEL_TRUST_HELP = ("trust the checkpoint's user builder package.module:fn (importing it runs its code); "
                    "must equal the name the checkpoint stores")

def _limit(setting: str, flag: str) -> Callable[[Any], Any]:
    """A typer callback: the option's value checked by the rule of ``setting`` (``ftcnn.rules``) as
    it is parsed, before any work (one ``error:`` line naming ``flag``); unset values (None, no
    values) pass."""
    def check(value: Any) -> Any:
        if value is None or value == []:
            return value
        return rules.check(setting, value, flag)
    return check


def _option(setting: str, command: str, *decls: str, **extra: Any) -> Any:
    """The typer option of ``setting`` in ``command``, built from its rule (``ftcnn.rules``): its
    default and help there, and its check as the value is parsed (a sweep, like ``--ber 1e-6 1e-5``,
    by the rule of points). One rule per setting is what makes an option mean the same in every
    command (``tests/test_vocabulary.py``)."""
    rule = rules.rule(setting)
    flag = decls[0] if decls else "--" + setting.replace("_", "-")
    default = rule.default_for(command)
    many = isinstance(default, tuple)
    return typer.Option(list(default) if many else default, *decls, help=rule.help_for(command),
                        callback=_limit("points" if many else setting, flag), **extra)


def _trials_option(command: str) -> Any:
    """``--trials``: a number, or "auto" where the command has a stopping rule (``rules.trials``:
    elsewhere refused in one line that says why); the command receives an int (or "auto")."""
    rule = rules.rule("trials")
    return typer.Option(str(rule.default_for(command)), "--trials", help=rule.help_for(command),
                        metavar="N|auto" if command in rules.TRIALS_AUTO else "N",
                        callback=lambda value: rules.trials(value, command))


DATA_HELP = "data set (default: the checkpoint's, if built-in)"

# `--normalize` on every command that loads data (issue 23); parsed by ftcnn.data (via pipeline.check_normalize)
NORMALIZE_HELP = ("how inputs are normalised: dataset (per channel, by the training split's mean/std; the "
                  "default), none (raw values, e.g. digits 0..16) or MEAN/STD (e.g. 0.5/0.25, or per channel "
                  "0.49,0.48,0.45/0.25,0.24,0.26); a checkpoint's record is used, a contradicting value refused")


def _normalize(value: Optional[str]) -> Optional[str]:
    """A typer callback: ``--normalize`` checked as it is parsed, before any work (one line)."""
    if value is not None:
        flows.check_normalize(value)
    return value


def _normalize_option() -> Any:
    return typer.Option(None, "--normalize", metavar="none|dataset|MEAN/STD", help=NORMALIZE_HELP,
                        callback=_normalize)


# `--device` on every command that computes (issue 14); checked by _check_device before any work
DEVICE_HELP = "cpu, cuda, cuda:1, ... (same results within float tolerance; files saved from the CPU)"


def _data_spec(data: Optional[str], meta: dict) -> str:
    """--data, else the checkpoint's built-in data set."""
    return flows.resolve_data(data, meta)


def _load_model(checkpoint_path: Path, model_spec: Optional[str], data: Optional[str]):
    """A checkpoint, or a plain state dict with --model package.module:fn."""
    return flows.load_model(checkpoint_path, model_spec, data)


def _threads(threads: Optional[int], model=None, workers: int = 1) -> int:
    """Fit torch's intra-op threads to the machine (``distributed.apply_threads``: the thread policy,
    ``ftcnn.campaigns.parallelism``) before the work; a terminal is told the choice and why, once (a log file
    is not: summary.json records it)."""
    n = distributed.apply_threads(threads, model, workers)
    if progress.is_terminal():
        print(distributed.parallelism.applied().line(), file=sys.stderr)
    return n


def _loaded(checkpoint_path: Path, model_spec: Optional[str], data: Optional[str],
            threads: Optional[int] = None):
    """The model of CHECKPOINT, torch's threads set for it, and the data set to use."""
    net = _load_model(checkpoint_path, model_spec, data)
    _threads(threads, net)
    return net, _data_spec(data, checkpoint.meta(net))


def _inputs(net, spec: str, normalize: Optional[str], device: str = "cpu"):
    """The command's block in which data loads and saved checkpoints use ``net``'s normalisation."""
    return flows.inputs_for(net, spec, normalize, device=device)


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


MAX_MEMORY_HELP = ("stored bits allowed (weights, bounds, copies, code words), a ratio to the model's "
                   "(1.10 = +10%; pipeline: to the ORIGINAL model's); default no limit")


def _check_device(device: str) -> None:
    """Refuse, in one line before any work, a device torch does not know or this machine lacks."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} is not available here (no CUDA GPU); use --device cpu")


def _bound_copies(value: Optional[int]) -> Optional[int]:
    """``harden --bound-copies``: 1, 2, 3 or 5, checked as it is parsed (one line, before any work)."""
    if value is not None and value not in (1, 2, 3, 5):
        raise ValueError(f"--bound-copies must be 1, 2, 3 or 5 (got {value})")
    return value


def _print_version(value: bool) -> None:
    if value:
        print(f"ftcnn {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                          help="print the version and exit")) -> None:
    """Options of ``ftcnn`` itself, given before the command (the page's text is the Typer's)."""


# --- train -----------------------------------------------------------------------------------------

@app.command()
def train(
    model: str = typer.Option(..., help="registry name (lenet5, vgg11, ...) or package.module:builder"),
    data: str = typer.Option("mnist5k", help="mnist5k, digits, cifar10:PATH, cifar100:PATH, imagefolder:PATH, npz:PATH"),
    normalize: Optional[str] = _normalize_option(),
    epochs: int = typer.Option(5, min=0),
    lr: float = typer.Option(2e-3),
    batch_size: int = typer.Option(64, min=1),
    width: float = typer.Option(1.0, help="channel width multiplier"),
    seed: int = _option("seed", "train"),
    threads: Optional[int] = _option("threads", "train"),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="checkpoint to write"),
) -> None:
    """Train a model on a data set and save a checkpoint.

    Example: ftcnn train --model lenet5 --data mnist5k --epochs 5 --seed 0 -o lenet5.pt
    """
    _check_device(device)
    accuracy = flows.train_checkpoint(model, data, output, epochs=epochs, lr=lr, batch_size=batch_size,
                                      width=width, seed=seed, threads=threads, device=device,
                                      normalize=normalize)
    console.print(f"{model} on {data}: test accuracy {accuracy:.2%} -> {output}")


# --- analyze (vulnerability scores, design §3) ----------------------------------------------------

@app.command()
def analyze(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT"),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    model_spec: Optional[str] = typer.Option(None, "--model", help=MODEL_TRUST_HELP),
    normalize: Optional[str] = _normalize_option(),
    method: str = typer.Option("gain", help="gain (gradient, training inputs), fi (fault injection, "
                                            "test inputs) or l1 (weight norm)"),
    samples: Optional[int] = typer.Option(None, min=1, help="gain: inputs used (default 256); "
                                                            "fi: max faults per channel (default 256)"),
    seed: int = _option("seed", "analyze"),
    sample_margin: Optional[float] = typer.Option(None, "--sample-margin",
                                                  help="fi: Leveugle's error margin of the fault sample "
                                                       "(default 0.05; was --margin)"),
    confidence: Optional[float] = _option("confidence", "analyze"),
    bits: List[int] = typer.Option([], help="fi: only these bit positions (default: all 32)"),
    pilot: Optional[int] = typer.Option(None, min=0, help="fi: pilot faults per bit position that steer "
                                                          "the sample to the bits that matter (default 16; "
                                                          "0: equal share per bit)"),
    limit: Optional[int] = typer.Option(None, min=1, help="use only the first N inputs"),
    compare: Optional[str] = typer.Option(None, help="comma-separated methods to rank against --against"),
    against: str = typer.Option("fi", help="with --compare: the reference method"),
    scores_dir: Optional[Path] = typer.Option(None, help="with --compare: take METHOD.json from here "
                                                         "if present, and store computed scores here"),
    threads: Optional[int] = _option("threads", "analyze"),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="scores JSON (plot beside it as .png); "
                                                                        "with --compare: the agreement JSON"),
) -> None:
    """Score every filter/neuron's vulnerability, or rank methods against each other.

    gain uses the data set's training inputs, fi its test inputs (critical SDCs
    are measured where accuracy is), l1 only the weights.

    Example: ftcnn analyze lenet5.pt --data mnist5k --method gain -o scores.json

    Example: ftcnn analyze lenet5.pt --compare gain,l1 --against fi --scores-dir scores -o agreement.json
    """
    _check_device(device)
    if compare is None and output is None:
        raise ValueError("give -o/--output for the scores file (or --compare to rank methods)")
    if output is not None:
        flows.check_output_file(output)
    net, spec = _loaded(checkpoint_path, model_spec, data, threads)
    settings = {"samples": samples, "seed": seed, "sample_margin": sample_margin, "confidence": confidence,
                "bits": list(bits) or None, "pilot": pilot}
    with _inputs(net, spec, normalize, device):
        _analyze(net, spec, method, compare, against, scores_dir, limit, settings, str(checkpoint_path), output,
                 device)


def _analyze(net, spec: str, method: str, compare: Optional[str], against: str, scores_dir: Optional[Path],
             limit: Optional[int], settings: dict, source: str, output: Optional[Path], device: str) -> None:
    """``ftcnn analyze``'s work and what it prints, inside the model's input block."""
    if compare is None:
        scores = flows.analyze_checkpoint(net, spec, method=method, limit=limit, settings=settings,
                                          source=source, output=output, device=device)
        for name, values in scores["layers"].items():
            top = ", ".join(f"#{i} {v:.4g}" for i, v in vulnerability.top_channels(values))
            console.print(f"{name}: {len(values)} channels, top {top}")
        console.print(f"{method} scores in {scores['seconds']:.1f}s -> {output} "
                      f"(plot {output.with_suffix('.png')})")
        return
    methods = [m.strip() for m in compare.split(",") if m.strip()]
    blob = flows.compare_methods(net, spec, methods, against=against, scores_dir=scores_dir, limit=limit,
                                 settings=settings, source=source, output=output, log=console.print,
                                 device=device)
    _print_agreement(blob["agreement"], methods, against)
    if output is not None:
        console.print(f"rank agreement -> {output}")


def _print_agreement(agreement: dict, methods: list, against: str) -> None:
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


# --- harden ----------------------------------------------------------------------------------------

@app.command()
def harden(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT"),
    scores: Optional[Path] = typer.Option(None, help="vulnerability scores JSON (from `ftcnn analyze`); "
                                          "not needed for --tmr full or --ratio 0"),
    ratio: float = typer.Option(0.1, help="share of each layer's channels to duplicate (top by score)"),
    max_macs: Optional[float] = typer.Option(None, help="instead of --ratio: MACs per input allowed, a ratio to "
                                             "the model's at --batch, all protection included (1.2 = +20%)"),
    batch: int = _option("batch", "harden"),
    budget: Optional[float] = typer.Option(None, hidden=True, help="removed (an extra share): use --max-macs"),
    correction: str = typer.Option("min", help="min (the paper's), range or tmr (selective TMR)"),
    tmr: Optional[str] = typer.Option(None, help="'full': full TMR of every layer (baseline)"),
    restrict: Optional[str] = typer.Option(None, help="range restriction of every layer: zero or clamp"),
    restrict_share: Optional[float] = typer.Option(None, help="with --restrict: restrict only the layers with "
                                                   "the fewest output values per parameter that hold this "
                                                   "share of the parameters (e.g. 0.9: cheaper, latency)"),
    range_margin: float = _option("range_margin", "harden", "--range-margin"),
    bound_copies: Optional[int] = typer.Option(None, "--bound-copies", callback=_bound_copies,
                                               help="stored copies of every bound the protection adds (all "
                                               "attacked): 2 (default; the looser is used), 3 (the median) "
                                               "or 1 (one flip can cut a channel)"),
    check_weights: Optional[str] = typer.Option(None, help="parameter-side check of every layer's weights "
                                                "against their fault-free per-channel bounds, at use: "
                                                "zero or clamp out-of-bound values"),
    fold_bn: bool = typer.Option(False, "--fold-bn", help="protect the deployed form: every BatchNorm that "
                                 "follows a conv folded into it first (all its memory then attacked as weights)"),
    code: Optional[str] = typer.Option(None, "--code", help="stored-word code on every layer's weights, its "
                                       "check bits attacked too, decoded at use: secded, parity, "
                                       "parity_exponent or tmr3 (weight-level TMR)"),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    model_spec: Optional[str] = typer.Option(None, "--model", help=MODEL_TRUST_HELP),
    normalize: Optional[str] = _normalize_option(),
    calibration_size: int = typer.Option(1000, min=1, help="training inputs to profile ranges on"),
    seed: int = _option("seed", "harden"),
    onnx: Optional[Path] = typer.Option(None, help="also export the hardened model to this ONNX file"),
    threads: Optional[int] = _option("threads", "harden"),
    device: str = typer.Option("cpu", help=DEVICE_HELP + "; latency is timed on the CPU"),
    output: Path = typer.Option(..., "-o", "--output", help="hardened checkpoint to write"),
) -> None:
    """Duplicate the most vulnerable filters/neurons (or TMR, or range restriction) and save the model.

    Prints parameters, MACs and CPU latency relative to the original, and both clean accuracies.
    Examples:

      ftcnn harden lenet5.pt --scores scores.json --ratio 0.1 --correction min -o hardened.pt

      ftcnn harden lenet5.pt --tmr full -o tmr.pt

      ftcnn harden lenet5.pt --scores scores.json --max-macs 1.2 --batch 128 -o dup.pt

      ftcnn harden lenet5.pt --ratio 0 --restrict zero --range-margin 0.1 -o ranger.pt

      ftcnn harden lenet5.pt --ratio 0 --check-weights zero -o checked.pt

      ftcnn harden lenet5.pt --ratio 0 --check-weights zero --restrict zero --range-margin 0.1 --restrict-share 0.9 -o cheap.pt
    """
    if budget is not None:  # the old convention (issue 21), refused before any work with the new spelling
        raise ValueError(f"--budget was an extra share; give the ratio: --max-macs {1 + budget:g}")
    _check_device(device)
    if max_macs is not None:
        protect_mod.check_budget(max_macs, batch=batch)
    net, spec = _loaded(checkpoint_path, model_spec, data, threads)
    with _inputs(net, spec, normalize, device):
        record = flows.harden_checkpoint(net, spec, output, scores=scores, ratio=ratio, max_macs=max_macs,
                                         batch=batch,
                                         correction=correction, tmr=tmr, restrict=restrict,
                                         range_margin=range_margin, check_weights=check_weights,
                                         calibration_size=calibration_size, seed=seed, onnx=onnx, device=device,
                                         restrict_share=restrict_share, bound_copies=bound_copies,
                                         fold_bn=fold_bn, code=code)
    cost = record["overheads"]
    rel = cost["relative"]
    n_protected = sum(len(v) for v in record["protected"].values())
    if fold_bn:
        console.print(f"BatchNorm folded into the conv before it: {len(record['folded_bn'])} layers")
    console.print(f"protected channels: {n_protected} in {len(record['protected'])} layers")
    console.print(f"cost: {_price(cost['cost'])}; parameters x{rel['params']:.3f} "
                  f"(protection ops {cost['hardened']['elementwise']:,} per forward at batch 1)")
    console.print(f"clean test accuracy: original {record['original_test_accuracy']:.2%}, hardened "
                  f"{record['test_accuracy']:.2%} -> {output}")
    if onnx is not None:
        console.print(f"ONNX: {onnx}")


# --- prune -----------------------------------------------------------------------------------------

@app.command("prune")
def prune_command(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT"),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    model_spec: Optional[str] = typer.Option(None, "--model", help=MODEL_TRUST_HELP),
    normalize: Optional[str] = _normalize_option(),
    scores: Optional[Path] = typer.Option(None, help="vulnerability scores JSON (`ftcnn analyze`); "
                                          "default: gain scores on training inputs"),
    ratio: float = typer.Option(0.3, help="share of each layer's output channels to remove (rounded down)"),
    layer_ratio: List[str] = typer.Option([], help="per-layer ratios instead of --ratio: name=0.5 ..."),
    criterion: str = _option("criterion", "prune"),
    keep: List[str] = typer.Option([], "--keep", metavar="LAYER", help="layers never pruned (default: the "
                                   "first conv/linear; 'none' for no layer); the output layer is always kept "
                                   "(was --protect)"),
    finetune_epochs: int = _option("finetune_epochs", "prune"),
    lr: float = typer.Option(1e-3, help="fine-tuning learning rate"),
    samples: int = typer.Option(256, min=1, help="training inputs for gain scores (without --scores)"),
    seed: int = _option("seed", "prune"),
    threads: Optional[int] = _option("threads", "prune"),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="checkpoint to write"),
) -> None:
    """Structured channel pruning (least vulnerable or smallest-L1 filters), then a short fine-tune.

    Prints and stores in the checkpoint's metadata the clean accuracy before pruning, after
    pruning and after fine-tuning, and the parameters and MACs before and after.

    Example: ftcnn prune lenet5.pt --data mnist5k --scores scores.json --ratio 0.3 --finetune-epochs 3 -o pruned.pt

    Example: ftcnn prune lenet5.pt --keep features.0 classifier.0 -o pruned.pt
    """
    _check_device(device)
    protected = None if not keep else [] if keep == ["none"] else keep
    ratios = _parse_layer_ratios(layer_ratio) if layer_ratio else ratio
    net, spec = _loaded(checkpoint_path, model_spec, data, threads)
    with _inputs(net, spec, normalize, device):  # fine-tuning keeps the model's preprocessing
        meta = flows.prune_checkpoint(net, spec, output, scores=scores, ratio=ratios, criterion=criterion,
                                      protect=protected, finetune_epochs=finetune_epochs, lr=lr, samples=samples,
                                      seed=seed, device=device)
    console.print(f"accuracy: original {meta['accuracy_original']:.2%}, pruned {meta['accuracy_before_finetune']:.2%}, "
                  f"fine-tuned ({finetune_epochs} epochs) {meta['test_accuracy']:.2%}")
    p0, p1, m0, m1 = meta["params_before"], meta["params_after"], meta["macs_before"], meta["macs_after"]
    console.print(f"params {p0:,} -> {p1:,} ({p1 / p0:.1%}); MACs {m0:,} -> {m1:,} ({m1 / m0:.1%})")
    console.print(f"removed channels: {meta['removed_channels']} -> {output}")


# --- pipeline --------------------------------------------------------------------------------------

@app.command()
def pipeline(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT"),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    model_spec: Optional[str] = typer.Option(None, "--model", help=MODEL_TRUST_HELP),
    normalize: Optional[str] = _normalize_option(),
    prune_ratio: float = _option("prune_ratio", "pipeline"),
    harden_ratio: float = _option("harden_ratio", "pipeline"),
    correction: str = typer.Option("min", help="hardening correction: min, range or tmr"),
    criterion: str = _option("criterion", "pipeline"),
    restrict: Optional[str] = typer.Option(None, help="also range-restrict: zero or clamp"),
    finetune_epochs: int = _option("finetune_epochs", "pipeline"),
    lr: float = typer.Option(1e-3, help="fine-tuning learning rate"),
    samples: int = typer.Option(256, min=1, help="training inputs for the gain scores"),
    seed: int = _option("seed", "pipeline"),
    max_macs: Optional[float] = typer.Option(None, help="end-to-end mode: prune -> fine-tune -> protect "
                                             "within this many MACs relative to the ORIGINAL model (e.g. 1.0)"),
    max_latency: Optional[float] = typer.Option(None, help="end-to-end mode: latency allowed at --batch "
                                                "relative to the original (1 thread)"),
    max_memory: Optional[float] = typer.Option(None, help=MAX_MEMORY_HELP),
    batch: int = _option("batch", "pipeline"),
    ber: float = _option("ber", "pipeline"),
    trials: str = _trials_option("pipeline"),
    threads: Optional[int] = _option("threads", "pipeline"),
    device: str = typer.Option("cpu", help=DEVICE_HELP + "; latency is timed on the CPU"),
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
    _check_device(device)
    if max_macs is not None:  # a bad budget: one line before loading anything
        protect_mod.check_budget(max_macs, max_latency, ber, trials, batch=batch, at_least_one=False,
                                 max_memory=max_memory)
    elif max_memory is not None:
        raise ValueError("--max-memory applies to the end-to-end mode: give --max-macs too")
    net, spec = _loaded(checkpoint_path, model_spec, data, threads)
    with _inputs(net, spec, normalize, device):
        result = flows.run_pipeline(net, spec, output, prune_ratio=prune_ratio, criterion=criterion,
                                    finetune_epochs=finetune_epochs, lr=lr, samples=samples, seed=seed,
                                    harden_ratio=harden_ratio, correction=correction, restrict=restrict,
                                    max_macs=max_macs, max_latency=max_latency, ber=ber, trials=trials, batch=batch,
                                    max_memory=max_memory, allow_builder=model_spec, source=str(checkpoint_path),
                                    log=console.print,
                                    device=device)
    if max_macs is not None:
        _print_protection(result, f"{criterion} pruning {prune_ratio}, then protections within x{max_macs:g} "
                          f"of the ORIGINAL's MACs at batch {batch} (BER {ber:g})")
        e2e = result.extra["end_to_end"]
        console.print(f"clean test accuracy: original {e2e['clean_test']['original']:.2%}, pruned "
                      f"{e2e['clean_test']['pruned']:.2%}, protected {e2e['clean_test']['protected']:.2%}")
        console.print(f"results: {output}/front.json, {output}/front.png, model {output}/protected.pt")
        return
    table = Table(title=f"pipeline ({criterion} pruning {prune_ratio}, hardening {harden_ratio} {correction})")
    for col in ("stage", "accuracy", "params", "MACs b1", "latency b1 (ms)", "latency b128 (ms)"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, row in result["stages"].items():
        acc = row.get("accuracy")
        table.add_row(stage, "-" if acc is None else f"{acc:.2%}", f"{row['params']:,}", f"{row['macs']:,}",
                      f"{row['latency_b1_ms']:.3f}", f"{row['latency_b128_ms']:.2f}")
    console.print(table)
    rel = result["relative"]["hardened_pruned_vs_hardened_unpruned"]
    console.print(f"hardened-pruned vs hardened-unpruned: params {rel['params']:.2f}x, MACs b1 {rel['macs']:.2f}x, "
                  f"latency b1 {rel['latency_b1_ms']:.2f}x, b128 {rel['latency_b128_ms']:.2f}x")
    console.print(f"results: {output}/summary.json")


# --- inject ----------------------------------------------------------------------------------------

@app.command()
def inject(
    ctx: typer.Context,
    checkpoint_path: Optional[Path] = typer.Argument(None, metavar="[CHECKPOINT]",
                                                     help="model to attack (or checkpoint = ... in --config)"),
    config_file: Optional[Path] = typer.Option(None, "--config", help="a campaign file (TOML, see "
                                               "examples/campaign.toml) that says the whole campaign; "
                                               "flags given here override its keys"),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    model_spec: Optional[str] = typer.Option(None, "--model", help=MODEL_TRUST_HELP),
    normalize: Optional[str] = _normalize_option(),
    ber: List[float] = _option("ber", "inject"),
    count: List[int] = typer.Option([], help="exact fault counts per trial instead of --ber",
                                    callback=_limit("count_points", "--count")),
    trials: str = _trials_option("inject"),
    ci_half_width: float = _option("ci_half_width", "inject", "--ci-half-width"),
    confidence: float = _option("confidence", "inject"),
    seed: int = _option("seed", "inject"),
    dtype: str = typer.Option("float32", help="storage format faults hit: float32, float16, bfloat16, int8 "
                              "(activations: float32, float16, bfloat16)"),
    bits: List[int] = typer.Option([], help="only these bit positions (default: all)"),
    mode: str = typer.Option("flip", help="fault mode: " + ", ".join(constants.FAULT_MODES)
                             + " (activations: flip; stuck0/stuck1 with --activation-mode permanent)"),
    include_bn: Optional[bool] = typer.Option(None, "--include-bn/--no-include-bn",
                                              help="parameter faults: attack BatchNorm parameters and running "
                                              "statistics too (default: on; --no-include-bn leaves them out)"),
    attack_protection: bool = typer.Option(True, help="also inject into the float values protections add "
                                           "(correction and restriction bounds); reported in the summary"),
    layers: List[str] = typer.Option([], help="only these layers (module names)"),
    target: str = _option("target", "inject"),
    activation_mode: str = typer.Option("transient", help="with --target activations: transient (each "
                                        "value, each inference) or permanent (same sites for every input)"),
    activation_ber: Optional[float] = typer.Option(None, "--activation-ber", help="with --target both: the rate "
                                                   "of transient flips per bit of every Conv2d/Linear output per "
                                                   "inference, in every trial beside the swept --ber"),
    ber_per_layer: List[str] = typer.Option([], "--ber-per-layer", help="NAME=RATE ...: these layers "
                                            "(modules) take this rate at every point, parameters or activations "
                                            "(MRFI's per-layer rates)"),
    per_input: bool = typer.Option(False, "--per-input", help="with --target activations --count N: N "
                                   "faults in every input image (PyTorchFI's convention), not N per trial"),
    limit: Optional[int] = typer.Option(None, min=1, help="use only the first N test inputs"),
    batch_size: int = typer.Option(1000, min=1),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    shortcut: bool = typer.Option(True, help="start each trial at its first faulted layer (exact)"),
    batch_trials: Optional[int] = typer.Option(None, min=1, help="faulty trials per batched forward "
                                               "(exact; default: automatic, 1 on CPU)"),
    workers: int = _option("workers", "inject"),
    ray: bool = typer.Option(False, "--ray", help="run on a local Ray started for the campaign "
                             "(needs the optional Ray extra of ftcnn)"),
    ray_address: Optional[str] = typer.Option(None, help="run on an existing Ray cluster at this address"),
    precision: Optional[float] = _option("precision", "inject"),
    inputs_per_trial: Optional[int] = typer.Option(None, min=1, help="inputs each trial evaluates: a seeded "
                                                   "random block of the split per trial, unbiased (default: "
                                                   f"all; with --precision {constants.PRECISION_INPUTS_PER_TRIAL}; a "
                                                   "number >= the split's size: all)"),
    threads: Optional[int] = _option("threads", "inject"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="run folder (resumed if it exists; "
                                          "or output = ... in --config)"),
) -> None:
    """Run (or resume) a statistical fault-injection campaign.

    Example: ftcnn inject lenet5.pt --data mnist5k --ber 1e-6 1e-5 1e-4 --trials 100 --seed 0 -o runs/inj

    Activation faults: ftcnn inject lenet5.pt --target activations --ber 1e-5 1e-4 -o runs/act

    Both at once: ftcnn inject lenet5.pt --target both --ber 1e-5 1e-4 --activation-ber 1e-6 -o runs/both

    One reviewable file: ftcnn inject --config examples/campaign.toml (flags given override its keys)

    Faster, same numbers: --workers 2, --ray, --ray-address HOST:6379, --batch-trials 8 --device cuda
    """
    # the flags the user typed (they override a campaign file's keys); the mapping is campaign_file's
    typed = [name for name in ctx.params if ctx.get_parameter_source(name).name == "COMMANDLINE"]
    run = campaign_file.inject_settings(ctx.params, typed, config_file)
    _check_device(run.config.device)
    model = _load_model(Path(run.checkpoint), run.model, run.data).to(run.config.device)
    _threads(run.config.threads, model, run.config.workers)
    spec = _data_spec(run.data, checkpoint.meta(model))
    with _inputs(model, spec, run.normalize, run.config.device):
        summary = flows.inject_checkpoint(model, spec, run.config, run.output, limit=run.limit,
                                          source=run.checkpoint, campaign_file=run.campaign_file)
    console.print(campaign.format_table(summary))
    console.print(f"results: {run.output}/summary.json")


# --- compare, report, demo -------------------------------------------------------------------------

@app.command()
def compare(
    checkpoint_path: Optional[Path] = typer.Argument(None, metavar="[CHECKPOINT]",
                                                     help="model to protect (or use --model to train one)"),
    model: Optional[str] = typer.Option(None, help="without CHECKPOINT: train this model first (registry name "
                                        "or package.module:fn); with CHECKPOINT: " + MODEL_TRUST_HELP),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    normalize: Optional[str] = _normalize_option(),
    epochs: int = typer.Option(5, min=1, help="with --model: training epochs"),
    width: float = typer.Option(1.0, help="with --model: width multiplier"),
    ber: List[float] = _option("ber", "compare"),
    trials: str = _trials_option("compare"),
    bit_trials: int = _option("bit_trials", "compare"),
    bits: List[int] = typer.Option([], help="bit positions for the bit-sensitivity chart (default: all 32)"),
    harden_ratio: float = _option("harden_ratio", "compare"),
    prune_ratio: float = _option("prune_ratio", "compare"),
    restrict: str = typer.Option("zero", help="range restriction mode: zero or clamp"),
    range_margin: float = _option("range_margin", "compare", "--range-margin"),
    finetune_epochs: int = _option("finetune_epochs", "compare"),
    report_ber: Optional[float] = _option("report_ber", "compare"),
    variants: Optional[str] = typer.Option(None, help="comma-separated subset of variants"),
    target: str = _option("target", "compare"),
    seed: int = _option("seed", "compare"),
    threads: Optional[int] = _option("threads", "compare"),
    device: str = typer.Option("cpu", help=DEVICE_HELP + "; latency is timed on the CPU"),
    output: Path = typer.Option(..., "-o", "--output", help="run folder (resumed if it exists)"),
) -> None:
    """Compare every protection side by side: baseline, range restriction, full and selective TMR,
    hardened (min/range, with and without restriction), pruned+hardened (vulnerability vs L1).

    Writes summary.json, summary.csv, plots (PNG+SVG) and a self-contained report.html into the run
    folder; re-running resumes. Examples:

      ftcnn compare lenet5.pt --data mnist5k -o runs/cmp

      ftcnn compare --model vgg11 --width 0.25 --data mnist5k --trials 20 -o runs/cmp_vgg

      ftcnn compare lenet5.pt --target activations --variants baseline,restrict -o runs/cmp_act
    """
    _check_device(device)
    if checkpoint_path is None and model is None:
        raise ValueError("give a CHECKPOINT, or --model to train one first")
    net, spec = None, data or "mnist5k"
    if checkpoint_path is not None:  # refuse a bad checkpoint before creating anything
        net = _load_model(checkpoint_path, model, data)
        spec = _data_spec(data, checkpoint.meta(net))
    config = compare_mod.CompareConfig(
        **({"bers": tuple(ber)} if ber else {}), trials=trials, seed=seed, harden_ratio=harden_ratio,
        prune_ratio=prune_ratio, restrict=restrict, range_margin=range_margin, finetune_epochs=finetune_epochs,
        bit_trials=bit_trials, **({"bits": tuple(bits)} if bits else {}), report_ber=report_ber,
        variants=tuple(v.strip() for v in variants.split(",")) if variants else None, target=target)
    with _inputs(net, spec, normalize, device):
        summary = compare_mod.compare_run(net, spec, output, config, builder=model, epochs=epochs, width=width,
                                          seed=seed, threads=threads, allow_builder=model,
                                          source=None if checkpoint_path is None else str(checkpoint_path),
                                          device=device)
    console.print(compare_mod.headline(summary))
    console.print(f"report: {output / 'report.html'}")


@app.command()
def report(run: Path = typer.Argument(..., help="a run folder written by `ftcnn inject`, `protect`, `compare` "
                                                 "or `pipeline`")) -> None:
    """Rebuild report.html and its figures of any run folder (inject, protect, compare, pipeline) from
    its stored results; nothing is recomputed.

    Example: ftcnn report runs/cmp
    """
    console.print(f"report: {report_mod.build_report(run)}")


@app.command()
def demo(
    output: Path = typer.Option(Path("runs/demo"), "-o", "--output", help="run folder (resumed if it exists)"),
    epochs: int = typer.Option(5, min=1),
    trials: str = _trials_option("demo"),
    seed: int = _option("seed", "demo"),
    threads: Optional[int] = _option("threads", "demo"),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """The main job on built-in data: train LeNet-5 on the MNIST digits, then compare every protection
    (a small `ftcnn compare`), ending with the report's path and a short table. A few minutes on 2 cores.

    Example: ftcnn demo -o runs/demo
    """
    _check_device(device)
    _threads(threads)  # LeNet-5: a small model
    config = compare_mod.CompareConfig(bers=(1e-6, 1e-5, 3e-5, 1e-4, 3e-4), trials=trials, seed=seed,
                                       bit_trials=5, bits=tuple(range(20, 32)), report_ber=1e-4)
    with _inputs(None, "mnist5k", None, device):
        summary = compare_mod.compare_run(None, "mnist5k", output, config, builder="lenet5", epochs=epochs,
                                          seed=seed, threads=threads, log=console.print, device=device)
    console.print(compare_mod.headline(summary))
    console.print(f"report: {output / 'report.html'}")


# --- protect ---------------------------------------------------------------------------------------

def _price(cost: dict) -> str:
    """A price (``cost.price``: ratios to the unprotected model) as one line, every number with its batch."""
    b = cost["batch"]
    text = f"MACs x{cost['macs_ratio']:.3f} at batch {b}"
    if b != 1:
        text += f" (x{cost['macs_ratio_batch1']:.3f} at batch 1)"
    text += f", memory x{cost['memory_ratio']:.3f} (all stored bits)"
    if cost.get("latency_ratio") is not None:
        text += f", latency x{cost['latency_ratio']:.2f} at batch {b}"
        if cost.get("latency_ratio_batch1") is not None and b != 1:
            text += f", x{cost['latency_ratio_batch1']:.2f} at batch 1"
        text += " (CPU, 1 thread)"
    return text


def _print_protection(result, title: str) -> None:
    """The candidates of a protection search: costs, validation accuracy, front, choice."""
    ber, b = result.config["ber"], result.config.get("batch", constants.DEFAULT_BATCH)
    table = Table(title=title)
    for col in ("candidate", f"MACs x b{b}", f"latency x b{b}", "latency x b1", "memory x", f"val acc @{ber:g}",
                "95% CI", "vs best (pts)", "front", "fits"):
        table.add_column(col, justify="left" if col == "candidate" else "right")

    def ratio(value: Optional[float], digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"
    for r in result.records:
        v, price = r["validation"], r.get("cost") or {}
        versus = (r.get("choice") or {}).get("versus_best") or {}
        gap = "-" if versus.get("difference") is None else \
            f"{100 * versus['difference']:+.2f}" + (" =" if versus.get("within_tolerance") else "")
        table.add_row(("* " if r["chosen"] else "") + r["name"], ratio(price.get("macs_ratio"), 3),
                      ratio(price.get("latency_ratio"), 2), ratio(price.get("latency_ratio_batch1"), 2),
                      ratio(price.get("memory_ratio"), 3), "-" if v is None else f"{v['accuracy']:.2%}",
                      "-" if v is None else f"[{v['accuracy_ci'][0]:.2%}, {v['accuracy_ci'][1]:.2%}]", gap,
                      "yes" if r["pareto"] else "", "yes" if r["within_budget"] else "no")
    console.print(table)
    console.print(f"chosen: {result.chosen} ({result.reason}); vs best =: shown within --tolerance of it")
    console.print(f"chosen cost: {_price(result.record(result.chosen)['cost'])}")
    for name, t in (result.test or {}).items():
        at = ", ".join(f"{p['accuracy']:.2%} [{p['accuracy_ci'][0]:.2%}, {p['accuracy_ci'][1]:.2%}] at BER {b}"
                       for b, p in t["bers"].items())
        block = f" ({t['trials']} trials, each on {t['inputs_per_trial']} test inputs)" if t.get("trials") else ""
        console.print(f"test split, {name}: clean {t['clean']:.2%}; {at}{block}")


@app.command()
def protect(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT"),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    model_spec: Optional[str] = typer.Option(None, "--model", help=MODEL_TRUST_HELP),
    normalize: Optional[str] = _normalize_option(),
    ber: float = _option("ber", "protect"),
    max_macs: float = typer.Option(1.15, help="MACs per input allowed at --batch, a ratio to the model's "
                                   "(checks included; 1.15 = +15%)"),
    max_latency: Optional[float] = typer.Option(None, help="latency allowed at --batch relative to the model's "
                                                "(1 thread, CPU)"),
    max_memory: Optional[float] = typer.Option(None, help=MAX_MEMORY_HELP),
    batch: int = _option("batch", "protect"),
    trials: str = _trials_option("protect"),
    seed: int = _option("seed", "protect"),
    confidence: float = _option("confidence", "protect"),
    tolerance: float = _option("tolerance", "protect"),
    race: bool = _option("race", "protect", "--race/--no-race"),
    validation_inputs: int = _option("validation_inputs", "protect"),
    test_inputs: int = _option("test_inputs", "protect"),
    target: str = _option("target", "protect"),
    activation_ber: Optional[float] = typer.Option(None, "--activation-ber", help="with --target both: the rate "
                                                   "of transient flips per bit of every Conv2d/Linear output per "
                                                   "inference, in every trial beside the memory's --ber"),
    threads: Optional[int] = _option("threads", "protect"),
    device: str = typer.Option("cpu", help=DEVICE_HELP + "; candidates are costed and timed on the CPU"),
    output: Path = typer.Option(..., "-o", "--output", help="output folder"),
) -> None:
    """Search the protections within a cost budget; choose on a validation split, report on test.

    Writes protected.pt, front.json (every candidate, the Pareto front, the choice and why) and front.png.

    Example: ftcnn protect lenet5.pt --data mnist5k --ber 1e-4 --max-macs 1.15 --max-latency 1.2 -o runs/protect

    Chosen for memory and datapath faults at once: ... --target both --ber 1e-4 --activation-ber 1e-6
    """
    _check_device(device)
    protect_mod.check_budget(max_macs, max_latency, ber, trials, batch=batch, max_memory=max_memory,
                             target=target, activation_ber=activation_ber)
    net, spec = _loaded(checkpoint_path, model_spec, data, threads)
    with _inputs(net, spec, normalize, device):
        result = protect_mod.protect_run(net, spec, output, ber=ber, max_macs=max_macs, max_latency=max_latency,
                                         max_memory=max_memory, trials=trials, seed=seed, batch=batch,
                                         allow_builder=model_spec, source=str(checkpoint_path),
                                         log=console.print, device=device, confidence=confidence,
                                         tolerance=tolerance, race=race, validation_inputs=validation_inputs,
                                         test_inputs=test_inputs, target=target, activation_ber=activation_ber)
    _print_protection(result, f"protections within x{max_macs:g} MACs"
                      + (f", x{max_latency:g} latency" if max_latency else "") + f" at batch {batch}"
                      + (f", x{max_memory:g} memory" if max_memory is not None else "")
                      + (f" (BER {ber:g})" if target == "parameters" else f" (activation BER {ber:g})"
                         if target == "activations" else f" (BER {ber:g}, activation BER {activation_ber:g})"))
    console.print(f"results: {output}/front.json, {output}/front.png, model {output}/protected.pt")


# --- study ----------------------------------------------------------------------------------------

@app.command()
def study(
    models: List[str] = typer.Option([], "--models", help="registry models (default: lenet5 vgg11 resnet20)"),
    data: str = typer.Option("mnist5k", help="data set: mnist5k, digits, cifar10:PATH, imagefolder:PATH, npz:PATH"),
    seeds: List[int] = typer.Option([], "--seeds", help="training seeds (default: 0 1 2; a verdict needs >= 3)"),
    ber: List[float] = _option("ber", "study"),
    targets: List[str] = typer.Option([], "--targets", help="fault targets claims 1 and 2 are tested under, each "
                                      "at its own rates: parameters (--ber) and activations (--activation-ber) "
                                      "(default: both)"),
    activation_ber: List[float] = typer.Option([], "--activation-ber", help="rates of transient flips per bit "
                                               "of every Conv2d/Linear output per inference (default: 1e-7 1e-6 "
                                               "1e-5)"),
    trials: str = _trials_option("study"),
    epochs: Optional[int] = typer.Option(None, help="training epochs (default: each model's own)"),
    finetune_epochs: int = _option("finetune_epochs", "study"),
    prune_ratio: float = _option("prune_ratio", "study"),
    tmr_margin: float = typer.Option(0.01, help="claim 1: accuracy drop allowed above full TMR's (a share)"),
    alpha: float = typer.Option(0.05, help="level of the Holm-corrected tests"),
    latency_rounds: int = typer.Option(30, help="claim 3: interleaved CPU timing rounds (batch 1, one thread)"),
    prune_grid: List[float] = typer.Option([], "--prune-grid", help="claim 3: pruning ratios searched on a "
                                           "validation split; the largest that keeps clean accuracy wins "
                                           "(default: 0.1 ... 0.8)"),
    validation_fraction: float = typer.Option(0.2, help="claim 3: share of each class of the training data the "
                                              "pruning ratio is chosen on"),
    accuracy_tolerance: float = typer.Option(0.003, help="claim 3: clean accuracy allowed below the unpruned "
                                             "model's (a share), on validation (the choice) and test (the verdict)"),
    threads: Optional[int] = _option("threads", "study"),
    device: str = typer.Option("cpu", help=DEVICE_HELP + "; latency is timed on the CPU"),
    output: Path = typer.Option(Path("runs/study"), "-o", "--output", help="study folder (resumed if it exists)"),
    results: Optional[Path] = typer.Option(None, help="where study.md and study.json go (default: the study "
                                           "folder; the reported run: experiments/results)"),
) -> None:
    """The paper's claims as tests: several training seeds, per BER, Holm-corrected, results generated.

    Resumes cell by cell. Example (the reported run):

      ftcnn study --seeds 0 1 2 -o runs/study --results experiments/results
    """
    _check_device(device)
    config = study_mod.StudyConfig(
        **({"models": tuple(models)} if models else {}), data=data, **({"seeds": tuple(seeds)} if seeds else {}),
        **({"bers": tuple(ber)} if ber else {}), **({"targets": tuple(targets)} if targets else {}),
        **({"activation_bers": tuple(activation_ber)} if activation_ber else {}), trials=trials, epochs=epochs, finetune_epochs=finetune_epochs,
        prune_ratio=prune_ratio, tmr_margin=tmr_margin, alpha=alpha, latency_rounds=latency_rounds, device=device,
        **({"prune_grid": tuple(prune_grid)} if prune_grid else {}), validation_fraction=validation_fraction,
        accuracy_tolerance=accuracy_tolerance)
    _threads(threads)
    with _inputs(None, data, None):
        result = study_mod.run_study(config, output, results)
    table = Table(title="verdicts (mean difference: the arm's accuracy drop minus the reference's, in points; "
                  "latency: the arm's change, in %)")
    for col in ("claim", "model", "target", "rate", "mean difference", "spread", "verdict"):
        table.add_column(col)
    for row in study_mod.verdict_table(result):
        table.add_row(*row)
    console.print(table)
    console.print(f"results: {Path(results or output) / 'study.md'}, {Path(results or output) / 'study.json'}")


# --- the entry point -------------------------------------------------------------------------------

def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _expand_multi_values(argv: list[str]) -> list[str]:
    """Turn `--ber 1e-6 1e-5` into `--ber 1e-6 --ber 1e-5` (click takes one value per flag).

    A value is taken after a multi-value option while it looks like one: numbers for numeric
    options; for name options (`--layers`, `--protect`, `--layer-ratio`), tokens
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


def _renamed_options(argv: list[str]) -> list[str]:
    """The old spellings of the command's renamed options (``RENAMED_OPTIONS``, one release), each
    with one deprecation line on stderr."""
    command = next((t for t in argv if not t.startswith("-")), None)
    renamed = RENAMED_OPTIONS.get(command or "")
    if not renamed:
        return argv
    out, told = [], set()
    for token in argv:
        old = token.partition("=")[0]
        if old in renamed:
            token = renamed[old] + token[len(old):]
            if old not in told:
                print(f"note: {old} is deprecated; use {renamed[old]}", file=sys.stderr)
                told.add(old)
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


def main() -> None:
    argv = _renamed_options(_expand_multi_values(sys.argv[1:]))
    _user_module_importable(argv)
    try:
        app(args=argv, prog_name="ftcnn")
    except (ValueError, FileNotFoundError, PermissionError, OSError, KeyError) as exc:
        if os.environ.get("FTCNN_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
