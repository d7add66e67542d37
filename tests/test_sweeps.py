"""Sweeps: failure-tolerant multirun, parallel jobs (joblib), SLURM (submitit, tested with its local
executor), the Optuna search and the sweep summary. Each sweep runs in a subprocess, as a user runs it."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONFIGS, ROOT, TINY, hang_limit, run_cli

FAST = ["debug=default", *TINY, "trainer.limit_train_batches=2"]


def job_record(job_dir: Path) -> dict:
    return json.loads((job_dir / "job.json").read_text())


def summary(sweep: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize_sweep.py"), str(sweep), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=hang_limit(15))


@pytest.fixture(scope="module")
def keypoint_sweep(tmp_path_factory):
    """A keypoints sweep run in parallel by joblib: 2 of its 4 jobs ask for more keypoints than cells."""
    sweep = tmp_path_factory.mktemp("kp") / "sweep"
    proc = run_cli("train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *FAST, "logger=tensorboard",
                   "interconnect=keypoints", "interconnect.num_keypoints=16,1000", "seed=0,1",
                   f"hydra.sweep.dir={sweep}")
    return proc, sweep


def test_failed_jobs_fail_alone_and_the_sweep_exits_non_zero(keypoint_sweep):
    proc, sweep = keypoint_sweep
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = "interconnect.num_keypoints=1000 is out of range for a 7×7 feature map"
    for num in range(4):
        job, record = sweep / str(num), job_record(sweep / str(num))
        assert (job / ".hydra" / "config.yaml").is_file() and (job / ".hydra" / "overrides.yaml").is_file()
        assert record["wall_time_s"] > 0 and record["job_num"] == num
        if "interconnect.num_keypoints=1000" in record["overrides"]:
            assert record["status"] == "failed" and record["exit_code"] == 2 and record["error"].startswith(error)
            assert (job / "error.txt").read_text().startswith(error)
            assert not (job / "metrics.json").exists()
        else:
            assert record["status"] == "ok" and record["exit_code"] == 0 and not (job / "error.txt").exists()
            assert "test/acc" in json.loads((job / "metrics.json").read_text())
            assert (job / "checkpoints" / "best.ckpt").is_file() and (job / "checkpoints" / "last.ckpt").is_file()
            assert any((job / "tensorboard").glob("events.out.tfevents.*"))
    # each failure reported with its overrides and its one-line error, then the count at the end
    failures = [line for line in proc.stderr.splitlines() if line.startswith("error: job ")]
    assert len(failures) == 2 and all("interconnect.num_keypoints=1000" in f and error in f for f in failures)
    assert "2 of 4 job(s) finished, 2 failed" in proc.stderr


def test_parallel_jobs_split_the_cores(keypoint_sweep):
    _, sweep = keypoint_sweep
    records = [job_record(sweep / str(n)) for n in range(4)]
    cores = os.cpu_count() or 1
    assert {r["torch_threads"] for r in records} == {max(1, cores // min(2, cores))}
    assert len({r["pid"] for r in records}) >= 2  # joblib's worker processes, not the launching one


def test_summary_lists_every_job_best_first_with_seed_means_and_errors(keypoint_sweep):
    _, sweep = keypoint_sweep
    proc = summary(sweep)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| job")
            and not line.startswith("| ---")]
    assert len(rows) == 4
    assert all("num_keypoints=16" in r and "± " in r and "(n=2)" in r for r in rows[:2])
    assert all("num_keypoints=1000" in r and "failed (2)" in r and "out of range" in r for r in rows[2:])
    table = list(csv.DictReader(io.StringIO(summary(sweep, "--csv").stdout)))
    assert len(table) == 4
    ok = [r for r in table if r["status"] == "ok"]
    values = [float(r["val/acc"]) for r in ok]
    mean = float(ok[0]["val/acc over seeds mean"])
    assert abs(mean - sum(values) / 2) < 1e-9 and all(float(r["wall time (s)"]) > 0 for r in table)


def test_tensorboard_hparams_tab_shows_the_sweep(keypoint_sweep):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    _, sweep = keypoint_sweep
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(sweep))
    mux.Reload()
    sessions = {run: metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG])
                for run, tags in mux.PluginRunToTagToContent(metadata.PLUGIN_NAME).items()
                if metadata.SESSION_START_INFO_TAG in tags}
    seeds = sorted(int(s.hparams["seed"].number_value) for s in sessions.values())
    assert seeds == [0, 1]
    assert {s.hparams["interconnect.num_keypoints"].number_value for s in sessions.values()} == {16}


def test_nonfinite_loss_fails_its_job_alone(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("train.py", "-m", *FAST, "optimizer=sgd", "scheduler=constant", "optimizer.lr=0.01,1e30",
                   "trainer.limit_train_batches=3", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    good, bad = job_record(sweep / "0"), job_record(sweep / "1")
    assert good["status"] == "ok" and (sweep / "0" / "metrics.json").is_file()
    assert bad["status"] == "failed" and bad["exit_code"] == 3 and "loss is nan" in bad["error"]
    assert "optimizer.lr=1e+30" in proc.stderr and "1 of 2 job(s) finished, 1 failed" in proc.stderr


def test_sweep_job_takes_device_i_mod_n_with_several_gpus(monkeypatch):
    import torch
    from omegaconf import OmegaConf

    from interconnects.engine.jobs import SweepJob

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    threads = torch.get_num_threads()
    try:
        devices = []
        for num in range(5):
            cfg = OmegaConf.create({"trainer": {"device": "auto"}})
            launcher = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 5}
            SweepJob(None, True, num, [], launcher).share_machine(cfg)
            devices.append(cfg.trainer.device)
        assert devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1"]
        cfg = OmegaConf.create({"trainer": {"device": "cpu"}})  # an explicit device is left alone
        SweepJob(None, True, 1, [], launcher).share_machine(cfg)
        assert cfg.trainer.device == "cpu"
    finally:
        torch.set_num_threads(threads)


def test_slurm_launcher_options_make_the_sbatch_script():
    from hydra import compose, initialize_config_dir
    from submitit.slurm.slurm import _make_sbatch_string

    from interconnects.config import register

    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                          "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=90"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    script = _make_sbatch_string(
        command="python -u -m submitit.core._submit", folder="/tmp/x", job_name="train", partition=launcher.partition,
        gpus_per_node=launcher.gpus_per_node, cpus_per_task=launcher.cpus_per_task, mem=f"{launcher.mem_gb}GB",
        time=launcher.timeout_min, array_parallelism=launcher.array_parallelism, map_count=100,
        signal_delay_s=launcher.signal_delay_s, additional_parameters=dict(launcher.additional_parameters))
    for line in ("--partition=gpu", "--gpus-per-node=4", "--time=90", "--cpus-per-task=8", "--mem=32GB",
                 "--array=0-99%64", "--requeue", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script + "\n", line


def test_submitit_requeued_job_resumes_from_its_own_last_ckpt(tmp_path):
    """The preemption signal (USR2) reaches the job: it saves last.ckpt, submitit requeues it, and
    the restarted job continues from that checkpoint in its own directory."""
    sweep = tmp_path / "sweep"
    job = sweep / "0"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", *TINY, "logger=none",
         "trainer.max_epochs=1", "trainer.limit_train_batches=30", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.checkpoint_every_n_steps=2", "scheduler=constant",
         f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + hang_limit(60)
        while not (job / "checkpoints" / "last.ckpt").is_file():
            assert time.monotonic() < deadline and proc.poll() is None, "the job never wrote last.ckpt"
            time.sleep(0.2)
        os.kill(job_record(job)["pid"], signal.SIGUSR2)  # what SLURM sends before preemption / the time limit
        output, _ = proc.communicate(timeout=hang_limit(60))
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    record = job_record(job)
    assert record["status"] == "ok" and record["launches"] == 2
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in logs and f"job 0 resumes from its own {job / 'checkpoints' / 'last.ckpt'}" in logs
    assert "resumed from" in logs
    assert json.loads((job / "metrics.json").read_text())["steps"] == 30


def test_optuna_search_keeps_its_study_in_the_sweep_dir_and_resumes(tmp_path):
    import optuna
    from optuna.trial import TrialState

    sweep = tmp_path / "search"
    common = ["-m", "hparams_search=mnist_optuna", *FAST,
              f"hydra.sweep.dir={sweep}"]
    proc = run_cli("train.py", *common, "hydra.sweeper.n_trials=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    study = optuna.load_study(study_name="mnist_optuna", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    assert study.trials[0].value == json.loads((sweep / "0" / "metrics.json").read_text())["val/acc"]

    # a search killed while trial 1 ran (and that trial asks for an impossible model: k = 1000
    # neighbours among 16 keypoints; an integer parameter keeps its kind, so Optuna accepts the range)
    space = {"interconnect.k": optuna.distributions.IntDistribution(1000, 1000)}
    assert study.ask(space).number == 1
    proc = run_cli("train.py", *common, "hydra.sweeper.n_trials=3")
    assert proc.returncode == 1, proc.stderr[-3000:]  # one trial failed: the search went on, then said so
    study = optuna.load_study(study_name="mnist_optuna", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "interconnect.k=1000" in job_record(sweep / "1")["overrides"]
    assert job_record(sweep / "2")["status"] == "ok" and (sweep / "optimization_results.yaml").is_file()
    assert {"optimizer.lr", "gnn", "interconnect.k"} <= set(study.trials[2].params)
