"""The command line: the issue's commands, and one clear line for each bad input."""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest

from _helpers import run_cli


@pytest.fixture(scope="module")
def digits_model(digits_lenet5) -> Path:
    """The run's shared LeNet-5 (conftest): these tests only read it."""
    return digits_lenet5


def test_inject_end_to_end(digits_model, tmp_path) -> None:
    out = tmp_path / "inj"
    r = run_cli("inject", str(digits_model), "--ber", "1e-5", "1e-3", "--trials", "4", "--seed", "0",
                "-o", str(out))
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [row["ber"] for row in summary["results"]] == [1e-5, 1e-3]
    assert summary["config"]["data"] == "digits"  # taken from the checkpoint
    assert "accuracy" in r.stdout and "1e-05" in r.stdout
    assert (out / "summary.csv").exists() and (out / "results.sqlite").exists()


def _assert_clean_failure(r: subprocess.CompletedProcess, match: str) -> None:
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr  # one line, no traceback
    assert lines[0].startswith("error:") and match in lines[0], lines[0]


@pytest.mark.parametrize("args, match", [
    (["--ber", "2"], "--ber must lie in [0, 1] (got 2)"),
    (["--ber", "1e-3", "--trials", "0"], "trials"),
    (["--ber", "1e-3", "--data", "nosuchdata"], "nosuchdata"),
    (["--ber", "1e-3", "--data", "mnist5k"], "shape"),
    (["--ber", "1e-3", "--layers", "nolayer"], "unknown layer 'nolayer'"),
])
def test_inject_bad_input(digits_model, tmp_path, args, match) -> None:
    out = tmp_path / "run"
    r = run_cli("inject", str(digits_model), *args, "--trials" if "--trials" not in args else "--seed",
                "2" if "--trials" not in args else "0", "-o", str(out))
    _assert_clean_failure(r, match)
    assert not (out / "summary.json").exists()


