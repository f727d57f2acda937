"""Exact shortcuts for fault campaigns (design §7).

Every fault-injection tool spends about one clean inference of the test split
per trial. To be faster, do less inference per trial, and get the same bits:

- **Start at the first faulted layer.** The model is traced once with torch.fx
  (``graph.trace``). Every node computed before a trial's earliest faulted
  layer (in the graph's real execution order, not module order) has its
  golden value, so a trial runs only the graph from a *cut* before that layer
  (``graph.cut_from``), fed with golden activations cached per input batch.
  Cuts are placed at the layers that hold fault targets, deepest first, while
  the cache fits a memory budget; a trial whose first fault lies before every
  cached cut runs the whole model.
- **Batched trials.** K trials are evaluated in one pass: the activations of
  the K trials are stacked along the batch dimension, layers that no trial
  faults run once on the stack, and a layer faulted in some trial runs once
  per trial on that trial's slice with that trial's faults injected (the same
  call, batch size and kernel as the plain path). It helps where a bigger
  batch uses the hardware better (GPU, small layers); on CPU it rarely does,
  so the automatic K is 1 there. (``torch.func.vmap`` over stacked
  parameters was tried first: its grouped kernels gave logits up to 6e-8 away
  from the plain path's on LeNet-5, so not the same numbers, and it was no
  faster on CPU.)

Bit-identity with the plain path rests on facts this module checks when it
builds (and falls back to the plain path with a warning when they fail): the
traced graph and its first, middle and last cut give the model's golden
logits bit for bit, cached activations are the values of the same batches
the plain path computes, and (for batched trials) the kernels give the same
bits for a stack of K batches as for each batch alone. Models that torch.fx
cannot trace, or whose forward hooks the trace would drop, run the plain path.

One fact it proves from the graph instead of sampling it: no trial writes into
a cached value (``graph.memory_effects``, ``graph.reuse_hazard``). Trials
whose first fault lies past a cut after which the graph writes into memory
computed before it start at an earlier one; a model that writes into its
parameters, buffers or input runs the plain path. What the graph is and how
it is cut lives in ``graph``; this module only runs trials on it.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import fx, nn

from ftcnn import faults as F
from ftcnn import graph
from ftcnn.graph import Cut

DEFAULT_CACHE_BYTES = 1 << 30   # golden activations kept for the shortcut, per process
MAX_AUTO_BATCH = 32


class Shortcut:
    """Golden activations at cuts of a traced model, and trial forwards from them."""

    def __init__(self, traced: fx.GraphModule, memory: F.ParameterMemory, inputs: torch.Tensor,
                 batch_size: int, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.traced, self.memory, self.inputs, self.batch_size = traced, memory, inputs, batch_size
        self.nodes = list(traced.graph.nodes)
        self.names = graph.tied_names(traced, memory.params)  # every name of each target's memory
        self.first_use = graph.first_use(traced.graph, memory.stored, self.names)
        self.effects = graph.memory_effects(traced)
        self.cuts = self._choose_cuts(cache_bytes)
        self.cache = self._fill_cache()
        self.owners = graph.owners(self.nodes, memory.stored, self.names)
        self.batchable = len(self.owners) == len(memory.stored) and self._batchable()
        self._batch_checked: bool | None = None

    # --- building ---------------------------------------------------------

    def _first_compute(self) -> int:
        return next(i for i, n in enumerate(self.nodes) if n.op != "placeholder")

    def _per_input_bytes(self) -> dict[fx.Node, int]:
        return graph.activation_bytes(self.traced, self.inputs[:1])

    def _choose_cuts(self, budget: int) -> list[Cut]:
        """Deepest layers first (they are cheap to cache and, in CNNs, hold most
        parameters, hence most faults), as long as the cache fits ``budget``;
        never a cut after which the graph writes into memory computed before it
        (``graph.reuse_hazard``)."""
        self.cache_bytes_used = 0
        start = self._first_compute()
        candidates = sorted({p for p in self.first_use.values() if p > start}, reverse=True)
        hazards = {p: why for p in candidates
                   if (why := graph.reuse_hazard(self.effects, self.nodes, self.nodes[p:])) is not None}
        if hazards:
            warnings.warn(f"shortcut: {len(hazards)} of {len(candidates)} layers cannot start a trial, since "
                          f"the graph writes into values computed before them ({next(iter(hazards.values()))}); "
                          "trials whose first fault lies there run from an earlier layer or the whole model",
                          stacklevel=4)
            candidates = [p for p in candidates if p not in hazards]
        if not candidates:
            return []
        per_input = self._per_input_bytes()
        n = len(self.inputs)
        chosen: list[Cut] = []
        cached: set[fx.Node] = set()
        used, dropped = 0, 0
        for position in candidates:
            live = [v for v in graph.live_before(self.nodes, position) if v.op != "placeholder"]
            cost = sum(per_input[v] * n for v in live if v not in cached)
            if used + cost > budget:
                dropped += 1
                continue
            used += cost
            cached.update(live)
            chosen.append(graph.cut_from(self.traced, position))
        if dropped and budget > 0:
            warnings.warn(f"shortcut: golden activations before {dropped} of {len(candidates)} layers "
                          f"exceed the cache budget ({budget / 2**20:.3g} MiB); trials whose first "
                          "fault lies there run from an earlier layer or the whole model", stacklevel=4)
        self.cache_bytes_used = used
        return sorted(chosen, key=lambda c: c.position)

    @torch.inference_mode()
    def _fill_cache(self) -> list[dict[fx.Node, Any]]:
        keep = {v for cut in self.cuts for v in cut.live if v.op != "placeholder"}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        cache, outputs = [], []
        for i in range(0, len(self.inputs), self.batch_size):
            batch = self.inputs[i:i + self.batch_size]
            output, kept = graph.record(self.traced, batch, keep)
            outputs.append(output)
            values: dict[fx.Node, Any] = {placeholders[0]: batch} if placeholders else {}
            values.update(kept)
            cache.append(values)
        self._traced_logits = torch.cat(outputs)  # checked against the model's in verify()
        return cache

    def _batchable(self) -> bool:
        """Batched trials need every fault target to be read by one module (called
        any number of times) and nothing else: a weight tied between two modules
        would be faulted in one and golden in the other."""
        for name in self.memory.stored:
            readers = [n for n in self.nodes if any(graph.reads(n, a) for a in self.names[name])]
            if any(n.op == "get_attr" for n in readers):
                return False
            if len({str(n.target) for n in readers if n.op == "call_module"}) != 1:
                return False
        return True

    def verify(self, golden_logits: torch.Tensor, samples: int = 3) -> bool:
        """Whether the traced graph and a few cuts (first, middle, last) reproduce
        the golden logits bit for bit (each check costs part of one inference)."""
        n = len(self.cuts)
        picks = sorted({i * (n - 1) // max(1, samples - 1) for i in range(samples)}) if n else []
        with torch.inference_mode():
            if not torch.equal(self._traced_logits, golden_logits):
                return False
            return all(torch.equal(self._run(self.cuts[i]), golden_logits) for i in picks)

    # --- running ----------------------------------------------------------

    def start(self, faults: F.Faults) -> Cut | None:
        """The deepest cached cut at or before the trial's earliest faulted layer."""
        first = min((self.first_use[self.memory.canonical(name)]
                     for name, (idx, _) in faults.sites.items() if len(idx)), default=len(self.nodes))
        best = None
        for cut in self.cuts:
            if cut.position <= first:
                best = cut
        return best

    def _run(self, cut: Cut | None, block: int | None = None) -> torch.Tensor:
        outs = []
        for values in self.cache if block is None else self.cache[block:block + 1]:
            if cut is None:
                outs.append(self.traced(values[self.nodes[0]]))
                continue
            # the golden tensors themselves: the cut was chosen so that nothing writes into them
            outs.append(cut(values))
        return torch.cat(outs)

    @torch.inference_mode()
    def logits(self, faults: F.Faults, block: int | None = None) -> torch.Tensor | None:
        """Logits of the faulty model from the best cut (faults must be injected
        by the caller), of every input or of one batch (``block``), or None when
        the trial must run the whole model."""
        cut = self.start(faults)
        return None if cut is None else self._run(cut, block)

    # --- batched trials -----------------------------------------------------

    def batch_exact(self, k: int, golden_logits: torch.Tensor) -> bool:
        """Whether a stack of ``k`` batches gives the same bits as each batch alone."""
        if self._batch_checked is None:
            with torch.inference_mode():
                stacked = self._run_batched([F.Faults({})] * k, use_cuts=False)
            self._batch_checked = all(torch.equal(s, golden_logits) for s in stacked)
        return self._batch_checked

    @torch.inference_mode()
    def batched_logits(self, trials: Sequence[F.Faults], use_cuts: bool = True) -> list[torch.Tensor]:
        """Logits of several faulty trials in one pass (faults not injected by the caller)."""
        return self._run_batched(trials, use_cuts)

    def _run_batched(self, trials: Sequence[F.Faults], use_cuts: bool) -> list[torch.Tensor]:
        starts = [self.start(f) if use_cuts else None for f in trials]
        cut = None if any(s is None for s in starts) else min(starts, key=lambda c: c.position)
        module = self.traced if cut is None else cut.module
        per_module: dict[str, list[F.Faults | None]] = {}
        for k, faults in enumerate(trials):
            by_owner: dict[str, list[str]] = {}
            for name, (idx, _) in faults.sites.items():
                if len(idx):
                    by_owner.setdefault(self.owners[self.memory.canonical(name)], []).append(name)
            for target, names in by_owner.items():
                per_module.setdefault(target, [None] * len(trials))[k] = _restrict(faults, names)
        outs: list[list[torch.Tensor]] = [[] for _ in trials]
        for values in self.cache:
            if cut is None:
                args = [values[self.nodes[0]]]
            else:
                args = [values[v] for v in cut.live]
            stacked = [torch.cat([a] * len(trials)) if isinstance(a, torch.Tensor) else a for a in args]
            runner = _PerTrialModules(module, self.memory, per_module, len(trials))
            result = runner.run(*stacked)
            for k, chunk in enumerate(result.chunk(len(trials))):
                outs[k].append(chunk)
        return [torch.cat(o) for o in outs]


