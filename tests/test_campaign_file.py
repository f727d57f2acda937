"""Campaign files: one reviewable TOML file says everything `ftcnn inject`'s flags say."""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path

import pytest

from ftcnn.campaigns import campaign_file as CF

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "campaign.toml"


def load_text(tmp_path: Path, text: str, name: str = "c.toml") -> dict:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return CF.load_campaign_file(path)


def one_line_error(tmp_path: Path, text: str, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message and len(message) < 1000, message
    assert info.value.__cause__ is None or info.value.__suppress_context__
    return message


def test_example_loads_and_fits_lenet5():
    cfg = CF.load_campaign_file(EXAMPLE)
    assert cfg["target"] == "activations" and cfg["activation_mode"] == "transient"
    assert cfg["ber"] == [1e-6, 1e-5, 1e-4] and cfg["trials"] == "auto"
    assert cfg["ber_per_layer"] == {"features.0": 0.0, "classifier.4": 1e-4}
    assert "checkpoint" not in cfg and "output" not in cfg  # outside its folder: typed (issue 19)
    # the layers it names are LeNet-5's, and its per-layer rates apply to them
    from ftcnn import checkpoint
    from ftcnn.campaigns import activations as A

    model = checkpoint.build("lenet5", num_classes=10, in_channels=1, input_size=28)
    names = A.activation_layers(model, cfg["layers"])
    assert names == A.activation_layers(model)
    rates = A.layer_bers(names, cfg["ber"][0], cfg["ber_per_layer"])
    assert rates == {"features.0": 0.0, "features.3": 1e-6, "classifier.0": 1e-6, "classifier.2": 1e-6,
                     "classifier.4": 1e-4}


def test_example_maps_onto_campaign_config():
    from ftcnn.campaigns import campaign

    cfg = CF.load_campaign_file(EXAMPLE)
    config = campaign.CampaignConfig(**CF.config_kwargs(cfg))
    assert config.bers == (1e-6, 1e-5, 1e-4) and config.trials is None and config.ci_half_width == 0.01
    assert config.layers == ("features.0", "features.3", "classifier.0", "classifier.2", "classifier.4")


def test_every_inject_flag_has_a_key():
    """Each option of `ftcnn inject` is a key (``--margin`` is ci_half_width) and each
    CampaignConfig field it sets is reachable through config_kwargs."""
    from ftcnn import cli
    from ftcnn.campaigns import campaign

    # the typer context and the file itself (--config) are not campaign settings
    params = [p for p in inspect.signature(cli.inject).parameters if p not in ("ctx", "config_file")]
    renamed = {"checkpoint_path": "checkpoint", "model_spec": "model", "margin": "ci_half_width"}
    missing = [p for p in params if renamed.get(p, p) not in CF.KEYS]
    assert not missing, missing
    fields = {f.name for f in dataclasses.fields(campaign.CampaignConfig)}
    mapped = {CF._CONFIG_FIELDS.get(k, k) for k in CF.KEYS if k not in CF.NOT_CONFIG}
    assert mapped <= fields, mapped - fields
    for new in ("target", "activation_mode", "ber_per_layer"):
        assert new in CF.KEYS


def test_minimal_parameter_campaign(tmp_path):
    cfg = load_text(tmp_path, 'ber = 1e-5\nseed = 3\ntrials = 20\ndata = "npz:d/x.npz"\n')
    assert cfg == {"ber": [1e-5], "seed": 3, "trials": 20,
                   "data": f"npz:{os.path.normpath(tmp_path / 'd/x.npz')}"}
    assert CF.config_kwargs(cfg) == {"bers": (1e-5,), "seed": 3, "trials": 20}
    assert load_text(tmp_path, "count = [0, 3]\n")["count"] == [0, 3]
    assert load_text(tmp_path, 'target = "activations"\ncount = 1\n')["count"] == [1]
    only_rates = load_text(tmp_path, 'target = "activations"\n[ber_per_layer]\n"conv" = 1e-4\n')
    assert only_rates == {"target": "activations", "ber_per_layer": {"conv": 1e-4}}
    assert load_text(tmp_path, 'data = "digits"\nber = [0, 1]\n')["ber"] == [0.0, 1.0]


@pytest.mark.parametrize("text, match", [
    ('ber = 1e-5\nmargin = 0.02\n',
     r"unknown key 'margin' \(did you mean ci_half_width\?\); allowed keys: checkpoint"),
    ('ber = 1e-5\nseeds = 1\n', r"unknown key 'seeds' \(did you mean seed\?\)"),
    ('ber = 1e-5\n[extra]\na = 1\n', r"unknown key 'extra'"),
    ('ber = "1e-5"\n', r"ber\[0\]: must be a number, not a string"),
    ('ber = [1e-5, 2.0]\n', r"ber\[1\]: must lie in \[0, 1\] \(got 2\)"),
    ('ber = nan\n', r"must be finite"),
    ('ber = true\n', r"must be a number, not a boolean"),
    ('ber = []\n', r"ber: must not be empty"),
    ('ber = 1e-5\ntrials = 10.0\n', r"trials: must be an integer, not a number"),
    ('ber = 1e-5\ntrials = "many"\n', r"trials: must be a positive integer or \"auto\""),
    ('ber = 1e-5\ntrials = 0\n', r"trials: must lie in 1\.\.1,000,000 \(got 0\)"),
    ('ber = 1e-5\nseed = -1\n', r"seed: must lie in 0\.\..* \(got -1\)"),
    ('ber = 1e-5\nconfidence = 1.0\n', r"confidence: must lie in \(0, 1\)"),
    ('ber = 1e-5\ndtype = "float64"\n', r"dtype: 'float64' is not one of float32"),
    ('ber = 1e-5\nbits = [32]\n', r"bits\[0\]: bit position 32 outside"),
    ('ber = 1e-5\ndtype = "float16"\nbits = [20]\n', r"bits: float16 has bits 0..15"),
    ('ber = 1e-5\ninclude_bn = "yes"\n', r"include_bn: must be true or false"),
    ('ber = 1e-5\nlayers = "conv1"\nlayers2 = 1\n', r"unknown key 'layers2'"),
    ('ber = 1e-5\nlayers = [1]\n', r"layers\[0\]: must be a string"),
    ('ber = 1e-5\ndevice = "gpu"\n', r"device: unknown device 'gpu'"),
    ('ber = 1e-5\ncount = [1]\n', r"give ber or count, not both"),
    ('seed = 1\n', r"give fault rates"),
    ('ber = 1e-5\nprecision = 0.01\ntrials = 5\n', r"precision replaces trials"),
    ('ber = 1e-5\nci_half_width = 0.01\n', r"ci_half_width: is the stop of trials = \"auto\""),
    ('ber = 1e-5\nactivation_mode = "permanent"\n', r"activation_mode: applies to activation faults only"),
    ('count = [1]\n[ber_per_layer]\n"a" = 1e-4\n', r"ber_per_layer: sets rates; with count"),
    ('ber = 1e-5\nprecision = 0.01\n[ber_per_layer]\n"a" = 1e-4\n', r"precision: needs one rate"),
    ('target = "activations"\nber = 1e-5\ncount = [2]\n', r"give ber or count, not both"),
    ('target = "activations"\nber = 1e-5\ninclude_bn = true\n', r"include_bn: applies to parameter faults only"),
    ('target = "activations"\nber = 1e-5\nprecision = 0.01\n[ber_per_layer]\n"a" = 1e-4\n', r"precision: needs one rate"),
    ('target = "activations"\nseed = 1\n', r"activation faults need ber"),
    ('target = "activations"\ncount = [1]\n[ber_per_layer]\n"a" = 1e-3\n',
     r"ber_per_layer: sets rates; with count"),
    ('target = "activations"\nber = 1e-5\ndtype = "int8"\n', r"dtype: activation faults support float32"),
    ('target = "activations"\nber = 1e-5\nmode = "stuck1"\n', r"mode: transient activation faults are flips"),
    ('target = "weights"\nber = 1e-5\n', r"target: 'weights' is not one of parameters, activations"),
    ('target = "activations"\n[ber_per_layer]\nfeatures.0 = 1e-5\n',
     r"ber_per_layer.features: is a table: quote layer names that hold dots, e.g. \"features.0\" = 1e-5"),
    ('target = "activations"\n[ber_per_layer]\n"a" = -1\n', r"ber_per_layer.a: must lie in \[0, 1\] \(got -1\)"),
    ('target = "activations"\nlayers = ["a"]\n[ber_per_layer]\n"b" = 1e-3\n', r"layer 'b' is not in layers"),
    ('ber = 1e-5\nber = 1e-4\n', r"not valid TOML"),
    ('ber = [1e-5\n', r"not valid TOML"),
    ('x = ' + '[' * 5000 + ']' * 5000 + '\n', r"not valid TOML|unknown key 'x'"),
])
def test_one_line_errors(tmp_path, text, match):
    message = one_line_error(tmp_path, text, match)
    assert message.startswith("campaign file")


def test_untrusted_file_limits(tmp_path):
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * CF.MAX_BYTES + "\nber = 1e-5\n")
    with pytest.raises(ValueError, match="at most 1048576 are read"):
        CF.load_campaign_file(big)
    with pytest.raises(ValueError, match="cannot read campaign file .*missing.toml"):
        CF.load_campaign_file(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="is not a regular file"):
        CF.load_campaign_file(tmp_path)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"ber = 1e-5\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"not UTF-8 text \(byte 11\)"):
        CF.load_campaign_file(binary)
    with pytest.raises(ValueError) as info:       # a 10,000-character key is shown cut, not in full
        load_text(tmp_path, "k" * 10_000 + " = 1\n")
    assert len(str(info.value)) < 1000


