"""A run folder is untrusted input (issue 19, item 2; design §8): ``ftcnn report`` escapes every
value it writes into HTML, forbids scripts it did not write (Content-Security-Policy), and
refuses a malformed summary.json, report_data.json, scores.json or edited trial row in one
``error:`` line naming the file and the field, never a traceback or a half-written page.

One small comparison (2 variants, 2 BERs, 2 trials, untrained LeNet-5 on the 8x8 digits) is
built once; every case mutates a copy of it."""

from __future__ import annotations

import copy
import html
import json
import random
import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import pytest

import ftcnn
from ftcnn import readback, train
from ftcnn.flows import compare
from ftcnn.reporting import report

from _helpers import assert_one_line_refusal, cli_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

PAYLOADS = ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>')


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("hostile_cmp")
    _small_compare(out)
    return out


@pytest.fixture
def archived(compare_run: Path, tmp_path: Path) -> Path:
    """A copy without its SQLite files: the page comes from summary.json and report_data.json."""
    run = tmp_path / "run"
    shutil.copytree(compare_run, run)
    for db in run.rglob("results.sqlite*"):
        db.unlink()
    return run


def _existing_plots(summary, scores, folder: Path, trials=None) -> tuple[dict[str, Path], dict]:
    """The plots already in the folder, not redrawn (4 s a report): the page, its captions included,
    is what these cases check."""
    return {n: folder / f"{n}.png" for n in report.PLOTS if (folder / f"{n}.png").exists()}, {}


def _no_plots(summary, scores, folder: Path, trials=None) -> tuple[dict[str, Path], dict]:
    return {}, {}


@pytest.fixture
def fast_plots(monkeypatch) -> None:
    monkeypatch.setattr(report, "make_plots", _existing_plots)


def _report(run: Path) -> str | None:
    """``report.build_report`` as the CLI runs it: None when the page is written, the refusal's message
    when refused (a ValueError, which ``cli.main`` prints as one ``error:`` line); any other exception
    propagates and fails the test."""
    try:
        report.build_report(run)
    except ValueError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        return str(exc)
    return None


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def _write(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, allow_nan=True))  # bare NaN/Infinity as a hostile writer may


