"""Lookahead of the weights, as the fastest CIFAR-10 trainers (airbench94) use it.

Every ``every`` steps the engine moves a slow copy of the trained networks' floating-point state
(weights and batch-norm statistics) towards the live one, ``slow ← slow + (1 − decay)(live − slow)``,
and puts the live networks back at the slow copy. The decay rises over the run as
``decay_base^every · (step / total_steps)^3``: near 0 in the first epochs (the slow copy follows the
weights), about ``0.95^5 = 0.77`` at the end (it averages the last few hundred steps). After the last
step the networks take the slow copy. The slow copy is part of the checkpoint, so a resumed run takes
the same steps as an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Lookahead:
    """``trainer.lookahead_every`` / ``trainer.lookahead_decay`` over ``networks`` (``{name:
    module}``, the task's trained networks) for a run of ``total_steps`` steps."""

    def __init__(self, networks: dict[str, nn.Module], every: int, decay: float, total_steps: int) -> None:
        self.every, self.decay, self.total_steps = int(every), float(decay), int(total_steps)
        # the live tensors (state_dict() entries share the parameters' and buffers' storage)
        self.live: list[Tensor] = [t for _, net in sorted(networks.items()) for t in net.state_dict().values()
                                   if t.is_floating_point()]
        self.slow: list[Tensor] = [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def reset(self) -> None:
        """Start the slow copy afresh from the networks' current weights (a checkpoint without one)."""
        torch._foreach_copy_(self.slow, self.live)

    def decay_at(self, step: int) -> float:
        """The decay of the update after ``step`` steps."""
        return self.decay ** self.every * (min(step, self.total_steps) / max(1, self.total_steps)) ** 3

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after each optimizer step with the steps taken so far (1-based)."""
        if step % self.every == 0:
            torch._foreach_lerp_(self.slow, self.live, 1.0 - self.decay_at(step))
            torch._foreach_copy_(self.live, self.slow)
        if step == self.total_steps:  # the run's last step: the networks take the slow copy
            torch._foreach_copy_(self.live, self.slow)

    def state_dict(self) -> dict:
        return {"every": self.every, "decay": self.decay, "slow": [t.clone() for t in self.slow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        slow = state["slow"]
        if len(slow) != len(self.slow) or any(a.shape != b.shape for a, b in zip(slow, self.slow)):
            raise ValueError("its lookahead copy does not fit the networks built from this config")
        torch._foreach_copy_(self.slow, [t.to(s.device) for t, s in zip(slow, self.slow)])
