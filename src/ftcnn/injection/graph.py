"""The model map: which layers a network has, which memory faults hit, and its torch.fx graph.

Every other module asks this one about a network's structure, and nothing
else walks modules or traces graphs:

- **Fault targets** (``fault_targets``): the weights and biases of every
  Conv2d/Linear (hardened copies included), BatchNorm's parameters and running
  statistics when asked, and the float values protection modules declare
  (``protection_buffers``). One piece
  of memory is one target however many modules share it (``storage_key``,
  ``tied_names``): a tied weight listed twice would take twice the BER.
- **Layers and channels** (``layers``): every Conv2d/Linear as output
  channels over its parameter memory (how many, how many weights each, where
  its bias is), named as the fault targets name them. Vulnerability scores
  them, hardening duplicates them, pruning removes them.
- **The graph** (``trace``, ``cut_from``, ``cut_for_layer``, ``record``,
  ``memory_effects``, ``reuse_hazard``): the torch.fx trace that the
  campaign shortcut (``fastpath``) and ``vulnerability.fi``'s activation
  reuse both start trials from. Until issue 11 each had its own copy, and
  they drifted: one refused models with forward hooks and checked its cut
  against the full forward bit for bit, the other did neither; one knew 4
  in-place operators, the other 11. Here there is one, with the stricter
  behaviour of each.

A cut recomputes part of the graph from the golden values of the nodes it
reads. Those values are references to the golden run's tensors (copies would
go stale), and a graph may write into memory it computed earlier (in-place
ops such as ``relu_`` or ``operator.setitem``, ``inplace=True`` modules and
flags, ``out=`` arguments), through any alias of it (views: ``view``,
``reshape``, ``flatten``, ``transpose``, slicing, ``detach``, ...).
``memory_effects`` finds every write and the values each node's memory may be
shared with (over-approximated: an op not known to allocate is taken to alias
all its inputs), and ``reuse_hazard`` refuses a cut after which something
writes into memory computed before it (a trial would read a stale golden
value, or corrupt the cache for the next trial). A false alarm costs speed,
never exactness.

Example:
    >>> [(l.name, l.channels, l.per_channel) for l in layers(nn.Sequential(nn.Conv2d(1, 2, 3)))]
    [('0', 2, 9)]
"""

from __future__ import annotations

import functools
import inspect
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

FAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
BN_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


# --- fault targets: what memory faults can hit ----------------------------------------

PROTECTION_ATTR = "fault_buffers"
WORDS_ATTR = "fault_words"


def protection_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers ``module`` declares as attackable protection memory.

    A protection module (``ftcnn.protection.hardening.Correction``, ``Restrict``) lists in a
    class attribute ``fault_buffers`` the names of the float values it adds
    to the model (range bounds, thresholds): they sit in the same memory as
    the weights, so faults hit them like any parameter. A coded layer
    (``ftcnn.protection.codes``) lists in ``fault_words`` its raw stored words (int32
    check bits, bitwise copies), attacked at their own 32 bits, after the
    float ones. Unset names (None) are skipped; a declared float buffer that is
    not floating point, or a declared word buffer that is not int32, is a bug.
    """
    out: dict[str, torch.Tensor] = {}
    for attr, fits, kind in ((PROTECTION_ATTR, torch.Tensor.is_floating_point, "a fault buffer"),
                             (WORDS_ATTR, lambda b: b.dtype == torch.int32, "an int32 word buffer")):
        for name in getattr(module, attr, ()):
            buf = module._buffers.get(name)
            if buf is None:
                continue
            if not fits(buf):
                raise TypeError(f"{type(module).__name__}.{name} is declared {kind} but is {buf.dtype}")
            out[name] = buf
    return out


# the float statistics a BatchNorm stores and uses in eval (its int64 ``num_batches_tracked``
# counter is memory too, but eval never reads it: recorded as unattacked, not attacked)
BN_STATISTICS = ("running_mean", "running_var")


def bn_statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics ``module`` holds if it is a BatchNorm that tracks them (else {}):
    a deployed network reads them at every inference, so they are memory faults hit."""
    if not isinstance(module, BN_LAYER_TYPES):
        return {}
    return {name: buf for name in BN_STATISTICS
            if (buf := module._buffers.get(name)) is not None and buf.is_floating_point()}


