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
