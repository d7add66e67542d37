"""Reliability of the command-line runner, end to end in subprocesses.

* kill -9 at any moment leaves a loadable ``last.ckpt``; resuming from it (mid-epoch) ends with the
  same metrics and weights, bit for bit, as a run that was never interrupted;
* SIGTERM finishes the step, writes ``last.ckpt`` and prints the command that resumes;
* checkpoints load safely: a file crafted to run code is refused, and nothing in it runs;
* a non-finite loss stops the run (or skips the step) and keeps the last good checkpoint;
* every bad input fails before any work, with one line naming the key and what is accepted;
* a checkpoint that cannot be written (disk full, folder gone) stops the run with a clear line and
  leaves the last good checkpoint as it was.

The runs are tiny (a few batches of a narrow model). They are all started at once by the
``jobs`` fixture and run side by side on a few workers; each test waits for its own and checks it.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import hang_limit

ROOT = Path(__file__).resolve().parents[1]

# Two epochs of 6 batches; a step-level last.ckpt every 2 steps; dropout, augmentation (the flip
# alternating by epoch), BatchNorm, the one-cycle schedule and the lookahead of the weights every 3
# steps (its slow copy differs from the weights at most checkpoints) all in play, so a resume that
# missed any state would show.
BASE = {
    "trainer.max_epochs": "2",
    "trainer.limit_train_batches": "6",
    "trainer.limit_val_batches": "2",
    "trainer.limit_test_batches": "2",
    "trainer.checkpoint_every_n_steps": "2",
    "trainer.deterministic": "true",
    "trainer.progress": "false",
    "logger": "none",
    "data": "digits",
    "backbone.width": "8",
    "gnn.hidden_channels": "8",
    "decoder.channels": "8",
    "data.batch_size": "32",
    "data.eval_batch_size": "64",
    "task.head.dropout": "0.2",
    "data.augment": "crop_altflip",
    "data.crop_pad_mode": "reflect",
    "trainer.lookahead_every": "3",
}
PER_EPOCH = 6
TIMEOUT = hang_limit(60)  # (a hang guard: see conftest.HANG_MARGIN)
WORKERS = 3  # processes side by side (they are single-threaded)


def overrides(*extra: str) -> list[str]:
    """``BASE`` as ``key=value`` arguments, with ``extra`` ones replacing or adding keys."""
    merged = dict(BASE)
    for item in extra:
        key, value = item.split("=", 1)
        merged.pop(key, None)
        merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


# ---- running the command-line tools ---------------------------------------------------------------
_LIVE: list[subprocess.Popen] = []


class Proc:
    """A CLI process (``python script args``, from the repository root) whose output goes to files,
    so a full pipe can never block it."""

    def __init__(self, script: str, args: list[str], logs: Path, env: dict | None = None) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        stem = logs / f"{Path(script).stem}-{time.monotonic_ns()}"
        self.out_path, self.err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    **(env or {})}
        full_env.pop("HYDRA_FULL_ERROR", None)
        self.started = time.monotonic()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT,
                                          stdout=out, stderr=err, env=full_env)
        _LIVE.append(self.popen)
        self.pid = self.popen.pid

    def wait(self, timeout: float = TIMEOUT) -> "Proc":
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"timed out after {timeout} s:\n{self.output[-3000:]}") from None
        self.seconds = time.monotonic() - self.started
        return self

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli(script: str, args: list[str], logs: Path, env: dict | None = None) -> Proc:
    return Proc(script, args, logs, env).wait()


def wait_for(condition, proc: Proc, what: str, timeout: float = TIMEOUT, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.returncode is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}:\n{proc.output[-3000:]}")
        if time.monotonic() > deadline:
            proc.popen.kill()
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(interval)


def load(path):
    from interconnects.engine.checkpoint import load_checkpoint

    return load_checkpoint(path)


def finite(state) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state["model"].values() if t.is_floating_point())


def assert_same_run(a: Path, b: Path) -> None:
    """Same metrics.json values, and the same model tensors in best.ckpt and last.ckpt."""
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma == mb
    for name in ("best.ckpt", "last.ckpt"):
        sa, sb = load(a / "checkpoints" / name), load(b / "checkpoints" / name)
        assert (sa["epoch"], sa["step"]) == (sb["epoch"], sb["step"])
        assert sa["model"].keys() == sb["model"].keys()
        for key in sa["model"]:
            assert torch.equal(sa["model"][key], sb["model"][key]), f"{name}: {key} differs"


def one_error_line(proc: Proc) -> str:
    """The single line a handled failure prints on stderr (and no traceback anywhere)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in proc.output
    return lines[0]


