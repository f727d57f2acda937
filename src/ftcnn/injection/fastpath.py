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
- **Activation faults** (``ActivationShortcut``): the same cuts, placed before
  the layers whose outputs take faults; the faults come from the layers' own
  forward hooks, which fire in a cut as in the model. A transient fault stays
  in its input, so an input with no fault keeps its golden logits and each
  faulty input runs from the cut before its own first faulted layer (inputs
  grouped by cut, groups merged where one forward costs less than two).

Bit-identity with the plain path rests on facts this module checks when it
builds (and falls back to the plain path with a warning when they fail): the
traced graph and its first, middle and last cut give the model's golden
logits bit for bit, cached activations are the values of the same batches
the plain path computes, and (for batched trials) the kernels give the same
bits for a stack of K batches as for each batch alone, and (for activation
faults, input by input) for a subset of a batch's inputs of at least
``min_rows`` as in the whole batch. Models that torch.fx
cannot trace, or whose forward hooks the trace would drop, run the plain path.

One fact it proves from the graph instead of sampling it: no trial writes into
a cached value (``graph.memory_effects``, ``graph.reuse_hazard``). Trials
whose first fault lies past a cut after which the graph writes into memory
computed before it start at an earlier one; a model that writes into its
parameters, buffers or input runs the plain path. What the graph is and how
it is cut lives in ``graph``; this module only runs trials on it.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn

from ftcnn.injection import faults as F
from ftcnn.injection import graph
from ftcnn.injection.graph import Cut

DEFAULT_CACHE_BYTES = 1 << 30   # golden activations kept for the shortcut, per process
MAX_AUTO_BATCH = 32
MAX_MIN_ROWS = 8                # activation shortcut: inputs run together at least (padded), at most this


