"""Reconstruction and the graph GAN: their networks, their steps, their metrics, and short runs
through ``train.py`` / ``evaluate.py`` on the MNIST sample.

* the networks have the documented shapes; the discriminator treats every image of a batch on its
  own (a batched kNN graph, no batch norm) and spectral norm is a switch;
* a reconstruction step lowers the loss; PSNR is averaged per image over a split, exactly;
* the GAN's EMA is checkpointed but in no optimizer; the FID classifier is trained once per dataset
  and read back from the cache;
* a short run of each task with each interconnect (the GAN with each latent edge scheme, and its
  conv reference);
  ``evaluate.py`` writes the task's pictures as PNG files;
* a GAN killed with ``kill -9`` and resumed ends with the same weights as an uninterrupted run;
* bad task options fail before any work with one line and exit status 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from interconnects.models.generative import GraphDiscriminator, GraphGenerator, Reconstructor
from interconnects.tasks import fid as fid_module
from interconnects.tasks.gan import GANTask, discriminator_loss, generator_loss
from interconnects.tasks.reconstruct import ReconstructionTask, check_decoder

ROOT = Path(__file__).resolve().parents[1]
MNIST = "../shared/datasets/mnist-sample"
TIMEOUT = 600
TINY = [
    f"data.root={MNIST}", "data.batch_size=32", "data.eval_batch_size=100",
    "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1", "trainer.progress=false", "logger=none",
]
TINY_RECONSTRUCT = ["task=reconstruct", "backbone.width=8", "gnn.hidden_channels=8", "decoder.channels=8",
                    "task.channels=8"]
TINY_GAN = ["task=gan", "task.generator.channels=8", "task.discriminator.channels=8",
            "task.discriminator.hidden=8", "task.num_samples=64", "task.kid_subset_size=32", "task.sample_grid=4"]


def forward(module, *args, **kwargs):
    return module(*args, **kwargs)


def make_optimize(task, lr: float = 1e-3):
    """A stand-in for the engine's ``optimize``: clear every gradient, backward, step one group."""
    optimizers = {g: torch.optim.Adam(p, lr=lr) for g, p in task.optimizer_groups().items()}

    def optimize(group, loss):
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizers[group].step()

    return optimize, optimizers


def hybrid_cfg(interconnect: dict | None, **decoder):
    return OmegaConf.create({
        "backbone": {"_target_": "interconnects.models.backbones.SimpleCNN", "width": 8, "depth": 2, "output_stride": 4},
        "interconnect": interconnect or {"_target_": None},
        "gnn": {"_target_": "interconnects.models.gnn.GNNHead", "hidden_channels": 8},
        "decoder": {"_target_": "interconnects.models.decoders.ScatterDecoder", "channels": 8, "fuse": "none",
                    "empty": "zero", **decoder},
        "task": {"_target_": "interconnects.tasks.reconstruct.ReconstructionTask", "channels": 8},
        "data": {"name": "mnist_sample", "root": None},
    })


class Info:
    in_channels, image_size, num_classes = 1, (28, 28), 10
    mean, std = (0.1307,), (0.3081,)


# ---- networks -------------------------------------------------------------------------------------
def test_generator_images_in_range_for_both_edge_schemes():
    torch.manual_seed(0)
    for edges in ("grid", "knn"):
        gen = GraphGenerator(1, (28, 28), latent_dim=4, channels=8, edges=edges, k=4)
        images = gen(gen.noise(3))
        assert gen.grid == (7, 7) and images.shape == (3, 1, 28, 28)
        assert images.abs().max() <= 1
        images.mean().backward()
        assert gen.embed.grad is not None and gen.lift.weight.grad.abs().sum() > 0


def test_discriminator_scores_each_image_on_its_own():
    torch.manual_seed(0)
    disc = GraphDiscriminator(1, (28, 28), channels=8, k=4, hidden=8).eval()
    images = torch.rand(5, 1, 28, 28) * 2 - 1
    batched = disc(images)
    alone = torch.cat([disc(images[i : i + 1]) for i in range(5)])
    assert batched.shape == (5,)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    with_sn = sum("parametrizations" in name for name, _ in disc.named_parameters())
    plain = GraphDiscriminator(1, (28, 28), channels=8, k=4, hidden=8, spectral_norm=False)
    assert with_sn > 0 and not any("parametrizations" in name for name, _ in plain.named_parameters())


