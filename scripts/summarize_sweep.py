"""One table of every job of a sweep (``python train.py -m ...``): best first.

    python scripts/summarize_sweep.py SWEEP_DIR           # markdown
    python scripts/summarize_sweep.py SWEEP_DIR --csv     # CSV
    python scripts/summarize_sweep.py SWEEP_DIR --metric test/acc --mode max
    python scripts/summarize_sweep.py SWEEP_DIR --per-class   # also test/acc/<class>, val/acc/<class>

Each row: the job's directory, the overrides that vary across the sweep (those shared by every job
are printed above the table), its status, final metrics (``metrics.json``), wall time (``job.json``),
and for failed jobs their one-line error. Jobs sorted best first by the optimised metric (the sweep's
``optimized_metric``; max, or min for losses and errors, or the Optuna sweeper's direction); when
jobs differ only by ``seed``, each row also gets the mean ± std of its group, and groups are ordered
by that mean.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from interconnects.config import sweep_jobs  # noqa: E402 - the repository's own package, not an installed copy
from interconnects.console import run_script  # noqa: E402


def load_jobs(sweep_dir: Path) -> list[dict]:
    """Every job directory under ``sweep_dir``: ``{dir, overrides, status, exit_code, error, wall_time_s, metrics}``."""
    recorded = dict(sweep_jobs(sweep_dir))
    dirs = set(recorded) | {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    dirs.discard(sweep_dir)
    jobs = []
    for job_dir in dirs:
        record = recorded.get(job_dir, {})
        overrides = record.get("overrides")
        if overrides is None and (job_dir / ".hydra" / "overrides.yaml").is_file():
            overrides = list(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
        try:
            metrics = json.loads((job_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        status = record.get("status") or ("ok" if metrics else "unknown")
        jobs.append({"dir": job_dir, "overrides": [str(o) for o in overrides or []], "status": status,
                     "exit_code": record.get("exit_code"), "error": record.get("error"),
                     "wall_time_s": record.get("wall_time_s"), "metrics": metrics,
                     "num": record.get("job_num"), "optimized_metric": record.get("optimized_metric"),
                     "mode": record.get("mode")})
    return jobs


def sweep_settings(sweep_dir: Path, jobs: list[dict]) -> tuple[str, str | None]:
    """``(optimised metric, direction or None)``: what the jobs recorded in ``job.json``, else the
    sweep's ``multirun.yaml`` or a job's config."""
    for job in jobs:
        if job.get("optimized_metric"):
            direction = {"max": "maximize", "min": "minimize"}.get(job.get("mode") or "")
            return job["optimized_metric"], direction
    for path in [sweep_dir / "multirun.yaml"] + [j["dir"] / ".hydra" / "config.yaml" for j in jobs]:
        if path.is_file():
            cfg = OmegaConf.load(path)
            metric = OmegaConf.select(cfg, "optimized_metric", default=None)
            direction = OmegaConf.select(cfg, "hydra.sweeper.direction", default=None)
            if metric:
                return str(metric), (str(direction) if direction else None)
    return "val/acc", None


def sweep_settings_direction(sweep_dir: Path) -> str | None:
    """The sweeper's ``direction`` in the sweep's ``multirun.yaml`` (Optuna searches), else ``None``."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    direction = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.direction", default=None)
    return str(direction) if direction else None


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def summarize(sweep_dir: Path, metric: str | None = None, mode: str | None = None,
              per_class: bool = False) -> tuple[list[str], list[dict], list[str]]:
    """``(columns, rows best first, overrides shared by every job)``; the per-class metrics
    (``test/acc/<class>``) are columns only with ``per_class``."""
    jobs = load_jobs(sweep_dir)
    default_metric, direction = sweep_settings(sweep_dir, jobs)
    metric = metric or default_metric
    if mode is None:
        # (the Optuna sweeper's direction, when it ran the sweep, is what the search optimised)
        optuna = sweep_settings_direction(sweep_dir)
        mode = {"maximize": "max", "minimize": "min"}.get(optuna or direction or "", None)
        mode = mode or ("min" if metric.rsplit("/", 1)[-1].startswith(("loss", "error", "fid")) else "max")
    shared = [o for o in (jobs[0]["overrides"] if jobs else []) if all(o in j["overrides"] for j in jobs)]
    for job in jobs:
        job["varying"] = [o for o in job["overrides"] if o not in shared]
        job["group"] = tuple(o for o in job["varying"] if key_of(o) != "seed")
        value = job["metrics"].get(metric)
        job["value"] = float(value) if isinstance(value, (int, float)) and job["status"] == "ok" else math.nan

    sign = -1.0 if mode == "max" else 1.0
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        groups.setdefault(job["group"], []).append(job)
    seeded = any(key_of(o) == "seed" for j in jobs for o in j["varying"])
    for members in groups.values():
        values = [j["value"] for j in members if math.isfinite(j["value"])]
        mean = statistics.fmean(values) if values else math.nan
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        for job in members:
            job["group_mean"], job["group_std"], job["group_n"] = mean, std, len(values)

    def order(job: dict) -> tuple:
        finite = math.isfinite(job["value"])
        group_value = job["group_mean"] if seeded else job["value"]
        return (not finite, sign * group_value if finite else 0.0, job["group"], sign * job["value"] if finite else 0.0,
                job["num"] if job["num"] is not None else math.inf, str(job["dir"]))

    jobs.sort(key=order)
    metric_keys = sorted({k for j in jobs for k in j["metrics"] if "/" in k and k != metric
                          and k.startswith(("test/", "val/")) and (per_class or k.count("/") == 1)},
                         key=lambda k: (not k.startswith("test/"), k))
    columns = ["job", "overrides", "status", metric, *metric_keys, "epochs", "wall time (s)"]
    if seeded:
        columns.insert(4, f"{metric} over seeds")
    columns.append("error")
    rows = []
    for job in jobs:
        row = {"job": str(job["dir"].relative_to(sweep_dir)), "overrides": " ".join(job["varying"]),
               "status": job["status"] if job["exit_code"] in (None, 0) else f"{job['status']} ({job['exit_code']})",
               "epochs": job["metrics"].get("epochs"), "wall time (s)": Seconds(job["wall_time_s"]) if job["wall_time_s"] is not None else None,
               "error": job["error"] or ""}
        for key in (metric, *metric_keys):
            row[key] = job["metrics"].get(key) if job["status"] == "ok" else None
        if seeded:
            row[f"{metric} over seeds"] = ((job["group_mean"], job["group_std"], job["group_n"])
                                          if job["group_n"] > 1 and math.isfinite(job["value"]) else None)
        rows.append(row)
    return columns, rows, shared


