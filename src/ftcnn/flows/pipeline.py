"""The orchestration home: every flow that strings library steps together, one function per command.

Issue 11 found the same flows written three times (the CLI, ``compare``,
``prune.pipeline``) with three calibration rules; they live here now and the
CLI only parses, calls one function of this module (or ``protect_run``,
``compare.run_compare``, ``report.build_report``) and prints. The two data
rules live in ``ftcnn.splits`` (below every module that uses them, so
nothing imports upward) and are re-exported here.

- loading: :func:`load_model` (a checkpoint, or a user's plain state dict),
  :func:`resolve_data` (``--data``, else the checkpoint's built-in data set),
  :func:`inputs_for` (the model's own input normalisation for the whole command, issue 23);
- training: :func:`train_checkpoint` (``ftcnn train``), :func:`train_or_load`
  (a path), :func:`train_or_reuse` (a run folder's model, keyed by its
  inputs: ``demo``, ``compare --model``);
- per command: :func:`analyze_checkpoint`, :func:`compare_methods`
  (``analyze --compare``, with its score cache), :func:`harden_checkpoint`,
  :func:`prune_checkpoint`, :func:`inject_checkpoint`, :func:`run_pipeline`;
- the paper's flow: :func:`prune_finetune` (the step every pruning flow
  shares), :func:`prune_and_harden` (score -> prune -> fine-tune -> re-score
  -> harden, vs hardening unpruned) and :func:`prune_and_protect` (prune ->
  fine-tune -> protect within the ORIGINAL's cost);
- cached pieces: :func:`is_current` / :func:`store_key` (a piece is reused only
  when the key of inputs stored beside it matches; ``compare`` builds on them).

:func:`prune_and_protect` is the paper's promise made checkable (issue 12):
prune (vulnerability or L1 scores) -> fine-tune -> protect within a budget
relative to the ORIGINAL model's cost, so "no more MACs than the original"
(``max_macs=1.0``) buys whatever protection the pruning paid for. The
protection is chosen on a validation split of the training data; the
fine-tune uses only the fit part, and the test split is read only to report.

Every flow takes ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...): training, clean
evaluation, scoring, range profiling and campaigns run there; the caller's model is lent to it
and given back where it was (``train.on_device``), structural steps (pruning's surgery, costs,
CPU latency) stay on the CPU, and every checkpoint is saved from CPU tensors, so the files are the
same whatever the device (numbers within float tolerance of the CPU's).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ftcnn import checkpoint, data, files, fingerprint, models, progress, train
from ftcnn.campaigns import campaign, distributed
from ftcnn.injection import faults
from ftcnn.protection import cost, hardening, pruning, protect as protect_mod, vulnerability
from ftcnn import readback, rules
from ftcnn.splits import calibration_subset, validation_split

__all__ = ["calibration_subset", "validation_split", "load_model", "resolve_data", "check_normalize", "input_normalization",
           "inputs_for", "golden_gap_warning", "train_checkpoint",
           "train_or_load", "train_or_reuse", "analyze_checkpoint", "compare_methods", "harden_checkpoint",
           "prune_checkpoint", "inject_checkpoint", "run_pipeline", "prune_finetune", "prune_and_harden",
           "prune_and_protect", "is_current", "store_key", "key_path", "content_digest", "cached_scores",
           "check_output_file",
           "analyze_settings", "analyze_on", "harden_on", "note", "PIPELINE_STAGES"]

Log = Callable[[str], Any]


def _quiet(*_: Any) -> None:
    return None


# --- loading -------------------------------------------------------------------------------------

def load_model(path: str | Path, model_spec: str | None = None, data_spec: str | None = None) -> nn.Module:
    """An ftcnn checkpoint, or, with ``model_spec`` ``package.module:fn``, a plain state
    dict (``torch.save(model.state_dict())``) built for ``data_spec``'s shapes."""
    try:
        return checkpoint.load(path, allow_builder=model_spec)
    except checkpoint.NotACheckpoint:
        if not model_spec or ":" not in model_spec:
            raise
    if not data_spec:
        raise ValueError(f"{path} is not an ftcnn checkpoint and records no data set: give --data, whose "
                         f"shapes {model_spec} is built with, to load it as a plain state dict")
    info = data.info(data_spec)
    with warnings.catch_warnings(record=True) as caught:  # said in one line, not Python's two with a path
        warnings.simplefilter("always", checkpoint.BuilderArgumentsWarning)
        model = checkpoint.from_state_dict(path, model_spec, num_classes=info.num_classes,
                                           in_channels=info.in_channels, input_size=info.input_size)
    for warning in caught:
        if issubclass(warning.category, checkpoint.BuilderArgumentsWarning):
            progress.console(stderr=True, soft_wrap=True).print(f"warning: {warning.message}", markup=False,
                                                                highlight=False)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return model


def resolve_data(data_spec: str | None, model_meta: Mapping[str, Any]) -> str:
    """``data_spec``, else the checkpoint's data set if it is a built-in one: a spec with a
    path comes from the file, and reading it (CIFAR batches are pickles) can run code."""
    if data_spec:
        return data_spec
    spec = model_meta.get("data")
    if spec is None or spec == "":
        raise ValueError("no --data given and the checkpoint does not record its data set")
    if not isinstance(spec, str) or spec not in data.BUILTINS:
        raise ValueError(f"the checkpoint records the data set {str(spec)[:80]!r}, which is read from files: "
                         f"give --data explicitly to use it (only {', '.join(data.BUILTINS)} are taken "
                         "from a checkpoint)")
    return spec


# golden accuracy this far below the accuracy a checkpoint recorded at save time: probably other inputs
GOLDEN_GAP = 0.05
DEFAULT_NORMALIZE_NOTE = ("inputs standardised by the training split's per-channel mean/std (--normalize "
                          "dataset, the default for a model that records none); give --normalize none if your "
                          "model expects raw inputs, or --normalize MEAN/STD for fixed constants")


def check_normalize(text: str) -> None:
    """Refuse a malformed ``--normalize`` in one line (``data.parse_normalize``), before any work."""
    data.parse_normalize(text)


