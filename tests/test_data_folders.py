"""Known datasets (CIFAR-10, CIFAR-100, MNIST) read from class folders, the decoded-image cache, and
what an experiment's data recipe keeps when the data source changes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import make_image_folder, run_cli
from interconnects.data import DataMissingError, build_data, data_info
from interconnects.data import image_folder as image_folder_module
from interconnects.data.cache import DecodedCache
from interconnects.data.torchvision_sets import CIFAR10_CLASSES, CIFAR100_CLASSES
from test_data import NO_NETWORK, _own_cache, data_cfg  # noqa: F401  (_own_cache: this test's own cache folder)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cifar_folder(root, classes=CIFAR10_CLASSES, per_class=(3, 2), size=(32, 32)):
    """A CIFAR-like folder ``root/{train,test}/<class>/*.png`` of RGB images whose colour depends on
    the class; returns ``root``."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), per_class):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(20 + 20 * (c % 11), 15, (*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def decoded_files(tmp_path):
    return sorted((tmp_path / "cache" / "interconnects" / "decoded").glob("*.bin"))


def test_cifar10_reads_class_folders_in_the_official_label_order(tmp_path):
    root = cifar_folder(tmp_path / "cifar")
    cfg = data_cfg("data=cifar10", f"data.root={root}", "data.augment=none", "data.val_fraction=0.2")
    assert data_info(cfg).class_names == CIFAR10_CLASSES
    bundle = build_data(cfg, seed=0)
    assert (len(bundle.train_view), len(bundle.val.dataset), len(bundle.test.dataset)) == (24, 6, 20)
    test = bundle.test.dataset
    assert test.images.shape == (20, 3, 32, 32) and test.images.dtype == torch.uint8
    # labels are the official order (airplane 0 ... truck 9), images the files' pixels
    assert test.labels.tolist() == [c for c in range(10) for _ in range(2)]
    truck = np.array(Image.open(root / "test" / "truck" / "0001.png"))
    assert torch.equal(test.images[19].permute(1, 2, 0), torch.from_numpy(truck))
    assert bundle.info.mean == pytest.approx((0.4914, 0.4822, 0.4465))  # CIFAR-10's normalisation
    train_labels = torch.cat([bundle.train_view.labels, bundle.val.dataset.labels])
    assert torch.bincount(train_labels).tolist() == [3] * 10
    # resized like torchvision's files are
    small = build_data(data_cfg("data=cifar10", f"data.root={root}", "data.image_size=16"), seed=0)
    assert small.test.dataset.images.shape == (20, 3, 16, 16)


def test_cifar100_and_mnist_class_folders(tmp_path):
    root = cifar_folder(tmp_path / "c100", classes=CIFAR100_CLASSES, per_class=(1, 1))
    bundle = build_data(data_cfg("data=cifar100", f"data.root={root}", "data.val_fraction=0"), seed=0)
    assert bundle.info.num_classes == 100 and bundle.info.class_names[91] == "trout"
    assert bundle.test.dataset.labels.tolist() == list(range(100))
    digits = make_image_folder(tmp_path / "digits", classes=tuple("0123456789"), per_class=2, size=(28, 28))
    bundle = build_data(data_cfg("data=mnist", f"data.root={digits}", "data.download=false"), seed=0)
    assert bundle.test.dataset.images.shape == (20, 1, 28, 28)
    assert bundle.test.dataset.labels.tolist() == [c for c in range(10) for _ in range(2)]


def _other_classes(root):
    cifar_folder(root, classes=(*CIFAR10_CLASSES[:9], "zebra"))
    return "holds 10 class folders", "missing: truck", "not of cifar10: zebra", "data=image_folder"


def _too_few(root):
    cifar_folder(root, classes=CIFAR10_CLASSES[:3])
    return "holds 3 class folders", "expects its 10 classes", "missing: cat, deer"


def _other_size(root):
    cifar_folder(root, size=(28, 28))
    return "is 28×28 pixels", "cifar10 expects 32×32 images"


def _one_other_size(root):
    cifar_folder(root)
    Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(root / "test" / "ship" / "0001.png")
    return "test/ship/0001.png is 30×32 pixels", "cifar10 expects 32×32 images"


def _unreadable(root):
    cifar_folder(root)
    (root / "test" / "dog" / "0000.png").write_bytes(b"not a png")
    return "cannot read image", "test/dog/0000.png", "remove or replace it"


def _no_test(root):
    cifar_folder(root)
    for path in sorted((root / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "test").rmdir()
    return "test is missing", "train/<class>/* and", "cifar-10-batches-py"


BAD = {"other classes": _other_classes, "too few classes": _too_few, "other size": _other_size,
       "one image of another size": _one_other_size, "unreadable image": _unreadable, "no test split": _no_test}


@pytest.mark.parametrize("case", list(BAD))
def test_a_cifar10_folder_of_something_else_gives_one_line(tmp_path, case):
    root = tmp_path / "cifar"
    expected = BAD[case](root)
    with pytest.raises(ValueError) as caught:
        build_data(data_cfg("data=cifar10", f"data.root={root}"), seed=0)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"data.root={root} (data=cifar10)")
    for part in expected:
        assert part in message, message
    assert ("expects 32×32" in message) == ("pixels" in message)  # the size hint only for a size


def test_missing_cifar10_names_the_folder_layout_too(tmp_path):
    with pytest.raises(DataMissingError) as caught:
        build_data(data_cfg("data=cifar10", f"data.root={tmp_path / 'none'}", "data.download=false"), seed=0)
    message = str(caught.value)
    assert "\n" not in message and f"{tmp_path / 'none'}/cifar-10-batches-py" in message
    assert f"{tmp_path / 'none'}/train/<class>/" in message and "airplane, automobile, bird" in message
    assert "data=digits runs offline" in message


def test_missing_cifar10_through_the_cli_names_both_layouts(tmp_path):
    proc = run_cli("train.py", "data=cifar10", f"data.root={tmp_path / 'none'}", "trainer.progress=false",
                   f"hydra.run.dir={tmp_path / 'run'}", env=NO_NETWORK, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error:") and "Traceback" not in proc.stderr
    assert "cifar-10-batches-py" in errors[0] and f"{tmp_path / 'none'}/train/<class>/" in errors[0]
    assert "data=digits" in errors[0]


def test_decoded_images_are_cached_and_a_changed_file_invalidates_them(tmp_path, monkeypatch):
    root = cifar_folder(tmp_path / "cifar")
    cfg = data_cfg("data=cifar10", f"data.root={root}", "data.augment=none")
    first = build_data(cfg, seed=0)
    assert len(decoded_files(tmp_path)) == 2  # train/ and test/

    def no_decoding(*args, **kwargs):
        pytest.fail("decoded again")

    monkeypatch.setattr(image_folder_module, "decode_samples", no_decoding)
    again = build_data(cfg, seed=0)
    assert torch.equal(again.test.dataset.images, first.test.dataset.images)
    assert torch.equal(again.train_view.images, first.train_view.images)
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # a changed file changes its size or modification time: decoded again, the new pixels seen
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(root / "test" / "airplane" / "0000.png")
    changed = build_data(cfg, seed=0)
    assert bool((changed.test.dataset.images[0] == 255).all())
    assert torch.equal(changed.test.dataset.images[1:], first.test.dataset.images[1:])
    assert len(decoded_files(tmp_path)) == 2  # the entry is replaced, not added to


@pytest.mark.parametrize("damage", ["truncated", "flipped pixel", "garbage"])
def test_a_corrupt_or_partial_cache_file_is_rebuilt(tmp_path, caplog, damage):
    root = make_image_folder(tmp_path / "pics", classes=("a", "b"), per_class=5, size=(9, 7), mode="RGB")
    cfg = data_cfg("data=image_folder", f"data.root={root}", "data.augment=none")
    reference = build_data(cfg, seed=0).test.dataset.images.clone()
    test_cache = [path for path in decoded_files(tmp_path) if b"/test/" in path.read_bytes()[:4096]]
    assert len(test_cache) == 1
    raw = bytearray(test_cache[0].read_bytes())
    raw = {"truncated": raw[:-5], "flipped pixel": raw[:-1] + bytes([raw[-1] ^ 1]), "garbage": b"x" * 40}[damage]
    test_cache[0].write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="interconnects"):
        rebuilt = build_data(cfg, seed=0)
    assert torch.equal(rebuilt.test.dataset.images, reference)
    assert any("decoded-image cache" in record.getMessage() for record in caplog.records)
    # and written again whole: the next build trusts it
    assert DecodedCache(rebuilt_samples(root), image_folder_module.ImageReader(3, (9, 7)).settings()).load(
        (10, 3, 9, 7)) is not None


def rebuilt_samples(root):
    return [(str(path.absolute()), label) for label, name in enumerate(("a", "b"))
            for path in sorted((root / "test" / name).glob("*.png"))]


def test_decoding_with_processes_equals_decoding_here(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "pics", classes=("a", "b", "c"), per_class=7, mode="RGB",
                             sizes=[(12, 12), (15, 11)])
    samples = [(str(path), 0) for path in sorted(root.rglob("*.png"))]
    reader = image_folder_module.ImageReader(3, (12, 12))
    monkeypatch.setattr(image_folder_module, "DECODE_CHUNK", 5)
    here, _ = image_folder_module.decode_samples(samples, reader, workers=0)
    pooled, _ = image_folder_module.decode_samples(samples, reader, workers=2)
    assert torch.equal(here, pooled) and here.shape == (42, 3, 12, 12)
    (root / "test" / "b" / "00003.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="cannot read image .*test/b/00003.png"):
        image_folder_module.decode_samples(samples, reader, workers=2)


def test_cifar10_folder_trains_one_batch_through_the_cli_and_says_when_data_was_ready(tmp_path):
    root = cifar_folder(tmp_path / "cifar", per_class=(4, 1))
    common = ["train.py", "data=cifar10", f"data.root={root}", "backbone.width=8", "gnn.hidden_channels=8",
              "decoder.channels=8", "data.batch_size=8", "trainer.progress=false", "trainer.max_epochs=1",
              "trainer.limit_train_batches=1", "logger=none"]
    first = run_cli(*common, f"hydra.run.dir={tmp_path / 'run1'}", env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
                    timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "test/acc=" in first.stdout
    log = (tmp_path / "run1" / "train.log").read_text()
    assert "data ready in" in log and "(cached)" not in log
    second = run_cli(*common, f"hydra.run.dir={tmp_path / 'run2'}", env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
                     timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "(cached)" in (tmp_path / "run2" / "train.log").read_text()


def test_a_bad_cifar10_folder_through_the_cli_is_one_line(tmp_path):
    root = tmp_path / "cifar"
    _other_classes(root)
    proc = run_cli("train.py", "data=cifar10", f"data.root={root}", "trainer.progress=false",
                   f"hydra.run.dir={tmp_path / 'run'}", env=NO_NETWORK, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error:") and "not of cifar10: zebra" in errors[0]


RECIPE = ("batch_size", "augment", "crop_padding")


@pytest.mark.parametrize("experiment", ["cifar10_baseline", "cifar10_grid", "cifar10_keypoints", "cifar10_knn"])
def test_an_experiments_data_recipe_survives_a_change_of_data_source(experiment):
    own = run_cli("train.py", f"experiment={experiment}", "--cfg", "job", timeout=120)
    moved = run_cli("train.py", f"experiment={experiment}", "data=image_folder", "data.root=somewhere",
                    "--cfg", "job", timeout=120)
    assert own.returncode == 0 and moved.returncode == 0, own.stderr[-2000:] + moved.stderr[-2000:]
    own_data, moved_data = yaml.safe_load(own.stdout)["data"], yaml.safe_load(moved.stdout)["data"]
    assert moved_data["name"] == "image_folder" and moved_data["root"] == "somewhere"
    assert {key: moved_data[key] for key in RECIPE} == {key: own_data[key] for key in RECIPE}
    # a recipe key given on the command line still wins
    chosen = run_cli("train.py", f"experiment={experiment}", "data=image_folder", "data.batch_size=7",
                     "--cfg", "job", timeout=120)
    assert yaml.safe_load(chosen.stdout)["data"]["batch_size"] == 7


EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiments_data_recipe_survives_data_image_folder(experiment):
    """Composed in-process (the CLI path is the test above): each experiment keeps its batch size,
    augmentation and crop padding when its data source becomes an image folder."""
    from conftest import compose

    own = compose([f"experiment={experiment}"]).data
    moved = compose([f"experiment={experiment}", "data=image_folder", "data.root=somewhere"]).data
    assert moved.name == "image_folder"
    assert {key: moved[key] for key in RECIPE} == {key: own[key] for key in RECIPE}
