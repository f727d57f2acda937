"""Files ftcnn writes: atomic, created with the umask's mode, strict JSON.

Every result file (checkpoint, summary, scores, report, plot) goes through
``atomic_write``: a temporary file in the same folder renamed into place, so a
crash never leaves a half-written result. ``mkstemp`` creates that temporary
file with mode 0600, which made every result unreadable to a group or a web
server whatever the umask; it is set to ``0o666 & ~umask`` before the rename,
as ``open(path, "w")`` would have done.

JSON goes through ``write_json``/``dumps_json``: Python's ``json`` writes bare
``NaN``/``Infinity`` by default, which browsers, ``jq`` and most other parsers
reject (a summary with one undefined CI was unreadable in a browser). Here
non-finite floats become ``null`` (with a note in the file saying so), numpy
scalars and arrays become numbers and lists, tuples lists, and the encoder
runs with ``allow_nan=False`` so a bare NaN can never be emitted.

A run folder has one writer at a time (issue 19): every command that writes one
holds ``exclusive_folder`` for its whole run, an ``flock`` on ``LOCK_NAME``
inside it that the OS releases when the process ends, however it ends. Two
runs on one folder used to interleave (one deleted the other's campaign, the
folder ended with one run's model and the other's results); the second now
refuses in one line before touching anything.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are not locked there
    fcntl = None  # type: ignore[assignment]

import numpy as np

# what the note added to a JSON file whose values were not all finite says
NONFINITE_NOTE = ("null marks a value that was not a finite number (NaN or infinite: undefined, "
                  "e.g. a rate over zero trials); strict JSON has no NaN")
MAX_NOTED = 20  # field paths listed in that note


def umask() -> int:
    """The process's umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-and-restore
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename
    it to ``path``: readers see the old file or the whole new one, never a part.

    The file gets the mode a plain ``open`` would give it (``0o666 & ~umask``).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"output folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def jsonable(obj: Any, replaced: list[str] | None = None, where: str = "") -> Any:
    """``obj`` as plain JSON data: non-finite floats -> None (their paths appended
    to ``replaced``), numpy and torch scalars -> numbers, arrays and tuples ->
    lists, paths and other objects -> strings, keys -> strings."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        if replaced is not None:
            replaced.append(where or "(top)")
        return None
    if isinstance(obj, np.generic):
        return jsonable(obj.item(), replaced, where)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist(), replaced, where)
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # a torch tensor, without importing torch
        return jsonable(obj.detach().cpu().tolist(), replaced, where)
    if isinstance(obj, dict):
        return {str(k): jsonable(v, replaced, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, replaced, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return [jsonable(v, replaced, f"{where}[{i}]") for i, v in enumerate(sorted(obj, key=str))]
    return str(obj)


def dumps_json(obj: Any, *, indent: int | None = 2, sort_keys: bool = False, note: bool = True) -> str:
    """Strict JSON text of ``obj`` (see ``jsonable``). With ``note`` and a dict at
    the top, a ``"nonfinite"`` entry says which fields were NaN/Inf and now null."""
    replaced: list[str] = []
    data = jsonable(obj, replaced)
    if note and replaced and isinstance(data, dict) and "nonfinite" not in data:
        data["nonfinite"] = {"note": NONFINITE_NOTE, "fields": replaced[:MAX_NOTED],
                             "count": len(replaced)}
    return json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
               note: bool = True) -> None:
    """Write ``obj`` to ``path`` as strict JSON (never bare NaN), atomically."""
    write_text(path, dumps_json(obj, indent=indent, sort_keys=sort_keys, note=note) + "\n")


def loads_strict(text: str) -> Any:
    """Parse JSON as strict parsers do: ``NaN``/``Infinity`` are errors."""
    def refuse(name: str) -> Any:
        raise ValueError(f"not strict JSON: bare {name}")
    return json.loads(text, parse_constant=refuse)


# --- one writer per run folder ---------------------------------------------------------------

LOCK_NAME = ".ftcnn.lock"  # inside the run folder; kept after the run (unlinking it would race)

_held_folders: dict[Path, tuple[int, int]] = {}  # folder -> (owning thread, depth): nested calls share it
_held_guard = threading.Lock()


def make_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) or refuse in one line."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output folder {folder}: {exc.strerror}") from None
    return folder


def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file, for the refusal ("unknown" while it writes)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder`` (created if missing) as its only writer until the block ends.

    A second process (or thread) asking for a held folder gets a ``ValueError``
    naming the holder's pid, and nothing in the folder changes. Nested calls in the
    holding thread (``compare_run`` -> ``run_compare``) share the lock. Worker processes
    forked by the holder inherit it and take none of their own.
    """
    folder = make_folder(folder)
    where = folder.resolve()
    me = threading.get_ident()
    with _held_guard:
        owner, depth = _held_folders.get(where, (me, 0))
        nested = depth > 0 and owner == me
        if nested:
            _held_folders[where] = (me, depth + 1)
    if nested:
        try:
            yield folder
        finally:
            with _held_guard:
                _held_folders[where] = (me, _held_folders[where][1] - 1)
        return
    if depth:  # another thread of this process holds it
        raise ValueError(f"{folder} is in use by another ftcnn run (pid {os.getpid()})")
    if fcntl is None:
        yield folder
        return
    try:
        # the umask applies, as for results; a planted symlink is refused, never followed
        fd = os.open(where / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ValueError(f"output folder {folder} is not writable") from None
        raise ValueError(f"cannot lock output folder {folder}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{folder} is in use by another ftcnn run (pid {_holder(fd)})") from None
        except OSError as exc:
            raise ValueError(f"cannot lock output folder {folder}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with _held_guard:
            _held_folders[where] = (me, 1)
        try:
            yield folder
        finally:
            with _held_guard:
                _held_folders.pop(where, None)
    finally:
        os.close(fd)  # releases the flock (and the OS does so if the process dies first)
