"""The task protocol: what a task owns, and what the engine asks of it.

The engine (:class:`interconnects.engine.loop.Trainer`) owns the loop: devices, precision, the
optimizers and schedulers, checkpoints, signals, logging and ranks. A task owns what one step
computes and which networks it trains. Classification, reconstruction and the GAN are three tasks
on the same engine.

A task is an ``nn.Module`` holding every network it trains (its ``state_dict`` is what a checkpoint
stores, EMA copies included), built from the run's config by :meth:`Task.from_config`.

The step. The engine calls ``training_step(batch, forward, optimize)``:

- ``forward(module, *inputs, **kwargs)`` runs ``module`` under the run's precision, ``torch.compile``
  and DistributedDataParallel wrapping; a task calls its networks through it.
- ``optimize(group, loss)`` clears the gradients of *every* optimizer of the task, runs the backward
  pass of ``loss``, clips, checks for non-finite values and steps the optimizer of ``group``. A task
  with several networks (a GAN) calls it once per network and step; gradients a generator's loss
  leaves in the discriminator never reach the discriminator's next step.

The engine then updates the grad scaler once, steps the schedulers and counts the step.

Evaluation. ``evaluation_step(batch, forward)`` returns *sums* over the batch (tensors of any
shape, a confusion matrix for example); the engine adds them up over the batches (and across
ranks) and ``summarize(sums, split)`` turns them into the split's metrics. A task whose metric is
not a sum (FID) keeps its own state, reset by :meth:`Task.start_evaluation`, and reads it in
``summarize``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import Tensor, nn

Forward = Callable[..., Any]
Optimize = Callable[[str, Tensor], None]


class Task(nn.Module):
    """Base class of every task. Subclasses set :attr:`monitor` / :attr:`monitor_mode` and
    implement :meth:`from_config`, :meth:`optimizer_groups`, :meth:`training_step`,
    :meth:`evaluation_step` and :meth:`summarize`; the rest have working defaults."""

    #: The validation metric that picks ``best.ckpt`` and that sweepers optimise (``val/acc``).
    monitor: str = "val/loss"
    #: ``"max"`` when higher is better, else ``"min"``.
    monitor_mode: str = "min"

    @classmethod
    def from_config(cls, cfg, info) -> "Task":
        """Build the task and all its networks from the run's composed config ``cfg`` (groups
        ``backbone``, ``interconnect``, ``gnn``, ``decoder``, ``task``) for data described by
        ``info`` (:class:`interconnects.data.DataInfo`). A bad value raises a one-line
        ``ValueError`` naming the key as written on the command line."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_config")

    def setup(self, data) -> None:
        """Called once with the run's :class:`interconnects.data.DataBundle` before training or
        evaluation (a GAN prepares its feature network for FID here). Default: nothing."""

    def networks(self) -> dict[str, nn.Module]:
        """``{name: network}`` the task calls through ``forward`` (what DistributedDataParallel
        wraps). Default: every direct child module."""
        return dict(self.named_children())

    def uncompiled(self) -> dict[str, str]:
        """``{name: why}``: networks of :meth:`networks` that ``trainer.compile=true`` must leave
        uncompiled (a step that differentiates their gradients: ``torch.compile`` has no double
        backward). Default: none."""
        return {}

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{group: parameters}``, one optimizer (and scheduler) each, configured as
        ``optimizer.<group>`` (or one shared ``optimizer`` config for every group)."""
        raise NotImplementedError

    def training_step(self, batch, forward: Forward, optimize: Optimize) -> Mapping[str, Tensor]:
        """One step on ``batch``; returns detached scalar metrics for the progress bar and logs."""
        raise NotImplementedError

    def start_evaluation(self, split: str) -> None:
        """Called before the first ``evaluation_step`` of a split; resets any state kept by the task."""

    def evaluation_step(self, batch, forward: Forward) -> Mapping[str, Tensor]:
        """Sums over ``batch`` (tensors, any shape), added up by the engine over the split."""
        raise NotImplementedError

    def summarize(self, sums: Mapping[str, Tensor], split: str) -> dict[str, float]:
        """The split's metrics (without the ``split/`` prefix) from the summed evaluation steps."""
        raise NotImplementedError

    def pictures(self, batch, forward: Forward) -> dict[str, Any]:
        """Pictures of what the model does on a few fixed validation images, logged at each
        validation epoch's end: ``{tag: image [C, H, W] or [N, C, H, W] in [0, 1], or a matplotlib
        figure}``. Default: none."""
        return {}

    def test_pictures(self, sums: Mapping[str, Tensor]) -> dict[str, Any]:
        """Pictures from the test split's summed evaluation (a confusion matrix). Default: none."""
        return {}

    def graph_input(self, batch) -> tuple[nn.Module, Any] | None:
        """``(network, example input)`` whose traced graph TensorBoard shows, from a few images of
        ``batch``; ``None``: nothing to show. Default: none."""
        return None

    def parameter_table(self) -> list[tuple[str, int]]:
        """``[(stage, trainable parameters)]`` printed at the start of a run, then the total."""
        rows = [(name, sum(p.numel() for p in m.parameters() if p.requires_grad)) for name, m in self.named_children()]
        rows.append(("total", sum(n for _, n in rows)))
        return rows