def input_normalization(model: nn.Module | None, data_spec: str, typed: str | None = None,
                        log: Log | None = None) -> data.Normalization:
    """How ``model``'s inputs are normalised on ``data_spec`` (constants resolved).

    The checkpoint's record wins; a typed ``--normalize`` that contradicts it is refused in one
    line (the record says how the model was trained; run it elsewhere with a new checkpoint).
    Without a record: the typed value, else ``dataset`` (what ``ftcnn train`` always did, so an
    older ftcnn checkpoint is measured as before), said in one note for a user's model.
    """
    say = log or (lambda line: note(line, "normalize"))
    given = None if typed is None else data.parse_normalize(typed)
    recorded = None if model is None else checkpoint.meta(model).get(checkpoint.NORMALIZE_META)
    if recorded is not None:
        norm = data.parse_normalize(recorded, "the checkpoint's normalisation record")
        if given is not None and not given.agrees(norm):
            raise ValueError(f"--normalize {typed} contradicts the checkpoint, which records {norm} (the inputs "
                             "its model was saved with); omit --normalize")
        return data.resolve_normalize(data_spec, norm)
    if given is not None:
        return data.resolve_normalize(data_spec, given)
    if model is not None and getattr(model, checkpoint.SPEC_ATTR, {}).get("builder") not in models.MODELS:
        say(DEFAULT_NORMALIZE_NOTE)
    return data.resolve_normalize(data_spec, data.DATASET)


def golden_gap_warning(recorded: Any, accuracy: float, norm: data.Normalization, data_spec: str) -> str | None:
    """One warning line when ``accuracy`` (fault-free, test split) is more than ``GOLDEN_GAP`` below
    the ``test_accuracy`` a checkpoint recorded (untrusted: anything but a share in [0, 1] is ignored)."""
    if isinstance(recorded, bool) or not isinstance(recorded, (int, float)) or not 0.0 <= recorded <= 1.0:
        return None
    if accuracy >= recorded - GOLDEN_GAP:
        return None
    return (f"golden accuracy {accuracy:.2%} on {data_spec}'s test split is {(recorded - accuracy) * 100:.1f} "
            f"points below the {recorded:.2%} recorded when the model was saved; its inputs are normalised as "
            f"{norm}: if the model was trained on other inputs, say how with --normalize (none, dataset or "
            "MEAN/STD)")


@contextlib.contextmanager
def inputs_for(model: nn.Module | None, data_spec: str, typed: str | None = None, *, device: str = "cpu",
               log: Log | None = None) -> Iterator[data.Normalization]:
    """The block of a command that measures ``model`` on ``data_spec``: every ``data.load`` in it
    normalises as the model's inputs were (:func:`input_normalization`), and every checkpoint saved in
    it records that. Entering checks a model that records its test accuracy once on the test split
    (one fault-free pass, the global RNG untouched) and warns when far below (``golden_gap_warning``)."""
    norm = input_normalization(model, data_spec, typed, log)
    with data.normalized(norm):
        recorded = None if model is None else checkpoint.meta(model).get("test_accuracy")
        if golden_gap_warning(recorded, 0.0, norm, data_spec) is not None:  # a record worth checking
            test_set = data.load(data_spec, "test")
            campaign.check_input_shape(model, test_set.tensors[0][:1])
            with torch.random.fork_rng(devices=[]):  # seeded flows after this draw as before
                warning = golden_gap_warning(recorded, train.evaluate(model, test_set, device=device), norm,
                                             data_spec)
            if warning:
                progress.console(stderr=True, soft_wrap=True).print(f"warning: {warning}", markup=False,
                                                                    highlight=False)
        yield norm


def check_output_file(path: str | Path) -> None:
    """Refuse, before any work, an output file whose folder is missing or not writable."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"output folder {folder} is not writable")


def _data_meta(record: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (record or {}).items() if k == "data"}


# --- cached pieces, keyed by their inputs --------------------------------------------------------

KEY_SUFFIX = ".key.json"
# the key's field holding the SHA-256 of the piece itself: a piece replaced after its key was
# written (another model copied over models/restrict.pt) is rebuilt, not published under its name
CONTENT_FIELD = "content sha256"


def note(msg: str, tag: str = "compare") -> None:
    """One line on stderr, never wrapped: what a cached flow recomputes and why."""
    progress.console(stderr=True, soft_wrap=True).print(f"[bold cyan]{tag}[/] {msg}")


def key_path(path: Path) -> Path:
    """Where the key of the piece at ``path`` is stored."""
    return path.with_name(path.name + KEY_SUFFIX)


def content_digest(path: Path) -> str:
    """SHA-256 of the file at ``path`` (read in chunks: checkpoints can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_current(path: Path, key: dict[str, Any], piece: str) -> bool:
    """Whether ``path`` holds a piece computed from the inputs ``key`` describes,
    and is still the very file that was written then (its digest in the key).

    When a piece exists but its inputs changed (or were not recorded), or its content
    is not what its key recorded, say in one line which, and drop its key so that a
    crash before the new piece is written cannot make the old piece look current.
    The folder's lock (``files.exclusive_folder``) means no other run is writing the
    piece meanwhile: a missing key is a stopped run's or an older ftcnn's, never a
    concurrent one's.
    """
    if not path.exists():
        return False
    key = files.jsonable(key)
    stored = readback.read_key(key_path(path))  # bounded; a malformed key is no key
    recorded = stored.pop(CONTENT_FIELD, None) if isinstance(stored, dict) else None
    if stored == key:
        if recorded is not None and recorded == content_digest(path):
            return True
        if recorded is None:
            note(f"recomputing {piece}: its content digest was not recorded (an older ftcnn made it)")
        else:
            note(f"{path.parent.name}/{path.name} does not match its key: rebuilt")
    else:
        if not isinstance(stored, dict):
            reason = ("its inputs were not recorded (an older ftcnn made it, or a run stopped before "
                      "recording them)")
        else:
            changed = [k for k in sorted(set(stored) | set(key)) if stored.get(k) != key.get(k)]
            reason = f"{', '.join(changed)} changed"
        note(f"recomputing {piece}: {reason}")
    key_path(path).unlink(missing_ok=True)
    return False


def store_key(path: Path, key: dict[str, Any]) -> None:
    """Record the inputs of the piece just written at ``path``, with the piece's own digest
    (after the piece: a piece without its key, or not matching it, is recomputed, never trusted)."""
    files.write_json(key_path(path), {**files.jsonable(key), CONTENT_FIELD: content_digest(path)},
                     indent=1, sort_keys=True, note=False)


def analyze_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str = "cpu",
               **settings: Any) -> vulnerability.Scores:
    """``vulnerability.analyze`` on ``device`` (the model is given back where it was)."""
    with train.on_device(model, device):
        return vulnerability.analyze(model, x.to(device), y.to(device), **settings)


