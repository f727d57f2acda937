"""Content digests of models and data (design §8: a run's identity is its content).

A run folder is resumed only with the same model and the same data. File
names cannot tell: a checkpoint retrained into the same path, or a data set
regenerated under the same name, would silently mix the trials of two
experiments. So runs record and compare SHA-256 digests of what they
actually compute on: every tensor of the model (names, dtypes, shapes and
bytes, buffers included) and the evaluation inputs and labels.

Digests hash the raw bytes (no pickling, no float formatting), so they are
exact: any changed bit changes the digest; and fast (sha256 runs at about
1 GB/s, a VGG-11 state dict takes a few tens of milliseconds).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch
from torch import nn

SHORT = 12  # hex digits shown in messages


def _update(h: "hashlib._Hash", text: str) -> None:
    """Length-prefixed, so no two sequences of fields hash alike."""
    raw = text.encode()
    h.update(len(raw).to_bytes(8, "little"))
    h.update(raw)


def _update_tensor(h: "hashlib._Hash", name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    _update(h, name)
    _update(h, str(t.dtype))
    _update(h, ",".join(str(s) for s in t.shape))
    raw = t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy()  # the bytes, whatever the dtype
    h.update(raw.nbytes.to_bytes(8, "little"))
    h.update(memoryview(raw))


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of each tensor, in the order given."""
    h = hashlib.sha256()
    for name, tensor in named:
        _update_tensor(h, name, tensor)
    return h.hexdigest()


def model_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every tensor that defines what ``model`` computes, sorted by name: the state
    dict (parameters and persistent buffers), plus non-persistent buffers, which
    change results too but are not saved."""
    named = dict(model.state_dict(keep_vars=True))
    for name, buf in model.named_buffers(remove_duplicate=False):
        named.setdefault(name, buf)
    return sorted(named.items())


def model_digest(model: nn.Module) -> str:
    """Digest of the model's tensors: equal iff every name, dtype, shape and bit is."""
    return tensors_digest(model_tensors(model))


def data_digest(inputs: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """Digest of evaluation data: the inputs' and labels' dtypes, shapes and bytes."""
    named = [("inputs", inputs)] + ([("labels", labels)] if labels is not None else [])
    return tensors_digest(named)


def short(digest: str | None) -> str:
    """The first hex digits, for one-line messages."""
    return "none" if digest is None else digest[:SHORT]
