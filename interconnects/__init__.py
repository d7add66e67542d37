"""interconnects: put a graph neural network inside a CNN.

CNN → graph: :class:`DenseGrid` (every cell a node), :class:`Keypoints` (K chosen cells),
:class:`KNNGraph` (edges to the k nearest cells in feature space). Graph → CNN: :class:`GraphToCNN`.
They all meet in :class:`GraphBatch`.
"""

from .graph import GraphBatch
from .grid import DenseGrid
from .keypoints import Keypoints
from .knn import KNNGraph
from .to_cnn import GraphToCNN

__all__ = ["GraphBatch", "DenseGrid", "Keypoints", "KNNGraph", "GraphToCNN"]
__version__ = "0.1.0"
