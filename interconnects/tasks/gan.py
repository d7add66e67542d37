"""A GAN whose networks are graph networks (``task=gan``).

Generator: random node features on a latent grid → GNN → graph → CNN → upsampling → ``tanh``.
Discriminator: CNN features → kNN graph in feature space → GNN → node scores → MLP → one logit
(:mod:`interconnects.models.generative`); ``generator.kind=conv`` / ``discriminator.kind=conv`` put
3×3 convolutions in place of the graph steps (the conventional reference). Losses ``hinge``
(default), ``nonsaturating``, ``lsgan``; spectral norm, an R1 penalty, two learning rates (``optimizer.generator`` /
``optimizer.discriminator``) and an EMA of the generator's weights, which makes the samples and the
metrics.

Images: the data's normalised images are mapped to ``[-1, 1]`` pixels (``2·(x·std + mean) - 1``),
the generator's range, before the discriminator sees them; FID / KID take ``[0, 1]`` pixels.
Metrics: ``fid`` each validation epoch (monitored, lower is better) against the validation images;
at test ``fid``, ``kid`` and ``sample_confidence`` (mean top softmax of the FID classifier on the
samples) with at least ``num_samples`` generated images against the test images, and
``fid_real``, as many real training images against the same test images: the floor of ``fid``.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.utils import make_grid

from ..models.generative import NETWORK_KINDS, ConvDiscriminator, ConvGenerator, GraphDiscriminator, GraphGenerator
from ..models.hybrid import build_part, check_settings
from .base import Forward, Optimize, Task
from .fid import (
    ClassifierFeatures,
    InceptionFeatures,
    build_fid,
    build_metrics,
    check_fid_features,
    feed,
    load_or_train_classifier,
)

GAN_LOSSES = ("hinge", "nonsaturating", "lsgan")
EMA_BUFFERS = ("average", "copy", "recompute")
#: ``ema_buffers=recompute``: the EMA generator's batch-norm statistics are estimated afresh, before
#: it is evaluated or sampled, over this many of its own samples (fixed noise), in batches of 128
RECOMPUTE_SAMPLES = 1024
#: The classes of ``task.generator.kind`` / ``task.discriminator.kind``.
NETWORKS = {
    "generator": {"graph": GraphGenerator, "conv": ConvGenerator},
    "discriminator": {"graph": GraphDiscriminator, "conv": ConvDiscriminator},
}
#: Options only the graph networks take: null (the class default) or absent for ``kind=conv``.
GRAPH_ONLY = {"generator": ("edges", "k", "layer", "edge_weight"), "discriminator": ("k", "layer", "edge_weight")}


def network_node(role: str, options: Mapping | None) -> dict:
    """The ``_target_`` node of ``task.<role>`` (``generator`` / ``discriminator``): its ``kind``
    picks the class; graph-only options left null take the class default, and are refused with
    ``kind=conv``."""
    options = dict(options or {})
    kind = options.pop("kind", "graph")
    if kind not in NETWORK_KINDS:
        raise ValueError(f"task.{role}.kind={kind!r} is not supported; choose one of {', '.join(map(repr, NETWORK_KINDS))}")
    for key in GRAPH_ONLY[role]:
        if options.get(key, None) is None:
            options.pop(key, None)
        elif kind != "graph":
            raise ValueError(f"task.{role}.{key}={options[key]!r} applies to task.{role}.kind=graph only; "
                             f"leave it null with kind={kind}")
    cls = NETWORKS[role][kind]
    return {"_target_": f"{cls.__module__}.{cls.__name__}", **options}


def discriminator_loss(kind: str, real: Tensor, fake: Tensor) -> Tensor:
    """Discriminator loss from logits on real ``[B]`` and generated ``[B]`` images (a scalar)."""
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "nonsaturating":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    return 0.5 * ((real - 1).pow(2).mean() + fake.pow(2).mean())


def generator_loss(kind: str, fake: Tensor) -> Tensor:
    """Generator loss from the discriminator's logits on generated images ``[B]`` (a scalar)."""
    if kind == "hinge":
        return -fake.mean()
    if kind == "nonsaturating":
        return F.softplus(-fake).mean()
    return 0.5 * (fake - 1).pow(2).mean()


