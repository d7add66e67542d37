"""Superpixels: batched SLIC against a loop reference, connectivity, the fixed node count, pooling,
graph → CNN by the assignment, edges, gradients and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import compose
from interconnects import GraphBatch, GraphToCNN, Superpixels
from interconnects.superpixels import (
    RegionGraphBatch,
    enforce_connectivity,
    seed_grid,
    seed_layout,
    slic_colour,
)


def _digits(count: int = 4) -> torch.Tensor:
    """Real handwritten digits (scikit-learn's 8×8, upscaled to 24×24) in [0, 1]: ``[count, 1, 24, 24]``."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:count], dtype=torch.float32) / 16
    return torch.nn.functional.interpolate(images.unsqueeze(1), scale_factor=3, mode="bilinear")


# ---- the loop reference --------------------------------------------------------------------------
def reference_cluster(image: torch.Tensor, num_segments: int, compactness: float, iterations: int) -> torch.Tensor:
    """SLIC written plainly, one image, one pixel and one seed at a time, in float64: every pixel takes
    the nearest (``|Δcolour|²/m² + |Δpos|²/step²``) of the seeds whose grid rows and columns enclose
    it (the seed row at or above it and the next one, likewise for columns, those that exist; the
    lowest seed id wins a tie), then every seed moves to the mean of its pixels (an empty one stays)."""
    b, _, h, w = image.shape
    r0, c0, sr, sc, step = seed_grid(h, w, num_segments)
    seed_rows, seed_cols = list(range(r0, h, sr)), list(range(c0, w, sc))
    gw = len(seed_cols)
    colour = (slic_colour(image) / compactness).double()
    out = torch.empty(b, h, w, dtype=torch.long)
    for n in range(b):
        def feature(r, c):
            return [*colour[n, :, r, c].tolist(), r / step, c / step]

        centres = [feature(r, c) for r in seed_rows for c in seed_cols]
        labels = {}
        for _ in range(iterations):
            for r in range(h):
                above = max(i for i, sr_ in enumerate(seed_rows) if sr_ <= r) if r >= r0 else -1
                for c in range(w):
                    left = max(j for j, sc_ in enumerate(seed_cols) if sc_ <= c) if c >= c0 else -1
                    f = feature(r, c)
                    best, best_d = None, math.inf
                    for i in (above, above + 1):
                        for j in (left, left + 1):
                            if not (0 <= i < len(seed_rows) and 0 <= j < gw):
                                continue
                            k = i * gw + j
                            dist = sum((a - z) ** 2 for a, z in zip(f, centres[k]))
                            if dist < best_d:
                                best, best_d = k, dist
                    labels[r, c] = best
            for k in range(len(centres)):
                members = [feature(r, c) for (r, c), lab in labels.items() if lab == k]
                if members:
                    centres[k] = [sum(v) / len(members) for v in zip(*members)]
        for (r, c), lab in labels.items():
            out[n, r, c] = lab
    return out


@pytest.mark.parametrize("shape,channels,num_segments,compactness", [
    ((9, 11), 1, 9, 0.3), ((12, 12), 3, 16, 10.0), ((7, 10), 1, 6, 0.1),
])
def test_assignment_equals_the_loop_reference(shape, channels, num_segments, compactness):
    torch.manual_seed(0)
    # smooth random images (ties between candidates are then measure-zero events)
    image = torch.nn.functional.interpolate(torch.rand(2, channels, 4, 4), size=shape, mode="bilinear")
    sp = Superpixels(num_segments=num_segments, compactness=compactness, iterations=4)
    ours = sp.cluster(image)
    ref = reference_cluster(image, num_segments, compactness, iterations=4)
    assert torch.equal(ours, ref)


def test_colour_is_skimages_cielab():
    from skimage.color import rgb2lab

    rgb = torch.rand(2, 3, 5, 6)
    rgb[:, :, 0, 0], rgb[:, :, 0, 1] = 0.0, 1.0  # each image spans [0, 1]: the min-max rescale is the identity
    expected = torch.tensor(np.stack([rgb2lab(im.permute(1, 2, 0).numpy()) for im in rgb])).permute(0, 3, 1, 2)
    torch.testing.assert_close(slic_colour(rgb), expected.float(), rtol=1e-3, atol=1e-2)


def test_seed_grid_is_skimages():
    from skimage.util import regular_grid

    for (h, w), n in [((28, 28), 75), ((32, 32), 150), ((9, 40), 12), ((24, 24), 30), ((5, 5), 100)]:
        r0, c0, sr, sc, _ = seed_grid(h, w, n)
        slices = regular_grid((1, h, w), n)
        expected_rows = list(range(h))[slices[1]]
        expected_cols = list(range(w))[slices[2]]
        assert list(range(r0, h, sr)) == expected_rows and list(range(c0, w, sc)) == expected_cols
    assert seed_layout(28, 28, 75).seeds.shape == (81, 2) and seed_layout(32, 32, 150).seeds.shape == (121, 2)


# ---- connectivity and the node count -------------------------------------------------------------
def _pieces(regions: np.ndarray) -> dict[int, int]:
    """4-connected pieces of each region label of one ``[H, W]`` map."""
    return {int(lab): ndimage.label(regions == lab)[1] for lab in np.unique(regions)}


def test_every_region_is_one_connected_piece():
    torch.manual_seed(1)
    noise = torch.rand(3, 1, 24, 24)  # noise fragments SLIC's regions: connectivity has work to do
    for image, compactness in [(noise, 0.05), (_digits(), 0.25), (torch.rand(2, 3, 20, 20), 10.0)]:
        sp = Superpixels(num_segments=30, compactness=compactness)
        raw = sp.cluster(image)
        regions = sp.segment(image)
        for n in range(image.shape[0]):
            assert set(_pieces(regions[n].numpy()).values()) == {1}
        if image is noise:  # the raw k-means does leave pieces, so the test has teeth
            assert any(max(_pieces(raw[n].numpy()).values()) > 1 for n in range(image.shape[0]))


def test_connected_components_equal_scipys_labelling():
    """Each pixel gets the smallest flat pixel id of its 4-connected piece of equal labels, on random
    labels (many pieces, snakes and holes) of several shapes, thin ones included."""
    from interconnects.superpixels import connected_components

    torch.manual_seed(0)
    for shape, k in [((4, 24, 24), 3), ((3, 32, 32), 30), ((2, 9, 13), 2), ((2, 1, 13), 2), ((2, 13, 1), 2)]:
        labels = torch.randint(0, k, shape)
        ours = connected_components(labels)
        for n in range(shape[0]):
            lab = labels[n].numpy()
            expected = np.empty(lab.shape, dtype=np.int64)
            for value in np.unique(lab):
                pieces, count = ndimage.label(lab == value)
                for piece in range(1, count + 1):
                    where = np.flatnonzero(pieces == piece)
                    expected.flat[where] = where.min()
            assert np.array_equal(ours[n].numpy(), expected), shape


def test_the_int32_and_int64_id_paths_agree(monkeypatch):
    """Ids are int32 where they fit and int64 for images too large for them: both give the same
    components and the same connected regions (the int64 path forced on small images)."""
    import interconnects.superpixels as sp

    torch.manual_seed(0)
    labels = torch.randint(0, 5, (3, 20, 17))
    small = (sp.connected_components(labels), sp.enforce_connectivity(labels, 5, 6.0))
    assert sp._id_dtype(20, 17) is torch.int32 and sp._id_dtype(2000, 2000) is torch.int64
    monkeypatch.setattr(sp, "_id_dtype", lambda h, w: torch.int64)
    large = (sp.connected_components(labels), sp.enforce_connectivity(labels, 5, 6.0))
    for a, b in zip(small, large):
        assert a.dtype == b.dtype == torch.long and torch.equal(a, b)


def test_enforce_connectivity_moves_a_stray_piece_to_a_neighbouring_region():
    labels = torch.zeros(1, 6, 6, dtype=torch.long)
    labels[0, :, 3:] = 1
    labels[0, 0, 5] = 0  # a stray piece of region 0 inside region 1
    labels[0, 5, 0] = 2  # region 2: one pixel, under min_size
    out = enforce_connectivity(labels, 3, min_size=2)
    expected = torch.zeros(1, 6, 6, dtype=torch.long)
    expected[0, :, 3:] = 1
    assert torch.equal(out, expected)


def test_fixed_node_count_with_empty_regions_filled():
    images = torch.cat([torch.zeros(1, 1, 24, 24), _digits(2), torch.rand(1, 1, 24, 24)])
    sp = Superpixels(num_segments=30, compactness=0.05, min_size_factor=0.5)
    graph = sp(images)
    n = seed_layout(24, 24, 30).seeds.shape[0]
    assert isinstance(graph, RegionGraphBatch) and isinstance(graph, GraphBatch)
    assert graph.x.shape == (4, n, 1 + 3 + 1) and graph.pos.shape == (4, n, 2)
    assert graph.valid[0].all()  # a blank image: the seed grid itself, every region kept
    assert not graph.valid[3].all()  # noise: some regions were merged away
    # an empty slot is a copy of the region that holds its seed pixel
    seeds = seed_layout(24, 24, 30).seeds
    for b, s in (~graph.valid).nonzero().tolist():
        holder = int(graph.regions[b, seeds[s, 0], seeds[s, 1]])
        assert graph.valid[b, holder]
        torch.testing.assert_close(graph.x[b, s], graph.x[b, holder], rtol=0, atol=0)
        torch.testing.assert_close(graph.pos[b, s], graph.pos[b, holder], rtol=0, atol=0)
    # every pixel belongs to a valid region, and the region sizes add up to the image
    assert graph.valid.gather(1, graph.regions.flatten(1)).all()
    sizes = graph.x[..., -2] * (24 * 24) / n  # the relative size feature back in pixels
    assert torch.allclose((sizes * graph.valid).sum(1), torch.full((4,), 576.0))


# ---- node features, graph → CNN ------------------------------------------------------------------
def test_node_features_are_region_means_centroids_sizes_and_colours():
    torch.manual_seed(2)
    image = _digits(2)
    fmap = torch.randn(2, 5, 6, 6)  # stride 4: each cell covers a 4×4 block of pixels
    graph = Superpixels(num_segments=20)(fmap, image=image)
    up = fmap.repeat_interleave(4, 2).repeat_interleave(4, 3)  # each pixel its cell's features
    n = graph.num_nodes
    for b in range(2):
        for s in range(n):
            if not graph.valid[b, s]:
                continue
            mask = graph.regions[b] == s
            rows, cols = mask.nonzero(as_tuple=True)
            torch.testing.assert_close(graph.x[b, s, :5], up[b][:, mask].mean(1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(graph.x[b, s, 5:7], torch.stack([rows.float().mean() / 23, cols.float().mean() / 23]))
            torch.testing.assert_close(graph.x[b, s, 7], torch.tensor(mask.sum().item() * n / 576.0))
            torch.testing.assert_close(graph.x[b, s, 8:], image[b][:, mask].mean(1))
            # pos: the centroid in feature-map cells
            torch.testing.assert_close(graph.pos[b, s], (torch.stack([rows, cols]).float().mean(1) + 0.5) / 4 - 0.5)


def test_graph_to_cnn_gives_each_cell_its_regions_features():
    torch.manual_seed(3)
    image = _digits(2)
    fmap = torch.randn(2, 4, 6, 6)
    graph = Superpixels(num_segments=20)(fmap, image=image)
    out = GraphToCNN()(graph)
    assert out.shape == (2, graph.num_channels, 6, 6)
    for b in range(2):
        for r in range(6):
            for c in range(6):
                node = int(graph.assignment[b, r, c])
                torch.testing.assert_close(out[b, :, r, c], graph.x[b, node], rtol=0, atol=0)
                # the cell's region is the one covering most of its 4×4 pixels
                block = graph.regions[b, 4 * r: 4 * r + 4, 4 * c: 4 * c + 4].flatten()
                assert (block == node).sum() == torch.bincount(block).max()


def test_round_trip_is_exact_where_features_are_constant_over_regions():
    image = _digits(3)
    sp = Superpixels(num_segments=30)
    regions = sp.segment(image)
    values = torch.randn(3, 2, seed_layout(24, 24, 30).seeds.shape[0])
    piecewise = values.gather(2, regions.flatten(1).unsqueeze(1).expand(-1, 2, -1)).view(3, 2, 24, 24)
    graph = sp(piecewise, image=image)  # pixels as the feature map: regions at the map's resolution
    assert torch.equal(graph.regions, regions)
    back = GraphToCNN()(graph)[:, :2]
    torch.testing.assert_close(back, piecewise, rtol=1e-6, atol=1e-6)


# ---- edges ---------------------------------------------------------------------------------------
def test_knn_edges_join_the_nearest_centroids():
    graph = Superpixels(num_segments=30, edges="knn", k=5)(_digits(2))
    b, n, k = graph.neighbors.shape
    assert k == 5
    dist = torch.cdist(graph.pos, graph.pos) + torch.eye(n) * 1e9
    nearest = dist.topk(5, largest=False).values
    picked = dist.gather(2, graph.neighbors)
    torch.testing.assert_close(picked.sort(-1).values, nearest)
    assert graph.sparse_edges()[0].shape == (2, b * n * k)


def test_adjacency_edges_join_regions_sharing_a_border():
    graph = Superpixels(num_segments=30, edges="adjacency")(_digits(2))
    adj = graph.adj
    assert torch.equal(adj, adj.transpose(1, 2)) and adj.diagonal(dim1=1, dim2=2).eq(0).all()
    for b in range(2):
        reg = graph.regions[b]
        touching = set()
        for r in range(24):
            for c in range(24):
                for dr, dc in ((0, 1), (1, 0)):
                    if r + dr < 24 and c + dc < 24 and reg[r, c] != reg[r + dr, c + dc]:
                        touching |= {(int(reg[r, c]), int(reg[r + dr, c + dc])), (int(reg[r + dr, c + dc]), int(reg[r, c]))}
        valid = graph.valid[b]
        got = {(i, j) for i, j in adj[b].nonzero().tolist() if valid[i] and valid[j]}
        assert got == touching


# ---- gradients, the hybrid, bad input ------------------------------------------------------------
def test_gradients_reach_the_backbone_through_the_pooled_features():
    from interconnects.models.hybrid import build_model

    cfg = compose(["backbone.width=4", "backbone.depth=2", "interconnect=superpixels", "interconnect.num_segments=20",
                   "gnn=gatedgcn", "gnn.hidden_channels=8", "decoder=pool"])
    model = build_model(cfg, 1, (24, 24), num_classes=3)
    assert model.gnn.in_channels == model.backbone.out_channels + 3 + 1  # pooled fmap, centroid, size, colour
    model(_digits(2)).logsumexp(1).sum().backward()
    first_conv = model.backbone.features[0][0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_a_compiled_superpixel_model_gives_the_eager_logits_and_gradients(recwarn, caplog):
    """``trainer.compile=true`` (cifar10_superpixels' default): inductor compiles the model around
    the segmentation, which stays eager (inductor's C++ for the connectivity's masks failed to
    compile, and the run fell back to eager for good), without a warning about our code (a graph
    break on a data-dependent branch, a traced cache)."""
    import warnings

    import torch._dynamo

    warnings.simplefilter("always")

    from interconnects.models.hybrid import build_model

    cfg = compose(["backbone=pixels", "interconnect=superpixels", "interconnect.num_segments=20", "gnn=gatedgcn",
                   "gnn.hidden_channels=8", "gnn.num_layers=2", "decoder=pool"])
    torch.manual_seed(0)
    model = build_model(cfg, 3, (32, 32), num_classes=3)
    images = torch.rand(4, 3, 32, 32)
    torch._dynamo.reset()
    try:
        with caplog.at_level("WARNING"):
            compiled = torch.compile(model)(images)  # a C++ compile error would raise here
    finally:
        torch._dynamo.reset()
    said = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "superpixels.py" in m or "Graph break" in m], said
    eager = model(images)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    first = torch.autograd.grad(compiled.logsumexp(1).sum(), model.gnn.convs[0].conv.lin_key.weight)[0]
    again = torch.autograd.grad(eager.logsumexp(1).sum(), model.gnn.convs[0].conv.lin_key.weight)[0]
    torch.testing.assert_close(first, again, rtol=1e-4, atol=1e-5)


def test_a_superpixel_model_traces_for_tensorboards_graph_tab(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from interconnects.engine.logger import TensorBoardLogger
    from interconnects.models.hybrid import build_model

    cfg = compose(["backbone=pixels", "interconnect=superpixels", "interconnect.num_segments=20", "gnn=gatedgcn",
                   "gnn.hidden_channels=8", "decoder=pool"])
    model = build_model(cfg, 1, (24, 24), num_classes=3)
    logger = TensorBoardLogger(tmp_path)
    with caplog.at_level("WARNING"):
        logger.graph(model, _digits(2))
    logger.close()
    assert not [r for r in caplog.records if "graph was not logged" in r.getMessage()]
    [events] = list(tmp_path.glob("events*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert len(accumulator.Graph().node) > 100


def test_the_module_alone_segments_an_image_batch():
    graph = Superpixels(num_segments=75)(torch.rand(2, 1, 28, 28))
    assert isinstance(graph, GraphBatch) and graph.num_nodes == 81 and graph.size == (28, 28)
    assert graph.x.shape[-1] == 1 + 3 + 1


@pytest.mark.parametrize("kwargs,message", [
    ({"num_segments": 1}, r"num_segments=1 is out of range"),
    ({"edges": "grid4"}, r"edges='grid4' is not supported; choose one of 'knn', 'adjacency'"),
    ({"compactness": 0}, r"compactness=0 is out of range"),
    ({"min_size_factor": 2}, r"min_size_factor=2 is out of range"),
])
def test_bad_settings_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Superpixels(**kwargs)


def test_too_many_neighbours_names_the_key_on_the_command_line():
    from interconnects.models.hybrid import ConfigError, build_model

    cfg = compose(["backbone=pixels", "interconnect=superpixels", "interconnect.num_segments=9", "interconnect.k=12"])
    with pytest.raises(ConfigError, match=r"^interconnect\.k=12 is out of range for 9 regions on a 28×28 image"):
        build_model(cfg, 1, (28, 28), num_classes=10)