def stopped(jobs, name: str, status: int) -> tuple[dict, str]:
    """The scenario ``name``'s results, once its process ended with ``status`` and one error line."""
    r = result(jobs, name)
    assert r["proc"].returncode == status, r["proc"].output[-3000:]
    return r, one_error_line(r["proc"])


# ---- the scenarios (each runs in a worker thread, acting on its processes in real time) ------------
def reference_run(tmp: Path) -> Path:
    """The uninterrupted run every resumed run is compared with."""
    run = tmp / "reference"
    proc = cli("train.py", [*overrides(), f"hydra.run.dir={run}"], tmp / "logs")
    assert proc.returncode == 0, proc.output[-3000:]
    return run


def kill9_after_checkpoint(tmp: Path) -> dict:
    run = tmp / "kill9"
    last = run / "checkpoints" / "last.ckpt"
    proc = Proc("train.py", [*overrides(), f"hydra.run.dir={run}"], tmp / "logs")
    wait_for(last.exists, proc, "step-level last.ckpt")
    proc.popen.send_signal(signal.SIGKILL)
    proc.wait()
    state = load(last)
    had_metrics = (run / "metrics.json").exists()
    # the same overrides plus ckpt_path, no hydra.run.dir: continues in the same run directory
    resumed = cli("train.py", [*overrides(), f"ckpt_path={last}"], tmp / "logs")
    return dict(run=run, proc=proc, state=state, had_metrics=had_metrics, resumed=resumed)


def kill9_during_write(tmp: Path) -> dict:
    run = tmp / "fifo"
    ckpt_dir = run / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    proc = Proc("train.py", [*overrides(), f"hydra.run.dir={run}"], tmp / "logs")
    wait_for(last.exists, proc, "step-level last.ckpt")
    # The next write of last.ckpt goes to a temporary file named after the writer's pid: make that a
    # FIFO nobody reads, so the write blocks part-way, and kill -9 the writer right there.
    tmp_file = ckpt_dir / f".last.ckpt.{proc.pid}.tmp"
    os.mkfifo(tmp_file)
    before = load(last)["step"]
    reader = os.open(tmp_file, os.O_RDONLY | os.O_NONBLOCK)
    try:
        wait_for(lambda: bool(select.select([reader], [], [], 0)[0]), proc, "a checkpoint write in progress")
        time.sleep(0.2)
        blocked = proc.returncode is None  # still inside the write
        proc.popen.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        os.close(reader)
    after = load(last)["step"]
    resumed = cli("train.py", [*overrides(), f"ckpt_path={last}"], tmp / "logs")
    return dict(run=run, before=before, after=after, blocked=blocked, tmp_file=tmp_file, resumed=resumed)


def sigterm(tmp: Path) -> dict:
    # TensorBoard and the progress bar on here (off in the reference): neither may disturb the result
    run = tmp / "sigterm"
    last = run / "checkpoints" / "last.ckpt"
    proc = Proc("train.py", [*overrides("logger=tensorboard", "trainer.progress=true"), f"hydra.run.dir={run}"],
                tmp / "logs")
    wait_for(last.exists, proc, "step-level last.ckpt")
    proc.popen.send_signal(signal.SIGTERM)
    proc.wait()
    state = load(last) if last.exists() else None
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    match = re.fullmatch(r"error: stopped by SIGTERM after step (\d+) \(epoch \d+(?:, batch \d+ of \d+| complete)\); "
                         r"last\.ckpt written\. "
                         r"Resume with: (.+)", lines[-1]) if lines else None
    resumed = None
    if match:  # run the printed command, as printed
        command = shlex.split(match[2])
        if command[:2] == ["python", "train.py"]:
            resumed = cli("train.py", command[2:], tmp / "logs")
    return dict(run=run, last=last, proc=proc, lines=lines, match=match, state=state, resumed=resumed)


BLOWUP = ("optimizer=sgd", "optimizer.lr=1e30", "scheduler=constant", "trainer.checkpoint_every_n_steps=1")


