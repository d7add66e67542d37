"""interconnects: put a graph neural network inside a CNN.

CNN → graph: :class:`DenseGrid` (every cell a node), :class:`Keypoints` (K chosen cells),
:class:`KNNGraph` (edges to the k nearest cells in feature space), :class:`Superpixels` (one node per
SLIC region of the input image). Graph → CNN: :class:`GraphToCNN`.
They all meet in :class:`GraphBatch`.

The names are imported on first use, so that the command-line tools start (and print ``--help``)
without importing torch.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["GraphBatch", "DenseGrid", "Keypoints", "KNNGraph", "Superpixels", "GraphToCNN"]

_HOMES = {
    "GraphBatch": ".graph",
    "DenseGrid": ".grid",
    "Keypoints": ".keypoints",
    "KNNGraph": ".knn",
    "Superpixels": ".superpixels",
    "GraphToCNN": ".to_cnn",
}


def __getattr__(name):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
