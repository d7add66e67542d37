"""A random-configuration search: every composed configuration trains or is refused cleanly.

``python scripts/fuzz_configs.py --n N --seed S [--jobs J] [--timeout SECONDS]`` composes ``N``
random configurations the way users write them: an option of every config group (listed from
``configs/`` when the search starts, so a new option is tried without a change here), crossed with
the edges of the numeric keys (batch sizes 1, 2, 3 and odd ones, 1-7 training batches, 1-2 epochs,
``k`` and ``num_keypoints`` at 1, at the node count and past it, image sizes that the strides do
not divide, ``val_fraction`` 0 and near 1, zero GNN layers, one hidden channel, grad clipping,
``compile``, ``channels_last``, precision 32 / bf16, ``data=digits`` or the MNIST sample, and
resuming (``ckpt_path=``) or starting from (``init_from=``) an earlier configuration's checkpoint).

Each runs through ``train.py`` in its own process, with a time limit, in its own folder of a
temporary output root. The table at the end counts the runs that

- trained: exit 0 and a ``metrics.json``;
- were refused cleanly: exit 2, exactly one line starting ``error:`` on stderr, no traceback, no run
  directory left behind (and a refused resume leaves the run it named as it was);

and lists every other outcome with the command line that reproduces it (from the repository root).
The exit status is 1 when any run is neither. A run still training at the time limit counts apart,
as slow, when ``train.py`` said so before its first step (its ``expect slow steps`` / ``expect slow
evaluation`` warning, projected from the built networks): the configuration is valid and the user
was told; one stopped at the limit without that warning is neither.

Runs are tiny (narrow networks, a few batches): about 2 s each once the parent process has
imported torch, which it does once and then forks one child per run (``--spawn``: a fresh
interpreter per run instead, about 10 s more each, on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TRAIN = ROOT / "train.py"
MNIST_SAMPLE = "../shared/datasets/mnist-sample"  # relative to the repository root, as the docs write it
#: config groups the search does not choose from: Hydra's own settings (a single run takes no launcher)
SKIP_GROUPS = {"hydra"}
#: group options that need files this search cannot have offline; the data is digits or the MNIST sample
DATA_CHOICES = ("digits", "mnist")
#: the groups an experiment chooses for itself
MODEL_GROUPS = {"backbone", "interconnect", "gnn", "decoder", "task", "optimizer", "scheduler"}


# ---- composing the configurations ------------------------------------------------------------
def group_options(configs: Path = CONFIGS) -> dict[str, list[str]]:
    """``{group: [option, ...]}`` for every config group folder under ``configs`` (top level only)."""
    groups = {}
    for folder in sorted(p for p in configs.iterdir() if p.is_dir() and p.name not in SKIP_GROUPS):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if options:
            groups[folder.name] = options
    return groups


@dataclass
class Spec:
    """One configuration: its ``overrides``, and (for ``ckpt_path=`` / ``init_from=``) the earlier
    configuration whose checkpoint it names, filled in once that one has run."""

    index: int
    overrides: list[str]
    parent: int | None = None
    parent_key: str = ""  # ckpt_path | init_from
    parent_file: str = ""  # last.ckpt | best.ckpt
    kind: str = "fresh"  # fresh | resume | init_from


def _fmap_side(size: int, stride: int) -> int:
    # stride-2, padding-1 3×3 convs: each halves the side, rounding up
    for _ in range(int(math.log2(max(1, stride)))):
        size = (size + 1) // 2
    return size


def _stride(cfg) -> int:
    backbone = str(cfg.backbone.get("_target_", ""))
    if backbone.endswith("SimpleCNN"):
        return int(cfg.backbone.get("output_stride", 4))
    if backbone.endswith("ResNet18"):
        return 2 ** (int(cfg.backbone.get("stage", 4)) - 1)
    if backbone.endswith("Pixels"):
        return 1
    return 4  # (another backbone: a guess; the edges then land near, not on, the node count)


def _has(cfg, key: str) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default="\0missing", throw_on_resolution_failure=False) != "\0missing"


class Composer:
    """Random configurations from the project's config groups, reproducible from ``seed``: the
    ``i``-th depends on ``seed`` and ``i`` only, so a longer search starts with a shorter one's."""

    def __init__(self, seed: int, data_root: str) -> None:
        self.seed, self.data_root = seed, data_root
        self.groups = group_options()

    def compose(self, overrides: list[str]):
        from hydra import compose, initialize_config_dir

        from interconnects.config import register

        register()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            try:
                return compose("train", overrides=overrides)
            except Exception:  # noqa: BLE001 - train.py is then asked to refuse it
                return None

    def groups_of(self, rng: random.Random) -> list[str]:
        """An option of every group; with an experiment (its own choice of model groups) half the
        time only the groups it does not choose."""
        chosen = []
        experiment = "experiment" in self.groups and rng.random() < 0.15
        alone = experiment and rng.random() < 0.5
        for group, options in self.groups.items():
            if group == "data":
                chosen.append(f"data={rng.choice(DATA_CHOICES)}")
            elif group == "experiment":
                if experiment:
                    chosen.append(f"experiment={rng.choice(options)}")
            elif group in ("debug", "hparams_search"):  # optional groups: mostly left out
                if rng.random() < {"debug": 0.15, "hparams_search": 0.04}[group]:
                    chosen.append(f"{group}={rng.choice(options)}")
            elif alone and group in MODEL_GROUPS:
                continue
            elif len(options) > 1 or rng.random() < 0.5:
                chosen.append(f"{group}={rng.choice(options)}")
        if any(o.startswith("data=mnist") for o in chosen):
            chosen.append(f"data.root={self.data_root}")
        return chosen

    def edges_of(self, rng: random.Random, groups: list[str]) -> list[str]:
        """The numeric keys at their edges (only keys the composed config has)."""
        cfg = self.compose(groups)
        pick = rng.choice
        out = ["trainer.progress=false" if rng.random() < 0.9 else "trainer.progress=true",
               f"trainer.limit_train_batches={rng.randint(1, 7)}",
               f"trainer.max_epochs={pick([1, 1, 2])}",
               f"trainer.limit_val_batches={pick([1, 2, 3])}",
               f"trainer.limit_test_batches={pick([1, 2])}",
               f"data.batch_size={pick([1, 2, 3, 5, 7, 9, 13, 32])}",
               # (evaluation batches are 256 images by default: minutes a batch for resnet18 on a CPU)
               f"data.eval_batch_size={pick([1, 2, 3, 7, 16, 33])}",
               f"trainer.precision={pick(['32', '32', 'bf16'])}",
               f"seed={rng.randint(0, 3)}"]
        size = pick([None, None, 9, 13, 17, 23, 28, 30, 31])
        if size is not None:
            out.append(f"data.image_size={size}")
        if rng.random() < 0.4:
            out.append(f"data.val_fraction={pick([0, 0.0, 0.5, 0.9, 0.99, 0.999])}")
        if rng.random() < 0.25:
            out.append(f"trainer.grad_clip={pick([0.01, 0.5, 1.0])}")
        if rng.random() < 0.06:
            out.append("trainer.compile=true")
        if rng.random() < 0.25:
            out.append("trainer.channels_last=true")
        if rng.random() < 0.15:
            out.append("trainer.deterministic=true")
        if rng.random() < 0.25:
            out.append(f"trainer.checkpoint_every_n_steps={pick([0, 1, 2])}")
        if rng.random() < 0.15:
            out.append("trainer.on_nonfinite=skip")
        if rng.random() < 0.2:
            out.append(f"trainer.picture_images={pick([0, 1, 2])}")
        if rng.random() < 0.1:
            out.append("data.num_workers=1")
        if rng.random() < 0.2:
            out.append(f"data.augment={pick(['crop', 'crop_flip', 'crop_altflip', 'affine'])}")
            if rng.random() < 0.5:
                out.append(f"data.crop_pad_mode={pick(['zeros', 'reflect'])}")
                out.append(f"data.crop_padding={pick([0, 2, 30])}")
        if rng.random() < 0.15:
            out.append(f"trainer.lookahead_every={pick([1, 2, 5])}")
        if cfg is None:
            return out
        # tiny widths, so a run costs seconds
        for key, values in (("backbone.width", [1, 2, 4, 8]), ("gnn.hidden_channels", [1, 4, 8]),
                            ("decoder.channels", [1, 4, 8]), ("task.channels", [4, 8]),
                            ("task.generator.channels", [4, 8]), ("task.discriminator.channels", [4, 8]),
                            ("task.discriminator.hidden", [1, 8]), ("task.num_samples", [1, 2, 16, 64]),
                            ("task.kid_subset_size", [1, 2, 16, 64]), ("task.sample_grid", [1, 4]),
                            ("task.generator.latent_dim", [1, 4])):
            if values and _has(cfg, key) and cfg_value(cfg, key) is not None:
                out.append(f"{key}={pick(values)}")
        if _has(cfg, "gnn.num_layers") and rng.random() < 0.6:
            out.append(f"gnn.num_layers={pick([0, 1, 2])}")
        if _has(cfg, "task.generator.num_layers") and rng.random() < 0.3:
            out.append(f"task.generator.num_layers={pick([0, 1])}")
        if _has(cfg, "interconnect.edge_shift") and rng.random() < 0.1:
            out.append(f"interconnect.edge_shift={pick([-0.2, 0.5])}")  # refused unless a dense distance scheme
        if _has(cfg, "backbone.output_stride") and rng.random() < 0.3:
            out.append(f"backbone.output_stride={pick([1, 2, 4, 8])}")
        if _has(cfg, "backbone.stage") and rng.random() < 0.5:
            out.append(f"backbone.stage={pick([1, 2, 3, 4])}")
        # k and num_keypoints at 1, at the node count, past it, and in between
        image = size or int(cfg.data.get("image_size") or 28)
        stride = int(next((o.split("=")[1] for o in out if o.startswith("backbone.output_stride=")), 0)) or _stride(cfg)
        if _has(cfg, "backbone.stage"):
            stage = int(next((o.split("=")[1] for o in out if o.startswith("backbone.stage=")), cfg.backbone.stage))
            stride = 2 ** (stage - 1)
        nodes = _fmap_side(image, stride) ** 2
        for key in ("interconnect.k", "interconnect.num_keypoints", "task.generator.k", "task.discriminator.k"):
            if _has(cfg, key) and rng.random() < 0.7:
                out.append(f"{key}={pick([1, 2, nodes - 1, nodes, nodes + 1, rng.randint(1, max(1, nodes))])}")
        return out

    def spec(self, index: int, earlier: list[Spec]) -> Spec:
        rng = random.Random(f"{self.seed}:{index}")
        fresh = [s for s in earlier if s.kind == "fresh"]
        resumed = {s.parent for s in earlier if s.kind == "resume"}
        roll = rng.random()
        if fresh and roll < 0.12:
            # resume an earlier run: as it was (finished: nothing to do), longer at a constant rate,
            # or with another configuration (refused, naming what differs)
            parents = [s for s in fresh if s.index not in resumed] or None
            if parents:
                parent = rng.choice(parents)
                how = rng.choice(["same", "longer", "other"])
                if how == "same":
                    overrides = list(parent.overrides)
                elif how == "longer":
                    overrides = [o for o in parent.overrides if not o.startswith(("trainer.max_epochs=", "scheduler="))]
                    overrides += ["trainer.max_epochs=3", "scheduler=constant"]
                else:
                    groups = self.groups_of(rng)
                    overrides = groups + self.edges_of(rng, groups)
                return Spec(index, overrides, parent.index, "ckpt_path", pick_file(rng), "resume")
        if fresh and roll < 0.22:
            parent = rng.choice(fresh)
            same_model = rng.random() < 0.5
            overrides = list(parent.overrides) if same_model else None
            if overrides is None:
                groups = self.groups_of(rng)
                overrides = groups + self.edges_of(rng, groups)
            return Spec(index, overrides, parent.index, "init_from", pick_file(rng), "init_from")
        groups = self.groups_of(rng)
        return Spec(index, groups + self.edges_of(rng, groups))

    def specs(self, n: int) -> list[Spec]:
        specs: list[Spec] = []
        for i in range(n):
            specs.append(self.spec(i, specs))
        return specs