def fault_targets(model: nn.Module, *, include_bn: bool = False,
                  layers: Sequence[str] | None = None,
                  include_protection: bool = True) -> dict[str, torch.Tensor]:
    """Name -> parameter tensor of every fault target, in module order.

    This is the one place that decides what memory faults can hit: weights and
    biases of every Conv2d and Linear (duplicated copies in hardened models are
    such modules too, so they are hit at the same rate), with ``include_bn``
    BatchNorm's affine parameters and running statistics (``bn_statistics``;
    campaigns attack them by default, this structural query only when asked), and (``include_protection``, the default) the float
    values a protection adds, as its modules declare them (see
    :func:`protection_buffers`; e.g. ``features.0.restrict.low``, listed
    where the module sits in module order). ``layers`` restricts to modules
    with those names (protection modules can be named too). A tensor that
    several modules share (tied weights) is one piece of memory, listed once
    under its first name in module order (``tied_names`` gives the others).
    """
    kinds = FAULT_LAYER_TYPES + (BN_LAYER_TYPES if include_bn else ())
    modules = {name: m for name, m in model.named_modules()
               if isinstance(m, kinds) or include_protection and protection_buffers(m)}
    if layers is not None:
        unknown = [name for name in layers if name not in modules]
        if unknown:
            raise ValueError(f"unknown layer {unknown[0]!r}; fault-target layers are: "
                             + ", ".join(modules))
        modules = {name: modules[name] for name in layers}
    targets: dict[str, torch.Tensor] = {}
    seen: set[tuple[Any, ...]] = set()

    def add(full: str, tensor: torch.Tensor, value: torch.Tensor) -> None:
        # a tensor shared by several modules (tied weights) is one piece of
        # memory: listed once, under its first name, or it would take twice the BER
        key = storage_key(tensor)
        if key not in seen:
            seen.add(key)
            targets[full] = value

    for name, module in modules.items():
        for pname, param in module.named_parameters(recurse=False):
            if param is not None:
                add(f"{name}.{pname}" if name else pname, param, param.data)
        for bname, buf in bn_statistics(module).items():  # empty unless BN is attacked
            add(f"{name}.{bname}" if name else bname, buf, buf)
        if include_protection:
            for bname, buf in protection_buffers(module).items():
                add(f"{name}.{bname}" if name else bname, buf, buf)
    return targets


def storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What identifies ``tensor``'s memory: two tensors with equal keys are one piece of memory.

    The storage, byte offset, shape, strides and dtype: tied parameters (one
    Parameter registered in two modules) and their ``.data`` share all of it.
    Tensors without real memory (the ``meta`` device, zero elements) have no
    address to compare, so there the tensor object stands for itself.
    """
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return ("object", id(tensor))
    storage = tensor.untyped_storage()
    return (str(tensor.device), storage.data_ptr(), tensor.storage_offset() * tensor.element_size(),
            tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def tied_names(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Per tensor of ``tensors``: every parameter/buffer name of ``module`` that holds its memory.

    A weight tied between two modules is read by both; whatever follows a
    tensor through the model (the first layer that uses it, the modules a
    fault in it reaches) must follow all its names. The tensor's own name
    comes first.
    """
    by_key: dict[tuple[Any, ...], list[str]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False),
                    *module.named_buffers(remove_duplicate=False)]:
        by_key.setdefault(storage_key(t), []).append(name)
    return {name: [name] + [n for n in by_key.get(storage_key(t), []) if n != name]
            for name, t in tensors.items()}


# --- layers and their output channels ---------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """A fault-target layer (Conv2d/Linear) seen as output channels over its parameter memory."""

    name: str
    module: nn.Module
    weight: str            # fault-target tensor name of the weight
    bias: str | None       # and of the bias, if any
    channels: int
    per_channel: int       # weight elements per output channel (contiguous in memory)

    @property
    def channel_elements(self) -> int:
        """Parameters per output channel: its weights and its bias element."""
        return self.per_channel + (1 if self.bias else 0)


def layers(model: nn.Module) -> list[Layer]:
    """Every Conv2d/Linear of ``model`` in module order, named as ``fault_targets`` names them.

    This is the one layer walk: vulnerability scores these layers, hardening
    protects them (``harden.target_layers``), pruning removes their channels.
    A weight tied between two layers is one fault target, listed under its
    first name; each of the layers names it so (its channels count in both,
    since a fault there reaches both). Empty when the model has no such layer.
    """
    targets = fault_targets(model)
    first = {other: name for name, names in tied_names(model, targets).items() for other in names[1:]}
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, FAULT_LAYER_TYPES):
            continue
        weight = f"{name}.weight" if name else "weight"
        bias = f"{name}.bias" if name else "bias"
        weight, bias = first.get(weight, weight), first.get(bias, bias)
        w = targets[weight] if weight in targets else module.weight
        out.append(Layer(name, module, weight, bias if bias in targets else None,
                         int(w.shape[0]), int(w[0].numel())))
    return out


