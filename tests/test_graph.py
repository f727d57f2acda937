"""The model map (graph.py): layers and channels, fault targets by storage, and the
torch.fx trace, cuts, records and write analysis that the shortcut and fi share."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftcnn.injection import faults as F
from ftcnn.injection import graph
from ftcnn.protection import pruning as P
from ftcnn.protection import vulnerability as V


class Residual(nn.Module):
    """conv -> relu -> conv, plus the block input added in place (``out.add_(x)``; fx
    records ``out += x`` as an out-of-place add)."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        out = self.conv2(self.relu(self.conv1(x)))
        out.add_(x)  # in place, into the conv2 output; reads the block input
        return self.head(out.mean(dim=(2, 3)))


class Tied(nn.Module):
    """Two Linear layers sharing one weight Parameter (one piece of memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


class LateWrite(nn.Module):
    """Writes, after conv2, into a value computed before it (relu of conv1's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        y = self.conv2(h)
        h.mul_(2.0)  # into h, which the cut after conv1 would take from the cache
        return self.head((y + h).mean(dim=(2, 3)))


def _x(n: int = 6, shape: tuple[int, ...] = (1, 6, 6)) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(0))


def _every_cut_reproduces(model: nn.Module, x: torch.Tensor) -> int:
    """Every hazard-free cut_from of the traced model gives its logits bit for bit;
    returns how many cuts were checked."""
    gm = graph.trace(model)
    nodes = list(gm.graph.nodes)
    effects = graph.memory_effects(gm)
    with torch.inference_mode():
        golden = model(x)
        assert torch.equal(gm(x), golden)
        checked = 0
        for position in range(1, len(nodes)):
            if graph.reuse_hazard(effects, nodes, nodes[position:]) is not None:
                continue
            cut = graph.cut_from(gm, position)
            _, values = graph.record(gm, x, cut.live)
            assert torch.equal(cut(values), golden), f"cut at {nodes[position].name}"
            checked += 1
    return checked


# --- layers and fault targets -------------------------------------------------------

def test_layers_give_channel_geometry_in_module_order() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6, 3, bias=False))
    found = graph.layers(model)
    assert [(l.name, l.weight, l.bias, l.channels, l.per_channel, l.channel_elements) for l in found] == [
        ("0", "0.weight", "0.bias", 6, 2 * 3 * 3, 19), ("3", "3.weight", None, 3, 6, 6)]
    assert found[0].module is model[0]
    assert graph.layers(nn.Sequential(nn.ReLU())) == []
    with pytest.raises(ValueError, match="no Conv2d/Linear"):
        V.layers(nn.Sequential(nn.ReLU()))  # scoring needs at least one


def test_tied_parameters_are_one_target_named_by_both_layers() -> None:
    model = Tied()
    targets = graph.fault_targets(model)
    assert list(targets) == ["a.weight", "a.bias", "b.bias", "out.weight", "out.bias"]
    assert graph.storage_key(model.a.weight) == graph.storage_key(model.b.weight)
    assert graph.tied_names(model, {"a.weight": model.a.weight})["a.weight"] == ["a.weight", "b.weight"]
    by_name = {l.name: l for l in graph.layers(model)}
    assert by_name["b"].weight == "a.weight" and by_name["b"].bias == "b.bias"
    # the shortcut follows both names: a fault in the shared weight is first read by a
    gm = graph.trace(model)
    names = graph.tied_names(gm, dict(gm.named_parameters()))
    first = graph.first_use(gm.graph, ["a.weight", "b.bias"], names)
    assert first["a.weight"] < first["b.bias"]
    # fi's cut for layer b recomputes a too (it reads b's weight under the name a.weight)
    cut = graph.cut_for_layer(gm, "b")
    assert [n.op for n in cut.live] == ["placeholder"]
    # faults re-exports the map's enumeration: the public ftcnn.fault_targets is this one
    assert F.fault_targets is graph.fault_targets and F.FAULT_LAYER_TYPES is graph.FAULT_LAYER_TYPES


