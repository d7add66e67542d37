"""The contract each kind of part meets, written once, and the checks the model builder runs.

A part from outside the package (``backbone._target_=mylab.nets.MyBackbone``,
``gnn.layer=mylab.layers.MyConv``) is held to the same contract as the project's own, checked when
the model is built, with one line naming what is missing:

- :class:`Backbone`: ``image [B, C, H, W] -> fmap [B, C', h, w]`` with ``out_channels == C'``,
  built as ``Backbone(in_channels=C, ...)`` when it takes ``in_channels``.
- :class:`Interconnect`: ``fmap [B, C', h, w] -> GraphBatch`` (built with ``in_channels`` and
  ``image_size`` when it takes them).
- GNN layer (:class:`GNNLayer`): built as ``Layer(in_channels, out_channels)``, called as
  ``(x [B, N, C], adj [B|1, N, N] | None, edge_index [2, E] | None, edge_weight [E] | None) -> [B, N, C']``,
  declaring ``supports_dense`` / ``supports_sparse``.
- :class:`Decoder`: ``(GraphBatch | None, fmap) -> features [B, ...]``.
- Task: a subclass of :class:`interconnects.tasks.base.Task`.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

from torch import Tensor

from .config import ConfigError
from .graph import GraphBatch


@runtime_checkable
class Backbone(Protocol):
    """``image [B, C, H, W] -> fmap [B, out_channels, h, w]``."""

    out_channels: int

    def __call__(self, image: Tensor) -> Tensor: ...


@runtime_checkable
class Interconnect(Protocol):
    """``fmap [B, C, h, w] -> GraphBatch``."""

    def __call__(self, fmap: Tensor, **inputs) -> GraphBatch: ...


@runtime_checkable
class GNNLayer(Protocol):
    """``Layer(in_channels, out_channels)``; ``(x [B, N, C], adj, edge_index, edge_weight) -> [B, N, C']``."""

    supports_dense: bool
    supports_sparse: bool

    def __call__(self, x: Tensor, adj: Optional[Tensor], edge_index: Optional[Tensor],
                 edge_weight: Optional[Tensor]) -> Tensor: ...


@runtime_checkable
class Decoder(Protocol):
    """``(graph: GraphBatch | None, fmap [B, C, h, w]) -> features [B, ...]``."""

    def __call__(self, graph: Optional[GraphBatch], fmap: Tensor) -> Tensor: ...


def _name(part) -> str:
    cls = type(part)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_backbone(backbone, fmap) -> None:
    """``backbone`` and the feature map it made from a dummy image meet :class:`Backbone`."""
    channels = getattr(backbone, "out_channels", None)
    if isinstance(channels, bool) or not isinstance(channels, int):
        raise ConfigError(f"backbone._target_={_name(backbone)} lacks an integer attribute out_channels "
                          "(the channels of its feature map), which a backbone must have")
    if not isinstance(fmap, Tensor) or fmap.dim() != 4:
        shape = tuple(fmap.shape) if isinstance(fmap, Tensor) else type(fmap).__name__
        raise ConfigError(f"backbone._target_={_name(backbone)} returned {shape}; a backbone returns a feature map [B, C, h, w]")
    if fmap.shape[1] != channels:
        raise ConfigError(f"backbone._target_={_name(backbone)} has out_channels={channels} but its feature map "
                          f"has {fmap.shape[1]} channels")


def check_interconnect(interconnect, graph) -> None:
    """What ``interconnect`` returned from a feature map is a :class:`GraphBatch`."""
    if not isinstance(graph, GraphBatch):
        raise ConfigError(f"interconnect._target_={_name(interconnect)} returned a {type(graph).__name__}; "
                          "an interconnect returns an interconnects.GraphBatch")


def check_decoder(decoder, features, batch: int) -> None:
    """What ``decoder`` returned is a tensor of ``batch`` rows."""
    if not isinstance(features, Tensor) or features.dim() < 2 or features.shape[0] != batch:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ConfigError(f"decoder._target_={_name(decoder)} returned {shape}; a decoder returns features [B, ...] "
                          f"with B={batch}")
