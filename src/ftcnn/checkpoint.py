"""Checkpoints as data, not code (design §8).

A checkpoint holds the tensors plus a JSON description of the architecture:
the builder and its arguments, then every structural transform applied since
(hardening, pruning). Loading rebuilds the architecture from that description
and reads the tensors with ``torch.load(weights_only=True)``, which refuses to
unpickle arbitrary objects.

The description is untrusted input too, because a checkpoint is something
people download and pass around:

- the builder is looked up in ftcnn's own registry (``models.MODELS``); a
  user's ``package.module:fn`` is imported only when the caller names that
  exact string for the call (``load(path, allow_builder=...)``, the CLI's
  ``--model``), since importing it runs its code;
- every field is type- and range-checked before anything is built, so a
  malformed file is one ``CheckpointError`` line, never a traceback;
- the architecture is built on the ``meta`` device (no memory) and every
  parameter/buffer name and shape is compared with the stored tensors, whose
  total the file bounds, before real memory is allocated: a few-KB file cannot
  make ftcnn allocate more than the tensors it actually holds.

Transforms (hardening, pruning) register their rebuild function here
(``register_transform``) when imported, and the package imports them together with
this module (``ftcnn/__init__.py``): this module never names, let alone imports, the
modules above it.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ftcnn import data, models
from ftcnn.files import atomic_write, dumps_json  # noqa: F401  (atomic_write: kept importable from here)

FORMAT = "ftcnn/1"
SPEC_ATTR = "ftcnn_spec"
META_ATTR = "ftcnn_meta"
NORMALIZE_META = "normalize"  # the metadata key recording the inputs' normalisation (``data.Normalization``)

# transform kind -> the function that rebuilds the transform's structure on a
# model (values are then overwritten by the state dict), filled by
# register_transform: hardening.py and pruning.py register themselves when
# imported (the package imports both with this module). A checkpoint can only pick a
# registered kind, never a module.
_REBUILDERS: dict[str, Callable[[nn.Module, Mapping[str, Any]], nn.Module]] = {}
_LOAD_CHECKS: dict[str, Callable[[nn.Module, Mapping[str, Any]], None]] = {}
# the user builder this context trusts (see ``allowing``)
_ALLOWED: contextvars.ContextVar[str | None] = contextvars.ContextVar("ftcnn_allowed_builder", default=None)

# bounds on the description's fields: generous for real networks, and small
# enough that building them on the meta device stays cheap
BUILDER_KWARGS: dict[str, tuple[type, float, float]] = {
    "num_classes": (int, 1, 1_000_000),
    "in_channels": (int, 1, 10_000),
    "input_size": (int, 1, 100_000),
    "width": (float, 0.0, 1_000.0),  # > 0
}
SPEC_KEYS = ("builder", "kwargs", "transforms")
MAX_TRANSFORMS = 64
MAX_NAME = 300


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or not ftcnn's."""


class NotACheckpoint(CheckpointError):
    """A file the safe loader reads that is not an ftcnn checkpoint (e.g. a plain
    state dict: ``from_state_dict`` loads those when the caller names a builder)."""


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


def _class_builder(model: nn.Module) -> str:
    """``package.module:Class`` of the model's class, when ``load`` can import it by that name."""
    cls = type(model)
    name = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ValueError(f"cannot name the builder of {cls.__qualname__} (defined in "
                         f"{'a function' if '<locals>' in cls.__qualname__ else 'the running script'}, "
                         "which load cannot import by name): move it to a module file, or give "
                         "builder='package.module:fn'")
    return name