def _restrict(faults: F.Faults, names: Sequence[str]) -> F.Faults | None:
    sites = {n: faults.sites[n] for n in names if len(faults.sites[n][0])}
    return F.Faults(sites, faults.mode, faults.values) if sites else None  # values: by name, kept whole


class _PerTrialModules(fx.Interpreter):
    """Runs a graph on K stacked trials; a module some trial faults runs once per
    trial on that trial's slice, with that trial's faults injected."""

    def __init__(self, module: fx.GraphModule, memory: F.ParameterMemory,
                 per_module: dict[str, list[F.Faults | None]], k: int) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.memory, self.per_module, self.k = memory, per_module, k

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        trial_faults = self.per_module.get(str(target))
        if trial_faults is None:
            return super().call_module(target, args, kwargs)
        submod = self.fetch_attr(target)
        pieces = [_chunk(a, self.k) for a in args]
        outs = []
        for k in range(self.k):
            chunk_args = [p[k] if isinstance(p, list) else p for p in pieces]
            faults = trial_faults[k]
            if faults is None:
                outs.append(submod(*chunk_args, **kwargs))
            else:
                with F.injected(self.memory, faults):
                    outs.append(submod(*chunk_args, **kwargs))
        return torch.cat(outs)


def _chunk(value: Any, k: int) -> Any:
    if isinstance(value, torch.Tensor):
        return list(value.chunk(k))
    return value