def _check_fid_sizes(data) -> None:
    """An FID needs at least 2 images on each side (a covariance): every evaluation batch (the first
    one is measured alone before training), and the training images the floor ``fid_real`` draws
    from. Refused before any work, naming the key."""
    train = len(data.train_view)
    if train < 2:
        raise ValueError(f"data.val_fraction leaves {train} training image(s); task=gan measures FID, which "
                         "needs at least 2: use a smaller data.val_fraction")
    for split, loader in (("val", data.val), ("test", data.test)):
        size = len(loader.dataset)
        if size == 0:
            continue
        if size < 2:
            raise ValueError(f"the {split} split holds {size} image; task=gan measures FID, which needs at least 2 "
                             + ("(use a larger data.val_fraction)" if split == "val" else "images to test on"))
        if loader.batch_size < 2:
            raise ValueError(f"data.eval_batch_size={loader.batch_size} is too small for task=gan: FID needs at "
                             "least 2 images in an evaluation batch; use data.eval_batch_size ≥ 2 (or null)")


class GANTask(Task):
    """The graph GAN: ``generator``, ``discriminator`` and ``generator_ema`` (the EMA weights, in the
    checkpoint but in no optimizer).

    Args:
        generator: ``kind`` (``graph``: :class:`~interconnects.models.generative.GraphGenerator`,
            ``conv``: :class:`~interconnects.models.generative.ConvGenerator`) and its options.
        discriminator: ``kind`` (``graph``: :class:`~interconnects.models.generative.GraphDiscriminator`,
            ``conv``: :class:`~interconnects.models.generative.ConvDiscriminator`) and its options.
        loss: ``hinge``, ``nonsaturating`` or ``lsgan``.
        r1_weight: weight of the R1 penalty ``γ/2·E‖∇D(real)‖²`` (0: off).
        ema_decay: decay of the generator's EMA, in ``[0, 1)`` (0 copies the weights each step).
        ema_buffers: the EMA generator's batch-norm statistics: ``average`` (averaged like the
            weights), ``copy`` (the live generator's, copied each step) or ``recompute`` (estimated
            for the EMA weights themselves, over :data:`RECOMPUTE_SAMPLES` of their own samples,
            whenever the EMA generator is evaluated or sampled after a training step: the
            "standing statistics" of BigGAN; the other two pair the averaged weights with statistics
            of other weights).
        fid_features: ``classifier`` (a small classifier trained on the run's training images,
            cached) or ``inception`` (torch-fidelity's Inception-v3; needs its weights download).
        num_samples: generated images for the test metrics (at least this many, and at least as
            many as test images are used).
        kid_subset_size: samples per KID subset (capped at the number of samples).
        sample_grid: fixed-noise samples in the picture logged each epoch.
    """

    monitor = "val/fid"
    monitor_mode = "min"

    def __init__(
        self,
        in_channels: int,
        image_size,
        mean,
        std,
        num_classes: int,
        generator: Mapping | None = None,
        discriminator: Mapping | None = None,
        loss: str = "hinge",
        r1_weight: float = 0.0,
        ema_decay: float = 0.999,
        ema_buffers: str = "recompute",
        fid_features: str = "classifier",
        num_samples: int = 1000,
        kid_subset_size: int = 1000,
        sample_grid: int = 64,
        dataset: tuple[str, str | None] = ("", None),
    ) -> None:
        super().__init__()
        if loss not in GAN_LOSSES:
            raise ValueError(f"task.loss={loss!r} is not supported; choose one of {', '.join(map(repr, GAN_LOSSES))}")
        if isinstance(r1_weight, bool) or not isinstance(r1_weight, (int, float)) or not r1_weight >= 0:
            raise ValueError(f"task.r1_weight={r1_weight!r} is out of range; it must be a number ≥ 0 (0 turns R1 off)")
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0 <= ema_decay < 1:
            raise ValueError(f"task.ema_decay={ema_decay!r} is out of range; it must be a number in [0, 1)")
        if ema_buffers not in EMA_BUFFERS:
            raise ValueError(f"task.ema_buffers={ema_buffers!r} is not supported; choose one of {', '.join(map(repr, EMA_BUFFERS))}")
        self.ema_buffers = ema_buffers
        for key, value in (("num_samples", num_samples), ("kid_subset_size", kid_subset_size), ("sample_grid", sample_grid)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"task.{key}={value!r} is out of range; it must be an integer ≥ 1")
        check_fid_features(fid_features)
        self.loss, self.r1_weight, self.ema_decay = loss, float(r1_weight), float(ema_decay)
        self.fid_features, self.num_samples, self.kid_subset_size = fid_features, num_samples, kid_subset_size
        self.dataset, self.num_classes = dataset, num_classes
        gen_node = network_node("generator", generator)
        disc_node = network_node("discriminator", discriminator)
        size = tuple(image_size)
        self.generator = build_part("task.generator", gen_node, out_channels=in_channels, image_size=size)
        self.discriminator = build_part("task.discriminator", disc_node, in_channels=in_channels, image_size=size)
        self.generator_ema = AveragedModel(self.generator, multi_avg_fn=get_ema_multi_avg_fn(self.ema_decay),
                                           use_buffers=ema_buffers == "average")
        self.generator_ema.requires_grad_(False)
        self._stale_statistics = ema_buffers == "recompute"  # recomputed before the next sampling
        # the fixed noise of the sample grid is part of the task (and of its checkpoint)
        noise = self.generator.noise(sample_grid, torch.Generator().manual_seed(0))
        self.register_buffer("fixed_noise", noise)
        channels = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1), persistent=False)
        # the metrics and the feature network are not trained and not checkpointed: kept out of the
        # module tree (they are rebuilt by setup from the cache)
        self._quality: dict = {}
        self._eval: dict = {}

    @classmethod
    def from_config(cls, cfg, info) -> "GANTask":
        """``task.*`` keys are the keyword arguments; the data's shape and statistics come from ``info``."""
        from omegaconf import OmegaConf

        options = OmegaConf.to_container(cfg.task, resolve=True)
        options.pop("_target_", None)
        dataset = (str(cfg.data.name), None if cfg.data.get("root") is None else str(cfg.data.root))
        check_settings("task", cls, options, ("in_channels", "image_size", "mean", "std", "num_classes", "dataset"))
        try:
            return cls(info.in_channels, info.image_size, info.mean, info.std, info.num_classes,
                       dataset=dataset, **options)
        except TypeError as exc:
            raise ValueError(f"task: {exc}") from None

    # ---- networks and optimizers ------------------------------------------------------------------
    def train(self, mode: bool = True) -> "GANTask":
        """As :meth:`nn.Module.train`, but the EMA generator always runs in eval mode (its batch-norm
        statistics are the averaged ones, never updated by sampling)."""
        super().train(mode)
        self.generator_ema.eval()
        return self

    def networks(self) -> dict[str, nn.Module]:
        """The two trained networks (the EMA copy is run directly, never wrapped)."""
        return {"generator": self.generator, "discriminator": self.discriminator}

    def uncompiled(self) -> dict[str, str]:
        """With R1 on, the discriminator: its penalty differentiates ``∇D(real)``, a double backward
        that ``torch.compile`` does not support."""
        if self.r1_weight > 0:
            return {"discriminator": f"task.r1_weight={self.r1_weight:g} differentiates its gradient (R1), "
                                     "which torch.compile does not support"}
        return {}

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """``generator`` and ``discriminator``: ``optimizer.generator`` / ``optimizer.discriminator``."""
        return {"generator": list(self.generator.parameters()),
                "discriminator": list(self.discriminator.parameters())}

    def to_signed(self, images: Tensor) -> Tensor:
        """Normalised images ``[B, C, H, W]`` → pixels in ``[-1, 1]``."""
        return (images * self.std + self.mean) * 2 - 1

    # ---- training ---------------------------------------------------------------------------------
    def training_step(self, batch, forward: Forward, optimize: Optimize) -> dict[str, Tensor]:
        """A discriminator step then a generator step on ``batch = (images [B, C, H, W], labels)``
        (labels ignored); then the EMA update. Returns ``d_loss``, ``g_loss`` (and ``r1``)."""
        images = batch[0]
        real = self.to_signed(images)
        b = real.shape[0]
        with torch.no_grad():
            fake = forward(self.generator, self.generator.noise(b, device=real.device))
        if self.r1_weight > 0:
            real = real.detach().requires_grad_(True)
        real_logits = forward(self.discriminator, real).float()
        fake_logits = forward(self.discriminator, fake).float()
        d_loss = discriminator_loss(self.loss, real_logits, fake_logits)
        metrics = {"d_loss": d_loss.detach()}
        if self.r1_weight > 0:
            (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            r1 = grad.float().pow(2).flatten(1).sum(1).mean()
            d_loss = d_loss + 0.5 * self.r1_weight * r1
            metrics["r1"] = r1.detach()
        optimize("discriminator", d_loss)

        fake = forward(self.generator, self.generator.noise(b, device=real.device))
        g_loss = generator_loss(self.loss, forward(self.discriminator, fake).float())
        optimize("generator", g_loss)
        self.update_ema()
        metrics["g_loss"] = g_loss.detach()
        return metrics

    @torch.no_grad()
    def update_ema(self) -> None:
        """EMA of the generator's parameters. Its buffers (batch-norm statistics) are averaged too
        (``ema_buffers=average``, ``AveragedModel(use_buffers=True)``) or copied from the generator
        (``copy`` and ``recompute``: ``AveragedModel`` keeps them in sync when ``use_buffers=False``);
        ``recompute`` then marks them stale, to be recomputed before the EMA generator is sampled."""
        self.generator_ema.update_parameters(self.generator)
        self._stale_statistics = self.ema_buffers == "recompute"

    # ---- evaluation -------------------------------------------------------------------------------
    def setup(self, data) -> None:
        """Build FID / KID on the feature network (trained on ``data.train_view`` and cached on first use)."""
        _check_fid_sizes(data)
        if self.fid_features == "inception":
            try:
                features = InceptionFeatures()
            except Exception as exc:  # the weights download failed: one line, before training
                raise ValueError(
                    f"task.fid_features='inception' could not load the Inception weights ({type(exc).__name__}); "
                    "they need a download; use task.fid_features=classifier offline"
                ) from None
            classifier = None
        else:
            view = data.train_view
            classifier, _ = load_or_train_classifier(*self.dataset, view.images, view.labels, self.num_classes)
            features = ClassifierFeatures(classifier)
        device = self.fixed_noise.device
        fid, kid = build_metrics(features, self.kid_subset_size)
        fid_real = build_fid(features)
        self._quality = {"fid": fid.to(device), "kid": kid.to(device), "fid_real": fid_real.to(device),
                         "classifier": classifier.to(device) if classifier is not None else None,
                         "train_images": data.train_view.images}

    def _metric(self, name: str):
        if not self._quality:
            raise RuntimeError("GANTask.setup(data) must be called before evaluation")
        metric = self._quality[name]
        if isinstance(metric, Tensor):
            return metric
        device = self.fixed_noise.device
        if metric is not None and next(iter(metric.parameters()), self.fixed_noise).device != device:
            self._quality[name] = metric = metric.to(device)
        return metric

    @torch.no_grad()
    def recompute_statistics(self) -> None:
        """The EMA generator's batch-norm statistics estimated for its own weights: the running
        means and variances reset, then averaged (cumulatively) over :data:`RECOMPUTE_SAMPLES`
        generated from a fixed noise, the layers in training mode; the same weights give the same
        statistics."""
        module = self.generator_ema.module
        norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        device = self.fixed_noise.device
        noise = torch.Generator(device).manual_seed(4321)
        momenta = [m.momentum for m in norms]
        try:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the batches
                m.train()
            for start in range(0, RECOMPUTE_SAMPLES, 128):
                module(self.generator.noise(min(128, RECOMPUTE_SAMPLES - start), generator=noise, device=device))
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
                m.eval()
        self._stale_statistics = False

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        """``count`` images from the EMA generator, as pixels in ``[0, 1]``: ``[count, C, H, W]``.
        ``generator``: the random generator of the noise (on the task's device)."""
        device = self.fixed_noise.device
        if self._stale_statistics:
            self.recompute_statistics()
        z = self.generator.noise(count, generator=generator, device=device)
        return (self.generator_ema.module(z).float() + 1) / 2

    def start_evaluation(self, split: str) -> None:
        """Reset FID / KID and the evaluation noise (the same samples every time a split is measured)."""
        for name in ("fid", "kid", "fid_real"):
            self._metric(name).reset()
        device = self.fixed_noise.device
        self._eval = {"split": split, "noise": torch.Generator(device).manual_seed(1234), "count": 0}

    def _add_fakes(self, count: int) -> Tensor:
        fakes = self.sample(count, self._eval["noise"])
        self._metric("fid").update(fakes, real=False)
        if self._eval["split"] == "test":
            self._metric("kid").update(fakes, real=False)
        self._eval["count"] += count
        classifier = self._metric("classifier")
        if classifier is None:
            return torch.zeros((), device=fakes.device)
        return classifier(fakes).softmax(-1).amax(-1).sum()

    @torch.no_grad()
    def evaluation_step(self, batch, forward: Forward) -> dict[str, Tensor]:
        """Feeds FID (and KID at test) with the batch's real images and as many generated ones;
        returns the summed top softmax of the classifier on the samples (``confidence``) and the
        sample ``count``."""
        images = batch[0]
        real = self.to_signed(images)
        pixels = (real + 1) / 2
        self._metric("fid").update(pixels, real=True)
        if self._eval["split"] == "test":
            self._metric("kid").update(pixels, real=True)
            self._metric("fid_real").update(pixels, real=True)
        confidence = self._add_fakes(real.shape[0])
        return {"confidence": confidence, "count": torch.tensor(real.shape[0], device=real.device)}

    def summarize(self, sums: Mapping[str, Tensor], split: str) -> dict[str, float]:
        """``fid``; at test also ``kid`` and ``sample_confidence``, after topping the samples up to
        ``num_samples``, and ``fid_real``: the FID of as many real training images (a fixed draw)
        against the same test images, in the same features: the floor of ``fid``."""
        confidence, count = float(sums.get("confidence", 0.0)), float(sums.get("count", 0.0))
        if split == "test":
            with torch.no_grad():
                while self._eval["count"] < self.num_samples:
                    extra = min(256, self.num_samples - self._eval["count"])
                    confidence += float(self._add_fakes(extra))
                    count += extra
        fid = self._metric("fid")
        metrics = {"fid": float(fid.compute())}
        if split == "test":
            kid = self._metric("kid")
            real_count = sum(len(f) for f in kid.real_features)
            kid.subset_size = min(self.kid_subset_size, real_count, self._eval["count"])
            # KID draws its subsets from the global generator: keep the run's random stream untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                kid_mean, _ = kid.compute()
            metrics["kid"] = float(kid_mean)
            metrics["sample_confidence"] = confidence / max(count, 1.0)
            train = self._metric("train_images")
            draw = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: self._eval["count"]]
            fid_real = self._metric("fid_real")
            feed(fid_real, train[draw], real=False)
            metrics["fid_real"] = float(fid_real.compute())
        return metrics

    def graph_input(self, batch):
        """The generator, on a few of the fixed noises."""
        return self.generator, self.fixed_noise[: len(batch[0])]

    @torch.no_grad()
    def pictures(self, batch, forward: Forward) -> dict[str, Tensor]:
        """``samples``: the EMA generator's images of the fixed noise, a grid ``[C, H', W']`` in ``[0, 1]``."""
        images = (self.generator_ema.module(self.fixed_noise).float() + 1) / 2
        return {"samples": make_grid(images.clamp(0, 1), nrow=int(len(images) ** 0.5))}