def nonfinite(tmp: Path, policy: str) -> dict:
    # sgd with lr=1e30: step 1 is finite and throws the weights so far that every later loss is NaN
    run = tmp / f"nonfinite-{policy}"
    proc = cli("train.py", [*overrides(*BLOWUP, f"trainer.on_nonfinite={policy}"), f"hydra.run.dir={run}"], tmp / "logs")
    return dict(run=run, proc=proc)


def disk_full(tmp: Path) -> dict:
    run = tmp / "diskfull"
    last = run / "checkpoints" / "last.ckpt"
    proc = Proc("train.py", [*overrides(), f"hydra.run.dir={run}"], tmp / "logs")
    wait_for(last.exists, proc, "step-level last.ckpt")
    # the writer's next temporary file becomes /dev/full: every write to it fails with ENOSPC
    tmp_file = last.with_name(f".last.ckpt.{proc.pid}.tmp")
    tmp_file.symlink_to("/dev/full")
    proc.wait()
    return dict(run=run, last=last, proc=proc, tmp_file=tmp_file)


def folder_gone(tmp: Path) -> dict:
    run = tmp / "gone"
    ckpt_dir = run / "checkpoints"
    proc = Proc("train.py", [*overrides(), f"hydra.run.dir={run}"], tmp / "logs")
    wait_for((ckpt_dir / "last.ckpt").exists, proc, "step-level last.ckpt")
    moved = run / "checkpoints.moved"
    ckpt_dir.rename(moved)
    proc.wait()
    return dict(ckpt_dir=ckpt_dir, moved=moved, proc=proc)


class _RunsCode:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def evil_files(tmp: Path) -> dict:
    from interconnects.engine.checkpoint import FORMAT, VERSION

    marker = tmp / "pwned"
    evil = tmp / "evil.ckpt"
    torch.save({"format": FORMAT, "version": VERSION, "model": {}, "config": {}, "x": _RunsCode(marker)}, evil)
    # a clean pickle whose stored config asks evaluate.py to build an arbitrary class
    marker2 = tmp / "pwned-by-config"
    crafted = tmp / "crafted-config.ckpt"
    config = {"backbone": {"_target_": "subprocess.Popen", "args": ["touch", str(marker2)]},
              "data": {"name": "digits", "root": None}, "seed": 0}
    torch.save({"format": FORMAT, "version": VERSION, "model": {}, "config": config}, crafted)
    return dict(marker=marker, evil=evil, marker2=marker2, crafted=crafted)


NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}

# (id, script, overrides, what stderr must say, ours: one "error:" line from our code; False: Hydra's text)
# "{tmp}" is the folder of these cases, "{good}" a copy of the reference run's last.ckpt.
BAD_INPUTS = [
    ("unknown group option", "train.py", ["interconnect=nope"],
     ["Could not find 'interconnect/nope'", "Available options in 'interconnect'", "knn"], False),
    ("wrong type", "train.py", ["trainer.max_epochs=abc"],
     ["Value 'abc' of type 'str' could not be converted to Integer", "full_key: trainer.max_epochs"], False),
    ("unknown key", "train.py", ["trainer.max_epoch=3"], ["Could not override 'trainer.max_epoch'"], False),
    ("zero batch size", "train.py", ["data.batch_size=0"], ["data.batch_size=0", "≥ 1"], True),
    ("zero epochs", "train.py", ["trainer.max_epochs=0"], ["trainer.max_epochs=0", "≥ 1"], True),
    ("negative width", "train.py", ["backbone.width=-1"], ["backbone", "width=-1", "≥ 1"], True),
    ("too many keypoints", "train.py", ["interconnect=keypoints", "interconnect.num_keypoints=1000"],
     ["interconnect", "num_keypoints=1000", "7×7", "[1, 49]"], True),
    ("k not below the node count", "train.py", ["interconnect=knn", "interconnect.k=49"],
     ["interconnect", "k=49", "N=49", "[1, 48]"], True),
    ("unknown edge scheme", "train.py", ["interconnect.edges=bogus"],
     ["interconnect", "edges='bogus'", "inverse_distance"], True),
    ("dataset missing offline", "train.py", ["data=mnist", "data.root={tmp}/empty"],
     ["'mnist' is not under {tmp}/empty/MNIST/raw", "no network", "put train-images-idx3-ubyte.gz",
      "in {tmp}/empty/MNIST/raw"], True),
    ("ckpt_path missing", "train.py", ["ckpt_path={tmp}/nope.ckpt"], ["ckpt_path='{tmp}/nope.ckpt' does not exist"], True),
    ("ckpt_path foreign", "train.py", ["ckpt_path={tmp}/notes.txt"], ["{tmp}/notes.txt is not a checkpoint"], True),
    ("ckpt_path truncated", "train.py", ["ckpt_path={tmp}/half.ckpt"], ["{tmp}/half.ckpt is truncated or corrupt"], True),
    ("resume with another model", "train.py", ["gnn.hidden_channels=16", "ckpt_path={good}"],
     ["was written by another model", "gnn.hidden_channels=16 here but 8 in the checkpoint"], True),
    ("cuda without cuda", "train.py", ["trainer.device=cuda"], ["trainer.device='cuda'", "CUDA is not available", "auto or cpu"], True),
    ("evaluate without ckpt_path", "evaluate.py", [], ["ckpt_path is missing"], True),
    ("unknown pad mode", "train.py", ["data.crop_pad_mode=edge"], ["data.crop_pad_mode='edge'", "zeros, reflect"], True),
    ("reflect padding past the image", "train.py", ["data.crop_padding=28"],
     ["data.crop_padding=28", "crop_pad_mode=reflect", "28×28", "below 28"], True),
    ("negative lookahead", "train.py", ["trainer.lookahead_every=-1"], ["trainer.lookahead_every=-1", "≥ 0"], True),
    ("lookahead decay of 1", "train.py", ["trainer.lookahead_decay=1.0"], ["trainer.lookahead_decay=1.0", "[0, 1)"], True),
]