def pick_file(rng: random.Random) -> str:
    return rng.choice(["last.ckpt", "last.ckpt", "best.ckpt"])


def cfg_value(cfg, key: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)


# ---- running them ----------------------------------------------------------------------------
@dataclass
class Result:
    spec: Spec
    argv: list[str]
    outcome: str = ""  # trained | refused | slow | other
    reason: str = ""
    code: int | None = None
    seconds: float = 0.0
    run_dir: Path | None = None
    stderr_tail: str = ""


@dataclass
class Launch:
    spec: Spec
    argv: list[str]
    folder: Path
    pid: int = 0
    proc: object = None
    started: float = 0.0
    snapshot: dict = field(default_factory=dict)
    resumed_dir: Path | None = None


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.is_dir() else {}


def _run_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "outputs").glob("*/*") if p.is_dir())


def _slow_warning(folder: Path) -> str:
    """The run's warning that its steps would be slow, when it came before its first training step
    (what it projected: ``about N s``), else ``""``."""
    for line in (folder / "stdout.txt").read_text(errors="replace").splitlines():
        if "first training step:" in line:
            return ""
        if "expect slow steps" in line or "expect slow evaluation" in line:
            said = line.split("expect slow", 1)[1]
            return ("expect slow" + said)[:160]
    return ""