class GoldenCuts:
    """Golden activations at cuts of a traced model, and forwards from them.

    ``first_use`` maps each fault target (a parameter, or a layer whose output
    takes activation faults) to the position of the first node it changes; cuts
    are placed there, and a trial runs from the deepest cut at or before its
    earliest target. What a fault is and how it gets in is the subclass's:
    parameter faults are written into the weights, activation faults by the
    layers' own forward hooks (the cut calls the model's modules, so they fire).
    """

    def __init__(self, traced: fx.GraphModule, inputs: torch.Tensor, batch_size: int,
                 first_use: dict[str, int], cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.traced, self.inputs, self.batch_size = traced, inputs, batch_size
        self.nodes = list(traced.graph.nodes)
        self.first_use = first_use
        self.effects = graph.memory_effects(traced)
        self.cuts = self._choose_cuts(cache_bytes)
        self.cache = self._fill_cache()

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
                          stacklevel=7)
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
                          "fault lies there run from an earlier layer or the whole model", stacklevel=7)
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

    def cut_at(self, first: int) -> Cut | None:
        """The deepest cached cut at or before graph position ``first`` (None: none is)."""
        best = None
        for cut in self.cuts:
            if cut.position <= first:
                best = cut
        return best

    def _run(self, cut: Cut | None, block: int | None = None,
             before_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """The output over every cached batch (or batch ``block``) from ``cut``;
        ``before_batch(first input of the batch)`` is called before each one."""
        outs = []
        first = 0 if block is None else block
        for number, values in enumerate(self.cache if block is None else self.cache[block:block + 1], first):
            if before_batch is not None:
                before_batch(number * self.batch_size)
            if cut is None:
                outs.append(self.traced(values[self.nodes[0]]))
                continue
            # the golden tensors themselves: the cut was chosen so that nothing writes into them
            outs.append(cut(values))
        return torch.cat(outs)


class Shortcut(GoldenCuts):
    """Parameter-fault trials from the cut before their first faulted layer, and batched trials."""

    def __init__(self, traced: fx.GraphModule, memory: F.ParameterMemory, inputs: torch.Tensor,
                 batch_size: int, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.memory = memory
        self.names = graph.tied_names(traced, memory.params)  # every name of each target's memory
        super().__init__(traced, inputs, batch_size, graph.first_use(traced.graph, memory.stored, self.names),
                         cache_bytes)
        self.owners = graph.owners(self.nodes, memory.stored, self.names)
        self.batchable = len(self.owners) == len(memory.stored) and self._batchable()
        self._batch_checked: bool | None = None

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

    def start(self, faults: F.Faults) -> Cut | None:
        """The deepest cached cut at or before the trial's earliest faulted layer."""
        return self.cut_at(min((self.first_use[self.memory.canonical(name)]
                                for name, (idx, _) in faults.sites.items() if len(idx)), default=len(self.nodes)))

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


# what building a parameter shortcut costs, in inferences of every input: the golden activations
# recorded once, then the verification's traced run and up to three cut runs. Measured: 3.9 s of
# set-up against 0.76 s per inference (ResNet-20 with weight checks, 800 inputs, 1 thread)
SETUP_INFERENCES = 4


def node_work(traced: fx.GraphModule, example: torch.Tensor) -> list[float]:
    """A work estimate per node of ``traced`` from one input ``example``: MACs for a module call
    that holds a Conv2d or Linear (output elements x its fan-in), output elements otherwise."""
    sizes = {n: v.numel() for n, v in graph.record(traced, example[:1], traced.graph.nodes)[1].items()
             if isinstance(v, torch.Tensor)}
    work = []
    for node in traced.graph.nodes:
        out = float(sizes.get(node, 0))
        fan_in = 0
        if node.op == "call_module":
            for sub in traced.get_submodule(str(node.target)).modules():
                if isinstance(sub, (nn.Conv2d, nn.Linear)):
                    fan_in = max(fan_in, sub.weight[0].numel())
        work.append(out * max(1, fan_in))
    return work


def expected_skip(first_use: Mapping[str, int], faults_per_target: Mapping[str, float],
                  work: Sequence[float]) -> float:
    """The expected share of one trial's work before its first faulted target's node: what the
    shortcut could skip at most (it starts at a cached cut at or before that node). Targets take
    independent Poisson numbers of faults (``faults_per_target``: their means); a trial with no
    fault counts as nothing skipped (``skip_fault_free`` skips it without the shortcut).

        >>> round(expected_skip({"a": 1, "b": 3}, {"a": 0.0, "b": 1e9}, [0, 1, 1, 1, 1]), 3)
        0.5
    """
    total = float(sum(work)) or 1.0
    before = np.concatenate([[0.0], np.cumsum(np.asarray(work, dtype=np.float64))])
    by_position: dict[int, float] = {}
    for name, mean in faults_per_target.items():
        p = first_use.get(name, 0)
        by_position[p] = by_position.get(p, 0.0) + mean
    survive, skipped = 1.0, 0.0
    for p in sorted(by_position):
        hit = 1.0 - float(np.exp(-by_position[p]))
        skipped += survive * hit * float(before[min(p, len(before) - 1)]) / total
        survive *= 1.0 - hit
    return skipped


def pays(model: nn.Module, memory: F.ParameterMemory, inputs: torch.Tensor, trials_at: Mapping[float, int],
         trial_inputs: int, bits_per_element: int) -> tuple[bool, str]:
    """Whether building the parameter shortcut pays for a campaign that runs ``trials_at[rate]``
    trials drawing each bit at ``rate`` (``bits_per_element`` of each value can be hit), each on
    ``trial_inputs`` of the ``len(inputs)`` inputs: the work its cuts can skip at most
    (:func:`expected_skip`) against its set-up (``SETUP_INFERENCES``), and why. Untraceable
    models: True (``build`` says why it falls back). Only speed depends on it, never a number."""
    traced = graph.trace(model, "shortcut")
    if traced is None or len(inputs) == 0:
        return True, "untraced"
    first = graph.first_use(traced.graph, memory.stored, graph.tied_names(traced, memory.params))
    work = node_work(traced, inputs)
    share = trial_inputs / len(inputs)
    drawn = {n: t.numel() * bits_per_element for n, t in memory.stored.items() if n not in memory.spared}
    saved = sum(trials * share * expected_skip(first, {n: rate * b for n, b in drawn.items()}, work)
                for rate, trials in trials_at.items())
    return saved > SETUP_INFERENCES, (f"the cuts could skip at most {saved:.2f} inferences of every input "
                                       f"against {SETUP_INFERENCES} to build them")


def build(model: nn.Module, memory: F.ParameterMemory, inputs: torch.Tensor, batch_size: int,
          golden_logits: torch.Tensor, cache_bytes: int = DEFAULT_CACHE_BYTES) -> Shortcut | None:
    """A verified shortcut for ``model``, or None (with a warning) to run the plain path."""
    return _verified(model, "shortcut", golden_logits,
                     lambda traced: Shortcut(traced, memory, inputs, batch_size, cache_bytes))


class ActivationShortcut(GoldenCuts):
    """Activation-fault trials from the cut before their first hooked layer, input by input.

    The faults are put in by ``activations.activation_faults``' forward hooks on
    the layers themselves; a cut calls the model's own modules (``graph.Cut``
    shares them), so the hooks fire there exactly as in a whole forward, and the
    layers before the cut, which no hook touches, give their golden values. A
    layer that is no module call of the trace (a module fx inlined, such as a
    residual block, or the root) is at position 0: trials hooking it run the
    whole model, where its hook fires.

    Transient faults go further: a fault in one input's activations never
    reaches another input, so an input without a fault keeps its golden logits
    and each faulty input runs from the cut before *its* first faulted layer,
    with the other inputs of that cut (at BER 1e-6 on LeNet-5, 4 inputs in 5 run
    nothing). That takes kernels that give a row the same bits whichever rows
    share its batch, and they do not at every batch size: on this CPU a Linear
    layer's rows differ in the last bit at 1 to 3 rows (another kernel) and
    agree from 4 on. So when the shortcut is built, every cut runs subsets of
    1..8, 13, 32 and all-but-one inputs of the first batch; ``min_rows`` is the
    smallest size from which every one of them gives the whole batch's bits,
    and a smaller group of inputs runs padded to it (its inputs repeated, the
    copies fault-free and dropped). Where no size up to 8 qualifies
    (``min_rows`` None), trials run whole batches from the cut before their
    first hooked layer.
    """

    def __init__(self, traced: fx.GraphModule, layers: Sequence[str], inputs: torch.Tensor,
                 batch_size: int, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        # a layer "read" by a module call: its own call, or that of a leaf module holding it
        super().__init__(traced, inputs, batch_size, graph.first_use(traced.graph, layers), cache_bytes)
        self._positions = np.array([cut.position for cut in self.cuts], dtype=np.int64)
        self.min_rows = self._min_rows()

    def start(self, layers: Iterable[str]) -> Cut | None:
        """The deepest cached cut at or before the earliest of ``layers`` (those a trial hooks)."""
        return self.cut_at(min((self.first_use[name] for name in layers), default=len(self.nodes)))

    @torch.inference_mode()
    def logits(self, layers: Sequence[str], faulty_inputs: Mapping[str, np.ndarray] | None,
               begin: Callable[[int, np.ndarray | None], None]) -> torch.Tensor | None:
        """Logits over every input for a trial hooking ``layers`` (the caller's hooks in place),
        or None when the trial must run the whole model. ``faulty_inputs``: per hooked layer,
        the inputs it changes (None: all of them); ``begin(offset, rows)`` is called before each
        forward (rows: the inputs it runs, when not the whole batch from ``offset``)."""
        if faulty_inputs is None or self.min_rows is None:
            cut = self.start(layers)
            return None if cut is None else self._run(cut, before_batch=lambda offset: begin(offset, None))
        first = np.full(len(self.inputs), len(self.nodes), dtype=np.int64)  # each input's first faulted node
        for name, rows in faulty_inputs.items():
            np.minimum.at(first, rows, self.first_use[name])
        if first.min() == 0:  # a layer outside the trace changes some input: only the model can run it
            return None
        start = np.searchsorted(self._positions, first, side="right") - 1  # the cut of each input, -1: none
        start[first == len(self.nodes)] = len(self.cuts)                   # untouched: golden logits
        outs = []
        for number, values in enumerate(self.cache):
            lo = number * self.batch_size
            out = self._traced_logits[lo:lo + self.batch_size].clone()
            block = start[lo:lo + len(out)]
            groups, counts = np.unique(block[block < len(self.cuts)], return_counts=True)
            segments = self._schedule(groups, counts, len(out))
            if segments is None:   # every input, from the earliest cut: cheaper than picking rows
                begin(lo, None)
                first_cut = int(groups[0])
                out = self._run(None if first_cut < 0 else self.cuts[first_cut], number)
            for which, members in segments or []:
                local = np.flatnonzero(np.isin(block, members))
                padded = np.sort(np.resize(local, max(len(local), self.min_rows)))  # repeats: fault-free
                begin(lo, padded + lo)   # the injector faults the first copy of each input only
                result = self._run_rows(None if which < 0 else self.cuts[which], values, padded)
                out[torch.from_numpy(local)] = result[torch.from_numpy(np.searchsorted(padded, local))]
            outs.append(out)
        return torch.cat(outs)

    def _schedule(self, groups: np.ndarray, counts: np.ndarray, size: int
                  ) -> list[tuple[int, np.ndarray]] | None:
        """How to run one batch whose faulty inputs start at cuts ``groups`` (ascending cut
        numbers, -1: the whole graph), ``counts`` inputs each: consecutive groups merged into
        forwards from the earliest cut of each (cut, groups it runs), the cheapest by the
        cost measured at build (``_cost``); None when all ``size`` inputs from the
        earliest cut cost less. Only speed depends on it: every choice gives the same bits."""
        m = len(groups)
        if not m:
            return []
        def cost(cut: int, rows: int) -> float:
            per_forward, per_row = self._cost[int(cut)]
            return per_forward + per_row * max(rows, self.min_rows or 1)
        rows_after = np.concatenate([np.cumsum(counts[::-1])[::-1], [0]])  # inputs in groups i..m-1
        best = [0.0] * (m + 1)   # best[i]: groups i.. run cheapest (DP from the deepest group up)
        split = [m] * (m + 1)
        for i in range(m - 1, -1, -1):
            best[i], split[i] = min((cost(groups[i], int(rows_after[i] - rows_after[j])) + best[j], j)
                                    for j in range(i + 1, m + 1))
        if cost(groups[0], size) <= best[0]:
            return None
        segments, i = [], 0
        while i < m:
            segments.append((int(groups[i]), groups[i:split[i]]))
            i = split[i]
        return segments

    def _run_rows(self, cut: Cut | None, values: Mapping[fx.Node, Any], local: np.ndarray) -> Any:
        """The output for rows ``local`` of one cached batch, from ``cut`` (None: the whole graph)."""
        index = torch.from_numpy(local)
        if cut is None:
            return self.traced(values[self.nodes[0]].index_select(0, index))
        return cut.module(*[values[v].index_select(0, index) for v in cut.live])

    @torch.inference_mode()
    def _min_rows(self) -> int | None:
        """The smallest number of inputs from which every cut, and the whole graph, gives the
        rows of the first batch the bits they get in the whole batch (see the class doc), or
        None (with a warning) when none up to ``MAX_MIN_ROWS`` does."""
        values = self.cache[0] if self.cache else {}
        size = min(self.batch_size, len(self.inputs))
        if not size or any(not isinstance(values[v], torch.Tensor) or values[v].dim() == 0
                           or values[v].shape[0] != size for cut in self.cuts for v in cut.live):
            return None   # a live value without the batch first: rows cannot be picked from it
        sizes = sorted({k for k in [*range(1, MAX_MIN_ROWS + 1), 13, 32, size - 1] if 1 <= k <= size})
        rng = np.random.default_rng(0)   # which rows: fixed, so a build is reproducible
        exact = {k: True for k in sizes}
        seconds: dict[int, list[tuple[int, float]]] = {}   # cut number -> (rows, seconds) of each probe
        for k in sizes:
            local = np.sort(rng.choice(size, k, replace=False))
            for number, cut in enumerate([None, *self.cuts], -1):
                began = time.perf_counter()
                try:
                    out = self._run_rows(cut, values, local)
                except Exception:  # a batch size fixed in the model, a value shared across rows
                    out = None
                seconds.setdefault(number, []).append((k, time.perf_counter() - began))
                if not isinstance(out, torch.Tensor) or not torch.equal(out, self._traced_logits[local]):
                    exact[k] = False
                    break
        # seconds per forward and per input from each cut (a line through the probes): only speed
        self._cost = {number: _line([k for k, _ in probes], [t for _, t in probes])
                      for number, probes in seconds.items()}
        smallest = next((k for k in sizes if k <= MAX_MIN_ROWS and all(exact[j] for j in sizes if j >= k)), None)
        if smallest is None:
            warnings.warn("activation shortcut: per-input recomputation off (no batch size up to "
                          f"{MAX_MIN_ROWS} gives an input the bits it gets in its whole batch); faulty "
                          "trials run whole batches from their first hooked layer", stacklevel=6)
        return smallest


def _line(xs: Sequence[int], ys: Sequence[float]) -> tuple[float, float]:
    """Intercept and slope of the least-squares line through (xs, ys), both >= 0."""
    if len(set(xs)) < 2:
        return (max(0.0, float(np.mean(ys))) if ys else 0.0), 0.0
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return max(0.0, float(intercept)), max(0.0, float(slope))


def build_for_activations(model: nn.Module, layers: Sequence[str], inputs: torch.Tensor, batch_size: int,
                          plain_logits: torch.Tensor, cache_bytes: int = DEFAULT_CACHE_BYTES
                          ) -> ActivationShortcut | None:
    """A verified activation-fault shortcut for ``model`` (``plain_logits``: its logits with
    no hook, not rounded to an emulated format), or None (with a warning) for the plain path."""
    return _verified(model, "activation shortcut", plain_logits,
                     lambda traced: ActivationShortcut(traced, layers, inputs, batch_size, cache_bytes))


def _verified(model: nn.Module, purpose: str, golden_logits: torch.Tensor,
              make: Callable[[fx.GraphModule], GoldenCuts]) -> Any:
    """``make(trace of model)`` if the trace and its cuts give ``golden_logits`` bit for bit,
    else None with a one-line warning ("``purpose`` off: why; running the plain path")."""
    traced = graph.trace(model, purpose)
    if traced is None:
        return None
    if sum(n.op == "placeholder" for n in traced.graph.nodes) != 1:
        warnings.warn(f"{purpose} off: the model's forward takes more than one input; "
                      "running the plain path", stacklevel=3)
        return None
    try:
        shortcut = make(traced)
    except Exception as exc:  # e.g. data-dependent control flow fx did not see
        warnings.warn(f"{purpose} off: {type(exc).__name__}: {str(exc)[:100]}; running the plain path",
                      stacklevel=3)
        return None
    if not shortcut.verify(golden_logits):
        warnings.warn(f"{purpose} off: the traced graph does not reproduce the model's golden logits "
                      "bit for bit; running the plain path", stacklevel=3)
        return None
    return shortcut
