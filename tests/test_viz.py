"""Pictures: where cells are drawn, what each picture function returns, the logger's picture
methods, the plotting scripts on a run and a sweep written here, and what a short training run on the
MNIST sample leaves in its event file."""

from __future__ import annotations

import importlib.util
import io
import json
import logging

import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, TINY, compose, run_cli

TINY_MODEL = ["backbone.width=4", "gnn.hidden_channels=8", "decoder.channels=8"]
MEAN, STD = (0.1307,), (0.3081,)
IMAGE = (28, 28)  # simple_cnn's default output stride 4 makes a 7 × 7 map: stride 4 pixels


def _model(*overrides):
    from interconnects.models.hybrid import build_model

    torch.manual_seed(0)
    return build_model(compose([*TINY_MODEL, *overrides]), 1, IMAGE, num_classes=10)


def _black(b: int) -> torch.Tensor:
    """Normalised images that are 0 once the normalisation is undone."""
    return torch.full((b, 1, *IMAGE), -MEAN[0] / STD[0])


def _decode(picture: torch.Tensor) -> Image.Image:
    """Encode a ``[3, H, W]`` picture in [0, 1] as PNG and decode it again."""
    buffer = io.BytesIO()
    Image.fromarray((picture.permute(1, 2, 0) * 255).round().byte().numpy()).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def _script(name: str):
    """A script of ``scripts/`` imported as a module, to call its ``main(argv)`` in this process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png_files(folder):
    files = sorted(folder.glob("*.png"))
    for path in files:
        with Image.open(path) as image:
            image.load()  # raises on a file that does not decode
            assert image.width > 0 and image.height > 0
    return files


# ---- where a cell is drawn -----------------------------------------------------------------------
def test_cell_centre_is_the_centre_of_its_stride_block():
    from interconnects.viz import cell_to_pixel

    # a 7 × 7 map of a 28 × 28 image: stride 4, cell (2, 5) covers pixels 8..11 × 20..23
    assert cell_to_pixel(torch.tensor([[2.0, 5.0]]), (7, 7), (28, 28)).tolist() == [[9.5, 21.5]]
    # strides differ per axis: 28 / 7 = 4 rows, 32 / 4 = 8 columns
    assert cell_to_pixel(torch.tensor([[2.0, 1.0]]), (7, 4), (28, 32)).tolist() == [[9.5, 11.5]]
    # stride 1 (the pixels backbone): a cell is its pixel
    assert cell_to_pixel(torch.tensor([[3.0, 4.0]]), (28, 28), (28, 28)).tolist() == [[3.0, 4.0]]


def test_drawn_keypoint_of_a_known_cell_lands_at_the_pixel_its_stride_says():
    """A lattice of 4 keypoints on a 7 × 7 map picks cells (1, 1), (1, 5), (5, 1), (5, 5). With
    stride 4 a cell r is centred on input pixel 4r + 1.5; upscaled ×8 (28 → 224) that is canvas
    pixel (4r + 1.5 + 0.5)·8 − 0.5 = 32r + 15.5. The red dots on a black image must sit there."""
    from interconnects.keypoints import lattice_cells
    from interconnects.viz import graph_pictures

    assert sorted(lattice_cells(4, 7, 7).tolist()) == [1 * 7 + 1, 1 * 7 + 5, 5 * 7 + 1, 5 * 7 + 5]
    model = _model("interconnect=keypoints", "interconnect.select=lattice", "interconnect.num_keypoints=4")
    picture = graph_pictures(model, _black(1), MEAN, STD, min_size=224, explain=False)["graph/keypoints"]
    assert picture.shape == (3, 224, 224)
    red = (picture[0] > 0.5) & (picture[1] < 0.5)
    rows, cols = red.nonzero(as_tuple=True)
    assert rows.numel() > 0
    for r in (1, 5):
        for c in (1, 5):
            expected = torch.tensor([32 * r + 15.5, 32 * c + 15.5])
            near = ((rows - expected[0]).abs() < 16) & ((cols - expected[1]).abs() < 16)
            centroid = torch.stack([rows[near].float().mean(), cols[near].float().mean()])
            assert near.sum() > 4, (r, c)
            assert (centroid - expected).abs().max() <= 1.0, (r, c, centroid.tolist())
    # nothing drawn anywhere else
    far = torch.ones_like(red)
    for r in (1, 5):
        for c in (1, 5):
            far[32 * r : 32 * r + 32, 32 * c : 32 * c + 32] = False
    assert not red[far].any()


def test_score_map_is_what_topk_selection_ranks():
    from interconnects import Keypoints

    torch.manual_seed(0)
    keypoints = Keypoints(num_keypoints=5, in_channels=3)
    fmap = torch.randn(2, 3, 6, 6)
    scores = keypoints.score_map(fmap)
    assert scores.shape == (2, 1, 6, 6)
    chosen = keypoints(fmap).cell_index().sort(dim=1).values
    assert torch.equal(scores.flatten(1).topk(5, dim=1).indices.sort(dim=1).values, chosen)
    assert Keypoints(num_keypoints=5, select="lattice").score_map(fmap) is None


# ---- the selection behind the edges picture ------------------------------------------------------
def test_spread_nodes_takes_the_most_active_node_of_each_region():
    from interconnects.viz import spread_nodes

    # a 4 × 4 map, 2 × 2 regions; activity = node id, so each region's largest id wins
    pos = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).view(1, 16, 2)
    nodes, found = spread_nodes(pos, torch.arange(16.0).view(1, 16), (4, 4), count=4)
    assert nodes.tolist() == [[5, 7, 13, 15]]
    assert found.all()
    # keypoints all in the top-left region: the other regions report none
    nodes, found = spread_nodes(torch.zeros(1, 3, 2), torch.tensor([[0.1, 0.9, 0.5]]), (4, 4), count=4)
    assert found.tolist() == [[True, False, False, False]] and nodes[0, 0] == 1


def test_strongest_neighbours_are_the_largest_in_edges_without_the_node_itself():
    from interconnects.viz import strongest_neighbours

    adj = torch.tensor([[[9.0, 0.0, 0.5, 2.0],   # into node 0: from 3 (2.0), then 2 (0.5); 1 is no edge
                         [1.0, 9.0, 0.0, 0.0],
                         [0.0, 0.0, 9.0, 0.0],
                         [0.0, -3.0, 1.0, 9.0]]])  # into node 3: the strongest is the negative -3 from 1
    neighbours, present = strongest_neighbours(adj, torch.tensor([[0, 3, 2]]), count=3)
    assert neighbours[0, 0, :2].tolist() == [3, 2] and present[0, 0].tolist() == [True, True, False]
    assert neighbours[0, 1, :2].tolist() == [1, 2] and present[0, 1].tolist() == [True, True, False]
    assert present[0, 2].tolist() == [False, False, False]


# ---- what graph_pictures returns -----------------------------------------------------------------
@pytest.mark.parametrize("interconnect,nodes,tags", [
    ("grid", 49, {"graph/keypoints", "graph/edges", "graph/adjacency"}),
    ("keypoints", 16, {"graph/keypoints", "graph/scores", "graph/edges", "graph/adjacency"}),
    ("knn", 49, {"graph/keypoints", "graph/edges", "graph/adjacency"}),
])
def test_graph_pictures_per_interconnect(interconnect, nodes, tags):
    from interconnects.viz import graph_pictures

    model = _model(f"interconnect={interconnect}")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 1, *IMAGE)
    pictures = graph_pictures(model, images, MEAN, STD, explain=False)  # (the bare drawings' geometry)
    assert set(pictures) == tags
    from interconnects.viz import PICTURE_SIZE

    # two images of PICTURE_SIZE² (28 × 6 = 168) side by side, make_grid's 2-pixel padding around each
    tile = 28 * -(-PICTURE_SIZE // 28)
    assert pictures["graph/keypoints"].shape == (3, tile + 4, 2 * tile + 6)
    assert pictures["graph/edges"].shape == (3, tile + 4, 2 * tile + 6)
    if "graph/scores" in tags:  # per image: keypoints beside the heat map
        assert pictures["graph/scores"].shape == (3, 2 * tile + 6, 2 * tile + 6)
    side = nodes * -(-PICTURE_SIZE // nodes)  # N × N, upscaled by a whole factor to at least PICTURE_SIZE
    assert pictures["graph/adjacency"].shape == (3, side, side)
    for tag, picture in pictures.items():
        assert picture.dtype == torch.float32 and 0 <= picture.min() and picture.max() <= 1, tag
        assert _decode(picture).size == (picture.shape[2], picture.shape[1]), tag
    # the edges are drawn: the edges picture differs from the plain input tiles in more than the dots
    assert (pictures["graph/edges"] != pictures["graph/keypoints"]).any()
    # drawing changed nothing in the model (BatchNorm statistics, mode)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adjacency_picture_shows_the_first_images_edges():
    """kNN with k = 8 and weight 1: each row of the first image's matrix has exactly 8 bright cells."""
    from interconnects.viz import graph_pictures

    picture = graph_pictures(_model("interconnect=knn"), torch.randn(3, 1, *IMAGE), MEAN, STD,
                             explain=False)["graph/adjacency"]
    factor = picture.shape[1] // 49
    cells = picture[:, ::factor, ::factor]  # one pixel per matrix entry
    lit = (cells - cells[:, :1, :1]).abs().sum(0) > 0.1  # differs from the colour of "no edge" (node 0 → 0)
    assert lit.sum(1).tolist() == [8] * 49


