"""Networks of the generative tasks: the reconstructor of the autoencoder, and the graph GAN's
generator and discriminator.

- :class:`Reconstructor`: decoder features ``[B, C, h, w]`` → an image ``[B, C_img, H, W]``
  (upsample + conv), the last stage of ``task=reconstruct``.
- :class:`GraphGenerator`: random node features on a latent grid (grid or kNN edges) → GNN layers →
  graph → CNN → upsampling to the image, ``tanh``: images in ``[-1, 1]``.
- :class:`GraphDiscriminator`: CNN features → kNN graph in feature space → GNN → a score per node →
  a small MLP over the node scores → one logit.
- :class:`ConvGenerator`, :class:`ConvDiscriminator`: the same two networks with every graph step
  replaced by 3×3 convolutions on the same grid (a DCGAN-style pair, no graph), the conventional
  reference measured beside the graph GAN (``task.generator.kind=conv``, ``experiment=mnist_gan_conv``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from ..checks import check_choice, check_int
from ..graph import GraphBatch
from ..grid import DenseGrid
from ..knn import KNN_WEIGHTS, KNNGraph, max_k
from ..to_cnn import GraphToCNN
from .gnn import GNN_LAYERS, GNNHead

GENERATOR_EDGES = ("grid", "knn")
NETWORK_KINDS = ("graph", "conv")


def _upsample_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """×2 nearest upsampling → 3×3 conv → batch norm → ReLU."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _upsampler(in_channels: int, channels: int, out_channels: int, in_size, image_size) -> tuple[nn.Module, int]:
    """``[B, in_channels, h, w] -> [B, out_channels, H, W]``: ×2 upsampling blocks until the map is at
    least the image size, a bilinear resize to the exact size when it overshoots (7 → 14 → 28 needs
    none), then a 3×3 conv. Returns the module and the number of ×2 blocks."""
    h, w = in_size
    H, W = image_size
    steps = max(0, math.ceil(math.log2(max(H / h, W / w))))
    blocks, c = [], in_channels
    for _ in range(steps):
        blocks.append(_upsample_block(c, channels))
        c = channels
    if (h * 2**steps, w * 2**steps) != (H, W):
        blocks.append(nn.Upsample(size=(H, W), mode="bilinear", align_corners=False))
    blocks.append(nn.Conv2d(c, out_channels, 3, padding=1))
    return nn.Sequential(*blocks), steps


class Reconstructor(nn.Module):
    """Decoder features back to the input size: ``[B, in_channels, h, w] -> [B, out_channels, H, W]``
    by ×2 upsample + 3×3 conv blocks (a bilinear resize when the sizes are not a power-of-2 apart)
    and a last 3×3 conv with no activation (the image is predicted in the data's normalised units).

    Args:
        in_channels: channels of the decoder's feature map.
        out_channels: image channels.
        in_size: ``(h, w)`` of the decoder's map.
        image_size: ``(H, W)`` of the images.
        channels: width of the upsampling blocks.
    """

    def __init__(self, in_channels: int, out_channels: int, in_size, image_size, channels: int = 32) -> None:
        super().__init__()
        check_int("channels", channels)
        self.net, _ = _upsampler(in_channels, channels, out_channels, tuple(in_size), tuple(image_size))

    def forward(self, features: Tensor) -> Tensor:
        """``[B, in_channels, h, w] -> [B, out_channels, H, W]``."""
        return self.net(features)


