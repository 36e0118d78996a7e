"""The cost of steps (``step_penalty.*``): one object that the config, the objective, the controller's metrics
and the run summary ask, so the three modes are told apart here only.

``additive`` (the default)
    R - coef * steps.
``discount``
    R * gamma^steps.
``tpdm``
    R * (1 - gamma^N) / (N (1 - gamma)), the official TPDM code's mean discount over the N steps.

The two multiplying modes need rewards that cannot be negative: a factor that falls with the steps would
*reward* more steps on a negative reward. Torch is not imported here (the config is validated without it); the
tensors come from the caller.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MODES = ("additive", "discount", "tpdm")


@dataclass(frozen=True)
class StepPenalty:
    mode: str = "additive"
    coef: float = 0.0  # lambda of the additive mode
    gamma: float = 0.97  # discount per step of the multiplying modes

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"step penalty mode must be 'additive', 'discount' or 'tpdm', got {self.mode!r}")

    @classmethod
    def from_config(cls, sp: Any) -> StepPenalty:
        """From a ``StepPenaltyConfig`` (or anything with ``mode``, ``coef`` and ``gamma``)."""
        return cls(sp.mode, float(sp.coef), float(sp.gamma))

    @property
    def additive(self) -> bool:
        return self.mode == "additive"

    def check(self, rewards: Iterable[tuple[str, str, float, bool]], per_reward_norm: bool) -> None:
        """The rules of the multiplying modes, checked once, with the config: every reward ``(name, normalize,
        weight, nonnegative)`` must be non-negative, and ``algorithm.per_reward_norm`` needs the additive mode."""
        if self.additive:
            return
        for name, normalize, weight, nonnegative in rewards:
            if normalize != "none" or weight < 0 or not nonnegative:
                raise ValueError(
                    f"step_penalty.mode {self.mode!r} multiplies the reward by a factor that falls with the steps, "
                    f"which rewards MORE steps when the reward is negative; reward {name!r} (normalize={normalize}, "
                    f"weight={weight}) can be negative: use mode 'additive'")
        if per_reward_norm:
            raise ValueError("algorithm.per_reward_norm needs step_penalty.mode 'additive'")

    def apply(self, total, steps):
        """The penalised reward (float64 tensors ``total`` and ``steps`` in, float64 out)."""
        if self.mode == "additive":
            return total - float(self.coef) * steps
        if self.mode == "discount":
            return total * float(self.gamma) ** steps
        return total * tpdm_discount(steps, self.gamma)

    def step_weight(self) -> float:
        """The step count's weight when it is normalised as a reward component of its own (per-reward
        normalisation): -coef. Only the additive mode has one; :meth:`check` refuses the others with it."""
        if not self.additive:
            raise ValueError("algorithm.per_reward_norm needs step_penalty.mode 'additive'")
        return -float(self.coef)

    def charged(self, mean_steps) -> float:
        """``reward/step_penalty``: what the penalty takes from the mean trajectory (additive: coef x mean steps,
        ``mean_steps`` a number or a 0-d tensor; a multiplying mode takes no fixed amount: 0)."""
        return float(self.coef * mean_steps) if self.additive else 0.0

    def formula(self, body: str) -> str:
        """``reward/total`` in words, ``body`` being the weighted components."""
        if self.mode == "additive":
            return f"{body} - {self.coef:g} x steps (mean over the iteration's trajectories)"
        if self.mode == "discount":
            return f"({body}) x {self.gamma:g}^steps"
        return f"({body}) x (1 - {self.gamma:g}^N) / (N (1 - {self.gamma:g})), N = steps"


def tpdm_discount(steps, gamma: float):
    """(1 - gamma^N) / (N (1 - gamma)): the mean of gamma^0..gamma^(N-1), as in the official TPDM code (1 at gamma 1)."""
    n = steps.double().clamp_min(1.0)
    if gamma >= 1.0:
        return n.new_ones(n.shape)
    return (1.0 - float(gamma) ** n) / (n * (1.0 - float(gamma)))