def _fits(model: nn.Module, spec: Mapping[str, Any]) -> None:
    """The named builder rebuilds ``model``'s tensors (names and shapes), checked
    on the ``meta`` device when the builder allows it, so a wrong builder or
    argument fails at save time, not when someone loads the file."""
    try:
        spec, builder = _checked(spec, spec["builder"])
    except CheckpointError as exc:
        raise ValueError(f"cannot save with builder {spec['builder']!r}: {exc}") from None
    for device in ("meta", None):  # a builder that needs real values (e.g. .item()) fails on meta
        try:
            skeleton = _build(builder, spec, device)
            break
        except CheckpointError as exc:
            error = exc
    else:
        raise ValueError(f"cannot save with builder {spec['builder']!r}: {error}") from None
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        raise ValueError(f"builder {spec['builder']!r} with kwargs {spec['kwargs']} does not rebuild this "
                         f"model (first difference: tensor {diff[0]!r}); give the builder and kwargs that "
                         "made it, and name it before hardening or pruning (ftcnn.checkpoint.describe)")


def describe(model: nn.Module, builder: str | None = None, kwargs: Mapping[str, Any] | None = None
             ) -> nn.Module:
    """Attach the description ``save`` stores to a model of your own, and return it.

    ``builder`` is the ``package.module:fn`` (or ``:Class``) that builds the
    architecture when called with ``kwargs`` (JSON scalars); default: the
    model's own class, called with ``kwargs``. Call it before ``harden`` or
    ``prune`` so their transforms are recorded too (``save`` calls it for an
    untransformed model). Loading such a file imports ``builder``, so it needs
    ``load(path, allow_builder=builder)`` (CLI: ``--model builder``).

    Example:
        >>> import torch, ftcnn
        >>> net = ftcnn.checkpoint.describe(torch.nn.Linear(4, 2), kwargs={"in_features": 4, "out_features": 2})
        >>> ftcnn.checkpoint.get_spec(net)["builder"]
        'torch.nn.modules.linear:Linear'
    """
    name = builder if builder is not None else _class_builder(model)
    spec = {"builder": name, "kwargs": dict(kwargs or {}), "transforms": []}
    try:
        spec = check_spec(spec)
        json.dumps(spec, allow_nan=False)
    except (CheckpointError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot describe the model: {_one_line(exc)}") from None
    if any(type(m).__module__.startswith(("ftcnn.protection.hardening", "ftcnn.protection.pruning")) for m in model.modules()):
        raise ValueError("this model was hardened or pruned before it was described: describe the original "
                         "(ftcnn.checkpoint.describe(model, builder, kwargs)), then harden/prune it")
    _fits(model, spec)
    set_spec(model, spec)
    return model


def save(model: nn.Module, path: str | os.PathLike, *, builder: str | None = None,
         kwargs: Mapping[str, Any] | None = None, normalize: Any = None, **meta: Any) -> None:
    """Save ``model`` (tensors + architecture description + JSON metadata) atomically.

    Models from ``ftcnn.build``/``load`` carry their description. For a model
    of your own, ``builder="package.module:fn"`` with ``kwargs`` names how to
    rebuild it (default: its class, called with ``kwargs``); see ``describe``.
    The model keeps that description, so a later ``harden``/``prune`` of it is
    recorded and its result saves without naming the builder again.

    ``normalize`` records how the model's inputs are normalised (``"none"``, ``"dataset"``,
    ``"MEAN/STD"``: ``ftcnn.data``), so ftcnn measures it on the inputs it was trained with. Without
    it the record the model carries is kept (a hardened or pruned model keeps its original's), else
    the enclosing ``data.normalized`` block's; a file without any is read as ``dataset``. Give the
    accuracy you measured as ``test_accuracy=`` too: commands warn when theirs is far below it.

    Example (``builder="mymodels:tiny_resnet"`` names a builder function instead of the class):
        >>> import os, tempfile, torch, ftcnn
        >>> path = os.path.join(tempfile.mkdtemp(), "net.pt")
        >>> ftcnn.save(torch.nn.Linear(4, 2), path, kwargs={"in_features": 4, "out_features": 2})
        >>> type(ftcnn.load(path, allow_builder="torch.nn.modules.linear:Linear")).__name__
        'Linear'
    """
    spec = getattr(model, SPEC_ATTR, None)
    if spec is None:
        if builder is None and kwargs is None:
            raise ValueError(f"cannot save a {type(model).__name__} without knowing how to rebuild it: give "
                             "builder='package.module:fn' (or kwargs= for its own class) and kwargs={...}")
        describe(model, builder, kwargs)
        spec = get_spec(model)
    elif builder is not None and builder != spec["builder"] or \
            kwargs is not None and dict(kwargs) != spec["kwargs"]:
        raise ValueError(f"this model already records builder {spec['builder']!r} with kwargs "
                         f"{spec['kwargs']}; save it without builder=/kwargs=")
    merged = {**getattr(model, META_ATTR, {}), **meta}
    if normalize is not None:
        merged[NORMALIZE_META] = data.parse_normalize(normalize, "normalize=").record()
    elif NORMALIZE_META not in merged and data.active_normalization() is not None:
        merged[NORMALIZE_META] = data.active_normalization().record()
    blob = {
        "format": FORMAT,
        "spec": dumps_json(spec, indent=None, note=False),
        "meta": dumps_json(merged, indent=None, note=False),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    try:
        atomic_write(path, lambda tmp: torch.save(blob, tmp))
    except PermissionError as exc:
        raise ValueError(f"cannot write {path}: permission denied") from exc


def register_transform(kind: str, rebuild: Callable[[nn.Module, Mapping[str, Any]], nn.Module],
                       check_loaded: Callable[[nn.Module, Mapping[str, Any]], None] | None = None) -> None:
    """Let ``load`` replay transforms of ``kind`` with ``rebuild(model, transform)``.

    Called by the module that defines the transform (harden.py, prune.py) when
    it is imported. ``rebuild`` must check its transform dict (types, ranges,
    indices) and raise a one-line ``ValueError`` on anything malformed: the dict
    comes from an untrusted file. It is called on a ``meta``-device model first.
    ``check_loaded(model, transform)``, if given, checks the loaded values the
    transform's structure depends on (e.g. integer index buffers) after loading.
    """
    _REBUILDERS[kind] = rebuild
    if check_loaded is not None:
        _LOAD_CHECKS[kind] = check_loaded


def _rebuilder(kind: str) -> Callable[[nn.Module, Mapping[str, Any]], nn.Module]:
    return _REBUILDERS[kind]


@contextlib.contextmanager
def allowing(builder: str | None) -> Iterator[None]:
    """Within this block every ``load`` trusts the user builder ``builder`` (that
    exact ``package.module:fn``) as if called with ``allow_builder=builder``.

    For code that reloads checkpoints it wrote itself from a model the caller
    already trusted (``ftcnn compare``, ``ftcnn pipeline`` resuming a run).
    """
    token = _ALLOWED.set(builder)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:200]


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _check_kwarg(name: str, value: Any, user: bool) -> None:
    """One builder keyword: a JSON scalar, in range for the common keywords."""
    if name in BUILDER_KWARGS:
        kind, low, high = BUILDER_KWARGS[name]
        if kind is int:
            if type(value) is not int or not low <= value <= high:
                raise CheckpointError(f"builder argument {name!r} must be an integer in [{low:,}, {high:,}], "
                                      f"got {value!r:.60}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not (math.isfinite(value) and low < value <= high):
            raise CheckpointError(f"builder argument {name!r} must be a number in ({low:g}, {high:g}], "
                                  f"got {value!r:.60}")
        return
    if not user:
        raise CheckpointError(f"unknown builder argument {name!r}; ftcnn's builders take "
                              f"{', '.join(BUILDER_KWARGS)}")
    ok = value is None or isinstance(value, (bool, int)) or \
        isinstance(value, float) and math.isfinite(value) or isinstance(value, str) and len(value) <= MAX_NAME
    if not ok:
        raise CheckpointError(f"builder argument {name!r} must be a JSON scalar (finite number, "
                              f"short string, boolean or null), got {_json_type(value)}")


def check_fields(obj: Any, known: Sequence[str], where: str) -> Mapping[str, Any]:
    """``obj`` if it is a JSON object holding only ``known`` fields, else a one-line
    ``CheckpointError`` naming ``where`` (the spec, a harden or prune transform)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} must be a JSON object, not {_json_type(obj)}")
    unknown = [k for k in obj if k not in known]
    if unknown:
        raise CheckpointError(f"unknown field {str(unknown[0])[:60]!r} in {where} (known: {', '.join(known)})")
    return obj


def check_spec(spec: Any) -> dict[str, Any]:
    """The architecture description, every field type- and range-checked (one-line
    ``CheckpointError`` otherwise); the builder's own keywords and each
    transform's fields are checked by ``resolve_builder`` and the transform."""
    if not isinstance(spec, dict):  # a dict exactly: it is copied below
        raise CheckpointError(f"the architecture description must be a JSON object, not {_json_type(spec)}")
    check_fields(spec, SPEC_KEYS, "the architecture description")
    builder = spec.get("builder")
    if not isinstance(builder, str) or not builder or len(builder) > MAX_NAME:
        raise CheckpointError(f"the architecture's builder must be a name of at most {MAX_NAME} characters, "
                              f"got {_json_type(builder)}")
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"the builder's arguments must be a JSON object, not {_json_type(kwargs)}")
    user = builder not in models.MODELS
    for name, value in kwargs.items():
        _check_kwarg(name, value, user)
    transforms = spec.get("transforms", [])
    if not isinstance(transforms, list):
        raise CheckpointError(f"the architecture's transforms must be a list, not {_json_type(transforms)}")
    if len(transforms) > MAX_TRANSFORMS:
        raise CheckpointError(f"{len(transforms)} transforms in the architecture (at most {MAX_TRANSFORMS})")
    known = sorted(_REBUILDERS)
    for i, transform in enumerate(transforms):
        if not isinstance(transform, dict):
            raise CheckpointError(f"transform #{i} must be a JSON object, not {_json_type(transform)}")
        kind = transform.get("kind")
        if not isinstance(kind, str) or kind not in known:
            raise CheckpointError(f"transform #{i} has unknown kind {str(kind)[:60]!r}; "
                                  f"known: {', '.join(known)}")
    return {"builder": builder, "kwargs": dict(kwargs), "transforms": list(transforms)}


def resolve_builder(name: str, allow_builder: str | None = None) -> models.Builder:
    """The builder a checkpoint names: ftcnn's registry, or the user builder the
    caller allowed by that exact name; nothing else is ever imported."""
    if allow_builder is not None and allow_builder != name:
        raise CheckpointError(f"the checkpoint's builder is {name!r}, not {allow_builder!r} as named "
                              "(--model / allow_builder); refusing to load it")
    if name in models.MODELS:
        return models.MODELS[name]
    if allow_builder is None:
        raise CheckpointError(f"the checkpoint's builder {name!r} is not one of ftcnn's models; importing it "
                              f"would run its code, so name it to trust it: allow_builder={name!r} "
                              f"(CLI: --model {name})")
    try:
        return models.load_builder(name)
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's builder: {_one_line(exc)}") from exc


def _check_signature(builder: models.Builder, name: str, kwargs: Mapping[str, Any]) -> None:
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # some callables have none: let the call decide
        return
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise CheckpointError(f"builder {name!r} does not take the stored arguments ({_one_line(exc)})") from None


def _checked(spec: Any, allow_builder: str | None) -> tuple[dict[str, Any], models.Builder]:
    """The checked spec and its builder; an untrusted builder is refused first,
    whatever else is wrong with the description."""
    allowed = allow_builder if allow_builder is not None else _ALLOWED.get()
    if isinstance(spec, dict) and isinstance(spec.get("builder"), str) and len(spec["builder"]) <= MAX_NAME:
        resolve_builder(spec["builder"], allowed)
    spec = check_spec(spec)
    builder = resolve_builder(spec["builder"], allowed)
    _check_signature(builder, spec["builder"], spec["kwargs"])
    return spec, builder


def _build(builder: models.Builder, spec: Mapping[str, Any], device: str | None) -> nn.Module:
    """Run the builder and replay the transforms (on ``device``'s default, e.g. meta)."""
    rebuilders = [_rebuilder(t["kind"]) for t in spec["transforms"]]  # imports outside the device context
    place = torch.device(device) if device is not None else contextlib.nullcontext()
    done: dict[str, Any] = {"builder": spec["builder"], "kwargs": spec["kwargs"], "transforms": []}
    try:
        with place:
            model = builder(**spec["kwargs"])
    except CheckpointError:
        raise
    except Exception as exc:  # the stored arguments, not ftcnn: one line
        raise CheckpointError(f"cannot build {spec['builder']!r} with the stored arguments "
                              f"({_one_line(exc)})") from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"builder {spec['builder']!r} returned {type(model).__name__}, not nn.Module")
    set_spec(model, done)
    for i, (transform, rebuild_fn) in enumerate(zip(spec["transforms"], rebuilders)):
        try:
            with place:
                model = rebuild_fn(model, transform)
        except CheckpointError:
            raise
        except Exception as exc:  # malformed fields the transform did not name
            raise CheckpointError(f"transform #{i} ({transform['kind']}) cannot be replayed: "
                                  f"{_one_line(exc)}") from exc
        done = copy.deepcopy(done)
        done["transforms"].append(transform)
        set_spec(model, done)
    return model


