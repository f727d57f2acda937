"""Exact shortcuts for fault campaigns (design §7).

Every fault-injection tool spends about one clean inference of the test split
per trial. To be faster, do less inference per trial, and get the same bits:

- **Start at the first faulted layer.** The model is traced once with torch.fx.
  Every node computed before a trial's earliest faulted layer (in the graph's
  real execution order, not module order) has its golden value, so a trial
  runs only the graph from a *cut* before that layer, fed with golden
  activations cached per input batch. Cuts are placed at the layers that hold
  fault targets, deepest first, while the cache fits a memory budget; a trial
  whose first fault lies before every cached cut runs the whole model.
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
bits for a stack of K batches as for each batch alone. Models that torch.fx cannot trace run the plain path.

One fact it proves from the graph instead of sampling it: no trial writes into
a cached value. Cached activations are references to the golden run's
tensors, and a graph may write into memory it computed earlier (in-place ops
such as ``relu_`` or ``operator.setitem``, ``inplace=True`` modules and flags,
``out=`` arguments), through any alias of it (views: ``view``, ``reshape``,
``flatten``, ``transpose``, slicing, ``detach``, ...). ``memory_effects``
finds every write and the values each node's memory may be shared with
(over-approximated: an op not known to allocate is taken to alias all its
inputs), and ``reuse_hazard`` refuses to start a trial at a cut after which
something writes into memory computed before it (a trial would read a stale
golden value, or corrupt the cache for the next trial). Trials whose first
fault lies past such a cut start at an earlier one. A model that writes into
its parameters, buffers or input runs the plain path.
"""

from __future__ import annotations

import functools
import inspect
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from ftcnn import faults as F

DEFAULT_CACHE_BYTES = 1 << 30   # golden activations kept for the shortcut, per process
MAX_AUTO_BATCH = 32


@dataclass
class Cut:
    """A place to start a trial's forward: the graph from ``position`` on.

    ``live`` are the nodes computed before the cut whose values the rest of the
    graph needs (the sub-graph's inputs); ``module`` computes the rest.
    """

    position: int
    live: list[fx.Node]
    module: fx.GraphModule


class _ProtectionLeafTracer(fx.Tracer):
    """Keeps protection modules with attackable values (``faults.protection_buffers``:
    range bounds of corrections and restrictions) whole, so their bounds are
    read by one ``call_module`` node instead of ``get_attr`` nodes: a trial
    that faults a bound is then cut right before that call, and batched
    trials can run the module per trial with that trial's bounds."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return bool(F.protection_buffers(m)) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with protection modules kept as leaves (same ops, same bits)."""
    tracer = _ProtectionLeafTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def trace(model: nn.Module, purpose: str = "shortcut") -> fx.GraphModule | None:
    """torch.fx trace of ``model``, or None (with a warning "``purpose`` off: ...")
    when it cannot be used.

    Hooks on modules that the trace inlines would be silently lost, so such
    models are refused too.
    """
    try:
        traced = symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds of errors on untraceable code
        warnings.warn(f"{purpose} off: torch.fx cannot trace the model ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:100] if str(exc) else ''}); running the plain path",
                      stacklevel=3)
        return None
    called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    for name, module in model.named_modules():
        if name not in called and (module._forward_hooks or module._forward_pre_hooks):
            warnings.warn(f"{purpose} off: module {name or 'model'!r} has forward hooks that tracing would "
                          "skip; running the plain path", stacklevel=3)
            return None
    return traced


def first_use(graph: fx.Graph, targets: Iterable[str],
              aliases: Mapping[str, Sequence[str]] | None = None) -> dict[str, int]:
    """Tensor name -> position (in execution order) of the first node that reads it.

    ``aliases`` gives a tensor's names (``faults.tied_names``): a weight tied
    between two modules is first used by whichever of them runs first, which
    need not be the one whose name the fault targets list. A tensor no node
    reads explicitly gets position 0, which means "run the whole model" for
    any trial that faults it.
    """
    nodes = list(graph.nodes)
    result: dict[str, int] = {}
    for name in targets:
        names = (aliases or {}).get(name) or [name]
        positions = [i for i, n in enumerate(nodes) if any(reads(n, a) for a in names)]
        result[name] = min(positions) if positions else 0
    return result


