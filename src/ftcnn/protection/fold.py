"""BatchNorm folded into the convolution before it: the form a network is deployed in.

Why: a BatchNorm in eval mode is a per-channel affine map whose four vectors
(weight, bias, running mean and variance) are memory the deployed network
reads at every inference, so faults hit them (design §4b). Inference engines
fold such a BatchNorm into the convolution that feeds it (the conv gains a
bias if it had none); the folded network computes the same function within
float rounding, holds less memory, and all of that memory is the convolutions'
weights and biases, which every campaign attacks. ``ftcnn harden --fold-bn``
protects this deployed form.

What is folded: every ``nn.BatchNorm2d`` (exact type, running statistics
tracked) whose only input is the output of an ``nn.Conv2d`` (exact type) that
is called once and feeds nothing else, found on the model's torch.fx trace
(``graph.symbolic_trace``), not by model names. Everything else stays, and
stays attacked: a BatchNorm after an addition or a pooling, one whose conv
output is also read elsewhere (folding would change that reader), modules
with forward hooks (a fold would drop them), and ``BatchNorm1d`` (after a
``Linear`` it normalises dimension 1, which is the Linear's features only for
2-D inputs; the trace cannot tell, and a wrong fold would be silent).

The arithmetic is PyTorch's ``torch.nn.utils.fusion.fuse_conv_bn_eval``. The
folded model keeps its class and every module path: the conv keeps its
parameter names, the BatchNorm becomes ``nn.Identity`` at its path. Its
checkpoint records a ``{"kind": "fold_bn", "layers": {bn: conv}}`` transform
that ``ftcnn.load`` replays (checked first: the file is untrusted).

Example:
    >>> import torch
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> folded = fold_batchnorm(net)
    >>> type(folded[1]).__name__, folded[0].bias is not None
    ('Identity', True)
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any, Mapping

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ftcnn import checkpoint
from ftcnn.injection import graph

KIND = "fold_bn"
TRANSFORM_FIELDS = ("kind", "layers")


def foldable(model: nn.Module) -> dict[str, str]:
    """BatchNorm name -> name of the conv it folds into, for every BatchNorm of ``model``
    that can be folded exactly (see the module's docstring), in graph order.

    A ValueError of one line when torch.fx cannot trace the model.
    """
    try:
        traced = graph.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds of errors on untraceable code
        raise ValueError(f"cannot fold BatchNorm: torch.fx cannot trace the model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:100] if str(exc) else ''})") from None
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in traced.graph.nodes if n.op == "call_module")
    pairs: dict[str, str] = {}
    for node in traced.graph.nodes:
        if node.op != "call_module" or not _folds(modules.get(str(node.target))):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(source, fx.Node) and source.op == "call_module"):
            continue
        bn, conv = str(node.target), str(source.target)
        if type(modules.get(conv)) is nn.Conv2d and not _hooked(modules[conv]) \
                and calls[bn] == 1 and calls[conv] == 1 and len(source.users) == 1 \
                and modules[conv].out_channels == modules[bn].num_features:
            pairs[bn] = conv
    return pairs


def _folds(module: nn.Module | None) -> bool:
    """Whether ``module`` is a BatchNorm this module folds: exactly ``BatchNorm2d`` (a subclass
    may compute something else), using running statistics in eval, without hooks."""
    return type(module) is nn.BatchNorm2d and module.track_running_stats \
        and module.running_mean is not None and module.running_var is not None and not _hooked(module)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every foldable BatchNorm folded into its conv (``model`` is untouched).

    The copy computes the same logits within float rounding (tests: rtol 1e-4,
    atol 1e-5 on ResNet-20, VGG-11 and a user model), and is in eval mode.

    A model in training mode is refused rather than folded: it normalises with
    each batch's statistics, and folding freezes the running ones, so the copy
    would compute something else than the model it was asked to copy. Call
    ``model.eval()`` first. A model with nothing to fold comes back as an
    unchanged copy (and records no transform).
    """
    if any(m.training for m in model.modules()):
        raise ValueError("cannot fold BatchNorm of a model in training mode (it normalises with each "
                         "batch's statistics; folding uses the running ones): call model.eval() first")
    pairs = foldable(model)
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for bn, conv in pairs.items():
            _set_module(folded, conv, fuse_conv_bn_eval(folded.get_submodule(conv), folded.get_submodule(bn)))
            _set_module(folded, bn, nn.Identity())
    if pairs and getattr(model, checkpoint.SPEC_ATTR, None) is not None:
        checkpoint.with_transform(folded, {"kind": KIND, "layers": pairs})
    return folded.eval()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _with_structure(model: nn.Module, pairs: Mapping[str, str]) -> None:
    """The folded structure without its values (the state dict brings them): each conv
    gets a bias if it has none, each BatchNorm becomes ``nn.Identity``."""
    for bn, conv_name in pairs.items():
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                                 device=conv.weight.device))
        _set_module(model, bn, nn.Identity())


def check_transform(model: nn.Module, transform: Any) -> dict[str, str]:
    """A stored ``fold_bn`` transform checked against ``model`` before anything is built
    (the file is untrusted): every name is a ``BatchNorm2d`` of the model paired with an
    ``nn.Conv2d`` of as many output channels, each used once. Returns the pairs; anything
    else is one ``CheckpointError`` line."""
    error = checkpoint.CheckpointError
    checkpoint.check_fields(transform, TRANSFORM_FIELDS, "fold_bn transform")
    pairs = transform.get("layers")
    modules = dict(model.named_modules())
    if not isinstance(pairs, Mapping) or len(pairs) > len(modules):
        raise error("fold_bn transform: layers must be a JSON object of BatchNorm name -> conv name")
    for bn, conv in pairs.items():
        if not (isinstance(bn, str) and isinstance(conv, str)):
            raise error("fold_bn transform: layers must map names (strings) to names")
        if type(modules.get(bn)) is not nn.BatchNorm2d or not bn:
            raise error(f"fold_bn transform names {bn[:80]!r}, which is no BatchNorm2d of the model")
        if type(modules.get(conv)) is not nn.Conv2d or not conv:
            raise error(f"fold_bn transform folds {bn[:80]!r} into {conv[:80]!r}, which is no Conv2d of the model")
        if modules[conv].out_channels != modules[bn].num_features:
            raise error(f"fold_bn transform: {conv[:80]!r} has {modules[conv].out_channels} output channels, "
                        f"{bn[:80]!r} normalises {modules[bn].num_features}")
    if len(set(pairs.values())) != len(pairs):
        raise error("fold_bn transform folds two BatchNorms into one conv")
    return dict(pairs)


def rebuild(model: nn.Module, transform: Mapping[str, Any]) -> nn.Module:
    """Recreate the folded structure on a fresh model (``checkpoint.load`` runs it on the
    ``meta`` device first); the values then come from the state dict."""
    _with_structure(model, check_transform(model, transform))
    return model


checkpoint.register_transform(KIND, rebuild)