def cached_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, path: Path, key: dict[str, Any],
                  piece: str = "scores", *, method: str = "gain", samples: int = 256, seed: int = 0,
                  device: str = "cpu") -> dict:
    """Vulnerability scores of ``model`` from ``path`` if computed from the inputs ``key``
    describes, else computed (``vulnerability.analyze``, on ``device``) and stored there with the key."""
    if is_current(path, key, piece):
        return vulnerability.load_scores(path)
    scores = analyze_on(model, x, y, device, method=method, samples=samples, seed=seed)
    vulnerability.save_scores(scores, path)
    store_key(path, key)
    return scores


# --- training ------------------------------------------------------------------------------------

def _build(builder: str, data_spec: str, width: float = 1.0) -> nn.Module:
    info = data.info(data_spec)
    return checkpoint.build(builder, num_classes=info.num_classes, in_channels=info.in_channels,
                            input_size=info.input_size, width=width)


def train_checkpoint(builder: str, data_spec: str, output: str | Path, *, epochs: int = 5, lr: float = 2e-3,
                     batch_size: int = 64, width: float = 1.0, seed: int = 0, threads: int | None = None,
                     device: str = "cpu", normalize: Any = None) -> float:
    """``ftcnn train``: train ``builder`` on ``data_spec``'s training split (on ``device``), save it
    to ``output`` with its test accuracy (returned), training settings and input normalisation
    (``normalize``, default dataset: recorded with its constants, so the file says it all)."""
    check_output_file(output)
    data.info(data_spec)  # an unknown data set: one line before loading anything
    norm = data.resolve_normalize(data_spec, data.DATASET if normalize is None else normalize)
    train_set, test_set = data.load(data_spec, "train", normalize=norm), data.load(data_spec, "test", normalize=norm)
    train.seed_everything(seed)
    net = _build(builder, data_spec, width)
    distributed.apply_threads(threads, net)
    losses = train.fit(net, train_set, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device)
    accuracy = train.evaluate(net, test_set, device=device)
    checkpoint.save(net, output, data=data_spec, test_accuracy=accuracy, epochs=epochs, seed=seed,
                    lr=lr, batch_size=batch_size, losses=losses, normalize=norm)
    return accuracy


