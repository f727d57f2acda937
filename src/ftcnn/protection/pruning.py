"""Structured channel pruning by vulnerability or L1 norm (design §5).

Removes whole Conv2d filters and Linear neurons: the *least vulnerable* ones
(``criterion="vulnerability"``, the paper's proposal: they matter least to the
fault behaviour, so the hardening budget goes to the channels that do) or the
smallest-L1 ones (``criterion="l1"``, the conventional baseline).

Every structural decision goes through Torch-Pruning's dependency graph, so
BatchNorm, flatten -> Linear, residual adds and bottlenecks need no special
case. Channels the graph couples (e.g. all convs feeding the same residual
add, which must keep the same channel indices) form one *group*: a group is
ranked by the sum over its coupled layers of each layer's scores normalised
to sum 1 (so every coupled layer weighs the same whatever its score scale),
and the same indices are removed from all of them.

Rules, chosen so results are predictable:

- per group, ``floor(ratio * channels)`` channels are removed (round down),
  and at least one channel always stays;
- the model's output layer (the classifier: removing a logit would change the
  task) is never pruned; ``ignored_layers`` (older name: ``protect``) lists further layers to keep intact, by
  default the first Conv2d/Linear (it sees the raw input and is tiny). A
  group is kept whole when any of its coupled layers is protected, so in a
  ResNet protecting the stem also keeps the first stage's residual width;
- ties are broken by the lower channel index (stable sort).

Exactness: the kept channels keep their exact weights, so before fine-tuning
the pruned model computes what the full model computes with the removed
channels' outputs taken away. In a plain stack (conv/linear -> ReLU), a
channel whose weights and bias are zero outputs zero, so removing it changes
nothing (tested to 1e-5). Behind a BatchNorm a zeroed filter still outputs
BN's shift (beta - mean * scale), so there removal does change the outputs.

The pruned model records the pruned indices (Torch-Pruning's pruning history)
as a ``{"kind": "prune"}`` transform on its checkpoint spec, and
:func:`rebuild` replays that history on a fresh model, so ``ftcnn.save`` /
``ftcnn.load`` round-trip pruned models.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from ftcnn import checkpoint, rules
from ftcnn.injection.graph import FAULT_LAYER_TYPES
from ftcnn.injection.graph import layers as model_layers
from ftcnn.train import fit
from ftcnn.protection.vulnerability import finite_scores, l1, layer_scores

PRUNABLE = FAULT_LAYER_TYPES  # the model map's layers: what faults hit is what pruning removes
CRITERIA = rules.CRITERIA


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that must be pruned together.

    ``layers`` are the coupled Conv2d/Linear layers in execution order (the
    first is the root the indices refer to); ``index_map[layer]`` lists pairs
    ``(channel of that layer, channel of the root)``.
    """

    layers: tuple[str, ...]
    channels: int
    index_map: Mapping[str, tuple[tuple[int, int], ...]]

    @property
    def root(self) -> str:
        return self.layers[0]


# --------------------------------------------------------------------------- structure

def execution_order(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Names of the Conv2d/Linear modules in the order one forward calls them."""
    order: list[str] = []
    names = {layer.module: layer.name for layer in model_layers(model)}

    def hook(module: nn.Module, *_: Any) -> None:
        if names[module] not in order:
            order.append(names[module])

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad(), _eval(model):
            model(_example(model, input_shape))
    finally:
        for h in handles:
            h.remove()
    return order


class _eval:
    """Temporarily put a model in eval mode (BatchNorm refuses 1-sample batches in training)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *_: Any) -> None:
        self.model.train(self.was_training)