def reads(node: fx.Node, tensor: str) -> bool:
    """Whether ``node`` reads the parameter/buffer named ``tensor`` (a module call
    of its module or of a leaf module above it, or a ``get_attr`` of it)."""
    if node.op in ("call_module", "get_attr"):
        target = str(node.target)
        return tensor == target or tensor.startswith(target + ".")
    return False


def live_before(nodes: Sequence[fx.Node], position: int) -> list[fx.Node]:
    """Nodes computed before ``position`` whose values are used at or after it."""
    index = {n: i for i, n in enumerate(nodes)}
    return [n for n in nodes[:position] if any(index[u] >= position for u in n.users)]


def subgraph(traced: fx.GraphModule, position: int) -> Cut:
    """The graph from ``position`` on, taking the live values as inputs.

    The new module shares the traced model's submodules (no copy), so faults
    injected into the model's parameters are what it computes with.
    """
    nodes = list(traced.graph.nodes)
    live = live_before(nodes, position)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: graph.placeholder(f"cut_{n.name}") for n in live}
    for node in nodes[position:]:
        env[node] = graph.node_copy(node, lambda a: env[a])
    return Cut(position, live, fx.GraphModule(traced, graph))


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor))


class Recorder(fx.Interpreter):
    """Runs the traced graph and keeps the values of the nodes asked for.

    The values kept are the run's own tensors, not copies: at the end of the
    run each holds what its memory holds then. A value written after it was
    computed (an in-place ReLU on it, before the cut) is kept as the write
    left it, which is what the nodes after the write read; a copy taken when
    the value was computed would be stale. This is the golden value at a cut
    as long as nothing at or after the cut writes into it, which is what
    ``reuse_hazard`` checks.
    """

    def __init__(self, module: fx.GraphModule, keep: Iterable[fx.Node]) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.keep, self.kept = set(keep), {}

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node in self.keep:
            self.kept[node] = value
        return value


# --- what a graph writes, and which values share memory ---------------------------

def _classes(module: Any, names: str) -> tuple[type, ...]:
    return tuple(getattr(module, n) for n in names.split() if hasattr(module, n))


# torch.nn leaf modules that return newly allocated memory (when not inplace)
_FRESH_MODULES: tuple[type, ...] = (
    _classes(nn.modules.conv, "_ConvNd")
    + _classes(nn.modules.batchnorm, "_NormBase")
    + _classes(nn.modules.pooling, "_MaxPoolNd _AvgPoolNd _AdaptiveAvgPoolNd _AdaptiveMaxPoolNd _LPPoolNd")
    + _classes(nn.modules.padding, "_ConstantPadNd _ReflectionPadNd _ReplicationPadNd _CircularPadNd")
    + _classes(nn, "Linear Bilinear GroupNorm LayerNorm LocalResponseNorm Embedding Upsample "
               "ReLU ReLU6 LeakyReLU ELU SELU CELU SiLU Mish Hardswish Hardsigmoid Hardtanh Threshold "
               "GELU Sigmoid Tanh Softplus Softsign Softmax Softmin LogSoftmax LogSigmoid PReLU "
               "Hardshrink Softshrink Tanhshrink"))