def test_one_l1_for_scoring_and_pruning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    expected = {l.name: model.get_submodule(l.name).weight.detach().double().abs().flatten(1).sum(1).tolist()
                for l in graph.layers(model)}
    assert V.l1(model) == expected
    assert P.l1_scores(model) == expected


# --- the graph -------------------------------------------------------------------------

def test_forward_hooks_the_trace_would_drop_are_refused() -> None:
    model = Residual().eval()
    model.stem.register_forward_hook(lambda m, a, out: out)  # a leaf: its call stays in the graph
    assert graph.trace(model) is not None
    model.register_forward_hook(lambda m, a, out: out * 2)  # the root is inlined: fx would drop it
    with pytest.warns(UserWarning, match="reuse off: module 'model' has forward hooks"):
        assert graph.trace(model, "reuse") is None
    with pytest.warns(UserWarning, match="reuse off: module 'model' has forward hooks"):
        assert graph.checked_trace(model, [_x()], [model(_x())], "reuse") is None


def test_untraceable_model_is_refused_with_a_warning() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent control flow

    with pytest.warns(UserWarning, match="shortcut off: torch.fx cannot trace"):
        assert graph.trace(Branchy()) is None


def test_residual_in_place_add_is_seen_and_every_cut_is_exact() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = _x()
    gm = graph.trace(model)
    effects = graph.memory_effects(gm)
    add_ = next(n for n in gm.graph.nodes if n.target == "add_")
    conv2 = next(n for n in gm.graph.nodes if n.target == "conv2")
    assert effects.writes[add_] == {conv2}  # out.add_(x) writes the conv2 output, nothing else
    assert not effects.state_writers and not effects.input_writers
    assert _every_cut_reproduces(model, x) >= 5
    # fi's cut at conv1 keeps the block input (the residual reads it) as a live value
    cut = graph.cut_for_layer(gm, "conv1", effects)
    assert cut.hazard is None and {n.name for n in cut.live} == {"relu"}
    with torch.inference_mode():
        assert torch.equal(cut(graph.record(gm, x, cut.live)[1]), model(x))


def test_a_write_into_a_cached_value_is_a_hazard() -> None:
    torch.manual_seed(0)
    model = LateWrite().eval()
    gm = graph.trace(model)
    nodes = list(gm.graph.nodes)
    effects = graph.memory_effects(gm)
    conv2 = next(i for i, n in enumerate(nodes) if n.target == "conv2")
    why = graph.reuse_hazard(effects, nodes, nodes[conv2:])
    assert why is not None and "writes into relu" in why
    cut = graph.cut_for_layer(gm, "conv2", effects)
    assert cut.hazard is not None and cut.module is None
    with pytest.raises(RuntimeError, match="cannot run"):
        cut({})
    assert graph.reuse_hazard(effects, nodes, nodes[1:]) is None  # from the first layer on: all recomputed
    assert _every_cut_reproduces(model, _x()) >= 1


def test_protection_modules_stay_whole_in_the_trace() -> None:
    class Bound(nn.Module):
        fault_buffers = ("low",)

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("low", torch.tensor(-1.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.clamp(x, min=self.low)

    model = nn.Sequential(nn.Linear(3, 3), Bound(), nn.Linear(3, 2)).eval()
    assert "1.low" in graph.fault_targets(model)
    gm = graph.trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    assert graph.owners(list(gm.graph.nodes), ["1.low"]) == {"1.low": "1"}
    assert _every_cut_reproduces(model, _x(4, (3,))) == 4  # before each call and before the output


def test_activation_sizes_are_measured_on_the_trace() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2)).eval()
    x = _x(1, (1, 8, 8))
    assert graph.largest_activation_bytes(model, x) == 4 * 8 * 8 * 4  # the conv output, float32
    gm = graph.trace(model)
    sizes = graph.activation_bytes(gm, x)
    assert sizes[next(n for n in gm.graph.nodes if n.target == "3")] == 2 * 4

    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    assert graph.largest_activation_bytes(Branchy(), x) is None
