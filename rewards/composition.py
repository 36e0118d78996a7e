"""The controller's view of a run's reward components: weights and per-component normalisation."""

from __future__ import annotations

import math

import torch

from tpdm_rl.algorithm.objective import RunningMeanStd, group_normalize
from tpdm_rl.core.reward_registry import reward_class


class RewardSet:
    """The controller's view of the reward: component weights and normalisation state (checkpointed)."""

    def __init__(self, specs: dict) -> None:
        self.specs = specs
        self.running = {name: RunningMeanStd() for name in specs}

    @property
    def weights(self) -> dict[str, float]:
        return {k: float(v.weight) for k, v in self.specs.items()}

    @property
    def needs_reference(self) -> bool:
        return any(reward_class(n).needs_reference for n in self.specs)

    def normalize(self, raw: dict[str, torch.Tensor], group: torch.Tensor, update: bool = True
                  ) -> dict[str, torch.Tensor]:
        """Apply each component's normalisation (none / running mean-std / within-group z-score)."""
        out = {}
        for name, x in raw.items():
            mode = self.specs[name].normalize
            if mode == "running":
                if update:
                    self.running[name].update(x)
                out[name] = self.running[name].normalize(x).float()
            elif mode == "group":
                out[name] = group_normalize(x, group, "group")
            else:
                out[name] = x.float()
        return out

    @staticmethod
    def first_nonfinite(raw: dict[str, torch.Tensor]) -> str | None:
        for name, x in raw.items():
            if not torch.isfinite(x).all():
                bad = x[~torch.isfinite(x)][0].item()
                return f"{name}={bad if not math.isnan(bad) else 'nan'}"
        return None

    def state_dict(self) -> dict:
        return {name: r.state_dict() for name, r in self.running.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, d in state.items():
            if name in self.running:
                self.running[name].load_state_dict(d)
