"""A new user's afternoon through the command line: what a resume, a reused run directory, a typo,
the speed projection, evaluate.py, the pictures and the table-printing scripts must do."""

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