def bad_input(tmp: Path, case: int, reference) -> Proc:
    _, script, args, _, _ = BAD_INPUTS[case]
    good = tmp / "good.ckpt"
    if any("{good}" in a for a in args):
        good.write_bytes((reference.result() / "checkpoints" / "last.ckpt").read_bytes())
    args = [a.format(tmp=tmp, good=good) for a in args]
    base = overrides(*args) if script == "train.py" else args
    return cli(script, [*base, f"hydra.run.dir={tmp}/run{case}"], tmp / "logs", NO_NETWORK)


def unwritable(tmp: Path) -> dict:
    afile = tmp / "afile"
    afile.write_text("")
    proc = cli("train.py", [*overrides(), f"hydra.run.dir={afile}/run"], tmp / "logs")
    return dict(afile=afile, proc=proc)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Every scenario, started at once on ``WORKERS`` threads; ``jobs[name].result()`` waits for one."""
    tmp = tmp_path_factory.mktemp("reliability")
    bad = tmp / "bad"
    (bad / "empty").mkdir(parents=True)
    (bad / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"w": torch.zeros(100_000)}, bad / "whole.ckpt")
    (bad / "half.ckpt").write_bytes((bad / "whole.ckpt").read_bytes()[:200_000])
    files = evil_files(tmp)
    executor = ThreadPoolExecutor(WORKERS)
    out: dict = {"files": files, "bad_dir": bad, "tmp": tmp}
    seconds: dict[str, float] = {}

    def submit(name, fn, *args):
        def timed():
            start = time.monotonic()
            try:
                return fn(*args)
            finally:
                seconds[name] = time.monotonic() - start
        out[name] = executor.submit(timed)

    # the long chains first; the rest fill the gaps
    submit("reference", reference_run, tmp)
    submit("kill9", kill9_after_checkpoint, tmp)
    submit("fifo", kill9_during_write, tmp)
    submit("sigterm", sigterm, tmp)
    submit("disk_full", disk_full, tmp)
    submit("folder_gone", folder_gone, tmp)
    submit("stop", nonfinite, tmp, "stop")
    submit("skip", nonfinite, tmp, "skip")
    submit("evil_eval", cli, "evaluate.py", [f"ckpt_path={files['evil']}", f"hydra.run.dir={tmp}/evil-eval"], tmp / "logs")
    submit("evil_train", cli, "train.py", [*overrides(f"ckpt_path={files['evil']}"), f"hydra.run.dir={tmp}/evil-train"],
           tmp / "logs")
    submit("evil_config", cli, "evaluate.py", [f"ckpt_path={files['crafted']}", f"hydra.run.dir={tmp}/evil-config"],
           tmp / "logs")
    submit("unwritable", unwritable, tmp)
    for case in range(len(BAD_INPUTS)):
        submit(f"bad{case}", bad_input, bad, case, out["reference"])
    yield out
    executor.shutdown(wait=False, cancel_futures=True)
    print("\nseconds per job (side by side on", WORKERS, "workers):")
    for name, value in seconds.items():
        print(f"  {value:6.1f}  {name}")
    for popen in _LIVE:
        if popen.poll() is None:
            popen.kill()


def result(jobs, name):
    return jobs[name].result(timeout=2 * TIMEOUT)


# ---- 1. crash safety and exact mid-epoch resume ----------------------------------------------------
def test_kill9_after_a_step_checkpoint_then_resume_equals_uninterrupted_run(jobs):
    r = result(jobs, "kill9")
    state = r["state"]
    assert state["epoch"] == 0 and 0 < state["batch_in_epoch"] < PER_EPOCH  # written mid-epoch
    assert state["lookahead"]["every"] == 3 and len(state["lookahead"]["slow"]) > 0
    assert not r["had_metrics"]
    assert r["resumed"].returncode == 0, r["resumed"].output[-3000:]
    assert f"after step {state['step']} (epoch 1, batch {state['batch_in_epoch']} of {PER_EPOCH})" in r["resumed"].output
    assert_same_run(result(jobs, "reference"), r["run"])


def test_kill9_in_the_middle_of_a_checkpoint_write_keeps_last_ckpt_loadable(jobs):
    r = result(jobs, "fifo")
    assert r["blocked"]  # the process was killed inside the write
    assert r["after"] == r["before"]  # the file on disk is the last complete one, and it loads
    assert r["resumed"].returncode == 0, r["resumed"].output[-3000:]
    assert not r["tmp_file"].exists()  # the killed writer's leftover is removed on resume
    assert_same_run(result(jobs, "reference"), r["run"])


# ---- 2. SIGTERM ----------------------------------------------------------------------------------
def test_sigterm_finishes_the_step_writes_last_ckpt_and_prints_the_resume_command(jobs):
    r = result(jobs, "sigterm")
    proc = r["proc"]
    assert proc.returncode == 128 + signal.SIGTERM, proc.output[-3000:]
    assert len(r["lines"]) == 1 and "Traceback" not in proc.output, proc.stderr[-3000:]
    assert r["match"], r["lines"]
    assert r["state"]["step"] == int(r["match"][1])
    assert f"ckpt_path={r['last']}" in shlex.split(r["match"][2])
    assert r["resumed"] is not None and r["resumed"].returncode == 0, r["resumed"] and r["resumed"].output[-3000:]
    assert list((r["run"] / "tensorboard").glob("events.out.tfevents.*"))
    assert_same_run(result(jobs, "reference"), r["run"])


# ---- 4. non-finite loss ---------------------------------------------------------------------------
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(jobs):
    r, line = stopped(jobs, "stop", 3)
    run = r["run"]
    match = re.search(r"loss is nan at step (\d+) \(epoch 1, batch (\d+) of 6\); stopped \(trainer.on_nonfinite=stop\), "
                      r"last good checkpoint \S+last.ckpt \(step (\d+)\) kept", line)
    assert match and match[1] == match[2], line
    state = load(run / "checkpoints" / "last.ckpt")  # the last good checkpoint, intact
    assert state["step"] == int(match[1]) - 1 == int(match[3]) and finite(state)
    assert not (run / "metrics.json").exists() and not (run / "checkpoints" / "best.ckpt").exists()


def test_nonfinite_loss_skip_drops_the_step_and_finishes(jobs):
    r = result(jobs, "skip")
    proc, run = r["proc"], r["run"]
    assert proc.returncode == 0, proc.output[-3000:]
    assert re.search(r"loss is nan at step \d+ \(epoch \d, batch \d of 6\); step skipped", proc.output)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["train/loss_epoch"] == metrics["train/loss_epoch"]  # not NaN
    assert finite(load(run / "checkpoints" / "last.ckpt"))  # BatchNorm statistics included


# ---- 3. safe loading -------------------------------------------------------------------------------
def test_a_checkpoint_that_runs_code_is_refused_everywhere(jobs):
    from interconnects.engine.checkpoint import CheckpointError

    files = jobs["files"]
    for name in ("evil_eval", "evil_train"):
        proc = result(jobs, name)
        assert proc.returncode == 2, proc.output[-3000:]
        assert one_error_line(proc).startswith(f"error: refusing to load {files['evil']}: it holds Python objects")
    with pytest.raises(CheckpointError, match="refusing to load") as info:
        load(files["evil"])
    assert "\n" not in str(info.value)
    proc = result(jobs, "evil_config")
    assert proc.returncode == 2, proc.output[-3000:]
    assert "refusing to build backbone._target_='subprocess.Popen'" in one_error_line(proc)
    time.sleep(0.2)
    assert not files["marker"].exists() and not files["marker2"].exists()
    assert not (jobs["tmp"] / "evil-train" / "checkpoints").exists()
    # control: the file really does run code when loaded without the allow-list
    torch.load(files["evil"], weights_only=False)
    assert files["marker"].exists()


def test_load_checkpoint_refuses_missing_foreign_and_truncated_files(jobs, tmp_path):
    import numpy as np

    from interconnects.engine.checkpoint import CheckpointError, load_checkpoint, save_atomic

    good = result(jobs, "reference") / "checkpoints" / "last.ckpt"
    data = good.read_bytes()
    cases = {
        "missing": (tmp_path / "nope.ckpt", "does not exist"),
        "text": (tmp_path / "notes.txt", "not a checkpoint"),
        "empty": (tmp_path / "empty.ckpt", "empty"),
        "truncated": (tmp_path / "half.ckpt", "truncated or corrupt"),
        "plain state_dict": (tmp_path / "weights.pt", "not an interconnects checkpoint"),
        "numpy array inside": (tmp_path / "numpy.ckpt", "refusing to load"),
        "unexpected entry": (tmp_path / "extra.ckpt", "unexpected entries"),
    }
    cases["text"][0].write_text("hello\n")
    cases["empty"][0].write_bytes(b"")
    cases["truncated"][0].write_bytes(data[: len(data) // 2])
    torch.save({"w": torch.zeros(2)}, cases["plain state_dict"][0])
    save_atomic({**load(good), "model": {"w": np.zeros(2)}}, cases["numpy array inside"][0])
    save_atomic({**load(good), "extra": 1}, cases["unexpected entry"][0])
    for name, (path, message) in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(path)
        assert "\n" not in str(info.value), name
    assert load_checkpoint(good)["step"] == 2 * PER_EPOCH


# ---- 6. failed writes ------------------------------------------------------------------------------
def test_disk_full_stops_with_a_clear_line_and_keeps_last_ckpt(jobs):
    r, line = stopped(jobs, "disk_full", 4)
    last = r["last"]
    match = re.fullmatch(rf"error: cannot write {re.escape(str(last))} at step (\d+): No space left on device; "
                         r"the previous last\.ckpt was left as it was\. Fix that, then resume with: python train\.py .+", line)
    assert match, line
    assert load(last)["step"] < int(match[1])
    assert not r["tmp_file"].is_symlink() and not r["tmp_file"].exists()
    assert not (r["run"] / "metrics.json").exists()


def test_checkpoint_folder_removed_mid_run_stops_with_a_clear_line(jobs):
    r, line = stopped(jobs, "folder_gone", 4)
    ckpt_dir = r["ckpt_dir"]
    assert f"cannot write {ckpt_dir / 'last.ckpt'}" in line and "was removed or renamed during the run" in line, line
    assert not ckpt_dir.exists()  # not silently made again
    assert load(r["moved"] / "last.ckpt")["step"] >= 2


# ---- 5. bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_before_any_work_with_one_clear_line(jobs, case):
    if BAD_INPUTS[case][0] == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc, tmp = result(jobs, f"bad{case}"), jobs["bad_dir"]
    name, _, _, expected, ours = BAD_INPUTS[case]
    assert proc.returncode not in (0, None), proc.output[-3000:]
    assert "Traceback" not in proc.output, proc.output[-3000:]
    for text in expected:
        assert text.format(tmp=tmp) in proc.stderr, (text, proc.stderr[-3000:])
    if ours:
        assert proc.returncode == 2
        one_error_line(proc)
    # nothing beyond what Hydra itself writes before our code runs
    run = tmp / f"run{case}"
    assert not run.exists() or {p.name for p in run.iterdir()} <= {".hydra", "train.log", "evaluate.log"}
    if name == "dataset missing offline":
        assert not any((tmp / "empty").iterdir())  # no partial download either


def test_unwritable_output_directory_fails_before_any_work(jobs):
    """The run directory is checked before Hydra makes it: one line, no traceback."""
    r = result(jobs, "unwritable")
    proc, afile = r["proc"], r["afile"]
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: output directory {afile}/run is not writable (Not a directory); "
                                   "set hydra.run.dir=DIR")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert afile.read_text() == ""
