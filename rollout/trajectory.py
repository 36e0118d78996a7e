"""Trajectory data: a packed table of steps plus per-trajectory results.

Steps are stored packed (one row per trajectory step, sorted by trajectory then step) rather than
padded to ``max_steps``: trajectories have very different lengths, the learner's loss is a mean over
valid steps anyway, and a row costs only the pooled features (kilobytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tpdm_rl.algorithm.messages import StepRows


@dataclass
class Trajectories:
    """The result of one rollout over N trajectories with R = sum(steps) recorded steps."""

    # per step (R rows, sorted by (traj, step))
    traj: torch.Tensor  # [R] int64 trajectory index in 0..N-1
    step: torch.Tensor  # [R] int64 step index within the trajectory
    sigma: torch.Tensor  # [R] float32 sigma at which the backbone was called
    sigma_next: torch.Tensor  # [R] float32 sigma actually stepped to (0 at the terminal step)
    action: torch.Tensor  # [R] float32 sampled ratio r (sigma_next_raw / sigma)
    logp: torch.Tensor  # [R] float32 behaviour log-prob of the action (0 for fixed schedules)
    valid: torch.Tensor  # [R] bool: the action counts in the loss (False for a step forced by max_steps)
    features: torch.Tensor  # [R, F, g, g] pooled TPM input features (empty if not recorded)
    temb: torch.Tensor  # [R, D] (empty if not recorded)
    # per trajectory (N)
    steps: torch.Tensor  # [N] int64 number of denoising steps = backbone calls (NFE)
    latents: torch.Tensor  # [N, C, h, w] final latents (sigma = 0)
    images: torch.Tensor  # [N, 3, H, W] decoded images in [0, 1] (empty if not decoded)
    prompts: list[str] = field(default_factory=list)
    policy_version: int = 0
    reference_images: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [M, 3, H, W] (see engine)

    @property
    def num_trajectories(self) -> int:
        return int(self.steps.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.traj.shape[0])

    def step_rows(self) -> StepRows:
        """The learner's rows (features stay in their storage dtype)."""
        return StepRows(traj=self.traj, step=self.step, sigma=self.sigma, action=self.action, logp=self.logp,
                        valid=self.valid, features=self.features, temb=self.temb)

    def sigmas_of(self, i: int) -> torch.Tensor:
        """The sigma sequence of trajectory ``i``, from its first sigma down to 0."""
        rows = self.traj == i
        return torch.cat([self.sigma[rows], self.sigma_next[rows][-1:]])

    def select(self, idx: torch.Tensor | list[int]) -> Trajectories:
        """A new Trajectories holding only the given trajectories (re-indexed 0..k-1 in that order)."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        remap = torch.full((self.num_trajectories,), -1, dtype=torch.int64)
        remap[idx] = torch.arange(idx.numel())
        new_traj = remap[self.traj]
        keep = new_traj >= 0
        order = torch.argsort(new_traj[keep] * (int(self.step.max().item()) + 1 if self.num_rows else 1)
                              + self.step[keep], stable=True)
        rows = torch.nonzero(keep).reshape(-1)[order]

        def rsel(t: torch.Tensor) -> torch.Tensor:
            return t[rows] if t.numel() else t

        def tsel(t: torch.Tensor) -> torch.Tensor:
            return t[idx] if t.numel() else t

        return Trajectories(
            traj=new_traj[rows], step=self.step[rows], sigma=self.sigma[rows], sigma_next=self.sigma_next[rows],
            action=self.action[rows], logp=self.logp[rows], valid=self.valid[rows], features=rsel(self.features),
            temb=rsel(self.temb), steps=self.steps[idx], latents=tsel(self.latents), images=tsel(self.images),
            prompts=[self.prompts[i] for i in idx.tolist()] if self.prompts else [],
            policy_version=self.policy_version,
        )