def test_no_graph_no_pictures():
    from interconnects.viz import graph_pictures

    from interconnects.models.hybrid import build_model

    cnn = build_model(compose(["backbone.width=4", "decoder.channels=8", "interconnect=none", "gnn=none"]), 1, IMAGE,
                      num_classes=10)
    assert graph_pictures(cnn, torch.randn(2, 1, *IMAGE), MEAN, STD) == {}


def test_image_rows_puts_each_row_under_the_previous():
    from interconnects.viz import image_rows

    top, bottom = torch.zeros(3, 1, 8, 8), torch.ones(3, 1, 8, 8)
    picture = image_rows(top, bottom, padding=0)
    assert picture.shape == (3, 16, 24)
    assert picture[:, :8].max() == 0 and picture[:, 8:].min() == 1
    with pytest.raises(ValueError, match="same shape"):
        image_rows(top, torch.ones(2, 1, 8, 8))


# ---- the confusion matrix ------------------------------------------------------------------------
def test_confusion_figure():
    from interconnects.viz import confusion_figure

    confusion = torch.tensor([[5, 1, 0], [0, 3, 1], [0, 0, 2]])
    fig = confusion_figure(confusion, ["zero", "one", "two"])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert "83.33%" in ax.get_title()  # 10 of 12 on the diagonal
    assert [t.get_text() for t in ax.get_xticklabels()] == ["zero", "one", "two"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(str(v) for v in confusion.flatten().tolist())
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert Image.open(io.BytesIO(buffer.getvalue())).size[0] > 100
    with pytest.raises(ValueError, match="square"):
        confusion_figure(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="class_names"):
        confusion_figure(confusion, ["a", "b"])


# ---- the logger ----------------------------------------------------------------------------------
def test_logger_writes_pictures_text_and_graph(tmp_path, caplog):
    from interconnects.engine.logger import NullLogger, TensorBoardLogger
    from interconnects.viz import confusion_figure, graph_pictures

    model = _model("interconnect=keypoints")
    logger = TensorBoardLogger(tmp_path)
    for tag, picture in graph_pictures(model, torch.randn(2, 1, *IMAGE), MEAN, STD, min_size=224, explain=False).items():
        logger.image(tag, picture, 1)
    logger.image("batch", torch.rand(3, 3, 8, 8), 1)  # a batch is tiled
    logger.figure("test/confusion", confusion_figure(torch.eye(3) * 4), 2)
    logger.text("parameters", "| stage | parameters |\n| --- | --- |\n| backbone | 10 |", 0)
    logger.graph(model, torch.randn(2, 1, *IMAGE))

    class Untraceable(torch.nn.Module):
        def forward(self, x):
            return "not a tensor"

    with caplog.at_level(logging.WARNING):
        logger.graph(Untraceable(), torch.randn(1))  # only warns
    assert "graph was not logged" in caplog.text
    logger.close()

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()
    assert {"graph/keypoints", "graph/scores", "graph/edges", "graph/adjacency", "test/confusion", "batch"} <= set(tags["images"])
    assert "parameters/text_summary" in tags["tensors"]
    assert tags["graph"]
    keypoints = events.Images("graph/keypoints")[-1]
    assert (keypoints.height, keypoints.width) == (228, 454)
    Image.open(io.BytesIO(keypoints.encoded_image_string)).load()

    null = NullLogger()  # the same methods, doing nothing
    null.image("x", torch.rand(3, 4, 4), 0)
    null.figure("x", Figure(), 0)
    null.text("x", "y", 0)
    null.graph(model, torch.randn(1, 1, *IMAGE))


# ---- the scripts ---------------------------------------------------------------------------------
def _write_run(run_dir):
    """A run directory as train.py leaves it, written with the logger: curves, pictures, metrics."""
    from interconnects.engine.logger import TensorBoardLogger
    from interconnects.viz import confusion_figure

    logger = TensorBoardLogger(run_dir / "tensorboard")
    for step in range(1, 21):
        logger.scalars({"train/loss": 2.0 / step, "train/acc": 1 - 1.0 / step, "lr": 0.01}, step)
    for epoch, step in ((1, 10), (2, 20)):
        logger.scalars({"train/loss_epoch": 1.0 / epoch, "val/loss": 1.1 / epoch, "val/acc": 0.8 + 0.05 * epoch,
                        "epoch": epoch}, step)
        logger.image("graph/edges", torch.full((3, 6, 10), float(epoch - 1)), step)  # black, then white
    logger.scalars({"test/loss": 0.5, "test/acc": 0.9, "test/acc/zero": 0.95, "test/acc/one": 0.85}, 20)
    logger.figure("test/confusion", confusion_figure(torch.tensor([[19, 1], [3, 17]]), ["zero", "one"]), 20)
    logger.hparams({"seed": 1}, {"test/acc": 0.9})
    logger.close()
    (run_dir / "metrics.json").write_text(json.dumps({"test/acc": 0.9, "val/acc": 0.9, "test/loss": 0.5}))


def test_plot_run_writes_curves_and_the_latest_pictures(tmp_path):
    _write_run(tmp_path)
    done = run_cli("scripts/plot_run.py", str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr
    files = {p.name for p in _png_files(tmp_path / "plots")}
    assert {"loss.png", "acc.png", "lr.png", "test_acc_per_class.png", "graph_edges.png", "test_confusion.png"} <= files
    assert not any(name.startswith(("hparam", "epoch")) for name in files)
    with Image.open(tmp_path / "plots" / "graph_edges.png") as edges:
        assert edges.size == (10, 6) and edges.convert("L").getextrema() == (255, 255)  # the latest (white) one


def test_plot_run_without_event_files_plots_metrics_json(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"val/acc": 0.9, "test/acc": 0.8, "val/loss": 0.3, "steps": 40}))
    assert _script("plot_run").main([str(tmp_path)]) == 0
    assert {p.name for p in _png_files(tmp_path / "plots")} == {"acc.png", "loss.png"}