class _LatentGrid(nn.Module):
    """What both generators start from: ``N = h·w`` cells of a latent grid (a quarter of the image
    side unless ``grid_size`` says), each with ``latent_dim`` random features lifted to ``channels``
    plus a learned embedding of its cell."""

    def __init__(self, image_size, latent_dim: int, grid_size: int | None, channels: int) -> None:
        super().__init__()
        check_int("latent_dim", latent_dim)
        check_int("channels", channels)
        H, W = image_size
        side = grid_size if grid_size is not None else max(1, min(H, W) // 4)
        check_int("grid_size", side)
        if side > min(H, W):
            raise ValueError(f"grid_size={side} is out of range; it must be at most the image side {min(H, W)}")
        self.latent_dim, self.grid = latent_dim, (side, side)
        self.num_nodes = side * side
        self.embed = nn.Parameter(torch.randn(self.num_nodes, channels) * 0.1)
        self.lift = nn.Linear(latent_dim, channels)

    def noise(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Random features of each cell (node) ``[batch_size, N, latent_dim]`` (standard normal)."""
        return torch.randn(batch_size, self.num_nodes, self.latent_dim, generator=generator, device=device)

    def latent_map(self, z: Tensor) -> Tensor:
        """``z [B, N, latent_dim] -> [B, channels, h, w]``: lifted noise plus the cells' embedding."""
        h, w = self.grid
        x = self.lift(z) + self.embed  # [B, N, C]
        return x.transpose(1, 2).reshape(z.shape[0], -1, h, w)


class GraphGenerator(_LatentGrid):
    """Noise on a graph → image: ``z [B, N, latent_dim] -> images [B, C, H, W]`` in ``[-1, 1]``.

    The ``N = h·w`` nodes sit on a latent grid (node ``n`` at cell ``(n // w, n % w)``); each carries
    random features plus a learned embedding of its cell (so the GNN knows where it is). Edges are
    ``grid`` (:class:`~interconnects.DenseGrid`, the complete inverse-distance graph, normalised) or
    ``knn`` (:class:`~interconnects.KNNGraph` in the space of the embedded node features). GNN layers
    (:class:`~interconnects.models.gnn.GNNHead`) mix the nodes, graph → CNN
    (:class:`~interconnects.GraphToCNN`) puts them back on the grid, and ×2 upsampling blocks reach
    the image size, then ``tanh``.

    Args:
        out_channels: image channels.
        image_size: ``(H, W)``.
        latent_dim: random features per node.
        grid_size: side of the latent grid (``h = w``); ``None``: a quarter of the image side.
        channels: width of the GNN and of the upsampling blocks.
        num_layers: GNN layers.
        layer: GNN layer (one of :data:`~interconnects.models.gnn.GNN_LAYERS`).
        edges: ``grid`` or ``knn``.
        k: neighbours per node for ``knn`` edges.
        edge_weight: the weights of ``knn`` edges (:class:`~interconnects.KNNGraph`'s ``edge_weight``).
    """

    def __init__(
        self,
        out_channels: int,
        image_size,
        latent_dim: int = 16,
        grid_size: int | None = None,
        channels: int = 64,
        num_layers: int = 2,
        layer: str = "graphconv",
        edges: str = "grid",
        k: int = 8,
        edge_weight: str = "ones",
    ) -> None:
        check_choice("edges", edges, GENERATOR_EDGES)
        check_choice("edge_weight", edge_weight, KNN_WEIGHTS)
        if edges != "knn" and edge_weight != "ones":
            raise ValueError(f"edge_weight={edge_weight!r} applies to edges='knn' only; leave it 'ones' with edges={edges!r}")
        check_choice("layer", layer, GNN_LAYERS)
        super().__init__(image_size, latent_dim, grid_size, channels)
        top = max_k(self.num_nodes, edge_weight)
        if edges == "knn" and not 1 <= k <= top:
            raise ValueError(f"k={k!r} is out of range; it must be in [1, {top}] for a "
                             f"{self.grid[0]}×{self.grid[1]} latent grid with edge_weight={edge_weight!r}")
        self.graph = DenseGrid(normalize=True) if edges == "grid" else KNNGraph(k=k, edge_weight=edge_weight)
        self.gnn = GNNHead(channels, layer=layer, hidden_channels=channels, num_layers=num_layers, norm="batch")
        self.to_cnn = GraphToCNN()
        self.up, _ = _upsampler(self.gnn.out_channels, channels, out_channels, self.grid, tuple(image_size))

    def forward(self, z: Tensor) -> Tensor:
        """``z [B, N, latent_dim] -> images [B, out_channels, H, W]`` in ``[-1, 1]``."""
        graph = self.gnn(self.graph(self.latent_map(z)))
        return torch.tanh(self.up(self.to_cnn(graph)))


class ConvGenerator(_LatentGrid):
    """Noise on a grid → image, with convolutions where :class:`GraphGenerator` has graph layers:
    ``z [B, N, latent_dim] -> images [B, C, H, W]`` in ``[-1, 1]``.

    The same noise as the graph generator (``N = h·w`` cells of ``latent_dim`` features, a learned
    embedding per cell), read as a ``[B, channels, h, w]`` map; ``num_layers`` 3×3 conv → batch norm
    → ReLU blocks; the same ×2 upsampling blocks to the image, ``tanh``.

    Args:
        out_channels: image channels.
        image_size: ``(H, W)``.
        latent_dim: random features per cell.
        grid_size: side of the latent grid; ``None``: a quarter of the image side.
        channels: width of the convs and the upsampling blocks.
        num_layers: 3×3 conv blocks on the latent grid.
    """

    def __init__(self, out_channels: int, image_size, latent_dim: int = 16, grid_size: int | None = None,
                 channels: int = 64, num_layers: int = 2) -> None:
        check_int("num_layers", num_layers, 0)
        super().__init__(image_size, latent_dim, grid_size, channels)
        blocks = []
        for _ in range(num_layers):
            blocks += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*blocks)
        self.up, _ = _upsampler(channels, channels, out_channels, self.grid, tuple(image_size))

    def forward(self, z: Tensor) -> Tensor:
        """``z [B, N, latent_dim] -> images [B, out_channels, H, W]`` in ``[-1, 1]``."""
        return torch.tanh(self.up(self.body(self.latent_map(z))))


def _drop_derived_weights(module, state_dict, prefix, *hook_args):
    """torch_geometric's ``Linear`` also writes its (here: normalised) ``weight`` into the state dict,
    beside the parametrisation's own ``original``: the copy is derived, so it is left out when saving
    and ignored when loading (the hook of both)."""
    for key in module._derived:
        state_dict.pop(prefix + key, None)


def apply_spectral_norm(network: nn.Module) -> None:
    """Spectral normalisation on every layer of ``network`` with a weight matrix: the convs and
    linears, and the GNN layers' own (torch_geometric's ``Linear`` is not an ``nn.Linear``); the
    normalised weight copies such a layer writes into the state dict are kept out of it."""
    derived = []  # state-dict keys of normalised weights that a module writes besides its own
    for name, module in list(network.named_modules()):
        weight = module._parameters.get("weight")
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2:
            spectral_norm(module)
            if type(module)._save_to_state_dict is not nn.Module._save_to_state_dict:
                derived.append(f"{name}.weight")
    network._derived = derived
    if derived:
        network._register_state_dict_hook(_drop_derived_weights)
        network._register_load_state_dict_pre_hook(_drop_derived_weights, with_module=True)


def _downsampling_convs(in_channels: int, channels: int, downsamples: int, image_size) -> tuple[list, tuple[int, int]]:
    """The discriminators' CNN: a 3×3 conv to ``channels``, then ``downsamples`` stride-2 4×4 convs,
    each followed by LeakyReLU(0.2): ``(the layers, the (h, w) of the map they give)``."""
    h, w = image_size
    convs = [nn.Conv2d(in_channels, channels, 3, padding=1), nn.LeakyReLU(0.2)]
    for _ in range(downsamples):
        convs += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        h, w = h // 2, w // 2
    return convs, (h, w)


class GraphDiscriminator(nn.Module):
    """Image → one logit: ``images [B, C, H, W] -> [B]``.

    Strided convs (LeakyReLU) give a feature map ``[B, channels, h, w]``; :class:`~interconnects.KNNGraph`
    joins each cell to its ``k`` nearest cells in feature space (one batched top-k, no per-image
    loop), with weights that fall to 0 at the ``(k+1)``-th nearest; GNN layers; a linear score per node ``[B, N]``; a small MLP over the ``N`` node scores →
    one logit. No batch norm anywhere (it would couple the samples of a batch and break the R1
    penalty's per-sample gradient).

    Args:
        in_channels: image channels.
        image_size: ``(H, W)``.
        channels: width of the CNN and the GNN.
        downsamples: stride-2 convs (``28 → 14 → 7`` for 2).
        k: neighbours per node of the kNN graph.
        num_layers: GNN layers.
        layer: GNN layer.
        hidden: width of the MLP over node scores.
        edge_weight: the kNN graph's edge weights (:class:`~interconnects.KNNGraph`'s ``edge_weight``).
            ``continuous`` (the default) makes the discriminator a continuous function of its input
            and its aggregation a weighted mean; with ``ones`` (a sum over 8 neighbours whose choice
            jumps) it won late in the run on the MNIST sample (``docs/results.md``).
        spectral_norm: wrap every layer with a weight matrix (the convs, the GNN layers' linears, the
            score and the MLP) in spectral normalisation.
    """

    def __init__(
        self,
        in_channels: int,
        image_size,
        channels: int = 64,
        downsamples: int = 2,
        k: int = 8,
        num_layers: int = 2,
        layer: str = "graphconv",
        hidden: int = 64,
        spectral_norm: bool = True,
        edge_weight: str = "continuous",
    ) -> None:
        super().__init__()
        check_int("channels", channels)
        check_int("downsamples", downsamples, 0)
        check_int("hidden", hidden)
        check_choice("layer", layer, GNN_LAYERS)
        check_choice("edge_weight", edge_weight, KNN_WEIGHTS)
        convs, (h, w) = _downsampling_convs(in_channels, channels, downsamples, image_size)
        self.cnn = nn.Sequential(*convs)
        self.num_nodes = h * w
        top = max_k(self.num_nodes, edge_weight)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top:
            raise ValueError(f"k={k!r} is out of range; it must be in [1, {top}] for a {h}×{w} feature map "
                             f"with edge_weight={edge_weight!r}")
        self.graph = KNNGraph(k=k, edge_weight=edge_weight)
        self.gnn = GNNHead(channels, layer=layer, hidden_channels=channels, num_layers=num_layers, norm=None,
                           act="leaky_relu")
        self.node_score = nn.Linear(self.gnn.out_channels, 1)
        self.mlp = nn.Sequential(nn.Linear(self.num_nodes, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, images: Tensor) -> Tensor:
        """``images [B, C, H, W]`` (in ``[-1, 1]``) → logits ``[B]``."""
        graph: GraphBatch = self.graph(self.cnn(images))
        graph = self.gnn(graph)
        scores = self.node_score(graph.x).squeeze(-1)  # [B, N]
        return self.mlp(F.leaky_relu(scores, 0.2)).squeeze(-1)


class ConvDiscriminator(nn.Module):
    """Image → one logit, with convolutions where :class:`GraphDiscriminator` has graph layers:
    ``images [B, C, H, W] -> [B]``.

    The same strided convs (LeakyReLU) to ``[B, channels, h, w]``; ``num_layers`` 3×3 convs
    (LeakyReLU) in place of the kNN graph and its GNN layers; the same score per cell ``[B, h·w]``
    and MLP over the scores → one logit. No batch norm.

    Args:
        in_channels: image channels.
        image_size: ``(H, W)``.
        channels: width of the convs.
        downsamples: stride-2 convs (``28 → 14 → 7`` for 2).
        num_layers: 3×3 convs after the downsampling.
        hidden: width of the MLP over the cell scores.
        spectral_norm: spectral normalisation on every conv and linear.
    """

    def __init__(self, in_channels: int, image_size, channels: int = 64, downsamples: int = 2,
                 num_layers: int = 2, hidden: int = 64, spectral_norm: bool = True) -> None:
        super().__init__()
        check_int("channels", channels)
        check_int("downsamples", downsamples, 0)
        check_int("num_layers", num_layers, 0)
        check_int("hidden", hidden)
        convs, (h, w) = _downsampling_convs(in_channels, channels, downsamples, image_size)
        for _ in range(num_layers):
            convs += [nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2)]
        self.cnn = nn.Sequential(*convs)
        self.num_nodes = h * w
        self.node_score = nn.Conv2d(channels, 1, 1)
        self.mlp = nn.Sequential(nn.Linear(self.num_nodes, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, images: Tensor) -> Tensor:
        """``images [B, C, H, W]`` (in ``[-1, 1]``) → logits ``[B]``."""
        scores = self.node_score(self.cnn(images)).flatten(1)  # [B, h·w]
        return self.mlp(F.leaky_relu(scores, 0.2)).squeeze(-1)
