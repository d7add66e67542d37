"""The airbench-style CIFAR backbone and recipe: the whitening conv, what stays frozen, the width key,
test-time augmentation, the cifar10_* experiments, and a one-batch run through the command line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose, make_image_folder, run_cli
from interconnects.data import DataInfo
from interconnects.models.airbench import Airbench, AirbenchDecoder, Whitening, fit_to_data, scaled_sgd
from interconnects.models.hybrid import ClassifierHead
from interconnects.tasks.classify import ClassificationTask, tta_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXPERIMENTS = ("cifar10_baseline", "cifar10_grid", "cifar10_keypoints", "cifar10_knn")


def correlated_images(n: int = 64, size: int = 12) -> torch.Tensor:
    """Images ``[n, 3, size, size]`` whose channels and neighbouring pixels are strongly correlated."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, 1, size + 1, size + 1, generator=g)
    smooth = (base[..., 1:, 1:] + base[..., :-1, :-1] + base[..., 1:, :-1]) / 3
    mix = torch.tensor([[1.0], [0.8], [0.5]]).view(1, 3, 1, 1)
    return smooth * mix + 0.3 * torch.randn(n, 3, size, size, generator=g) + 0.5


def test_whitening_conv_whitens_its_patches():
    images = correlated_images()
    white = Whitening(3, kernel_size=2, eps=1e-6)
    white.fit_to_data(images)
    assert bool(white.fitted) and white.out_channels == 24
    with torch.no_grad():
        out = white(images)  # [N, 24, 11, 11]
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    half = half - half.mean(0)
    covariance = half.T @ half / len(half)
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.equal(out[:, 12:], -out[:, :12])  # the negation, bias zero


def test_eps_damps_each_direction_by_its_eigenvalue():
    images = correlated_images()
    white = Whitening(3, eps=0.05)
    white.fit_to_data(images)
    with torch.no_grad():
        flat = white(images)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    eigenvalues = torch.linalg.eigvalsh(torch.cov(patches.T, correction=0)).flip(0)  # largest first
    assert torch.allclose(flat.var(0, correction=0), eigenvalues / (eigenvalues + 0.05), atol=1e-4)


def tiny_task(width: int = 8, **task_kwargs) -> ClassificationTask:
    backbone = Airbench(3, width=width, depth=2, whiten_bias_epochs=1.0)
    decoder = AirbenchDecoder(backbone.out_channels, backbone.out_channels)
    from interconnects.models.hybrid import HybridModel

    model = HybridModel(backbone, None, None, decoder, ClassifierHead(decoder.out_channels, 10, bias=False,
                                                                      pool="max", scale=1 / 9))
    return ClassificationTask(model, label_smoothing=0.2, **task_kwargs)