def test_plot_run_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert _script("plot_run").main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "is not a run directory" in err and str(tmp_path) in err
    assert not (tmp_path / "plots").exists()


def _write_sweep(sweep_dir):
    """Five jobs over optimizer.lr × interconnect (seed fixed); the last one failed."""
    runs = [("0.001", "grid", 0.91), ("0.01", "grid", 0.95), ("0.1", "knn", 0.60), ("0.01", "keypoints", 0.93),
            ("0.001", "knn", None)]
    for num, (lr, interconnect, acc) in enumerate(runs):
        job = sweep_dir / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(
            f"- optimizer.lr={lr}\n- interconnect={interconnect}\n- seed=1\n")
        (job / ".hydra" / "config.yaml").write_text("optimized_metric: val/acc\nseed: 1\n")
        if acc is not None:
            (job / "metrics.json").write_text(json.dumps({"val/acc": acc, "test/acc": acc - 0.01}))


def test_plot_sweep_plots_each_swept_parameter(tmp_path):
    _write_sweep(tmp_path)
    done = run_cli("scripts/plot_sweep.py", str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "job 4 has no metrics.json" in done.stdout
    assert {p.name for p in _png_files(tmp_path / "plots")} == {"optimizer.lr.png", "interconnect.png"}  # not seed
    assert _script("plot_sweep").main([str(tmp_path), "--metric", "test/acc", "--out", str(tmp_path / "t")]) == 0
    assert len(_png_files(tmp_path / "t")) == 2


def test_plot_sweep_on_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    plot_sweep = _script("plot_sweep")
    assert plot_sweep.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "is not a sweep directory" in err
    _write_sweep(tmp_path)
    assert plot_sweep.main([str(tmp_path), "--metric", "val/psnr"]) == 2
    assert "val/psnr" in capsys.readouterr().err


# ---- a real run ---------------------------------------------------------------------------------
@pytest.mark.parametrize("interconnect", ["keypoints", "knn"])
def test_a_run_logs_the_graph_pictures_and_plot_run_writes_them(interconnect, mnist_sample, tmp_path):
    run = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("data=")]
    proc = run_cli("train.py", *tiny, "data=mnist", f"data.root={mnist_sample}", f"interconnect={interconnect}",
                   "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
                   "trainer.limit_test_batches=2", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    for word in ("keypoints", "edges", "adjacency", "confusion"):
        assert any(word in tag for tag in tags), (word, tags)
    assert len(events.Images("graph/edges")) == 2  # one per validation epoch
    assert events.Graph() is not None  # the model's graph tab
    assert any("parameters" in tag for tag in events.Tags()["tensors"])  # the parameter table as text
    done = run_cli("scripts/plot_run.py", str(run), timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(_png_files(run / "plots")) >= 3
