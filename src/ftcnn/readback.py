"""Schemas of the JSON files ftcnn reads back from a run folder (design §8: files are untrusted).

A run folder can come from anyone (a colleague's archive, a hand edit, a concurrent
writer), so what ftcnn wrote earlier is read back like a checkpoint: a bounded read
(``MAX_BYTES``), a parse that refuses ``Infinity`` (``NaN`` reads as ``null``, as
``files.write_json`` writes it), a walk that bounds nesting, integers and strings,
then a schema for the fields the reader uses: types, ranges (every accuracy, SDC and
DUE share in [0, 1], trial counts >= 0, BERs in [0, 1]), required fields, unique BERs
and variant names, names that are safe as folder names. Unknown fields are allowed
(newer writers may add some) but bounded by the same walk.

Any violation is a ``ValueError`` whose one line names the file and the field, e.g.
``run/summary.json: variants[0].results[1].accuracy_mean must be a number in [0, 1]
(got 7.5)``; ``cli.main`` prints it as ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

MAX_BYTES = 64 * 2**20            # a summary of 14 variants x 100 BERs is well under 1 MiB
MAX_REPORT_DATA_BYTES = 512 * 2**20  # per-trial copies: 14 variants x 10 BERs x 100,000 trials
MAX_KEY_BYTES = 2**20             # a piece's key: a few digests and settings
MAX_DEPTH = 32
MAX_STRING = 65536
MAX_INT = 2**63
# a variant or layer name: it becomes a folder name (campaigns/NAME) and a plot label
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
TENSOR = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,255}")
PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\- ]{1,64}")
INDEX = re.compile(r"0|[1-9][0-9]{0,17}")  # a trial index or bit position, written as a JSON key


class Invalid(ValueError):
    """A field that breaks its schema: ``where`` (a JSON path) and what was expected."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where or '(top)'} {message}")


