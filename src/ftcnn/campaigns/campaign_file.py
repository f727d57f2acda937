"""A fault-injection campaign described in one reviewable TOML file.

Why: a campaign's meaning is spread over a dozen flags of ``ftcnn inject``;
reviewers (and MRFI/TensorFI users, who write YAML) expect one file that says
all of it and can be diffed, committed next to the results, and rerun. TOML
needs nothing beyond the standard library (``tomllib``, Python >= 3.11).

Every key of ``ftcnn inject`` has a key here (``ci_half_width`` is
``--margin``), plus the activation-fault ones: ``target`` ("parameters" or
"activations"), ``activation_mode`` ("transient" or "permanent") and a
``[ber_per_layer]`` table (layer name -> rate; quote names with dots:
``"features.0" = 1e-5``). ``examples/campaign.toml`` shows them all.
A layer in ``[ber_per_layer]`` takes its rate at every swept ``ber`` point
instead of the point (0 keeps it fault-free); without ``ber``, only the
listed layers are faulted, at their rates (one campaign point, 0.0, for the
others: ``activations.layer_bers(names, 0.0, ber_per_layer)``).

The file is untrusted input: read at most ``MAX_BYTES`` from a regular file,
every key checked for its name, type and range, and every problem is one
ValueError line naming the key (never a traceback). It grants nothing (issue
19): its paths must stay inside its folder unless the person types them, and
its ``model`` (a builder to trust, whose import runs code) takes effect only
when the person types the same ``--model``. Settings that size the work obey
the one rule table, ``ftcnn.rules``, as flags do. :func:`load_campaign_file` returns plain Python
values (lists, not tuples; relative paths resolved inside the file's folder)
for only the keys the file sets: the caller's defaults (the CLI's) fill the rest. :func:`config_kwargs` maps them onto
``campaign.CampaignConfig``'s field names.
"""

from __future__ import annotations

import difflib
import math
import os
import stat
import tomllib
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

from ftcnn import data, rules
from ftcnn.campaigns import activations
from ftcnn.injection import faults
from ftcnn.campaigns.trials import CampaignConfig

MAX_BYTES = 1 << 20          # 1 MiB: a campaign is a page of settings, not data

STORAGE_DTYPES = tuple(faults.STORAGE_DTYPES)
ACTIVATION_DTYPES = tuple(activations.DTYPES)
FAULT_MODES = tuple(faults.MODES)
TARGETS = rules.TARGETS
ACTIVATION_MODES = tuple(activations.MODES)
DATA_PATH_KINDS = tuple(data.PATH_KINDS)


class CampaignFileError(ValueError):
    """A campaign file that cannot be used; the message is one line."""


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _fail(key: str, message: str) -> CampaignFileError:
    return CampaignFileError(f"campaign file: {key}: {message}")


# --- value checkers: (key, raw value) -> normalised value ---------------------------------------------

def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(key, f"must be a number, not {_type_name(value)}")
    if not math.isfinite(value):
        raise _fail(key, f"must be finite (got {value})")
    return float(value)


def _integer(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, f"must be an integer, not {_type_name(value)} ({value!r})"[:200])
    return value


