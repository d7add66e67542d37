"""``hydra/sweeper=interconnects_optuna``: an Optuna study driven by ask-and-tell, its trials launched
as Hydra jobs by whichever launcher is configured (basic, joblib, submitit).

The study lives in an sqlite file in the sweep directory (``optuna.db``), so launching the search
again with the same ``hydra.sweep.dir`` resumes it: trials an interrupted search left running are
launched again first, with their own parameters, in their own directories (``<sweep dir>/<trial
number>``, where the job resumes from its own ``last.ckpt``), then new trials are asked until the
study holds ``n_trials`` finished ones. A job that returns no finite value is a failed trial; it
does not stop the search.

Optuna is imported when the sweep starts, not when Hydra scans its plugins, so ``--help`` stays fast.
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.interconnects_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    direction: str = "maximize"  # maximize | minimize: what to do with the value train.py returns
    study_name: str = "study"
    # null: sqlite:///<hydra.sweep.dir>/optuna.db; any Optuna storage URL otherwise
    storage: Optional[str] = None
    n_trials: int = 20  # finished trials (complete, pruned or failed) the study should hold
    n_jobs: int = 1  # trials launched together (run in parallel by a parallel launcher)
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    # key: Hydra sweep syntax, e.g. optimizer.lr: tag(log, interval(1e-4, 1e-2)); gnn: choice(gcn, gat)
    params: Dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="interconnects_optuna", node=OptunaSweeperConf,
                             provider="interconnects")


def to_distribution(override: Override):
    """The Optuna distribution of one sweep override (``choice``, ``range``, ``interval``, ``a,b,c``;
    ``tag(log, ...)`` samples on a log scale, ``tag(int, interval(...))`` integers)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key, value = override.get_key_element(), override.value()
    if not override.is_sweep_override():
        return None
    tags = set(value.tags or ())
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution([v for v in override.sweep_iterator(transformer=lambda x: x)])
    if isinstance(value, RangeSweep):
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(value.start, value.stop - 1, step=value.step, log="log" in tags)
        return CategoricalDistribution(list(override.sweep_iterator(transformer=lambda x: x)))
    if isinstance(value, IntervalSweep):
        if "int" in tags:
            return IntDistribution(int(value.start), int(value.end), log="log" in tags)
        return FloatDistribution(float(value.start), float(value.end), log="log" in tags)
    raise ValueError(f"hydra.sweeper.params.{key}={override.input_line!r}: use choice(...), range(...), "
                     "interval(...) or a,b,c")


def _format(value: Any) -> str:
    return "null" if value is None else str(value)


