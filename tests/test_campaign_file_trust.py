"""A campaign file grants nothing (issue 19, item 1).

A campaign file is shared like a checkpoint, so it is untrusted input: it can
never name a builder to trust (``model`` takes effect only when the person types
the same ``--model``), and the paths it names stay inside its own folder
(absolute paths, ``..`` and symlinks that lead out are refused) unless the
person types them on the command line. Each case reproduces a hole of the
pre-issue-19 loader: the first ran ``os.system`` through ``inject --config``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ftcnn.campaigns import campaign_file as CF

from _helpers import assert_one_line_refusal, cli_in_process
from test_hostile_checkpoints import forge, raw, seed_checkpoints

# inject's parameters as the CLI hands them to ``inject_settings`` (a campaign file fills the rest)
FLAG_DEFAULTS = {"ber": [], "count": [], "trials": "100"}


@pytest.fixture(scope="module")
def lenet(tmp_path_factory) -> Path:
    return seed_checkpoints(tmp_path_factory.mktemp("seeds"))[0]


def _campaign(folder: Path, text: str) -> Path:
    path = folder / "campaign.toml"
    path.write_text(text)
    return path


def test_campaign_file_cannot_grant_builder_trust(lenet, tmp_path, monkeypatch, capsys) -> None:
    """The reproduction: a checkpoint whose builder is ``os:system`` and a campaign file that
    trusts it. ``inject --config`` refuses before loading anything; the command never runs."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned.txt"
    forge(tmp_path / "evil.pt", raw(lenet),
          spec={"builder": "os:system", "kwargs": {"command": f"echo PWNED > {marker}"}, "transforms": []})
    config = _campaign(tmp_path, 'checkpoint = "evil.pt"\nmodel = "os:system"\ndata = "digits"\n'
                                 'ber = [1e-3]\ntrials = 1\noutput = "run"\n')
    r = cli_in_process(monkeypatch, capsys, "inject", "--config", str(config))
    assert_one_line_refusal(r, "cannot grant trust")
    assert "--model 'os:system'" in r.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()
    # the same checkpoint without the file is refused as before
    r = cli_in_process(monkeypatch, capsys, "inject", "evil.pt", "--data", "digits", "--ber", "1e-3",
                       "--trials", "1", "-o", "run")
    assert_one_line_refusal(r, "not one of ftcnn's models")
    assert not marker.exists()


def test_model_in_a_file_needs_the_same_typed_model(tmp_path) -> None:
    config = _campaign(tmp_path, 'checkpoint = "m.pt"\nmodel = "user_models:tiny"\nber = [1e-3]\noutput = "o"\n')
    with pytest.raises(ValueError, match="cannot grant trust"):
        CF.inject_settings(FLAG_DEFAULTS, (), config)
    with pytest.raises(ValueError, match="but --model is 'user_models:other'"):
        CF.inject_settings({**FLAG_DEFAULTS, "model_spec": "user_models:other"}, ("model_spec",), config)
    # typed by the person, the same name: consistent, and what loads
    run = CF.inject_settings({**FLAG_DEFAULTS, "model_spec": "user_models:tiny"}, ("model_spec",), config)
    assert run.model == "user_models:tiny"


@pytest.mark.parametrize("line, key", [
    ('output = "{outside}/run"', "output"),                    # absolute: results written anywhere
    ('checkpoint = "{outside}/m.pt"', "checkpoint"),
    ('output = "../run"', "output"),                           # .. out of the file's folder
    ('checkpoint = "sub/../../m.pt"', "checkpoint"),
    ('output = "~/run"', "output"),
    ('data = "npz:../x.npz"', "data"),
    ('data = "imagefolder:{outside}"', "data"),
    ('output = "link/run"', "output"),                         # a symlink inside that leads out
])
def test_paths_stay_inside_the_file_folder(tmp_path, line, key) -> None:
    folder, outside = tmp_path / "shared", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    (folder / "link").symlink_to(outside)
    text = 'ber = [1e-3]\ncheckpoint = "m.pt"\noutput = "o"\n'
    text = "\n".join(l for l in text.splitlines() if not l.startswith(key)) + "\n" + line.format(outside=outside)
    config = _campaign(folder, text + "\n")
    with pytest.raises(ValueError, match=f"campaign file: {key}: ") as info:
        CF.load_campaign_file(config)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=f"campaign file: {key}: "):
        CF.inject_settings(FLAG_DEFAULTS, (), config)
    # typed on the command line, the person's value replaces the file's and is used wherever it leads
    flag = {"output": "output", "checkpoint": "checkpoint_path", "data": "data"}[key]
    typed = str(outside / "typed") if key != "data" else f"npz:{outside / 'x.npz'}"
    run = CF.inject_settings({**FLAG_DEFAULTS, flag: typed}, (flag,), config)
    assert {"output": run.output, "checkpoint": run.checkpoint, "data": run.data}[key] == typed


def test_absolute_output_through_the_cli_writes_nothing(lenet, tmp_path, monkeypatch, capsys) -> None:
    folder, outside = tmp_path / "shared", tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "m.pt").write_bytes(lenet.read_bytes())
    config = _campaign(folder, f'checkpoint = "m.pt"\ndata = "digits"\nber = [1e-3]\ntrials = 1\n'
                               f'output = "{outside}"\n')
    r = cli_in_process(monkeypatch, capsys, "inject", "--config", str(config))
    assert_one_line_refusal(r, "output")
    assert not outside.exists()


def test_paths_inside_the_folder_still_resolve_from_anywhere(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "shared"
    (folder / "models").mkdir(parents=True)
    config = _campaign(folder, 'checkpoint = "models/m.pt"\noutput = "runs/a"\ndata = "npz:d/x.npz"\nber = [1e-3]\n')
    monkeypatch.chdir(tmp_path)
    run = CF.inject_settings(FLAG_DEFAULTS, (), Path("shared/campaign.toml"))
    assert run.checkpoint == str(folder.resolve() / "models" / "m.pt")
    assert run.output == str(folder.resolve() / "runs" / "a")
    assert run.data == f"npz:{folder.resolve() / 'd' / 'x.npz'}"