# --- the torch.fx graph ------------------------------------------------------------------

def first_outputs(model: nn.Module, names: Sequence[str], run: Callable[[], Any]) -> dict[str, Any]:
    """What each named submodule returns the first time it is called while ``run()``
    runs (forward hooks, always removed): the one way ftcnn looks at layer outputs
    without tracing. A ValueError names a module the forward never calls."""
    seen: dict[str, Any] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            seen.setdefault(name, output)
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"layer {missing[0]!r} is not called by the model's forward")
    return {n: seen[n] for n in names}


class _ProtectionLeafTracer(fx.Tracer):
    """Keeps protection modules with attackable values (``protection_buffers``:
    range bounds of corrections and restrictions) whole, so their bounds are
    read by one ``call_module`` node instead of ``get_attr`` nodes: a trial
    that faults a bound is then cut right before that call, and batched
    trials can run the module per trial with that trial's bounds."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return bool(protection_buffers(m)) or super().is_leaf_module(m, module_qualified_name)


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


def checked_trace(model: nn.Module, batches: Sequence[torch.Tensor], golden: Sequence[torch.Tensor],
                  purpose: str) -> fx.GraphModule | None:
    """``trace``, kept only if it gives the model's ``golden`` outputs bit for bit on
    every batch (fx records e.g. ``x += y`` out of place, which differs from the
    model where ``x`` is a view of a value used later); else None, with a warning."""
    gm = trace(model, purpose)
    if gm is None:
        return None
    with torch.inference_mode():
        same = all(torch.equal(gm(x), g) for x, g in zip(batches, golden))
    if not same:
        warnings.warn(f"{purpose} off: the traced graph does not reproduce the model's logits "
                      "bit for bit; running the plain path", stacklevel=3)
        return None
    return gm


def reads(node: fx.Node, tensor: str) -> bool:
    """Whether ``node`` reads the parameter/buffer named ``tensor`` (a module call
    of its module or of a leaf module above it, or a ``get_attr`` of it)."""
    if node.op in ("call_module", "get_attr"):
        target = str(node.target)
        return tensor == target or tensor.startswith(target + ".")
    return False


def first_use(graph: fx.Graph, targets: Iterable[str],
              aliases: Mapping[str, Sequence[str]] | None = None) -> dict[str, int]:
    """Tensor name -> position (in execution order) of the first node that reads it.

    ``aliases`` gives a tensor's names (``tied_names``): a weight tied
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


def owners(nodes: Sequence[fx.Node], targets: Iterable[str],
           aliases: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """Tensor name -> the first module call target that reads it (under any of its names)."""
    found = {}
    for name in targets:
        names = (aliases or {}).get(name) or [name]
        for n in nodes:
            if n.op == "call_module" and any(reads(n, a) for a in names):
                found[name] = str(n.target)
                break
    return found


def live_before(nodes: Sequence[fx.Node], position: int) -> list[fx.Node]:
    """Nodes computed before ``position`` whose values are used at or after it."""
    index = {n: i for i, n in enumerate(nodes)}
    return [n for n in nodes[:position] if any(index[u] >= position for u in n.users)]


@dataclass
class Cut:
    """A part of a traced graph that can run on its own, from golden values.

    ``live`` are the nodes outside the part whose values it reads (its
    inputs, in graph order); ``module`` computes the graph's output from
    them and shares the traced model's submodules (no copy), so faults
    injected into the model's parameters are what it computes with.
    ``position`` is where the part starts in the graph's execution order.
    ``hazard`` says why running the part would not give the full forward's
    numbers (``reuse_hazard``); only when it is None is ``module`` set.
    """

    position: int
    live: list[fx.Node]
    module: fx.GraphModule | None
    hazard: str | None = None

    def __call__(self, values: Mapping[fx.Node, Any]) -> Any:
        """The graph's output, from the golden ``values`` of (at least) the live nodes."""
        if self.module is None:
            raise RuntimeError(f"this cut cannot run: {self.hazard}")
        return self.module(*[values[v] for v in self.live])


def _cut(traced: fx.GraphModule, recomputed: Iterable[fx.Node], hazard: str | None = None) -> Cut:
    """The cut that recomputes ``recomputed`` (the output node among them)."""
    nodes = list(traced.graph.nodes)
    inside = set(recomputed)
    position = min(i for i, n in enumerate(nodes) if n in inside)
    live = [n for n in nodes if n not in inside and any(u in inside for u in n.users)]
    if hazard is not None:
        return Cut(position, live, None, hazard)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: graph.placeholder(f"cut_{n.name}") for n in live}
    for node in nodes:
        if node in inside:
            env[node] = graph.node_copy(node, lambda a: env[a])
    return Cut(position, live, fx.GraphModule(traced, graph))