def test_reconstructor_reaches_the_image_size():
    assert Reconstructor(8, 1, (7, 7), (28, 28), 8)(torch.zeros(2, 8, 7, 7)).shape == (2, 1, 28, 28)
    assert Reconstructor(8, 3, (5, 5), (32, 32), 8)(torch.zeros(2, 8, 5, 5)).shape == (2, 3, 32, 32)


def test_gan_losses_prefer_real_over_fake():
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    for kind in ("hinge", "nonsaturating", "lsgan"):
        assert discriminator_loss(kind, real, fake) < discriminator_loss(kind, fake, real)
        assert generator_loss(kind, real) < generator_loss(kind, fake)


# ---- reconstruction -------------------------------------------------------------------------------
@pytest.mark.parametrize("interconnect", [
    {"_target_": "interconnects.DenseGrid"},
    {"_target_": "interconnects.Keypoints", "num_keypoints": 8},
    {"_target_": "interconnects.KNNGraph", "k": 4},
])
def test_reconstruction_steps_lower_the_loss(interconnect):
    torch.manual_seed(0)
    task = ReconstructionTask.from_config(hybrid_cfg(interconnect), Info)
    optimize, _ = make_optimize(task, lr=3e-3)
    images = (torch.rand(8, 1, 28, 28) - 0.1307) / 0.3081
    losses = [float(task.training_step((images, None), forward, optimize)["loss"]) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0]
    picture = task.pictures((images, None), forward)["reconstructions"]
    assert picture.shape[0] == 3 and picture.min() >= 0 and picture.max() <= 1


def test_psnr_is_the_mean_over_images_and_the_baseline_is_the_mean_image():
    torch.manual_seed(0)
    task = ReconstructionTask.from_config(hybrid_cfg(None), Info).eval()

    class Data:
        class train_view:
            images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)

    task.setup(Data)
    batches = [((torch.rand(n, 1, 28, 28) - 0.1307) / 0.3081, None) for n in (3, 5)]
    sums = {}
    for batch in batches:
        for key, value in task.evaluation_step(batch, forward).items():
            sums[key] = sums.get(key, 0) + value
    metrics = task.summarize(sums, "val")
    per_image = []
    for images, _ in batches:
        with torch.no_grad():
            recon = task.reconstruct(images, forward).clamp(0, 1)
        target = task.to_pixels(images)
        per_image += [float(-10 * torch.log10((r - t).pow(2).mean())) for r, t in zip(recon, target)]
    assert metrics["psnr"] == pytest.approx(sum(per_image) / len(per_image), rel=1e-4)
    mean_image = Data.train_view.images.float().mean(0) / 255
    baseline = [float(-10 * torch.log10((mean_image - task.to_pixels(i)).pow(2).mean())) for b, _ in batches for i in b]
    assert metrics["baseline_psnr"] == pytest.approx(sum(baseline) / len(baseline), rel=1e-4)
    assert set(metrics) == {"loss", "psnr", "ssim", "baseline_psnr"} and 0 < metrics["ssim"] < 1


def test_reconstruction_refuses_a_decoder_that_bypasses_the_graph():
    graph = OmegaConf.create({"_target_": "interconnects.DenseGrid"})
    with pytest.raises(ValueError, match=r"^decoder.fuse='add' would let the backbone's map bypass the graph"):
        check_decoder(OmegaConf.create({"fuse": "add"}), graph)
    with pytest.raises(ValueError, match=r"^decoder.empty='skip'"):
        check_decoder(OmegaConf.create({"fuse": "none", "empty": "skip"}), graph)
    check_decoder(OmegaConf.create({"fuse": "add"}), OmegaConf.create({"_target_": None}))  # no graph: a CNN
    with pytest.raises(ValueError, match=r"^task.loss='huber' is not supported; choose one of 'mse', 'l1'$"):
        ReconstructionTask.from_config(OmegaConf.merge(hybrid_cfg(None), {"task": {"loss": "huber"}}), Info)