def auto_batch_trials(model: nn.Module, inputs: torch.Tensor, batch_size: int,
                      device: torch.device | str | None = None) -> int:
    """Default K for batched trials.

    CPU: 1 — oneDNN already keeps the cores busy with a batch of 1,000 inputs,
    and the measured gain of stacking trials was nil (benchmarks/campaign_throughput.py).
    CUDA: as many trials as fit a quarter of the free device memory, counting
    K times the largest activation of one input batch three times over (its
    input, output and a workspace), at most 32.
    """
    device = torch.device(device if device is not None else inputs.device)
    if device.type != "cuda":
        return 1
    largest = graph.largest_activation_bytes(model, inputs[:1])
    if largest is None:
        return 1
    largest *= min(batch_size, len(inputs))
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(MAX_AUTO_BATCH, (free // 4) // max(1, 3 * largest))))


def build(model: nn.Module, memory: F.ParameterMemory, inputs: torch.Tensor, batch_size: int,
          golden_logits: torch.Tensor, cache_bytes: int = DEFAULT_CACHE_BYTES) -> Shortcut | None:
    """A verified shortcut for ``model``, or None (with a warning) to run the plain path."""
    traced = graph.trace(model)
    if traced is None:
        return None
    if sum(n.op == "placeholder" for n in traced.graph.nodes) != 1:
        warnings.warn("shortcut off: the model's forward takes more than one input; "
                      "running the plain path", stacklevel=2)
        return None
    try:
        shortcut = Shortcut(traced, memory, inputs, batch_size, cache_bytes)
    except Exception as exc:  # e.g. data-dependent control flow fx did not see
        warnings.warn(f"shortcut off: {type(exc).__name__}: {str(exc)[:100]}; running the plain path",
                      stacklevel=2)
        return None
    if not shortcut.verify(golden_logits):
        warnings.warn("shortcut off: the traced graph does not reproduce the model's golden logits "
                      "bit for bit; running the plain path", stacklevel=2)
        return None
    return shortcut