def cut_from(traced: fx.GraphModule, position: int) -> Cut:
    """The graph from ``position`` (in execution order) on, taking the live values as
    inputs: what the shortcut runs for a trial whose first fault lies there.
    Whether that is exact is ``reuse_hazard``'s to say (the caller asks it)."""
    return _cut(traced, list(traced.graph.nodes)[position:])


def layer_tensors(gm: fx.GraphModule, layer: str) -> list[str]:
    """Every name in ``gm`` of the memory of ``layer``'s parameters (a tied weight's
    other names included); empty when ``gm`` has no such module."""
    try:
        module = gm.get_submodule(layer)
    except AttributeError:
        return []
    own = {f"{layer}.{name}" if layer else name: p for name, p in module.named_parameters()}
    return [n for names in tied_names(gm, own).values() for n in names]


def cut_for_layer(gm: fx.GraphModule, layer: str, effects: MemoryEffects | None = None) -> Cut | None:
    """The part of ``gm`` that a fault in ``layer``'s parameters can change: every node
    reading them and every node depending on one that does (``fi``'s reuse).

    Its inputs are the fault-free values of all nodes it reads that do not
    depend on the layer (not just the layer's input: in a ResNet the shortcut
    too). A weight tied to another module taints that module's calls too.
    None if the layer's parameters are not used in the graph or the output
    does not depend on them; a Cut with ``hazard`` set if the graph writes
    into memory in a way cached values cannot follow. ``effects``:
    ``memory_effects(gm)``, if the caller has it.
    """
    nodes = list(gm.graph.nodes)
    names = layer_tensors(gm, layer)
    tainted = {n for n in nodes if any(reads(n, t) for t in names)}
    if not tainted:
        return None
    for n in nodes:
        if n not in tainted and any(i in tainted for i in n.all_input_nodes):
            tainted.add(n)
    hazard = reuse_hazard(effects or memory_effects(gm), nodes, tainted)
    output = next(n for n in nodes if n.op == "output")
    if hazard is None and output not in tainted:
        return None
    return _cut(gm, tainted, hazard)


class Recorder(fx.Interpreter):
    """Runs the traced graph and keeps the values of the nodes asked for.

    The values kept are the run's own tensors, not copies: at the end of the
    run each holds what its memory holds then. A value written after it was
    computed (an in-place ReLU on it, before the cut) is kept as the write
    left it, which is what the nodes after the write read; a copy taken when
    the value was computed would be stale. This is the golden value at a cut
    as long as nothing in the cut writes into it, which is what
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


def record(gm: fx.GraphModule, x: Any, keep: Iterable[fx.Node]) -> tuple[Any, dict[fx.Node, Any]]:
    """Run ``gm`` on ``x``: its output, and the values of the nodes in ``keep`` (see ``Recorder``)."""
    recorder = Recorder(gm, keep)
    out = recorder.run(x)
    return out, recorder.kept


def nbytes(value: Any) -> int:
    """Bytes held by the tensors in ``value`` (any nesting)."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor))


@torch.inference_mode()
def activation_bytes(gm: fx.GraphModule, x: Any) -> dict[fx.Node, int]:
    """Bytes of every node's value when ``gm`` runs on ``x`` (one input: per-input sizes)."""
    _, kept = record(gm, x, gm.graph.nodes)
    return {n: nbytes(v) for n, v in kept.items()}


def largest_activation_bytes(model: nn.Module, x: Any) -> int | None:
    """Bytes of the largest value any node of ``model``'s plain fx trace computes on
    ``x`` (at least 1); None when fx cannot trace the model."""
    try:
        traced = fx.symbolic_trace(model)
    except Exception:  # fx raises many kinds of errors on untraceable code
        return None
    return max(activation_bytes(traced, x).values(), default=1)


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