class Runner:
    """Runs specs through ``train.py``, ``jobs`` at a time, each in its own folder under ``root``."""

    def __init__(self, root: Path, timeout: float, jobs: int, spawn: bool, script: Path = TRAIN) -> None:
        self.root, self.timeout, self.jobs, self.spawn, self.script = root, timeout, jobs, spawn, Path(script)
        self.results: dict[int, Result] = {}
        if not spawn and self.script == TRAIN:
            self._preload()

    @staticmethod
    def _preload() -> None:
        """Import what every run imports, once: each forked child then starts in milliseconds."""
        import hydra  # noqa: F401
        import torch  # noqa: F401

        import interconnects.data  # noqa: F401
        import interconnects.engine.run  # noqa: F401
        import interconnects.models.hybrid  # noqa: F401

    def argv(self, spec: Spec) -> list[str] | None:
        """The command's overrides; ``None`` while the earlier run it names has not finished."""
        overrides = list(spec.overrides)
        if spec.parent is not None:
            parent = self.results.get(spec.parent)
            if parent is None:
                return None
            run_dir = parent.run_dir or (self.root / f"{spec.parent:04d}" / "outputs" / "train" / "not-trained")
            overrides.append(f"{spec.parent_key}={run_dir / 'checkpoints' / spec.parent_file}")
        return overrides

    def start(self, spec: Spec, overrides: list[str]) -> Launch:
        folder = self.root / f"{spec.index:04d}"
        folder.mkdir(parents=True)
        launch = Launch(spec, overrides, folder, started=time.monotonic())
        if spec.kind == "resume":
            launch.resumed_dir = self.results[spec.parent].run_dir
            launch.snapshot = _tree(launch.resumed_dir) if launch.resumed_dir else {}
        out, err = open(folder / "stdout.txt", "wb"), open(folder / "stderr.txt", "wb")
        if self.spawn:
            import subprocess

            launch.proc = subprocess.Popen([sys.executable, str(self.script), *overrides], cwd=folder, stdout=out, stderr=err,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
            launch.pid = launch.proc.pid
        else:
            pid = os.fork()
            if pid == 0:  # the child: train.py as a fresh command line would run it
                code = 1
                try:
                    os.setsid()
                    os.chdir(folder)
                    devnull = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(devnull, 0)
                    os.dup2(out.fileno(), 1)
                    os.dup2(err.fileno(), 2)
                    # Python's streams on the new descriptors (this process's may be a test's capture)
                    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)
                    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)
                    sys.argv = [str(self.script), *overrides]
                    import runpy

                    runpy.run_path(str(self.script), run_name="__main__")
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                    if isinstance(exc.code, str):
                        print(exc.code, file=sys.stderr)
                except BaseException:  # noqa: BLE001 - what the interpreter would print, then its status
                    import traceback

                    traceback.print_exc()
                finally:
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    finally:
                        os._exit(code)
            launch.pid = pid
        out.close()
        err.close()
        return launch

    def poll(self, launch: Launch) -> int | None:
        """The exit status when the run ended (a negative one: killed by that signal), else ``None``."""
        if self.spawn:
            return launch.proc.poll()
        pid, status = os.waitpid(launch.pid, os.WNOHANG)
        if pid == 0:
            return None
        return os.waitstatus_to_exitcode(status)

    def kill(self, launch: Launch) -> int:
        try:
            os.killpg(launch.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.spawn:
            return launch.proc.wait()
        return os.waitstatus_to_exitcode(os.waitpid(launch.pid, 0)[1])

    def judge(self, launch: Launch, code: int, timed_out: bool) -> Result:
        folder = launch.folder
        stderr = (folder / "stderr.txt").read_text(errors="replace")
        result = Result(launch.spec, launch.argv, code=code, seconds=time.monotonic() - launch.started,
                        stderr_tail="\n".join(stderr.strip().splitlines()[-6:]))
        made = _run_dirs(folder)
        run_dir = launch.resumed_dir if launch.spec.kind == "resume" and launch.resumed_dir and not made else \
            (made[0] if len(made) == 1 else None)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        traceback = "Traceback (most recent call last)" in stderr
        if timed_out:
            warned = _slow_warning(folder)
            if warned:
                result.outcome, result.reason = "slow", f"stopped at the {self.timeout:g} s limit; warned: {warned}"
            else:
                result.outcome, result.reason = "other", f"no exit within {self.timeout:g} s (killed)"
        elif code == 0 and run_dir is not None and (run_dir / "metrics.json").is_file() and not traceback:
            result.outcome, result.run_dir = "trained", run_dir
        elif code == 2 and len(errors) == 1 and not traceback and not made:
            changed = launch.snapshot and _tree(launch.resumed_dir) != launch.snapshot
            if changed:
                result.outcome, result.reason = "other", f"refused, but the resumed run {launch.resumed_dir} was changed"
            else:
                result.outcome, result.reason = "refused", errors[0]
        else:
            why = []
            if code != 0 and code != 2:
                why.append(f"exit {code}")
            if code == 0:
                why.append("exit 0 without metrics.json" if run_dir is None or not (run_dir / "metrics.json").is_file()
                           else "exit 0")
            if code == 2:
                why.append("exit 2")
                if len(errors) != 1:
                    why.append(f"{len(errors)} 'error:' lines on stderr")
                if made:
                    why.append(f"left {made[0].relative_to(folder)} behind")
            if traceback:
                why.append("a traceback")
            last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
            result.outcome, result.reason = "other", "; ".join(why) + (f": {last.strip()[:200]}" if last else "")
        return result

    def run(self, specs: list[Spec], progress=None) -> list[Result]:
        pending = list(specs)
        running: list[Launch] = []
        while pending or running:
            while len(running) < self.jobs:
                ready = next(((s, a) for s in pending if (a := self.argv(s)) is not None), None)
                if ready is None:
                    break
                pending.remove(ready[0])
                running.append(self.start(*ready))
            time.sleep(0.05)
            for launch in list(running):
                code = self.poll(launch)
                timed_out = code is None and time.monotonic() - launch.started > self.timeout
                if timed_out:
                    code = self.kill(launch)
                if code is None:
                    continue
                running.remove(launch)
                result = self.judge(launch, code, timed_out)
                self.results[launch.spec.index] = result
                if progress:
                    progress(result)
        return [self.results[s.index] for s in specs]


# ---- reporting -------------------------------------------------------------------------------
def command_line(result: Result, data_root: str) -> str:
    """The command that reproduces ``result``, from the repository root."""
    words = [o.replace(f"data.root={data_root}", f"data.root={MNIST_SAMPLE}") for o in result.argv]
    return "python train.py " + " ".join(shlex.quote(w) for w in words)


def report(results: list[Result], data_root: str, seconds: float, out=None) -> int:
    """Print the table, then every run that was slow (warned) or neither trained nor refused, with
    its command line; 1 when one was neither."""
    out = out or sys.stdout
    counts = {k: sum(r.outcome == k for r in results) for k in ("trained", "refused", "slow", "other")}
    times = [r.seconds for r in results]
    print(f"\n{len(results)} configurations in {seconds:.0f} s "
          f"(a run: median {statistics.median(times) if times else 0:.1f} s, max {max(times, default=0):.1f} s)", file=out)
    print("| outcome | runs |\n| --- | ---: |", file=out)
    print(f"| trained (exit 0, metrics.json) | {counts['trained']} |", file=out)
    print(f"| refused cleanly (exit 2, one error: line, nothing left behind) | {counts['refused']} |", file=out)
    print(f"| slow (warned before training, still training at the time limit) | {counts['slow']} |", file=out)
    print(f"| neither | {counts['other']} |", file=out)
    kinds = {}
    for r in results:
        kinds.setdefault(r.spec.kind, {"trained": 0, "refused": 0, "slow": 0, "other": 0})[r.outcome] += 1
    print("by kind: " + ", ".join(f"{k} {v['trained']}/{v['refused']}/{v['slow']}/{v['other']}"
                                  for k, v in sorted(kinds.items())) + " (trained/refused/slow/neither)", file=out)
    for outcome, title in (("slow", "slow, warned"), ("other", "neither")):
        for r in results:
            if r.outcome == outcome:
                print(f"\n#{r.spec.index} ({title}) {r.reason}\n  {command_line(r, data_root)}", file=out)
    return 1 if counts["other"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="configurations to try (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="the search's seed: the same seed, the same configurations")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take before it is killed (default 300)")
    parser.add_argument("--root", type=Path, default=None, help="the output root (default: a temporary folder, removed "
                        "unless a run was neither trained nor refused)")
    parser.add_argument("--spawn", action="store_true", help="a fresh interpreter per run instead of a fork of this one")
    parser.add_argument("--print-only", action="store_true", help="print the command lines, run nothing")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's outcome to this JSON file")
    args = parser.parse_args(argv)
    if args.n < 1 or args.jobs < 1 or args.timeout <= 0:
        parser.error("--n and --jobs must be ≥ 1 and --timeout > 0")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.pop("HYDRA_FULL_ERROR", None)
    sys.path.insert(0, str(ROOT))
    data_root = str((ROOT / MNIST_SAMPLE).resolve())
    specs = Composer(args.seed, data_root).specs(args.n)
    if args.print_only:
        for spec in specs:
            extra = f" {spec.parent_key}=<#{spec.parent} {spec.parent_file}>" if spec.parent is not None else ""
            print(f"#{spec.index} {command_line(Result(spec, spec.overrides), data_root)}{extra}")
        return 0
    keep = args.root is not None
    root = args.root or Path(tempfile.mkdtemp(prefix="fuzz_configs_"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done = 0

    def progress(result: Result) -> None:
        nonlocal done
        done += 1
        what = result.outcome if result.outcome != "refused" else f"refused: {result.reason[7:][:90]}"
        if result.outcome == "other":
            what = f"NEITHER: {result.reason[:120]}"
        elif result.outcome == "slow":
            what = f"slow: {result.reason[:120]}"
        print(f"[{done:>{len(str(args.n))}}/{args.n}] #{result.spec.index} {result.seconds:5.1f} s  {what}", flush=True)

    print(f"{args.n} configurations, seed {args.seed}, {args.jobs} at a time, output root {root}", flush=True)
    results = Runner(root, args.timeout, args.jobs, args.spawn).run(specs, progress)
    status = report(results, data_root, time.monotonic() - started)
    if args.json:
        args.json.write_text(json.dumps([{"index": r.spec.index, "kind": r.spec.kind, "outcome": r.outcome,
                                          "reason": r.reason, "exit": r.code, "seconds": round(r.seconds, 2),
                                          "command": command_line(r, data_root)} for r in results], indent=1))
    if status and not keep:
        print(f"\nthe runs' folders (stdout.txt, stderr.txt, outputs/) are kept in {root}")
    elif not keep:
        shutil.rmtree(root, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
