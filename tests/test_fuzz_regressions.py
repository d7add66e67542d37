"""What the random-configuration search (scripts/fuzz_configs.py) found, each pinned at its cause."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lrs(total_steps: int, ours: bool, optimizer=torch.optim.AdamW, **schedule) -> list[float]:
    """The learning rate before each of ``total_steps`` steps of a one-cycle schedule, and after the last."""
    from interconnects.engine.loop import make_scheduler

    weight = torch.nn.Parameter(torch.zeros(1))
    opt = optimizer([weight], lr=1e-3)
    factory = functools.partial(torch.optim.lr_scheduler.OneCycleLR, **schedule)
    sched = (make_scheduler(factory, opt, total_steps) if ours
             else factory(opt, max_lr=1e-3, total_steps=total_steps))
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(total_steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("pct_start", [0.2, 0.25, 0.1, 0.5, 1.0, 0.0, 0.3])
def test_a_onecycle_schedule_takes_any_step_count(pct_start, three_phase):
    """torch's OneCycleLR divides by zero when a phase spans no step (5 steps at pct_start=0.2,
    the default: ``trainer.limit_train_batches=5 trainer.max_epochs=1``); the engine's schedule
    takes every count, and is torch's own wherever torch's works."""
    crashed = 0
    for steps in range(1, 41):
        lrs = _lrs(steps, True, pct_start=pct_start, three_phase=three_phase)
        used = lrs[:-1]  # (the rate after the last step is never used)
        assert all(0 < lr <= 1e-3 for lr in used), (steps, lrs)
        try:
            reference = _lrs(steps, False, pct_start=pct_start, three_phase=three_phase)
        except ZeroDivisionError:
            crashed += 1
            continue
        assert lrs == reference, steps
    if (pct_start, three_phase) in ((0.2, False), (1.0, False)):
        assert crashed > 0  # the cases this fixes are among those tried


def test_a_five_step_onecycle_warms_up_at_its_first_step_and_anneals_to_the_end():
    lrs = _lrs(5, True, pct_start=0.2)
    assert lrs[0] == pytest.approx(1e-3)  # a one-step warm-up is complete at once
    assert lrs[:5] == sorted(lrs[:5], reverse=True) and lrs[4] < 1e-6
    momentum = _lrs(5, True, optimizer=torch.optim.SGD, pct_start=0.2)  # cycle_momentum with SGD's momentum
    assert momentum == lrs


def test_a_one_step_run_with_a_full_warm_up_trains_at_the_peak():
    assert _lrs(1, True, pct_start=1.0)[0] == pytest.approx(1e-3)


def test_five_batches_of_the_mnist_sample_train_in_a_joblib_sweep(tmp_path, mnist_sample):
    """The command of the report: ``-m hydra/launcher=joblib data=mnist data.root=... trainer.max_epochs=1
    trainer.limit_train_batches=5 seed=0,1`` (each job a 5-step one-cycle schedule) finishes."""
    sweep = tmp_path / "sweep"
    proc = run_cli("train.py", "-m", "hydra/launcher=joblib", "data=mnist", f"data.root={mnist_sample}",
                   "trainer.max_epochs=1", "trainer.limit_train_batches=5", "seed=0,1", "trainer.progress=false",
                   "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ZeroDivisionError" not in proc.stderr + proc.stdout
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["steps"] == 5 and 0 <= metrics["test/acc"] <= 1


def test_a_resume_from_a_missing_checkpoint_outside_a_run_leaves_no_run_directory(tmp_path):
    """A ``ckpt_path=`` that is not inside a run directory starts a new one; refused, it is removed."""
    proc = run_cli("train.py", "data=digits", "logger=none", f"ckpt_path={tmp_path / 'gone' / 'checkpoints' / 'last.ckpt'}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: ckpt_path='{tmp_path / 'gone' / 'checkpoints' / 'last.ckpt'}' does not exist (or is not a file)"]
    assert not (tmp_path / "run").exists()


def _cost_warnings(caplog, *overrides: str) -> list[str]:
    from conftest import compose
    from interconnects.data import data_info
    from interconnects.engine.build import build_task
    from interconnects.engine.costs import warn_costs

    cfg = compose(["data=digits", *overrides])
    info = data_info(cfg.data)
    task = build_task(cfg, info)
    caplog.clear()
    with caplog.at_level("WARNING", logger="interconnects"):
        warn_costs(task, info.in_channels, tuple(info.image_size), cfg.data.batch_size,
                   cfg.data.get("eval_batch_size") or max(cfg.data.batch_size, 256))
    return [r.getMessage() for r in caplog.records if "expect slow" in r.getMessage()]


def test_the_default_hybrid_is_not_warned_about(caplog):
    assert _cost_warnings(caplog) == []
    assert _cost_warnings(caplog, "interconnect=knn", "data.batch_size=128") == []


def test_a_wide_backbone_at_a_large_batch_is_warned_naming_the_keys(caplog):
    """Not a graph at all: resnet18's convolutions at batch 64 (62 GMAC a step by the count)."""
    [line] = _cost_warnings(caplog, "backbone=resnet18", "data.batch_size=64")
    assert "data.batch_size=64" in line and "backbone" in line and "GMAC a training step" in line
    assert _cost_warnings(caplog, "backbone=resnet18", "data.batch_size=2", "data.eval_batch_size=2") == []


def test_a_large_evaluation_batch_is_warned_though_training_steps_are_small(caplog):
    """Found by the search: resnet18 at batch 1 trains in 0.1 GMAC a step, but evaluates 256 images at once."""
    [line] = _cost_warnings(caplog, "backbone=resnet18", "data.batch_size=1")
    assert "expect slow evaluation" in line and "data.eval_batch_size=256" in line


def test_a_gcn_on_a_large_complete_graph_is_warned_though_it_builds_no_tensor_per_edge(caplog):
    """784 pixel nodes, a complete graph of 614,656 edges, 64 channels, batch 64: the aggregation dominates."""
    [line] = _cost_warnings(caplog, "backbone=pixels", "gnn=gcn", "data.batch_size=64")
    assert "784 nodes" in line and "614,656 edges" in line and "gnn.hidden_channels=64" in line
    assert "gnn.num_layers=2" in line and "data.batch_size=64" in line and "tensor per edge" not in line
    assert _cost_warnings(caplog, "backbone=pixels", "gnn=gcn", "data.batch_size=2", "data.eval_batch_size=2",
                          "gnn.hidden_channels=8") == []


def test_the_estimate_leaves_the_rng_and_the_train_mode_as_they_were():
    from conftest import compose
    from interconnects.data import data_info
    from interconnects.engine.build import build_task
    from interconnects.engine.costs import step_cost

    cfg = compose(["data=digits", "interconnect=keypoints", "interconnect.select=random"])
    info = data_info(cfg.data)
    model = build_task(cfg, info).networks()["model"]
    state = torch.random.get_rng_state()
    cost = step_cost(model, info.in_channels, tuple(info.image_size))
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    assert cost.nodes == 16 and cost.cnn > 0 and cost.graph > 0
