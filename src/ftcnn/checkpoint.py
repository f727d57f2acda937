"""Checkpoints as data, not code (design §8).

A checkpoint holds the tensors plus a JSON description of the architecture:
the builder and its arguments, then every structural transform applied since
(hardening, pruning). Loading rebuilds the architecture from that description
and reads the tensors with ``torch.load(weights_only=True)``, which refuses to
unpickle arbitrary objects, so an untrusted checkpoint cannot run code.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ftcnn import models

FORMAT = "ftcnn/1"
SPEC_ATTR = "ftcnn_spec"
META_ATTR = "ftcnn_meta"

# transform kind -> "module:function" that rebuilds the transform's structure
# on a model (values are then overwritten by the state dict).
TRANSFORMS: dict[str, str] = {
    "harden": "ftcnn.harden:rebuild",
    "prune": "ftcnn.prune:rebuild",
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or not ftcnn's."""


def build(builder: str, **kwargs: Any) -> nn.Module:
    """Build a model and remember how, so ``save``/``load`` can round-trip it."""
    model = models.load_builder(builder)(**kwargs)
    set_spec(model, {"builder": builder, "kwargs": kwargs, "transforms": []})
    return model


def get_spec(model: nn.Module) -> dict[str, Any]:
    spec = getattr(model, SPEC_ATTR, None)
    if spec is None:
        raise ValueError("model has no ftcnn architecture spec; build it with ftcnn.build() "
                         "or attach one with ftcnn.checkpoint.set_spec()")
    return spec


def set_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    json.dumps(spec)  # must stay data: fail early on anything not JSON-able
    object.__setattr__(model, SPEC_ATTR, spec)


def with_transform(model: nn.Module, transform: dict[str, Any]) -> None:
    """Record a structural transform on ``model``'s spec (after applying it)."""
    spec = copy.deepcopy(get_spec(model))
    spec["transforms"].append(transform)
    set_spec(model, spec)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write via a temporary file in the same folder and rename it into place,
    so a crash never leaves a half-written result."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"output folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: nn.Module, path: str | os.PathLike, **meta: Any) -> None:
    """Save ``model`` (tensors + architecture spec + JSON metadata) atomically."""
    spec = get_spec(model)
    merged = {**getattr(model, META_ATTR, {}), **meta}
    blob = {
        "format": FORMAT,
        "spec": json.dumps(spec),
        "meta": json.dumps(merged, default=str),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    try:
        atomic_write(path, lambda tmp: torch.save(blob, tmp))
    except PermissionError as exc:
        raise ValueError(f"cannot write {path}: permission denied") from exc


def rebuild(spec: dict[str, Any]) -> nn.Module:
    """The architecture a spec describes, with freshly initialised values."""
    model = models.load_builder(spec["builder"])(**spec.get("kwargs", {}))
    done: dict[str, Any] = {"builder": spec["builder"], "kwargs": spec.get("kwargs", {}), "transforms": []}
    set_spec(model, done)
    for transform in spec.get("transforms", []):
        kind = transform.get("kind")
        if kind not in TRANSFORMS:
            raise CheckpointError(f"unknown transform {kind!r} in checkpoint")
        module_name, func = TRANSFORMS[kind].split(":")
        model = getattr(importlib.import_module(module_name), func)(model, transform)
        done = copy.deepcopy(done)
        done["transforms"].append(transform)
        set_spec(model, done)
    return model


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's raw contents, checked; never unpickles objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a loadable ftcnn checkpoint "
                              f"(refused by the safe loader: {reason[:160]})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ftcnn checkpoint (no '{FORMAT}' format tag)")
    try:
        blob["spec"] = json.loads(blob["spec"])
        blob["meta"] = json.loads(blob["meta"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has a corrupt architecture description") from exc
    return blob


def load(path: str | os.PathLike) -> nn.Module:
    """Load a model saved by ``save``, without the user rebuilding it."""
    blob = read(path)
    model = rebuild(blob["spec"])
    try:
        model.load_state_dict(blob["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: tensors do not fit the stored architecture "
                              f"({str(exc).splitlines()[0][:160]})") from None
    object.__setattr__(model, META_ATTR, blob["meta"])
    model.eval()
    return model


def meta(model: nn.Module) -> dict[str, Any]:
    return getattr(model, META_ATTR, {})