# ops that return newly allocated memory, never an input (nor a view of one).
# Absent on purpose: dropout (returns its input in eval), contiguous, to, float,
# type_as, reshape, flatten, einsum, ... (each may return its input or a view)
_FRESH_NAMES = (
    "add sub subtract mul multiply div divide true_divide floor_divide remainder fmod pow neg negative abs "
    "exp exp2 expm1 log log2 log10 log1p sqrt rsqrt square sin cos tan tanh sigmoid relu relu6 gelu silu "
    "mish elu selu celu leaky_relu hardtanh hardswish hardsigmoid softplus softsign softmax log_softmax "
    "erf sign round floor ceil trunc reciprocal clamp clip minimum maximum fmin fmax where cat concat "
    "concatenate stack matmul mm bmm addmm sum mean prod amax amin max min argmax argmin std var norm "
    "logsumexp cumsum cumprod index_select gather masked_select masked_fill index_copy index_add "
    "index_fill scatter scatter_add take flip roll zeros_like ones_like full_like empty_like rand_like "
    "randn_like clone isnan isinf isfinite nan_to_num logical_and logical_or logical_not logical_xor "
    "eq ne lt le gt ge bitwise_and bitwise_or bitwise_xor bitwise_not topk sort argsort lerp addcmul "
    "addcdiv outer dot conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear "
    "bilinear batch_norm layer_norm group_norm instance_norm local_response_norm max_pool1d max_pool2d "
    "max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d "
    "adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d interpolate pad "
    "normalize embedding one_hot").split()
_FRESH_METHODS = frozenset(_FRESH_NAMES)
_FRESH_FUNCTIONS = frozenset(
    [getattr(mod, n) for mod in (torch, nn.functional, torch._C._nn) for n in _FRESH_NAMES if hasattr(mod, n)]
    + [operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
       operator.pow, operator.matmul, operator.neg, operator.abs, operator.invert, operator.and_,
       operator.or_, operator.xor, operator.lshift, operator.rshift, operator.lt, operator.le,
       operator.gt, operator.ge, operator.eq, operator.ne, len])
# results that are no tensor (sizes, flags), so no memory to share
_SCALAR_METHODS = frozenset("size dim ndimension numel nelement element_size stride storage_offset "
                            "is_contiguous is_floating_point item tolist get_device data_ptr __len__".split())
_SCALAR_ATTRS = frozenset("shape dtype device ndim is_cuda layout requires_grad is_sparse is_quantized".split())
_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                                operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
                                operator.ixor, operator.ilshift, operator.irshift, operator.setitem,
                                operator.delitem})
_INPLACE_DUNDERS = frozenset("__iadd__ __isub__ __imul__ __itruediv__ __ifloordiv__ __imod__ __ipow__ "
                             "__imatmul__ __iand__ __ior__ __ixor__ __ilshift__ __irshift__ "
                             "__setitem__ __delitem__".split())
_KNOWN_MODULES = frozenset({"torch", "_operator", "operator", "builtins", "math"})  # top-level packages


@dataclass
class MemoryEffects:
    """Which memory each node of a graph may share and write (over-approximated).

    ``roots``: per node, the nodes whose allocations its value may be part of:
    itself for an op known to allocate, the roots of its inputs for a view,
    an in-place op or any op not known to allocate, none for a size or a flag.
    ``writes``: per node that may write into memory, the roots it may write.
    ``state_writers``: nodes that may write memory that outlives one forward
    (parameters, buffers, constants, running statistics); ``input_writers``:
    nodes that may write the graph's inputs.
    """

    roots: dict[fx.Node, frozenset[fx.Node]]
    writes: dict[fx.Node, frozenset[fx.Node]]
    state_writers: list[fx.Node]
    input_writers: list[fx.Node]


def _nodes_in(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, found.append)
    return found


@functools.lru_cache(maxsize=1024)
def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins: no Python signature
        return None


def _bound_arguments(fn: Any, node: fx.Node) -> dict[str, Any]:
    """The call's arguments by parameter name, where Python can tell (functions, not builtins)."""
    try:
        signature = _signature(fn)
    except TypeError:  # unhashable callable
        signature = None
    if signature is None:
        return {}
    try:
        return dict(signature.bind(*node.args, **node.kwargs).arguments)
    except TypeError:
        return {}