class OptunaSweeper(Sweeper):
    """Ask-and-tell over an Optuna study; each trial is one Hydra job, ``hydra.job.num`` = trial number."""

    def __init__(self, direction: str, study_name: str, storage: Optional[str], n_trials: int, n_jobs: int,
                 sampler: Any, params: Optional[Dict[str, str]] = None) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"hydra.sweeper.direction={direction!r} is not supported; choose maximize or minimize")
        if n_trials < 1 or n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_trials={n_trials}, n_jobs={n_jobs}: both must be ≥ 1")
        self.direction, self.study_name, self.storage = direction, study_name, storage
        self.n_trials, self.n_jobs, self.sampler_cfg = n_trials, n_jobs, sampler
        self.params = dict(params or {})
        self.config: Optional[DictConfig] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def _search_space(self, arguments: List[str]) -> tuple[dict, list[str]]:
        """``({key: distribution}, fixed overrides)`` from ``hydra.sweeper.params`` and the command
        line (a command-line sweep such as ``seed=1,2`` joins the search as a categorical)."""
        parser = OverridesParser.create()
        space, fixed = {}, []
        lines = [f"{k}={v}" for k, v in self.params.items()]
        for override in parser.parse_overrides(lines) + parser.parse_overrides(arguments):
            key = override.get_key_element()
            distribution = to_distribution(override)
            if distribution is None:
                fixed.append(override.input_line)
                space.pop(key, None)
            else:
                space[key] = distribution
        return space, fixed

    def _storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.sweep_dir / 'optuna.db').resolve()}"

    def sweep(self, arguments: List[str]) -> Any:
        import optuna
        from hydra.utils import instantiate
        from optuna.trial import TrialState

        space, fixed = self._search_space(arguments)
        if not space:
            raise ValueError("hydra.sweeper.params is empty: give at least one key to search, e.g. "
                             "hydra.sweeper.params.optimizer.lr='tag(log, interval(1e-4, 1e-2))'")
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        # (Hydra instantiates the sweeper recursively, so the sampler usually arrives built)
        sampler = instantiate(self.sampler_cfg) if isinstance(self.sampler_cfg, (dict, DictConfig)) else self.sampler_cfg
        study = optuna.create_study(study_name=self.study_name, storage=self._storage_url(), sampler=sampler,
                                    direction=self.direction, load_if_exists=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        finished = [t for t in study.trials if t.state.is_finished()]
        stale = [t for t in study.trials if t.state == TrialState.RUNNING]
        log.info("Optuna study %r in %s: %d finished trial(s), %d to resume, %d wanted", self.study_name,
                 self._storage_url(), len(finished), len(stale), self.n_trials)

        # trials an interrupted search left running: again, with their own numbers and parameters
        for trial in stale:
            self._launch_and_tell(study, [trial.number], [trial.params], fixed)
        while True:
            done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
            if done >= self.n_trials:
                break
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            numbers = [t.number for t in trials]
            if numbers != list(range(numbers[0], numbers[0] + len(numbers))):  # another process shares the study
                for t in trials:
                    self._launch_and_tell(study, [t.number], [t.params], fixed)
            else:
                self._launch_and_tell(study, numbers, [t.params for t in trials], fixed)

        self._report(study)
        return None

    def _launch_and_tell(self, study, numbers: list[int], params: list[dict], fixed: list[str]) -> None:
        """Launch the trials ``numbers`` (consecutive) as jobs ``numbers[0]...``, and tell the study."""
        from optuna.trial import TrialState

        batch = [fixed + [f"{k}={_format(v)}" for k, v in p.items()] for p in params]
        self.validate_batch_is_legal(batch)
        returns = self.launcher.launch(batch, initial_job_idx=numbers[0])
        for number, ret in zip(numbers, returns):
            try:
                value = ret.return_value  # (re-raises what the job raised)
                value = float(value) if value is not None else math.nan
            except Exception as exc:  # noqa: BLE001 - a failed trial, not a failed search
                log.warning("trial %d failed: %s", number, (str(exc).strip().splitlines() or [type(exc).__name__])[0])
                value = math.nan
            state = next(t.state for t in study.get_trials(deepcopy=False) if t.number == number)
            if state.is_finished():
                continue  # the job already told its fate (e.g. pruned from inside the job)
            if math.isfinite(value):
                study.tell(number, value)
            else:
                study.tell(number, state=TrialState.FAIL)
                log.warning("trial %d (job %s) has no finite value: failed", number, number)

    def _report(self, study) -> None:
        from optuna.trial import TrialState

        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        counts = {s.name.lower(): sum(t.state == s for t in study.trials)
                  for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        log.info("Optuna study %r: %s", self.study_name, ", ".join(f"{n} {k}" for k, n in counts.items()))
        if not complete:
            return
        best = study.best_trial
        log.info("best trial %d (%s): value %.6g, %s", best.number, self.sweep_dir / str(best.number), best.value,
                 " ".join(f"{k}={_format(v)}" for k, v in best.params.items()))
        OmegaConf.save(OmegaConf.create({"name": "optuna", "study_name": self.study_name, "best_trial": best.number,
                                         "best_value": best.value, "best_params": best.params}),
                       self.sweep_dir / "optimization_results.yaml")
