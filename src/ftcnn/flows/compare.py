"""Every protection side by side on the same inputs and seeds (design §6).

A comparison is a run folder: the model, its vulnerability scores, one
checkpoint per variant, one campaign per variant (resumable, SQLite), single
bit-flip campaigns per bit position, and a summary from which ``report``
draws plots and a page. Re-running reuses every finished piece whose inputs
are unchanged: each piece stores a key beside it (``NAME.key.json``: digests
of the model and data it was computed from, and the settings it depends on;
campaigns hold theirs in their database), and a piece whose key differs is
recomputed, with one log line saying why. Nothing is reused by file name
alone (design §8: a run's identity is its content): a key also holds the
digest of its piece, and a piece replaced after it was written (another model
copied over ``models/restrict.pt``) is rebuilt, said in one line. A run holds
the folder's lock (``files.exclusive_folder``) from start to end: a second
run on the same folder refuses in one line instead of deleting the first
one's campaigns and mixing their pieces.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import InitVar, asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ftcnn import checkpoint, data as data_mod, files, fingerprint, progress, train
from ftcnn.campaigns import campaign, distributed, store
from ftcnn.flows import pipeline
from ftcnn.protection import cost, hardening
from ftcnn.reporting import report
from ftcnn import readback, rules
from ftcnn.campaigns.campaign import CampaignConfig, run_campaign
from ftcnn.campaigns.trials import take_old_margin
from ftcnn.flows.pipeline import is_current, store_key

DEFAULT_BERS = tuple(float(b) for b in np.logspace(-7, -3, 9))
TARGETS = rules.TARGETS
# how the calibration inputs are picked (``splits.calibration_subset``), recorded in variant keys
CALIBRATION_RULE = "randperm(seed)[:calibration_size]"


@dataclass(frozen=True)
class Variant:
    """One protection: optional pruning (then fine-tuning and re-scoring), then hardening."""

    name: str
    description: str
    harden: dict[str, Any] | None = None
    prune: dict[str, Any] | None = None


def default_variants(harden_ratio: float = 0.1, prune_ratio: float = 0.3,
                     restrict: str = "zero") -> list[Variant]:
    r, p = harden_ratio, prune_ratio
    return [
        Variant("baseline", "unprotected model"),
        Variant("restrict", f"range restriction alone ({restrict}, per channel)", {"ratio": 0.0, "restrict": restrict}),
        Variant("weights", "parameter-side check: weights outside their fault-free channel bounds zeroed at use",
                {"ratio": 0.0, "check_weights": "zero"}),
        Variant("weights_restrict", "weight check + range restriction",
                {"ratio": 0.0, "check_weights": "zero", "restrict": restrict}),
        Variant("tmr_full", "full TMR: every Conv2d/Linear triplicated, median vote", {"tmr": "full"}),
        # memory-fault baselines (issue 21; ``ftcnn.protection.codes``, the names ``ftcnn protect`` gives them)
        Variant("weight_tmr", "weight-level TMR: two stored copies of every weight, bitwise majority (x3 memory)",
                {"ratio": 0.0, "code": "tmr3"}),
        Variant("ecc", "SEC-DED ECC on 64-bit words: one flip corrected, two detected and zeroed (x1.125 memory)",
                {"ratio": 0.0, "code": "secded"}),
        Variant("parity", "one parity bit per weight, a failed check zeroes the weight (x1.031 memory)",
                {"ratio": 0.0, "code": "parity"}),
        Variant("tmr_selective", f"selective TMR of the top {r:.0%} channels", {"ratio": r, "correction": "tmr"}),
        Variant("harden_min", f"duplicate top {r:.0%}, min correction (paper)", {"ratio": r, "correction": "min"}),
        Variant("harden_range", f"duplicate top {r:.0%}, range correction", {"ratio": r, "correction": "range"}),
        Variant("harden_min_restrict", "harden_min + range restriction",
                {"ratio": r, "correction": "min", "restrict": restrict}),
        Variant("harden_range_restrict", "harden_range + range restriction",
                {"ratio": r, "correction": "range", "restrict": restrict}),
        Variant("pruned_vuln_harden_min", f"prune {p:.0%} least vulnerable, fine-tune, harden_min",
                {"ratio": r, "correction": "min"}, {"ratio": p, "criterion": "vulnerability"}),
        Variant("pruned_l1_harden_min", f"prune {p:.0%} smallest L1, fine-tune, harden_min",
                {"ratio": r, "correction": "min"}, {"ratio": p, "criterion": "l1"}),
    ]


@dataclass(frozen=True)
class CompareConfig:
    bers: tuple[float, ...] = DEFAULT_BERS
    trials: int = 30
    seed: int = 0
    harden_ratio: float = 0.1
    prune_ratio: float = 0.3
    restrict: str = "zero"
    range_margin: float = 0.1  # widen profiled ranges by this share of their width (was `margin`)
    finetune_epochs: int = rules.RULES["finetune_epochs"].default  # one default in every command
    score_method: str = "gain"
    score_samples: int = 256
    calibration_size: int = 1000
    bits: tuple[int, ...] = tuple(range(32))
    bit_trials: int = 20
    report_ber: float | None = None
    variants: tuple[str, ...] | None = None
    latency_repeats: int = 20
    # what faults hit (issue 14): "parameters" (weight memory, copies and protection bounds included)
    # or "activations" (transient flips in every Conv2d/Linear output, a protection's copies included)
    target: str = "parameters"
    margin: InitVar[float | None] = None  # deprecated spelling of range_margin (one release)

    def __post_init__(self, margin: float | None = None) -> None:
        take_old_margin(self, margin, "range_margin")
        rules.check("target", self.target)
        if self.target == "both":  # its sweep has one axis: the combined row is inject's and protect's
            raise ValueError("compare sweeps one fault target (parameters or activations); for both at once "
                             "use ftcnn inject --target both --activation-ber RATE, or ftcnn protect --target both")
        rules.check("points", self.bers, "bers")
        rules.check("trials", self.trials)
        rules.check("bit_trials", self.bit_trials)
        rules.check("harden_ratio", self.harden_ratio)
        rules.check("prune_ratio", self.prune_ratio)
        rules.check("range_margin", self.range_margin)
        rules.check("finetune_epochs", self.finetune_epochs)
        if self.report_ber is not None:
            rules.check("report_ber", self.report_ber)

    def recorded(self) -> dict[str, Any]:
        """``asdict`` for summary.json: ``target`` only when not "parameters" (summaries of parameter
        comparisons stay as they were; ``report`` reads ``config.get("target")``)."""
        d = asdict(self)
        if d["target"] == "parameters":
            d.pop("target")
        return d

    def campaign_target(self) -> dict[str, Any]:
        """CampaignConfig keywords of the fault target: none for parameters (identities unchanged)."""
        return {} if self.target == "parameters" else {"target": self.target}

    @property
    def chosen_report_ber(self) -> float:
        if self.report_ber is not None:
            return self.report_ber
        positive = [b for b in self.bers if b > 0]
        # the middle of the sweep's upper half: where protections differ most
        return sorted(positive)[min(len(positive) - 1, (3 * len(positive)) // 4)]


def _log(msg: str) -> None:
    pipeline.note(msg, "compare")  # one line on stderr, never wrapped


# --- cached pieces, keyed by their inputs (``pipeline.is_current``/``store_key``) ----

def _cached_json(path: Path, key: dict[str, Any], piece: str, compute: Callable[[], Any],
                 schema: readback.Schema = readback.ANY) -> Any:
    if is_current(path, key, piece):
        return readback.read_json(path, schema)  # a file from the folder: checked, never trusted
    value = compute()
    files.write_json(path, value)
    store_key(path, key)
    return value


def scores_key(model_digest: str, train_digest: str, config: CompareConfig) -> dict[str, Any]:
    """What vulnerability scores depend on."""
    return {"model": model_digest, "train data": train_digest, "score_method": config.score_method,
            "score_samples": config.score_samples, "seed": config.seed}


def variant_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: CompareConfig, path: Path,
                   piece: str = "scores", device: str = "cpu") -> dict:
    """The model's vulnerability scores with ``config``'s method, cached in ``path`` by their inputs."""
    key = scores_key(fingerprint.model_digest(model), fingerprint.data_digest(x, y), config)
    return pipeline.cached_scores(model, x, y, path, key, piece, method=config.score_method,
                                  samples=config.score_samples, seed=config.seed, device=device)


def variant_key(variant: Variant, config: CompareConfig, model_digest: str, train_digest: str
                ) -> dict[str, Any]:
    """What a variant's model depends on: the source model and training data,
    the variant's own settings, and only those comparison settings it uses (a
    new --harden-ratio rebuilds the hardened variants, not range restriction)."""
    h, p = variant.harden or {}, variant.prune or {}
    key: dict[str, Any] = {"model": model_digest, "train data": train_digest, "seed": config.seed}
    key.update({("harden_ratio" if k == "ratio" else k): v for k, v in h.items()})
    key.update({("prune_ratio" if k == "ratio" else f"prune_{k}"): v for k, v in p.items()})
    if p or (h.get("ratio", 0) > 0 and h.get("tmr") != "full"):  # pruning re-scores
        key.update(score_method=config.score_method, score_samples=config.score_samples)
    if p:
        key["finetune_epochs"] = config.finetune_epochs
    correction = h.get("correction", "min")
    if h.get("restrict") or (correction in hardening.CORRECTIONS and hardening.CORRECTIONS[correction].needs_ranges):
        # the rule that picks the calibration inputs is part of the key: variants profiled with the
        # first N inputs (before issue 11) are rebuilt with ``splits.calibration_subset``
        key.update(margin=config.range_margin,  # the stored key keeps its name: built variants stay current
                    calibration_size=config.calibration_size,
                   calibration=CALIBRATION_RULE)
    return key


def build_variant(variant: Variant, model: nn.Module, scores: dict, train_set, config: CompareConfig,
                  input_shape: tuple[int, ...], folder: Path, key: dict[str, Any] | None = None,
                  device: str = "cpu") -> nn.Module:
    """The variant's model, from its checkpoint if a previous run built it from
    the same inputs (``key``, by default ``variant_key``), else built anew (fine-tune,
    scores and range profiling on ``device``; returned where ``model`` is)."""
    path = folder / f"{variant.name}.pt"
    x_train, y_train = train_set.tensors
    if key is None:
        key = variant_key(variant, config, fingerprint.model_digest(model),
                          fingerprint.data_digest(x_train, y_train))
    if is_current(path, key, variant.name):
        return checkpoint.load(path)
    calibration = pipeline.calibration_subset(x_train, config.calibration_size, config.seed)  # the one rule
    net, layer_scores = model, scores["layers"]
    if variant.prune:
        # reseed=False: compare's pruned variants have always fine-tuned without reseeding (same numbers)
        net, _, _ = pipeline.prune_finetune(model, train_set, ratio=variant.prune["ratio"],
                                            criterion=variant.prune["criterion"], scores=layer_scores,
                                            input_shape=input_shape, epochs=config.finetune_epochs,
                                            seed=config.seed, reseed=False, device=device)
        rescored = variant_scores(net, x_train, y_train, config, folder / f"{variant.name}.scores.json",
                           f"scores of {variant.name}", device)
        layer_scores = rescored["layers"]
    if variant.harden:
        settings = dict(variant.harden)
        needs_scores = settings.get("ratio", 0) > 0 and settings.get("tmr") != "full"
        net = pipeline.harden_on(net, layer_scores if needs_scores else None, device,
                                 range_margin=config.range_margin, calibration=calibration, **settings)
    checkpoint.save(net, path, variant=asdict(variant))
    store_key(path, key)
    return net


def _discard_stale_run(folder: Path, identity: dict[str, Any]) -> list[str]:
    """Remove a campaign in ``folder`` that another model, data or setting made
    (the differences, in words; empty when it is current or absent)."""
    stored = campaign.stored_identity(folder)
    if stored is None:
        return []
    differences = campaign.identity_differences(stored, identity)
    if differences:
        store.discard_run(folder)
    return differences


def resumed_campaign(net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: CampaignConfig, folder: Path,
              digests: tuple[str, str], piece: str | None, **kwargs: Any) -> tuple[dict[str, Any], list[str]]:
    """``run_campaign``, first discarding a stale campaign in ``folder`` (said in one
    line when ``piece`` names it); returns the summary and the differences. What every
    folder of variants (compare, study) resumes its campaigns with."""
    cfg = cfg.for_model(net)  # the identity run_campaign records
    identity = campaign.run_identity(net, x, y, cfg, model_digest=digests[0], data_digest=digests[1])
    differences = _discard_stale_run(folder, identity)
    if differences and piece is not None:
        _log(f"recomputing {piece}: {'; '.join(differences)}")
    return run_campaign(net, x, y, cfg, folder, digests=digests, **kwargs), differences


def _bit_sensitivity(net: nn.Module, x: torch.Tensor, y: torch.Tensor, config: CompareConfig,
                     folder: Path, digests: tuple[str, str] | None = None, name: str = "",
                     device: str = "cpu") -> dict[str, float]:
    """Critical-SDC rate of exactly one flip at each bit position (uniform over the memory).

    Against activation faults: one flip per inference, at a site drawn uniformly over every
    Conv2d/Linear output value (a protection's copies included) at that bit, the same site for
    every input of the trial (``activation_mode="permanent"``, count 1); each trial draws another
    site. So, as for parameters, a trial's critical-SDC share is that of one single flip over the
    test inputs (a transient count of 1 would hit one input of the whole split and say nothing).
    """
    out: dict[str, float] = {}
    if config.bit_trials == 0:
        return out
    digests = digests or (fingerprint.model_digest(net), fingerprint.data_digest(x, y))
    said = False
    target = config.campaign_target()
    if target:
        target["activation_mode"] = "permanent"
    for bit in config.bits:
        cfg = CampaignConfig(counts=(1,), trials=config.bit_trials, seed=config.seed, bits=(bit,), device=device,
                             **target)
        s, differences = resumed_campaign(net, x, y, cfg, folder / f"bit{bit:02d}", digests, None, progress=False)
        if differences and not said:  # one line per variant, not one per bit
            _log(f"recomputing bit sensitivity of {name or folder.name}: {'; '.join(differences)}")
            said = True
        out[str(bit)] = s["results"][0]["critical_sdc_mean"]
    return out


def expected_time(measured: dict[str, dict[str, float]], names: list[str], config: CompareConfig,
                  inputs: int) -> str:
    """What the campaigns will cost, said up front (issue 14), from the pilot every run makes
    anyway: each variant's measured batch-128 latency x the trials x the test inputs. An
    upper bound on one thread: exact shortcuts skip work and finished campaigns are reused."""
    bit_trials = len(config.bits) * config.bit_trials
    trials = len(config.bers) * config.trials + bit_trials
    seconds = sum(measured[n]["latency_b128_ms"] / 1000 * inputs / 128 * trials for n in names)
    return progress.expected(seconds, "campaigns", f"{len(names)} variants x {trials} trials of {inputs} inputs, "
                             "from each variant's measured latency; shortcuts and finished campaigns cut it")


def _measure_all(nets: dict[str, nn.Module], input_shape: tuple[int, ...], rounds: int
                 ) -> dict[str, dict[str, float]]:
    """Parameters, MACs, and CPU latency timed round-robin across all variants
    (one thread), so that load on a shared machine hits every variant alike: the median
    (``latency_bB_ms``) and the interquartile range of the rounds (``latency_bB_ms_iqr``:
    [p25, p75] ms). MACs per input at batch 1 (``macs``) and at batch 128 (``macs_b128``:
    ``cost.macs_at_batch``, once-per-forward work such as weight checks shared by the batch,
    the price ``harden`` and ``protect`` quote), so every cost carries its batch (issue 21)."""
    out = {name: {"params": cost.parameters(net), "protection_values": cost.protection_values(net),
                  "memory_bits": cost.memory_bits(net),  # all stored bits: what a memory code pays (issue 21)
                  **cost.macs(net, input_shape), "macs_b128": cost.macs_at_batch(net, input_shape, 128)}
           for name, net in nets.items()}
    for batch in (1, 128):
        times = cost.interleaved_timings(nets, input_shape, batch=batch, rounds=rounds, threads=1)
        for name, t in times.items():
            out[name][f"latency_b{batch}_ms"] = statistics.median(t)
            out[name][f"latency_b{batch}_ms_iqr"] = cost.iqr(t)
    return out


def run_compare(model: nn.Module, data_spec: str, out_dir: str | Path, config: CompareConfig,
                record: dict[str, Any] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Build, measure and attack every variant; write summary.json/csv, plots and report.html.

    Scores, fine-tunes, range profiles, clean accuracies and campaigns run on ``device``;
    costs and latency on the CPU. The device does not change a stored number (within float
    tolerance), so it is not part of any key and a folder resumes on another device.
    """
    out = Path(out_dir)
    with files.exclusive_folder(out):  # one writer for the whole run (a second one refuses in one line)
        for sub in ("models", "campaigns", "bits"):
            files.make_folder(out / sub)
        model.eval()
        train_set, test_set = data_mod.load(data_spec, "train"), data_mod.load(data_spec, "test")
        x_test, y_test = campaign.stack_dataset(test_set)
        x_train, y_train = train_set.tensors
        campaign.check_input_shape(model, x_test)
        input_shape = tuple(x_test.shape[1:])

        model_digest = fingerprint.model_digest(model)
        train_digest = fingerprint.data_digest(x_train, y_train)
        test_digest = fingerprint.data_digest(x_test, y_test)

        _log("scoring vulnerability")
        scores = variant_scores(model, x_train, y_train, config, out / "scores.json", device=device)
        variants = [v for v in default_variants(config.harden_ratio, config.prune_ratio, config.restrict)
                    if config.variants is None or v.name in config.variants]
        if config.variants:
            unknown = set(config.variants) - {v.name for v in default_variants()}
            if unknown:
                raise ValueError(f"unknown variant {sorted(unknown)[0]!r}; choose from "
                                 + ", ".join(v.name for v in default_variants()))
        nets: dict[str, nn.Module] = {}
        for variant in progress.bar(variants, desc="build variants"):
            _log(f"{variant.name}: {variant.description}")
            nets[variant.name] = (model if variant.name == "baseline" else build_variant(
                variant, model, scores, train_set, config, input_shape, out / "models",
                key=variant_key(variant, config, model_digest, train_digest), device=device)).eval()
        nets.setdefault("baseline", model)
        digests = {name: model_digest if net is model else fingerprint.model_digest(net) for name, net in nets.items()}
        # latencies are timed round-robin across all variants: any changed model re-times them all
        costs_key = {**{f"model {name}": d for name, d in sorted(digests.items())},
                     "input_shape": input_shape, "latency_repeats": config.latency_repeats}
        measured = _cached_json(out / "models" / "costs.json", costs_key, "costs",
                                lambda: _measure_all(nets, input_shape, config.latency_repeats), readback.COSTS)
        _log(expected_time(measured, [v.name for v in variants], config, len(x_test)))
        rows = []
        for variant in progress.bar(variants, desc="attack variants"):
            net = nets[variant.name]
            clean = _cached_json(out / "models" / f"{variant.name}.clean.json",
                                 {"model": digests[variant.name], "test data": test_digest},
                                 f"clean accuracy of {variant.name}",
                                 lambda: {"accuracy": train.evaluate(net, test_set, device=device)},
                                 readback.CLEAN)["accuracy"]
            cfg = CampaignConfig(bers=config.bers, trials=config.trials, seed=config.seed, device=device,
                                 **config.campaign_target())
            with train.on_device(net, device):  # the campaigns move it there; given back afterwards
                summary, _ = resumed_campaign(net, x_test, y_test, cfg, out / "campaigns" / variant.name,
                                       (digests[variant.name], test_digest), f"campaign of {variant.name}",
                                       record={"variant": variant.name, "data": data_spec})
                bits = _bit_sensitivity(net, x_test, y_test, config, out / "bits" / variant.name,
                                        (digests[variant.name], test_digest), variant.name, device)
            rows.append({
                "name": variant.name, "label": variant.name, "description": variant.description,
                "spec": asdict(variant), "clean_accuracy": clean,
                "golden_accuracy": summary["golden_accuracy"],
                "cost": measured[variant.name],
                "relative_cost": cost.relative(measured[variant.name], measured["baseline"]),
                "results": summary["results"], "bit_sensitivity": bits,
            })
        result = {
            "kind": "compare",
            "model_name": (record or {}).get("model_name", checkpoint.get_spec(model)["builder"]),
            "data": data_spec, "inputs": len(x_test),
            "golden_accuracy": rows[0]["golden_accuracy"] if rows else None,
            "report_ber": config.chosen_report_ber,
            "config": {**config.recorded(), **(record or {})},
            "digests": {"model": model_digest, "train data": train_digest, "test data": test_digest},
            "versions": campaign.versions(),
            "variants": rows,
        }
        files.write_json(out / "summary.json", result)  # strict JSON: browsers read it (NaN -> null)
        report.build_report(out)
        return result


def compare_run(model: nn.Module | None, data_spec: str, out_dir: str | Path, config: CompareConfig, *,
                builder: str | None = None, epochs: int = 5, width: float | None = None, seed: int = 0,
                threads: int | None = None, allow_builder: str | None = None, source: str | None = None,
                log: Callable[[str], Any] | None = None, device: str = "cpu") -> dict[str, Any]:
    """``ftcnn compare`` and ``ftcnn demo``: :func:`run_compare` on ``model``, or, when ``model`` is
    None, on ``builder`` trained first into ``out_dir/model.pt`` (reused when trained from the
    same settings and data: ``pipeline.train_or_reuse``); training and the comparison run on ``device``."""
    out = Path(out_dir)
    if model is None and builder is None:
        raise ValueError("give a CHECKPOINT, or --model to train one first")
    with files.exclusive_folder(out):  # held from the training on: model.pt is this run's too
        if model is None:
            model = pipeline.train_or_reuse(out / "model.pt", builder, data_spec, epochs=epochs, width=width,
                                            seed=seed, threads=threads, allow_builder=allow_builder, log=log,
                                            device=device)
            source = str(out / "model.pt")
        distributed.apply_threads(threads, model)
        with checkpoint.allowing(allow_builder):  # the variants it saved and reloads share the trusted builder
            return run_compare(model, data_spec, out, config, record={
                "checkpoint": str(source), "model_name": checkpoint.get_spec(model)["builder"],
                "normalize": data_mod.resolve_normalize(data_spec).record()}, device=device)  # the inputs'


def headline(summary: dict[str, Any]) -> "rich.table.Table":  # noqa: F821
    """A short terminal table: clean accuracy, accuracy at the report BER, overheads."""
    from rich.table import Table
    ber = summary["report_ber"]
    table = Table(title=f"{summary['model_name']} on {summary['data']}: protections at BER {ber:g}")
    table.add_column("variant", no_wrap=True)
    for col in ("clean", f"acc@{ber:g} ±CI", "+params", "+memory", "+MACs b128", "+MACs b1", "+lat b128", "+lat b1"):
        table.add_column(col, justify="right", no_wrap=True)
    for v in summary["variants"]:
        r = next((r for r in v["results"] if r["ber"] and math.isclose(r["ber"], ber)), None)
        rel = v["relative_cost"]
        acc = "-" if r is None else \
            f"{r['accuracy_mean']:.1%} ±{(r['accuracy_ci'][1] - r['accuracy_ci'][0]) / 2:.1%}"
        def extra(key: str) -> str:  # summaries written before issue 21 hold no macs_b128
            return "-" if rel.get(key) is None else f"{rel[key] - 1:+.0%}"
        table.add_row(v["name"], f"{v['clean_accuracy']:.1%}", acc, extra("params"), extra("memory_bits"),
                      extra("macs_b128"),
                      extra("macs"), extra("latency_b128_ms"), extra("latency_b1_ms"))
    return table
