"""The orchestration home: train-or-load, the data-carving rules, and prune -> protect end to end.

Issue 11 found the same flows written three times (the CLI, ``compare``,
``prune.pipeline``) with three calibration rules; new flows go here and the
CLI only parses and calls them. The two data rules live in
``ftcnn.splits`` (below every module that uses them, so nothing imports
upward) and are re-exported here.

:func:`prune_and_protect` is the paper's promise made checkable (issue 12):
prune (vulnerability or L1 scores) -> fine-tune -> protect within a budget
relative to the ORIGINAL model's cost, so "no more MACs than the original"
(``max_macs=1.0``) buys whatever protection the pruning paid for. The
protection is chosen on a validation split of the training data; the
fine-tune uses only the fit part, and the test split is read only to report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import TensorDataset

from ftcnn import checkpoint, data, prune as prune_mod, protect as protect_mod, train, vulnerability
from ftcnn.splits import calibration_subset, validation_split

__all__ = ["calibration_subset", "validation_split", "train_or_load", "prune_and_protect"]


def train_or_load(path: str | Path, builder: str, data_spec: str, *, epochs: int = 5, width: float = 1.0,
                  lr: float = 2e-3, seed: int = 0, progress: bool = False) -> nn.Module:
    """The checkpoint at ``path`` if it exists, else a model trained as ``ftcnn train`` does and saved there.

    Example:
        >>> net = train_or_load("runs/lenet5.pt", "lenet5", "digits", epochs=5)
    """
    path = Path(path)
    if path.is_file():
        return checkpoint.load(path)
    info = data.info(data_spec)
    train_set, test_set = data.load(data_spec, "train"), data.load(data_spec, "test")
    train.seed_everything(seed)
    net = checkpoint.build(builder, num_classes=info.num_classes, in_channels=info.in_channels,
                           input_size=info.input_size, width=width)
    losses = train.fit(net, train_set, epochs=epochs, lr=lr, seed=seed, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(net, path, data=data_spec, test_accuracy=train.evaluate(net, test_set), epochs=epochs,
                    seed=seed, lr=lr, losses=losses)
    return checkpoint.load(path)


def prune_and_protect(model: nn.Module, train_set: TensorDataset, test_set: TensorDataset,
                      out_dir: str | Path, *, prune_ratio: float = 0.3, criterion: str = "vulnerability",
                      finetune_epochs: int = 3, lr: float = 1e-3, max_macs: float = 1.0,
                      max_latency: float | None = None, ber: float = 1e-4, trials: int = 100, seed: int = 0,
                      validation_fraction: float = 0.2, samples: int = 256, measure_latency: bool = True,
                      record: dict[str, Any] | None = None, log: Callable[[str], Any] | None = None
                      ) -> protect_mod.ProtectResult:
    """Prune -> fine-tune -> protect within a budget relative to the original (unpruned) model.

    Writes into ``out_dir``: ``pruned.pt`` (pruned, fine-tuned on the fit
    split), ``protected.pt``, ``front.json`` (every candidate's cost relative
    to the ORIGINAL model, validation accuracy under faults, the choice; plus
    ``end_to_end``: clean test accuracy of original / pruned / protected and
    test accuracy under faults of the protected model and of the unprotected
    original) and ``front.png``.

    Returns:
        The :class:`ftcnn.protect.ProtectResult` (``.extra["end_to_end"]`` holds the comparison).

    Example:
        >>> result = prune_and_protect(net, train_set, test_set, "runs/e2e", prune_ratio=0.3,
        ...                            max_macs=1.0, ber=1e-4, trials=50)
    """
    say = log or (lambda *_: None)
    protect_mod.check_budget(max_macs, max_latency, ber, trials)
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune ratio must lie in [0, 1) (got {prune_ratio})")
    if criterion not in prune_mod.CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; choose from {', '.join(prune_mod.CRITERIA)}")
    if finetune_epochs < 0:
        raise ValueError(f"finetune epochs must be >= 0 (got {finetune_epochs})")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output folder {out}: {exc.strerror}") from None
    x_train, y_train = train_set.tensors[0], train_set.tensors[1]
    (x_fit, y_fit), _ = validation_split(x_train, y_train, validation_fraction, seed)
    input_shape = tuple(x_train.shape[1:])
    model.eval()
    scores = None
    if criterion == "vulnerability":
        say("scoring the original (gain, fit split) ...")
        scores = vulnerability.analyze(model, x_fit, y_fit, method="gain", samples=samples, seed=seed)
    pruned = prune_mod.prune(model, ratio=prune_ratio, criterion=criterion, scores=scores, input_shape=input_shape)
    say(f"pruned ({criterion}, ratio {prune_ratio}); fine-tuning {finetune_epochs} epoch(s) on the fit split ...")
    train.seed_everything(seed)
    prune_mod.finetune(pruned, TensorDataset(x_fit, y_fit), finetune_epochs, lr=lr, seed=seed, progress=False)
    pruned.eval()
    data_meta = {k: v for k, v in (record or {}).items() if k == "data"}
    checkpoint.save(pruned, out / "pruned.pt", stage="pruned_finetuned", criterion=criterion,
                    prune_ratio=prune_ratio, **data_meta)
    result = protect_mod.protect(pruned, x_train, y_train, ber=ber, max_macs=max_macs, max_latency=max_latency,
                                 trials=trials, seed=seed, reference=model, validation_fraction=validation_fraction,
                                 measure_latency=measure_latency, work_dir=out / "campaigns", log=say)
    # the test split, only now that the choice is made
    protect_mod.evaluate_test(result, *test_set.tensors, work_dir=out / "campaigns")
    original = protect_mod.ProtectResult("original", "", [], {"original": model}, result.config)
    protect_mod.evaluate_test(original, *test_set.tensors, work_dir=out / "campaigns")
    result.extra["end_to_end"] = {
        "prune_ratio": prune_ratio, "criterion": criterion, "finetune_epochs": finetune_epochs,
        "clean_test": {"original": train.evaluate(model, test_set), "pruned": train.evaluate(pruned, test_set),
                       "protected": train.evaluate(result.model, test_set)},
        "original_test": original.test["original"], "removed_channels": prune_mod.removed_channels(pruned),
        "costs_relative_to": "the original (unpruned, unprotected) model",
    }
    result.extra["record"] = {k: str(v) for k, v in (record or {}).items()}
    protect_mod.write_result(result, out, **data_meta, stage="pruned_protected")
    return result
