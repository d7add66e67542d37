"""Keypoints from a classical detector on the input image (``interconnect.select=detector``)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose, run_cli
from interconnects import Keypoints
from interconnects.detectors import cell_scores, detector_response, peak_mask, pool_to_cells
from interconnects.keypoints import lattice_cells
from interconnects.models.hybrid import ConfigError, build_model

CORNERS = [(10, 17), (3, 5), (21, 2), (14, 22)]  # top-left corners of bright rectangles, 28 × 28


def corner_images(corners=CORNERS, size=(28, 28), channels=1) -> torch.Tensor:
    """``[B, channels, H, W]``: image ``b`` is dark with a bright rectangle from ``corners[b]`` to the
    bottom-right border, so its only corner is at ``corners[b]`` (normalised like MNIST)."""
    images = torch.zeros(len(corners), channels, *size)
    for b, (r, c) in enumerate(corners):
        images[b, :, r:, c:] = 1.0
    return (images - 0.1307) / 0.3081


def cells_of(g) -> list[list[tuple[int, int]]]:
    return [[(int(r), int(c)) for r, c in p] for p in g.pos]


@pytest.mark.parametrize("detector", ["harris", "shi_tomasi"])
def test_corner_response_peaks_at_the_corner_pixel(detector):
    response = detector_response(corner_images(), detector)
    assert response.shape == (len(CORNERS), 28, 28) and response.dtype == torch.float32
    argmax = response.flatten(1).argmax(1)
    assert [(int(i) // 28, int(i) % 28) for i in argmax] == CORNERS


@pytest.mark.parametrize("detector", ["harris", "shi_tomasi"])
def test_corner_lands_in_its_cell_by_the_stride(detector):
    kp = Keypoints(1, select="detector", detector=detector)
    g = kp(torch.randn(len(CORNERS), 3, 7, 7), image=corner_images())
    assert cells_of(g) == [[(r // 4, c // 4)] for r, c in CORNERS]


def test_corner_lands_in_its_cell_when_the_stride_does_not_divide():
    H, W, h, w = 30, 20, 4, 3  # cell = (row·h // H, col·w // W), as for select='given'
    corners = [(16, 7), (4, 14)]
    g = Keypoints(1, select="detector")(torch.randn(2, 3, h, w), image=corner_images(corners, (H, W)))
    assert cells_of(g) == [[(r * h // H, c * w // W)] for r, c in corners]


def test_intensity_picks_the_brightest_blob():
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    blobs = [((5, 22), (20, 6)), ((25, 25), (2, 9))]  # (brightest, dimmer) centre per image
    def blob(r, c):
        return torch.exp(-((rows - r) ** 2 + (cols - c) ** 2) / 4)

    image = torch.stack([blob(*a) + 0.6 * blob(*b) for a, b in blobs]).unsqueeze(1)
    g = Keypoints(2, select="detector", detector="intensity")(torch.randn(2, 4, 7, 7), image=image)
    assert cells_of(g) == [[(a[0] // 4, a[1] // 4), (b[0] // 4, b[1] // 4)] for a, b in blobs]


@pytest.mark.parametrize("detector", ["harris", "shi_tomasi", "intensity"])
def test_fewer_detections_than_k_still_give_k_distinct_cells_deterministically(detector):
    kp = Keypoints(12, select="detector", detector=detector)
    image = torch.cat([corner_images(CORNERS[:1]), torch.zeros(1, 1, 28, 28)])  # one corner; a blank image
    fmap = torch.randn(2, 3, 7, 7)
    g = kp(fmap, image=image)
    for cells in cells_of(g):
        assert len(set(cells)) == 12
    if detector != "intensity":  # the corner comes first; intensity ranks the bright region's cells
        assert cells_of(g)[0][0] == (10 // 4, 17 // 4)
    # a blank image has no detections and no response: its cells are the lattice, in lattice order
    lattice = lattice_cells(12, 7, 7)
    assert cells_of(g)[1] == [(int(c) // 7, int(c) % 7) for c in lattice]
    assert torch.equal(kp(fmap, image=image).pos, g.pos)


def test_a_plateau_of_equal_peaks_gives_distinct_cells():
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 8:20, 4:24] = 1.0  # one flat bright bar: its smoothed top is a plateau of equal maxima
    g = Keypoints(6, select="detector", detector="intensity", detector_sigma=0.5)(torch.randn(1, 2, 7, 7), image=image)
    cells = cells_of(g)[0]
    assert len(set(cells)) == 6
    assert all(2 <= r <= 4 and 1 <= c <= 5 for r, c in cells)  # all on the bar


@pytest.mark.parametrize("detector", ["harris", "shi_tomasi", "intensity"])
def test_batched_equals_per_image(detector):
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(5, 3, 32, 32, generator=gen)
    fmap = torch.randn(5, 8, 8, 8, generator=gen)
    kp = Keypoints(10, select="detector", detector=detector)
    batched = kp(fmap, image=image)
    single = [kp(fmap[i:i + 1], image=image[i:i + 1]) for i in range(5)]
    assert torch.equal(batched.pos, torch.cat([g.pos for g in single]))
    assert torch.equal(batched.x, torch.cat([g.x for g in single]))
    assert torch.equal(batched.adj, torch.cat([g.adj for g in single]))


def test_bfloat16_image_and_map():
    image = (corner_images() + 0.05 * torch.randn(len(CORNERS), 1, 28, 28)).bfloat16()
    fmap = torch.randn(len(CORNERS), 3, 7, 7)
    kp = Keypoints(5, select="detector")
    g16 = kp(fmap.bfloat16(), image=image)
    g32 = kp(fmap, image=image.float())
    assert g16.x.dtype == torch.bfloat16 and g16.adj.dtype == torch.bfloat16
    assert torch.equal(g16.pos, g32.pos)  # the detector runs in float32 whatever the image's dtype
    assert [cells[0] for cells in cells_of(g16)] == [(r // 4, c // 4) for r, c in CORNERS]


def test_gradient_reaches_exactly_the_detected_cells_and_never_the_image():
    fmap = torch.randn(len(CORNERS), 3, 7, 7, requires_grad=True)
    image = corner_images().requires_grad_()
    g = Keypoints(3, select="detector")(fmap, image=image)
    g.x.sum().backward()
    touched = fmap.grad.abs().sum(1).flatten(1) > 0  # [B, 49]
    chosen = torch.zeros_like(touched).scatter_(1, (g.pos[..., 0] * 7 + g.pos[..., 1]).long(), True)
    assert torch.equal(touched, chosen)
    assert image.grad is None


def test_given_keypoints_in_one_cell_give_k_distinct_cells_first_ones_kept():
    kp = Keypoints(4, select="given", image_size=(28, 28))
    keypoints = torch.tensor([[[0, 0], [1, 2], [27, 27], [3, 3]],  # three keypoints in cell (0, 0)
                              [[9, 9], [20, 4], [9, 9], [20, 4]]])  # two exact repeats
    g = kp(torch.randn(2, 3, 7, 7), keypoints)
    cells = cells_of(g)
    assert cells[0][0] == (0, 0) and cells[0][2] == (6, 6)
    assert cells[1][:2] == [(2, 2), (5, 1)]
    assert all(len(set(c)) == 4 for c in cells)
    assert torch.equal(kp(torch.randn(2, 3, 7, 7), keypoints).pos, g.pos)


def test_detector_helpers():
    response = torch.tensor([[[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0]]])
    peaks = peak_mask(response, 3)
    assert peaks.tolist() == [[[False, True, False, False], [False, False, False, True], [True, False, False, False]]]
    assert pool_to_cells(response, (1, 2)).tolist() == [[3.0, 2.0]]
    peak, best = cell_scores(torch.zeros(2, 1, 8, 8), (2, 2), "harris")
    assert bool((peak == float("-inf")).all()) and bool((best == 0).all())


def test_model_passes_the_image_to_the_detector():
    cfg = compose(["interconnect=keypoints", "interconnect.select=detector", "interconnect.num_keypoints=4",
                   "backbone.width=8", "gnn.hidden_channels=8", "decoder.channels=8"])
    model = build_model(cfg, 1, (28, 28), 10)
    assert model.interconnect.needs_image
    image = corner_images()
    fmap, graph = model.graph(image)
    direct = model.interconnect(fmap, image=image)
    assert torch.equal(graph.pos, direct.pos)
    assert [cells[0] for cells in cells_of(graph)] == [(r // 4, c // 4) for r, c in CORNERS]
    assert model(image).shape == (len(CORNERS), 10)


@pytest.mark.parametrize("override,words", [
    ("interconnect.detector=foo", ["interconnect.detector='foo'", "'harris'", "'shi_tomasi'", "'intensity'"]),
    ("interconnect.nms_size=4", ["interconnect.nms_size=4", "odd"]),
    ("interconnect.detector_sigma=0", ["interconnect.detector_sigma=0", "> 0"]),
])
def test_bad_detector_settings_name_the_key(override, words):
    cfg = compose(["interconnect=keypoints", "interconnect.select=detector", override])
    with pytest.raises(ConfigError) as info:
        build_model(cfg, 1, (28, 28), 10)
    assert all(w in str(info.value) for w in words), str(info.value)


# ---- through the command line ----------------------------------------------------------------------
SAMPLE = ["data=mnist", "data.root=../shared/datasets/mnist-sample"]
TINY_RUN = ["backbone.width=8", "gnn.hidden_channels=8", "decoder.channels=8", "data.batch_size=32",
            "trainer.progress=false", "logger=none"]


def test_cli_given_says_it_is_the_python_api_mode_and_detector_the_cli_one(tmp_path):
    proc = run_cli("train.py", *SAMPLE, *TINY_RUN, "interconnect=keypoints", "interconnect.select=given",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "interconnect.select='given'" in lines[0] and "Python API" in lines[0]
    assert "interconnect.select=detector" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_trains_with_keypoints_from_the_detector(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train.py", *SAMPLE, *TINY_RUN, "interconnect=keypoints", "interconnect.select=detector",
                   "interconnect.detector=shi_tomasi", "interconnect.num_keypoints=8", "trainer.max_epochs=2",
                   "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                   f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/loss"] > 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