def _string_leaves(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """The path of every string in a JSON value (dict keys included, as ("key", path-to-dict, key))."""
    if isinstance(value, str):
        yield ("value", path)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield ("key", path + (k,))
            yield from _string_leaves(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _string_leaves(v, path + (i,))


def _replace(doc: Any, kind: str, path: tuple, new: str) -> Any:
    doc = copy.deepcopy(doc)
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    if kind == "value":
        parent[path[-1]] = new
    else:
        parent[new] = parent.pop(path[-1])
    return doc


def assert_only_escaped(page: str, payload: str) -> None:
    """``payload`` is on the page, only as text: escaped, and no tag it could have opened is there."""
    assert payload not in page and html.escape(payload) in page
    assert "<script" not in page and "<img src=x" not in page


# --- the reproductions of issue 19, item 2 ---------------------------------------------------------

@pytest.mark.parametrize("field, value, where", [
    ("variants", [1], "variants[0]"),
    ("report_ber", "x", "report_ber"),
    ("results", None, "variants[0].results"),
    ("name", 5, "variants[0].name"),
])
def test_malformed_summary_is_one_line_naming_file_and_field(archived, monkeypatch, capsys, field, value,
                                                             where) -> None:
    summary = _summary(archived)
    if field in ("results", "name"):
        summary["variants"][0][field] = value
    else:
        summary[field] = value
    _write(archived / "summary.json", summary)
    before = (archived / "report.html").read_bytes()
    r = cli_in_process(monkeypatch, capsys, "report", str(archived))
    assert_one_line_refusal(r, "summary.json")
    assert where in r.stderr
    assert (archived / "report.html").read_bytes() == before  # nothing half-written


def test_script_in_inputs_seed_and_repeats_is_refused_or_escaped(archived, monkeypatch, capsys,
                                                                  fast_plots) -> None:
    """Written verbatim before: inputs, config.seed, config.latency_repeats (the no-spread note)."""
    payload = PAYLOADS[0]
    summary = _summary(archived)
    summary["inputs"] = payload
    _write(archived / "summary.json", summary)
    r = cli_in_process(monkeypatch, capsys, "report", str(archived))
    assert_one_line_refusal(r, "summary.json: inputs must be an integer")
    summary["inputs"] = 359
    summary["config"]["seed"] = payload
    summary["config"]["latency_repeats"] = PAYLOADS[1]
    for v in summary["variants"]:
        v["cost"].pop("latency_b1_ms_iqr")  # the note that prints latency_repeats
    _write(archived / "summary.json", summary)
    r = cli_in_process(monkeypatch, capsys, "report", str(archived))
    assert r.returncode == 0, r.stderr
    page = (archived / "report.html").read_text()
    assert "records no spread" in page
    for p in PAYLOADS:
        assert_only_escaped(page, p)
    # the lead paragraph's seed, escaped where the page states it
    assert f"seed {html.escape(payload)}." in page


def test_page_forbids_scripts_it_did_not_write(compare_run: Path) -> None:
    page = (compare_run / "report.html").read_text()
    meta = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert meta and page.index(meta.group(0)) < page.index("<style>")  # before any content
    policy = dict(d.strip().split(" ", 1) for d in meta.group(1).split(";"))
    assert policy["default-src"] == "'none'" and "script-src" not in policy  # no script at all
    assert policy["img-src"] == "data:" and "<script" not in page
    assert page.count("data:image/png;base64,") == len(report.PLOTS)  # what it needs still loads


# --- a payload through every string of a real summary -----------------------------------------------

def test_payload_in_every_string_field_appears_only_escaped(archived, monkeypatch, capsys, fast_plots) -> None:
    """One string at a time (values and keys): the page holds it escaped, or the file is refused in
    one line naming that field (names that become folder names and plot labels)."""
    original = _summary(archived)
    leaves = list(_string_leaves(original))
    assert len(leaves) > 100
    refused = rendered = 0
    for i, (kind, path) in enumerate(leaves):
        payload = PAYLOADS[i % 2]
        _write(archived / "summary.json", _replace(original, kind, path, payload))
        refusal = _report(archived)
        if refusal is not None:
            assert "summary.json: " in refusal, refusal
            refused += 1
            continue
        page = (archived / "report.html").read_text()
        assert payload not in page, path
        rendered += 1
    assert rendered > refused > 0
    # variant names, config values and keys, descriptions, versions: the fields a page shows
    page_fields = [("value", ("variants", 1, "description")), ("value", ("model_name",)),
                   ("value", ("data",)), ("value", ("config", "restrict")), ("key", ("config", "restrict")),
                   ("value", ("versions", "torch")), ("value", ("variants", 0, "results", 0, "ci_method"))]
    for kind, path in page_fields:
        _write(archived / "summary.json", _replace(original, kind, path, PAYLOADS[0]))
        r = cli_in_process(monkeypatch, capsys, "report", str(archived))
        assert r.returncode == 0, r.stderr
        assert_only_escaped((archived / "report.html").read_text(), PAYLOADS[0])


def test_payload_everywhere_at_once(archived, monkeypatch, capsys, fast_plots) -> None:
    """Every string the schema leaves free holds a payload at once (names are refused: above)."""
    summary = _summary(archived)
    for kind, path in _string_leaves(_summary(archived)):
        if kind == "value" and path[-1] not in ("name", "label") and "spec" not in path:
            summary = _replace(summary, kind, path, PAYLOADS[len(path) % 2])
    # and settings the page formats as numbers (written unescaped before issue 19)
    summary["config"].update(seed=PAYLOADS[0], latency_repeats=PAYLOADS[1], bits=PAYLOADS[1])
    for v in summary["variants"]:
        v["cost"].pop("latency_b1_ms_iqr")  # the note that states latency_repeats
    _write(archived / "summary.json", summary)
    r = cli_in_process(monkeypatch, capsys, "report", str(archived))
    assert r.returncode == 0, r.stderr
    page = (archived / "report.html").read_text()
    for p in PAYLOADS:
        assert_only_escaped(page, p)
    assert (archived / "summary.csv").read_text().count(PAYLOADS[0]) == 0  # csv holds no free text field


# --- the other files the page is drawn from ------------------------------------------------------------

def test_malformed_report_data_and_scores_are_refused(archived, monkeypatch, capsys, fast_plots) -> None:
    data = json.loads((archived / report.REPORT_DATA).read_text())
    good = copy.deepcopy(data)
    data["campaigns"]["baseline"]["accuracy"]["0.0001"]["0"] = 7.5
    _write(archived / report.REPORT_DATA, data)
    r = cli_in_process(monkeypatch, capsys, "report", str(archived))
    assert_one_line_refusal(r, "report_data.json: campaigns.baseline.accuracy.0.0001.0 must be a number in [0, 1]")
    data = copy.deepcopy(good)
    data["bits"]["restrict"]["30"][0][0] = "$\\frac{<b>}$"  # a tensor name: a plot label, a folder-like name
    _write(archived / report.REPORT_DATA, data)
    assert_one_line_refusal(cli_in_process(monkeypatch, capsys, "report", str(archived)),
                            "report_data.json: bits.restrict.30[0][0]")
    (archived / report.REPORT_DATA).write_text("[" * 100_000)
    assert_one_line_refusal(cli_in_process(monkeypatch, capsys, "report", str(archived)), "report_data.json")
    _write(archived / report.REPORT_DATA, good)
    scores = json.loads((archived / "scores.json").read_text())
    scores["layers"]["features.0"] = "x"
    _write(archived / "scores.json", scores)
    assert_one_line_refusal(cli_in_process(monkeypatch, capsys, "report", str(archived)),
                            "scores.json: layers.features.0 must be a list")
    scores["layers"]["features.0"] = [float("inf")]
    _write(archived / "scores.json", scores)
    assert_one_line_refusal(cli_in_process(monkeypatch, capsys, "report", str(archived)), "scores.json")


def test_edited_trial_rows_are_refused_naming_the_database(compare_run, tmp_path, monkeypatch, capsys,
                                                           fast_plots) -> None:
    """The page's paired tests come from the SQLite rows when present: an accuracy of 7.5, a text
    trial index or a sites column that is not JSON is one line naming the file, not a traceback."""
    for table_edit, match in [
        ("UPDATE trials SET accuracy=7.5 WHERE trial=0", "campaigns/baseline/results.sqlite (its trials)"),
        ("UPDATE trials SET trial='x' WHERE trial=0", "campaigns/baseline/results.sqlite (its trials)"),
    ]:
        run = tmp_path / f"run{abs(hash(table_edit))}"
        shutil.copytree(compare_run, run)
        db = sqlite3.connect(run / "campaigns" / "baseline" / "results.sqlite")
        db.execute(table_edit)
        db.commit()
        db.close()
        assert_one_line_refusal(cli_in_process(monkeypatch, capsys, "report", str(run)), match)
    run = tmp_path / "sites"
    shutil.copytree(compare_run, run)
    db = sqlite3.connect(run / "bits" / "baseline" / "bit30" / "results.sqlite")
    db.execute("UPDATE trials SET sites='[[[[' WHERE trial=0")
    db.commit()
    db.close()
    assert_one_line_refusal(cli_in_process(monkeypatch, capsys, "report", str(run)), "bit30/results.sqlite")


# --- a fuzzer over summary.json and report_data.json -------------------------------------------------

def _junk(rng: random.Random, marker: Path) -> Any:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    return rng.choice([
        None, True, False, -1, 0, 1, 7, 2**70, -2**70, 1e308, -1e308, 1e-320, float("nan"), float("inf"),
        float("-inf"), 0.5, -0.5, 1.5, "", "x", "1e-4", "0", *PAYLOADS, f"$(touch {marker})",
        f"__import__('os').system('touch {marker}')", "{{7*7}}", "../../../etc", "a" * 70_000, [], {}, [1],
        {"a": 1}, [None, None], ["<b>", "</b>"], {"<script>": 1}, deep,
    ])


def _nodes(value: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nodes(v, path + (i,))


def _mutate(doc: Any, rng: random.Random, marker: Path) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        paths = [p for p in _nodes(doc) if p]
        if not paths:
            return doc
        path = rng.choice(paths)
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        key, old = path[-1], parent[path[-1]]
        action = rng.random()
        if action < 0.25:
            del parent[key]
        elif action < 0.35:
            parent[key] = [old]                 # a value wrapped in a list
        elif action < 0.45:
            parent[key] = json.dumps(old)       # a number or object turned into text
        elif action < 0.5 and isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[key] = -old if rng.random() < 0.5 else old * 1e6
        elif action < 0.55 and isinstance(parent, list):
            parent.append(copy.deepcopy(old))   # a duplicate (BER, variant)
        else:
            parent[key] = _junk(rng, marker)
    return doc


def test_fuzzed_summaries_are_refused_cleanly_or_reported(archived, tmp_path, monkeypatch, capsys) -> None:
    """300 seeded mutations of summary.json and report_data.json: each is a refusal in one line naming
    the file, or a page with no payload unescaped; never another exception, never a marker file.
    ``build_report`` is called directly (the CLI turns its ValueError into the ``error:`` line; every
    20th case goes through the CLI to show it); the first accepted cases draw real plots (matplotlib
    sees the odd values too), the others skip them (4 s each)."""
    marker = tmp_path / "PWNED"
    rng = random.Random(19)
    originals = {"summary.json": _summary(archived),
                 report.REPORT_DATA: json.loads((archived / report.REPORT_DATA).read_text())}
    real_plots = report.make_plots
    outcomes = {"refused": 0, "reported": 0}
    for i in range(300):
        name = "summary.json" if rng.random() < 0.75 else report.REPORT_DATA
        for other, doc in originals.items():
            _write(archived / other, doc)
        _write(archived / name, _mutate(originals[name], rng, marker))
        page_before = (archived / "report.html").read_bytes()
        monkeypatch.setattr(report, "make_plots", real_plots if outcomes["reported"] < 1 else _no_plots)
        if i % 20 == 0:
            r = cli_in_process(monkeypatch, capsys, "report", str(archived))
            assert "Traceback" not in r.stderr and r.returncode in (0, 2), (i, r.stderr[-2000:])
            refusal = r.stderr if r.returncode == 2 else None
            if refusal is not None:
                assert_one_line_refusal(r, name)
        else:
            refusal = _report(archived)
            assert refusal is None or name in refusal, (i, refusal)
        assert not marker.exists(), i
        if refusal is not None:
            assert (archived / "report.html").read_bytes() == page_before, i  # nothing half-written
            outcomes["refused"] += 1
        else:
            page = (archived / "report.html").read_text()
            assert all(p not in page for p in PAYLOADS) and "<script" not in page, i
            assert not re.search(r"\bnan%|\binf%", page, re.I), i
            outcomes["reported"] += 1
    assert outcomes["refused"] > 50 and outcomes["reported"] > 50, outcomes


# --- the schemas themselves ------------------------------------------------------------------------

def test_schema_messages_name_the_field_and_bound_the_input(tmp_path) -> None:
    result = {"ber": 1e-3, "trials": 2, "accuracy_mean": 0.5, "accuracy_ci": [0.4, 0.6], "sdc_mean": 0.1,
              "critical_sdc_mean": 0.1, "due_mean": 0.0}
    good = {"report_ber": 1e-4, "variants": [{"name": "baseline", "results": [result]}]}
    readback.check(good, readback.COMPARE_SUMMARY, "s.json")
    cases = [
        ({**good, "variants": [{"name": "../x", "results": [result]}]}, "variants[0].name must be a name"),
        ({**good, "variants": [{"name": "b", "results": []}]}, "variants[0].results must hold at least 1"),
        ({**good, "variants": good["variants"] * 2}, "variants[1].name repeats an earlier value"),
        ({**good, "variants": []}, "variants must hold at least 1"),
        ({**good, "inputs": True}, "inputs must be an integer"),
        ({**good, "inputs": 2**80}, "inputs holds an integer outside the 64-bit range"),
    ]
    for doc, match in cases:
        with pytest.raises(ValueError, match=re.escape(f"s.json: {match}")):
            readback.check(doc, readback.COMPARE_SUMMARY, "s.json")
    with pytest.raises(ValueError, match=re.escape("results[0].accuracy_ci must be [low, high]")):
        readback.check({**good, "variants": [{"name": "b", "results": [{**result, "accuracy_ci": [0.6, 0.4]}]}]},
                       readback.COMPARE_SUMMARY, "s")
    with pytest.raises(ValueError, match=re.escape("results[1].ber repeats")):
        readback.check({**good, "variants": [{"name": "b", "results": [result] * 2}]}, readback.COMPARE_SUMMARY, "s")
    # a number too large for a float, a key that would break the message's line
    with pytest.raises(ValueError, match=re.escape("s.json: inputs holds a number that is not finite")):
        readback.parse('{"inputs": 1e999}', readback.COMPARE_SUMMARY, "s.json")
    with pytest.raises(ValueError) as caught:
        readback.parse('{"config": {"a\\nb": 1e999}}', readback.COMPARE_SUMMARY, "s.json")
    assert len(str(caught.value).splitlines()) == 1 and 'config["a\\nb"]' in str(caught.value)
    # NaN reads as null (as write_json writes it); Infinity is refused at parse
    assert readback.parse('{"a": NaN}', readback.KEY, "k") == {"a": None}
    with pytest.raises(ValueError, match="bare Infinity"):
        readback.parse('{"a": Infinity}', readback.KEY, "k")
    big = tmp_path / "big.json"
    big.write_text(" " * (readback.MAX_KEY_BYTES + 1) + "{}")
    with pytest.raises(ValueError, match="more than"):
        readback.read_json(big, readback.KEY, readback.MAX_KEY_BYTES)
    assert readback.read_key(big) is None and readback.read_key(tmp_path / "absent") is None


# --- the cached pieces a comparison reads back ------------------------------------------------------

def _forge(path: Path, change) -> None:
    """Edit a cached piece and re-sign its key (its content digest), as one who knows the format would:
    the key then matches, and only the schema stands between the edit and the numbers."""
    from ftcnn.flows import pipeline
    value = json.loads(path.read_text())
    change(value)
    _write(path, value)
    key = json.loads(pipeline.key_path(path).read_text())
    key.pop(pipeline.CONTENT_FIELD, None)
    pipeline.store_key(path, key)


def _small_compare(run: Path) -> None:
    train.seed_everything(0)
    model = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.5)
    config = compare.CompareConfig(bers=(1e-4, 1e-3), trials=2, bit_trials=2, bits=(30,), finetune_epochs=0,
                                   score_samples=16, latency_repeats=1, calibration_size=32,
                                   variants=("baseline", "restrict"))
    compare.run_compare(model, "digits", run, config)


def test_forged_cached_pieces_are_refused_naming_file_and_field(compare_run, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(compare_run, run)
    _forge(run / "models" / "costs.json", lambda costs: costs["restrict"].update(params="5904"))
    with pytest.raises(ValueError, match=re.escape("costs.json: restrict.params must be a number >= 0")):
        _small_compare(run)
    shutil.rmtree(run)
    shutil.copytree(compare_run, run)
    summary = run / "campaigns" / "baseline" / "summary.json"
    _write(summary, {**json.loads(summary.read_text()), "results": [{"trials": -7}]})
    with pytest.raises(ValueError, match=re.escape("baseline/summary.json: results[0].trials must be an integer")):
        _small_compare(run)


def test_a_malformed_key_is_no_key(tmp_path) -> None:
    """A key is only compared with the expected one: nested junk, a huge file or bare NaN make the
    piece recomputed (never a crash, never current)."""
    from ftcnn.flows import pipeline
    piece = tmp_path / "costs.json"
    piece.write_text("{}")
    for text in ("[" * 100_000, '{"a": Infinity}', " " * (readback.MAX_KEY_BYTES + 1) + "{}", "\xff"):
        pipeline.key_path(piece).write_text(text, errors="surrogateescape")
        assert pipeline.is_current(piece, {"a": 1}, "costs") is False
        assert not pipeline.key_path(piece).exists()  # dropped, as for any stale key
