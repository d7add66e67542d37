"""DistributedDataParallel under torchrun, on the CPU with gloo and 2 processes: the same weights as
one process on the same global batch, one run directory written by rank 0, resume, evaluate.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, run_cli

# batch norm off: each rank would otherwise normalise with its own half-batch statistics
# (trainer.sync_batchnorm=true fixes that on CUDA)
NO_BN = ["backbone.batch_norm=false", "gnn.norm=null", "+decoder.batch_norm=false"]
COMMON = ["trainer.device=cpu", "debug=default", *TINY, *NO_BN, "trainer.limit_train_batches=3",
          "trainer.deterministic=true", "scheduler=constant"]


def torchrun(*overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(ROOT / "train.py"), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def weights(path) -> dict:
    return torch.load(path, weights_only=False)["model"]


def test_two_processes_match_one_resume_and_write_one_run_directory(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    proc = torchrun(*COMMON, "trainer.max_epochs=1", f"hydra.run.dir={ddp}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone wrote the record, the checkpoints and the metrics, all in one directory
    assert sorted(p.name for p in ddp.rglob("metrics.json")) == ["metrics.json"]
    assert (ddp / "checkpoints" / "best.ckpt").is_file() and (ddp / ".hydra" / "config.yaml").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # no directory per rank

    # resume the distributed run for a second epoch, in place
    proc = torchrun(*COMMON, "trainer.max_epochs=2", f"ckpt_path={ddp / 'checkpoints' / 'last.ckpt'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((ddp / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["steps"] == 6

    # one process on the same global batches ends with the same weights
    proc = run_cli("train.py", *COMMON, "trainer.max_epochs=2", f"hydra.run.dir={single}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(ddp / "checkpoints" / "last.ckpt"), weights(single / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # evaluation sums reduced over the ranks: the test metrics are those of the single process
    reference = json.loads((single / "metrics.json").read_text())
    assert metrics["test/acc"] == pytest.approx(reference["test/acc"], abs=1e-6)
    assert metrics["val/loss"] == pytest.approx(reference["val/loss"], rel=1e-5)

    # evaluate.py reads the distributed run's best.ckpt
    proc = run_cli("evaluate.py", f"ckpt_path={ddp / 'checkpoints' / 'best.ckpt'}", "limit_batches=2",
                   f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/acc"] == pytest.approx(
        metrics["test/acc"], abs=1e-6)


def test_every_rank_names_the_same_run_directory(monkeypatch):
    from interconnects.config import _unique_suffix

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "b1f0c2")
    names = set()
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        names.add(_unique_suffix())
    assert len(names) == 1 and names.pop().endswith("_torchrun_b1f0c2")


def test_sync_batchnorm_on_the_cpu_is_refused_before_any_work(monkeypatch):
    from interconnects.engine import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"^trainer.sync_batchnorm=true needs CUDA"):
        distributed.init("cpu", sync_bn=True)
    assert not distributed.is_distributed()