def rebuild(spec: Any, *, allow_builder: str | None = None, device: str | None = None) -> nn.Module:
    """The architecture a spec describes, with freshly initialised values (on
    ``device``, e.g. ``"meta"`` to check shapes without memory); the spec is
    checked first and a user builder must be allowed by name."""
    spec, builder = _checked(spec, allow_builder)
    return _build(builder, spec, device)


def _check_fit(path: Path, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Every stored tensor matches the architecture's by name, shape and kind, and
    the architecture needs no more values than the file holds."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {str(extra[0])[:80]!r}"
        raise CheckpointError(f"{path}: tensors do not fit the stored architecture ({what}, "
                              f"{len(missing)} missing, {len(extra)} unexpected)")
    for name, want in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: tensor {name!r} is {list(got.shape)} in the file but "
                                  f"{list(want.shape)} in the stored architecture")
        if got.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name!r} is {got.dtype} in the file, "
                                  f"but the architecture holds {want.dtype}")
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    need = sum(t.numel() for t in tensors.values())
    storages: dict[tuple[int, int], int] = {}
    for t in state.values():
        s = t.untyped_storage()
        storages[(s.data_ptr(), s.nbytes())] = s.nbytes() // max(1, t.element_size())
    held = sum(storages.values())
    if need > held:
        raise CheckpointError(f"{path}: the architecture needs {need:,} values but the file holds {held:,}")


