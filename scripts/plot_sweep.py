"""Plot a sweep: each swept parameter against the final metric of its jobs, as PNG files.

    python scripts/plot_sweep.py SWEEP_DIR                  # writes SWEEP_DIR/plots/<parameter>.png
    python scripts/plot_sweep.py SWEEP_DIR --metric test/acc --out DIR

A sweep directory is what ``python train.py -m ...`` writes (``multirun/<time>/``): one folder per
job with its ``.hydra/overrides.yaml`` and, once it has finished, its ``metrics.json``. The swept
parameters are the overrides whose value differs between jobs; numbers are plotted on a number axis
(logarithmic when they span two decades or more), anything else as categories. The metric is
``--metric``, else the sweep's ``optimized_metric``, else ``val/acc``. Jobs without
``metrics.json`` (failed or unfinished) are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from matplotlib.figure import Figure

from interconnects.viz import report_written
from interconnects.console import run_script

DEFAULT_METRIC = "val/acc"


class SweepError(ValueError):
    """SWEEP_DIR cannot be plotted; the message says why."""


def file_name(key: str) -> str:
    return re.sub(r"[^\w.-]+", "_", key).strip("_") or "untitled"


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders under ``sweep_dir`` (those with ``.hydra/overrides.yaml``), in job order."""
    jobs = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    return sorted(jobs, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def overrides_of(job: Path, parser: OverridesParser) -> dict[str, object]:
    """``{key: value}`` of a job's command-line overrides, values typed as Hydra reads them."""
    lines = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    values = {}
    for override in parser.parse_overrides([str(line) for line in lines]):
        if override.is_delete():
            continue
        value = override.value()
        values[override.key_or_group] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return values


def optimized_metric(job: Path) -> str | None:
    """The job's ``optimized_metric`` from its stored config, if it sets one."""
    try:
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    metric = config.get("optimized_metric") if isinstance(config, dict) else None
    return metric if isinstance(metric, str) and metric else None


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_parameter(key: str, points: list[tuple[object, float]], metric: str, path: Path) -> None:
    """``metric`` against the values of ``key``: one dot per job, a line through the per-value means."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    by_value: dict[object, list[float]] = defaultdict(list)
    for value, result in points:
        by_value[value].append(result)
    if all(is_number(v) for v in by_value):
        xs = sorted(by_value)
        ax.scatter([v for v, _ in points], [r for _, r in points], alpha=0.6, label="job")
        ax.plot(xs, [statistics.fmean(by_value[x]) for x in xs], marker="D", label="mean")
        if min(xs) > 0 and max(xs) / min(xs) >= 100:
            ax.set_xscale("log")
    else:
        categories = sorted(by_value, key=str)
        where = {c: i for i, c in enumerate(categories)}
        ax.scatter([where[v] for v, _ in points], [r for _, r in points], alpha=0.6, label="job")
        ax.plot(range(len(categories)), [statistics.fmean(by_value[c]) for c in categories],
                marker="D", linestyle="none", label="mean")
        ax.set_xticks(range(len(categories)), [str(c) for c in categories],
                      rotation=45 if len(categories) > 6 else 0)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against {key} ({len(points)} jobs)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)


def plot_sweep(sweep_dir: Path, metric: str | None = None, out: Path | None = None) -> tuple[list[Path], list[str]]:
    """Write one plot per swept parameter into ``out`` (default ``sweep_dir/plots``);
    returns ``(files written, notes about skipped jobs)``."""
    if not sweep_dir.is_dir():
        raise SweepError(f"SWEEP_DIR={str(sweep_dir)!r} is not a directory")
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise SweepError(f"SWEEP_DIR={str(sweep_dir)!r} is not a sweep directory: no job folder with "
                         ".hydra/overrides.yaml under it (made by python train.py -m ...)")
    metric = metric or next((m for m in map(optimized_metric, jobs) if m), None) or DEFAULT_METRIC
    parser = OverridesParser.create()
    notes: list[str] = []
    results: list[tuple[dict[str, object], float]] = []
    for job in jobs:
        name = job.relative_to(sweep_dir)
        metrics_path = job / "metrics.json"
        if not metrics_path.is_file():
            notes.append(f"note: job {name} has no metrics.json (failed or unfinished); skipped")
            continue
        try:
            metrics = json.loads(metrics_path.read_text())
        except ValueError:
            notes.append(f"note: job {name} has an unreadable metrics.json; skipped")
            continue
        if not is_number(metrics.get(metric)):
            notes.append(f"note: job {name} has no {metric} in metrics.json; skipped")
            continue
        results.append((overrides_of(job, parser), float(metrics[metric])))
    if not results:
        raise SweepError(f"no job under SWEEP_DIR={str(sweep_dir)!r} has a finished {metric} to plot "
                         f"({len(jobs)} jobs; choose another metric with --metric)")
    keys = sorted({k for values, _ in results for k in values})
    swept = [k for k in keys if len({repr(values.get(k)) for values, _ in results}) > 1]
    if not swept:
        raise SweepError(f"no parameter varies between the {len(results)} finished jobs under "
                         f"SWEEP_DIR={str(sweep_dir)!r}; nothing to plot")
    out = out or sweep_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key in swept:
        path = out / f"{file_name(key)}.png"
        plot_parameter(key, [(values.get(key), result) for values, result in results], metric, path)
        written.append(path)
    return written, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR", help="a sweep directory written by train.py -m")
    parser.add_argument("--metric", default=None,
                        help=f"the metrics.json key to plot (default: the sweep's optimized_metric, else {DEFAULT_METRIC})")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNG files (default SWEEP_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written, notes = plot_sweep(args.sweep_dir, args.metric, args.out)
    except (SweepError, OSError, yaml.YAMLError, HydraException) as exc:
        print(f"error: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}", file=sys.stderr)
        return 2
    return report_written(written, args.out or args.sweep_dir / "plots", notes)


if __name__ == "__main__":
    run_script(main)
