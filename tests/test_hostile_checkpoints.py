"""Hostile checkpoints: files made to run code, exhaust memory or crash the loader (issue 10).

A checkpoint is something people download, so every case here must end in a
clean refusal (a one-line ``CheckpointError``/``ValueError``; on the CLI one
``error:`` line and exit 2) or a correct load, with no side effect (the marker
file a payload would create never appears) and no allocation beyond the
tensors the file holds. The memory cases and the seeded fuzzer run in a
subprocess under ``RLIMIT_AS``, so a huge allocation fails the test, not the
machine. Each named case reproduces a hole of the pre-issue-10 loader.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import ftcnn
from ftcnn import checkpoint
from ftcnn.protection import hardening, pruning
from ftcnn.checkpoint import CheckpointError

from _helpers import assert_one_line_refusal, cli_in_process, run_cli
from ftcnn import cli

TESTS = Path(__file__).resolve().parent
ADDRESS_LIMIT = 3 << 30  # bytes of address space for the bounded subprocesses (torch itself maps ~0.7 GB)
SHAPE = (1, 8, 8)  # the built-in digits


# --- valid checkpoints and forgeries --------------------------------------------------

def _lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.25)


def seed_checkpoints(folder: Path) -> list[Path]:
    """Valid checkpoints to forge from: plain, pruned, and pruned then hardened
    (range correction + restriction, so every kind of buffer is there)."""
    plain = _lenet()
    pruned = pruning.prune(plain, ratio=0.3, criterion="l1", input_shape=SHAPE)
    layers = hardening.target_layers(pruned)
    scores = {n: [float(i) for i in range(hardening._out_channels(m))] for n, m in layers.items()}
    x = torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(0))
    hard = hardening.harden(pruned, scores, ratio=0.5, correction="range", restrict="zero", calibration=x)
    paths = []
    for name, model in (("plain", plain), ("pruned", pruned), ("hardened", hard)):
        paths.append(folder / f"{name}.pt")
        # no test_accuracy: an untrained model recording one it does not reach would (rightly) draw
        # the golden-gap warning of --normalize before every refusal these tests read
        ftcnn.save(model, paths[-1], data="digits")
    return paths


def raw(path: Path) -> dict[str, Any]:
    """A checkpoint's blob with spec/meta still JSON text (to forge from)."""
    return torch.load(path, weights_only=True)


def forge(path: Path, base: dict[str, Any], **fields: Any) -> Path:
    """Write ``base`` with some fields replaced; dict/list spec and meta become JSON text."""
    blob = dict(base)
    for key, value in fields.items():
        blob[key] = json.dumps(value) if key in ("spec", "meta") and isinstance(value, (dict, list)) else value
    torch.save(blob, path)
    return path


def spec_of(base: dict[str, Any]) -> dict[str, Any]:
    return json.loads(base["spec"])


def rezip(path: Path, out: Path, change: Callable[[dict[str, bytes]], None]) -> Path:
    """Rewrite a checkpoint's zip with some members' bytes changed (names and order kept)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        members = {n: z.read(n) for n in names}
    change(members)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for n in names:
            z.writestr(n, members[n])
    out.write_bytes(buf.getvalue())
    return out


def payloads(marker: Path) -> list[tuple[str, dict[str, Any]]]:
    """Builders with kwargs that would create ``marker`` if the loader called them."""
    return [("os:system", {"command": f"touch {marker}"}),
            ("subprocess:run", {"args": ["touch", str(marker)]}),
            ("subprocess:getoutput", {"cmd": f"touch {marker}"}),
            ("builtins:exec", {"source": f"open({str(marker)!r}, 'w')"})]


def evil_module(folder: Path, marker: Path, name: str = "evil_nets") -> str:
    """A module shipped beside a checkpoint that creates ``marker`` when imported."""
    (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                       "def net(**kwargs):\n    return None\n")
    return f"{name}:net"


class _Unpickle:
    """A CIFAR 'batch' whose unpickling creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def poisoned_cifar(folder: Path, marker: Path) -> Path:
    root = folder / "cifar"
    root.mkdir()
    blob = pickle.dumps(_Unpickle(marker))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(blob)
    return root