def _check_tensors(path: Path, state: Any) -> dict[str, torch.Tensor]:
    """The stored state dict: names to plain dense real tensors, each backed by its
    own bytes in the file (an expanded view could claim more values than stored)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has no tensor table (state_dict is {_json_type(state)})")
    for name, t in state.items():
        if not isinstance(name, str) or len(name) > MAX_NAME:
            raise CheckpointError(f"{path}: tensor names must be strings of at most {MAX_NAME} characters")
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_complex() or \
                t.is_quantized or t.device.type != "cpu":
            raise CheckpointError(f"{path}: entry {name!r} of the tensor table is not a plain dense tensor")
        if t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise CheckpointError(f"{path}: tensor {name!r} claims more values than the file stores for it")
    return state


def _check_file_kind(path: Path, what: str) -> None:
    """A folder, a missing file or a text file (JSON, e.g. summary.json) named as ``what`` in one
    plain line, before torch's loader answers with a message about zip archives and pickles."""
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} not found")
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if head.lstrip()[:1] in (b"{", b"["):
        raise CheckpointError(f"{path} is not an ftcnn checkpoint (it is JSON text; a checkpoint is the "
                              "file `ftcnn train` writes)")
    try:
        head.decode("utf-8")
        text = b"\0" not in head     # torch's zip and pickle files hold NUL bytes or non-UTF-8 ones
    except UnicodeDecodeError as exc:
        text = exc.start >= len(head) - 3 and b"\0" not in head   # a character cut at 4096 bytes
    if head and text:
        raise CheckpointError(f"{path} is not a loadable ftcnn checkpoint (it is text; a checkpoint is the "
                              "file `ftcnn train` writes)")


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's raw contents, checked; never unpickles objects."""
    path = Path(path)
    _check_file_kind(path, "checkpoint")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad files
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc)).strip()  # torch colours some messages
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise CheckpointError(f"{path} is not a loadable ftcnn checkpoint "
                              f"(refused by the safe loader: {reason[:160]})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("format"), str) or blob["format"] != FORMAT:
        raise NotACheckpoint(f"{path} is not an ftcnn checkpoint (no '{FORMAT}' format tag; a plain state dict "
                             "loads with --model package.module:fn and --data)")
    for field in ("spec", "meta"):
        if not isinstance(blob.get(field), str):
            raise CheckpointError(f"{path} has a corrupt architecture description ({field!r} is not JSON text)")
        try:
            blob[field] = json.loads(blob[field])
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; deep nesting recurses
            raise CheckpointError(f"{path} has a corrupt architecture description "
                                  f"({field!r}: {_one_line(exc)[:100]})") from None
    if not isinstance(blob["meta"], dict):
        raise CheckpointError(f"{path}: its metadata must be a JSON object, not {_json_type(blob['meta'])}")
    if NORMALIZE_META in blob["meta"]:
        try:
            data.parse_normalize(blob["meta"][NORMALIZE_META], "its normalisation record")
        except data.DatasetError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    blob["state_dict"] = _check_tensors(path, blob.get("state_dict"))
    return blob


def load(path: str | os.PathLike, *, allow_builder: str | None = None) -> nn.Module:
    """Load a model saved by ``save``, without the user rebuilding it.

    Only ftcnn's own builders are used, unless ``allow_builder`` names the exact
    ``package.module:fn`` the checkpoint stores (importing it runs its code, so
    name only builders you trust); a different stored builder is refused. The
    architecture is checked against the stored tensors on the ``meta`` device
    before any memory is allocated. Every problem is a one-line ``CheckpointError``.
    """
    blob = read(path)
    path = Path(path)
    try:
        spec, builder = _checked(blob["spec"], allow_builder)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    state = blob["state_dict"]
    user = spec["builder"] not in models.MODELS
    try:
        skeleton: nn.Module | None = _build(builder, spec, "meta")
    except CheckpointError as exc:
        if not user:
            raise CheckpointError(f"{path}: {exc}") from exc.__cause__
        skeleton = None  # a trusted user builder that cannot build on meta: checked after building
    if skeleton is not None:
        _check_fit(path, skeleton, state)
    if user:  # the caller trusts this code; rebuild it for real (it may keep state outside its tensors)
        try:
            model = _build(builder, spec, None)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc.__cause__
        _check_fit(path, model, state)
    else:  # ftcnn's models keep all their state in the state dict: allocate the checked skeleton
        # to_empty's empty_like on meta tensors imports sympy and symbolic shapes (~0.5 s of start-up)
        model = skeleton._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: tensors do not fit the stored architecture "
                              f"({str(exc).splitlines()[0][:160]})") from None
    for i, transform in enumerate(spec["transforms"]):
        check = _LOAD_CHECKS.get(transform["kind"])
        try:
            if check is not None:
                check(model, transform)
        except Exception as exc:  # a ValueError names the problem; anything else is still the file's
            raise CheckpointError(f"{path}: transform #{i} ({transform['kind']}): {_one_line(exc)}") from exc
    object.__setattr__(model, META_ATTR, blob["meta"])
    model.eval()
    return model


