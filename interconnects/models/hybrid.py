"""The hybrid model (backbone → interconnect → GNN → decoder → head) and its builder."""

from __future__ import annotations

import inspect
import re
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..config import ConfigError, first_line
from ..contracts import check_backbone, check_decoder, check_interconnect


def _config_error(group: str, exc: Exception) -> ConfigError:
    """``num_keypoints=100 is ...`` from a module becomes ``interconnect.num_keypoints=100 is ...``:
    the key as it is written on the command line."""
    message = str(exc)
    return ConfigError(f"{group}.{message}" if re.match(r"^\w+=", message) else f"{group}: {message}")


class ClassifierHead(nn.Module):
    """Features → class logits: ``[B, C, h, w]`` (global ``pool``, ``mean`` or ``max``, first) or
    ``[B, C]`` → ``[B, classes]``, multiplied by ``scale``."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, dropout: float = 0.0,
                 pool: str = "mean", scale: float = 1.0) -> None:
        super().__init__()
        if pool not in ("mean", "max"):
            raise ValueError(f"pool={pool!r} is not supported; choose mean or max")
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes, bias=bias)
        self.pool, self.scale = pool, float(scale)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() == 4:
            features = features.mean(dim=(2, 3)) if self.pool == "mean" else features.amax(dim=(2, 3))
        logits = self.fc(self.dropout(features))
        return logits * self.scale if self.scale != 1.0 else logits


class HybridModel(nn.Module):
    """``image [B, C, H, W] -> logits [B, classes]`` through a graph made from the CNN's feature map.

    With ``interconnect=None`` there is no graph: the backbone's feature map goes straight to the
    decoder and head (the CNN baseline every hybrid is compared with).
    """

    def __init__(self, backbone: nn.Module, interconnect: nn.Module | None, gnn: nn.Module | None,
                 decoder: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone, self.interconnect, self.gnn, self.decoder = backbone, interconnect, gnn, decoder
        self.head = head if head is not None else nn.Identity()
        self.graph_nodes: int | None = None  # nodes per image and whether the graph is complete (dense),
        self.graph_dense = False  # as seen by the builder's dummy forward pass

    def graph(self, image: Tensor, **interconnect_inputs):
        """``image -> (fmap [B, C', h, w], GraphBatch after the GNN or None)``."""
        fmap = self.backbone(image)
        if self.interconnect is None:
            return fmap, None
        graph = self.to_graph(fmap, image, **interconnect_inputs)
        if self.gnn is not None:
            graph = self.gnn(graph)
        return fmap, graph

    def to_graph(self, fmap: Tensor, image: Tensor, **interconnect_inputs):
        """The interconnect on ``fmap``; one that declares ``needs_image`` (keypoints from a detector
        on the input) also gets ``image``."""
        if getattr(self.interconnect, "needs_image", False):
            interconnect_inputs.setdefault("image", image)
        return self.interconnect(fmap, **interconnect_inputs)

    def features(self, image: Tensor, **interconnect_inputs) -> Tensor:
        """``image -> decoder features`` (``[B, C'', h, w]`` or ``[B, D]``)."""
        fmap, graph = self.graph(image, **interconnect_inputs)
        return self.decoder(graph, fmap)

    def forward(self, image: Tensor, **interconnect_inputs) -> Tensor:
        return self.head(self.features(image, **interconnect_inputs))


def _plain(node) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def check_settings(group: str, cls, kwargs: Mapping[str, Any], inferred=()):
    """``cls``'s signature parameters, after checking that it takes every key of ``kwargs`` (the
    ``group`` config node's); ``inferred``: the names the code passes itself (not listed as accepted).
    An unknown key raises a one-line :class:`ConfigError` naming it as ``group.key``."""
    params = inspect.signature(cls).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        accepted = ", ".join(k for k in params if k not in inferred and k != "self") or "none"
        raise ConfigError(
            f"{group}.{unknown[0]} is not a setting of {cls.__name__} (accepted: {accepted}); the {group} config "
            f"keeps keys {cls.__name__} does not take ({', '.join(unknown)}): put the class in a config file "
            f"{group}/<name>.yaml on hydra.searchpath, or drop them with {' '.join('~' + group + '.' + k for k in unknown)}")
    return params


def build_part(group: str, node: Mapping[str, Any] | None, **inferred):
    """Build a ``_target_`` config node, adding each inferred keyword its class accepts and the node
    does not set. Errors become one-line :class:`ConfigError` naming ``group`` and the key."""
    if node is None:
        return None
    kwargs = _plain(node)
    kwargs.pop("_partial_", None)
    target = kwargs.pop("_target_", None)
    if target is None:
        return None
    from hydra.utils import get_class

    try:
        cls = get_class(target)
    except Exception as exc:
        raise ConfigError(f"{group}._target_={target!r} cannot be imported ({exc})") from None
    params = check_settings(group, cls, kwargs, inferred)
    # (an inferred key set to null in the config is inferred too: ``gnn.hidden_channels: null``)
    kwargs.update({k: v for k, v in inferred.items() if k in params and kwargs.get(k) is None})
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise _config_error(group, exc) from None


def _node_channels(interconnect: nn.Module, fmap: Tensor, image: Tensor) -> int:
    """The node feature channels ``interconnect`` makes of a dummy ``fmap`` (the GNN's ``in_channels``):
    the fmap's own channels for the cell interconnects, more where nodes carry more (superpixels)."""
    interconnect.eval()
    inputs = {"image": image} if getattr(interconnect, "needs_image", False) else {}
    try:
        with torch.no_grad():
            graph = interconnect(fmap, **inputs)
    except ConfigError:
        raise
    except ValueError as exc:
        raise _config_error("interconnect", exc) from None
    check_interconnect(interconnect, graph)
    return graph.num_channels


def _smallest_side(backbone: nn.Module, in_channels: int, above: int, limit: int = 1024) -> int | None:
    """The smallest side ``s > above`` of a square image ``[1, C, s, s]`` that ``backbone`` takes
    (``None`` if none up to ``limit`` does): doubling, then bisection."""
    def takes(side: int) -> bool:
        try:
            backbone(torch.zeros(1, in_channels, side, side))
            return True
        except RuntimeError:
            return False

    low, high = above, max(above + 1, 2)
    while not takes(high):
        low, high = high, high * 2
        if high > limit:
            return None
    while high - low > 1:  # takes(high), not takes(low)
        middle = (low + high) // 2
        low, high = (low, middle) if takes(middle) else (middle, high)
    return high


def build_hybrid(cfg, in_channels: int, image_size: tuple[int, int], backbone: nn.Module | None = None) -> HybridModel:
    """Build backbone → interconnect → GNN → decoder from ``cfg.backbone/interconnect/gnn/decoder``
    for images of ``in_channels × image_size``, without a task head: ``model(image)`` returns the
    decoder's features (``[B, C'', h, w]`` or ``[B, D]``). Channel counts and map sizes are inferred
    stage by stage with a dummy forward pass, which also rejects impossible settings (more
    keypoints than cells, k not below the node count) before any training starts.

    ``backbone``: a ready module to use instead of ``cfg.backbone`` (any ``nn.Module`` with an
    ``out_channels`` attribute)."""
    if backbone is None:
        backbone = build_part("backbone", cfg.backbone, in_channels=in_channels)
    dummy = torch.zeros(2, in_channels, *image_size)
    backbone.eval()
    with torch.no_grad():
        try:
            fmap = backbone(dummy)
        except RuntimeError:  # (a pooling or convolution with nothing left to cover)
            smallest = _smallest_side(backbone, in_channels, max(image_size))
            if smallest is None:
                raise
            raise ConfigError(f"data.image_size: images of {image_size[0]}x{image_size[1]} are too small for "
                              f"{type(backbone).__name__}, whose feature map would have no cells left; the smallest "
                              f"size it takes is data.image_size={smallest}") from None
    check_backbone(backbone, fmap)
    channels = fmap.shape[1]
    interconnect = build_part("interconnect", cfg.interconnect, in_channels=channels, image_size=tuple(image_size))
    gnn_layer = (cfg.get("gnn") or {}).get("layer", "none") if (cfg.get("gnn") or {}).get("_target_") else "none"
    if interconnect is None and gnn_layer != "none":
        raise ConfigError(f"gnn.layer={gnn_layer!r} needs a graph, but interconnect=none builds none; "
                          "use gnn=none for the CNN baseline, or choose an interconnect (grid, keypoints, knn)")
    node_channels = channels if interconnect is None else _node_channels(interconnect, fmap, dummy)
    gnn = build_part("gnn", cfg.gnn, in_channels=node_channels, hidden_channels=channels) if interconnect is not None else None
    graph_channels = gnn.out_channels if gnn is not None else node_channels
    decoder = build_part("decoder", cfg.decoder, graph_channels=graph_channels, fmap_channels=channels)
    model = HybridModel(backbone, interconnect, gnn, decoder)
    model.eval()
    with torch.no_grad():
        try:
            if interconnect is not None:
                graph = model.to_graph(fmap, dummy)
                check_interconnect(interconnect, graph)
                # what the cost warnings read: the graph's size, and whether it is complete (dense)
                model.graph_nodes = graph.num_nodes
                model.graph_dense = graph.neighbors is None and (graph.adj is not None or graph.aggregator is not None)
            features = model.features(dummy)
        except ConfigError:
            raise
        except ValueError as exc:
            raise _config_error("interconnect", exc) from None
        except RuntimeError as exc:  # (the decoder pools or convolves a map with nothing left to cover)
            message = first_line(exc)
            if "too small" not in message and "can't be greater than actual input size" not in message:
                raise
            raise ConfigError(f"decoder: {type(decoder).__name__} cannot take the backbone's {fmap.shape[2]}x{fmap.shape[3]} "
                              f"feature map ({message}); a larger data.image_size or a smaller "
                              "backbone.output_stride gives a larger map") from None
    check_decoder(decoder, features, dummy.shape[0])
    model.out_shape = tuple(features.shape[1:])
    return model.train()


def build_model(cfg, in_channels: int, image_size: tuple[int, int], num_classes: int,
                backbone: nn.Module | None = None) -> HybridModel:
    """:func:`build_hybrid` plus a classifier head of ``num_classes`` (options from ``cfg.task.head``):
    ``model(image)`` returns logits ``[B, num_classes]``."""
    model = build_hybrid(cfg, in_channels, image_size, backbone)
    head_cfg = dict(cfg.task.get("head", {}) or {})
    try:
        model.head = ClassifierHead(model.out_shape[0], num_classes, **head_cfg)
    except TypeError as exc:
        raise ConfigError(f"task.head: {exc}") from None
    except ValueError as exc:
        raise _config_error("task.head", exc) from None
    return model


def parameter_table(model: nn.Module) -> list[tuple[str, int]]:
    """``[(stage, trainable parameter count)]`` for each top-level child, then the total."""
    rows = [(name, sum(p.numel() for p in child.parameters() if p.requires_grad)) for name, child in model.named_children()]
    rows.append(("total", sum(n for _, n in rows)))
    return rows


def single_value_norms(model: nn.Module, in_channels: int, image_size: tuple[int, int]) -> list[tuple[str, tuple[int, ...]]]:
    """The BatchNorm layers of ``model`` that a training step of one image ``[1, C, H, W]`` would give
    a single value per channel (a ``1×1`` map, a graph of one node), which training mode refuses:
    ``[(layer name, its input shape)]``, in the order the forward pass meets them. Runs one forward
    pass of a zero image in eval mode under ``no_grad``, so no running statistic changes; the RNG
    states and the train mode are left as they were."""
    from torch.nn.modules.batchnorm import _BatchNorm

    found: list[tuple[str, tuple[int, ...]]] = []

    def record(name: str):
        def hook(module, inputs):
            x = inputs[0] if inputs else None
            if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[1] and x.numel() // x.shape[1] == 1:
                found.append((name, tuple(x.shape)))
        return hook

    was_training = model.training
    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if not hooks:
        return []
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model(torch.zeros(1, in_channels, *image_size, device=device))
    except Exception:  # noqa: BLE001 - (a layer that refuses one value even in eval mode: what was seen so far)
        pass
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return found
