"""The redesign keeps every number (issue 11): a fixed set of CLI commands — train LeNet-5 on the
digits with a seed, score it, inject at two BERs, harden with restriction (and with duplication),
compare a small subset of variants — must give byte-identical numbers before and after.

``tests/data/redesign_golden.json`` was written by this test on the pre-redesign commit
(1ec721c) with ``FTCNN_WRITE_GOLDEN=1``; afterwards it is only read. Timings, paths, versions
and digests of code are dropped; every other number (accuracies, CIs, scores, MACs,
parameter counts, the protected model's tensor digest) is compared exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from _helpers import run_cli

GOLDEN = Path(__file__).parent / "data" / "redesign_golden.json"
# keys whose values depend on the machine, the clock or the file system, not on the numbers
VOLATILE = ("seconds", "latency", "time", "version", "path", "checkpoint", "created", "host", "platform",
            "python", "torch", "numpy", "elapsed", "output", "started", "finished", "threads", "cpu",
            "command", "argv", "cwd")


# JSON keys the redesign renamed on purpose (one name per idea, issue 11), per part: old path -> new.
# Only names may change this way; every value is still compared exactly. `margin` meant three things:
# a CI half-width (inject), a range widening (harden, compare) and Leveugle's margin (analyze fi).
RENAMED: dict[str, dict[str, str]] = {
    "restricted": {"/hardening/margin": "/hardening/range_margin"},  # `ftcnn harden`'s record
    "hardened": {"/hardening/margin": "/hardening/range_margin"},
    "inject": {"/config/margin": "/config/ci_half_width"},
    "inject_hardened": {"/config/margin": "/config/ci_half_width"},  # the checkpoint's transform keeps "margin"
    "compare": {"/config/margin": "/config/range_margin"},
}


def renamed(part: str, key: str) -> str:
    return RENAMED.get(part, {}).get(key, key)


def numbers(blob, prefix: str = "") -> dict[str, object]:
    """Every leaf of a JSON blob keyed by its path, minus the volatile ones."""
    out: dict[str, object] = {}
    if isinstance(blob, dict):
        for key, value in blob.items():
            if any(v in str(key).lower() for v in VOLATILE):
                continue
            out.update(numbers(value, f"{prefix}/{key}"))
    elif isinstance(blob, list):
        for i, value in enumerate(blob):
            out.update(numbers(value, f"{prefix}[{i}]"))
    elif isinstance(blob, str) and "/" in blob and Path(blob).is_absolute():
        out[prefix] = Path(blob).name  # a run folder's file: its name, not where pytest put it
    else:
        out[prefix] = blob
    return out


def _ok(r) -> None:
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict[str, dict]:
    d = tmp_path_factory.mktemp("golden")
    t = "1"
    model = d / "lenet.pt"
    _ok(run_cli("train", "--model", "lenet5", "--data", "digits", "--epochs", "2", "--seed", "3",
                "-o", str(model), threads=t))
    _ok(run_cli("analyze", str(model), "--method", "gain", "--samples", "64", "-o", str(d / "gain.json"),
                threads=t))
    _ok(run_cli("inject", str(model), "--ber", "1e-5", "1e-3", "--trials", "6", "--seed", "1",
                "-o", str(d / "inj"), threads=t))
    _ok(run_cli("harden", str(model), "--ratio", "0", "--restrict", "zero", "--margin", "0.1",
                "-o", str(d / "restricted.pt"), threads=t))
    _ok(run_cli("harden", str(model), "--scores", str(d / "gain.json"), "--ratio", "0.2", "--correction", "min",
                "--restrict", "clamp", "-o", str(d / "hardened.pt"), threads=t))
    _ok(run_cli("inject", str(d / "hardened.pt"), "--ber", "1e-4", "--trials", "5", "--seed", "2",
                "-o", str(d / "inj_hardened"), threads=t))
    _ok(run_cli("compare", str(model), "--variants", "baseline,restrict,weights,harden_min",
                "--ber", "1e-5", "1e-4", "--trials", "3", "--bit-trials", "1", "--bits", "30", "31",
                "-o", str(d / "cmp"), threads=t))
    import torch

    from ftcnn import checkpoint, fingerprint

    def model_numbers(path: Path) -> dict:
        net = checkpoint.load(path)
        return {"digest": fingerprint.model_digest(net), **numbers(checkpoint.meta(net))}

    return {
        "train": model_numbers(model),
        "gain": numbers(json.loads((d / "gain.json").read_text())),
        "inject": numbers(json.loads((d / "inj" / "summary.json").read_text())),
        "restricted": model_numbers(d / "restricted.pt"),
        "hardened": model_numbers(d / "hardened.pt"),
        "inject_hardened": numbers(json.loads((d / "inj_hardened" / "summary.json").read_text())),
        "compare": numbers(json.loads((d / "cmp" / "summary.json").read_text())),
        "torch": {"version": torch.__version__},
    }


def test_numbers_are_byte_identical_to_the_pre_redesign_ones(observed) -> None:
    if os.environ.get("FTCNN_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(observed, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    if golden["torch"]["version"] != observed["torch"]["version"]:
        pytest.skip(f"golden numbers were recorded with torch {golden['torch']['version']}")
    for part in golden:
        golden[part] = {renamed(part, k): v for k, v in golden[part].items()}
        assert set(observed[part]) == set(golden[part]), part
        diff = {k: (golden[part][k], observed[part][k]) for k in golden[part]
                if json.dumps(golden[part][k]) != json.dumps(observed[part][k])}
        assert not diff, f"{part}: {dict(list(diff.items())[:8])}"


def test_the_golden_file_holds_the_numbers_that_matter() -> None:
    """The comparison above is only as strong as what it compares: accuracies under faults and
    their CIs, scores, the protected models' tensors, and the comparison's rows."""
    golden = json.loads(GOLDEN.read_text())
    for part in ("inject", "inject_hardened"):
        assert sum("accuracy" in k for k in golden[part]) >= 4, part
        assert any(k.endswith("accuracy_ci[0]") for k in golden[part]), part
    assert sum(k.startswith("/layers/") for k in golden["gain"]) > 100
    for part in ("train", "restricted", "hardened"):
        assert len(golden[part]["digest"]) == 64
    assert sum("/variants[" in k and "accuracy" in k for k in golden["compare"]) >= 8
    assert not any(v in k.lower() for part in golden.values() for k in part for v in ("seconds", "latency"))