# other names builders give the data's shapes (torchvision, timm, PyTorchFI examples, hand-written nets)
SHAPE_ALIASES = {
    "num_classes": ("n_classes", "classes", "num_class", "nclasses", "n_class", "out_classes", "num_outputs",
                    "n_out", "outputs", "output_dim", "out_features"),
    "in_channels": ("in_ch", "in_chans", "channels", "n_channels", "num_channels", "in_c", "input_channels",
                    "inchannels", "nc"),
    "input_size": ("img_size", "image_size", "size", "input_dim", "resolution", "in_size", "input_shape"),
}


class BuilderArgumentsWarning(UserWarning):
    """A user builder's arguments do not take some of the data's shapes (``from_state_dict``)."""


def builder_arguments_warning(builder: str, params: Sequence[str], offered: Mapping[str, Any],
                              used: Mapping[str, Any]) -> str | None:
    """One line when ``builder`` leaves some of the data's shapes (``offered``) untaken while it has
    arguments of other names (``MyNet(n_classes=10, in_ch=1)`` gets none of ``num_classes``,
    ``in_channels``, ``input_size`` and is built with its own defaults: silently right only while
    they happen to match the data, issue 23). None when every shape is taken, when it takes no
    argument (shapes fixed in the class), or when it takes some shapes and none of its other
    arguments is another name of the rest (``tiny(num_classes, width)``: a deliberate choice)."""
    missed = [k for k in offered if k not in used]
    others = [p for p in params if p not in offered]
    alike = [p for p in others if any(p.lower() in SHAPE_ALIASES.get(k, ()) for k in missed)]
    if not missed or not others or (used and not alike):  # e.g. tiny(num_classes, width): deliberate
        return None
    others = alike or others
    given = ", ".join(f"{k}={offered[k]}" for k in missed)
    return (f"{builder} takes {', '.join(others)} but not {', '.join(missed)}: it is built with its own defaults "
            f"for those, not the data's {given}; arguments of those names receive them")


