"""One vocabulary across commands (issue 23 item 3) from one rule table (issue 20, ``ftcnn.rules``).

An option name means the same in every command that has it: one default, one type, one help,
unless the rule table says why a command differs (``Rule.per_command``, with its reason) or
the option's meaning depends on the command by nature (``rules.PER_COMMAND_MEANING``: what
``--output`` writes). Options whose setting has a rule take their default and help from it.
The walker is shown to fail on a made-up app that repeats the drift issue 23 found.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import typer

from ftcnn import cli, rules
from ftcnn.campaigns import campaign_file as CF
from ftcnn.flows import compare
from ftcnn.campaigns.trials import CampaignConfig

from _helpers import assert_one_line_refusal, cli_in_process


def _options(app: typer.Typer) -> dict[str, dict[str, tuple[str, Any, str, str]]]:
    """flag -> command -> (parameter name, default, type, help) of every option of every command."""
    root = typer.main.get_command(app)
    found: dict[str, dict[str, tuple[str, Any, str, str]]] = defaultdict(dict)
    for command_name, command in root.commands.items():
        for param in command.params:
            if param.param_type_name != "option" or param.hidden:
                continue
            default = tuple(param.default) if isinstance(param.default, (list, tuple)) else param.default
            kind = param.bare_type() + ("[]" if param.multiple else "")
            for flag in param.opts:
                found[flag][command_name] = (param.name, default, kind, param.help or "")
    return found


def vocabulary_problems(app: typer.Typer) -> list[str]:
    """Every option name with two defaults, types or helps that the rule table does not explain,
    and every ruled option whose default or help is not the table's."""
    problems = []
    for flag, commands in sorted(_options(app).items()):
        for command, (name, default, _, help_text) in commands.items():
            rule = rules.RULES.get(name)
            if rule is None:
                continue
            want = rule.default_for(command)
            want = tuple(want) if isinstance(want, (list, tuple)) else want
            want = str(want) if name == "trials" else want
            if default != want or help_text != rule.help_for(command):
                problems.append(f"{command} {flag}: default/help not the rule table's")
        if len(commands) < 2 or flag in rules.PER_COMMAND_MEANING:
            continue
        name = next(iter(commands.values()))[0]
        declared = rules.RULES[name].per_command if name in rules.RULES else {}
        shared = {signature[1:] for command, signature in commands.items() if command not in declared}
        if len(shared) > 1:
            problems.append(f"{flag}: {len(shared)} meanings across {', '.join(sorted(commands))}")
    return problems


def test_every_option_name_means_one_thing_across_commands() -> None:
    assert vocabulary_problems(cli.app) == []


def test_every_declared_difference_says_why() -> None:
    for name, rule in rules.RULES.items():
        for command, (_, help_text, reason) in rule.per_command.items():
            assert help_text and len(reason) > 10, (name, command)
    assert all(len(why) > 10 for why in rules.PER_COMMAND_MEANING.values())


def test_the_walker_fails_on_the_drift_issue_23_found() -> None:
    """Before: --range-margin 0.0 in harden, 0.1 in compare; --finetune-epochs 3 vs 2; --seed helps."""
    drifted = typer.Typer()

    @drifted.command()
    def harden(range_margin: float = typer.Option(0.0, "--range-margin", help="a"),
               workers: int = typer.Option(1, help="x")) -> None:
        """."""

    @drifted.command()
    def prune(finetune_epochs: int = typer.Option(3), workers: int = typer.Option(2, help="y")) -> None:
        """."""

    @drifted.command("compare")
    def compare_(range_margin: float = typer.Option(0.1, "--range-margin", help="b"),
                 finetune_epochs: int = typer.Option(2), workers: int = typer.Option(1, help="x")) -> None:
        """."""

    problems = vocabulary_problems(drifted)
    assert any(p.startswith("--workers:") for p in problems), problems          # two meanings
    assert any("harden --range-margin" in p for p in problems), problems        # not the table's
    assert any(p.startswith("--finetune-epochs:") or "finetune-epochs" in p for p in problems), problems


def test_fixed_names_have_one_default() -> None:
    options = _options(cli.app)
    assert {c: v[1] for c, v in options["--finetune-epochs"].items() if c != "study"} == \
        {"prune": 3, "pipeline": 3, "compare": 3}
    assert compare.CompareConfig().finetune_epochs == 3      # the API's default is the CLI's
    assert set(options["--threads"]) >= {"protect", "inject", "compare", "harden", "prune", "pipeline"}
    assert "--keep" in options and "--protect" not in options
    assert "--confidence" in options and set(options["--trials"]) == \
        {"inject", "compare", "demo", "protect", "pipeline", "study"}


# --- the table is the one validator: the same bad value gets the same line everywhere ----------------