def _got(value: Any) -> str:
    """What a field held, in a few words (never the whole value: it may be huge or hostile)."""
    if isinstance(value, (int, float, bool)) or value is None:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _join(where: str, key: str | int) -> str:
    """The JSON path of a field, for messages: a.b[0]; a key that is no plain name is quoted (and
    cut), so that a hostile key cannot break the message's single line."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    if not PLAIN_KEY.fullmatch(key):
        return f"{where}[{json.dumps(key[:40])}]"
    return f"{where}.{key}" if where else key


# --- the schema pieces ----------------------------------------------------------------------------

class Schema:
    """A check of one JSON value; ``check`` raises ``Invalid`` naming the field. A schema with
    ``nullable`` also takes null; each kind states only its own rule in ``_check``."""

    nullable: bool = False

    def check(self, value: Any, where: str) -> None:
        if value is None and self.nullable:
            return
        self._check(value, where)

    def _check(self, value: Any, where: str) -> None:
        raise NotImplementedError


class Anything(Schema):
    """Any JSON value (already bounded by the walk of ``read_json``)."""

    def _check(self, value: Any, where: str) -> None:
        return None


ANY = Anything()


@dataclass(frozen=True)
class Num(Schema):
    """A number in [lo, hi] (an integer with ``integer``), or null with ``nullable``."""

    lo: float = -math.inf
    hi: float = math.inf
    integer: bool = False
    nullable: bool = False

    def _check(self, value: Any, where: str) -> None:
        kind = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not self.lo <= value <= self.hi:
            what = "an integer" if self.integer else "a number"
            low = None if self.lo <= -MAX_INT else f"{self.lo:g}"
            high = None if self.hi >= MAX_INT else f"{self.hi:g}"
            bounds = (f" in [{low}, {high}]" if low and high else f" >= {low}" if low else
                      f" <= {high}" if high else "")
            null = " or null" if self.nullable else ""
            raise Invalid(where, f"must be {what}{bounds}{null} (got {_got(value)})")


@dataclass(frozen=True)
class Text(Schema):
    """A string; with ``pattern``, one that matches it whole (names used as folder names)."""

    pattern: re.Pattern | None = None
    nullable: bool = False

    def _check(self, value: Any, where: str) -> None:
        if not isinstance(value, str):
            raise Invalid(where, f"must be a string (got {_got(value)})")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise Invalid(where, f"must be a name of letters, digits, '_', '.' or '-' (got {value[:40]!r})")


@dataclass(frozen=True)
class ListOf(Schema):
    """A list of ``item``s (exactly ``length`` of them when given, at least ``min_len``, at most ``max_len``)."""

    item: Schema
    length: int | None = None
    min_len: int = 0
    nullable: bool = False
    max_len: int | None = None

    def _check(self, value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise Invalid(where, f"must be a list (got {_got(value)})")
        if self.length is not None and len(value) != self.length:
            raise Invalid(where, f"must hold {self.length} values (got {len(value)})")
        if len(value) < self.min_len:
            raise Invalid(where, f"must hold at least {self.min_len} value(s) (got {len(value)})")
        if self.max_len is not None and len(value) > self.max_len:
            raise Invalid(where, f"must hold at most {self.max_len} values (got {len(value)})")
        for i, item in enumerate(value):
            self.item.check(item, _join(where, i))


@dataclass(frozen=True)
class Flag(Schema):
    """true or false (or null with ``nullable``)."""

    nullable: bool = False

    def _check(self, value: Any, where: str) -> None:
        if not isinstance(value, bool):
            raise Invalid(where, f"must be true or false (got {_got(value)})")


@dataclass(frozen=True)
class Obj(Schema):
    """An object with ``required`` and ``optional`` fields; other fields are allowed (any value)."""

    required: Mapping[str, Schema] = field(default_factory=dict)
    optional: Mapping[str, Schema] = field(default_factory=dict)
    nullable: bool = False

    def _check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise Invalid(where, f"must be an object (got {_got(value)})")
        for key, schema in self.required.items():
            if key not in value:
                raise Invalid(_join(where, key), "is missing")
            schema.check(value[key], _join(where, key))
        for key, schema in self.optional.items():
            if key in value:
                schema.check(value[key], _join(where, key))


@dataclass(frozen=True)
class MapOf(Schema):
    """An object whose keys pass ``key`` (a pattern they match whole, or a test) and whose values
    all follow ``value``."""

    key: re.Pattern | Callable[[str], bool]
    value: Schema
    what: str = "key"
    nullable: bool = False

    def _check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise Invalid(where, f"must be an object (got {_got(value)})")
        for key, item in value.items():
            ok = self.key.fullmatch(key) if isinstance(self.key, re.Pattern) else self.key(key)
            if not ok:
                raise Invalid(where, f"has a {self.what} that is not valid: {key[:40]!r}")
            self.value.check(item, _join(where, key))


@dataclass(frozen=True)
class Row(Schema):
    """A fixed-length list (or an SQLite row) whose items follow ``items``, position by position."""

    items: tuple[Schema, ...]

    def _check(self, value: Any, where: str) -> None:
        if not isinstance(value, (list, tuple)) or len(value) != len(self.items):
            raise Invalid(where, f"must be a list of {len(self.items)} values (got {_got(value)})")
        for i, (schema, item) in enumerate(zip(self.items, value)):
            schema.check(item, _join(where, i))


@dataclass(frozen=True)
class UniqueBy(Schema):
    """``inner``, then no two items of the list share ``key`` (numbers compared to 1e-9)."""

    inner: ListOf
    key: str

    def _check(self, value: Any, where: str) -> None:
        self.inner.check(value, where)
        seen: list[Any] = []
        for i, item in enumerate(value or []):
            k = item.get(self.key) if isinstance(item, dict) else None
            if k is None:
                continue
            if any(_same(k, s) for s in seen):
                raise Invalid(_join(_join(where, i), self.key), f"repeats an earlier value ({_got(k)})")
            seen.append(k)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


@dataclass(frozen=True)
class Ordered(Schema):
    """A [low, high] pair of ``inner``s with low <= high where both are numbers."""

    inner: Schema

    def _check(self, value: Any, where: str) -> None:
        ListOf(self.inner, length=2).check(value, where)
        lo, hi = value
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
            raise Invalid(where, f"must be [low, high] with low <= high (got [{lo:g}, {hi:g}])")


# --- the files ------------------------------------------------------------------------------------

SHARE = Num(0.0, 1.0, nullable=True)          # accuracy, SDC, DUE: a share of inputs (null: undefined)
BER = Num(0.0, 1.0)
COUNT = Num(0, MAX_INT, integer=True)
NONNEG = Num(0.0, nullable=True)
BIT_KEY = re.compile(r"[0-9]|[1-5][0-9]|6[0-3]")  # a bit position of a value of at most 64 bits


def _ber_key(key: str) -> bool:
    """A BER written as a JSON key (``repr`` of a float): it reads back as a number in [0, 1]."""
    try:
        return len(key) <= 32 and 0.0 <= float(key) <= 1.0
    except ValueError:
        return False


COST_KEYS = ("params", "protection_values", "macs", "layer_macs", "elementwise", "weight_checks",
             "latency_b1_ms", "latency_b128_ms")
COST = Obj(optional={**{k: NONNEG for k in COST_KEYS},
                     **{f"{k}_iqr": Ordered(NONNEG) for k in ("latency_b1_ms", "latency_b128_ms")}})
RELATIVE_COST = Obj(optional={k: NONNEG for k in COST_KEYS})

# a comparison's row per BER: compare runs >= 1 trial, so accuracy and its CI are always defined
RESULT = Obj(
    required={"ber": BER, "trials": COUNT, "accuracy_mean": Num(0.0, 1.0), "accuracy_ci": Ordered(Num(0.0, 1.0)),
              "sdc_mean": SHARE, "critical_sdc_mean": SHARE, "due_mean": SHARE},
    optional={"accuracy_std": NONNEG, "confidence": Num(0.0, 1.0, nullable=True), "ci_method": Text(nullable=True),
              "top5_mean": SHARE, "n_faults_mean": NONNEG, "sdc_ci": Ordered(SHARE)})

VARIANT = Obj(
    required={"name": Text(NAME), "results": UniqueBy(ListOf(RESULT, min_len=1), "ber")},
    optional={"label": Text(), "description": Text(), "clean_accuracy": SHARE,
              "golden_accuracy": SHARE, "cost": COST, "relative_cost": RELATIVE_COST,
              "bit_sensitivity": MapOf(BIT_KEY, SHARE, "bit position", nullable=True)})

# summary.json of ``ftcnn compare``: what ``ftcnn report`` draws from
COMPARE_SUMMARY = Obj(
    required={"report_ber": BER, "variants": UniqueBy(ListOf(VARIANT, min_len=1), "name")},
    optional={"kind": Text(nullable=True), "model_name": Text(), "data": Text(),
              "inputs": Num(0, MAX_INT, integer=True, nullable=True), "golden_accuracy": SHARE,
              "config": MapOf(re.compile(r".{1,200}", re.S), ANY, "setting name"),
              "digests": Obj(), "versions": MapOf(re.compile(r".{1,200}", re.S), Text(), "name")})

# one single flip of report_data.json's ``bits``: [faulted tensor or null, critical SDC share or null]
FLIP = Row((Text(TENSOR, nullable=True), SHARE))


# report_data.json: the per-trial values copied from the run's SQLite files
REPORT_DATA = Obj(
    required={"campaigns": MapOf(NAME, Obj(
                  required={"accuracy": MapOf(_ber_key, MapOf(INDEX, Num(0.0, 1.0), "trial index"), "BER")},
                  optional={"seed": Num(-MAX_INT, MAX_INT, integer=True, nullable=True)}), "variant name"),
              "bits": MapOf(NAME, MapOf(BIT_KEY, ListOf(FLIP), "bit position"),
                            "variant name")},
    optional={"format": Text(), "note": Text()})

# summary.json of one campaign (``ftcnn inject``, and each variant's campaign in a comparison)
CAMPAIGN_SUMMARY = Obj(
    required={"config": Obj(), "results": ListOf(Obj(
        required={"trials": COUNT, "accuracy_mean": SHARE, "accuracy_ci": Ordered(SHARE), "sdc_mean": SHARE,
                  "critical_sdc_mean": SHARE, "due_mean": SHARE},
        optional={"ber": Num(0.0, 1.0, nullable=True), "count": Num(0, MAX_INT, nullable=True),
                  "accuracy_std": NONNEG, "confidence": Num(0.0, 1.0, nullable=True), "top5_mean": SHARE,
                  "n_faults_mean": NONNEG, "sdc_ci": Ordered(SHARE)}))},
    optional={"golden_accuracy": SHARE, "seed": Num(-MAX_INT, MAX_INT, integer=True, nullable=True),
              "confidence": Num(0.0, 1.0, nullable=True), "ci_method": Text(nullable=True), "digests": Obj()})

# rows report.collect_trials reads from a campaign's results.sqlite (point, trial, accuracy) and from a
# single-flip campaign's (n_faults, critical_sdc, sites: JSON [[tensor, index, bit], ...] or null)
CAMPAIGN_ROWS = ListOf(Row((BER, COUNT, Num(0.0, 1.0))))
FLIP_ROWS = ListOf(Row((COUNT, SHARE, Text(nullable=True))))
SITES = ListOf(ListOf(ANY, min_len=1), min_len=1)

# models/costs.json of a comparison: per variant, what ``cost`` measured
COSTS = MapOf(NAME, COST, "variant name")
# models/NAME.clean.json: a variant's clean accuracy
CLEAN = Obj(required={"accuracy": SHARE})
# scores.json: per layer, one finite score per channel (``vulnerability.Scores.check`` checks the rest)
SCORES = Obj(required={"method": Text(NAME), "layers": MapOf(TENSOR, ListOf(Num(), min_len=1), "layer name")},
             optional={"settings": Obj(nullable=True), "format": Text()})
# NAME.key.json: the inputs a cached piece was computed from (compared, never trusted)
KEY = Obj()
# pipeline.json and the pipeline's summary.json: settings compared / numbers shown, any fields
SETTINGS = Obj()
# a JSON object whose fields its reader checks itself (scores.json: vulnerability.Scores.check)
ANY_OBJECT = Obj()


# front.json of ``ftcnn protect`` (and of ``ftcnn pipeline --max-macs``: its ``end_to_end``): what
# ``ftcnn report`` redraws the front and its tables from. A candidate's name is a plot label: letters,
# digits and ``_.+-`` only (no mathtext, no markup); at most ``MAX_CANDIDATES`` candidates are drawn.
MAX_CANDIDATES = 500
CANDIDATE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,127}")
RATIO = Num(0.0, 1e12, nullable=True)  # null: undefined (a reference cost of 0)
POINT = Obj(required={"accuracy": Num(0.0, 1.0), "accuracy_ci": Ordered(Num(0.0, 1.0))},
            optional={"trials": COUNT, "sdc": SHARE, "due": SHARE})
TEST_ENTRY = Obj(optional={"clean": SHARE, "role": Text(), "bers": MapOf(_ber_key, POINT, "BER")})
CANDIDATE = Obj(
    required={"name": Text(CANDIDATE_NAME)},
    optional={"family": Text(), "built": Flag(), "baseline": Flag(), "within_budget": Flag(), "pareto": Flag(),
              "chosen": Flag(), "macs_ratio": RATIO, "macs_ratio_b1": RATIO, "params_ratio": RATIO,
              "latency_ratio": RATIO, "batch": Num(1, MAX_INT, integer=True, nullable=True),
              "validation": Obj(required=POINT.required, optional=POINT.optional, nullable=True),
              "validation_clean": SHARE})
PROTECT_FRONT = Obj(
    required={"chosen": Text(CANDIDATE_NAME), "candidates": UniqueBy(ListOf(CANDIDATE, min_len=1,
                                                                            max_len=MAX_CANDIDATES), "name")},
    optional={"format": Text(), "reason": Text(),
              "config": Obj(optional={"ber": BER, "max_macs": Num(0.0, 1e12, nullable=True),
                                      "max_latency": Num(0.0, 1e12, nullable=True), "trials": COUNT,
                                      "check_batch": Num(1, MAX_INT, integer=True, nullable=True),
                                      "batch": Num(1, MAX_INT, integer=True, nullable=True),
                                      "validation_size": COUNT}),
              "test": MapOf(CANDIDATE_NAME, TEST_ENTRY, "candidate name", nullable=True),
              "end_to_end": Obj(optional={"prune_ratio": Num(0.0, 1.0), "criterion": Text(),
                                          "clean_test": MapOf(NAME, SHARE, "model name"),
                                          "original_test": TEST_ENTRY}, nullable=True)})

# summary.json of ``ftcnn pipeline`` (prune -> harden): per stage its costs and clean test accuracy
STAGE = Obj(optional={**{k: NONNEG for k in COST_KEYS}, "accuracy": SHARE})
PIPELINE_SUMMARY = Obj(
    required={"stages": MapOf(NAME, STAGE, "stage name")},
    optional={"relative": MapOf(NAME, MapOf(NAME, Num(nullable=True), "cost"), "comparison"),
              "config": Obj(), "record": Obj(), "device": Text(nullable=True)})


# --- reading ------------------------------------------------------------------------------------

def _refuse_constant(name: str) -> Any:
    if name == "NaN":
        return None  # an undefined value, as ``files.write_json`` writes it (null)
    raise ValueError(f"holds a bare {name} (not a finite number)")


def _walk(value: Any) -> None:
    """Bound what any field may hold: nesting, integers (int64), string length."""
    stack = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise Invalid(where, f"is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, float):
            if not math.isfinite(item):  # 1e999 parses as inf
                raise Invalid(where, "holds a number that is not finite")
            continue
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, int):
            if not -MAX_INT <= item <= MAX_INT:
                raise Invalid(where, "holds an integer outside the 64-bit range")
        elif isinstance(item, str):
            if len(item) > MAX_STRING:
                raise Invalid(where, f"holds a string longer than {MAX_STRING} characters")
        elif isinstance(item, list):
            stack.extend((v, _join(where, i), depth + 1) for i, v in enumerate(item))
        elif isinstance(item, dict):
            for k, v in item.items():
                if len(k) > MAX_STRING:
                    raise Invalid(where, f"holds a key longer than {MAX_STRING} characters")
                stack.append((v, _join(where, k), depth + 1))


def parse(text: str, schema: Schema, name: str) -> Any:
    """``text`` parsed and checked against ``schema``; a one-line ValueError naming ``name`` and the field."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError(f"{name} is nested too deeply to be an ftcnn file") from None
    except ValueError as exc:
        raise ValueError(f"{name} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    check(value, schema, name)
    return value


def check(value: Any, schema: Schema, name: str) -> None:
    """``value`` (already parsed, or assembled from another file) against ``schema``."""
    try:
        _walk(value)
        schema.check(value, "")
    except Invalid as exc:
        raise ValueError(f"{name}: {exc}") from None


def read_json(path: str | Path, schema: Schema, max_bytes: int = MAX_BYTES) -> Any:
    """The JSON file at ``path``, read only when at most ``max_bytes`` long, checked against ``schema``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{path} is {size:,} bytes, more than the {max_bytes:,} an ftcnn file of its kind "
                             "holds")
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text (not an ftcnn file)") from None
    return parse(text, schema, str(path))


def read_key(path: str | Path) -> dict[str, Any] | None:
    """A piece's stored key, or None when it is missing or not a well-formed key (the piece is then
    recomputed: a key is only ever compared with the expected one, never trusted)."""
    try:
        return read_json(path, KEY, MAX_KEY_BYTES)
    except ValueError:
        return None