# ---- the GAN --------------------------------------------------------------------------------------
def tiny_gan(**options) -> GANTask:
    return GANTask(1, (28, 28), (0.1307,), (0.3081,), 10, generator={"channels": 8, "latent_dim": 4},
                   discriminator={"channels": 8, "hidden": 8}, num_samples=16, kid_subset_size=8,
                   sample_grid=4, **options)


def test_gan_step_trains_both_networks_and_keeps_the_ema_out_of_the_optimizers():
    torch.manual_seed(0)
    task = tiny_gan(r1_weight=1.0, ema_decay=0.5)
    groups = task.optimizer_groups()
    assert set(groups) == {"generator", "discriminator"}
    ema_ids = {id(p) for p in task.generator_ema.parameters()}
    assert not ema_ids & {id(p) for ps in groups.values() for p in ps}
    assert any(k.startswith("generator_ema.") for k in task.state_dict()) and "fixed_noise" in task.state_dict()
    optimize, _ = make_optimize(task)
    before_g = [p.clone() for p in task.generator.parameters()]
    before_ema = [p.clone() for p in task.generator_ema.parameters()]
    images = (torch.rand(6, 1, 28, 28) - 0.1307) / 0.3081
    metrics = task.training_step((images, torch.zeros(6)), forward, optimize)
    assert set(metrics) == {"d_loss", "g_loss", "r1"} and all(torch.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(before_g, task.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_ema, task.generator_ema.parameters()))
    assert task.pictures(None, forward)["samples"].shape == (3, 2 * 28 + 6, 2 * 28 + 6)


def test_gan_options_fail_with_one_line():
    with pytest.raises(ValueError, match=r"^task.r1_weight=-1.0 is out of range; it must be a number ≥ 0"):
        tiny_gan(r1_weight=-1.0)
    with pytest.raises(ValueError, match=r"^task.loss='wasserstein' is not supported; choose one of 'hinge', "):
        tiny_gan(loss="wasserstein")
    with pytest.raises(ValueError, match=r"^task.ema_decay=1.0 is out of range"):
        tiny_gan(ema_decay=1.0)
    with pytest.raises(ValueError, match=r"^task.generator.edges='ring' is not supported"):
        GANTask(1, (28, 28), (0.1,), (0.3,), 10, generator={"edges": "ring"})
    with pytest.raises(ValueError, match=r"^task.fid_features='inception' needs the torch-fidelity package"):
        if fid_module.importlib.util.find_spec("torch_fidelity") is not None:
            pytest.skip("torch-fidelity is installed here")
        tiny_gan(fid_features="inception")


def test_fid_classifier_is_trained_once_per_dataset_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(fid_module, "CLASSIFIER_EPOCHS", 1)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    first, path = fid_module.load_or_train_classifier("mnist_sample", None, images, labels, 10)
    assert path.parent == tmp_path / "interconnects" / "fid" and path.name.startswith("mnist_sample-64-")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    again, same = fid_module.load_or_train_classifier("mnist_sample", None, images, labels, 10)
    assert same == path
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    _, other = fid_module.load_or_train_classifier("mnist_sample", None, images.flip(0), labels.flip(0), 10)
    assert other != path
    fid, kid = fid_module.build_metrics(fid_module.ClassifierFeatures(first), 16)
    pixels = images.float() / 255
    fid.update(pixels[:32], real=True)
    fid.update(pixels[32:], real=False)
    close = float(fid.compute())
    fid.reset()
    fid.update(pixels[:32], real=True)
    fid.update(torch.rand(32, 1, 28, 28), real=False)
    assert 0 <= close < float(fid.compute())


