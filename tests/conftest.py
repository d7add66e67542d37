"""Shared helpers: compose the project's Hydra configs, run the command-line tools in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# Real MNIST digits for development and CI (4,000 train / 1,000 test IDX files in MNIST/raw/), next to
# the repository; read with data=mnist data.root=../shared/datasets/mnist-sample.
MNIST_SAMPLE = ROOT.parent / "shared" / "datasets" / "mnist-sample"

# The data of the command-line tests: scikit-learn's embedded digits load in a blink, offline.
DATA = ["data=digits"]

# A tiny model and a few batches: enough to exercise every stage in seconds.
TINY = [
    *DATA,
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


#: Wall-clock limits in the tests guard against a hung process; they are not speed checks. A CLI run
#: that takes 30 s on an idle 2-core CPU was measured at 3-5 min while other training shared the
#: machine (load average 10; the pixel-attention run of test_run_checks: past 300 s), so each limit
#: is what a run takes alone times ``HANG_MARGIN`` (``IC_TEST_HANG_MARGIN=N`` changes it).
HANG_MARGIN = float(os.environ.get("IC_TEST_HANG_MARGIN", "10"))


def hang_limit(seconds: float) -> float:
    """The wall-clock limit of a wait that takes about ``seconds`` on an idle machine."""
    return seconds * HANG_MARGIN


def run_cli(script: str, *overrides: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python script overrides...`` from the repository root; returns the finished process.
    ``timeout``: about what the run takes alone at most; it is killed after :func:`hang_limit` of it."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=hang_limit(timeout), env=full_env,
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tensors of unit tests are tiny: one intra-op thread is fastest and does not stall on a busy
    machine. A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli():
    return run_cli


def mnist_sample_root() -> Path:
    """The MNIST sample folder; fails (never skips) the calling test, saying where to put it, when absent."""
    raw = MNIST_SAMPLE / "MNIST" / "raw"
    if not any(raw.glob("*-ubyte*")):
        pytest.fail(f"the MNIST sample is missing: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                    f"t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in {raw}", pytrace=False)
    return MNIST_SAMPLE


@pytest.fixture
def mnist_sample() -> Path:
    """The MNIST sample folder, for ``data=mnist data.root=...`` (see :func:`mnist_sample_root`)."""
    return mnist_sample_root()


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 6, size=(12, 10), mode: str = "L",
                      splits=("train", "test"), sizes=None) -> Path:
    """Write a small image folder ``root/<split>/<class>/<i>.png`` for ``data=image_folder``: images
    of ``size = (H, W)`` in PIL ``mode`` (``L`` or ``RGB``) whose brightness depends on the class (so a model can learn
    it); ``sizes`` optionally gives per-image sizes cycled over. Returns ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    channels = {"L": 1, "RGB": 3}[mode]
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = sizes[i % len(sizes)] if sizes else size
                level = 40 + 170 * c / max(1, len(classes) - 1)
                pixels = np.clip(rng.normal(level, 20, (h, w, channels)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(folder / f"{i:05d}.png")
    return root