def _is_torch_nn(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.nn", "torch.ao.nn"))


# (inputs a node may write, inputs it may share memory with or None, whether it writes state)
_Effects = tuple[list[fx.Node], Optional[list[fx.Node]], bool]


def _leaf_summary(module: nn.Module) -> tuple[frozenset[str], frozenset[str], bool] | None:
    """For a leaf module outside torch.nn (e.g. a protection module our tracer keeps
    whole): the forward's parameters it may write, those it may return (part
    of), and whether it writes its own state, from a trace of its forward;
    None when that cannot be traced."""
    try:
        gm = fx.symbolic_trace(module)
    except Exception:  # any failure: the caller assumes the worst
        return None
    effects = memory_effects(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    written = frozenset(p.target for p in placeholders if any(p in hit for hit in effects.writes.values()))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    aliased = frozenset(p.target for p in placeholders if p in effects.roots[output])
    return written, aliased, bool(effects.state_writers)


def _configuration(module: nn.Module) -> Any:
    """What a module's forward can branch on when traced: its class, its plain
    attributes (e.g. a restriction's mode) and which of its tensors are set.
    Modules with equal keys trace to the same graph, so one summary serves all
    (a hardened ResNet has dozens of protection modules of two kinds)."""
    plain = []
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if not isinstance(value, (bool, int, float, str, type(None), tuple)):
            return id(module)  # nothing to compare it by: the module stands for itself
        plain.append((key, value))
    tensors = tuple((k, v is None) for k, v in [*module._parameters.items(), *module._buffers.items()])
    children = tuple((k, None if m is None else _configuration(m)) for k, m in module._modules.items())
    key = (type(module), tuple(sorted(plain)), tensors, children)
    try:
        hash(key)
    except TypeError:
        return id(module)
    return key


def _leaf_effects(node: fx.Node, module: nn.Module, summaries: dict[Any, Any]) -> _Effects:
    inputs = node.all_input_nodes
    key = _configuration(module)
    if key not in summaries:
        summaries[key] = _leaf_summary(module)
    summary = summaries[key]
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        parameters, summary = [], None
    names = [p.name for p in parameters]
    if summary is None or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return inputs, inputs, True  # nothing to map the trace's placeholders to: assume the worst
    by_name = {**dict(zip(names, node.args)), **node.kwargs}
    written, aliased, state = summary
    returned = [n for name in aliased for n in _nodes_in(by_name.get(name))]
    return [n for name in written for n in _nodes_in(by_name.get(name))], returned or None, state


def _node_effects(node: fx.Node, gm: fx.GraphModule, summaries: dict[Any, Any]) -> _Effects:
    """(input nodes ``node`` may write into, input nodes its value may share memory
    with or None when it allocates its own, whether it may write model state)."""
    inputs = node.all_input_nodes
    first = [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []
    out = _nodes_in(node.kwargs.get("out"))  # out=: written, and what the op returns
    inplace = node.kwargs.get("inplace", False) is not False
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if getattr(module, "inplace", False) is True or inplace:
            return first, first, False
        if module._forward_hooks or module._forward_pre_hooks:  # a hook may do anything to the tensors
            return inputs, inputs, False
        if not _is_torch_nn(module):
            return _leaf_effects(node, module, summaries)
        state = (isinstance(module, nn.modules.batchnorm._NormBase) and module.training
                 and module.track_running_stats)
        return [], None if isinstance(module, _FRESH_MODULES) else inputs, state
    if node.op == "call_method":
        name = str(node.target)
        if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__")) or inplace:
            return first, first, False
        if name in _SCALAR_METHODS:
            return [], [], False
        return [], None if name in _FRESH_METHODS else inputs, False
    fn = node.target  # call_function
    name = getattr(fn, "__name__", "")
    if fn in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("__")
                                    and fn not in _FRESH_FUNCTIONS):  # operator.or_ is no in-place op
        return first + out, first, False
    if fn is getattr and len(node.args) > 1 and node.args[1] in _SCALAR_ATTRS:
        return [], [], False
    schema = getattr(fn, "_schema", None)
    if schema is not None and schema.is_mutable:
        return inputs, inputs, False
    bound = _bound_arguments(fn, node)
    if inplace or bound.get("inplace", False) is not False:
        return first + out, first, False
    stats = (_nodes_in([bound.get("running_mean"), bound.get("running_var")])
             if bound.get("training", False) is not False else [])
    home = getattr(fn, "__module__", None) or getattr(getattr(fn, "__objclass__", None), "__module__", "")
    if str(home).split(".")[0] not in _KNOWN_MODULES:  # an opaque function (fx.wrap): assume the worst
        return inputs, inputs, False
    return out + stats, out or (None if fn in _FRESH_FUNCTIONS else inputs), False


def memory_effects(gm: fx.GraphModule) -> MemoryEffects:
    """What each node of ``gm`` may write and which values may share memory (see ``MemoryEffects``).

    Sound, not precise: a node is taken to share memory with its inputs unless
    it is known to allocate (convolutions, arithmetic, torch.nn layers, ...),
    and to write every input that an in-place form, an ``out=`` or an
    ``inplace`` flag names; a function fx cannot see into may do anything to
    its inputs. A false alarm costs speed (a trial starts at an earlier cut),
    never exactness.
    """
    roots: dict[fx.Node, frozenset[fx.Node]] = {}
    writes: dict[fx.Node, frozenset[fx.Node]] = {}
    state: list[fx.Node] = []
    to_input: list[fx.Node] = []
    summaries: dict[Any, Any] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            roots[node] = frozenset({node})
            continue
        if node.op == "output":
            roots[node] = frozenset().union(*(roots[a] for a in node.all_input_nodes))
            continue
        written, shared, writes_state = _node_effects(node, gm, summaries)
        hit = frozenset().union(*(roots[a] for a in written))
        if hit:
            writes[node] = hit
        if writes_state or any(r.op == "get_attr" for r in hit):
            state.append(node)
        if any(r.op == "placeholder" for r in hit):
            to_input.append(node)
        roots[node] = frozenset({node}) if shared is None else frozenset().union(*(roots[a] for a in shared))
    return MemoryEffects(roots, writes, state, to_input)


def reuse_hazard(effects: MemoryEffects, nodes: Sequence[fx.Node], recomputed: Iterable[fx.Node]) -> str | None:
    """Why computing only ``recomputed`` (in graph order), from the golden values of
    the nodes they read, would not give the plain forward's values; None if it would.

    ``recomputed`` is what a trial runs: every node from a cut on (the
    shortcut), or every node that depends on a faulted layer (``fi``'s
    reuse). The golden values are those a whole golden run left in memory.
    Exact when (1) no recomputed node writes memory that a node outside
    computed (the trial would read a stale golden value or corrupt the cache
    for the next trial), (2) no node outside, running after recomputation
    starts, writes memory that a recomputed node reads (in the plain forward
    the reader may run before the write), (3) nothing writes model state.
    """
    if effects.state_writers:
        return f"{effects.state_writers[0].name} writes into the model's parameters or buffers"
    if effects.input_writers:
        return f"{effects.input_writers[0].name} writes into the model's input"
    inside = set(recomputed)
    if not inside or not effects.writes:
        return None
    index = {n: i for i, n in enumerate(nodes)}
    start = min(index[n] for n in inside)
    read = frozenset().union(*(effects.roots[a] for n in inside for a in n.all_input_nodes if a not in inside))
    for node, hit in effects.writes.items():
        if node in inside:
            before = sorted((r for r in hit if r not in inside), key=index.__getitem__)
            if before:
                return f"{node.name} writes into {before[0].name}, a value computed before it that is cached"
        elif index[node] > start and hit & read:
            return f"{node.name} writes into a cached value after the recomputed part starts"
    return None


class Shortcut:
    """Golden activations at cuts of a traced model, and trial forwards from them."""

    def __init__(self, traced: fx.GraphModule, memory: F.ParameterMemory, inputs: torch.Tensor,
                 batch_size: int, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.traced, self.memory, self.inputs, self.batch_size = traced, memory, inputs, batch_size
        self.nodes = list(traced.graph.nodes)
        self.names = F.tied_names(traced, memory.params)  # every name of each target's memory
        self.first_use = first_use(traced.graph, memory.stored, self.names)
        self.effects = memory_effects(traced)
        self.cuts = self._choose_cuts(cache_bytes)
        self.cache = self._fill_cache()
        self.owners = _owners(self.nodes, memory.stored, self.names)
        self.batchable = len(self.owners) == len(memory.stored) and self._batchable()
        self._batch_checked: bool | None = None

    # --- building ---------------------------------------------------------

    def _first_compute(self) -> int:
        return next(i for i, n in enumerate(self.nodes) if n.op != "placeholder")

    def _per_input_bytes(self) -> dict[fx.Node, int]:
        with torch.inference_mode():
            rec = Recorder(self.traced, self.nodes)
            rec.run(self.inputs[:1])
        return {n: _nbytes(v) for n, v in rec.kept.items()}

    def _choose_cuts(self, budget: int) -> list[Cut]:
        """Deepest layers first (they are cheap to cache and, in CNNs, hold most
        parameters, hence most faults), as long as the cache fits ``budget``;
        never a cut after which the graph writes into memory computed before it
        (``reuse_hazard``)."""
        self.cache_bytes_used = 0
        start = self._first_compute()
        candidates = sorted({p for p in self.first_use.values() if p > start}, reverse=True)
        hazards = {p: why for p in candidates
                   if (why := reuse_hazard(self.effects, self.nodes, self.nodes[p:])) is not None}
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
            live = [v for v in live_before(self.nodes, position) if v.op != "placeholder"]
            cost = sum(per_input[v] * n for v in live if v not in cached)
            if used + cost > budget:
                dropped += 1
                continue
            used += cost
            cached.update(live)
            chosen.append(subgraph(self.traced, position))
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
            rec = Recorder(self.traced, keep)
            outputs.append(rec.run(batch))
            values: dict[fx.Node, Any] = {placeholders[0]: batch} if placeholders else {}
            values.update(rec.kept)
            cache.append(values)
        self._traced_logits = torch.cat(outputs)  # checked against the model's in verify()
        return cache

    def _batchable(self) -> bool:
        """Batched trials need every fault target to be read by one module (called
        any number of times) and nothing else: a weight tied between two modules
        would be faulted in one and golden in the other."""
        for name in self.memory.stored:
            readers = [n for n in self.nodes if any(reads(n, a) for a in self.names[name])]
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

    def _run(self, cut: Cut | None) -> torch.Tensor:
        outs = []
        for values in self.cache:
            if cut is None:
                outs.append(self.traced(values[self.nodes[0]]))
                continue
            # the golden tensors themselves: the cut was chosen so that nothing writes into them
            outs.append(cut.module(*[values[v] for v in cut.live]))
        return torch.cat(outs)

    @torch.inference_mode()
    def logits(self, faults: F.Faults) -> torch.Tensor | None:
        """Logits of the faulty model from the best cut (faults must be injected
        by the caller), or None when the trial must run the whole model."""
        cut = self.start(faults)
        return None if cut is None else self._run(cut)

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


def _owners(nodes: Sequence[fx.Node], targets: Iterable[str],
            aliases: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """Tensor name -> the first module call target that reads it (under any of its names)."""
    owners = {}
    for name in targets:
        names = (aliases or {}).get(name) or [name]
        for n in nodes:
            if n.op == "call_module" and any(reads(n, a) for a in names):
                owners[name] = str(n.target)
                break
    return owners


def _restrict(faults: F.Faults, names: Sequence[str]) -> F.Faults | None:
    sites = {n: faults.sites[n] for n in names if len(faults.sites[n][0])}
    return F.Faults(sites, faults.mode) if sites else None


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
    traced = None
    try:
        traced = fx.symbolic_trace(model)
    except Exception:
        return 1
    with torch.inference_mode():
        rec = Recorder(traced, traced.graph.nodes)
        rec.run(inputs[:1])
    largest = max((_nbytes(v) for v in rec.kept.values()), default=1) * min(batch_size, len(inputs))
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(MAX_AUTO_BATCH, (free // 4) // max(1, 3 * largest))))


def build(model: nn.Module, memory: F.ParameterMemory, inputs: torch.Tensor, batch_size: int,
          golden_logits: torch.Tensor, cache_bytes: int = DEFAULT_CACHE_BYTES) -> Shortcut | None:
    """A verified shortcut for ``model``, or None (with a warning) to run the plain path."""
    traced = trace(model)
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
