"""The runner end to end: configs compose and build, train.py / evaluate.py work through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONFIGS, TINY, compose, make_image_folder, run_cli

GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIGS / g).glob("*.yaml"))]
FAST = ["debug=default", *TINY]


def test_every_group_has_options():
    assert {"data", "backbone", "interconnect", "gnn", "decoder", "task", "optimizer", "scheduler",
            "trainer", "logger", "experiment", "debug"} <= set(GROUPS)
    names = {g: {o for gg, o in OPTIONS if gg == g} for g in GROUPS}
    assert {"mnist", "fashion_mnist", "cifar10", "cifar100", "digits", "image_folder"} <= names["data"]
    assert {"grid", "keypoints", "knn"} <= names["interconnect"]
    assert {"tensorboard", "none"} <= names["logger"]
    assert "quickstart" in names["experiment"]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_config_composes_and_instantiates(group, option, tmp_path):
    from interconnects.data import check_data_config, data_info
    from interconnects.engine.loop import check_trainer_config, make_scheduler
    from interconnects.engine.build import build_factories, build_task

    # an image folder is read for its classes, channels and size: give it a small one
    folder = [f"data.root={make_image_folder(tmp_path / 'pics')}"] if (group, option) == ("data", "image_folder") else []
    # options that only make sense together: no graph, no graph layers (the CNN baseline); the
    # GAN's two optimizers for the GAN's two networks
    partner = {("interconnect", "none"): ["gnn=none"], ("optimizer", "gan"): ["task=gan"]}.get((group, option), [])
    cfg = compose([f"{group}={option}", *folder, *partner])
    check_data_config(cfg.data)
    check_trainer_config(cfg.trainer)
    task = build_task(cfg, data_info(cfg.data))
    optimizers, schedulers = build_factories(cfg, list(task.optimizer_groups()))
    for group, params in task.optimizer_groups().items():
        make_scheduler(schedulers[group], optimizers[group](params), 10)
    assert cfg.logger.name in ("tensorboard", "none")


def test_wrong_type_and_unknown_key_fail_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="max_epochs"):
        compose(["trainer.max_epochs=abc"])
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose(["trainer.no_such_key=1"])
    with pytest.raises(Exception, match="nope"):
        compose(["interconnect=nope"])


@pytest.mark.parametrize("interconnect", ["grid", "keypoints", "knn"])
def test_fast_dev_run_of_each_interconnect(tmp_path, interconnect):
    run = tmp_path / "run"
    proc = run_cli("train.py", *FAST, f"interconnect={interconnect}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test/acc", "test/loss", "val/acc", "val/loss"):
        assert key in metrics and isinstance(metrics[key], float)
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()
    assert "test/acc=" in proc.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real run with TensorBoard on, shared by the tests below."""
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = run_cli("train.py", *TINY, "trainer.max_epochs=2", "trainer.limit_train_batches=8",
                   "trainer.limit_val_batches=2", "trainer.log_every_n_steps=2", "trainer.deterministic=true",
                   "scheduler=cosine", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def test_evaluate_reproduces_training_test_metric(trained, tmp_path):
    out = tmp_path / "eval"
    proc = run_cli("evaluate.py", f"ckpt_path={trained / 'checkpoints' / 'best.ckpt'}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    train_metrics = json.loads((trained / "metrics.json").read_text())
    eval_metrics = json.loads((out / "metrics.json").read_text())
    assert eval_metrics["test/acc"] == train_metrics["test/acc"]
    assert eval_metrics["test/loss"] == pytest.approx(train_metrics["test/loss"], rel=1e-6)
    assert "test/acc" in proc.stdout


def test_evaluate_uses_the_checkpoint_config_not_todays_defaults(trained, tmp_path):
    """A model trained with non-default widths evaluates although today's defaults differ."""
    from interconnects.engine.checkpoint import load_checkpoint

    state = load_checkpoint(trained / "checkpoints" / "best.ckpt")
    assert state["config"]["backbone"]["width"] == 8
    out = tmp_path / "eval_val"
    proc = run_cli("evaluate.py", f"ckpt_path={trained / 'checkpoints' / 'best.ckpt'}", "split=val",
                   f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    per_class = {f"val/acc/{c}" for c in range(10)}
    assert set(metrics) == {"val/acc", "val/loss", "val/confusion"} | per_class
    assert len(metrics["val/confusion"]) == 10 and sum(map(sum, metrics["val/confusion"])) == 144


def test_tensorboard_event_file_holds_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc", "lr"} <= tags
    assert len(acc.Scalars("val/acc")) == 2
    assert acc.Tags()["images"], "input images are logged"


def test_resume_continues_at_the_right_epoch(trained, tmp_path):
    from interconnects.engine.checkpoint import load_checkpoint

    last = trained / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["epoch"] == 2
    common = [*TINY, "trainer.limit_train_batches=8", "trainer.limit_val_batches=2", "logger=none",
              f"ckpt_path={last}"]
    # a longer run would stretch the cosine schedule the checkpoint is halfway through: refused clearly
    proc = run_cli("train.py", *common, "trainer.max_epochs=3", "scheduler=cosine", f"hydra.run.dir={tmp_path / 'a'}")
    assert proc.returncode != 0 and "LR schedule spans 16 steps" in proc.stderr
    proc = run_cli("train.py", *common, "trainer.max_epochs=3", "scheduler=constant", f"hydra.run.dir={tmp_path / 'b'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert "resumed from" in log and "after step 16 (epoch 2 complete)" in log
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["steps"] == 24


def test_sweep_runs_in_a_subprocess(tmp_path):
    proc = run_cli("train.py", "-m", *FAST, "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert "test/acc" in json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())


@pytest.mark.parametrize("augment", ["crop", "crop_flip", "crop_altflip", "affine"])
def test_augmentation_is_fixed_by_seed_epoch_and_batch(augment):
    """The same (seed, epoch, batch) gives the same images, whatever was drawn before; another epoch differs."""
    from interconnects.data.tensors import ImageTensors

    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    view = ImageTensors(images, torch.arange(8), (0.5,) * 3, (0.25,) * 3, augment, padding=2, seed=3)
    first, labels = view.__getitems__([5, 1, 2])
    torch.rand(100)  # the global RNG plays no part
    again, _ = view.__getitems__([5, 1, 2])
    view.epoch = 1
    other, _ = view.__getitems__([5, 1, 2])
    assert first.shape == (3, 3, 12, 12) and labels.tolist() == [5, 1, 2]
    assert torch.equal(first, again) and not torch.equal(first, other)
    plain = ImageTensors(images, torch.arange(8), (0.5,) * 3, (0.25,) * 3).__getitems__([5])[0]
    torch.testing.assert_close(plain, (images[5:6].float() / 255 - 0.5) / 0.25)
