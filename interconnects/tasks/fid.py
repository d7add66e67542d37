"""Sample quality without a download: FID and KID on the features of a small classifier trained on
the run's own training images.

The classifier (:class:`FeatureClassifier`) is trained once per dataset the first time a GAN run
needs it, and cached under ``~/.cache/interconnects/fid/`` (or ``$XDG_CACHE_HOME/interconnects/fid/``)
by the dataset's name, root, image count and a hash of the images, so FIDs of runs on the same data
are measured with the same network and compare. Its training is bit-reproducible on the CPU: one
thread, deterministic algorithms, its own seeded generators for the weights and the data order
(``torch.randperm`` on a CPU generator: the same order on every machine), whatever the run's seed,
device or thread settings. What remains machine-dependent is the float arithmetic of the CPU
kernels themselves: the same PyTorch build on CPUs with the same vector instructions (AVX2,
AVX-512) gives the same network; another build or instruction set may round differently, and the
cached file is then what keeps the features fixed (copy ``~/.cache/interconnects/fid`` to compare
runs of two machines exactly).
torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance` and
:class:`~torchmetrics.image.kid.KernelInceptionDistance` use it as their feature extractor.

``fid_features=inception`` uses the standard Inception-v3 features instead; they need the
``torch-fidelity`` package and its weights download.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

FID_FEATURES = ("classifier", "inception")
# KID keeps every feature vector: a few thousand 128-wide vectors here, so its memory notice says nothing
warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save all extracted features")
#: Bumped whenever the classifier or its training changes, so that old cache entries are not reused.
CLASSIFIER_VERSION = 2
CLASSIFIER_EPOCHS = 3


class FeatureClassifier(nn.Module):
    """A small CNN classifier of images in ``[0, 1]``: ``[B, C, H, W] -> logits [B, num_classes]``;
    :meth:`features` gives the ``[B, num_features]`` penultimate activations FID is measured on."""

    def __init__(self, in_channels: int, num_classes: int, num_features: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, num_features), nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = num_features

    def features(self, images: Tensor) -> Tensor:
        """``images [B, C, H, W]`` in ``[0, 1]`` → features ``[B, num_features]``."""
        return self.body(images.float())

    def forward(self, images: Tensor) -> Tensor:
        """``images [B, C, H, W]`` in ``[0, 1]`` → logits ``[B, num_classes]``."""
        return self.head(self.features(images))


class ClassifierFeatures(nn.Module):
    """The feature extractor torchmetrics calls: ``images [B, C, H, W]`` in ``[0, 1]`` → ``[B, F]``.
    ``num_features`` tells torchmetrics the width without a dummy forward pass."""

    def __init__(self, classifier: FeatureClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images)


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features (torch-fidelity's weights) of images in ``[0, 1]``: grey images are
    repeated to 3 channels, and the network resizes to 299×299 itself. ``[B, C, H, W] -> [B, 2048]``."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        self.num_features = 2048

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net((images.clamp(0, 1) * 255).to(torch.uint8))


def check_fid_features(value: str) -> None:
    """One-line ``ValueError`` for a ``task.fid_features`` value that cannot be used here."""
    if value not in FID_FEATURES:
        raise ValueError(f"task.fid_features={value!r} is not supported; choose one of {', '.join(map(repr, FID_FEATURES))}")
    if value == "inception" and importlib.util.find_spec("torch_fidelity") is None:
        raise ValueError(
            "task.fid_features='inception' needs the torch-fidelity package and its Inception weights "
            "download; install torch-fidelity on a machine with internet, or use task.fid_features=classifier"
        )


def cache_dir() -> Path:
    """Where trained feature classifiers are kept: ``$XDG_CACHE_HOME/interconnects/fid`` (default ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "interconnects" / "fid"


def dataset_key(name: str, root: str | None, images: Tensor) -> str:
    """``name-count-hash``: the dataset's name, image count and a hash of its root and its images."""
    digest = hashlib.sha256()
    digest.update(f"{name}|{root}|{CLASSIFIER_VERSION}|{CLASSIFIER_EPOCHS}".encode())
    digest.update(images.contiguous().numpy().tobytes())
    return f"{name}-{len(images)}-{digest.hexdigest()[:16]}"


def train_classifier(images: Tensor, labels: Tensor, num_classes: int, epochs: int = CLASSIFIER_EPOCHS,
                     seed: int = 0) -> FeatureClassifier:
    """Train a :class:`FeatureClassifier` on ``images uint8 [N, C, H, W]``, ``labels [N]``, on the
    CPU, bit-reproducibly: one thread and deterministic algorithms for the duration (the caller's
    settings are restored after), the weights and the batch order from their own seeded generators
    (the same network for the same data, whatever the run's seed or threads)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = FeatureClassifier(images.shape[1], num_classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, foreach=False)
        pixels = images.cpu().float() / 255
        labels = labels.cpu()
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for batch in order.split(128):
                loss = F.cross_entropy(model(pixels[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    return model.eval().requires_grad_(False)


def load_or_train_classifier(name: str, root: str | None, images: Tensor, labels: Tensor,
                             num_classes: int) -> tuple[FeatureClassifier, Path]:
    """The cached classifier of this dataset, or a new one trained and written to the cache
    atomically (a temporary file renamed into place, so two runs never read half a file)."""
    path = cache_dir() / f"{dataset_key(name, root, images)}.pt"
    if path.exists():
        model = FeatureClassifier(images.shape[1], num_classes)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval().requires_grad_(False), path
    with torch.inference_mode(False):
        model = train_classifier(images, labels, num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(model.state_dict(), f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return model, path


def feed(metric, images: Tensor, real: bool, batch_size: int = 256) -> None:
    """Add ``images [N, C, H, W]`` (``uint8``, or floats in ``[0, 1]``) to an FID / KID ``metric`` as
    its ``real`` or generated side, ``batch_size`` at a time (on the metric's device)."""
    device = next(iter(metric.parameters()), torch.empty(0)).device
    for chunk in images.split(batch_size):
        pixels = chunk.float() / 255 if chunk.dtype == torch.uint8 else chunk.float()
        metric.update(pixels.to(device), real=real)


def real_fid(features: nn.Module, reference: Tensor, other: Tensor) -> float:
    """FID between two sets of real images (``[N, C, H, W]``, ``uint8`` or ``[0, 1]``) in ``features``:
    the floor of a generator's FID against ``reference`` when it is measured with as many samples as
    ``other`` holds (0 for a set against itself)."""
    fid = build_fid(features)
    feed(fid, reference, real=True)
    feed(fid, other, real=False)
    return float(fid.compute())


def build_fid(features: nn.Module) -> FrechetInceptionDistance:
    """FID measured on ``features`` (images in ``[0, 1]`` → ``[B, F]``)."""
    return FrechetInceptionDistance(feature=features, normalize=True)


def build_metrics(features: nn.Module, kid_subset_size: int) -> tuple[FrechetInceptionDistance, KernelInceptionDistance]:
    """FID and KID measured on ``features`` (images in ``[0, 1]`` → ``[B, F]``)."""
    fid = build_fid(features)
    kid = KernelInceptionDistance(feature=features, normalize=True, subsets=50, subset_size=kid_subset_size)
    return fid, kid
