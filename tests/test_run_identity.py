"""A run folder's identity is its content (issue 10, items 4, 5 and 9; design §8).

Each test is built as the issue's reproduction: a checkpoint retrained into the
same path, data regenerated under the same name, a comparison rerun with
another --harden-ratio, two processes racing on one new folder.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ftcnn
from ftcnn import data, fingerprint, train
from ftcnn.campaigns import campaign as C
from ftcnn.flows import compare
from _helpers import run_cli


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr  # no traceback
    return lines[0]


def _digits_lenet(seed: int, epochs: int = 1) -> nn.Module:
    train.seed_everything(seed)
    model = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.5)
    train.fit(model, data.load("digits", "train"), epochs=epochs, seed=seed, progress=False)
    return model.eval()


# --- fingerprints -----------------------------------------------------------------

def test_digests_see_every_bit_and_are_fast() -> None:
    model = ftcnn.build("vgg11", num_classes=10, in_channels=3, input_size=32)
    start = time.perf_counter()
    digest = fingerprint.model_digest(model)
    assert time.perf_counter() - start < 1.0
    assert fingerprint.model_digest(model) == digest  # deterministic
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_var[0] = torch.nextafter(bn.running_var[0], torch.tensor(2.0))  # a buffer, one ulp
    assert fingerprint.model_digest(model) != digest
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    assert fingerprint.data_digest(x, y) != fingerprint.data_digest(x.reshape(4, 1, 1, 4), y)  # shape
    assert fingerprint.data_digest(x, y) != fingerprint.data_digest(x.double(), y)  # dtype
    assert fingerprint.data_digest(x, y) != fingerprint.data_digest(x, y + 1)  # labels


# --- inject: retrained model, regenerated data ----------------------------------

def test_inject_refuses_a_model_retrained_into_the_same_path(tmp_path) -> None:
    ckpt, out = tmp_path / "lenet.pt", tmp_path / "run"
    original = _digits_lenet(seed=0)
    ftcnn.save(original, ckpt, data="digits")
    args = ("inject", str(ckpt), "--ber", "1e-3", "--trials", "2", "-o", str(out))
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    first = json.loads((out / "summary.json").read_text())
    ftcnn.save(_digits_lenet(seed=1), ckpt, data="digits")  # retrained: same path, same architecture
    line = _one_error_line(run_cli(*args))
    assert "other model" in line and "tensor digest" in line and "use another output folder" in line, line
    assert json.loads((out / "summary.json").read_text()) == first  # nothing mixed in
    assert first["digests"]["model"] == fingerprint.model_digest(original)  # recorded in the summary
    x, y = C.stack_dataset(data.load("digits", "test"))
    assert first["digests"]["data"] == fingerprint.data_digest(x, y)


def test_inject_refuses_other_data_under_the_same_name(tmp_path) -> None:
    """As `ftcnn inject --data npz:PATH` runs it (same record), with the file regenerated in between."""
    npz, out = tmp_path / "set.npz", tmp_path / "run"
    model, rng = _digits_lenet(seed=0), np.random.default_rng(0)
    config = C.CampaignConfig(bers=(1e-3,), trials=2)
    for i in range(2):
        np.savez(npz, x=rng.integers(0, 16, (60, 8, 8)).astype(np.float32), y=np.arange(60) % 10)
        data._source.cache_clear(), data._split.cache_clear()  # as a new process, read the file anew
        x, y = C.stack_dataset(data.load(f"npz:{npz}", "test"))
        record = {"checkpoint": "lenet.pt", "data": f"npz:{npz}", "inputs": len(x),
                  "architecture": ftcnn.checkpoint.get_spec(model)}
        if i == 0:
            C.run_campaign(model, x, y, config, out, record=record, progress=False)
    with pytest.raises(ValueError, match=r"holds a different campaign: other data \(digest \w+ in the folder, "
                                         r"\w+ given\); use another output folder$"):
        C.run_campaign(model, x, y, config, out, record=record, progress=False)


def test_config_differences_are_named(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 10, (8,))
    C.run_campaign(model, x, y, C.CampaignConfig(bers=(1e-2,), trials=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different campaign: other settings: dtype float32 in the folder, "
                                         r"float16 given, seed 0 in the folder, 5 given"):
        C.run_campaign(model, x, y, C.CampaignConfig(bers=(1e-2,), trials=2, seed=5, dtype="float16"),
                       tmp_path, progress=False)


# --- compare: pieces keyed by their inputs --------------------------------------

def test_compare_rerun_with_another_harden_ratio_recomputes_the_hardened_variant(tmp_path, capsys) -> None:
    model = _digits_lenet(seed=0)
    out = tmp_path / "cmp"
    base = dict(bers=(1e-3,), trials=2, bit_trials=1, bits=(30,), score_samples=16, latency_repeats=1,
                finetune_epochs=0, variants=("baseline", "restrict", "harden_min"))
    compare.run_compare(model, "digits", out, compare.CompareConfig(harden_ratio=0.1, **base))
    capsys.readouterr()
    scores_mtime = (out / "scores.json").stat().st_mtime_ns
    restrict_mtime = (out / "models" / "restrict.pt").stat().st_mtime_ns

    summary = compare.run_compare(model, "digits", out, compare.CompareConfig(harden_ratio=0.5, **base))
    log = capsys.readouterr().err
    assert "recomputing harden_min: harden_ratio changed" in log, log
    assert "recomputing campaign of harden_min: other model" in log, log
    assert "recomputing bit sensitivity of harden_min" in log, log
    assert "recomputing costs" in log
    recomputed = [line for line in log.splitlines() if "recomputing" in line]
    assert all("harden_min" in line or "costs" in line for line in recomputed), recomputed  # exactly those
    assert (out / "scores.json").stat().st_mtime_ns == scores_mtime
    assert (out / "models" / "restrict.pt").stat().st_mtime_ns == restrict_mtime

    hardened = ftcnn.load(out / "models" / "harden_min.pt")  # the model now protects 50%
    assert ftcnn.checkpoint.get_spec(hardened)["transforms"][-1]["ratio"] == 0.5
    row = next(v for v in summary["variants"] if v["name"] == "harden_min")
    assert "50%" in row["description"]
    db = sqlite3.connect(out / "campaigns" / "harden_min" / C.DB_NAME)
    stored = json.loads(db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()[0])
    assert stored["model"] == fingerprint.model_digest(hardened)
    assert row["cost"]["params"] == ftcnn.protection.cost.parameters(hardened)

    again = compare.run_compare(model, "digits", out, compare.CompareConfig(harden_ratio=0.5, **base))
    assert "recomputing" not in capsys.readouterr().err  # everything current now
    assert [v["results"] for v in again["variants"]] == [v["results"] for v in summary["variants"]]


# --- two processes racing on one new folder --------------------------------------

ROUNDS = 4


class _SlowDiskConnection(sqlite3.Connection):
    """Every statement takes a while, as on a slow or network disk: two processes
    that start together then interleave their statements (without it the window
    is a millisecond wide and the old check-then-insert lost only 1 round in 50)."""

    def execute(self, *args, **kwargs):  # type: ignore[override]
        cursor = super().execute(*args, **kwargs)
        time.sleep(0.02)
        return cursor


def _race_worker(folder: str, seeds: list[int], barrier, results) -> None:
    """Start campaigns on fresh folders in step with the other process."""
    import functools

    import torch

    torch.set_num_threads(1)
    sqlite3.connect = functools.partial(sqlite3.connect, factory=_SlowDiskConnection)  # this process only
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    x, y = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    for k, seed in enumerate(seeds):
        barrier.wait(timeout=120)
        try:
            C.run_campaign(model, x, y, C.CampaignConfig(bers=(1e-2,), trials=2, seed=seed),
                           Path(folder) / f"r{k}", progress=False)
            results.put((k, seed, "ok"))
        except ValueError as exc:
            results.put((k, seed, "refused: " + str(exc)))
        except BaseException as exc:  # noqa: BLE001 - the test reports what went wrong
            results.put((k, seed, f"crashed: {type(exc).__name__}: {exc}"))


def test_two_processes_racing_on_one_folder(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    same = [0] * ROUNDS                                  # the same campaign: both may run it
    other = [k % 2 for k in range(ROUNDS)]               # every other round, a different one
    procs = [ctx.Process(target=_race_worker, args=(str(tmp_path), s, barrier, results))
             for s in (same, other)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in range(2 * ROUNDS)]
    for p in procs:
        p.join(timeout=60)
    crashed = [o for o in outcomes if o[2].startswith("crashed")]
    assert not crashed, crashed
    for k in range(ROUNDS):
        pair = [o for o in outcomes if o[0] == k]
        if pair[0][1] == pair[1][1]:  # identical campaigns: both run (one resumes the other's)
            assert all(o[2] == "ok" for o in pair), pair
        else:  # different ones: one wins, the other refuses in one line
            assert sorted(o[2][:7] for o in pair) == ["ok", "refused"], pair
            refusal = next(o[2] for o in pair if o[2].startswith("refused"))
            assert "different campaign: other settings: seed" in refusal and "\n" not in refusal
