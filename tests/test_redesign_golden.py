"""The redesign keeps every number (issue 11): a fixed set of CLI commands — train LeNet-5 on the
digits with a seed, score it, inject at two BERs, harden with restriction (and with duplication),
compare a small subset of variants — must give byte-identical numbers before and after.

``tests/data/redesign_golden.json`` was written by this test on the pre-redesign commit
(1ec721c) with ``FTCNN_WRITE_GOLDEN=1``; afterwards it is only read. Timings, paths, versions
and digests of code are dropped; every other number (accuracies, CIs, scores, MACs,
parameter counts, the protected model's tensor digest) is compared exactly.

Float results differ across CPUs (AVX2 vs AVX-512 kernels round differently), so training on
another machine gives other bits and everything downstream follows. The golden file therefore
records the platform that wrote it (``platform_key``): on that platform every number is compared
exactly; on any other one the comparison keeps what does not depend on float rounding (the
same keys, the same JSON types, and the settings and architecture, which are exact everywhere)
and says that the exact check ran elsewhere. The activation and ``--precision`` campaigns were
added (issue 20) from the commit before the fault-space work (73bfb14).
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import pytest

from _helpers import run_cli as _run_cli


def run_cli(*args: str, threads: str | None = None):
    """In this process (nine subprocesses cost ~20 s of imports): ``run_cli`` restores the RNG
    states, threads and environment around each command, and the numbers are compared bit for
    bit, so any dependence on the state of the test process fails this test."""
    return _run_cli(*args, threads=threads)


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


# leaves that do not depend on float rounding: settings, the architecture and what it costs
PORTABLE = re.compile(r"/(config|settings|spec|architecture)/|/overheads/original/"
                      r"|^/(data|method|format|kind|model_name|inputs|seed|epochs|lr|batch_size)$")


def platform_key() -> str:
    """What decides the bits of a float result here: architecture, CPU vendor, the instruction set
    torch dispatches to, and torch's version."""
    import torch

    vendor = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("vendor_id", "CPU implementer")):
                    vendor = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{platform.machine()}/{vendor}/{torch.backends.cpu.get_cpu_capability()}"
            f"/torch {torch.__version__.split('+')[0]}")


def differences(golden: dict, observed: dict, same_platform: bool) -> dict[str, dict]:
    """Per part, the leaves that differ: every leaf on the recording platform; elsewhere only the
    key set, the JSON types and the ``PORTABLE`` leaves."""
    out: dict[str, dict] = {}
    for part, want in golden.items():
        want = {renamed(part, k): v for k, v in want.items()}
        got = observed.get(part, {})
        diff: dict[str, object] = {}
        if set(want) != set(got):
            diff["<keys>"] = (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
        for key in set(want) & set(got):
            a, b = want[key], got[key]
            if same_platform or PORTABLE.search(key):
                if json.dumps(a) != json.dumps(b):
                    diff[key] = (a, b)
            elif type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                                 and not isinstance(a, bool) and not isinstance(b, bool)):
                diff[key] = (a, b)
        if diff:
            out[part] = dict(list(sorted(diff.items()))[:8])
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
    _ok(run_cli("inject", str(model), "--target", "activations", "--ber", "1e-3", "--trials", "4", "--seed", "4",
                "-o", str(d / "inj_activations"), threads=t))
    _ok(run_cli("inject", str(model), "--ber", "1e-4", "--precision", "0.05", "--seed", "5",
                "-o", str(d / "inj_precision"), threads=t))
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
        "inject_activations": numbers(json.loads((d / "inj_activations" / "summary.json").read_text())),
        "inject_precision": numbers(json.loads((d / "inj_precision" / "summary.json").read_text())),
    }


def test_numbers_are_byte_identical_to_the_pre_redesign_ones(observed) -> None:
    here = platform_key()
    if os.environ.get("FTCNN_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"platform": here, "parts": observed}, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    same = golden["platform"] == here
    diff = differences(golden["parts"], observed, same)
    assert not diff, diff
    if not same:
        print(f"golden numbers were written on {golden['platform']}; here ({here}) only the settings, "
              "architecture, keys and types were compared exactly")


def test_another_platform_compares_what_does_not_depend_on_rounding() -> None:
    """The rule for a machine other than the recording one, on the golden file itself: a float
    result may differ there, a setting, a cost of the architecture or the key set may not; on the
    recording platform every leaf counts."""
    parts = json.loads(GOLDEN.read_text())["parts"]
    elsewhere = json.loads(json.dumps(parts))
    elsewhere["inject"]["/results[0]/accuracy_mean"] += 0.01
    elsewhere["train"]["digest"] = "0" * 64
    assert differences(parts, elsewhere, same_platform=False) == {}
    assert set(differences(parts, elsewhere, same_platform=True)) == {"inject", "train"}
    for key, value in (("/config/seed", 7), ("/config/trials", 99)):
        changed = json.loads(json.dumps(parts))
        changed["inject"][key] = value
        assert "inject" in differences(parts, changed, same_platform=False), key
    missing = json.loads(json.dumps(parts))
    del missing["gain"]["/method"]
    assert "gain" in differences(parts, missing, same_platform=False)
    retyped = json.loads(json.dumps(parts))
    retyped["compare"]["/variants[0]/clean_accuracy"] = "0.47"
    assert "compare" in differences(parts, retyped, same_platform=False)


def test_the_golden_file_holds_the_numbers_that_matter() -> None:
    """The comparison above is only as strong as what it compares: accuracies under faults and
    their CIs, scores, the protected models' tensors, and the comparison's rows."""
    golden = json.loads(GOLDEN.read_text())["parts"]
    for part in ("inject", "inject_hardened", "inject_activations", "inject_precision"):
        assert sum("accuracy" in k for k in golden[part]) >= 4, part
        assert any(k.endswith("accuracy_ci[0]") for k in golden[part]), part
    assert sum(k.startswith("/layers/") for k in golden["gain"]) > 100
    for part in ("train", "restricted", "hardened"):
        assert len(golden[part]["digest"]) == 64
    assert sum("/variants[" in k and "accuracy" in k for k in golden["compare"]) >= 8
    assert not any(v in k.lower() for part in golden.values() for k in part for v in ("seconds", "latency"))