def assert_one_line(message: str) -> None:
    assert message and "\n" not in message and len(message) < 600, message


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[Path]:
    return seed_checkpoints(tmp_path_factory.mktemp("seeds"))


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a checkpoint ran code"


# --- code: builders, modules, data paths ----------------------------------------------------

@pytest.mark.parametrize("index", range(4))
def test_payload_builder_runs_nothing(seeds, tmp_path, marker, index) -> None:
    builder, kwargs = payloads(marker)[index]
    base = raw(seeds[0])
    path = forge(tmp_path / "evil.pt", base, spec={"builder": builder, "kwargs": kwargs, "transforms": []})
    with pytest.raises(CheckpointError, match="not one of ftcnn's models") as info:
        ftcnn.load(path)
    assert_one_line(str(info.value))
    # naming another builder is no opt-in to this one
    with pytest.raises(CheckpointError, match="not 'user_models:tiny' as named"):
        ftcnn.load(path, allow_builder="user_models:tiny")
    with checkpoint.allowing("lenet5"), pytest.raises(CheckpointError, match="as named"):
        ftcnn.load(path)


def test_module_shipped_next_to_the_file_is_not_imported(seeds, tmp_path, marker, monkeypatch) -> None:
    builder = evil_module(tmp_path, marker)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m ftcnn` run in that folder would
    path = forge(tmp_path / "evil.pt", raw(seeds[0]), spec={"builder": builder, "kwargs": {}, "transforms": []})
    with pytest.raises(CheckpointError, match="not one of ftcnn's models"):
        ftcnn.load(path)
    # and through the CLI in a subprocess, run from the folder that ships the module
    r = run_cli("inject", "evil.pt", "--data", "digits", "--ber", "1e-3", "--trials", "1", "-o", "run",
                cwd=tmp_path, threads=1)
    assert_one_line_refusal(r, "not one of ftcnn's models")


def test_data_path_in_metadata_needs_explicit_data(seeds, tmp_path, marker, monkeypatch, capsys) -> None:
    root = poisoned_cifar(tmp_path, marker)
    path = forge(tmp_path / "m.pt", raw(seeds[0]), meta={"data": f"cifar10:{root}"})
    ftcnn.load(path)  # the model itself is fine
    for command in (["inject", str(path), "--ber", "1e-3", "--trials", "1", "-o", str(tmp_path / "run")],
                    ["analyze", str(path), "--method", "l1", "-o", str(tmp_path / "s.json")]):
        assert_one_line_refusal(cli_in_process(monkeypatch, capsys, *command), "give --data explicitly")


def test_user_builder_needs_the_exact_opt_in(tmp_path) -> None:
    sys.path.insert(0, str(TESTS))
    try:
        model = ftcnn.build("user_models:tiny", num_classes=3, in_channels=1, input_size=8)
        ftcnn.save(model, tmp_path / "u.pt")
        with pytest.raises(CheckpointError, match="allow_builder='user_models:tiny'"):
            ftcnn.load(tmp_path / "u.pt")
        with pytest.raises(CheckpointError, match="as named"):
            ftcnn.load(tmp_path / "u.pt", allow_builder="user_models:other")
        with pytest.raises(CheckpointError, match="as named"):
            ftcnn.load(tmp_path / "u.pt", allow_builder="lenet5")
        for loaded in (ftcnn.load(tmp_path / "u.pt", allow_builder="user_models:tiny"),):
            assert torch.equal(loaded[-1].weight, model[-1].weight)
        with checkpoint.allowing("user_models:tiny"):
            assert torch.equal(ftcnn.load(tmp_path / "u.pt")[0].weight, model[0].weight)
        # a registry checkpoint loads with or without naming its own builder, never with another's
        ftcnn.save(_lenet(), tmp_path / "l.pt")
        ftcnn.load(tmp_path / "l.pt", allow_builder="lenet5")
        with pytest.raises(CheckpointError, match="as named"):
            ftcnn.load(tmp_path / "l.pt", allow_builder="user_models:tiny")
    finally:
        sys.path.remove(str(TESTS))


# --- malformed fields: one line each ------------------------------------------------------

def _kwargs(**change: Any) -> Callable[[dict], dict]:
    def mutate(spec: dict) -> dict:
        spec["kwargs"].update(change)
        return spec
    return mutate


def _transform(i: int, **change: Any) -> Callable[[dict], dict]:
    def mutate(spec: dict) -> dict:
        spec["transforms"][i].update(change)
        return spec
    return mutate


def _set(key: str, value: Any) -> Callable[[dict], dict]:
    def mutate(spec: dict) -> dict:
        spec[key] = value
        return spec
    return mutate


DEEP = "[" * 50_000 + "]" * 50_000

MALFORMED_SPECS = [  # (seed index, mutation, message)
    (0, _kwargs(depth=3), "unknown builder argument 'depth'"),
    (0, _kwargs(command="id"), "unknown builder argument 'command'"),
    (0, lambda s: [s["builder"], s["kwargs"]], "must be a JSON object, not a list"),
    (0, lambda s: json.dumps("lenet5"), "must be a JSON object, not a string"),
    (0, _set("transforms", ["harden"]), "transform #0 must be a JSON object, not a string"),
    (0, _set("transforms", "harden"), "transforms must be a list"),
    (0, _set("transforms", [{"kind": "os:system"}]), "unknown kind 'os:system'"),
    (0, _set("unknown", 1), "unknown field 'unknown'"),
    (0, _set("builder", 5), "builder must be a name"),
    (0, _set("kwargs", [1, 8]), "arguments must be a JSON object"),
    (0, _kwargs(width=float("nan")), "'width' must be a number"),
    (0, _kwargs(width=-1), "'width' must be a number"),
    (0, _kwargs(width=float("inf")), "'width' must be a number"),
    (0, _kwargs(in_channels=-1), "'in_channels' must be an integer"),
    (0, _kwargs(in_channels=True), "'in_channels' must be an integer"),
    (0, _kwargs(num_classes=10.5), "'num_classes' must be an integer"),
    (0, _kwargs(num_classes="10"), "'num_classes' must be an integer"),
    (1, _transform(0, input_shape="1x8x8"), "input_shape must be"),
    (1, _transform(0, input_shape=[1, -8, 8]), "input_shape must be"),
    (1, _transform(0, history=[["features.0", True, [999]]]), "history entry #0 must remove"),
    (1, _transform(0, history=[["features.0", True, [0, 1]]]), "and not all of them"),
    (1, _transform(0, history=[["__class__", True, [0]]]), "not a Conv2d/Linear"),
    (1, _transform(0, history=[["features.0", 1, [0]]]), "history entry #0 must be"),
    (1, _transform(0, history="features.0"), "history must be a list"),
    (1, _transform(0, ratio=float("nan")), "ratio must be"),
    (1, _transform(0, extra=1), "unknown field 'extra' in prune transform"),
    (2, _transform(1, layers={"features.0": [999]}), "channels of layer 'features.0'"),
    (2, _transform(1, layers={"features.0": [-1]}), "channels of layer 'features.0'"),
    (2, _transform(1, layers={"features.0": [0, 0]}), "repeat an index"),
    (2, _transform(1, layers={"nope": [0]}), "unknown layer 'nope'"),
    (2, _transform(1, layers=[["features.0", [0]]]), "layers must be a JSON object"),
    (2, _transform(1, correction="median"), "correction must be one of"),
    (2, _transform(1, margin=-1.0), "margin must be a number"),
    (2, _transform(1, restrict=0), "restrict must be one of"),
    (2, lambda s: {**s, "transforms": [s["transforms"][1], s["transforms"][0]]}, "hardened model"),
    (2, lambda s: {**s, "transforms": s["transforms"] + [s["transforms"][1]]}, "already hardened"),
]


@pytest.mark.parametrize("seed, mutate, message", MALFORMED_SPECS,
                         ids=[str(n) for n in range(len(MALFORMED_SPECS))])
def test_malformed_spec_is_one_line(seeds, tmp_path, seed, mutate, message) -> None:
    base = raw(seeds[seed])
    path = forge(tmp_path / "bad.pt", base, spec=mutate(spec_of(base)))
    with pytest.raises(CheckpointError) as info:
        ftcnn.load(path)
    assert message in str(info.value)
    assert_one_line(str(info.value))


def _bad_blobs(base: dict[str, Any], tmp: Path) -> list[tuple[str, dict[str, Any], str]]:
    state = dict(base["state_dict"])
    name = "features.0.weight"
    shared = torch.zeros(max(t.numel() for t in state.values()))
    return [
        ("deep spec", {"spec": DEEP}, "corrupt architecture description"),
        ("deep meta", {"meta": DEEP}, "corrupt architecture description"),
        ("spec not text", {"spec": 5}, "is not JSON text"),
        ("spec a tensor", {"spec": torch.zeros(3)}, "is not JSON text"),
        ("meta a list", {"meta": [1]}, "metadata must be a JSON object"),
        ("format a tensor", {"format": torch.zeros(2)}, "not an ftcnn checkpoint"),
        ("no tensors", {"state_dict": None}, "no tensor table"),
        ("tensor a number", {"state_dict": {**state, name: 3}}, "not a plain dense tensor"),
        ("tensor complex", {"state_dict": {**state, name: state[name].to(torch.complex64)}}, "not a plain dense"),
        ("tensor sparse", {"state_dict": {**state, name: state[name].to_sparse()}}, "not a plain dense"),
        ("tensor expanded", {"state_dict": {**state, name: torch.zeros(1).expand(state[name].shape)}},
         "claims more values"),
        ("tensors share one storage", {"state_dict": {k: shared[:t.numel()].view(t.shape) for k, t in state.items()}},
         "the file holds"),
        ("tensor missing", {"state_dict": {k: t for k, t in state.items() if k != name}}, "missing 'features.0"),
        ("tensor extra", {"state_dict": {**state, "extra": torch.zeros(1)}}, "unexpected 'extra'"),
        ("tensor reshaped", {"state_dict": {**state, name: state[name].reshape(-1)}}, "in the file but"),
        ("tensor integer", {"state_dict": {**state, name: state[name].long()}}, "torch.int64 in the file"),
    ]


def test_malformed_blob_is_one_line(seeds, tmp_path) -> None:
    base = raw(seeds[0])
    for case, fields, message in _bad_blobs(base, tmp_path):
        path = forge(tmp_path / "bad.pt", base, **fields)
        with pytest.raises(CheckpointError) as info:
            ftcnn.load(path)
        assert message in str(info.value), (case, str(info.value))
        assert_one_line(str(info.value))


def test_truncated_and_swapped_files(seeds, tmp_path) -> None:
    data = seeds[2].read_bytes()
    for cut in (0, 10, len(data) // 3, len(data) - 30):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as info:
            ftcnn.load(tmp_path / "cut.pt")
        assert_one_line(str(info.value))
    names = zipfile.ZipFile(seeds[2]).namelist()
    pkl = next(n for n in names if n.endswith("data.pkl"))
    storages = [n for n in names if "/data/" in n]

    def swap(a: str, b: str) -> Callable[[dict], None]:
        def change(m: dict[str, bytes]) -> None:
            m[a], m[b] = m[b], m[a]
        return change

    sizes = {n: len(zipfile.ZipFile(seeds[2]).read(n)) for n in storages}
    unequal = next((a, b) for a in storages for b in storages if sizes[a] != sizes[b])
    for a, b in ((pkl, storages[0]), unequal):
        with pytest.raises(CheckpointError) as info:
            ftcnn.load(rezip(seeds[2], tmp_path / "swap.pt", swap(a, b)))
        assert_one_line(str(info.value))
    # the hardened model's channel index is an int64 buffer: garbage there is refused after loading
    index_key = next(k for k in raw(seeds[2])["state_dict"] if k.endswith("correction.index"))
    base = raw(seeds[2])
    state = dict(base["state_dict"])
    state[index_key] = state[index_key] + 999
    with pytest.raises(CheckpointError, match="protected channel indices"):
        ftcnn.load(forge(tmp_path / "index.pt", base, state_dict=state))


# --- memory: refused before allocating, checked in a bounded subprocess ---------------------

def memory_cases_main(folder: str) -> None:
    """Run in a subprocess under RLIMIT_AS: each huge-allocation forgery's outcome as JSON."""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
    out = Path(folder)
    base = raw(seed_checkpoints(out)[0])
    pruned = raw(out / "pruned.pt")
    spec = spec_of(base)
    cases = {
        "lenet5 input_size 200000": {**spec, "kwargs": {**spec["kwargs"], "input_size": 200_000}},
        "lenet5 input_size 100000": {**spec, "kwargs": {**spec["kwargs"], "input_size": 100_000}},
        "lenet5 width 3e5": {**spec, "kwargs": {**spec["kwargs"], "width": 3e5}},
        "lenet5 width 1000": {**spec, "kwargs": {**spec["kwargs"], "width": 1000}},
        "resnet50 everything at its bound": {"builder": "resnet50", "kwargs": {
            "num_classes": 1_000_000, "in_channels": 10_000, "input_size": 100_000, "width": 1000}},
    }
    prune_spec = spec_of(pruned)
    prune_spec["transforms"][0]["input_shape"] = [1, 200_000, 200_000]
    results = {}
    for name, forged in [*cases.items(), ("prune input_shape [1,200000,200000]", prune_spec)]:
        src = pruned if name.startswith("prune") else base
        try:
            ftcnn.load(forge(out / "big.pt", src, spec=forged))
            results[name] = "loaded"
        except Exception as exc:  # the test judges the type
            results[name] = f"{type(exc).__name__}: {exc}"
    results["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(json.dumps(results))


def _bounded(function: str, *args: Any, timeout: int = 300) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_hostile_checkpoints as t; "
            f"t.{function}(*{args!r})")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


FUZZ_COUNT = 200  # seeded mutations in the default suite; the slow test runs 2,000 with another seed


def bounded_main(folder: str, count: int, seed: int) -> None:
    """Both bounded checks in one subprocess (one interpreter start, not two): the memory cases'
    JSON line, then the fuzzer's."""
    memory_cases_main(str(Path(folder) / "sizes"))  # not "memory": its outcomes must not say the word
    fuzz_main(str(Path(folder) / "fuzz"), count, seed)


@pytest.fixture(scope="module")
def bounded(tmp_path_factory) -> dict[str, Any]:
    """The outcomes of ``bounded_main`` (``memory``, ``fuzz``) and the folder it worked in."""
    folder = tmp_path_factory.mktemp("bounded")
    for sub in ("sizes", "fuzz"):
        (folder / sub).mkdir()
    r = _bounded("bounded_main", str(folder), FUZZ_COUNT, 0)
    assert r.returncode == 0, r.stderr[-3000:]
    blobs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    memory = next(b for b in blobs if "tally" not in b)
    fuzz = next(b for b in blobs if "tally" in b)
    return {"memory": memory, "fuzz": fuzz, "folder": folder}


def test_huge_architectures_are_refused_before_allocating(bounded) -> None:
    results = dict(bounded["memory"])
    assert results.pop("max_rss_mb") < 1500
    for name, outcome in results.items():
        assert outcome.startswith("CheckpointError: "), (name, outcome)
        assert_one_line(outcome)
        assert not re.search(r"alloc|memory", outcome, re.I), (name, outcome)


# --- fuzzer ----------------------------------------------------------------------------------

def _hostile_values(rng: random.Random, marker: Path, folder: Path) -> list[Any]:
    return [None, True, False, 0, -1, 1, 3, 2 ** 31, 2 ** 63, 10 ** 30, 1e308, -1e308, float("nan"),
            float("inf"), -float("inf"), 0.5, 200_000, 3e5, -0.0, "", "x" * 5000, "os:system",
            "subprocess:run", "evil_nets:net", f"cifar10:{folder / 'cifar'}", f"npz:{folder}/x.npz", "lenet5",
            "resnet50", "harden", "prune", "features.0", "__class__", f"touch {marker}", [], {},
            [1, 200_000, 200_000], [["features.0", True, [999]]], {"kind": "harden"}, {"kind": "prune"},
            ["touch", str(marker)], [rng.randint(-5, 50) for _ in range(rng.randint(1, 5))],
            {"features.0": [rng.randint(-2, 9)]}, "__DEEP__"]


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _mutate_json(obj: Any, rng: random.Random, marker: Path, folder: Path) -> str:
    """One structured mutation of a spec/meta JSON value, as JSON text."""
    obj = json.loads(json.dumps(obj))
    path = rng.choice(_paths(obj))
    op = rng.choice(["replace", "replace", "replace", "add_key", "delete", "wrap", "number", "payload"])
    value = rng.choice(_hostile_values(rng, marker, folder))
    if op == "payload" and isinstance(obj, dict) and "builder" in obj:
        builder, kwargs = rng.choice(payloads(marker) + [("evil_nets:net", {})])
        obj["builder"], obj["kwargs"] = builder, kwargs
    elif not path:
        obj = value if op == "replace" else [obj] if op == "wrap" else obj
    else:
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        key, old = path[-1], parent[path[-1]]
        if op == "add_key" and isinstance(old, dict):
            old[rng.choice(["command", "args", "unknown", "kind", "depth", "x" * 40])] = value
        elif op == "delete":
            del parent[key]
        elif op == "wrap":
            parent[key] = rng.choice([[old], {"value": old}])
        elif op == "number" and isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[key] = rng.choice([old + 1, old - 1, -old, old * 1000, old * 10 ** 6, float(old)])
        else:
            parent[key] = value
    depth = rng.choice([5, 100, 5000])
    return json.dumps(obj).replace('"__DEEP__"', "[" * depth + "]" * depth)


def _mutate_file(path: Path, other: Path, out: Path, rng: random.Random) -> Path:
    """Truncate, or swap/replace zip members."""
    data = path.read_bytes()
    op = rng.choice(["truncate", "swap", "foreign", "noise"])
    if op == "truncate":
        out.write_bytes(data[:rng.randrange(len(data))])
        return out
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    with zipfile.ZipFile(other) as z:
        foreign = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}

    def change(m: dict[str, bytes]) -> None:
        a, b = rng.sample(names, 2)
        if op == "swap":
            m[a], m[b] = m[b], m[a]
        elif op == "foreign" and a.split("/", 1)[1] in foreign:
            m[a] = foreign[a.split("/", 1)[1]]
        else:
            m[a] = bytes(rng.randrange(256) for _ in range(len(m[a])))
    return rezip(path, out, change)


def _mutate_tensors(base: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    state = dict(base["state_dict"])
    key = rng.choice(sorted(state))
    t = state[key]
    op = rng.choice(["drop", "add", "expand", "share", "dtype", "nontensor", "reshape"])
    if op == "drop":
        del state[key]
    elif op == "add":
        state[key + ".x"] = torch.zeros(rng.randint(1, 10))
    elif op == "expand":
        state[key] = torch.zeros(1, dtype=t.dtype).expand(t.shape)
    elif op == "share":
        shared = torch.zeros(max(v.numel() for v in state.values()))
        state = {k: shared[:v.numel()].view(v.shape) if v.is_floating_point() else v for k, v in state.items()}
    elif op == "dtype":
        state[key] = t.to(rng.choice([torch.complex64, torch.bool, torch.int64, torch.float16, torch.uint8]))
    elif op == "nontensor":
        state[key] = rng.choice([1, "x", [1, 2], None])
    else:
        state[key] = t.reshape(-1) if t.dim() != 1 else t.reshape(1, -1)
    return {**base, "state_dict": state}


def _judge(path: Path) -> tuple[str, str | None]:
    """'loaded' (checked to be the file's tensors and to run) or 'refused'; or a failure."""
    try:
        model = ftcnn.load(path)
    except ValueError as exc:
        message = str(exc)
        if not message or "\n" in message or len(message) > 600:
            return "failed", f"not one line: {message[:300]!r}"
        if re.search(r"alloc|memory", message, re.I):
            return "failed", f"tried to allocate: {message[:300]}"
        return "refused", None
    except Exception as exc:  # the CLI would print a traceback
        return "failed", f"{type(exc).__name__}: {str(exc)[:300]}"
    blob = checkpoint.read(path)
    for k, t in model.state_dict().items():
        stored = blob["state_dict"][k]
        if not torch.equal(torch.nan_to_num(t.double()), torch.nan_to_num(stored.double())):
            return "failed", f"loaded {k} differs from the file"
    try:
        with torch.no_grad():
            model(torch.zeros(2, *SHAPE))
    except Exception as exc:
        return "failed", f"loaded but does not run: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        spec = cli._data_spec(None, checkpoint.meta(model))
        if spec not in ("digits", "mnist5k"):
            return "failed", f"data spec {spec!r} taken from the file"
    except ValueError as exc:
        if "\n" in str(exc):
            return "failed", "data spec error not one line"
    return "loaded", None


def fuzz_main(folder: str, count: int, seed: int) -> None:
    """Run in a subprocess under RLIMIT_AS: ``count`` seeded mutations of valid
    checkpoints, each judged; prints the tally and the failures as JSON."""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
    out = Path(folder)
    marker = out / "PWNED"
    evil_module(out, marker)
    sys.path.insert(0, str(out))  # a shipped module would be importable, were anything imported
    poisoned_cifar(out, marker)
    seeds = seed_checkpoints(out)
    bases = [raw(p) for p in seeds]
    rng = random.Random(seed)
    tally: Counter = Counter()
    failures = []
    for i in range(count):
        k = rng.randrange(len(seeds))
        base, target = bases[k], out / f"fuzz{i}.pt"
        kind = rng.choice(["spec"] * 5 + ["meta"] * 2 + ["file"] * 2 + ["tensors"] * 2)
        if kind == "spec":
            forge(target, base, spec=_mutate_json(spec_of(base), rng, marker, out))
        elif kind == "meta":
            forge(target, base, meta=_mutate_json(json.loads(base["meta"]), rng, marker, out))
        elif kind == "file":
            _mutate_file(seeds[k], seeds[rng.randrange(len(seeds))], target, rng)
        else:
            torch.save(_mutate_tensors(base, rng), target)
        outcome, why = _judge(target)
        tally[f"{kind} {outcome}"] += 1
        if why:
            failures.append(f"#{i} {kind} on {seeds[k].name}: {why}")
        target.unlink()
    tally_out = dict(tally)
    tally_out["marker"] = marker.exists()
    tally_out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(json.dumps({"tally": tally_out, "failures": failures[:20]}))


def _check_fuzz(report: dict[str, Any], count: int, folder: Path) -> None:
    tally = dict(report["tally"])
    assert not report["failures"], report["failures"]
    assert tally.pop("marker") is False
    assert tally.pop("max_rss_mb") < 1500
    assert sum(tally.values()) == count
    refused = sum(v for k, v in tally.items() if k.endswith("refused"))
    loaded = sum(v for k, v in tally.items() if k.endswith("loaded"))
    assert refused > count // 2 and loaded > count // 40, tally  # both outcomes are exercised
    assert not (folder / "PWNED").exists()


def test_fuzzed_checkpoints_refuse_cleanly_or_load_correctly(bounded) -> None:
    _check_fuzz(bounded["fuzz"], FUZZ_COUNT, bounded["folder"] / "fuzz")


@pytest.mark.slow
def test_fuzzed_checkpoints_at_length(tmp_path) -> None:
    """The long reference: 2,000 mutations (another seed) in a bounded subprocess of their own."""
    r = _bounded("fuzz_main", str(tmp_path), 2000, 1, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_fuzz(json.loads(r.stdout.strip().splitlines()[-1]), 2000, tmp_path)


# --- the CLI: one error line, exit 2, nothing run -------------------------------------------





CLI_COMMANDS = {
    "inject": ["inject", "{ckpt}", "--ber", "1e-3", "--trials", "1", "-o", "{out}/run"],
    "harden": ["harden", "{ckpt}", "--tmr", "full", "-o", "{out}/h.pt"],
    "compare": ["compare", "{ckpt}", "--trials", "1", "-o", "{out}/cmp"],
    "prune": ["prune", "{ckpt}", "--criterion", "l1", "-o", "{out}/p.pt"],
    "pipeline": ["pipeline", "{ckpt}", "-o", "{out}/pipe"],
    "analyze": ["analyze", "{ckpt}", "--method", "l1", "-o", "{out}/s.json"],
    "report": ["report", "{out}"],
}


@pytest.mark.parametrize("command", sorted(CLI_COMMANDS))
def test_cli_on_os_system_checkpoint_runs_nothing(seeds, tmp_path, marker, command, monkeypatch, capsys) -> None:
    forge(tmp_path / "model.pt", raw(seeds[0]),
          spec={"builder": "os:system", "kwargs": {"command": f"touch {marker}"}, "transforms": []})
    args = [a.format(ckpt=tmp_path / "model.pt", out=tmp_path) for a in CLI_COMMANDS[command]]
    before = set(tmp_path.iterdir())
    r = cli_in_process(monkeypatch, capsys, *args)
    assert_one_line_refusal(r, "holds no summary.json" if command == "report" else "not one of ftcnn's models")
    assert set(tmp_path.iterdir()) == before  # refused before writing anything, folders included


def test_cli_model_option_is_the_opt_in(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    ftcnn.save(ftcnn.build("user_models:tiny", num_classes=10, in_channels=1, input_size=8), tmp_path / "u.pt",
               data="digits")
    out = str(tmp_path / "s.json")
    analyze = ["analyze", str(tmp_path / "u.pt"), "--method", "l1", "-o", out]
    assert_one_line_refusal(cli_in_process(monkeypatch, capsys, *analyze), "--model user_models:tiny")
    assert_one_line_refusal(cli_in_process(monkeypatch, capsys, *analyze, "--model", "user_models:other"), "as named")
    assert_one_line_refusal(cli_in_process(monkeypatch, capsys, "harden", str(tmp_path / "u.pt"), "--model", "lenet5",
                             "--tmr", "full", "-o", str(tmp_path / "h.pt")), "as named")
    r = cli_in_process(monkeypatch, capsys, *analyze, "--model", "user_models:tiny")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(Path(out).read_text())["layers"]
