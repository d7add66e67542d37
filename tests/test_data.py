"""The datasets: scikit-learn's digits, MNIST IDX folders, the user's own image folders, and their errors."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import TINY, compose, make_image_folder, run_cli
from interconnects.data import DataMissingError, build_data, data_info
from interconnects.data.digits import TEST_SIZE, digits_images, digits_test_split
from interconnects.data.image_folder import FolderImages
from interconnects.data.tensors import ImageTensors

NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Statistics and decompressed copies go to this test's own cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def data_cfg(*overrides: str):
    return compose(list(overrides)).data


def everything(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(images [N, C, H, W], labels [N])`` a loader serves, in order."""
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


# ---- digits ---------------------------------------------------------------------------------------

def test_digits_shapes_and_documented_split_sizes():
    bundle = build_data(data_cfg("data=digits"), seed=0)
    assert (len(bundle.train_view), len(bundle.val.dataset), len(bundle.test.dataset)) == (1293, 144, 360)
    assert bundle.info.in_channels == 1 and bundle.info.image_size == (28, 28) and bundle.info.num_classes == 10
    assert bundle.info.class_names == tuple("0123456789")
    images, labels = next(iter(bundle.train))
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.float32
    assert labels.min() >= 0 and labels.max() <= 9
    # normalised with the training split's own statistics
    train = bundle.train_view.images.float() / 255
    assert bundle.info.mean[0] == pytest.approx(train.mean().item(), abs=1e-6)
    assert bundle.info.std[0] == pytest.approx(train.std(unbiased=False).item(), abs=1e-6)
    assert data_info(data_cfg("data=digits")).mean == bundle.info.mean


def test_digits_are_sklearn_digits_scaled_and_upsampled():
    from sklearn.datasets import load_digits

    native, labels = digits_images((8, 8))
    raw = load_digits()
    assert native.shape == (1797, 1, 8, 8) and native.dtype == torch.uint8
    assert torch.equal(native[:, 0], torch.from_numpy(np.rint(raw.images * 255 / 16).astype(np.uint8)))
    assert torch.equal(labels, torch.from_numpy(raw.target))
    big, _ = digits_images((28, 28))
    assert big.shape == (1797, 1, 28, 28) and big.max() > 200
    # bilinear upsampling keeps the picture: shrinking it back lands near the original
    back = torch.nn.functional.interpolate(big.float(), size=(8, 8), mode="area").flatten()
    assert torch.corrcoef(torch.stack([back, native.float().flatten()]))[0, 1] > 0.9