def test_frozen_parts_stay_frozen_and_the_whitening_bias_stops_after_its_epochs():
    task = tiny_task()
    images, labels = correlated_images(16, 32), torch.randint(0, 10, (16,))
    fit_to_data(task.model, images, num_train=16)  # bias trains for 1 epoch = 16 images
    backbone = task.model.backbone
    frozen = {name: p.detach().clone() for name, p in task.model.named_parameters() if not p.requires_grad}
    assert "backbone.whiten.weight" in frozen and any(name.endswith("norm1.weight") for name in frozen)
    opt = scaled_sgd([p for p in task.model.parameters() if p.requires_grad], lr=0.5, weight_decay=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(task.model(images), labels).backward()
        opt.step()

    bias = backbone.whiten.bias.detach().clone()
    step()
    assert not torch.equal(bias, backbone.whiten.bias)  # trained in the first epoch
    assert not backbone.whiten.bias_trains()
    bias = backbone.whiten.bias.detach().clone()
    step()
    step()
    assert torch.equal(bias, backbone.whiten.bias)  # then left alone, momentum included
    for name, p in task.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert all(bool((p == 1).all()) for n, p in task.model.named_parameters() if n.endswith(("norm1.weight", "norm2.weight")))


def test_scaled_sgd_gives_batchnorm_biases_their_own_rate():
    task = tiny_task()
    params = [p for p in task.model.parameters() if p.requires_grad]
    opt = scaled_sgd(params, lr=0.1, momentum=0.85, weight_decay=0.01)
    base, biases = sorted(opt.param_groups, key=lambda g: g["lr"])
    norms = [m for m in task.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert base["lr"] == pytest.approx(0.1) and base["weight_decay"] == pytest.approx(0.01)
    assert biases["lr"] == pytest.approx(6.4) and biases["weight_decay"] == pytest.approx(0.01 / 64)
    assert {id(p) for p in biases["params"]} == {id(m.bias) for m in norms}
    assert all(g["nesterov"] and g["momentum"] == 0.85 for g in opt.param_groups)


def test_optimizer_airbench_takes_airbench94s_steps_for_a_mean_loss():
    """airbench94 sums the loss of a batch of 1024 and gives PyTorch's SGD lr = 11.5 / s and
    weight_decay = (0.0153·1024 / s) / lr, s = 1024·(1 + 1/(1 − 0.85)): the config's rates for a
    mean loss must take the same steps (the gradient's and the decay's)."""
    cfg = compose(["experiment=cifar10_baseline"]).optimizer
    scale = 1024 * (1 + 1 / (1 - cfg.momentum))
    lr_sum, decay_per_step = 11.5 / scale, 0.0153 * 1024 / scale
    assert cfg.lr / 1024 == pytest.approx(lr_sum, rel=1e-3)  # mean loss: gradients 1024× smaller
    assert cfg.lr * cfg.weight_decay == pytest.approx(decay_per_step, rel=1e-3)
    assert cfg.momentum == 0.85 and cfg.nesterov


def test_width_scales_the_whole_network():
    def count(width: int) -> int:
        cfg = compose(["experiment=cifar10_baseline", f"backbone.width={width}"])
        task = ClassificationTask.from_config(cfg, DataInfo(3, (32, 32), 10, (0.5,) * 3, (0.25,) * 3))
        return dict(task.parameter_table())["total"]

    small, large = count(16), count(32)
    assert 3.5 < large / small < 4.1  # the convolutions hold almost all weights: ~width²
    cfg = compose(["experiment=cifar10_grid", "backbone.width=16"])
    task = ClassificationTask.from_config(cfg, DataInfo(3, (32, 32), 10, (0.5,) * 3, (0.25,) * 3))
    assert task.model.gnn.hidden_channels == 64 == task.model.backbone.out_channels  # the graph follows the width


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_cifar10_experiments_compose_and_build(experiment):
    cfg = compose([f"experiment={experiment}", "backbone.width=8"])
    assert cfg.backbone._target_.endswith("Airbench") and cfg.data.name == "cifar10"
    assert cfg.trainer.max_epochs == 10 and cfg.data.batch_size == 1024 and cfg.task.tta is True
    task = ClassificationTask.from_config(cfg, DataInfo(3, (32, 32), 10, (0.5,) * 3, (0.25,) * 3))
    images = correlated_images(4, 32)
    fit_to_data(task.model, images, num_train=4)
    task.model.eval()
    with torch.no_grad():
        assert task.model(images).shape == (4, 10)
    assert (task.model.interconnect is None) == (experiment == "cifar10_baseline")


@pytest.mark.parametrize("experiment", ["mnist_airbench_baseline", "mnist_airbench_keypoints"])
def test_mnist_airbench_experiments_build_for_digits(experiment):
    """The CIFAR recipe on the digits: one grey channel through the whitening conv, a 6×6 map where the
    keypoints are chosen, no mirror in training or testing, a validation split to choose on."""
    cfg = compose([f"experiment={experiment}", "backbone.width=8"])
    assert cfg.data.name == "mnist" and cfg.data.augment == "affine" and cfg.data.val_fraction == 0.1
    assert cfg.task.tta is False and cfg.data.batch_size == 1024
    task = ClassificationTask.from_config(cfg, DataInfo(1, (28, 28), 10, (0.13,), (0.31,)))
    images = correlated_images(4, 28)[:, :1]
    fit_to_data(task.model, images, num_train=4)
    task.model.eval()
    with torch.no_grad():
        assert task.model.backbone(images).shape[-2:] == (6, 6)
        assert task.model(images).shape == (4, 10)
    assert (task.model.interconnect is None) == (experiment == "mnist_airbench_baseline")


def test_tta_averages_the_mirror_and_shifted_views():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 10, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    images = torch.randn(5, 3, 8, 8)

    def forward(module, x):
        return module(x)

    with torch.no_grad():
        one, plain = tta_logits(model, images, forward, 1)
        two, _ = tta_logits(model, images, forward, 2)
        three, plain3 = tta_logits(model, images, forward, 3)
        six, plain6 = tta_logits(model, images, forward, 6)
        padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
        views = [padded[..., :8, :8], padded[..., 2:, 2:]]
        shifted = torch.stack([0.5 * (model(v) + model(v.flip(-1))) for v in views]).mean(0)
        unmirrored = torch.stack([model(v) for v in views]).mean(0)
    assert torch.equal(one, plain) and torch.equal(plain6, plain) and torch.equal(plain3, plain)
    assert torch.allclose(two, 0.5 * (model(images) + model(images.flip(-1))).detach(), atol=1e-6)
    assert torch.allclose(six, 0.5 * two + 0.5 * shifted, atol=1e-6)
    assert torch.allclose(three, 0.5 * one + 0.5 * unmirrored, atol=1e-6)  # shift: no mirror anywhere
    with pytest.raises(ValueError, match="tta="):
        tiny_task(tta="sideways")


def test_one_batch_run_records_tta_and_evaluate_rebuilds_the_fitted_network(tmp_path):
    root = make_image_folder(tmp_path / "pics", classes=tuple("abcdefghij"), per_class=3, size=(32, 32), mode="RGB")
    run = tmp_path / "run"
    common = ["data=image_folder", f"data.root={root}", "data.num_workers=0"]
    done = run_cli("train.py", "experiment=cifar10_baseline", *common, "backbone.width=8", "data.batch_size=16",
                   "trainer.max_epochs=1", "trainer.limit_train_batches=1", "logger=none", "trainer.progress=false",
                   "data.val_fraction=0.2", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/tta_views"] == 6 and 0.0 <= metrics["test/acc_plain"] <= 1.0
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    assert bool(state["model"]["model.backbone.whiten.fitted"])
    out = tmp_path / "eval"
    evaluated = run_cli("evaluate.py", f"ckpt_path={run}", f"hydra.run.dir={out}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    again = json.loads((out / "metrics.json").read_text())
    assert again["test/acc"] == pytest.approx(metrics["test/acc"]) and again["test/tta_views"] == 6
    assert again["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)
    # tta=... moves the views to the evaluated split (validation here); a bad value is refused in one line
    shifts = tmp_path / "eval_val"
    evaluated = run_cli("evaluate.py", f"ckpt_path={run}", "split=val", "tta=shift", f"hydra.run.dir={shifts}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    on_val = json.loads((shifts / "metrics.json").read_text())
    assert on_val["val/tta_views"] == 3 and 0.0 <= on_val["val/acc_plain"] <= 1.0
    refused = run_cli("evaluate.py", f"ckpt_path={run}", "tta=sideways", f"hydra.run.dir={tmp_path / 'bad'}")
    errors = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(errors) == 1 and "tta='sideways'" in errors[0] and "shift" in errors[0]
    assert not (tmp_path / "bad").exists()


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    from interconnects.data.tensors import ImageTensors, alternating_flips

    index = torch.arange(10_000)
    even, odd, later = (alternating_flips(index, seed=3, epoch=e) for e in (0, 1, 2))
    assert torch.equal(even, ~odd) and torch.equal(even, later)  # the two halves swap each epoch
    assert 0.48 < even.float().mean() < 0.52  # about half the images
    assert not torch.equal(even, alternating_flips(index, seed=4, epoch=0))  # another seed, another half
    images = torch.randint(0, 256, (6, 1, 5, 7), dtype=torch.uint8)
    view = ImageTensors(images, torch.arange(6), (0.0,), (1 / 255,), "crop_altflip", padding=0, seed=3)
    batches = []
    for epoch in (0, 1):
        view.epoch = epoch
        batches.append(view.__getitems__([4, 0, 2])[0])
    for i, k in enumerate([4, 0, 2]):
        image = images[k].float()
        a, b = batches[0][i].round(), batches[1][i].round()  # (normalised by 1/255 and back)
        assert {tuple(a.flatten().tolist()), tuple(b.flatten().tolist())} == \
            {tuple(image.flatten().tolist()), tuple(image.flip(-1).flatten().tolist())}


def test_reflect_padding_crops_from_the_mirrored_border():
    from interconnects.data.tensors import random_crop_flip

    images = torch.arange(2 * 16, dtype=torch.uint8).view(2, 1, 4, 4)
    for seed in range(8):
        out = random_crop_flip(images, 2, False, torch.Generator().manual_seed(seed), pad_mode="reflect")
        padded = torch.nn.functional.pad(images, (2,) * 4, mode="reflect")
        for b in range(2):  # each crop is a 4×4 window of the reflect-padded image
            windows = padded[b, 0].unfold(0, 4, 1).unfold(1, 4, 1).reshape(-1, 4, 4)
            assert any(torch.equal(out[b, 0], w) for w in windows)
    zeros = random_crop_flip(images, 2, False, torch.Generator().manual_seed(0))
    reflect = random_crop_flip(images, 2, False, torch.Generator().manual_seed(0), pad_mode="reflect")
    assert (zeros == 0).sum() > (reflect == 0).sum()  # the zero padding shows, the reflection does not


def test_lookahead_pulls_the_weights_to_a_slow_copy_on_airbench_schedule():
    from interconnects.engine.lookahead import Lookahead

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    la = Lookahead({"model": net}, every=2, decay=0.9, total_steps=6)
    assert len(la.live) == 6  # weight, bias, BN weight, bias, running mean, var (not the step count)
    assert la.decay_at(6) == pytest.approx(0.81) and la.decay_at(3) == pytest.approx(0.81 / 8)
    start = [t.clone() for t in la.live]
    with torch.no_grad():
        for t in la.live:
            t.add_(1.0)
    la.after_step(1)  # not a multiple of every: nothing happens
    assert all(torch.equal(t, s + 1) for t, s in zip(la.live, start))
    la.after_step(2)  # slow ← slow + (1 − d)(live − slow); live ← slow
    d = la.decay_at(2)
    for t, s, slow in zip(la.live, start, la.slow):
        torch.testing.assert_close(slow, s + (1 - d))
        assert torch.equal(t, slow)
    with torch.no_grad():
        for t in la.live:
            t.add_(1.0)
    la.after_step(5)
    la.after_step(6)  # the last step (a multiple of every): one more update, then the weights are the slow copy
    assert all(torch.equal(t, slow) for t, slow in zip(la.live, la.slow))
    odd = Lookahead({"model": net}, every=4, decay=0.9, total_steps=6)
    with torch.no_grad():
        for t in odd.live:
            t.add_(1.0)
    odd.after_step(6)  # a last step that is no multiple of every still ends at the slow copy
    assert all(torch.equal(t, slow) for t, slow in zip(odd.live, odd.slow))
    restored = Lookahead({"model": net}, every=2, decay=0.9, total_steps=6)
    restored.load_state_dict(la.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.slow, la.slow))
    with pytest.raises(ValueError, match="lookahead copy does not fit"):
        Lookahead({"model": torch.nn.Linear(3, 3)}, 2, 0.9, 6).load_state_dict(la.state_dict())