# ---- through the command line ----------------------------------------------------------------------
def run_cli(script: str, args: list[str], env: dict, **popen) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **env}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One FID cache for the module's runs: the first GAN run trains the classifier, the rest read it."""
    return {"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}


RUNS = {
    "reconstruct-grid": [*TINY_RECONSTRUCT, "interconnect=grid"],
    "reconstruct-keypoints": [*TINY_RECONSTRUCT, "interconnect=keypoints", "interconnect.num_keypoints=8"],
    "reconstruct-knn": [*TINY_RECONSTRUCT, "interconnect=knn", "interconnect.k=4"],
    "gan-grid": [*TINY_GAN, "task.generator.edges=grid"],
    "gan-knn": [*TINY_GAN, "task.generator.edges=knn", "task.generator.k=4"],
    "gan-conv": [*TINY_GAN, "task.generator.kind=conv", "task.discriminator.kind=conv"],
}


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory, cache):
    """Every run of :data:`RUNS` (two at a time), then ``evaluate.py`` on each checkpoint."""
    base = tmp_path_factory.mktemp("runs")

    def one(name):
        run = base / name
        code, out, err = finish(run_cli("train.py", [*TINY, *RUNS[name], f"hydra.run.dir={run}"], cache))
        assert code == 0, err[-3000:]
        code, out, err = finish(run_cli("evaluate.py", [f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
                                                        "limit_batches=1", f"hydra.run.dir={run / 'evaluate'}"], cache))
        return run, code, out + err

    # the first GAN run trains the FID classifier alone, so the others find it cached
    results = {"gan-grid": one("gan-grid")}
    with ThreadPoolExecutor(2) as pool:
        results.update(zip([n for n in RUNS if n != "gan-grid"], pool.map(one, [n for n in RUNS if n != "gan-grid"])))
    return results


@pytest.mark.parametrize("name", list(RUNS))
def test_short_run_of_each_task_and_interconnect(short_runs, name):
    run, code, output = short_runs[name]
    metrics = json.loads((run / "metrics.json").read_text())
    if name.startswith("reconstruct"):
        expected, picture = {"val/psnr", "val/ssim", "test/psnr", "test/ssim", "test/loss"}, "reconstructions"
    else:
        expected, picture = {"val/fid", "test/fid", "test/kid", "test/sample_confidence", "test/fid_real"}, "samples"
    assert expected <= set(metrics), metrics
    assert all(isinstance(metrics[k], float) and metrics[k] == metrics[k] for k in expected)
    assert code == 0, output[-3000:]
    assert (run / "evaluate" / "pictures" / f"{picture}.png").is_file(), output[-2000:]


def test_gan_killed_and_resumed_matches_an_uninterrupted_run(tmp_path, cache):
    args = [*TINY, *TINY_GAN, "trainer.max_epochs=2", "trainer.limit_train_batches=4",
            "trainer.checkpoint_every_n_steps=2", "trainer.deterministic=true", "task.r1_weight=0.5"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # the classifier is cached by the module's first GAN run or by this reference run
    ref = run_cli("train.py", [*args, f"hydra.run.dir={reference}"], cache)
    assert finish(ref)[0] == 0
    last = killed / "checkpoints" / "last.ckpt"
    proc = run_cli("train.py", [*args, f"hydra.run.dir={killed}"], cache)
    deadline = time.monotonic() + TIMEOUT
    while not last.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no step-level checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    from interconnects.engine.checkpoint import load_checkpoint

    assert load_checkpoint(last)["step"] < 8
    code, out, err = finish(run_cli("train.py", [*args, f"ckpt_path={last}"], cache))
    assert code == 0, err[-3000:]
    a, b = (load_checkpoint(r / "checkpoints" / "last.ckpt") for r in (reference, killed))
    assert a["step"] == b["step"] == 8
    assert a["model"].keys() == b["model"].keys()
    assert any(k.startswith("generator_ema.") for k in a["model"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert json.loads((reference / "metrics.json").read_text()) == json.loads((killed / "metrics.json").read_text())


@pytest.mark.parametrize("override, message", [
    (["task=reconstruct", "task.loss=huber"], "error: task.loss='huber' is not supported; choose one of 'mse', 'l1'"),
    (["task=reconstruct", "decoder.fuse=add"], "error: decoder.fuse='add' would let the backbone's map bypass"),
    (["task=gan", "task.r1_weight=-1"], "error: task.r1_weight=-1 is out of range; it must be a number ≥ 0"),
    (["task=gan", "task.loss=huber"], "error: task.loss='huber' is not supported; choose one of 'hinge'"),
])
def test_bad_task_options_fail_with_one_line(tmp_path, override, message):
    run = tmp_path / "run"
    code, out, err = finish(run_cli("train.py", [*TINY, *override, f"hydra.run.dir={run}"], {}))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), err[-2000:]
    assert not (run / "checkpoints").exists()
