"""Fixed costs (issue 24): `ftcnn --help` imports no torch, built-in data is decoded once and
cached by content, and a cache file is checked, never trusted."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from _helpers import cli_in_process
from ftcnn import constants, data, lazy
from ftcnn.campaigns import trials
from ftcnn.injection import faults

HEAVY = ("torch", "numpy", "scipy", "sklearn", "mlxtend", "pandas", "matplotlib")


# --- start-up: help, version and the library's numbers without torch ----------------------------

def test_help_and_version_import_no_torch() -> None:
    """One fresh process: `--help`, `--version` and `inject --help` load none of the heavy modules,
    the help still shows the library's numbers, and loading a checkpoint module afterwards still
    knows the transforms that hardening and pruning register (the package no longer imports them)."""
    script = textwrap.dedent(f"""
        import json, sys
        from ftcnn import cli
        codes = []
        for args in (["--help"], ["--version"], ["inject", "--help"]):
            sys.argv = ["ftcnn", *args]
            try:
                cli.main()
                codes.append(0)
            except SystemExit as exc:
                codes.append(exc.code or 0)
        heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
        from ftcnn import checkpoint
        print(json.dumps({{"codes": codes, "heavy": heavy, "transforms": sorted(checkpoint._REBUILDERS)}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0]
    assert result["heavy"] == []
    assert result["transforms"] == ["fold_bn", "harden", "prune"]  # fold_bn: hardening imports ftcnn.protection.fold
    assert "ftcnn 0." in r.stdout and "Commands" in r.stdout
    assert "random-value" in r.stdout  # --mode's help lists the library's fault modes
    assert f"at most {constants.THREADS_PER_CORE} per core" in r.stdout
    assert f"with --precision {constants.PRECISION_INPUTS_PER_TRIAL}" in r.stdout


def test_version(monkeypatch, capsys) -> None:
    from ftcnn import __version__

    r = cli_in_process(monkeypatch, capsys, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ftcnn {__version__}"


def test_help_constants_are_the_library_ones() -> None:
    """The torch-free copies the help shows are the values the library uses."""
    assert constants.FAULT_MODES == faults.MODES == tuple(faults.FAULT_MODES)
    assert trials.PRECISION_INPUTS_PER_TRIAL == constants.PRECISION_INPUTS_PER_TRIAL
    assert trials.THREADS_PER_CORE == constants.THREADS_PER_CORE


def _package(root: Path, name: str) -> None:
    """A package whose module ``a`` holds a registry that module ``b`` fills when it runs; the
    package lists the modules that ran."""
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("RAN = []\n")
    (pkg / "a.py").write_text(f"import {name}\n{name}.RAN.append('a')\nREGISTRY = []\n")
    (pkg / "b.py").write_text(f"from {name} import a\na.REGISTRY.append('b')\n")


def test_the_cli_proxies_are_the_modules_it_declares() -> None:
    """cli.py's library modules are proxies imported on first use; the `if TYPE_CHECKING:` import
    that the checks in tests/ read (test_cli.py, test_imports.py) names exactly the same modules."""
    from ftcnn import cli

    declared = {}
    for node in ast.walk(ast.parse(Path(cli.__file__).read_text())):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                for alias in imp.names:
                    module = f"{imp.module}.{alias.name}" if isinstance(imp, ast.ImportFrom) else alias.name
                    declared[alias.asname or alias.name] = module
    proxies = {name: value._name for name, value in vars(cli).items() if isinstance(value, lazy.LazyModule)}
    assert "flows" in proxies and "torch" in proxies
    assert proxies == declared


def test_import_together_fills_the_registry(tmp_path, monkeypatch) -> None:
    _package(tmp_path, "lazypkg_two")
    monkeypatch.syspath_prepend(str(tmp_path))
    finders = list(sys.meta_path)
    lazy.import_together("lazypkg_two.a", "lazypkg_two.b")
    try:
        import lazypkg_two.a as a

        assert a.REGISTRY == ["b"] and "lazypkg_two.b" in sys.modules
        assert isinstance(a.__loader__, type(sys.modules["lazypkg_two"].__loader__))  # source as usual
    finally:
        sys.meta_path[:] = finders


# --- the data cache ----------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch) -> Iterator[Path]:
    """An empty cache folder of this test's own, and no decoded data set kept in memory."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(data.CACHE_ENV, str(folder))
    data._source.cache_clear()
    data._split.cache_clear()
    yield folder
    data._source.cache_clear()
    data._split.cache_clear()


@pytest.fixture(scope="module")
def decoded_digits() -> data._Source:
    """sklearn's digits decoded from its source file, as before any cache existed."""
    return data._digits()


def _counting_decoder(monkeypatch) -> list[int]:
    """Count how often the digits are decoded from their source."""
    calls: list[int] = []
    decode, package, files = data._BUILTIN_SOURCES["digits"]

    def counted() -> data._Source:
        calls.append(1)
        return decode()
    monkeypatch.setitem(data._BUILTIN_SOURCES, "digits", (counted, package, files))
    return calls


def _assert_identical(src: data._Source, reference: data._Source) -> None:
    for got, want in ((src.x, reference.x), (src.y, reference.y)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def test_cached_data_is_bit_identical(cache, monkeypatch, decoded_digits) -> None:
    calls = _counting_decoder(monkeypatch)
    first = data._source("digits", "")
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("digits-") and files[0].suffix == ".npz"
    train_before, test_before = data.load("digits", "train"), data.load("digits", "test")
    data._source.cache_clear()
    data._split.cache_clear()
    second = data._source("digits", "")
    assert calls == [1]  # the second came from the cache
    _assert_identical(first, decoded_digits)
    _assert_identical(second, decoded_digits)
    for before, after in ((train_before, data.load("digits", "train")), (test_before, data.load("digits", "test"))):
        for a, b in zip(before.tensors, after.tensors):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_cache_key_follows_the_decoding_version(cache, monkeypatch) -> None:
    data._source("digits", "")
    monkeypatch.setattr(data, "DECODING_VERSION", data.DECODING_VERSION + 1)
    data._source.cache_clear()
    data._source("digits", "")
    assert len(list(cache.iterdir())) == 2  # a new decoding never reads the old file


def _flip_a_value(file: Path) -> None:
    with np.load(file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["x"] = arrays["x"].copy()
    arrays["x"].flat[5] ^= 1
    with open(file, "wb") as f:
        np.savez(f, **arrays)


def _object_array(file: Path) -> None:
    """An npz whose x is an object array: loading it would unpickle (and run) code."""
    code = f"open({str(file.parent.parent / 'pickle_ran')!r}, 'w').close()"

    class Payload:
        def __reduce__(self):
            return (exec, (code,))
    with np.load(file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["x"] = np.array([Payload()], dtype=object)
    with open(file, "wb") as f:
        np.savez(f, **arrays)


def _compressed(file: Path) -> None:
    """The same arrays and digest, deflated: a compressed member could inflate to any size."""
    with np.load(file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    with open(file, "wb") as f:
        np.savez_compressed(f, **arrays)


TAMPERS = {
    "a flipped value": _flip_a_value,
    "compressed": _compressed,
    "truncated": lambda f: f.write_bytes(f.read_bytes()[:1000]),
    "not a zip": lambda f: f.write_bytes(b"\x00" * 4096),
    "empty": lambda f: f.write_bytes(b""),
    "pickled objects": _object_array,
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_tampered_cache_file_is_refused_and_rebuilt(cache, monkeypatch, decoded_digits, tamper) -> None:
    calls = _counting_decoder(monkeypatch)
    data._source("digits", "")
    (file,) = cache.iterdir()
    TAMPERS[tamper](file)
    data._source.cache_clear()
    again = data._source("digits", "")
    assert calls == [1, 1]  # decoded from the source again, not taken from the file
    _assert_identical(again, decoded_digits)
    assert not (cache.parent / "pickle_ran").exists()
    assert data._read_cache(file) is not None  # rewritten whole
    data._source.cache_clear()
    data._source("digits", "")
    assert calls == [1, 1]


def test_an_oversized_cache_file_is_not_read(cache, monkeypatch) -> None:
    calls = _counting_decoder(monkeypatch)
    data._source("digits", "")
    monkeypatch.setattr(data, "MAX_CACHE_BYTES", 1000)
    data._source.cache_clear()
    data._source("digits", "")
    assert calls == [1, 1]


def test_a_cache_folder_that_cannot_be_written_still_works(tmp_path, monkeypatch, decoded_digits) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a folder under a regular file can never be created, even by root
    monkeypatch.setenv(data.CACHE_ENV, str(blocker / "cache"))
    data._source.cache_clear()
    try:
        _assert_identical(data._source("digits", ""), decoded_digits)
        assert len(data.load("digits", "test")) > 0
    finally:
        data._source.cache_clear()
        data._split.cache_clear()


def test_cache_folder_location(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_folder() == tmp_path / "mine"
    monkeypatch.delenv(data.CACHE_ENV)
    assert data.cache_folder() == tmp_path / "xdg" / "ftcnn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_folder() == tmp_path / "home" / ".cache" / "ftcnn"
