"""Shared helpers: compose the project's Hydra configs, run the command-line tools in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# A tiny model and a few batches: enough to exercise every stage in seconds.
TINY = [
    "backbone.width=8",
    "gnn.hidden_channels=8",
    "decoder.channels=8",
    "data.batch_size=32",
    "trainer.progress=false",
]


def compose(overrides: list[str] | None = None, config_name: str = "train"):
    """The composed config for ``config_name`` with ``overrides``, as the command line would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from interconnects.config import register

    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides or [])


def run_cli(script: str, *overrides: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python script overrides...`` from the repository root; returns the finished process."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env,
    )


@pytest.fixture
def cli():
    return run_cli