class Seconds(float):
    """A wall time: one decimal in the markdown table."""


def cell(value, csv_mode: bool = False) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        mean, std, n = value
        return f"{mean:.4f} ± {std:.4f} (n={n})"
    if isinstance(value, Seconds):
        return f"{float(value):.1f}" if not csv_mode else str(float(value))
    if isinstance(value, float):
        return f"{value:.4f}" if not csv_mode else repr(value)
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the sweep's directory (hydra.sweep.dir)")
    parser.add_argument("--csv", action="store_true", help="print CSV instead of markdown")
    parser.add_argument("--metric", help="the metric to sort by (default: the sweep's optimized_metric)")
    parser.add_argument("--mode", choices=("max", "min"), help="best is the highest (max) or lowest (min) value")
    parser.add_argument("--per-class", action="store_true", help="also a column per class metric (test/acc/<class>)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: sweep directory {args.sweep_dir} does not exist", file=sys.stderr)
        return 2
    columns, rows, shared = summarize(args.sweep_dir, args.metric, args.mode, args.per_class)
    if not rows:
        print(f"error: no job directories (with .hydra/ or job.json) under {args.sweep_dir}", file=sys.stderr)
        return 2
    if args.csv:
        writer = csv.writer(sys.stdout)
        flat = [c for c in columns if not c.endswith("over seeds")]
        seeds = [c for c in columns if c.endswith("over seeds")]
        writer.writerow(flat + [f"{c} {s}" for c in seeds for s in ("mean", "std", "n")])
        for row in rows:
            group = [row[c] for c in seeds]
            writer.writerow([cell(row[c], True) for c in flat]
                            + [cell(v, True) for g in group for v in (g or ("", "", ""))])
        return 0
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"sweep {args.sweep_dir}: {len(rows)} job(s), {len(rows) - failed} finished, {failed} failed or unfinished")
    if shared:
        print(f"every job: {' '.join(shared)}")
    print()
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---:" if c not in ("job", "overrides", "status", "error") else "---" for c in columns) + " |")
    for row in rows:
        print("| " + " | ".join(cell(row[c]).replace("|", "\\|") for c in columns) + " |")
    return 0


if __name__ == "__main__":
    run_script(main)