def _example(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    return torch.zeros((1, *input_shape), device=device)


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3 or \
            not all(isinstance(v, int) and v > 0 for v in input_shape):
        raise ValueError(f"input_shape must be (channels, height, width) of positive ints, got {input_shape!r}")
    return tuple(input_shape)


def dependency_graph(model: nn.Module, input_shape: Sequence[int]) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced on one zero input."""
    with _eval(model):
        return tp.DependencyGraph().build_dependency(model, example_inputs=_example(model, input_shape),
                                                     verbose=False)


def _out_fn(module: nn.Module):
    return tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels


def channel_groups(model: nn.Module, input_shape: Sequence[int],
                   graph: tp.DependencyGraph | None = None) -> list[ChannelGroup]:
    """Every group of coupled output channels of the model's Conv2d/Linear layers,
    in execution order of their roots (each layer appears in exactly one group)."""
    input_shape = _check_input_shape(input_shape)
    graph = graph or dependency_graph(model, input_shape)
    order = execution_order(model, input_shape)
    rank = {name: i for i, name in enumerate(order)}
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    seen: set[str] = set()
    groups = []
    for name in order:
        if name in seen:
            continue
        module = modules[name]
        group = graph.get_pruning_group(module, _out_fn(module), list(range(module.out_channels
                                        if isinstance(module, nn.Conv2d) else module.out_features)))
        index_map: dict[str, tuple[tuple[int, int], ...]] = {}
        for item in group.items:
            target = item.dep.target.module
            if isinstance(target, PRUNABLE) and graph.is_out_channel_pruning_fn(item.dep.handler) \
                    and names.get(target) in rank:
                index_map[names[target]] = tuple((int(i), int(r)) for i, r in zip(item.idxs, item.root_idxs)
                                                 if r is not None)  # None: no root channel (tp)
        layers = tuple(sorted(index_map, key=rank.__getitem__))
        if layers[0] != name:  # cannot happen: the earliest layer of a group is reached first
            raise RuntimeError(f"channel group of {name} starts at {layers[0]}")
        seen.update(layers)
        groups.append(ChannelGroup(layers, len(index_map[name]), index_map))
    return groups


# --------------------------------------------------------------------------- scores

def l1_scores(model: nn.Module) -> dict[str, list[float]]:
    """L1 norm of each output channel's weights (bias excluded), per Conv2d/Linear:
    the one L1, ``vulnerability.l1`` (summed in float64)."""
    return l1(model)


def group_score(group: ChannelGroup, scores: Mapping[str, Sequence[float]],
                channel_counts: Mapping[str, int]) -> np.ndarray:
    """Score per root channel: the sum over the coupled layers of their scores
    normalised to sum 1 (a layer with all-zero scores contributes zeros)."""
    total = np.zeros(group.channels)
    for layer in group.layers:
        if layer not in scores:
            raise ValueError(f"no score for layer {layer!r} (scores cover: {', '.join(sorted(scores)) or 'none'})")
        values = np.asarray(scores[layer], dtype=np.float64)
        if values.shape != (channel_counts[layer],):
            raise ValueError(f"scores for layer {layer!r} have {values.size} values but the layer has "
                             f"{channel_counts[layer]} output channels")
        values = finite_scores(layer, values)
        norm = values.sum()
        values = values / norm if norm > 0 else values
        for idx, root_idx in group.index_map[layer]:
            total[root_idx] += values[idx]
    return total


def lowest(scores: np.ndarray, ratio: float) -> list[int]:
    """The ``floor(ratio * n)`` lowest-scored indices (ties: lower index first),
    at most ``n - 1`` so a layer keeps at least one channel; sorted ascending."""
    n = len(scores)
    k = min(math.floor(ratio * n + 1e-9), n - 1)
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:max(k, 0)])


# --------------------------------------------------------------------------- planning

def _check_ratio(value: Any, what: str) -> float:
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= ratio <= 1.0:  # also rejects NaN
        raise ValueError(f"{what} {value} outside [0, 1]")
    return ratio


check_ratio = _check_ratio  # public: the pipelines check their ratios by the same rule


def _group_ratios(groups: list[ChannelGroup], ratio: float | Mapping[str, float]) -> list[float]:
    """One ratio per group (arguments already checked); unnamed layers keep all channels."""
    if not isinstance(ratio, Mapping):
        return [float(ratio)] * len(groups)
    ratios = {name: float(v) for name, v in ratio.items()}
    out = []
    for group in groups:
        named = {ratios[l] for l in group.layers if l in ratios}
        if len(named) > 1:
            raise ValueError(f"layers {', '.join(group.layers)} share their channels (coupled by the "
                             f"dependency graph) and must get the same pruning ratio")
        out.append(named.pop() if named else 0.0)
    return out


def _check_names(names: Any, known: Sequence[str], what: str) -> None:
    for name in names:
        if name not in known:
            raise ValueError(f"unknown layer {name!r} in {what} (Conv2d/Linear layers: {', '.join(known)})")


def shape_of(example_inputs: Any = None, input_shape: Sequence[int] | None = None) -> tuple[int, ...]:
    """One input's ``(C, H, W)`` from ``input_shape`` or from Torch-Pruning's ``example_inputs``
    (a batch: ``torch.randn(1, C, H, W)``); giving both is fine when they agree."""
    if example_inputs is not None:
        if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4:
            raise ValueError("example_inputs must be a batch tensor (N, C, H, W), e.g. torch.randn(1, 1, 8, 8), "
                             f"got {getattr(example_inputs, 'shape', type(example_inputs).__name__)}")
        shape = tuple(int(v) for v in example_inputs.shape[1:])
        if input_shape is not None and tuple(input_shape) != shape:
            raise ValueError(f"input_shape {tuple(input_shape)} and example_inputs {shape} disagree; give one")
        return _check_input_shape(shape)
    if input_shape is None:
        raise ValueError("give input_shape=(C, H, W) or example_inputs=torch.randn(1, C, H, W) to trace the model")
    return _check_input_shape(input_shape)


def kept_layers(model: nn.Module, ignored_layers: Sequence[Any] | None, protect: Sequence[str] | None
                ) -> Sequence[str] | None:
    """The layers never pruned, by name: ``ignored_layers`` (Torch-Pruning's name; names or the
    modules themselves) or ``protect`` (ftcnn's older keyword, still accepted); not both."""
    if ignored_layers is None:
        return protect
    if protect is not None:
        raise ValueError("give ignored_layers or protect (its older name), not both")
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in ignored_layers:
        if isinstance(layer, nn.Module):
            if id(layer) not in names:
                raise ValueError(f"ignored_layers: a {type(layer).__name__} that is not a module of this model")
            out.append(names[id(layer)])
        else:
            out.append(layer)
    return out


def check_arguments(model: nn.Module, *, ratio: float | Mapping[str, float], criterion: str = "vulnerability",
                    protect: Sequence[str] | None = None, input_shape: tuple[int, int, int],
                    global_pruning: bool = False) -> tuple[list[str], set[str]]:
    """Validate :func:`prune`'s arguments cheaply (before anyone computes scores).

    Returns the Conv2d/Linear names in execution order and the protected set.
    """
    if global_pruning and isinstance(ratio, Mapping):
        raise ValueError("global pruning ranks every layer together at one ratio; per-layer ratios are local")
    rules.check("criterion", criterion)
    input_shape = _check_input_shape(input_shape)
    if isinstance(ratio, Mapping):
        for name, value in ratio.items():
            _check_ratio(value, f"pruning ratio of layer {name!r}")
    else:
        _check_ratio(ratio, "pruning ratio")
    order = execution_order(model, input_shape)
    if not order:
        raise ValueError("model has no Conv2d/Linear layer to prune")
    if isinstance(protect, str):
        protect = [protect]
    protected = set(order[:1] if protect is None else protect)
    _check_names(protected, order, "protect")
    if isinstance(ratio, Mapping):
        _check_names(ratio, order, "the per-layer ratios")
    protected.add(order[-1])  # the classifier: its outputs are the classes
    return order, protected


def plan(model: nn.Module, *, ratio: float | Mapping[str, float], criterion: str = "vulnerability",
         scores: Mapping[str, Any] | None = None, protect: Sequence[str] | None = None,
         input_shape: tuple[int, int, int], global_pruning: bool = False) -> list[tuple[str, list[int]]]:
    """Which channels :func:`prune` removes: ``[(root layer, [channel indices]), ...]``.

    Pure (does not change ``model``); see :func:`prune` for the arguments.
    """
    order, protected = check_arguments(model, ratio=ratio, criterion=criterion, protect=protect,
                                       input_shape=input_shape, global_pruning=global_pruning)
    groups = channel_groups(model, input_shape)
    ratios = _group_ratios(groups, ratio)
    if isinstance(ratio, Mapping):
        for name, r in ratio.items():
            blocked = [l for g in groups if name in g.layers for l in g.layers if l in protected]
            if r > 0 and blocked:
                raise ValueError(f"layer {name!r} cannot be pruned: it is protected or coupled with "
                                 f"protected layer {blocked[0]!r}")
    if criterion == "vulnerability":
        if scores is None:
            raise ValueError("criterion 'vulnerability' needs scores (ftcnn.protection.vulnerability.analyze)")
        per_layer = layer_scores(scores)  # Scores, analyze's dict or a plain {layer: [scores]}
    else:
        per_layer = l1_scores(model)
    modules = dict(model.named_modules())
    counts = {n: modules[n].out_channels if isinstance(modules[n], nn.Conv2d) else modules[n].out_features
              for n in order}
    eligible = [(g, r) for g, r in zip(groups, ratios) if r > 0 and not protected.intersection(g.layers)]
    if global_pruning:
        return lowest_overall([(g, group_score(g, per_layer, counts)) for g, _ in eligible], float(ratio))
    result = []
    for group, r in eligible:
        idxs = lowest(group_score(group, per_layer, counts), r)
        if idxs:
            result.append((group.root, idxs))
    return result


def lowest_overall(scored: Sequence[tuple[ChannelGroup, np.ndarray]], ratio: float) -> list[tuple[str, list[int]]]:
    """Global pruning (Torch-Pruning's ``global_pruning=True``): one ranking of every eligible
    channel, the ``floor(ratio * total)`` lowest removed wherever they are, so layers lose
    different shares and the model as a whole ``ratio`` of its eligible channels. A group's
    scores are rescaled to mean 1 (``group_score`` makes each coupled layer sum to 1, which
    alone would favour removing the channels of wide layers); each group keeps at least one
    channel; ties go to the earlier group, then the lower index."""
    channels = sorted((float(score) * len(s) / max(len(g.layers), 1), gi, int(i))
                      for gi, (g, s) in enumerate(scored) for i, score in enumerate(s))
    budget = math.floor(ratio * len(channels) + 1e-9)
    removed: dict[int, list[int]] = {}
    for _, gi, i in channels:
        if budget == 0:
            break
        if len(removed.get(gi, [])) < len(scored[gi][1]) - 1:  # never a whole group
            removed.setdefault(gi, []).append(i)
            budget -= 1
    return [(scored[gi][0].root, sorted(idxs)) for gi, idxs in sorted(removed.items())]


def apply_plan(model: nn.Module, removals: Sequence[tuple[str, Sequence[int]]],
               input_shape: Sequence[int]) -> list[list[Any]]:
    """Prune ``model`` in place; returns Torch-Pruning's history as JSON-able data."""
    graph = dependency_graph(model, input_shape)
    modules = dict(model.named_modules())
    for name, idxs in removals:
        module = modules[name]
        graph.get_pruning_group(module, _out_fn(module), [int(i) for i in idxs]).prune()
    return [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in graph.pruning_history()]


# --------------------------------------------------------------------------- public API

def prune(model: nn.Module, scores: Mapping[str, Any] | None = None, *, ratio: float | Mapping[str, float],
          criterion: str = "vulnerability", protect: Sequence[str] | None = None,
          input_shape: tuple[int, int, int] | None = None, example_inputs: torch.Tensor | None = None,
          ignored_layers: Sequence[str | nn.Module] | None = None, global_pruning: bool = False) -> nn.Module:
    """Structured channel pruning; returns a new, smaller model (``model`` is untouched).

    Args:
        model: a CNN built from Conv2d/Linear (any topology Torch-Pruning traces).
        ratio: share of output channels to remove in every prunable layer, or
            ``{layer: ratio}`` (unnamed layers are not pruned).
        criterion: ``"vulnerability"`` (remove the lowest-scored channels) or ``"l1"``.
        scores: ``{layer: [score per output channel]}`` or the dict returned by
            ``ftcnn.protection.vulnerability.analyze``; required for ``"vulnerability"``.
        ignored_layers: layers never pruned, by name or module (Torch-Pruning's name; default:
            the first Conv2d/Linear); the output layer is always kept. ``protect``: its older name.
        input_shape: ``(C, H, W)`` of one input, to trace the model; or
        example_inputs: a batch as Torch-Pruning takes it (``torch.randn(1, C, H, W)``).
        global_pruning: rank the channels of all layers together (:func:`lowest_overall`):
            ``ratio`` of the eligible channels overall, more from the layers that score low.

    Returns:
        The pruned copy, with the transform recorded so ``ftcnn.save``/``load`` round-trip it.

    Example:
        >>> import torch, ftcnn
        >>> model = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8)
        >>> x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        >>> small = prune(model, ftcnn.analyze(model, x, y, samples=16), ratio=0.25, input_shape=(1, 8, 8))
        >>> sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
        True
    """
    spec = getattr(model, checkpoint.SPEC_ATTR, None) or {}
    if any(t.get("kind") == "harden" for t in spec.get("transforms", [])) or \
            any(type(m).__name__ == "Hardened" for m in model.modules()):
        raise ValueError("prune before hardening: this model is already hardened")
    input_shape = shape_of(example_inputs, input_shape)
    protect = kept_layers(model, ignored_layers, protect)
    removals = plan(model, ratio=ratio, criterion=criterion, scores=scores, protect=protect,
                    input_shape=input_shape, global_pruning=global_pruning)
    pruned = copy.deepcopy(model)
    history = apply_plan(pruned, removals, input_shape)
    if hasattr(model, checkpoint.SPEC_ATTR):
        checkpoint.with_transform(pruned, {
            "kind": "prune", "criterion": criterion,
            "ratio": dict(ratio) if isinstance(ratio, Mapping) else float(ratio),
            "input_shape": list(input_shape), "history": history})
    return pruned


# the fields of a {"kind": "prune"} transform (a checkpoint naming any other is refused)
TRANSFORM_FIELDS = ("kind", "criterion", "ratio", "input_shape", "history")
# the traced example input is allocated for real when a model is rebuilt off the meta device
MAX_INPUT_VALUES = 2 ** 26
MAX_HISTORY = 10_000


def check_transform(model: nn.Module, transform: Any) -> tuple[tuple[int, ...], list[list[Any]]]:
    """A stored pruning transform's fields, checked (one-line ``CheckpointError``):
    it comes from a file. Returns the input shape and the history entries, whose
    channel indices :func:`rebuild` checks against each layer as it replays them."""
    error = checkpoint.CheckpointError
    checkpoint.check_fields(transform, TRANSFORM_FIELDS, "prune transform")
    if transform.get("criterion") not in CRITERIA:
        raise error(f"prune transform: criterion must be one of {', '.join(CRITERIA)}, "
                    f"got {str(transform.get('criterion'))[:60]!r}")

    def share(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value <= 1

    ratio = transform.get("ratio")
    if not (share(ratio) or isinstance(ratio, Mapping) and
            all(isinstance(k, str) and share(v) for k, v in ratio.items())):
        raise error("prune transform: ratio must be a number in [0, 1] or an object of layer -> number in [0, 1]")
    shape = transform.get("input_shape")
    if not isinstance(shape, list) or len(shape) != 3 or \
            not all(type(v) is int and 0 < v <= MAX_INPUT_VALUES for v in shape) or \
            math.prod(shape) > MAX_INPUT_VALUES:
        raise error(f"prune transform: input_shape must be [channels, height, width] of positive ints "
                    f"with at most {MAX_INPUT_VALUES:,} values, got {str(shape)[:80]}")
    history = transform.get("history")
    if not isinstance(history, list) or len(history) > MAX_HISTORY:
        raise error(f"prune transform: history must be a list of at most {MAX_HISTORY:,} entries")
    for i, entry in enumerate(history):
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and type(entry[1]) is bool and isinstance(entry[2], list)
                and all(type(j) is int for j in entry[2])):
            raise error(f"prune transform: history entry #{i} must be [layer name, true/false, [indices]]")
    if any(type(m).__name__ == "Hardened" for m in model.modules()):
        raise error("prune transform on a hardened model (prune before hardening)")
    return tuple(shape), history


def rebuild(model: nn.Module, transform: dict[str, Any]) -> nn.Module:
    """Replay a recorded pruning on a freshly built model (for ``checkpoint.load``,
    which runs it on the ``meta`` device first, where indices are not checked by
    torch: so each entry's indices are checked here against the layer's current size)."""
    input_shape, history = check_transform(model, transform)
    graph = dependency_graph(model, input_shape)
    modules = dict(model.named_modules())
    for i, (name, out, idxs) in enumerate(history):
        layer = modules.get(name)
        if not isinstance(layer, PRUNABLE):
            raise checkpoint.CheckpointError(f"prune transform: history entry #{i} names "
                                             f"{str(name)[:80]!r}, not a Conv2d/Linear of the model")
        if isinstance(layer, nn.Conv2d):
            size = layer.out_channels if out else layer.in_channels
        else:
            size = layer.out_features if out else layer.in_features
        if not idxs or len(set(idxs)) != len(idxs) or len(idxs) >= size or \
                not all(0 <= j < size for j in idxs):
            raise checkpoint.CheckpointError(
                f"prune transform: history entry #{i} must remove distinct {'output' if out else 'input'} "
                f"channels of {name!r} in [0, {size}), and not all of them")
        graph.load_pruning_history([[name, out, list(idxs)]])
    return model


checkpoint.register_transform("prune", rebuild)


def removed_channels(model: nn.Module) -> dict[str, int]:
    """Output channels removed per root layer, summed over the model's prune transforms."""
    out: dict[str, int] = {}
    for t in getattr(model, checkpoint.SPEC_ATTR, {}).get("transforms", []):
        if t.get("kind") == "prune":
            for name, is_out, idxs in t["history"]:
                if is_out:
                    out[name] = out.get(name, 0) + len(idxs)
    return out


def finetune(model: nn.Module, train_dataset: torch.utils.data.Dataset, epochs: int, lr: float = 1e-3,
             seed: int = 0, batch_size: int = 64, progress: bool = True, device: str = "cpu") -> list[float]:
    """Retrain a pruned model briefly (Adam, cosine decay, in place, on ``device``); mean loss per epoch.

    The lower default learning rate (half of training's) keeps the surviving
    weights close to where the full model put them.
    """
    if epochs == 0:  # skip building an optimizer (its first use imports torch._dynamo, ~3 s)
        return []
    return fit(model, train_dataset, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
               progress=progress, desc="finetune", device=device)
