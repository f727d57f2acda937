"""The README's Python example runs as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys) -> None:
    text = README.read_text()
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its API example"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert out.count("BER ") == 2
    summary = json.loads((tmp_path / "runs" / "api_example" / "summary.json").read_text())
    assert [r["ber"] for r in summary["results"]] == [1e-5, 1e-4]
    assert (tmp_path / "hardened.pt").is_file()


def test_readme_low_level_example_flips_evaluates_restores(capsys) -> None:
    """The README's low-level snippet (parameter_memory + targeted + injected) runs as written:
    one exponent-MSB flip changes the accuracy, leaving the block restores it bit for bit."""
    text = README.read_text()
    block = re.search(r"<!-- low-level-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its low-level API example"
    scope: dict = {"__name__": "readme_low_level"}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    out = capsys.readouterr().out
    assert re.fullmatch(r"golden \d\.\d{3}, one flip \d\.\d{3}, restored \d\.\d{3}\n", out), out
    assert scope["faulty"] < scope["golden"] == scope["restored"]