def test_relative_paths_follow_the_file_not_the_working_directory(tmp_path, monkeypatch):
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    (sub / "c.toml").write_text('ber = 1e-5\ncheckpoint = "m/../m.pt"\noutput = "out"\n'
                                'data = "imagefolder:imgs"\n')
    monkeypatch.chdir(tmp_path)
    cfg = CF.load_campaign_file(Path("a/b/c.toml"))
    assert cfg["checkpoint"] == str(sub / "m.pt")
    assert cfg["output"] == str(sub / "out")
    assert cfg["data"] == f"imagefolder:{sub / 'imgs'}"


def test_normalize_key_is_checked_like_the_flag(tmp_path):
    """A campaign file says how its inputs are normalised as --normalize does (issue 23), checked the same way."""
    assert load_text(tmp_path, 'ber = 1e-5\nnormalize = "none"\n')["normalize"] == "none"
    assert load_text(tmp_path, 'ber = 1e-5\nnormalize = "0/16"\n')["normalize"] == "0/16"
    assert "normalize" not in CF.config_kwargs({"ber": [1e-5], "normalize": "none"})
    for bad in ('"bogus"', '"1/0"', "3"):
        with pytest.raises(ValueError, match="normalize"):
            load_text(tmp_path, f"ber = 1e-5\nnormalize = {bad}\n")
    run = CF.inject_settings({"ber": [1e-5], "checkpoint_path": "m.pt", "output": "o"}, ["ber"])
    assert run.normalize is None