def test_digits_split_is_fixed_by_split_seed_disjoint_and_stratified():
    _, labels = digits_images((8, 8))
    train, test = digits_test_split(labels, 0)
    again_train, again_test = digits_test_split(labels, 0)
    assert torch.equal(train, again_train) and torch.equal(test, again_test)
    assert len(test) == TEST_SIZE and len(train) + len(test) == 1797
    assert not set(train.tolist()) & set(test.tolist())
    counts = torch.bincount(labels[test], minlength=10).float()
    assert (counts - TEST_SIZE / 10).abs().max() <= 2  # each class in proportion
    _, other = digits_test_split(labels, 1)
    assert not torch.equal(test, other)

    first = build_data(data_cfg("data=digits"), seed=0)
    second = build_data(data_cfg("data=digits"), seed=5)
    for a, b in ((first.train_view, second.train_view), (first.val.dataset, second.val.dataset),
                 (first.test.dataset, second.test.dataset)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # no test image (pixel for pixel) is among the training or validation images
    seen = {bytes(x.numpy()) for x in torch.cat([first.train_view.images, first.val.dataset.images])}
    assert not any(bytes(x.numpy()) in seen for x in first.test.dataset.images)
    moved = build_data(data_cfg("data=digits", "data.split_seed=3"), seed=0)
    assert not torch.equal(moved.test.dataset.images, first.test.dataset.images)


# ---- MNIST IDX folders ----------------------------------------------------------------------------

def write_idx(path, array: np.ndarray, gz: bool) -> None:
    """Write ``array`` (uint8) as an IDX file (``.gz`` compressed when ``gz``)."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_mnist(root, n_train: int, n_test: int, gz: bool):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[prefix] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", arrays[prefix][0], gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", arrays[prefix][1], gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["uncompressed", "gzip"])
def test_mnist_reads_idx_files_of_any_count(tmp_path, gz):
    arrays = write_mnist(tmp_path / "idx", n_train=37, n_test=11, gz=gz)
    bundle = build_data(data_cfg("data=mnist", f"data.root={tmp_path / 'idx'}", "data.download=false",
                                 "data.augment=none"), seed=0)
    assert len(bundle.train_view) + len(bundle.val.dataset) == 37 and len(bundle.val.dataset) == 4
    test = bundle.test.dataset
    assert torch.equal(test.images[:, 0], torch.from_numpy(arrays["t10k"][0].astype(np.uint8)))
    assert torch.equal(test.labels, torch.from_numpy(arrays["t10k"][1]).long())


def test_mnist_reads_the_shared_sample(mnist_sample):
    bundle = build_data(data_cfg("data=mnist", f"data.root={mnist_sample}", "data.download=false"), seed=0)
    assert (len(bundle.train_view), len(bundle.val.dataset), len(bundle.test.dataset)) == (3600, 400, 1000)
    assert bundle.train_view.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(bundle.test.dataset.labels, minlength=10).min() > 50


def test_a_missing_mnist_sample_fails_the_test_saying_where_to_put_it(tmp_path, monkeypatch):
    import conftest

    monkeypatch.setattr(conftest, "MNIST_SAMPLE", tmp_path / "nowhere")
    with pytest.raises(pytest.fail.Exception, match=f"put train-images-idx3-ubyte.gz.* in {tmp_path / 'nowhere'}/MNIST/raw"):
        conftest.mnist_sample_root()


def test_mnist_missing_offline_says_which_files_where_and_that_digits_runs_offline(tmp_path):
    with pytest.raises(DataMissingError) as caught:
        build_data(data_cfg("data=mnist", f"data.root={tmp_path / 'none'}", "data.download=false"), seed=0)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{tmp_path / 'none'}/MNIST/raw" in message and "train-images-idx3-ubyte.gz" in message
    assert "t10k-labels-idx1-ubyte.gz" in message and "data=digits runs offline" in message


def test_mnist_missing_offline_through_the_cli_stops_before_writing(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train.py", *TINY, "data=mnist", f"data.root={tmp_path / 'none'}", f"hydra.run.dir={run}",
                   env=NO_NETWORK, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "put train-images-idx3-ubyte.gz" in errors[0] and "data=digits" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (run / "checkpoints").exists() and not (run / "metrics.json").exists()


# ---- image folders --------------------------------------------------------------------------------

def folder_cfg(root, *overrides: str):
    return data_cfg("data=image_folder", f"data.root={root}", "data.batch_size=4", *overrides)


def test_image_folder_grey_classes_split_and_cached_statistics(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "pics", classes=("cat", "dog", "emu"), per_class=10, size=(12, 10))
    cfg = folder_cfg(root, "data.val_fraction=0.2")
    info = data_info(cfg)
    assert info.class_names == ("cat", "dog", "emu") and info.num_classes == 3
    assert info.in_channels == 1 and info.image_size == (12, 10)
    bundle = build_data(cfg, seed=0)
    assert (len(bundle.train_view), len(bundle.val.dataset), len(bundle.test.dataset)) == (24, 6, 30)
    assert isinstance(bundle.train_view, ImageTensors) and not isinstance(bundle.train_view, FolderImages)
    test = bundle.test.dataset
    assert test.images.shape == (30, 1, 12, 10) and test.images.dtype == torch.uint8
    first = np.array(Image.open(root / "test" / "cat" / "00000.png"))
    assert torch.equal(test.images[0, 0], torch.from_numpy(first))
    assert torch.bincount(test.labels).tolist() == [10, 10, 10]
    # the classes differ in brightness, so the means per class rise with the label
    means = [test.images[test.labels == c].float().mean() for c in range(3)]
    assert means[0] < means[1] < means[2]
    train = bundle.train_view.images.float() / 255
    assert bundle.info.mean[0] == pytest.approx(train.mean().item(), abs=1e-6)
    assert bundle.info.std[0] == pytest.approx(train.std(unbiased=False).item(), abs=1e-6)
    cached = list((tmp_path / "cache" / "interconnects" / "image_folder").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["images"] == 24

    # second time the statistics come from the cache: computing them again would fail
    import interconnects.data.splits as splits_module

    monkeypatch.setattr(splits_module, "channel_mean_std", lambda *a: pytest.fail("statistics recomputed"))
    assert build_data(cfg, seed=0).info.mean == bundle.info.mean
    # a changed training file is a different key
    Image.fromarray(np.full((12, 10), 255, np.uint8)).save(root / "train" / "cat" / "00000.png")
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert build_data(cfg, seed=0).info.mean != bundle.info.mean


def test_image_folder_rgb_with_val_folder_and_differing_sizes(tmp_path):
    root = make_image_folder(tmp_path / "pics", classes=("a", "b"), per_class=4, mode="RGB",
                             splits=("train", "val", "test"), sizes=[(16, 16), (20, 12), (9, 9)])
    cfg = folder_cfg(root)
    info = data_info(cfg)
    assert info.in_channels == 3 and info.image_size == (16, 16)  # the first training image's size
    bundle = build_data(cfg, seed=0)
    assert (len(bundle.train_view), len(bundle.val.dataset), len(bundle.test.dataset)) == (8, 8, 8)
    assert bundle.val.dataset.images.shape == (8, 3, 16, 16) and len(bundle.info.mean) == 3
    images, labels = next(iter(bundle.train))
    assert images.shape == (4, 3, 16, 16)
    sized = build_data(folder_cfg(root, "data.image_size=8", "data.channels=1"), seed=0)
    assert sized.info.image_size == (8, 8) and sized.test.dataset.images.shape == (8, 1, 8, 8)


def test_image_folder_lazy_reading_serves_the_same_batches(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "pics", classes=("x", "y"), per_class=9, sizes=[(12, 12), (15, 11)])
    eager = build_data(folder_cfg(root, "data.augment=none"), seed=0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-cache"))  # statistics streamed from disk
    lazy = build_data(folder_cfg(root, "data.augment=none", "data.max_memory_gb=1e-9"), seed=0)
    assert isinstance(lazy.train_view, FolderImages) and isinstance(lazy.test.dataset, FolderImages)
    assert lazy.info.class_names == eager.info.class_names
    assert lazy.info.mean == pytest.approx(eager.info.mean) and lazy.info.std == pytest.approx(eager.info.std)
    for a, b in ((eager.train, lazy.train), (eager.val, lazy.val), (eager.test, lazy.test)):
        (xa, ya), (xb, yb) = everything(a), everything(b)
        assert torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-5)
    with_workers = build_data(folder_cfg(root, "data.max_memory_gb=0", "data.num_workers=2"), seed=0)
    assert torch.allclose(everything(with_workers.test)[0], everything(eager.test)[0], atol=1e-5)


def _no_images(root):
    make_image_folder(root, per_class=1)
    for path in root.glob("train/*/*.png"):
        path.rename(path.with_suffix(".txt"))
    return "no images in", "train/<class>/"


def _empty_class(root):
    make_image_folder(root, per_class=1)
    (root / "train" / "zebra").mkdir()
    (root / "test" / "zebra").mkdir()
    (root / "test" / "zebra" / "1.png").write_bytes((root / "test" / "cat" / "00000.png").read_bytes())
    return "class folder", "train/zebra has no images"


def _corrupt(root):
    make_image_folder(root, per_class=2)
    (root / "train" / "dog" / "00001.png").write_bytes(b"not a png at all")
    return "cannot read image", "train/dog/00001.png"


def _classes_differ(root):
    make_image_folder(root, per_class=1)
    (root / "test" / "dog").rename(root / "test" / "wolf")
    return "differ", "only in test/: wolf; missing from test/: dog"


def _no_test(root):
    make_image_folder(root, per_class=1, splits=("train",))
    return "test is missing", "test/<class>/"


def _no_class_folders(root):
    make_image_folder(root, per_class=1)
    for path in root.glob("train/*"):
        for image in path.iterdir():
            image.rename(root / "train" / f"{path.name}-{image.name}")
        path.rmdir()
    return "has no class folders", "train/<class>/"


BAD_FOLDERS = {"missing root": None, "no test folder": _no_test, "no class folders": _no_class_folders,
               "no images": _no_images, "empty class": _empty_class, "corrupt image": _corrupt,
               "classes differ": _classes_differ}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_image_folder_gives_one_line_naming_it(tmp_path, case):
    root = tmp_path / "pics"
    expected = BAD_FOLDERS[case](root) if BAD_FOLDERS[case] else ("does not exist", "train/<class>/")
    with pytest.raises(ValueError) as caught:
        build_data(folder_cfg(root), seed=0)
    message = str(caught.value)
    assert "\n" not in message and str(root) in message
    for part in expected:
        assert part in message, message


def test_bad_image_folder_through_the_cli(tmp_path):
    root = tmp_path / "pics"
    _corrupt(root)
    run = tmp_path / "run"
    proc = run_cli("train.py", *TINY, "data=image_folder", f"data.root={root}", f"hydra.run.dir={run}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error:") and str(root / "train" / "dog" / "00001.png") in errors[0]
    assert not (run / "checkpoints").exists()


def test_image_folder_trains_through_the_cli_and_keeps_class_names(tmp_path):
    root = make_image_folder(tmp_path / "pics", classes=("dark", "mid", "light"), per_class=12, size=(28, 28))
    run = tmp_path / "run"
    proc = run_cli("train.py", *TINY, "data=image_folder", f"data.root={root}", "trainer.max_epochs=1",
                   "logger=none", f"hydra.run.dir={run}", timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test/acc=" in proc.stdout
    # the checkpoint's own data config finds the class names again (sorted folder names)
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert data_info(OmegaConf.create(state["config"]["data"])).class_names == ("dark", "light", "mid")



# ---- where batches are made -----------------------------------------------------------------------

def _first_batches(bundle, epochs=(0, 1)):
    out = []
    for epoch in epochs:
        bundle.set_epoch(epoch)
        out.append(next(iter(bundle.train)))
    return out


def test_on_device_and_pinning_are_cpu_no_ops():
    plain = build_data(data_cfg("data=digits", "data.augment=crop"), seed=0)
    kept = build_data(data_cfg("data=digits", "data.augment=crop", "data.on_device=true"), seed=0,
                      device=torch.device("cpu"))
    assert not kept.train.pin_memory and kept.train_view.images.device.type == "cpu"
    for (a, la), (b, lb) in zip(_first_batches(plain), _first_batches(kept)):
        assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("augment", ["crop", "crop_flip", "crop_altflip", "affine"])
def test_on_device_batches_equal_the_cpu_ones(augment):
    cuda = torch.device("cuda")
    cpu = build_data(data_cfg("data=digits", f"data.augment={augment}"), seed=0)
    pinned = build_data(data_cfg("data=digits", f"data.augment={augment}"), seed=0, device=cuda)
    gpu = build_data(data_cfg("data=digits", f"data.augment={augment}", "data.on_device=true"), seed=0, device=cuda)
    assert pinned.train.pin_memory and not gpu.train.pin_memory
    for (a, la), (b, lb) in zip(_first_batches(cpu), _first_batches(gpu)):
        assert b.device.type == "cuda" and lb.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)  # the same draws, augmented there
        assert torch.equal(lb.cpu(), la)
