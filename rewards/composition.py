"""A set of weighted reward components with per-component normalisation and the step penalty."""

from __future__ import annotations

import math

import torch

from .base import RewardError, RewardModel, build_reward


class RewardSet:
    """Builds every configured component at start-up (so a bad checkpoint fails before the first
    rollout) and turns images into raw component scores, normalised components and totals."""

    def __init__(self, specs: dict, build: bool = True) -> None:
        from tpdm_rl.objective import RunningMeanStd

        self.specs = specs
        self.models: dict[str, RewardModel] = {}
        self.running = {name: RunningMeanStd() for name in specs}
        if build:
            for name, spec in specs.items():
                opts = dict(spec.model_extra or {})
                try:
                    self.models[name] = build_reward(name, **opts)
                except RewardError as exc:
                    raise RewardError(f"rewards.{name}: {exc}") from None

    @property
    def weights(self) -> dict[str, float]:
        return {k: float(v.weight) for k, v in self.specs.items()}

    @property
    def needs_reference(self) -> bool:
        return any(m.needs_reference for m in self.models.values())

    def score(self, images: torch.Tensor, prompts: list[str], references: torch.Tensor | None = None
              ) -> dict[str, torch.Tensor]:
        """Raw scores per component, float32 [B] each."""
        out = {}
        for name, model in self.models.items():
            out[name] = model.score(images, prompts, references if model.needs_reference else None)
        return out

    def normalize(self, raw: dict[str, torch.Tensor], group: torch.Tensor, update: bool = True
                  ) -> dict[str, torch.Tensor]:
        """Apply each component's normalisation (none / running mean-std / within-group z-score)."""
        from tpdm_rl.objective import group_normalize

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