def train_or_load(path: str | Path, builder: str, data_spec: str, *, epochs: int = 5, width: float = 1.0,
                  lr: float = 2e-3, seed: int = 0, progress: bool = False, device: str = "cpu") -> nn.Module:
    """The checkpoint at ``path`` if it exists, else a model trained as ``ftcnn train`` does and saved there.

    Example (minutes of CPU, so not run as a doctest)::

            net = train_or_load("runs/lenet5.pt", "lenet5", "digits", epochs=5)
    """
    path = Path(path)
    if path.is_file():
        return checkpoint.load(path)
    train_set, test_set = data.load(data_spec, "train"), data.load(data_spec, "test")
    train.seed_everything(seed)
    net = _build(builder, data_spec, width)
    losses = train.fit(net, train_set, epochs=epochs, lr=lr, seed=seed, progress=progress, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(net, path, data=data_spec, test_accuracy=train.evaluate(net, test_set, device=device),
                    epochs=epochs, seed=seed, lr=lr, losses=losses, normalize=data.resolve_normalize(data_spec))
    return checkpoint.load(path)


def train_or_reuse(path: str | Path, builder: str, data_spec: str, *, epochs: int = 5,
                   width: float | None = None, seed: int = 0, threads: int | None = None,
                   allow_builder: str | None = None, log: Log | None = None, device: str = "cpu") -> nn.Module:
    """The model at ``path`` if it was trained from the same settings and training data
    (content, not names: the key stored beside it), else one trained now and saved there.

    ``width=None`` builds at width 1 and leaves the width out of the key (``demo``'s
    folders); ``threads`` sets torch's threads for the new model before training.
    """
    say = log or _quiet
    path = Path(path)
    files.make_folder(path.parent)
    train_set = data.load(data_spec, "train")
    trained_from = {"model": builder, **({} if width is None else {"width": width}), "epochs": epochs,
                    "seed": seed, "data": data_spec, "train data": fingerprint.data_digest(*train_set.tensors)}
    if is_current(path, trained_from, path.name):
        say(f"reusing {path}")
        return checkpoint.load(path, allow_builder=allow_builder)
    train.seed_everything(seed)
    net = _build(builder, data_spec, 1.0 if width is None else width)
    distributed.apply_threads(threads, net)
    train.fit(net, train_set, epochs=epochs, seed=seed, desc=f"train {builder}", device=device)
    accuracy = train.evaluate(net, data.load(data_spec, "test"), device=device)
    checkpoint.save(net, path, data=data_spec, test_accuracy=accuracy, epochs=epochs, seed=seed,
                    normalize=data.resolve_normalize(data_spec))  # the active block's, else dataset
    store_key(path, trained_from)
    say(f"{builder} on {data_spec}: test accuracy {accuracy:.2%} -> {path}")
    return net


# --- analyze -------------------------------------------------------------------------------------

def analyze_settings(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``given`` that ``method`` takes and that are set (the others keep its defaults)."""
    takes = vulnerability.settings_of(method)
    return {k: v for k, v in given.items() if k in takes and v is not None}


def fi_expected_time(model: nn.Module, x: torch.Tensor, device: str, settings: Mapping[str, Any]) -> str:
    """``fi``'s run time, said before it starts: one timed inference over ``x`` on ``device`` x the
    faulty forwards it will make (``vulnerability.fi_forwards``); an upper bound, since activation
    reuse starts each faulty forward at the faulted layer."""
    forwards = vulnerability.fi_forwards(model, **settings)
    model.eval()  # fi scores in eval mode too: the timed inference must not touch batch-norm statistics
    with train.on_device(model, device), torch.inference_mode():
        _, seconds = progress.timed(campaign.predict, model, x.to(device))
    return progress.expected(seconds * forwards, "fi scoring",
                             f"{forwards} faulty forwards of {len(x)} inputs, from one timed inference "
                             f"({seconds:.2g} s); activation reuse cuts it")


def analyze_checkpoint(model: nn.Module, data_spec: str, *, method: str = "gain", limit: int | None = None,
                       settings: Mapping[str, Any] | None = None, source: str | None = None,
                       output: str | Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """``ftcnn analyze``: ``method``'s scores of ``model``, computed on ``device`` (gain learns from TRAINING inputs; fi
    measures on TEST inputs; l1 needs none), the first ``limit`` inputs; saved to ``output``
    (plot beside it) when given. ``settings``: the method's own keywords, e.g. from
    :func:`analyze_settings`."""
    vulnerability.get_method(method)  # unknown method: one clear line before loading data
    x, y = campaign.stack_dataset(data.load(data_spec, vulnerability.input_split(method)))
    if limit:
        x, y = x[:limit], y[:limit]
    campaign.check_input_shape(model, x)
    if method == "fi":  # minutes on real networks: say how many, up front (issue 14)
        note(fi_expected_time(model, x, device, analyze_settings(method, settings or {})), "analyze")
    scores = analyze_on(model, x, y, device, method=method, **analyze_settings(method, settings or {}))
    scores.update(checkpoint=str(source), data=data_spec, inputs=len(x))
    if output is not None:
        vulnerability.save_scores(scores, output)
    return scores


def compare_methods(model: nn.Module, data_spec: str, methods: Sequence[str], *, against: str = "fi",
                    scores_dir: str | Path | None = None, limit: int | None = None,
                    settings: Mapping[str, Any] | None = None, source: str | None = None,
                    output: str | Path | None = None, log: Log | None = None, device: str = "cpu"
                    ) -> dict[str, Any]:
    """``ftcnn analyze --compare``: rank each of ``methods`` against ``against`` (Spearman, per
    layer and pooled). With ``scores_dir``, ``METHOD.json`` there is used when present and
    computed scores are stored there. Returns (and writes to ``output``) the agreement blob:
    ``{"against", "checkpoint", "data", "agreement": {method: ...}, "settings"}``."""
    say = log or _quiet
    methods = list(methods)
    if not methods:
        raise ValueError("--compare needs at least one method, e.g. --compare gain,l1")
    for m in methods + [against]:
        vulnerability.get_method(m)
    folder = Path(scores_dir) if scores_dir is not None else None
    results = {}
    # a scores folder has one writer at a time, as a run folder
    with files.exclusive_folder(folder) if folder is not None else contextlib.nullcontext():
        for m in dict.fromkeys(methods + [against]):
            cached = folder / f"{m}.json" if folder is not None else None
            if cached is not None and cached.exists():
                results[m] = vulnerability.load_scores(cached)
                if results[m].get("checkpoint") not in (None, str(source)):
                    say(f"note: {cached} was computed for {results[m]['checkpoint']}")
                say(f"{m}: scores from {cached}")
                continue
            results[m] = analyze_checkpoint(model, data_spec, method=m, limit=limit, settings=settings,
                                            source=source, device=device)
            say(f"{m}: computed in {results[m]['seconds']:.1f}s")
            if cached is not None:
                vulnerability.save_scores(results[m], cached)
    blob = {"against": against, "checkpoint": str(source), "data": data_spec,
            "agreement": {m: vulnerability.rank_agreement(results[m], results[against]) for m in methods},
            "settings": {m: results[m].get("settings", {}) for m in results}}
    if output is not None:
        files.write_json(output, blob, indent=1)  # strict: an undefined rho is null, never NaN
    return blob


# --- harden --------------------------------------------------------------------------------------

def harden_on(model: nn.Module, scores: Any, device: str = "cpu", *, calibration: torch.Tensor | None = None,
              **settings: Any) -> nn.Module:
    """``hardening.harden`` with the ranges profiled on ``device``; the hardened model is
    returned where ``model`` is (both on the CPU for a CPU model)."""
    with train.on_device(model, device):
        hardened = hardening.harden(model, scores, calibration=None if calibration is None else
                                    calibration.to(device), **settings)
    return hardened.to(train.model_device(model))


def harden_checkpoint(model: nn.Module, data_spec: str, output: str | Path, *, scores: str | Path | None = None,
                      ratio: float = 0.1, max_macs: float | None = None, batch: int = cost.DEFAULT_BATCH,
                      correction: str = "min",
                      tmr: str | None = None, restrict: str | None = None, range_margin: float = 0.0,
                      check_weights: str | None = None, calibration_size: int = 1000, seed: int = 0,
                      onnx: str | Path | None = None, device: str = "cpu",
                      restrict_share: float | None = None, bound_copies: int | None = None,
                      fold_bn: bool = False, code: str | None = None) -> dict[str, Any]:
    """``ftcnn harden``: protect ``model``, save it to ``output`` (and ``onnx``), and return the
    record stored in its metadata (``hardening``): the settings, protected channels, clean test
    accuracy of the original and (``test_accuracy``) of the hardened model, measured overheads
    (``overheads["cost"]``: the price at the deployment ``batch``, where ``max_macs`` applies; the
    same price ``protect`` records for the same protection).

    Ranges are profiled on ``calibration_subset(training inputs, calibration_size, seed)``, on
    ``device`` (so are the clean accuracies); the overheads are measured on the CPU. ``bound_copies``
    (None: ``harden``'s default) is recorded in the checkpoint's transform. ``fold_bn``: protect
    the deployed form, BatchNorm folded into its conv (``ftcnn.protection.fold``); the folded pairs are recorded.
    """
    check_output_file(output)
    if onnx is not None:
        check_output_file(onnx)
        if code is not None:  # the decode reads float32 bits as int32 words, which ONNX cannot express
            raise ValueError("--onnx cannot export a model with --code (ONNX has no float32-to-int32 bit "
                             "cast); export it without the code")
    if scores is None and hardening.scores_needed(ratio, max_macs, tmr):  # hardening's message names Python keywords
        raise ValueError("--scores is needed to choose the channels to protect (from `ftcnn analyze`; "
                         "or use --tmr full, or --ratio 0)")
    layer_scores = vulnerability.load_scores(scores) if scores is not None else None
    train_x, _ = campaign.stack_dataset(data.load(data_spec, "train"))
    calibration = calibration_subset(train_x, calibration_size, seed)  # the one rule (ftcnn.splits)
    hardened = harden_on(model, layer_scores, device, ratio=ratio, max_macs=max_macs, batch=batch,
                         correction=correction,
                         tmr=tmr, restrict=restrict, range_margin=range_margin, calibration=calibration,
                         check_weights=check_weights, restrict_share=restrict_share, fold_bn=fold_bn,
                         code=code, **({} if bound_copies is None else {"bound_copies": bound_copies}))
    test_set = data.load(data_spec, "test")
    input_shape = tuple(train_x.shape[1:])
    acc_original = train.evaluate(model, test_set, device=device)
    acc_hardened = train.evaluate(hardened, test_set, device=device)
    overheads = hardening.overheads(model, hardened, input_shape, batch)
    record = {"scores": str(scores) if scores else None, "ratio": ratio, "max_macs": max_macs, "batch": batch,
              "correction": "tmr" if tmr == "full" else correction, "tmr": tmr, "restrict": restrict,
              "range_margin": range_margin, "check_weights": check_weights,
              "calibration_size": len(calibration), "seed": seed,
              "protected": hardening.protected(hardened),
              "original_test_accuracy": acc_original, "overheads": overheads}
    if code is not None:  # only when asked: records of older runs keep their keys
        record["code"] = code
    if fold_bn:  # only when asked: records of older runs keep their keys
        record["folded_bn"] = next((t["layers"] for t in checkpoint.get_spec(hardened)["transforms"]
                                    if t["kind"] == "fold_bn"), {})
    if restrict_share is not None:  # only when asked: records of older runs keep their keys
        record["restrict_share"] = restrict_share
        record["restrict_layers"] = [n for n, m in hardened.named_modules()
                                     if isinstance(m, hardening.Hardened) and m.restrict is not None]
    checkpoint.save(hardened, output, data=data_spec, test_accuracy=acc_hardened, hardening=record)
    if onnx is not None:
        hardening.export_onnx(hardened, onnx, input_shape)
    return {**record, "test_accuracy": acc_hardened}


# --- prune ---------------------------------------------------------------------------------------

def prune_finetune(model: nn.Module, train_set: TensorDataset, *, ratio: float | Mapping[str, float],
                   criterion: str, scores: Mapping[str, Any] | None, input_shape: Sequence[int],
                   epochs: int, lr: float = 1e-3, seed: int = 0, protect: Sequence[str] | None = None,
                   test_set: TensorDataset | None = None, reseed: bool = True, progress: bool = True,
                   log: Log | None = None, device: str = "cpu") -> tuple[nn.Module, float | None, list[float]]:
    """Prune, then fine-tune in place: the step every pruning flow shares.

    Returns ``(pruned, accuracy on test_set before fine-tuning or None, fine-tuning losses)``.
    ``reseed``: seed every generator with ``seed`` just before fine-tuning (``compare``'s
    variants fine-tune without, which keeps their numbers). The surgery is done where ``model``
    is; the evaluation and the fine-tune on ``device``.
    """
    say = log or _quiet
    pruned = pruning.prune(model, ratio=ratio, criterion=criterion, scores=scores, protect=protect,
                             input_shape=tuple(input_shape))
    before = train.evaluate(pruned, test_set, device=device) if test_set is not None else None
    say(f"pruned ({criterion}, ratio {ratio})" + ("" if before is None else f": accuracy {before:.2%}")
        + f"; fine-tuning {epochs} epoch(s) ...")
    if reseed:
        train.seed_everything(seed)
    losses = pruning.finetune(pruned, train_set, epochs, lr=lr, seed=seed, progress=progress, device=device)
    return pruned, before, losses


def prune_checkpoint(model: nn.Module, data_spec: str, output: str | Path, *, scores: str | Path | None = None,
                     ratio: float | Mapping[str, float] = 0.3, criterion: str = "vulnerability",
                     protect: Sequence[str] | None = None, finetune_epochs: int = 3, lr: float = 1e-3,
                     samples: int = 256, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """``ftcnn prune``: structured pruning (scores from ``scores``, else gain scores on
    ``samples`` training inputs; none for L1), a short fine-tune, saved to ``output``. Scores,
    accuracies and the fine-tune are computed on ``device``.

    Returns the metadata stored with the checkpoint: clean accuracy of the original
    (``accuracy_original``), pruned (``accuracy_before_finetune``) and fine-tuned
    (``test_accuracy``) model, params and MACs before and after, ``removed_channels``.
    """
    check_output_file(output)
    rules.check("criterion", criterion)
    train_set, test_set = data.load(data_spec, "train"), data.load(data_spec, "test")
    campaign.check_input_shape(model, test_set.tensors[0][:1])
    input_shape = tuple(train_set.tensors[0].shape[1:])
    pruning.check_arguments(model, ratio=ratio, criterion=criterion, protect=protect, input_shape=input_shape)
    if criterion == "l1":
        vuln = None
    elif scores is not None:
        vuln = vulnerability.load_scores(scores)
    else:
        vuln = analyze_on(model, *train_set.tensors, device, method="gain", samples=samples, seed=seed)
    before = train.evaluate(model, test_set, device=device)
    pruned, after, losses = prune_finetune(model, train_set, ratio=ratio, criterion=criterion, scores=vuln,
                                           protect=protect, input_shape=input_shape, epochs=finetune_epochs,
                                           lr=lr, seed=seed, test_set=test_set, device=device)
    tuned = train.evaluate(pruned, test_set, device=device)
    cost_before = {"params": cost.parameters(model), "macs": cost.macs(model, input_shape)["macs"]}
    cost_after = {"params": cost.parameters(pruned), "macs": cost.macs(pruned, input_shape)["macs"]}
    meta = dict(test_accuracy=tuned, accuracy_original=before,
                accuracy_before_finetune=after, params_before=cost_before["params"],
                params_after=cost_after["params"], macs_before=cost_before["macs"],
                macs_after=cost_after["macs"], criterion=criterion, ratio=ratio,
                finetune_epochs=finetune_epochs, finetune_losses=losses, seed=seed,
                removed_channels=pruning.removed_channels(pruned))
    checkpoint.save(pruned, output, data=data_spec, **meta)
    return meta


# --- inject --------------------------------------------------------------------------------------

def inject_checkpoint(model: nn.Module, data_spec: str, config: campaign.CampaignConfig, output: str | Path, *,
                      limit: int | None = None, source: str | None = None,
                      campaign_file: str | Path | None = None) -> dict[str, Any]:
    """``ftcnn inject``: a campaign on ``data_spec``'s test split (its first ``limit`` inputs) on
    ``config.device``, written to (or resumed from) the run folder ``output``; returns the summary.

    One line before the trials says what they will cost (``campaign.expected_time``). With
    ``campaign_file`` (``--config FILE.toml``), its path and SHA-256 go into the summary as
    ``campaign_file``: a record of how the run was asked for, not part of its identity, so
    the same settings resume with or without the file. One warning line when float parameters lie
    outside the fault space (``faults.unattacked_warning``)."""
    inputs, labels = campaign.stack_dataset(data.load(data_spec, "test"), config.device)
    if limit:
        inputs, labels = inputs[:limit], labels[:limit]
    campaign.check_input_shape(model, inputs)
    asked = None if campaign_file is None else {  # hashed before the run: the file it read
        "path": str(campaign_file), "sha256": hashlib.sha256(Path(campaign_file).read_bytes()).hexdigest()}
    record = {"checkpoint": str(source), "data": data_spec, "inputs": len(inputs),
              "architecture": checkpoint.get_spec(model),
              "normalize": data.resolve_normalize(data_spec).record()}  # the inputs' (issue 23)
    with files.exclusive_folder(output):  # this process only: its workers write the database under it
        summary = campaign.run_campaign(model, inputs, labels, config, output, record=record,
                                        announce=lambda line: note(line, "inject"))
        if asked is not None or "campaign_file" in summary:  # this run's file, or none
            summary.pop("campaign_file", None)
            if asked is not None:
                summary["campaign_file"] = asked
            campaign.write_summary(Path(output), summary)
    if config.target == "parameters":  # learned values no fault hits: said, not only recorded
        warning = faults.unattacked_warning(model, summary.get("memory", {}).get("unattacked_memory", {}))
        if warning:
            progress.console(stderr=True, soft_wrap=True).print(f"warning: {warning}", markup=False, highlight=False)
    return summary


# --- the paper's pipeline ------------------------------------------------------------------------

PIPELINE_STAGES = ("original", "pruned", "pruned_finetuned", "hardened_pruned", "hardened_unpruned")
PIPELINE_CALIBRATION_SIZE = 1000  # training inputs the pipeline profiles ranges on


def _model_sha256(model: nn.Module) -> str:
    """SHA-256 of the model's tensors: ties a pipeline folder to the exact model it started
    from (stored as ``model_sha256`` in ``pipeline.json``; kept as it was so old folders resume)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def prune_and_harden(model: nn.Module, train_set: TensorDataset, test_set: TensorDataset, out_dir: str | Path, *,
                     prune_ratio: float, harden_ratio: float = 0.1, correction: str = "min",
                     criterion: str = "vulnerability", finetune_epochs: int = 3, lr: float = 1e-3,
                     samples: int = 256, seed: int = 0, restrict: str | None = None,
                     record: Mapping[str, Any] | None = None, progress: bool = True,
                     log: Log | None = None, device: str = "cpu") -> dict[str, Any]:
    """The paper's pipeline: score (gain, training inputs) -> prune -> fine-tune -> re-score
    -> harden, plus the original hardened at the same ratio for comparison.

    Writes into ``out_dir``: ``scores_original.json``, ``pruned.pt`` (pruned and
    fine-tuned), ``scores_pruned.json``, ``hardened.pt``, ``hardened_unpruned.pt``
    and ``summary.json`` (params, MACs, CPU latency at batch 1 and 128 -- one
    thread, all models timed interleaved, medians -- and clean test accuracy of
    every stage in ``PIPELINE_STAGES``, plus relative costs, and the ``device`` that
    scored, fine-tuned, profiled and evaluated; not part of the settings a resumed folder must match).
    Resumable: a stage whose output exists is loaded, not redone; a folder started
    with other settings or another model is refused. Returns the summary.

    Example (minutes of CPU, so not run as a doctest)::

            prune_and_harden(model, train, test, "runs/pipe", prune_ratio=0.3, harden_ratio=0.1)
    """
    say = log or _quiet
    out = Path(out_dir)
    pruning.check_ratio(prune_ratio, "prune ratio")
    pruning.check_ratio(harden_ratio, "harden ratio")
    rules.check("criterion", criterion)
    if finetune_epochs < 0:
        raise ValueError(f"finetune epochs must be >= 0 (got {finetune_epochs})")
    files.make_folder(out)
    x_train, y_train = train_set.tensors[0], train_set.tensors[1]
    input_shape = tuple(x_train.shape[1:])
    data_meta = _data_meta(record)
    config = {"prune_ratio": prune_ratio, "harden_ratio": harden_ratio, "correction": correction,
              "criterion": criterion, "finetune_epochs": finetune_epochs, "lr": lr, "samples": samples,
              "seed": seed, "restrict": restrict, "model_sha256": _model_sha256(model), **data_meta}
    if restrict is not None or getattr(hardening.CORRECTIONS.get(correction), "needs_ranges", False):
        # ranges are profiled: a folder calibrated by the old rule (a numpy permutation) is refused
        config["calibration"] = f"calibration_subset({PIPELINE_CALIBRATION_SIZE}, seed)"
    config_path = out / "pipeline.json"
    if config_path.exists():
        previous = readback.read_json(config_path, readback.SETTINGS)
        diff = sorted(k for k in set(config) | set(previous) if config.get(k) != previous.get(k))
        if diff:
            raise ValueError(f"{out} holds a pipeline run with other settings ({', '.join(diff)}); "
                             f"use another output folder")
    else:
        files.write_json(config_path, config, indent=1)
    if (out / "summary.json").exists():
        say(f"reusing {out / 'summary.json'} (delete it to measure again)")
        return readback.read_json(out / "summary.json", readback.SETTINGS)

    def scores_for(net: nn.Module, name: str) -> dict[str, Any]:
        path = out / name
        if path.exists():
            say(f"reusing {path}")
            return vulnerability.load_scores(path)
        say(f"scoring ({name}) ...")
        scores = analyze_on(net, x_train, y_train, device, method="gain", samples=samples, seed=seed)
        vulnerability.save_scores(scores, path)
        return scores

    calibration = calibration_subset(x_train, PIPELINE_CALIBRATION_SIZE, seed)  # the one rule (ftcnn.splits)

    def hardened(net: nn.Module, scores: Mapping[str, Any], name: str, **meta: Any) -> nn.Module:
        path = out / name
        if path.exists():
            say(f"reusing {path}")
            return checkpoint.load(path)
        hard = harden_on(net, scores["layers"], device, ratio=harden_ratio, correction=correction,
                         restrict=restrict, calibration=calibration)
        checkpoint.save(hard, path, test_accuracy=train.evaluate(hard, test_set, device=device), **meta)
        return checkpoint.load(path)  # measure what was saved (and prove it loads)

    model.eval()
    scores_original = scores_for(model, "scores_original.json")
    pruned_path = out / "pruned.pt"
    if pruned_path.exists():
        say(f"reusing {pruned_path}")
        pruned = checkpoint.load(pruned_path)
    else:
        pruned, before, losses = prune_finetune(
            model, train_set, ratio=prune_ratio, criterion=criterion,
            scores=scores_original if criterion == "vulnerability" else None, input_shape=input_shape,
            epochs=finetune_epochs, lr=lr, seed=seed, test_set=test_set, progress=progress, log=say,
            device=device)
        checkpoint.save(pruned, pruned_path, test_accuracy=train.evaluate(pruned, test_set, device=device),
                        accuracy_before_finetune=before, finetune_losses=losses, stage="pruned_finetuned",
                        **data_meta)
        pruned = checkpoint.load(pruned_path)
    scores_pruned = scores_for(pruned, "scores_pruned.json")
    hard_pruned = hardened(pruned, scores_pruned, "hardened.pt", stage="hardened_pruned", **data_meta)
    hard_unpruned = hardened(model, scores_original, "hardened_unpruned.pt", stage="hardened_unpruned",
                             **data_meta)

    say("measuring costs ...")
    models = {"original": model, "pruned_finetuned": pruned, "hardened_pruned": hard_pruned,
              "hardened_unpruned": hard_unpruned}
    # latency: all models timed interleaved on one thread, so the ratios survive a busy machine
    lat = {b: cost.interleaved_latency(models, input_shape, batch=b, threads=1) for b in (1, 128)}
    stages: dict[str, dict[str, Any]] = {}
    for name, net in models.items():
        stages[name] = {"params": cost.parameters(net), **cost.macs(net, input_shape),
                        "latency_b1_ms": lat[1][name], "latency_b128_ms": lat[128][name],
                        "accuracy": train.evaluate(net, test_set, device=device)}
    # same structure as pruned_finetuned; only the accuracy differs (before fine-tuning)
    stages["pruned"] = {**stages["pruned_finetuned"],
                        "accuracy": checkpoint.meta(pruned).get("accuracy_before_finetune")}
    stages = {name: stages[name] for name in PIPELINE_STAGES}
    summary = {
        "config": config, "record": dict(record or {}), "input_shape": list(input_shape),
        "latency": {"threads": 1, "method": "cost.interleaved_latency (median ms per forward)"},
        "stages": stages,
        "relative": {
            "pruned_vs_original": cost.relative(stages["pruned_finetuned"], stages["original"]),
            "hardened_pruned_vs_hardened_unpruned": cost.relative(stages["hardened_pruned"],
                                                                  stages["hardened_unpruned"]),
            "hardened_pruned_vs_original": cost.relative(stages["hardened_pruned"], stages["original"]),
        },
        "removed_channels": pruning.removed_channels(pruned),
        "device": device,
    }
    files.write_json(out / "summary.json", summary, indent=1)
    return summary


def prune_and_protect(model: nn.Module, train_set: TensorDataset, test_set: TensorDataset,
                      out_dir: str | Path, *, prune_ratio: float = 0.3, criterion: str = "vulnerability",
                      finetune_epochs: int = 3, lr: float = 1e-3, max_macs: float = 1.0,
                      max_latency: float | None = None, ber: float = 1e-4, trials: int = 100, seed: int = 0,
                      validation_fraction: float = 0.2, samples: int = 256, measure_latency: bool = True,
                      record: dict[str, Any] | None = None, log: Log | None = None, device: str = "cpu",
                      batch: int = cost.DEFAULT_BATCH, max_memory: float | None = None
                      ) -> protect_mod.ProtectResult:
    """Prune -> fine-tune -> protect within a budget relative to the original (unpruned) model.

    Writes into ``out_dir``: ``pruned.pt`` (pruned, fine-tuned on the fit
    split), ``protected.pt``, ``front.json`` (every candidate's cost relative
    to the ORIGINAL model, validation accuracy under faults, the choice; plus
    ``end_to_end``: clean test accuracy of original / pruned / protected and
    test accuracy under faults of the protected model and of the unprotected
    original) and ``front.png``.

    Returns:
        The :class:`ftcnn.protection.protect.ProtectResult` (``.extra["end_to_end"]`` holds the comparison).

    Example (minutes of CPU, so not run as a doctest)::

            result = prune_and_protect(net, train_set, test_set, "runs/e2e", prune_ratio=0.3,
                                       max_macs=1.0, ber=1e-4, trials=50)
    """
    say = log or _quiet
    protect_mod.check_budget(max_macs, max_latency, ber, trials, batch=batch, at_least_one=False,
                             max_memory=max_memory)
    rules.check("prune_ratio", prune_ratio)
    rules.check("criterion", criterion)
    rules.check("finetune_epochs", finetune_epochs)
    out = Path(out_dir)
    files.make_folder(out)
    x_train, y_train = train_set.tensors[0], train_set.tensors[1]
    (x_fit, y_fit), _ = validation_split(x_train, y_train, validation_fraction, seed)
    input_shape = tuple(x_train.shape[1:])
    model.eval()
    scores = None
    if criterion == "vulnerability":
        say("scoring the original (gain, fit split) ...")
        scores = analyze_on(model, x_fit, y_fit, device, method="gain", samples=samples, seed=seed)
    pruned, _, _ = prune_finetune(model, TensorDataset(x_fit, y_fit), ratio=prune_ratio, criterion=criterion,
                                  scores=scores, input_shape=input_shape, epochs=finetune_epochs, lr=lr,
                                  seed=seed, progress=False, log=say, device=device)
    pruned.eval()
    data_meta = _data_meta(record)
    checkpoint.save(pruned, out / "pruned.pt", stage="pruned_finetuned", criterion=criterion,
                    prune_ratio=prune_ratio, **data_meta)
    result = protect_mod.protect(pruned, x_train, y_train, ber=ber, max_macs=max_macs, max_latency=max_latency,
                                 max_memory=max_memory, trials=trials, seed=seed, batch=batch, reference=model,
                                 validation_fraction=validation_fraction,
                                 measure_latency=measure_latency, work_dir=out / "campaigns", log=say,
                                 device=device)
    # the test split, only now that the choice is made; both rows on the end-to-end role's faults
    # (never the validation trials', paired with each other: ftcnn.campaigns.seeds)
    protect_mod.evaluate_test(result, *test_set.tensors, work_dir=out / "campaigns", role="end_to_end")
    original = protect_mod.ProtectResult("original", "", [], {"original": model}, result.config)
    protect_mod.evaluate_test(original, *test_set.tensors, work_dir=out / "campaigns", role="end_to_end")
    result.extra["end_to_end"] = {
        "prune_ratio": prune_ratio, "criterion": criterion, "finetune_epochs": finetune_epochs,
        "clean_test": {"original": train.evaluate(model, test_set, device=device),
                       "pruned": train.evaluate(pruned, test_set, device=device),
                       "protected": train.evaluate(result.model, test_set, device=device)},
        "original_test": original.test["original"], "removed_channels": pruning.removed_channels(pruned),
        "costs_relative_to": "the original (unpruned, unprotected) model",
    }
    result.extra["record"] = {k: str(v) for k, v in (record or {}).items()}
    protect_mod.write_result(result, out, **data_meta, stage="pruned_protected")
    return result


def run_pipeline(model: nn.Module, data_spec: str, out_dir: str | Path, *, prune_ratio: float = 0.3,
                 criterion: str = "vulnerability", finetune_epochs: int = 3, lr: float = 1e-3, samples: int = 256,
                 seed: int = 0, harden_ratio: float = 0.1, correction: str = "min", restrict: str | None = None,
                 max_macs: float | None = None, max_latency: float | None = None, ber: float = 1e-4,
                 trials: int = 100, allow_builder: str | None = None, source: str | None = None,
                 log: Log | None = None, device: str = "cpu", batch: int = cost.DEFAULT_BATCH,
                 max_memory: float | None = None) -> dict[str, Any] | protect_mod.ProtectResult:
    """``ftcnn pipeline``: :func:`prune_and_harden` on ``data_spec`` (its summary), or with
    ``max_macs`` (end-to-end mode) :func:`prune_and_protect` (its ``ProtectResult``), on ``device``."""
    if max_macs is not None:
        protect_mod.check_budget(max_macs, max_latency, ber, trials, batch=batch, at_least_one=False,
                             max_memory=max_memory)
    train_set, test_set = data.load(data_spec, "train"), data.load(data_spec, "test")
    campaign.check_input_shape(model, test_set.tensors[0][:1])
    record = {"data": data_spec, "checkpoint": str(source),
              "normalize": data.resolve_normalize(data_spec).record()}
    # one writer per run folder for the whole run; the stages it saved and reloads share the trusted builder
    with files.exclusive_folder(out_dir), checkpoint.allowing(allow_builder):
        if max_macs is not None:
            return prune_and_protect(model, train_set, test_set, out_dir, prune_ratio=prune_ratio,
                                     criterion=criterion, finetune_epochs=finetune_epochs, lr=lr, max_macs=max_macs,
                                     max_latency=max_latency, ber=ber, trials=trials, seed=seed, samples=samples,
                                     record=record, log=log, device=device, batch=batch,
                                     max_memory=max_memory)
        return prune_and_harden(model, train_set, test_set, out_dir, prune_ratio=prune_ratio,
                                harden_ratio=harden_ratio, correction=correction, criterion=criterion,
                                finetune_epochs=finetune_epochs, lr=lr, samples=samples, seed=seed,
                                restrict=restrict, record=record, log=log, device=device)