def _ruled(setting: str, checker: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """``checker`` (the TOML type), then the rule of ``setting`` (``ftcnn.rules``: the CLI and
    CampaignConfig ask it too), one line naming the key."""
    def check(key: str, value: Any) -> Any:
        v = checker(key, value)
        problem = rules.problem(setting, v)
        if problem is not None:
            raise _fail(key, problem)
        return v
    return check


def _rate(key: str, value: Any) -> float:
    return _ruled("ber", _number)(key, value)


def _at_least(low: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        v = _integer(key, value)
        if v < low:
            raise _fail(key, f"must be >= {low} (got {v})")
        return v
    return check


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, f"must be true or false, not {_type_name(value)}")
    return value


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(key, f"must be a string, not {_type_name(value)}")
    if not value or "\x00" in value or len(value) > 4096:
        raise _fail(key, "must be a non-empty string without NUL, at most 4096 characters")
    return value


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        v = _string(key, value)
        if v not in choices:
            raise _fail(key, f"{v!r} is not one of {', '.join(choices)}")
        return v
    return check


def _list_of(item: Callable[[str, Any], Any], *, scalar_ok: bool = True,
             max_len: int = 10_000) -> Callable[[str, Any], list]:
    """A list of items; a single item is taken as a one-item list when ``scalar_ok``."""
    def check(key: str, value: Any) -> list:
        if not isinstance(value, list):
            if scalar_ok and not isinstance(value, dict):
                value = [value]
            else:
                raise _fail(key, f"must be a list, not {_type_name(value)}")
        if not value:
            raise _fail(key, "must not be empty (leave the key out instead)")
        if len(value) > max_len:
            raise _fail(key, f"at most {max_len} values")
        return [item(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return check


def _trials(key: str, value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, str):
        raise _fail(key, f"must be a positive integer or \"auto\" (got {value!r})"[:200])
    return _ruled("trials", _integer)(key, value)


def _bit(key: str, value: Any) -> int:
    v = _integer(key, value)
    if not 0 <= v < 32:
        raise _fail(key, f"bit position {v} outside [0, 32)")
    return v


def _device(key: str, value: Any) -> str:
    v = _string(key, value)
    kind, _, index = v.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise _fail(key, f"unknown device {v!r}; use cpu, cuda or cuda:N")
    return v


def _ber_per_layer(key: str, value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise _fail(key, f"must be a table of layer name = rate, not {_type_name(value)}")
    if not value:
        raise _fail(key, "must not be empty (leave the table out instead)")
    out: dict[str, float] = {}
    for name, rate in value.items():
        if isinstance(rate, dict):
            raise _fail(f"{key}.{name}", "is a table: quote layer names that hold dots, "
                        f"e.g. \"{name}.{next(iter(rate), '0')}\" = 1e-5")
        out[_string(f"{key} layer name", name)] = _rate(f"{key}.{name}", rate)
    return out


def _normalize(key: str, value: Any) -> str:
    """``--normalize``'s text (none, dataset or MEAN/STD), checked as the flag is."""
    text = _string(key, value)
    try:
        data.parse_normalize(text, key)
    except ValueError as exc:
        raise _fail(key, str(exc).splitlines()[0].removeprefix(f"{key} ")[:300]) from None
    return text


def _path(key: str, value: Any) -> str:
    return _string(key, value)


# key -> checker; the order is the order of ``ftcnn inject --help`` (then the activation keys)
KEYS: dict[str, Callable[[str, Any], Any]] = {
    "checkpoint": _path,
    "data": _string,
    "model": _string,                       # --model's value: refused unless the person types it too
    "normalize": _normalize,                # --normalize: how the inputs are normalised (issue 23)
    "ber": _ruled("points", _list_of(_rate)),
    "count": _ruled("count_points", _list_of(_at_least(0))),
    "trials": _trials,
    "ci_half_width": _ruled("ci_half_width", _number),   # --margin
    "confidence": _ruled("confidence", _number),
    "seed": _ruled("seed", _integer),
    "dtype": _choice(*STORAGE_DTYPES),
    "bits": _list_of(_bit),
    "mode": _choice(*FAULT_MODES),
    "include_bn": _boolean,
    "attack_protection": _boolean,
    "layers": _list_of(_string),
    "limit": _at_least(1),
    "batch_size": _at_least(1),
    "device": _device,
    "shortcut": _boolean,
    "batch_trials": _at_least(1),
    "workers": _ruled("workers", _integer),
    "ray": _boolean,
    "ray_address": _string,
    "precision": _ruled("precision", _number),
    "inputs_per_trial": _at_least(1),
    "threads": _ruled("threads", _integer),
    "output": _path,
    "target": _ruled("target", _string),
    "activation_mode": _choice(*ACTIVATION_MODES),
    "ber_per_layer": _ber_per_layer,
    "per_input": _boolean,                  # --per-input: activation counts per input image
    "activation_ber": _number,              # target both: the activation rate beside the swept ber
}

# keys that mean something only for parameter faults (their memory, their blocks of inputs)
PARAMETER_ONLY = ("include_bn", "attack_protection", "inputs_per_trial")
ACTIVATION_ONLY = ("activation_mode", "per_input")


def _unknown(key: str) -> CampaignFileError:
    near = difflib.get_close_matches(key, list(KEYS) + ["margin"], n=1)
    hint = ""
    if near:
        hint = f" (did you mean {'ci_half_width' if near[0] == 'margin' else near[0]}?)"
    shown = key if len(key) <= 60 else key[:60] + "..."
    return CampaignFileError(f"campaign file: unknown key {shown!r}{hint}; allowed keys: {', '.join(KEYS)}")


def read_text(path: str | os.PathLike) -> str:
    """The file's text: a regular file, at most ``MAX_BYTES``, UTF-8; else one line."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise CampaignFileError(f"cannot read campaign file {p}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CampaignFileError(f"campaign file {p} is not a regular file")
    if st.st_size > MAX_BYTES:
        raise CampaignFileError(f"campaign file {p} is {st.st_size} bytes; at most {MAX_BYTES} are read")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise CampaignFileError(f"cannot read campaign file {p}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise CampaignFileError(f"campaign file {p} is over {MAX_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CampaignFileError(f"campaign file {p} is not UTF-8 text (byte {exc.start})") from None


def parse_campaign(text: str, base: str | os.PathLike | None = None,
                   typed: Collection[str] = ()) -> dict[str, Any]:
    """Validate a campaign given as TOML text (see :func:`load_campaign_file`); paths are
    resolved against ``base``, and kept inside it, when given."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CampaignFileError(f"campaign file is not valid TOML: {str(exc).splitlines()[0][:200]}") from None
    except RecursionError:
        raise CampaignFileError("campaign file is not valid TOML: nested too deeply") from None
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in KEYS:
            raise _unknown(key)
        out[key] = KEYS[key](key, value)
    _check_together(out)
    if base is not None:
        _resolve_paths(out, Path(base), typed)
    return out


def _check_together(cfg: dict[str, Any]) -> None:
    target = cfg.get("target", "parameters")
    if "ber" in cfg and "count" in cfg:
        raise CampaignFileError("campaign file: give ber or count, not both")
    if "count" in cfg and "ber_per_layer" in cfg:
        raise _fail("ber_per_layer", "sets rates; with count = [...] the faults per trial are exact")
    if "precision" in cfg and "ber_per_layer" in cfg:
        raise _fail("precision", "needs one rate for every layer (the strata weights come from one "
                    "binomial); drop [ber_per_layer]")
    if target != "both" and "activation_ber" in cfg:
        raise _fail("activation_ber", "is the datapath rate of target = \"both\"; elsewhere give ber = [...]")
    if target == "both":  # parameter faults at ber plus activation faults at activation_ber, every trial
        if "ber" not in cfg or "activation_ber" not in cfg:
            raise CampaignFileError("campaign file: target both needs ber = [...] (parameter rates) and "
                                    "activation_ber = RATE")
        for key in ACTIVATION_ONLY + ("inputs_per_trial", "ber_per_layer"):
            if key in cfg:
                raise _fail(key, "does not apply to target = \"both\"")
    elif target == "parameters":
        if "ber" not in cfg and "count" not in cfg:
            raise CampaignFileError("campaign file: give fault rates (ber = [...]) or fault counts (count = [...])")
        for key in ACTIVATION_ONLY:
            if key in cfg:
                raise _fail(key, "applies to activation faults only; set target = \"activations\"")
    else:
        for key in PARAMETER_ONLY:
            if key in cfg:
                raise _fail(key, "applies to parameter faults only (target = \"parameters\")")
        if "ber" not in cfg and "count" not in cfg and "ber_per_layer" not in cfg:
            raise CampaignFileError("campaign file: activation faults need ber = [...], count = [...] "
                                    "or a [ber_per_layer] table")
        if cfg.get("dtype", "float32") not in ACTIVATION_DTYPES:
            raise _fail("dtype", f"activation faults support {', '.join(ACTIVATION_DTYPES)}")
        if cfg.get("mode", "flip") != "flip" and cfg.get("activation_mode", "transient") == "transient":
            raise _fail("mode", "transient activation faults are flips; "
                        "stuck-at needs activation_mode = \"permanent\"")
        layers = cfg.get("layers")
        if layers is not None and "ber_per_layer" in cfg:
            outside = [n for n in cfg["ber_per_layer"] if n not in layers]
            if outside:
                raise _fail("ber_per_layer", f"layer {outside[0]!r} is not in layers")
    if "precision" in cfg and "trials" in cfg:
        raise CampaignFileError("campaign file: precision replaces trials; give one of them")
    if "ci_half_width" in cfg and cfg.get("trials") != "auto":
        raise _fail("ci_half_width", "is the stop of trials = \"auto\"; set trials = \"auto\" or drop it")
    width = bit_width(cfg.get("dtype", "float32"))
    if any(b >= width for b in cfg.get("bits", [])):
        raise _fail("bits", f"{cfg['dtype']} has bits 0..{width - 1}")


def bit_width(dtype: str) -> int:
    """Bits per stored value of ``dtype``: the positions ``bits`` may name are 0..width-1."""
    return {"float16": 16, "bfloat16": 16, "int8": 8}.get(dtype, 32)


# keys that name files, and how to give them on the command line instead (a file may only name
# paths inside its own folder: a shared file must not read or write anywhere else)
PATH_FLAGS = {"checkpoint": "the CHECKPOINT argument", "output": "-o/--output", "data": "--data"}


def _inside(key: str, value: str, base: Path) -> str:
    """``value``, a path the file names, resolved against the file's folder ``base``; one line
    when it is absolute or leads outside ``base`` (``..``, or a symlink, once resolved)."""
    how = f"give it with {PATH_FLAGS[key]} instead"
    p = Path(value)
    if p.is_absolute() or value.startswith("~"):
        raise _fail(key, f"{value!r} is an absolute path; a campaign file names only paths inside its "
                    f"folder; {how}"[:400])
    try:
        (base / p).resolve().relative_to(base.resolve())
    except ValueError:
        raise _fail(key, f"{value!r} leads outside the campaign file's folder; {how}"[:400]) from None
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise _fail(key, f"{value!r} cannot be resolved ({exc.__class__.__name__}); {how}"[:400]) from None
    return os.path.normpath(base / p)


def _resolve_paths(cfg: dict[str, Any], base: Path, typed: Collection[str] = ()) -> None:
    """The file's paths resolved inside its folder; the keys in ``typed`` are left out
    (the command line's values replace them, wherever they lead)."""
    for key in PATH_FLAGS:
        if key not in cfg:
            continue
        if key in typed:
            del cfg[key]
        elif key != "data":
            cfg[key] = _inside(key, cfg[key], base)
        else:
            kind, sep, rest = cfg[key].partition(":")
            if sep and kind in DATA_PATH_KINDS and rest:
                cfg[key] = f"{kind}:{_inside(key, rest, base)}"


def load_campaign_file(path: str | os.PathLike, typed: Collection[str] = ()) -> dict[str, Any]:
    """The campaign a TOML file describes, validated, as plain values.

    Only the keys the file sets come back (the CLI's defaults fill the rest);
    lists stay lists; ``trials`` is an int or "auto"; relative ``checkpoint``,
    ``output`` and data paths (``npz:PATH``...) are resolved against the
    file's folder, so the file means the same from any working directory.
    The file is untrusted: those paths must stay inside its folder (absolute
    paths, ``..`` and symlinks that lead out are refused), except the keys in
    ``typed``, which the person gives on the command line (they are left out).
    Every problem is a :class:`CampaignFileError` (a ValueError) of one line.
    """
    text = read_text(path)
    return parse_campaign(text, Path(path).resolve().parent, typed)


def check_trust(cfg: Mapping[str, Any], typed_model: str | None) -> None:
    """Refuse a file that names a builder to trust (``model``) unless the person typed the same
    ``--model``: trust comes only from the keyboard, and importing a builder runs its code."""
    named = cfg.get("model")
    if named is None or named == typed_model:
        return
    shown = repr(named)[:200]
    if typed_model is None:
        raise _fail("model", f"a campaign file cannot grant trust to the builder {shown} (importing it "
                    f"runs its code); type --model {shown} yourself, or remove the key")
    raise _fail("model", f"names the builder {shown} but --model is {typed_model[:200]!r}; "
                "make them the same, or remove the key")


# --- mapping onto CampaignConfig, and ftcnn inject's flags together with a file ----------------------

# file key -> CampaignConfig field, where they differ
_CONFIG_FIELDS = {"ber": "bers", "count": "counts"}
# keys that are not CampaignConfig fields (the CLI uses them: what to load, where to write)
NOT_CONFIG = ("checkpoint", "data", "model", "limit", "output", "normalize")


def config_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``campaign.CampaignConfig`` for the keys ``cfg`` sets
    (tuples where the config holds tuples; ``trials = "auto"`` -> None;
    ``[ber_per_layer]`` -> ((layer, rate), ...) pairs in name order)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key in NOT_CONFIG:
            continue
        field = _CONFIG_FIELDS.get(key, key)
        if key == "trials":
            value = None if value == "auto" else value
        elif key == "ber_per_layer":
            value = tuple(sorted(dict(value).items()))
        elif isinstance(value, list):
            value = tuple(value)
        out[field] = value
    return out


# ``ftcnn inject``'s parameter names where they differ from the file's keys
CLI_NAMES = {"checkpoint_path": "checkpoint", "model_spec": "model"}
# a flag given on the command line replaces the file's key of the same name and these keys too
# (a --count campaign drops the file's ber; --precision drops its trials, and back)
REPLACES = {"ber": ("count",), "count": ("ber",), "precision": ("trials", "ci_half_width"),
            "trials": ("precision",)}


@dataclass(frozen=True)
class InjectSettings:
    """What ``ftcnn inject`` runs: the campaign's configuration, what to load, where to write."""

    config: CampaignConfig
    checkpoint: str
    output: str
    model: str | None = None
    data: str | None = None
    limit: int | None = None
    campaign_file: str | None = None
    normalize: str | None = None


def parse_ber_per_layer(items: Sequence[str]) -> dict[str, float]:
    """``--ber-per-layer NAME=RATE ...`` as {layer: rate}; one line per mistake."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = str(item).rpartition("=")
        if not sep or not name:
            raise ValueError(f"--ber-per-layer takes NAME=RATE, e.g. features.0=1e-5 (got {item!r})")
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"--ber-per-layer {item!r}: {value!r} is not a number") from None
        rules.check("ber", rate, f"--ber-per-layer {item!r}:")
        if name in out:
            raise ValueError(f"--ber-per-layer names layer {name!r} twice")
        out[name] = rate
    return out


def _cli_trials(value: Any) -> int | str:
    """``--trials`` as typed (a number or "auto"), by the rule every command's --trials follows."""
    return value if value is None else rules.trials(value, "inject")


def _cli_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """The command line's values under the file's key names; unset ones (None, empty lists) left out."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        key = CLI_NAMES.get(name, name)
        if key not in KEYS or value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        if key == "trials":
            value = _cli_trials(value)
        elif key == "ber_per_layer":
            value = parse_ber_per_layer(value)
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def inject_settings(params: Mapping[str, Any], given: Iterable[str] = (),
                    campaign_file: str | os.PathLike | None = None) -> InjectSettings:
    """``ftcnn inject``'s flags (``params``, named as its parameters), and a campaign file, as one campaign.

    Without a file, the flags are the campaign. With one, the file says
    everything it sets; a flag the user typed (``given``: parameter names)
    overrides the file's key of the same meaning (the run's summary records the
    configuration that ran), and the flags' defaults fill the keys the file
    leaves out. Activation faults with a ``[ber_per_layer]`` table and no
    ``ber``/``count`` run one campaign point, 0.0: only the listed layers, at
    their rates. The file grants nothing: its ``model`` must equal a typed
    ``--model`` (:func:`check_trust`), its paths stay inside its folder unless
    typed (:func:`load_campaign_file`); both are checked before anything loads.
    Every problem is a ValueError of one line.
    """
    given = set(given)
    if {"precision", "trials"} <= given:
        raise ValueError("--precision and --trials cannot be combined: --precision sets its own trial counts")
    values = _cli_values(params)
    if campaign_file is None:
        settings = values
    else:
        typed = {CLI_NAMES.get(n, n) for n in given} & set(values)
        cfg = load_campaign_file(campaign_file, typed & set(PATH_FLAGS))
        check_trust(cfg, values.get("model") if "model" in typed else None)
        dropped = set(typed) | {k for t in typed for k in REPLACES.get(t, ())}
        settings = {**values, **{k: v for k, v in cfg.items() if k not in dropped}}
        for key in typed:
            settings[key] = values[key]
        for key in {k for t in typed for k in REPLACES.get(t, ())} - typed:
            settings.pop(key, None)
            if key == "trials":
                settings["trials"] = "auto"        # --precision replaces the trial budget
    if settings.get("precision") is not None:
        settings["trials"] = "auto"                # the stratified design sets its own trial counts
    if settings.get("target") == "activations" and "ber" not in settings and "count" not in settings \
            and settings.get("ber_per_layer"):
        settings["ber"] = [0.0]                    # only the listed layers, at their rates
    dtype, width = settings.get("dtype", "float32"), bit_width(settings.get("dtype", "float32"))
    outside = [b for b in settings.get("bits") or () if not 0 <= b < width]
    if outside:                                    # before the checkpoint loads, not mid-campaign
        raise ValueError(f"--bits {outside[0]}: {dtype} has bits 0..{width - 1}")
    checkpoint, output = settings.get("checkpoint"), settings.get("output")
    if checkpoint is None:
        raise ValueError("give a CHECKPOINT, or checkpoint = \"...\" in the campaign file (--config)")
    if output is None:
        raise ValueError("give -o/--output, or output = \"...\" in the campaign file (--config)")
    config = CampaignConfig(**config_kwargs(settings))
    return InjectSettings(config, str(checkpoint), str(output), settings.get("model"), settings.get("data"),
                          settings.get("limit"), None if campaign_file is None else os.fspath(campaign_file),
                          settings.get("normalize"))
