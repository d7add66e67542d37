"""torchvision's MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 files under ``data.root``: their table,
IDX files gzip or not, CIFAR pickles, downloads with a quick offline check, and the message that says
where to put the files when they are missing."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

from .cache import cache_dir

# name: (torchvision class, channels, image size, classes, mean, std, folder under root)
SPECS = {
    "mnist": ("MNIST", 1, (28, 28), 10, (0.1307,), (0.3081,), "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", 1, (28, 28), 10, (0.2860,), (0.3530,), "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", 3, (32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", 3, (32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar-100-python"),
}

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
)
# the class names in label order: the names of the class folders data.root=DIR/{train,test}/<class>/ may
# hold instead of torchvision's files (MNIST and Fashion-MNIST: the labels 0..9)
CLASS_NAMES = {"mnist": tuple("0123456789"), "fashion_mnist": tuple("0123456789"),
               "cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}


class DataMissingError(RuntimeError):
    """The dataset is not on disk and cannot be downloaded; the message says where to put it."""


def resolve_root(name: str, root: str | None) -> Path:
    """``data.root`` as a path; null is refused with what to set."""
    if root is None:
        raise ValueError(f"data.root is null; give the folder that holds (or will hold) {name}")
    return Path(root).expanduser()


def reads_class_folders(name: str, root: str | None) -> bool:
    """Whether ``data.root`` holds dataset ``name`` as class folders (``DIR/train/``, ``DIR/test/``)
    rather than torchvision's files (``DIR/<its folder>``, which win when both are there)."""
    base = resolve_root(name, root)
    return not (base / SPECS[name][6]).is_dir() and ((base / "train").is_dir() or (base / "test").is_dir())


def torchvision_layout(name: str, root: str | None) -> str:
    """Where torchvision's files of ``name`` go under ``root``, in words."""
    return f"torchvision's files in {resolve_root(name, root)}/{SPECS[name][6]}"


def _unpack_gzip_raw(raw: Path) -> Path:
    """Decompress ``*.gz`` IDX files next to themselves (what torchvision's MNIST reads with
    ``download=False``); a read-only folder is mirrored into a cache folder instead. Returns the
    root that holds the decompressed ``<name>/raw`` folder."""
    root = raw.parent.parent
    archives = sorted(raw.glob("*-ubyte.gz"))
    missing = [a for a in archives if not a.with_suffix("").exists()]
    if not missing:
        return root
    try:
        for archive in missing:
            _gunzip(archive, archive.with_suffix(""))
        return root
    except OSError:
        cache = cache_dir(root.resolve().as_posix().strip("/").replace("/", "_"))
        target = cache / raw.relative_to(root)
        target.mkdir(parents=True, exist_ok=True)
        for archive in archives:
            if not (target / archive.with_suffix("").name).exists():
                _gunzip(archive, target / archive.with_suffix("").name)
        return cache


def _gunzip(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".part")
    with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    tmp.replace(dst)


def _missing_message(name: str, root: Path, cause: str) -> str:
    cls, channels, size, *_, folder = SPECS[name]
    files = {
        "MNIST": "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
        "FashionMNIST": "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
        "CIFAR10": "the extracted cifar-10-python.tar.gz (data_batch_1..5, test_batch, batches.meta)",
        "CIFAR100": "the extracted cifar-100-python.tar.gz (train, test, meta)",
    }[cls]
    classes = CLASS_NAMES[name]
    named = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
    images = f"{size[0]}×{size[1]} {'grey' if channels == 1 else 'RGB'} images"
    return (
        f"dataset {name!r} is not under {root}/{folder} and could not be downloaded ({cause}); "
        f"put {files} in {root}/{folder}, or its {images} in class folders {root}/train/<class>/ and "
        f"{root}/test/<class>/ (the {len(classes)} classes {named}), or set data.root=DIR to a folder laid out "
        "either way; data=digits runs offline with nothing to download"
    )


# Downloads: a quick reachability probe first, so an offline machine fails in seconds instead of
# waiting on each mirror; then every socket operation of the download has this timeout (seconds).
PROBE_TIMEOUT = 5.0
DOWNLOAD_TIMEOUT = 30.0


def _download_urls(cls) -> list[str]:
    return list(getattr(cls, "mirrors", None) or [getattr(cls, "url", "")])


def _unreachable(urls: list[str], timeout: float = PROBE_TIMEOUT) -> str | None:
    """``None`` if a TCP connection to one of ``urls`` (or to the proxy the environment sets for
    it) opens within ``timeout`` seconds, else why not. Runs in daemon threads: a hanging name
    lookup cannot hold the process."""
    import socket
    import threading
    import time
    import urllib.parse
    import urllib.request

    proxies = urllib.request.getproxies()
    targets = []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            continue
        proxy = proxies.get(parts.scheme) if not urllib.request.proxy_bypass(parts.hostname) else None
        via = urllib.parse.urlsplit(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else parts
        default = 443 if via.scheme == "https" else 80
        targets.append((via.hostname, via.port or default))
    if not targets:
        return None
    done, errors = threading.Event(), []

    def probe(host, port):
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            done.set()
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc.strerror or exc}")

    threads = [threading.Thread(target=probe, args=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    while not done.is_set() and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        done.wait(0.05)
    if done.is_set():
        return None
    host, port = targets[0]
    return f"no network: {errors[0]}" if errors else f"no network: no connection to {host}:{port} within {timeout:g} s"


def load_split(name: str, root: str | None, train: bool, download: bool):
    """The torchvision dataset ``name`` (train or test split) under ``root``.

    Raises :class:`DataMissingError` with where to put the files when it is absent and cannot be
    downloaded (offline machines).
    """
    import torchvision.datasets as tvd

    info = SPECS[name]
    cls = getattr(tvd, info[0])
    base = resolve_root(name, root)
    if info[0] in ("MNIST", "FashionMNIST"):
        raw = base / info[6]
        if raw.is_dir():
            base = _unpack_gzip_raw(raw)
    try:
        return cls(str(base), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataMissingError(_missing_message(name, base, "data.download=false")) from None
    cause = _unreachable(_download_urls(cls))
    if cause:
        raise DataMissingError(_missing_message(name, base, cause))
    import socket

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        return cls(str(base), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        cause = str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else type(exc).__name__
        raise DataMissingError(_missing_message(name, base, cause)) from None
    finally:
        socket.setdefaulttimeout(previous)