def from_state_dict(path: str | os.PathLike, builder: str, **kwargs: Any) -> nn.Module:
    """A model of your own from a plain state dict file (``torch.save(model.state_dict(), path)``).

    ``builder`` (``package.module:fn`` or ``:Class``) is imported because the
    caller names it; it is called with those of ``kwargs`` it accepts (e.g. the
    data's ``num_classes``, ``in_channels``, ``input_size``; a ``BuilderArgumentsWarning`` when
    it takes other names instead, :func:`builder_arguments_warning`), and the file's
    tensors, read with ``weights_only=True``, must fit it exactly (strict).
    The model carries its description, so ``save`` round-trips it. Every
    problem is a one-line ``CheckpointError``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"state dict file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc)).strip()
        raise CheckpointError(f"{path} is not a loadable state dict (refused by the safe loader: "
                              f"{(text.splitlines() or [type(exc).__name__])[0][:160]})") from None
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return load(path, allow_builder=builder)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training script's {"state_dict": ..., "epoch": ...}
    state = _check_tensors(path, state)
    try:
        fn = models.load_builder(builder)
    except ValueError as exc:
        raise CheckpointError(_one_line(exc)) from None
    try:
        params = inspect.signature(fn).parameters.values()
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        names = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        takes_any, names = True, []
    used = {k: v for k, v in kwargs.items() if takes_any or k in names}
    warning = builder_arguments_warning(builder, names, kwargs, used)
    if warning:
        warnings.warn(warning, BuilderArgumentsWarning, stacklevel=2)
    spec = check_spec({"builder": builder, "kwargs": used, "transforms": []})
    model = _build(fn, spec, None)
    _check_fit(path, model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: tensors do not fit {builder!r} "
                              f"({str(exc).splitlines()[0][:160]})") from None
    model.eval()
    return model


def meta(model: nn.Module) -> dict[str, Any]:
    return getattr(model, META_ATTR, {})
