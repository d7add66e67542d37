"""The GAN's measuring stick and its recipe, on tiny data:

* the FID classifier trains to the same weights, bit for bit, in two fresh trainings (whatever the
  caller's thread count and deterministic setting, which are restored after);
* the floor ``fid_real`` is zero for a set of real images against itself and positive for training
  against test images, and a task reports it beside ``fid`` at test;
* the conv reference has about the graph GAN's parameter count and refuses graph-only options;
* the EMA generator copies the batch-norm statistics rather than averaging them;
* every seed of a tiny run takes a finite step with both kinds of networks.
"""

from __future__ import annotations


import pytest
import torch

from interconnects.tasks import fid as fid_module
from interconnects.tasks import gan as gan_module
from interconnects.tasks.gan import GANTask


def forward(module, *args, **kwargs):
    return module(*args, **kwargs)


def make_optimize(task, lr: float = 1e-3):
    """A stand-in for the engine's ``optimize``: clear every gradient, backward, step one group."""
    optimizers = {g: torch.optim.Adam(p, lr=lr, betas=(0.0, 0.9)) for g, p in task.optimizer_groups().items()}

    def optimize(group, loss):
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizers[group].step()

    return optimize


def digits(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` blurry fake digits ``uint8 [count, 1, 28, 28]`` and their labels: a bright bar
    whose position is the label, plus noise (something a classifier can learn in a few batches)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = torch.rand(count, 1, 28, 28, generator=generator) * 80
    rows = torch.arange(28).view(1, 28, 1)
    bar = (rows - (labels.view(-1, 1, 1) * 2 + 4)).abs() <= 1
    images[:, 0] += bar * 170.0
    return images.to(torch.uint8), labels


def tiny_gan(kind: str = "graph", **options) -> GANTask:
    return GANTask(1, (28, 28), (0.1307,), (0.3081,), 10, generator={"kind": kind, "channels": 8, "latent_dim": 4},
                   discriminator={"kind": kind, "channels": 8, "hidden": 8}, num_samples=48, kid_subset_size=8,
                   sample_grid=4, **options)


def test_fid_classifier_is_identical_across_two_fresh_trainings():
    images, labels = digits(320, seed=0)
    threads = torch.get_num_threads()
    first = fid_module.train_classifier(images, labels, 10, epochs=1)
    # the caller's settings are restored, and do not reach the training
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(123)  # the run's global seed is not the classifier's
    second = fid_module.train_classifier(images, labels, 10, epochs=1)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and it learned something: a different data set gives different weights
    other = fid_module.train_classifier(*digits(320, seed=1), 10, epochs=1)
    assert not torch.equal(other.state_dict()["head.weight"], a["head.weight"])


def test_floor_is_zero_for_a_set_against_itself_and_positive_for_train_against_test():
    images, labels = digits(320, seed=0)
    features = fid_module.ClassifierFeatures(fid_module.train_classifier(images, labels, 10, epochs=1))
    train, test = images[:160], images[160:]
    same = fid_module.real_fid(features, test, test)
    split = fid_module.real_fid(features, train, test)
    noise = fid_module.real_fid(features, test, torch.randint(0, 256, test.shape, dtype=torch.uint8))
    assert abs(same) < 1e-2 * split
    assert 0 < split < noise


def test_task_reports_the_floor_beside_the_fid_at_test():
    torch.manual_seed(0)
    task = tiny_gan()
    images, labels = digits(160, seed=0)
    classifier = fid_module.train_classifier(images, labels, 10, epochs=1)
    fid, kid = fid_module.build_metrics(fid_module.ClassifierFeatures(classifier), 8)
    fid_real = fid_module.build_fid(fid_module.ClassifierFeatures(classifier))
    task._quality = {"fid": fid, "kid": kid, "fid_real": fid_real, "classifier": classifier,
                     "train_images": images[:112]}
    task.eval()
    task.start_evaluation("test")
    test = (images[112:].float() / 255 - 0.1307) / 0.3081
    sums = task.evaluation_step((test, labels[112:]), forward)
    metrics = task.summarize(sums, "test")
    assert set(metrics) == {"fid", "kid", "sample_confidence", "fid_real"}
    # the untrained generator is far above the floor, which is the FID of real training images
    expected = fid_module.real_fid(fid_module.ClassifierFeatures(classifier), images[112:],
                                   images[:112][torch.randperm(112, generator=torch.Generator().manual_seed(0))[:48]])
    assert metrics["fid_real"] == pytest.approx(expected, rel=1e-4)
    assert 0 < metrics["fid_real"] < metrics["fid"]
    task.start_evaluation("val")
    assert set(task.summarize(task.evaluation_step((test, labels[112:]), forward), "val")) == {"fid"}


def test_conv_reference_matches_the_graph_gan_in_size_and_refuses_graph_options():
    graph = GANTask(1, (28, 28), (0.1,), (0.3,), 10, generator={"edges": "knn", "k": 8, "channels": 32},
                    discriminator={"channels": 32})
    conv = GANTask(1, (28, 28), (0.1,), (0.3,), 10, generator={"kind": "conv", "channels": 25},
                   discriminator={"kind": "conv", "channels": 27})
    for name in ("generator", "discriminator"):
        g = sum(p.numel() for p in getattr(graph, name).parameters())
        c = sum(p.numel() for p in getattr(conv, name).parameters())
        assert abs(c - g) <= 0.05 * g, (name, g, c)
    z = conv.generator.noise(3)
    assert z.shape == graph.generator.noise(3).shape
    out = conv.generator(z)
    assert out.shape == (3, 1, 28, 28) and out.abs().max() <= 1
    assert conv.discriminator(out).shape == (3,)
    with pytest.raises(ValueError, match=r"^task.generator.k=4 applies to task.generator.kind=graph only"):
        GANTask(1, (28, 28), (0.1,), (0.3,), 10, generator={"kind": "conv", "k": 4})
    with pytest.raises(ValueError, match=r"^task.discriminator.layer='gcn' applies to task.discriminator.kind=graph"):
        GANTask(1, (28, 28), (0.1,), (0.3,), 10, discriminator={"kind": "conv", "layer": "gcn"})
    with pytest.raises(ValueError, match=r"^task.discriminator.edge_weight='continuous' applies to task.discriminator.kind=graph"):
        GANTask(1, (28, 28), (0.1,), (0.3,), 10, discriminator={"kind": "conv", "edge_weight": "continuous"})
    with pytest.raises(ValueError, match=r"^task.generator.edge_weight='continuous' applies to edges='knn' only"):
        GANTask(1, (28, 28), (0.1,), (0.3,), 10, generator={"edges": "grid", "edge_weight": "continuous"})
    with pytest.raises(ValueError, match=r"^task.discriminator.k=48 is out of range; it must be in \[1, 47\] for a 7×7 feature map with edge_weight='continuous'"):
        GANTask(1, (28, 28), (0.1,), (0.3,), 10, discriminator={"k": 48, "edge_weight": "continuous"})
    with pytest.raises(ValueError, match=r"^task.generator.kind='mlp' is not supported; choose one of 'graph', 'conv'$"):
        GANTask(1, (28, 28), (0.1,), (0.3,), 10, generator={"kind": "mlp"})


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_ema_generator_copies_or_averages_batch_norm_statistics(buffers):
    torch.manual_seed(0)
    task = tiny_gan(ema_decay=0.9, ema_buffers=buffers)
    optimize = make_optimize(task)
    images = (torch.rand(8, 1, 28, 28) - 0.1307) / 0.3081
    task.train()
    for _ in range(2):
        task.training_step((images, torch.zeros(8)), forward, optimize)
    live, ema = dict(task.generator.named_buffers()), dict(task.generator_ema.module.named_buffers())
    means = [k for k in live if k.endswith("running_mean")]
    assert means
    if buffers == "copy":
        assert all(torch.equal(live[key], ema[key]) for key in live)
    else:
        assert all(not torch.equal(live[key], ema[key]) for key in means)
    # the parameters are averaged, not copied
    assert any(not torch.equal(a, b) for a, b in zip(task.generator.parameters(), task.generator_ema.module.parameters()))
    with pytest.raises(ValueError, match=r"^task.ema_buffers='last' is not supported; choose one of 'average', 'copy', 'recompute'$"):
        tiny_gan(ema_buffers="last")


def test_ema_generator_recomputes_its_own_batch_norm_statistics():
    torch.manual_seed(0)
    task = tiny_gan(ema_decay=0.9, ema_buffers="recompute")
    optimize = make_optimize(task)
    images = (torch.rand(8, 1, 28, 28) - 0.1307) / 0.3081
    task.train()
    for _ in range(2):
        task.training_step((images, torch.zeros(8)), forward, optimize)
    ema = task.generator_ema.module
    norms = [m for m in ema.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and task._stale_statistics
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    first = task.sample(4, seeded())  # recomputes the statistics first
    assert not task._stale_statistics
    assert all(not m.training and m.momentum == 0.1 for m in norms)
    # by hand: the first batch norm's mean is that of its inputs over the fixed noise's samples
    # (no batch norm comes before it, so eval mode gives it the same inputs)
    noise = torch.Generator().manual_seed(4321)
    z = torch.cat([task.generator.noise(128, generator=noise) for _ in range(gan_module.RECOMPUTE_SAMPLES // 128)])
    inputs = []
    hook = norms[0].register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    with torch.no_grad():
        ema(z)
    hook.remove()
    x = inputs[0]
    expected = x.mean((0, 2, 3)) if x.dim() == 4 else x.mean(0)
    torch.testing.assert_close(norms[0].running_mean, expected, rtol=1e-4, atol=1e-5)
    # the same weights, the same statistics; a training step makes them stale again
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    task.recompute_statistics()
    assert all(torch.equal(state[k], v) for k, v in ema.state_dict().items())
    assert torch.equal(task.sample(4, seeded()), first)
    task.training_step((images, torch.zeros(8)), forward, optimize)
    assert task._stale_statistics and not torch.equal(task.sample(4, seeded()), first)


@pytest.mark.parametrize("kind", ["graph", "conv", "graph-continuous"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_seed_takes_a_finite_step(kind, seed):
    torch.manual_seed(seed)
    if kind == "graph-continuous":  # continuous kNN weights in both networks (R1 differentiates through them)
        task = GANTask(1, (28, 28), (0.1307,), (0.3081,), 10, r1_weight=0.01, num_samples=48, kid_subset_size=8,
                       sample_grid=4, generator={"channels": 8, "latent_dim": 4, "edges": "knn", "edge_weight": "continuous"},
                       discriminator={"channels": 8, "hidden": 8, "edge_weight": "continuous"})
    else:
        task = tiny_gan(kind, r1_weight=0.01)
    optimize = make_optimize(task)
    images, _ = digits(16, seed)
    batch = ((images.float() / 255 - 0.1307) / 0.3081, torch.zeros(16))
    before = {n: [p.clone() for p in net.parameters()] for n, net in task.networks().items()}
    task.train()
    for _ in range(3):
        metrics = task.training_step(batch, forward, optimize)
        assert set(metrics) == {"d_loss", "g_loss", "r1"}
        assert all(torch.isfinite(v) for v in metrics.values()), metrics
    for name, net in task.networks().items():
        after = list(net.parameters())
        assert all(torch.isfinite(p).all() for p in after)
        assert any(not torch.equal(a, b) for a, b in zip(before[name], after)), name
