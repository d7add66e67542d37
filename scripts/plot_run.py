"""Plot one run as PNG files: the curves of its scalars and the latest of each of its pictures.

    python scripts/plot_run.py RUN_DIR               # writes RUN_DIR/plots/*.png
    python scripts/plot_run.py RUN_DIR --out DIR

The run's own TensorBoard event files (``RUN_DIR/tensorboard/``, or event files in ``RUN_DIR``) are
read with TensorBoard's ``EventAccumulator``:

- scalars are grouped by the name after their split, so ``train/loss`` (per step),
  ``train/loss_epoch``, ``val/loss`` and ``test/loss`` share ``loss.png``; per-class scalars
  (``test/acc/<class>``) make a bar chart ``test_acc_per_class.png``; ``lr`` gets its own plot;
- each picture (``graph/keypoints``, ``test/confusion``, ``inputs``, ...) is written as it was at its
  latest step, as ``graph_keypoints.png`` and so on.

A run without event files (``logger=none``) is plotted from ``RUN_DIR/metrics.json``: one bar chart
of the final values per metric.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from interconnects.viz import report_written
from interconnects.console import run_script

SPLITS = ("train", "val", "test")
# written for the HParams tab (a copy of the final metrics) or a counter, not a curve
SKIPPED = re.compile(r"^(hparam/|epoch$)")


class RunError(ValueError):
    """RUN_DIR cannot be plotted; the message says why."""


def file_name(tag: str) -> str:
    """``graph/keypoints`` → ``graph_keypoints``: a tag as a file name."""
    return re.sub(r"[^\w.-]+", "_", tag).strip("_") or "untitled"


def event_dir(run_dir: Path) -> Path | None:
    """The folder holding the run's TensorBoard event files, or None."""
    for folder in (run_dir / "tensorboard", run_dir):
        if folder.is_dir() and any(folder.glob("events.out.tfevents.*")):
            return folder
    return None


def group_of(tag: str) -> tuple[str, str] | None:
    """``(plot, series)`` of a scalar tag: ``val/loss`` → ``("loss", "val")``,
    ``train/loss_epoch`` → ``("loss", "train (epoch mean)")``, ``test/acc/3`` → ``("test/acc", "3")``
    (a per-class bar), ``lr`` → ``("lr", "lr")``; None for tags not worth a plot."""
    if SKIPPED.match(tag):
        return None
    parts = tag.split("/")
    if parts[0] in SPLITS and len(parts) >= 3:
        return f"{parts[0]}/{parts[1]}", "/".join(parts[2:])
    if parts[0] in SPLITS and len(parts) == 2:
        name, series = parts[1], parts[0]
        if name.endswith("_epoch"):
            name, series = name[: -len("_epoch")], f"{series} (epoch mean)"
        return name, series
    return parts[0], tag


def save(fig: Figure, path: Path, written: list[Path]) -> None:
    fig.savefig(path, dpi=100)
    written.append(path)


#: Markers of the series of one plot, in turn: points at the same step and value (the test point of a
#: one-epoch run on its validation point) stay apart by shape.
MARKERS = ("o", "s", "^", "v", "D", "P")


def plot_curves(groups: dict[str, dict[str, list[tuple[int, float]]]], out: Path, written: list[Path]) -> None:
    """One PNG per group: a line per series over the step, each with its own marker shape while it has
    few points. A series of a single value (the test metric; after one epoch, every epoch series) is
    a hollow diamond drawn above the lines, each such series a size smaller than the one before, so
    that points at the same step and value nest inside each other instead of hiding each other."""
    for name, series in sorted(groups.items()):
        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        ax = fig.subplots()
        singles = 0
        for i, (label, points) in enumerate(sorted(series.items(), key=lambda item: (len(item[1]) == 1, item[0]))):
            steps, values = zip(*points)
            if len(points) == 1:
                ax.plot(steps, values, linestyle="none", marker="D", markersize=max(4, 16 - 4 * singles),
                        markerfacecolor="none", markeredgewidth=2, zorder=4 + singles, label=label)
                singles += 1
                continue
            ax.plot(steps, values, marker=MARKERS[i % len(MARKERS)] if len(points) <= 20 else None, markersize=5,
                    label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, out / f"{file_name(name)}.png", written)


def plot_bars(bars: dict[str, dict[str, float]], out: Path, written: list[Path], suffix: str = "") -> None:
    """One bar chart per group: ``{group: {label: value}}``."""
    for name, values in sorted(bars.items()):
        labels = list(values)
        fig = Figure(figsize=(max(4.0, 0.5 * len(labels) + 2.0), 4.0), layout="constrained")
        ax = fig.subplots()
        bars_drawn = ax.bar(range(len(labels)), [values[k] for k in labels])
        ax.bar_label(bars_drawn, fmt="%.4g", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 12 else 0)
        ax.set_title(f"{name} {suffix}".strip())
        ax.grid(axis="y", alpha=0.3)
        save(fig, out / (file_name(f"{name} {suffix}" if suffix else name) + ".png"), written)


def plot_events(folder: Path, out: Path) -> list[Path]:
    """Curves, per-class bars and the latest pictures from the event files in ``folder``."""
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = acc.Tags()
    curves: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(dict)
    bars: dict[str, dict[str, float]] = defaultdict(dict)
    for tag in tags.get(event_accumulator.SCALARS, []):
        where = group_of(tag)
        if where is None:
            continue
        name, series = where
        by_step = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run's rewritten steps: the last
        points = sorted(by_step.items())
        if name.split("/")[0] in SPLITS and "/" in name:
            bars[name][series] = points[-1][1]
        else:
            curves[name][series] = points
    written: list[Path] = []
    plot_curves(curves, out, written)
    plot_bars(bars, out, written, suffix="per class")
    for tag in tags.get(event_accumulator.IMAGES, []):
        # the accumulator's reservoir always keeps the newest event; take the latest step
        latest = max(acc.Images(tag), key=lambda e: (e.step, e.wall_time))
        path = out / f"{file_name(tag)}.png"
        Image.open(io.BytesIO(latest.encoded_image_string)).save(path, format="PNG")
        written.append(path)
    return written


def plot_metrics(metrics_path: Path, out: Path) -> list[Path]:
    """Bar charts of the final values in ``metrics.json``, one per metric name."""
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{metrics_path} cannot be read ({exc})") from None
    bars: dict[str, dict[str, float]] = defaultdict(dict)
    for tag, value in metrics.items():
        where = group_of(tag) if isinstance(value, (int, float)) else None
        if where is not None and "/" in tag:
            bars[where[0]][where[1]] = float(value)
    written: list[Path] = []
    plot_bars(bars, out, written)
    return written


def plot_run(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write the run's plots into ``out`` (default ``run_dir/plots``); returns the files written."""
    if not run_dir.is_dir():
        raise RunError(f"RUN_DIR={str(run_dir)!r} is not a directory")
    folder = event_dir(run_dir)
    metrics = run_dir / "metrics.json"
    if folder is None and not metrics.is_file():
        raise RunError(f"RUN_DIR={str(run_dir)!r} is not a run directory: it has neither TensorBoard event files "
                       "(tensorboard/events.out.tfevents.*) nor metrics.json")
    out = out or run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    return plot_events(folder, out) if folder is not None else plot_metrics(metrics, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by train.py")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNG files (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out)
    except (RunError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report_written(written, args.out or args.run_dir / "plots")


if __name__ == "__main__":
    run_script(main)
