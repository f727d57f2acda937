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
