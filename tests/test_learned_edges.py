"""The learned grid adjacency and the ``knyazev_learned_edges`` reproduction against the published model.

The published model (Knyazev, "Tutorial on Graph Neural Networks for Computer Vision and Beyond",
2019, MNIST example with predicted edges): pixel coordinates ``(x, y) = (col, row)`` standardised over
the image (population standard deviation plus 1e-5); for every pair (target ``i``, source ``j``) an
MLP ``Linear(4, 64) → ReLU → Linear(64, 1) → Tanh`` of ``(x_j, y_j, x_i, y_i)`` gives ``A[i, j]``, used
as it is (no self loops added, no normalisation); logits ``= Linear(N → 10, no bias)(A·x)``; plain SGD,
lr 1e-3, weight decay 1e-4, batch 64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from conftest import compose
from interconnects import DenseGrid
from interconnects.models.hybrid import build_model


def published_adjacency(mlp: nn.Module, h: int, w: int) -> torch.Tensor:
    """``A [h·w, h·w]`` computed directly from the published formula (written with numpy)."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))  # x: column, y: row, each [h, w]
    coord = np.stack([x, y], axis=-1).reshape(-1, 2).astype(np.float64)
    coord = (coord - coord.mean(axis=0)) / (coord.std(axis=0) + 1e-5)
    n = coord.shape[0]
    pairs = np.concatenate([np.broadcast_to(coord[None, :, :], (n, n, 2)),  # source j
                            np.broadcast_to(coord[:, None, :], (n, n, 2))], axis=-1)  # target i
    with torch.no_grad():
        return mlp(torch.from_numpy(pairs).float()).squeeze(-1)


@pytest.mark.parametrize("h,w", [(6, 6), (4, 7)])
def test_learned_adjacency_is_the_published_formula(h, w):
    torch.manual_seed(0)
    grid = DenseGrid(edges="learned", self_loop_weight=None, normalize=False)
    adj = grid(torch.randn(2, 3, h, w)).adj
    assert adj.shape == (1, h * w, h * w)
    torch.testing.assert_close(adj[0].detach(), published_adjacency(grid.edge_mlp, h, w), rtol=0, atol=1e-6)
    # the MLP is the published one: Linear(4, 64) → ReLU → Linear(64, 1) → Tanh, 385 parameters
    kinds = [type(m) for m in grid.edge_mlp]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.Tanh]
    assert (grid.edge_mlp[0].in_features, grid.edge_mlp[0].out_features, grid.edge_mlp[2].out_features) == (4, 64, 1)
    assert sum(p.numel() for p in grid.edge_mlp.parameters()) == 385


def test_learned_adjacency_is_not_symmetric_by_construction():
    """Edge ``j → i`` and ``i → j`` are two predictions (the pair's order is the MLP's input order)."""
    torch.manual_seed(1)
    adj = DenseGrid(edges="learned", self_loop_weight=None)(torch.randn(1, 1, 4, 4)).adj[0].detach()
    assert not torch.allclose(adj, adj.t())
    assert bool((adj.abs() <= 1).all())  # tanh


def test_knyazev_learned_edges_config_is_the_published_recipe():
    cfg = compose(["experiment=knyazev_learned_edges"])
    assert cfg.interconnect.edges == "learned" and cfg.interconnect.normalize is False
    assert cfg.interconnect.self_loop_weight is None
    assert cfg.gnn.layer == "propagate" and cfg.gnn.num_layers == 1
    assert cfg.task.head.bias is False and cfg.backbone._target_.endswith("Pixels")
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay, cfg.optimizer.nesterov) == (
        0.001, 0.0, 0.0001, False)
    assert cfg.data.batch_size == 64 and cfg.data.augment == "none"
    assert cfg.task.label_smoothing == 0.0  # the published loss: plain cross-entropy
    model = build_model(cfg, 1, (28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) == 385 + 784 * 10


class PublishedNet(nn.Module):
    """The published model for ``size × size`` images, as a reference (not the package's code)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.edge_mlp = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 1), nn.Tanh())
        self.fc = nn.Linear(size * size, 10, bias=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b = image.shape[0]
        adj = self.edge_mlp(self._pairs()).squeeze(-1)  # [N, N]
        return self.fc(torch.bmm(adj.expand(b, -1, -1), image.reshape(b, -1, 1)).reshape(b, -1))

    def _pairs(self):
        x, y = np.meshgrid(np.arange(self.size), np.arange(self.size))
        coord = np.stack([x, y], axis=-1).reshape(-1, 2).astype(np.float64)
        coord = torch.from_numpy((coord - coord.mean(axis=0)) / (coord.std(axis=0) + 1e-5)).float()
        n = coord.shape[0]
        return torch.cat([coord.unsqueeze(0).expand(n, n, 2), coord.unsqueeze(1).expand(n, n, 2)], dim=-1)


def test_training_steps_match_the_published_model_step_by_step():
    """Same weights, same batches: the experiment's model and optimizer follow the published one's
    losses and weights through several SGD steps (including the large early losses of this recipe)."""
    size = 8
    cfg = compose(["experiment=knyazev_learned_edges"])
    torch.manual_seed(0)
    model = build_model(cfg, 1, (size, size), 10)
    reference = PublishedNet(size)
    with torch.no_grad():
        reference.edge_mlp.load_state_dict(model.interconnect.edge_mlp.state_dict())
        reference.fc.weight.copy_(model.head.fc.weight)
    ours = instantiate(cfg.optimizer)(model.parameters())
    theirs = torch.optim.SGD(reference.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(6):
        images = torch.randn(16, 1, size, size, generator=gen) + 0.5
        labels = torch.randint(0, 10, (16,), generator=gen)
        step = []
        for net, optimizer in ((model, ours), (reference, theirs)):
            loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step.append(loss.item())
        losses.append(step)
    ours_losses, their_losses = zip(*losses)
    np.testing.assert_allclose(ours_losses, their_losses, rtol=1e-4)
    torch.testing.assert_close(model.head.fc.weight, reference.fc.weight, rtol=1e-4, atol=1e-6)
    for a, b in zip(model.interconnect.edge_mlp.parameters(), reference.edge_mlp.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