def test_inject_missing_and_corrupt_checkpoint(tmp_path) -> None:
    _assert_clean_failure(run_cli("inject", str(tmp_path / "none.pt"), "--ber", "1e-3", "-o",
                                  str(tmp_path / "o")), "not found")
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    _assert_clean_failure(run_cli("inject", str(bad), "--ber", "1e-3", "-o", str(tmp_path / "o")),
                          "not a loadable")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(digits_model, tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    r = run_cli("inject", str(digits_model), "--ber", "1e-3", "--trials", "2", "-o", str(locked / "run"))
    _assert_clean_failure(r, "cannot create")


def test_unwritable_output_folder_as_root(digits_model, tmp_path) -> None:
    """A path under a regular file can never be created, even by root."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("inject", str(digits_model), "--ber", "1e-3", "--trials", "2", "-o", str(blocker / "run"))
    _assert_clean_failure(r, "cannot create output folder")
    r = run_cli("train", "--model", "lenet5", "--data", "digits", "--epochs", "1", "-o",
                str(blocker / "m.pt"))
    _assert_clean_failure(r, "does not exist")


def test_train_unknown_model(tmp_path) -> None:
    _assert_clean_failure(run_cli("train", "--model", "nonet", "--data", "digits", "-o",
                                  str(tmp_path / "m.pt")), "unknown model 'nonet'")
    assert not (tmp_path / "m.pt").exists()


def test_multi_value_expansion() -> None:
    from ftcnn.cli import _expand_multi_values
    assert _expand_multi_values(["inject", "m.pt", "--ber", "1e-6", "1e-5", "-o", "x"]) == \
        ["inject", "m.pt", "--ber", "1e-6", "--ber", "1e-5", "-o", "x"]
    assert _expand_multi_values(["inject", "--layers", "a.b", "c", "m.pt"]) == \
        ["inject", "--layers", "a.b", "--layers", "c", "m.pt"]


# --- a thin CLI (issue 11): it parses, calls one library function per command, prints -------------

# what only a library may do: train, evaluate, calibrate, score, prune, harden, measure, run campaigns
LOGIC_CALLS = {"fit", "evaluate", "seed_everything", "calibration_subset", "validation_split", "analyze",
               "rank_agreement", "load_scores", "save_scores", "harden", "prune", "finetune", "overheads",
               "macs", "parameters", "measure", "interleaved_latency", "relative", "stack_dataset",
               "check_input_shape", "run_campaign", "run_compare", "protect", "build", "save", "load",
               "mkdir", "data_digest", "model_digest", "train_or_load"}
# the library modules the CLI may import: flows, the configs and checks they take, printing helpers;
# every other module of the package (listed from the package itself, so a new or renamed module
# is covered without editing this file) holds logic the CLI must not call
CLI_MAY_IMPORT = {"campaign", "campaign_file", "checkpoint", "compare", "distributed", "pipeline", "progress",
                  "protect", "report", "vulnerability", "lazy", "_version", "cli", "__main__", "constants", "study",
                  "rules"}  # the rule table the options are built from (issue 20)


# the folders that show the layers (docs/architecture.md): importing one names no logic by itself
LAYER_FOLDERS = {"injection", "campaigns", "protection", "reporting", "flows"}


def _package_modules() -> set[str]:
    """Every module's own name, at the top level and in the layers' folders (names are unique
    across folders), and the ``models`` package."""
    import pkgutil

    import ftcnn

    return {m.name.rpartition(".")[2] for m in pkgutil.walk_packages(ftcnn.__path__, "ftcnn.")
            if m.name.rpartition(".")[2] not in LAYER_FOLDERS and not m.name.startswith("ftcnn.models.")}


def _names_logic(dotted: str) -> bool:
    """Whether a dotted ftcnn name (``ftcnn.protection.hardening``, ``ftcnn.hardening.x``) reaches a logic module."""
    return dotted.startswith("ftcnn.") and any(part in LOGIC_MODULES for part in dotted.split(".")[1:])


LOGIC_MODULES = _package_modules() - CLI_MAY_IMPORT
# the library modules whose functions run a command's flow; their checks and config types do not count
FLOW_MODULES = {"flows", "compare_mod", "protect_mod", "report_mod"}
NOT_FLOWS = {"check_budget", "check_output_file", "CompareConfig", "headline"}


def logic_in(source: str) -> list[str]:
    """What a CLI source does that belongs in the library: logic calls, logic modules imported,
    and commands that call more than one flow function."""
    tree = ast.parse(source)
    found = [f"imports {node.module}.{a.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and (node.module == "ftcnn" or (node.module or "").removeprefix("ftcnn.") in LAYER_FOLDERS)
             for a in node.names if a.name in LOGIC_MODULES]
    found += [f"imports {node.module}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              and _names_logic(node.module or "")]
    found += [f"imports {a.name}" for node in ast.walk(tree) if isinstance(node, ast.Import)
              for a in node.names if _names_logic(a.name)]
    found += [f"imports {m} lazily" for m in _lazily_imported(tree) if _names_logic(m)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in LOGIC_CALLS:
                found.append(f"calls {name} (line {node.lineno})")
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command" for d in fn.decorator_list):
            most = _flows_on_a_path(fn.body)
            if most > 1:
                found.append(f"command {fn.name} runs {most} flows")
    return found


LAZY_IMPORTERS = {"lazy", "import_module", "__import__"}


def _lazily_imported(tree: ast.AST) -> list[str]:
    """The ftcnn modules a source imports on first use (``lazy("ftcnn.x")``, ``import_module``), as
    the CLI does since issue 24: a literal name, or ``f"ftcnn.{name}" for name in (literal names)``."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.GeneratorExp, ast.ListComp, ast.SetComp)):
            values = [e.value for g in node.generators if isinstance(g.iter, (ast.Tuple, ast.List))
                      for e in g.iter.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            calls = [c for c in ast.walk(node.elt) if isinstance(c, ast.Call) and c.args
                     and getattr(c.func, "id", getattr(c.func, "attr", None)) in LAZY_IMPORTERS]
            if any(isinstance(c.args[0], ast.JoinedStr) for c in calls):
                names += [f"ftcnn.{v}" for v in values]
        if isinstance(node, ast.Call) and node.args and \
                getattr(node.func, "id", getattr(node.func, "attr", None)) in LAZY_IMPORTERS:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("ftcnn."):
                names.append(arg.value)
    return names


def _flows_on_a_path(statements: list) -> int:
    """The most flow calls one run of ``statements`` can make (an if's branches are alternatives)."""
    total = 0
    for i, st in enumerate(statements):
        if isinstance(st, ast.If) and st.body and isinstance(st.body[-1], ast.Return):  # early return
            return total + max(_flows_on_a_path(st.body), _flows_on_a_path(st.orelse + statements[i + 1:]))
        if isinstance(st, ast.If):
            total += max(_flows_on_a_path(st.body), _flows_on_a_path(st.orelse))
            continue
        total += sum(1 for c in ast.walk(st) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                     and isinstance(c.func.value, ast.Name) and c.func.value.id in FLOW_MODULES
                     and c.func.attr not in NOT_FLOWS)
    return total


def test_the_cli_holds_no_logic() -> None:
    import ftcnn.cli

    assert logic_in(Path(ftcnn.cli.__file__).read_text()) == []


def test_the_logic_modules_are_todays_modules() -> None:
    """The guard sees the package as it is: the modules that hold the logic of hardening, pruning,
    codes, fault injection, shortcuts, strata, costs and training are in it, and every name it
    allows exists (the flows and configs the CLI calls: pipeline, campaign, compare, protect,
    vulnerability, report, study)."""
    modules = _package_modules()
    assert {"hardening", "pruning", "codes", "fold", "faults", "trials", "activations", "fastpath", "strata",
            "graph", "cost", "metrics", "paired", "train", "data", "store"} <= LOGIC_MODULES
    assert CLI_MAY_IMPORT - {"__main__"} <= modules | {"cli"}
    assert {"pipeline", "campaign", "compare", "protect", "vulnerability", "report", "study"} <= CLI_MAY_IMPORT
    for folder, name in (("protection", "hardening"), ("protection", "pruning"), ("injection", "faults")):
        assert logic_in(f"from ftcnn.{folder} import {name}\n") == [f"imports ftcnn.{folder}.{name}"]
        assert logic_in(f"import ftcnn.{folder}.{name}\n") == [f"imports ftcnn.{folder}.{name}"]
        assert logic_in(f"from ftcnn.{folder}.{name} import x\n") == [f"imports ftcnn.{folder}.{name}"]
        assert logic_in(f'{name} = lazy("ftcnn.{folder}.{name}")\n') == [f"imports ftcnn.{folder}.{name} lazily"]
        assert logic_in(f"from ftcnn import {name}\n") == [f"imports ftcnn.{name}"]
        assert logic_in(f"import ftcnn.{name}\n") == [f"imports ftcnn.{name}"]
        assert logic_in(f"from ftcnn.{name} import x\n") == [f"imports ftcnn.{name}"]


def test_the_guard_fails_on_a_cli_that_imports_logic() -> None:
    """Fed the real CLI's source with one logic module added, by each way the CLI imports (the
    ``TYPE_CHECKING`` import, a lazy proxy by name, the proxies' loop), the guard reports it."""
    import ftcnn.cli

    real = Path(ftcnn.cli.__file__).read_text()
    typed = "    from ftcnn.reporting import report as report_mod\n"
    loop = '"protection.protect", "reporting.report", "protection.vulnerability"))'
    assert typed in real and loop in real and 'lazy("ftcnn.flows.study")' in real  # the forgeries below apply
    forged = {
        "TYPE_CHECKING import": real.replace(typed, typed + "    from ftcnn.protection import hardening\n"),
        "lazy by name": real.replace('lazy("ftcnn.flows.study")', 'lazy("ftcnn.protection.pruning")'),
        "the proxies' loop": real.replace(loop, loop.replace('"reporting.report"',
                                                             '"reporting.report", "injection.faults"')),
    }
    expected = {"TYPE_CHECKING import": "imports ftcnn.protection.hardening",
                "lazy by name": "imports ftcnn.protection.pruning lazily",
                "the proxies' loop": "imports ftcnn.injection.faults lazily"}
    for way, source in forged.items():
        assert source != real, way
        assert expected[way] in logic_in(source), (way, logic_in(source))
    assert logic_in(real) == []


def test_the_logic_check_finds_logic() -> None:
    source = '''
from ftcnn import train, pipeline as flows

@app.command()
def go(x):
    net = flows.load_model(x)
    train.fit(net, x)
    flows.harden_checkpoint(net, x)
    if x:
        return
    flows.prune_checkpoint(net, x)
'''
    found = logic_in(source)
    assert "imports ftcnn.train" in found
    assert any(f.startswith("calls fit") for f in found)
    assert "command go runs 3 flows" in found


def test_the_commands_follow_the_data_flow() -> None:
    import ftcnn.cli

    names = [c.name or c.callback.__name__ for c in ftcnn.cli.app.registered_commands]
    assert names == ["train", "analyze", "harden", "prune", "pipeline", "inject", "compare", "report", "demo",
                     "protect", "study"]


# --- one name per idea: --margin is now three options; the old spelling works for one release ------

@pytest.mark.parametrize("command, new", [("inject", "--ci-half-width"), ("analyze", "--sample-margin"),
                                          ("harden", "--range-margin"), ("compare", "--range-margin")])
def test_old_margin_spelling_is_mapped(command, new, capsys) -> None:
    from ftcnn.cli import _renamed_options

    assert _renamed_options([command, "m.pt", "--margin", "0.1", "-o", "x"]) == [command, "m.pt", new, "0.1", "-o", "x"]
    assert _renamed_options([command, "m.pt", "--margin=0.2"]) == [command, "m.pt", f"{new}=0.2"]
    assert capsys.readouterr().err.splitlines() == [f"note: --margin is deprecated; use {new}"] * 2
    assert _renamed_options([command, "m.pt", new, "0.1"]) == [command, "m.pt", new, "0.1"]
    assert capsys.readouterr().err == ""


def test_margin_is_not_an_option_where_it_never_was(capsys) -> None:
    from ftcnn.cli import _renamed_options

    assert _renamed_options(["prune", "m.pt", "--margin", "0.1"]) == ["prune", "m.pt", "--margin", "0.1"]
    assert capsys.readouterr().err == ""


def test_deprecated_margin_gives_the_same_model(digits_model, tmp_path) -> None:
    old = run_cli("harden", str(digits_model), "--ratio", "0", "--restrict", "zero", "--margin", "0.1",
                  "-o", str(tmp_path / "old.pt"))
    new = run_cli("harden", str(digits_model), "--ratio", "0", "--restrict", "zero", "--range-margin", "0.1",
                  "-o", str(tmp_path / "new.pt"))
    assert old.returncode == 0 and new.returncode == 0, old.stderr + new.stderr
    assert old.stderr.splitlines().count("note: --margin is deprecated; use --range-margin") == 1
    assert "deprecated" not in new.stderr
    from ftcnn import checkpoint, fingerprint

    a, b = checkpoint.load(tmp_path / "old.pt"), checkpoint.load(tmp_path / "new.pt")
    assert fingerprint.model_digest(a) == fingerprint.model_digest(b)
    assert checkpoint.meta(a)["hardening"]["range_margin"] == 0.1
    assert checkpoint.get_spec(a)["transforms"][-1]["margin"] == 0.1  # the checkpoint format keeps its field
    helps = {c: run_cli(c, "--help").stdout for c in ("inject", "analyze", "harden")}
    assert "--ci-half-width" in helps["inject"] and "--sample-margin" in helps["analyze"]
    assert "--range-margin" in helps["harden"] and not any("--margin " in h for h in helps.values())


def test_compare_trains_once_then_reuses_its_model(tmp_path, capsys) -> None:
    """`compare --model` and `demo`: the model is trained into the run folder, then reused while its
    settings and training data are the same (pipeline.train_or_reuse), retrained when they change."""
    from ftcnn import checkpoint, fingerprint
    from ftcnn.flows import compare

    config = compare.CompareConfig(bers=(1e-3,), trials=1, bit_trials=0, score_samples=8, latency_repeats=1,
                                   variants=("baseline",))
    first = compare.compare_run(None, "digits", tmp_path, config, builder="lenet5", epochs=1, log=print)
    assert "lenet5 on digits: test accuracy" in capsys.readouterr().out
    digest = fingerprint.model_digest(checkpoint.load(tmp_path / "model.pt"))
    again = compare.compare_run(None, "digits", tmp_path, config, builder="lenet5", epochs=1, log=print)
    assert f"reusing {tmp_path / 'model.pt'}" in capsys.readouterr().out
    assert again["digests"]["model"] == first["digests"]["model"]
    assert fingerprint.model_digest(checkpoint.load(tmp_path / "model.pt")) == digest
    compare.compare_run(None, "digits", tmp_path, config, builder="lenet5", epochs=1, seed=1, log=print)
    assert "recomputing model.pt: seed changed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="CHECKPOINT"):
        compare.compare_run(None, "digits", tmp_path, config)
