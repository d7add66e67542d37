"""What ``train.py`` / ``evaluate.py`` promise around a run, through the CLI in subprocesses:
a refused resume leaves the run as it was, a resume is the same model or nothing, runs without a
validation split, schedules changed on resume, fine-tuning from weights, cost warnings, exit
statuses, no leftovers from refused runs, evaluate's inputs and outputs, and an honest record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY, run_cli

SHORT = [*TINY, "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """A finished one-epoch grid run (OneCycle schedule), tags on, TensorBoard on."""
    base = tmp_path_factory.mktemp("grid")
    proc = run_cli("train.py", *SHORT, "trainer.max_epochs=1", "tags=[ablation,grid]",
                   f"hydra.run.dir={base / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return base / "run", proc


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


def test_refused_resume_leaves_the_run_directory_byte_identical(grid_run, tmp_path):
    run = _copy(grid_run[0], tmp_path)
    before = _tree(run)
    proc = run_cli("train.py", *SHORT, "trainer.max_epochs=3", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "LR schedule spans" in proc.stderr and "Traceback" not in proc.stderr
    assert _tree(run) == before


def test_resume_with_another_model_is_refused_naming_the_keys(grid_run, tmp_path):
    run = _copy(grid_run[0], tmp_path)
    metrics = (run / "metrics.json").read_bytes()
    proc = run_cli("train.py", *SHORT, "trainer.max_epochs=2", "interconnect=knn", "scheduler=constant",
                   f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error:") and "interconnect._target_" in error and "another model" in error
    assert (run / "metrics.json").read_bytes() == metrics


def test_a_key_the_checkpoint_predates_differs_only_away_from_its_default():
    """A checkpoint written before ``interconnect.edge_shift`` existed resumes under its default (the
    same model) and is refused under another value, as is a key whose class has no such argument."""
    from interconnects.engine.resume import model_differences

    saved = {"interconnect": {"_target_": "interconnects.DenseGrid", "edges": "gaussian"}}
    now = {"interconnect": {**saved["interconnect"], "edge_shift": 0.0}}
    assert model_differences(now, saved) == []
    now["interconnect"]["edge_shift"] = -0.2
    assert model_differences(now, saved) == ["interconnect.edge_shift=-0.2 here but None in the checkpoint"]
    unknown = {"interconnect": {**saved["interconnect"], "bogus": 0.0}}
    assert model_differences(unknown, saved) == ["interconnect.bogus=0.0 here but None in the checkpoint"]


def test_resuming_a_finished_run_says_so_and_changes_nothing(grid_run, tmp_path):
    run = _copy(grid_run[0], tmp_path)
    before = _tree(run)
    proc = run_cli("train.py", *SHORT, "trainer.max_epochs=1", "tags=[ablation,grid]",
                   f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already finished" in proc.stdout and "evaluate.py" in proc.stdout
    assert _tree(run) == before


def test_no_validation_split_trains_to_metrics_with_best_equal_to_last(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train.py", *SHORT, "data.val_fraction=0", "trainer.max_epochs=2", "logger=none",
                   f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == 2 and "test/acc" in metrics and "val/acc" not in metrics


def test_a_failing_epoch_end_fails_before_any_checkpoint(tmp_path):
    """What an epoch's end runs is tried before training: a task whose validation metrics lack
    the metric it monitors fails at once, with one line and no checkpoint written."""
    (tmp_path / "badtask.py").write_text(
        "from interconnects.tasks.classify import ClassificationTask\n\n\n"
        "class BadMonitor(ClassificationTask):\n    monitor = 'val/nope'\n")
    run = tmp_path / "run"
    proc = run_cli("train.py", *SHORT, "logger=none", "task._target_=badtask.BadMonitor", f"hydra.run.dir={run}",
                   env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "monitors 'val/nope'" in proc.stderr.strip().splitlines()[-1]
    assert not (run / "checkpoints").exists()


def test_extending_a_onecycle_run_with_a_constant_lr_resumes_again_and_again(grid_run, tmp_path):
    run = _copy(grid_run[0], tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    proc = run_cli("train.py", *SHORT, "trainer.max_epochs=2", "scheduler=constant", "tags=[ablation,grid]",
                   f"ckpt_path={last}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "scheduler=constant" in (run / ".hydra" / "overrides.yaml").read_text()
    # the run's own overrides now say scheduler=constant: a later resume with them works
    proc = run_cli("train.py", *SHORT, "trainer.max_epochs=3", "scheduler=constant", "tags=[ablation,grid]",
                   f"ckpt_path={last}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3
    # and the schedule of a run written without one cannot be brought back silently
    proc = run_cli("train.py", *SHORT, "trainer.max_epochs=4", "tags=[ablation,grid]", f"ckpt_path={last}")
    assert proc.returncode == 2 and "scheduler=constant" in proc.stderr
    assert "scheduler._target_='torch.optim.lr_scheduler.OneCycleLR' here but None in the checkpoint" in proc.stderr


def test_init_from_starts_a_new_run_from_the_weights(grid_run, tmp_path):
    import torch

    from interconnects.engine.checkpoint import load_checkpoint

    run = tmp_path / "finetune"
    best = grid_run[0] / "checkpoints" / "best.ckpt"
    proc = run_cli("train.py", *SHORT, "trainer.max_epochs=1", "optimizer.lr=0", "scheduler=constant",
                   "logger=none", f"init_from={best}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    new, old = load_checkpoint(run / "checkpoints" / "last.ckpt"), load_checkpoint(best)
    assert new["step"] == 3 and new["epoch"] == 1
    weights = [k for k in old["model"] if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(new["model"][k], old["model"][k]) for k in weights)  # lr 0: the weights stay


def test_first_step_time_and_projected_epoch_time_are_printed(grid_run):
    assert "first training step:" in grid_run[1].stdout and "per epoch of 3 steps" in grid_run[1].stdout


def test_dense_attention_on_a_large_complete_graph_is_warned_before_training(tmp_path):
    pixels = [o for o in SHORT if not o.startswith("backbone.")]
    proc = run_cli("train.py", *pixels, "backbone=pixels", "gnn=gat", "gnn.hidden_channels=4", "gnn.heads=1",
                   "gnn.num_layers=1", "trainer.limit_train_batches=1", "data.batch_size=2", "data.eval_batch_size=2",
                   "trainer.max_epochs=1", "logger=none",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert "complete graph of 784 nodes" in log and "gnn=gcn" in log and "interconnect=knn" in log
    assert log.index("complete graph of 784 nodes") < log.index("first training step")


@pytest.mark.parametrize("override", ["gnn=gatt", "trainer.max_epoch=2", "interconnect.kk=3"])
def test_bad_settings_exit_2_and_leave_no_run_directory(tmp_path, override):
    run = tmp_path / "run"
    proc = run_cli("train.py", *SHORT, override, f"hydra.run.dir={run}")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1000:])
    assert not run.exists()


def test_impossible_value_leaves_no_run_directory(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train.py", *SHORT, "interconnect=keypoints", "interconnect.num_keypoints=1000",
                   f"hydra.run.dir={run}")
    assert proc.returncode == 2 and "num_keypoints" in proc.stderr
    assert not run.exists()


def test_evaluate_takes_a_run_directory_and_the_train_split(grid_run, tmp_path):
    proc = run_cli("evaluate.py", f"ckpt_path={grid_run[0]}", "split=train", "limit_batches=2",
                   f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "train/acc" in metrics and "train/acc/0" in metrics and len(metrics["train/confusion"]) == 10
    assert "confusion matrix" in proc.stdout
    assert (tmp_path / "eval" / "pictures" / "train_confusion.png").is_file()


def test_evaluate_help_lists_no_training_groups():
    proc = run_cli("evaluate.py", "--help")
    assert proc.returncode == 0 and "ckpt_path" in proc.stdout
    assert "gnn:" not in proc.stdout and "backbone:" not in proc.stdout and "Configuration groups" not in proc.stdout


def test_interconnect_none_with_a_gnn_is_refused(tmp_path):
    proc = run_cli("train.py", *SHORT, "interconnect=none", "gnn=gat", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "interconnect=none" in proc.stderr and "gnn=none" in proc.stderr


def test_tags_name_the_run_and_reach_hparams_and_train_log_ends_with_the_test_metrics(grid_run):
    run, proc = grid_run
    assert "tags=[ablation,grid]" in (run / ".hydra" / "overrides.yaml").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert "ablation" in hparams["tags"].string_value
    last_lines = (run / "train.log").read_text().strip().splitlines()[-6:]
    assert any("test/acc=" in line and "from a few batches only" in line for line in last_lines)


def test_tags_are_in_the_run_directory_name():
    from interconnects.config import _run_dir

    assert _run_dir(None, ["ablation", "k8"]).endswith("_ablation_k8")
    assert _run_dir(None, []).count("_") == 3  # date_time_pid_random
