"""Warnings, before training, about settings whose steps will be slow.

The work of a training step is estimated from the built networks, not from option names: one
forward pass of a single zero image counts the multiply-adds of every convolution and linear layer
(the GNN layers' node-wise linears included), and the graph it builds gives the nodes and edges
that the layers' aggregation runs over (a complete graph: N² edges). A training step costs about
three forward passes (forward, then the backward pass's two products), times the batch size.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("interconnects")

#: Multiply-adds a second that a training step reaches on a 2-core CPU in float32, measured on the
#: default hybrid (simple_cnn + grid + GCN, MNIST at batch 128: 1.4 GMAC a step by this count, 0.21 s
#: a step); the projection says "about N s a step" in these terms (resnet18 at batch 64: 62 GMAC).
CPU_MACS_PER_S = 6.5e9
#: Warn above this projected CPU time of a step (ten times the default hybrid's; an epoch of full
#: MNIST at batch 128 would then take 15 min or more).
SLOW_STEP_S = 2.0
#: Layers that build a tensor per edge (gat, gatedgcn, maxrel) do this many multiply-adds per edge and
#: channel beyond the aggregation (the messages, their gates or attention, their gradients), and keep
#: a ``[B, E, C]`` float tensor per layer for the backward pass.
PER_EDGE_FACTOR = 4
#: Their steps are bound by memory, not by multiply-adds: seconds of a training step per edge,
#: channel and layer of an image, measured on one thread of the 2-core CPU (gnn=gat on a complete
#: graph of 961 nodes, 8 channels, 2 layers, batch 4: 5.2 s a step, where the multiply-add count
#: alone projected 0.1 s).
PER_EDGE_SECONDS = 90e-9
#: Warn when those per-edge tensors of one step hold more than this many bytes.
PER_EDGE_BYTES = 2 * 2**30


class StepCost:
    """The estimated work of one training step of a hybrid network: ``cnn`` and ``graph``
    multiply-adds per image, the graph's ``nodes`` and ``edges`` per image, the GNN's ``channels`` and
    ``layers``, and the bytes of per-edge tensors per image (``per_edge_bytes``)."""

    def __init__(self, cnn: float, graph: float, nodes: int, edges: int, channels: int, layers: int,
                 per_edge_bytes: float, dense: bool) -> None:
        self.cnn, self.graph, self.nodes, self.edges = cnn, graph, nodes, edges
        self.channels, self.layers, self.per_edge_bytes, self.dense = channels, layers, per_edge_bytes, dense

    def step_macs(self, batch_size: int) -> float:
        """Multiply-adds of a training step of ``batch_size`` images (forward and backward)."""
        return 3.0 * batch_size * (self.cnn + self.graph)

    def step_seconds(self, batch_size: int) -> float:
        """Projected seconds of a training step of ``batch_size`` images on a 2-core CPU: the
        multiply-adds at :data:`CPU_MACS_PER_S`, the per-edge tensors at :data:`PER_EDGE_SECONDS`."""
        if not self.per_edge_bytes:
            return self.step_macs(batch_size) / CPU_MACS_PER_S
        edges = float(self.edges) * self.channels * self.layers * batch_size
        return 3.0 * batch_size * self.cnn / CPU_MACS_PER_S + edges * PER_EDGE_SECONDS


def _weighted_modules(model: nn.Module):
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)) or (
                isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, nn.Embedding)):
            yield module


def step_cost(model: nn.Module, in_channels: int, image_size: tuple[int, int]) -> StepCost | None:
    """:class:`StepCost` of a :class:`~interconnects.models.hybrid.HybridModel` for images of
    ``in_channels × image_size`` (``None`` for another network). Runs one forward pass of a zero
    image ``[1, C, H, W]`` in eval mode, the RNG states and the train mode left as they were."""
    from ..models.hybrid import HybridModel

    if not isinstance(model, HybridModel):
        return None
    macs = {"cnn": 0.0}

    def count(module, inputs, output):
        if not isinstance(output, torch.Tensor) or output.numel() == 0:
            return
        weight = module.weight
        per_output = weight[0].numel() if weight.dim() > 2 else weight.shape[1]
        if isinstance(module, nn.ConvTranspose2d):
            per_output = weight.shape[0] * weight[0, 0].numel() // max(1, output.shape[1])
        macs["cnn"] += float(output.numel()) * per_output

    was_training = model.training
    hooks = [m.register_forward_hook(count) for m in _weighted_modules(model)]
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            image = torch.zeros(1, in_channels, *image_size, device=device)
            fmap, graph = model.graph(image)
            model.decoder(graph, fmap)
    except Exception:  # noqa: BLE001 - an estimate must never stop a run the builder accepted
        return None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    gnn = getattr(model, "gnn", None)
    if graph is None or gnn is None:
        return StepCost(macs["cnn"], 0.0, 0, 0, 0, 0, 0.0, False)
    nodes = int(model.graph_nodes or graph.x.shape[1])
    dense = bool(model.graph_dense)
    edge_index = getattr(graph, "edge_index", None)
    edges = nodes * nodes if dense or edge_index is None else int(edge_index.shape[1])
    channels = int(getattr(gnn, "hidden_channels", None) or graph.x.shape[-1])
    layers = int(getattr(gnn, "num_layers", 1) or 0)
    per_edge = bool(getattr(gnn, "flags", {}).get("per_edge"))
    aggregate = float(edges) * channels * layers * (1 + PER_EDGE_FACTOR * per_edge)
    per_edge_bytes = 4.0 * edges * channels * layers if per_edge else 0.0
    return StepCost(macs["cnn"], aggregate, nodes, edges, channels, layers, per_edge_bytes, dense)


def _keys(model, cost: StepCost, batch_size: int) -> list[str]:
    """The command-line keys that make ``cost`` large, the largest share first."""
    keys = [f"data.batch_size={batch_size}"]
    # (by time where the layers build a tensor per edge: their multiply-adds are few, their memory is not)
    graph_share = cost.edges * cost.channels * cost.layers * PER_EDGE_SECONDS * CPU_MACS_PER_S / 3.0 \
        if cost.per_edge_bytes else cost.graph
    if graph_share >= cost.cnn or not any(p.numel() for p in model.backbone.parameters()):
        interconnect = type(getattr(model, "interconnect", None)).__name__
        nodes_key = {"Keypoints": "interconnect.num_keypoints", "Superpixels": "interconnect.num_segments"}.get(
            interconnect, "data.image_size / backbone")
        edges = "a complete graph (interconnect.edges)" if cost.dense else "interconnect.k"
        keys += [f"{cost.nodes} nodes ({nodes_key})", f"{cost.edges:,} edges: {edges}",
                 f"gnn.hidden_channels={cost.channels}", f"gnn.num_layers={cost.layers}"]
        if cost.per_edge_bytes:
            keys.append(f"gnn.layer={getattr(model.gnn, 'layer', '?')} (a tensor per edge)")
    else:
        keys += ["data.image_size", "backbone (width, output_stride, stage)"]
    return keys


def warn_costs(task, in_channels: int | None = None, image_size: tuple[int, int] | None = None,
               batch_size: int = 1, eval_batch_size: int | None = None) -> None:
    """Say before training, in one line per network, when a training step of ``batch_size``
    images (or an evaluation step of ``eval_batch_size``, a forward pass: a third of the work an
    image) projects to more than :data:`SLOW_STEP_S` on a CPU or its per-edge tensors to more
    than :data:`PER_EDGE_BYTES`, naming the keys that make it large and what is cheaper."""
    from ..models.hybrid import HybridModel

    for name, model in task.networks().items():
        if not isinstance(model, HybridModel):
            continue
        cost = step_cost(model, in_channels, image_size) if in_channels and image_size else None
        gnn = getattr(model, "gnn", None)
        per_edge = getattr(gnn, "flags", {}).get("per_edge")
        if cost is None:  # (no image size to go by: the complete-graph rule alone)
            nodes = getattr(model, "graph_nodes", None)
            if gnn is not None and model.graph_dense and nodes and nodes > 256 and per_edge:
                log.warning("gnn.layer=%s on a complete graph of %d nodes builds a [B, %d, %d, C] tensor per layer: "
                            "expect slow steps; cheaper: gnn=gcn (one matrix product), or interconnect=knn (k edges a node)",
                            gnn.layer, nodes, nodes, nodes)
            continue
        seconds = cost.step_seconds(batch_size)
        memory = cost.per_edge_bytes * batch_size
        complete = cost.dense and per_edge and cost.nodes > 256  # quadratic memory, whatever the batch
        if seconds < SLOW_STEP_S and memory < PER_EDGE_BYTES and not complete:
            evaluation = cost.step_macs(eval_batch_size or 0) / 3
            evaluation_s = cost.step_seconds(eval_batch_size or 0) / 3
            if evaluation_s >= SLOW_STEP_S:
                label = "" if name == "model" else f"{name}: "
                log.warning("%sexpect slow evaluation: %s GMAC an evaluation step (about %.1f s on a 2-core CPU); "
                            "from data.eval_batch_size=%d; cheaper: a smaller data.eval_batch_size", label,
                            f"{evaluation / 1e9:,.0f}", evaluation_s, eval_batch_size)
            continue
        what = f"{cost.step_macs(batch_size) / 1e9:,.0f} GMAC a training step (about {seconds:.1f} s on a 2-core CPU)"
        if memory >= PER_EDGE_BYTES:
            what += f", {memory / 2**30:.1f} GiB of per-edge tensors"
        if cost.dense and cost.nodes and per_edge:
            what = (f"gnn.layer={gnn.layer} on a complete graph of {cost.nodes} nodes builds a "
                    f"[B, {cost.nodes}, {cost.nodes}, C] tensor per layer: {what}")
        cheaper = ("gnn=gcn (one matrix product), or interconnect=knn (k edges a node)" if cost.dense and per_edge
                   else "a smaller data.batch_size, fewer nodes or channels")
        label = "" if name == "model" else f"{name}: "
        log.warning("%sexpect slow steps: %s; from %s; cheaper: %s", label, what,
                    ", ".join(_keys(model, cost, batch_size)), cheaper)
