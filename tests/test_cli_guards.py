"""The command line at its edges, as a new user meets them: what a resume, a reused run directory, a
typo, the speed projection, evaluate.py, the pictures and the table-printing scripts must do."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY

SCRIPTS = ROOT / "scripts"


def tree_digest(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``: a refused command must leave it byte-identical."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 12. a closed pipe ends a table-printing script quietly ------------------------------------------------

def _fake_sweep(root: Path, jobs: int = 3) -> Path:
    for num in range(jobs):
        job = root / str(num)
        job.mkdir(parents=True)
        (job / "job.json").write_text(json.dumps({"overrides": [f"seed={num}"], "job_num": num, "status": "ok",
                                                  "exit_code": 0, "wall_time_s": 1.5, "optimized_metric": "val/acc",
                                                  "mode": "max"}))
        (job / "metrics.json").write_text(json.dumps({"val/acc": 0.5 + num / 10, "test/acc": 0.4, "epochs": 1}))
    return root


def _closed_pipe_run(*args: str) -> subprocess.CompletedProcess:
    """Run a script with its stdout a pipe whose reading end is already closed (``script | head -0``)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, *args], cwd=ROOT, stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    finally:
        os.close(write)


@pytest.mark.parametrize("csv", [False, True], ids=["markdown", "csv"])
def test_summarize_sweep_exits_quietly_on_a_closed_pipe(tmp_path, csv):
    sweep = _fake_sweep(tmp_path / "sweep")
    done = _closed_pipe_run(str(SCRIPTS / "summarize_sweep.py"), str(sweep), *(["--csv"] if csv else []))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_summarize_sweep_piped_to_head_prints_its_first_line(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep", jobs=400)  # more than a pipe buffer holds
    for flag in ("", "--csv"):
        done = subprocess.run(f"{sys.executable} {SCRIPTS / 'summarize_sweep.py'} {sweep} {flag} | head -1; "
                              "echo status=${PIPESTATUS[0]}", shell=True, executable="/bin/bash", cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        lines = done.stdout.splitlines()
        assert len(lines) == 2 and lines[1] == "status=0", done.stdout + done.stderr
        assert lines[0].startswith("sweep " if not flag else "job,")
        assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.py")))
def test_every_script_uses_the_shared_closed_pipe_guard(script):
    """Each script's help (a table of options) goes to a closed pipe without a traceback."""
    done = _closed_pipe_run(str(SCRIPTS / script), "--help")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


# ---- running train.py in the background (output to files: a full pipe never blocks it) -------------------

class Background:
    """``python train.py args`` from the repository root, its stdout and stderr going to files."""

    def __init__(self, args: list[str], logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.out = logs / f"train-{len(list(logs.iterdir()))}.log"
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        env.pop("HYDRA_FULL_ERROR", None)
        with open(self.out, "w") as out:
            self.popen = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                                          stdout=out, stderr=subprocess.STDOUT, env=env)

    @property
    def output(self) -> str:
        return self.out.read_text()

    def wait_for(self, condition, what: str, timeout: float = 240) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not condition():
            if self.popen.poll() is not None:
                raise AssertionError(f"train.py ended (status {self.popen.returncode}) before {what}:\n{self.output[-3000:]}")
            if time.monotonic() > deadline:
                self.popen.kill()
                raise AssertionError(f"no {what} within {timeout} s:\n{self.output[-3000:]}")
            time.sleep(0.02)

    def interrupt(self) -> int:
        import signal

        self.popen.send_signal(signal.SIGINT)
        return self.popen.wait(240)


QUIET = [*TINY, "logger=none"]


# ---- 4. the projected epoch time comes from steps after warm-up, for the epoch as run and the full one ------

def test_projection_times_steps_after_warm_up_and_projects_the_full_epoch_and_the_run(cli, tmp_path):
    import re

    proc = cli("train.py", *QUIET, "trainer.max_epochs=2", "trainer.limit_train_batches=30",
               f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    line = next(ln for ln in log.splitlines() if "first training step:" in ln)
    # digits: 1,293 training images in batches of 32 are 41 steps a full epoch
    match = re.search(r"steps (\d+)-(\d+) after warm-up: ([\d.e-]+) s a step; projected ([\d.]+) s per epoch of 30 steps "
                      r"\(trainer\.limit_train_batches=30; the full epoch of 41 steps: ([\d.]+) s\), ([\d.]+) s for the "
                      r"run's 2 epoch\(s\)", line)
    assert match, line
    first_timed, last_timed, per_step, epoch, full, run = match.groups()
    assert int(first_timed) == 3 and int(last_timed) > int(first_timed)  # the first steps (warm-up) are not timed
    per_step = float(per_step)
    assert float(epoch) == pytest.approx(30 * per_step, abs=0.06)
    assert float(full) == pytest.approx(41 * per_step, abs=0.06)
    assert float(run) == pytest.approx(60 * per_step, abs=0.06)
    measured = re.findall(r"epoch \d/2 \(training ([\d.]+) s, validation [\d.]+ s\)", log)
    assert len(measured) == 2  # (how near the projection comes to them depends on the machine's load:
    # the arithmetic is checked on a fake clock below)


def test_the_projection_is_the_mean_step_after_warm_up_on_a_fake_clock(monkeypatch, caplog):
    """A first step of 5 s and a second of 2 s (warm-up) and then steps of 0.25 s project 0.25 s a
    step: 10 s for an epoch of 40 steps, 25 s for the full 100, 30 s for a run of 3 such epochs."""
    from types import SimpleNamespace

    from interconnects.engine import loop

    now = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    trainer = loop.Trainer.__new__(loop.Trainer)
    trainer.cfg = SimpleNamespace(limit_train_batches=40, max_epochs=3)
    trainer.per_epoch, trainer.full_per_epoch, trainer.first_step = 40, 100, 0
    trainer._step_ends = []
    for trainer.batch_in_epoch, seconds in enumerate([5.0, 2.0] + [0.25] * 10, start=1):
        started = now[0]
        now[0] += seconds
        with caplog.at_level("INFO", logger="interconnects"):
            trainer._time_step(started)
    [line] = [r.getMessage() for r in caplog.records if "first training step" in r.getMessage()]
    assert line.startswith("first training step: 5.00 s (warm-up included); steps 3-12 after warm-up: 0.25 s a step; "
                           "projected 10.0 s per epoch of 40 steps (trainer.limit_train_batches=40; the full epoch of "
                           "100 steps: 25.0 s), "), line
    assert "100 steps: 25.0 s), 30.0 s for the run's 3 epoch(s) (training steps only" in line, line  # 3 × 40 steps
    assert trainer._step_ends is None  # reported once


# ---- 7. the interrupt and the resume count the same way ----------------------------------------------------

def test_interrupt_and_resume_name_the_same_position(tmp_path):
    import re

    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    args = [*QUIET, "trainer.max_epochs=30", "trainer.checkpoint_every_n_steps=1", f"hydra.run.dir={run}"]
    first = Background(args, tmp_path / "logs")
    first.wait_for(last.exists, "a step-level last.ckpt")
    assert first.interrupt() == 130
    stop = re.search(r"error: stopped by SIGINT (after step (\d+) \(epoch (\d+)(?:, batch (\d+) of 41| complete)\)); "
                     r"last\.ckpt written", first.output)
    assert stop, first.output[-3000:]
    from interconnects.engine.checkpoint import load_checkpoint

    state = load_checkpoint(last)
    assert int(stop[2]) == state["step"]
    if stop[4] is not None:  # mid-epoch: epochs are counted from 1, batches done in it
        assert (int(stop[3]), int(stop[4])) == (state["epoch"] + 1, state["batch_in_epoch"])
    else:
        assert (int(stop[3]), state["batch_in_epoch"]) == (state["epoch"], 0)
    second = Background([*args[:-1], f"ckpt_path={last}"], tmp_path / "logs")
    second.wait_for(lambda: "resumed from" in second.output, "the resume message")
    resumed = next(ln for ln in second.output.splitlines() if "resumed from" in ln)
    assert resumed.endswith(f"resumed from {last} {stop[1]}"), (resumed, stop[1])
    # interrupt it once it trains again (a signal in the window before the loop's handler is
    # installed is Python's own KeyboardInterrupt, not what this test is about)
    second.wait_for(lambda: _saved_step(last) > state["step"], "a step after the resume")
    assert second.interrupt() == 130


def _saved_step(path: Path) -> int:
    """The step of the checkpoint at ``path`` (-1 while it cannot be read)."""
    from interconnects.engine.checkpoint import load_checkpoint

    try:
        return int(load_checkpoint(path)["step"])
    except Exception:  # noqa: BLE001 - replaced between the look and the read
        return -1


# ---- 1 and 8. a resume never silently ignores a changed optimizer, schedule or data setting ------------------

SHORT = [*QUIET, "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch run with the default one-cycle schedule."""
    run = tmp_path_factory.mktemp("finished") / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *SHORT, "trainer.max_epochs=1", f"hydra.run.dir={run}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "copy"))


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(("overrides", "named"), [
    (["optimizer.lr=0.01"], "optimizer.lr=0.01 here but 0.003 in the checkpoint"),
    (["optimizer.weight_decay=0.01"], "optimizer.weight_decay=0.01 here but 0.0005 in the checkpoint"),
    (["scheduler=cosine"], "scheduler._target_='torch.optim.lr_scheduler.CosineAnnealingLR' here but "
                           "'torch.optim.lr_scheduler.OneCycleLR' in the checkpoint"),
    (["scheduler.pct_start=0.3"], "scheduler.pct_start=0.3 here but 0.2 in the checkpoint"),
    (["data.val_fraction=0.2"], "data.val_fraction=0.2 here but 0.1 in the checkpoint"),
    (["seed=7"], "seed=7 here but 42 in the checkpoint"),
    (["trainer.max_epochs=3"], "trainer.max_epochs=3 here but 1 in the checkpoint"),
], ids=["lr", "weight_decay", "cosine", "pct_start", "val_fraction", "seed", "max_epochs"])
def test_a_resume_that_would_ignore_a_changed_setting_is_refused_naming_it(cli, finished_run, tmp_path, overrides,
                                                                            named):
    run = _copy_run(finished_run, tmp_path)
    before = tree_digest(run)
    proc = cli("train.py", *SHORT, "trainer.max_epochs=1", *overrides, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = _error_line(proc)
    assert named in line, line
    assert "scheduler=constant" in line and "init_from=" in line
    assert tree_digest(run) == before


def test_a_constant_rate_resume_applies_and_records_the_configured_rate(cli, finished_run, tmp_path):
    """The documented way to train a finished run longer: scheduler=constant, more epochs, a rate of one's choosing."""
    from omegaconf import OmegaConf

    from interconnects.engine.checkpoint import load_checkpoint

    run = _copy_run(finished_run, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    for epochs, lr in ((2, 0.01), (3, 0.002)):  # the second resume: constant to constant, another rate
        proc = cli("train.py", *SHORT, f"trainer.max_epochs={epochs}", "scheduler=constant", f"optimizer.lr={lr}",
                   f"ckpt_path={last}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        state = load_checkpoint(last)
        assert state["epoch"] == epochs
        assert [g["lr"] for g in state["optimizers"]["model"]["param_groups"]] == [lr]  # what ran
        recorded = OmegaConf.load(run / ".hydra" / "config.yaml")
        assert recorded.optimizer.lr == lr and recorded.scheduler._target_ is None  # what the record says
        assert f"now the configured optimizer.lr={lr:g}" in proc.stdout + proc.stderr


# ---- 2. a new run never overwrites the run already in its directory, unless told to ---------------------------

def test_a_new_run_in_a_directory_holding_a_run_is_refused_and_changes_nothing(cli, finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    before = tree_digest(run)
    proc = cli("train.py", *SHORT, "trainer.max_epochs=1", f"hydra.run.dir={run}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = _error_line(proc)
    assert f"hydra.run.dir={run} already holds a run" in line
    assert f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in line and "overwrite=true" in line
    assert tree_digest(run) == before


def test_overwrite_true_replaces_the_run_in_the_directory(cli, finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    (run / "notes.txt").write_text("mine")  # not a run's file: stays
    old_best = (run / "checkpoints" / "best.ckpt").read_bytes()
    proc = cli("train.py", *SHORT, "trainer.max_epochs=1", "seed=3", "overwrite=true", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "best.ckpt").read_bytes() != old_best
    log = (run / "train.log").read_text()
    assert log.count("run directory:") == 1  # one run in the log, not two
    from omegaconf import OmegaConf

    assert OmegaConf.load(run / ".hydra" / "config.yaml").seed == 3
    assert (run / "notes.txt").read_text() == "mine"


# ---- 3. keys the schema does not know are refused, "+" or not ------------------------------------------------

@pytest.mark.parametrize(("override", "hint"), [
    ("+interconect=knn", "did you mean interconnect=knn?"),
    ("+trainer.max_epoch=2", "did you mean trainer.max_epochs=2?"),
    ("+trainer.foo=1", "trainer has no key 'foo'"),
    ("+data.val_fractoin=0.2", "did you mean data.val_fraction=0.2?"),
], ids=["group", "trainer", "no-match", "data"])
def test_an_added_key_the_schema_does_not_know_is_refused_at_composition(cli, tmp_path, override, hint):
    run = tmp_path / "run"
    proc = cli("train.py", *SHORT, override, f"hydra.run.dir={run}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = _error_line(proc)
    assert line.startswith(f"error: {override}: ") and hint in line, line
    assert not run.exists()  # refused before Hydra made or wrote anything


def test_an_unknown_key_on_a_resume_leaves_the_run_byte_identical(cli, finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    before = tree_digest(run)
    proc = cli("train.py", *SHORT, "trainer.max_epochs=1", "+trainer.foo=1", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert proc.returncode == 2
    assert "trainer has no key 'foo'" in _error_line(proc)
    assert tree_digest(run) == before


def test_the_target_groups_still_take_keys_of_their_own(cli, tmp_path):
    # AdamW's own amsgrad, added to the optimizer group with "+": the group is free, the class checks it
    run = tmp_path / "run"
    proc = cli("train.py", *SHORT, "trainer.max_epochs=1", "+optimizer.amsgrad=true", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from omegaconf import OmegaConf

    assert OmegaConf.load(run / ".hydra" / "config.yaml").optimizer.amsgrad is True


# ---- 6. evaluate.py: its log holds the report, pictures are named by their split, a wrong path leaves nothing --

@pytest.mark.parametrize("split", ["val", "train"])
def test_evaluate_logs_its_report_and_names_pictures_by_split(cli, finished_run, tmp_path, split):
    out = tmp_path / "eval"
    proc = cli("evaluate.py", f"ckpt_path={finished_run}", f"split={split}", "limit_batches=2", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "evaluate.log").read_text()
    assert f"{split}/acc" in log and "checkpoint:" in log and "confusion matrix" in log and "metrics written" in log
    pictures = sorted(p.name for p in (out / "pictures").iterdir())
    assert f"{split}_confusion.png" in pictures and "test_confusion.png" not in pictures, pictures


def test_evaluate_with_a_wrong_checkpoint_path_leaves_no_directory(cli, tmp_path):
    out = tmp_path / "eval"
    proc = cli("evaluate.py", f"ckpt_path={tmp_path / 'nowhere' / 'best.ckpt'}", f"hydra.run.dir={out}")
    assert proc.returncode == 2
    assert "nowhere" in _error_line(proc)
    assert not out.exists()


# ---- 11. pictures that explain themselves, in TensorBoard and in plot_run.py's files -------------------------

def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB")).astype(int)


def _has_colour_bar(pixels, cmap: str) -> bool:
    """Whether some column runs from ``cmap``'s top colour (high values, at the top) to its bottom one."""
    import matplotlib
    import numpy as np

    top, bottom = (np.array(matplotlib.colormaps[cmap](v)[:3]) * 255 for v in (1.0, 0.0))
    rows, cols = pixels.shape[:2]
    for col in range(cols - 1, cols // 2, -1):
        column = pixels[:, col]
        near_top = np.abs(column - top).max(axis=1) <= 6
        near_bottom = np.abs(column - bottom).max(axis=1) <= 6
        if near_top.any() and near_bottom.any() and near_top.nonzero()[0][0] < near_bottom.nonzero()[0][-1]:
            return True
    return False


def _has_title(pixels) -> bool:
    """A white strip at the top with dark text in it."""
    strip = pixels[:12]
    return bool((strip.min(axis=2) >= 250).mean() > 0.5 and (strip.max(axis=2) < 100).any())


def test_graph_pictures_have_titles_colour_bars_and_legends_in_tensorboard_and_plot_run(cli, tmp_path):
    run = tmp_path / "run"
    proc = cli("train.py", *TINY, "interconnect=keypoints", "interconnect.num_keypoints=8", "trainer.max_epochs=1",
               "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
               f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plotted = subprocess.run([sys.executable, str(SCRIPTS / "plot_run.py"), str(run)], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert plotted.returncode == 0, plotted.stderr[-3000:]
    plots = run / "plots"
    adjacency, scores, edges = (_pixels(plots / f"graph_{name}.png") for name in ("adjacency", "scores", "edges"))
    assert _has_title(adjacency) and _has_colour_bar(adjacency, "viridis")
    assert _has_title(scores) and _has_colour_bar(scores, "magma")
    assert _has_title(edges) and _has_title(_pixels(plots / "graph_keypoints.png"))
    import matplotlib
    import numpy as np

    # the legend under the edges: a dot of each node's colour in the bottom rows, on white
    legend = edges[-16:]
    for colour in matplotlib.colormaps["tab10"].colors[:4]:
        assert (np.abs(legend - np.array(colour) * 255).max(axis=2) <= 8).any(), colour


def test_acc_plot_keeps_the_test_point_visible_on_the_validation_point(tmp_path, monkeypatch):
    """After one epoch the test, validation and epoch-mean points share a step (and may share a value):
    each is drawn as its own hollow diamond, a size apart and above the lines."""
    sys.path.insert(0, str(SCRIPTS))
    import plot_run

    figures = []
    monkeypatch.setattr(plot_run, "save", lambda fig, path, written: figures.append(fig))
    groups = {"acc": {"train": [(1, 0.2), (2, 0.5), (3, 0.6)], "val": [(3, 0.7)], "test": [(3, 0.7)],
                      "train (epoch mean)": [(3, 0.5)]}}
    plot_run.plot_curves(groups, tmp_path, [])
    lines = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
    singles = [lines[k] for k in ("test", "train (epoch mean)", "val")]
    assert all(line.get_markerfacecolor() == "none" for line in singles)  # hollow: what lies under shows
    assert len({line.get_markersize() for line in singles}) == 3  # nested, never the same size
    assert min(line.get_zorder() for line in singles) > lines["train"].get_zorder()


# ---- 9. values that got through unremarked or crashed ----------------------------------------------------------

def test_an_image_size_the_backbone_cannot_take_is_refused_naming_the_smallest(cli, tmp_path):
    run = tmp_path / "run"
    proc = cli("train.py", *SHORT, "data.image_size=2", f"hydra.run.dir={run}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = _error_line(proc)
    assert "data.image_size" in line and "the smallest size it takes is data.image_size=4" in line, line
    assert "Traceback" not in proc.stdout + proc.stderr and not run.exists()
    # and that size is indeed taken by the backbone
    taken = cli("train.py", *SHORT, "data.image_size=4", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'four'}")
    assert taken.returncode == 0, taken.stderr[-3000:]


def test_a_validation_share_that_leaves_few_training_images_and_fp16_on_the_cpu_are_remarked(cli, tmp_path):
    proc = cli("train.py", *SHORT, "data.val_fraction=0.9", "trainer.precision=16", "trainer.device=cpu",
               "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    few = [ln for ln in log.splitlines() if "data.val_fraction=0.9 leaves" in ln]
    assert len(few) == 1 and "images to train on" in few[0], log[-3000:]
    assert sum("trainer.precision=16 on the CPU" in ln and "bf16" in ln for ln in log.splitlines()) == 1


# ---- 10. trainer.limit_val_batches: the run says how many images its limits measured ---------------------------

def test_the_limits_line_counts_the_images_of_each_limited_split(cli, tmp_path):
    proc = cli("train.py", *QUIET, "data.batch_size=1", "data.eval_batch_size=50", "trainer.limit_train_batches=4",
               "trainer.limit_val_batches=3", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in (proc.stdout + proc.stderr).splitlines() if "from a few batches only" in ln)
    assert "trainer.limit_val_batches=3 (batches of 50: at most 150 validation images)" in line, line
    assert "trainer.limit_train_batches=4 (batches of 1: at most 4 training images)" in line, line