def test_one_message_for_a_bad_rate_from_a_flag_a_file_and_the_api(tmp_path, monkeypatch, capsys) -> None:
    r = cli_in_process(monkeypatch, capsys, "inject", str(tmp_path / "m.pt"), "--ber", "2", "-o", str(tmp_path / "o"))
    assert_one_line_refusal(r, "--ber must lie in [0, 1] (got 2)")
    (tmp_path / "c.toml").write_text("ber = 2.0\n")
    with pytest.raises(ValueError, match=r"campaign file: ber\[0\]: must lie in \[0, 1\] \(got 2\)"):
        CF.load_campaign_file(tmp_path / "c.toml")
    with pytest.raises(ValueError, match=r"^bers must lie in \[0, 1\] \(got 2\)$"):
        CampaignConfig(bers=(2.0,))
    with pytest.raises(ValueError, match=r"^bers must lie in \[0, 1\] \(got 2\)$"):
        compare.CompareConfig(bers=(2.0,))
    r = cli_in_process(monkeypatch, capsys, "compare", "--model", "lenet5", "--ber", "2", "-o", str(tmp_path / "o"))
    assert_one_line_refusal(r, "--ber must lie in [0, 1] (got 2)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["compare", "demo", "protect", "pipeline", "study"])
def test_trials_auto_where_campaigns_are_paired_is_one_line(tmp_path, monkeypatch, capsys, command) -> None:
    """Before: `compare --trials auto` ended in a usage error of several lines."""
    args = {"compare": ["compare", "--model", "lenet5"], "demo": ["demo"], "study": ["study"],
            "protect": ["protect", str(tmp_path / "m.pt")], "pipeline": ["pipeline", str(tmp_path / "m.pt")]}
    r = cli_in_process(monkeypatch, capsys, *args[command], "--trials", "auto", "-o", str(tmp_path / "o"))
    assert_one_line_refusal(r, f"--trials auto is not available in {command}: its variants are compared trial")
    assert not (tmp_path / "o").exists()


def test_protect_takes_threads_checked_as_parsed(tmp_path, monkeypatch, capsys) -> None:
    r = cli_in_process(monkeypatch, capsys, "protect", str(tmp_path / "m.pt"), "--threads", "100000",
                       "-o", str(tmp_path / "o"))
    assert_one_line_refusal(r, "--threads must lie in 1..")


def test_prune_protect_is_now_keep_with_a_hint(tmp_path, monkeypatch, capsys) -> None:
    assert cli._renamed_options(["prune", "m.pt", "--protect", "a", "--protect=b"]) == \
        ["prune", "m.pt", "--keep", "a", "--keep=b"]
    assert cli._renamed_options(["protect", "m.pt", "--ber", "1e-4"]) == ["protect", "m.pt", "--ber", "1e-4"]
    r = cli_in_process(monkeypatch, capsys, "prune", str(tmp_path / "missing.pt"), "--protect", "features.0",
                       "features.3", "-o", str(tmp_path / "o.pt"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[0] == "note: --protect is deprecated; use --keep", r.stderr
    assert len(lines) == 2 and lines[1].startswith("error:") and "missing.pt" in lines[1], r.stderr


@pytest.mark.parametrize("command, flag, shown", [("compare", "--report-ber", "3/4 up"),
                                                  ("analyze", "--samples", "default 256"),
                                                  ("compare", "--range-margin", "default 0.1 here")])
def test_defaults_given_in_prose_are_in_the_help(monkeypatch, capsys, command, flag, shown) -> None:
    assert shown in _options(cli.app)[flag][command][3]


def test_rules_refuse_in_one_line_naming_the_flag() -> None:
    cases: list[tuple[str, Any, str]] = [
        ("confidence", 95, "--confidence must lie in (0, 1): a share, e.g. 0.95 (got 95)"),
        ("criterion", "magic", "--criterion 'magic' is not one of vulnerability, l1"),
        ("target", "weights", "--target 'weights' is not one of parameters, activations"),
        ("points", [1e-3, 1e-3], "--points names 0.001 twice"),
        ("seed", True, "--seed must be a whole number"),
        ("ber", float("nan"), "--ber must be a finite number"),
    ]
    for setting, value, message in cases:
        with pytest.raises(ValueError) as info:
            rules.check(setting, value, "--" + setting)
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="--trials must be a positive integer or 'auto'"):
        rules.trials("many", "inject")
    assert rules.trials("auto", "inject") == "auto" and rules.trials("7", "compare") == 7


def test_the_rule_module_imports_no_torch() -> None:
    """``ftcnn --help`` builds its options from the table at start-up (issue 24)."""
    source = Path(rules.__file__).read_text()
    assert "import torch" not in source and "import numpy" not in source
