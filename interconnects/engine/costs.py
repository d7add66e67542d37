"""Warnings, before training, about settings whose steps will be slow."""

from __future__ import annotations

import logging

log = logging.getLogger("interconnects")


def warn_costs(task) -> None:
    """Say before training when a layer that builds a tensor per edge meets a large complete graph."""
    from ..models.hybrid import HybridModel

    for model in task.networks().values():
        gnn = getattr(model, "gnn", None) if isinstance(model, HybridModel) else None
        nodes = getattr(model, "graph_nodes", None)
        per_edge = getattr(gnn, "flags", {}).get("per_edge")  # (a user's own head may not say)
        if gnn is None or not model.graph_dense or not nodes or nodes <= 256 or not per_edge:
            continue
        log.warning("gnn.layer=%s on a complete graph of %d nodes builds a [B, %d, %d, C] tensor per layer: "
                    "expect slow steps; cheaper: gnn=gcn (one matrix product), or interconnect=knn (k edges a node)",
                    gnn.layer, nodes, nodes, nodes)

