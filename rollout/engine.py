"""Step-wise sampling engine with continuous batching of variable-length trajectories.

Every backbone call advances all active trajectories by one step, and everything around it (the
schedule decision, the Euler update, termination, bookkeeping) is vectorised over the batch. With
continuous batching a trajectory that finishes leaves its slot at once and the next queued one joins,
so no slot idles waiting for the slowest sample of the batch.

The Euler step and the terminal rule are ``rollout.flow``'s (shared with every baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .flow import euler_step, terminal
from .rng import keyed_normal_noise
from .schedules import FixedSchedule, Schedule
from .trajectory import Trajectories

if TYPE_CHECKING:
    from .backbone import Backbone


@dataclass
class ReferenceRequest:
    """Trajectories on the backbone's default ``num_steps`` schedule to run alongside a rollout."""

    prompts: list[str]
    noise_seeds: list[int]
    num_steps: int


class SamplingEngine:
    """Runs many trajectories through the backbone with a fixed number of batch slots."""

    def __init__(self, backbone: Backbone, height: int, width: int, batch_size: int = 16, max_steps: int = 28,
                 sigma_max: float = 1.0, continuous: bool = True, record_features: bool = True,
                 feature_dtype: torch.dtype = torch.float32, decode_batch_size: int = 16) -> None:
        self.backbone = backbone
        self.height, self.width = int(height), int(width)
        self.latent_shape = backbone.latent_shape(self.height, self.width)
        self.batch_size = int(batch_size)
        self.max_steps = int(max_steps)
        self.sigma_max = float(sigma_max)
        self.continuous = bool(continuous)
        self.record_features = bool(record_features)
        self.feature_dtype = feature_dtype
        self.decode_batch_size = int(decode_batch_size)
        self.stats = {"backbone_calls": 0, "slot_steps": 0}

    def initial_noise(self, noise_seeds: list[int]) -> torch.Tensor:
        return keyed_normal_noise(noise_seeds, self.latent_shape, device=self.backbone.device)

    def run(self, prompts: list[str], noise_seeds: list[int], sample_keys: torch.Tensor, schedule: Schedule,
            decode: bool = True, policy_version: int = 0, max_steps: int | None = None,
            initial_latents: torch.Tensor | None = None, references: ReferenceRequest | None = None
            ) -> Trajectories:
        """Generate one trajectory per (prompt, noise seed, sample key); results sorted by index.

        ``references``: extra trajectories on the backbone's default ``num_steps`` schedule (fidelity
        references) run in the same slots and backbone calls; their images come back in
        ``Trajectories.reference_images`` and they add no learner rows.
        """
        n = len(prompts)
        if len(noise_seeds) != n or sample_keys.numel() != n:
            raise ValueError(f"need one noise seed and sample key per prompt: {n}, {len(noise_seeds)}, "
                             f"{sample_keys.numel()}")
        max_steps = int(max_steps or self.max_steps)
        ref = references or ReferenceRequest([], [], 1)
        m = len(ref.prompts)
        total = n + m
        dev = self.backbone.device
        bb = self.backbone
        record_feats = self.record_features and schedule.uses_features
        sample_keys = sample_keys.to(torch.int64).cpu()
        embeds, pooled = bb.encode_prompts(list(prompts) + list(ref.prompts))  # cached per distinct prompt
        seeds = list(noise_seeds) + list(ref.noise_seeds)
        ref_sched = FixedSchedule(bb.default_sigmas(ref.num_steps, self.latent_shape[1:])) if m else None
        # per-trajectory settings: the policy's first, then the references'
        is_ref = torch.arange(total) >= n
        budget = torch.where(is_ref, ref.num_steps, max_steps)
        start = torch.where(is_ref, float(ref_sched.sigmas[0]) if m else 0.0, self.sigma_max)
        floor = torch.where(is_ref, ref_sched.sigma_min if m else 0.0, schedule.sigma_min).float()

        s = min(self.batch_size, max(total, 1))
        slot_traj = torch.full((s,), -1, dtype=torch.int64)
        lat = torch.zeros((s, *self.latent_shape), device=dev, dtype=torch.float32)
        sig = torch.zeros(s, dtype=torch.float32)
        stp = torch.zeros(s, dtype=torch.int64)
        final = torch.zeros((total, *self.latent_shape), dtype=torch.float32)
        steps_out = torch.zeros(total, dtype=torch.int64)
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in
                                               ("traj", "step", "sigma", "sigma_next", "action", "logp", "valid",
                                                "features", "temb")}
        queue = 0
        while True:
            free = torch.nonzero(slot_traj < 0).reshape(-1)
            if queue < total and free.numel() and (self.continuous or free.numel() == s):
                k = min(int(free.numel()), total - queue)
                idx, new = free[:k], torch.arange(queue, queue + k)
                queue += k
                slot_traj[idx] = new
                if initial_latents is not None:
                    lat[idx.to(dev)] = initial_latents[new].to(dev, torch.float32)
                else:
                    lat[idx.to(dev)] = self.initial_noise([seeds[i] for i in new.tolist()])
                sig[idx] = start[new]
                stp[idx] = 0
            act = torch.nonzero(slot_traj >= 0).reshape(-1)
            if act.numel() == 0:
                break
            traj = slot_traj[act]
            pol = ~is_ref[traj]
            out = bb.step(lat[act.to(dev)], sig[act], embeds[traj.to(dev)], pooled[traj.to(dev)],
                          need_features=schedule.uses_features and bool(pol.any()))
            self.stats["backbone_calls"] += 1
            self.stats["slot_steps"] += int(act.numel())
            sigma_now = sig[act]
            proposal = torch.zeros_like(sigma_now)
            if pol.any():
                pi = torch.nonzero(pol).reshape(-1)
                feats = out.features[pi.to(out.features.device)].to(self.feature_dtype) if schedule.uses_features \
                    else out.features
                temb = out.temb[pi.to(out.temb.device)].to(self.feature_dtype) if schedule.uses_features \
                    else out.temb
                prop = schedule.propose(feats, temb, sigma_now[pi], stp[act][pi], sample_keys[traj[pi]])
                proposal[pi] = prop.sigma_next.float().cpu()
            if not pol.all():
                ri = torch.nonzero(~pol).reshape(-1)
                proposal[ri] = ref_sched.propose(None, None, sigma_now[ri], stp[act][ri], None).sigma_next.float()
            at_budget = stp[act] + 1 >= budget[traj]
            done, _, target = terminal(proposal, floor[traj], at_budget)
            new_lat = euler_step(lat[act.to(dev)], out.velocity, sigma_now, target)
            if pol.any():
                rows["traj"].append(traj[pi])
                rows["step"].append(stp[act][pi])
                rows["sigma"].append(sigma_now[pi])
                rows["sigma_next"].append(target[pi])
                rows["action"].append(prop.action.float().cpu())
                rows["logp"].append(prop.logp.float().cpu())
                # a step forced by the budget is masked whatever its action was: keeping it only when the sampled
                # ratio happened to fall below sigma_min would select samples by their own action (a biased term)
                rows["valid"].append(~at_budget[pi])
                if record_feats:
                    rows["features"].append(feats.cpu())
                    rows["temb"].append(temb.cpu())
            lat[act.to(dev)] = new_lat
            sig[act] = target
            stp[act] += 1
            fin = act[done]
            if fin.numel():
                ft = slot_traj[fin]
                final[ft] = lat[fin.to(dev)].float().cpu()
                steps_out[ft] = stp[fin]
                slot_traj[fin] = -1

        cat = {k: torch.cat(v) if v else torch.empty(0) for k, v in rows.items()}
        order = torch.argsort(cat["traj"] * (max_steps + 1) + cat["step"]) if cat["traj"].numel() else cat["traj"]
        per_row = {k: (v[order] if v.numel() else v) for k, v in cat.items()}
        if not record_feats:
            per_row["features"] = torch.empty(0)
            per_row["temb"] = torch.empty(0)
        images = bb.decode(final, self.decode_batch_size) if decode else torch.empty(0)
        return Trajectories(
            traj=per_row["traj"].to(torch.int64), step=per_row["step"].to(torch.int64), sigma=per_row["sigma"],
            sigma_next=per_row["sigma_next"], action=per_row["action"], logp=per_row["logp"],
            valid=per_row["valid"].to(torch.bool), features=per_row["features"], temb=per_row["temb"],
            steps=steps_out[:n], latents=final[:n], images=images[:n] if decode else images, prompts=list(prompts),
            policy_version=policy_version, reference_images=images[n:] if decode and m else torch.empty(0),
        )

    def run_fixed(self, prompts: list[str], noise_seeds: list[int], num_steps: int, decode: bool = True
                  ) -> Trajectories:
        """The backbone's default (shifted) schedule with ``num_steps`` steps, e.g. fidelity references."""
        return self.run_table(prompts, noise_seeds, self.backbone.default_sigmas(num_steps, self.latent_shape[1:]), decode)

    def run_table(self, prompts: list[str], noise_seeds: list[int], sigmas: torch.Tensor, decode: bool = True
                  ) -> Trajectories:
        """Every prompt on one fixed sigma table (its first value is the start, the last 0)."""
        sched = FixedSchedule(sigmas)
        num_steps = sched.num_steps
        keys = torch.zeros(len(prompts), dtype=torch.int64)
        saved = self.sigma_max
        self.sigma_max = float(sched.sigmas[0])
        try:
            return self.run(prompts, noise_seeds, keys, sched, decode=decode, max_steps=num_steps)
        finally:
            self.sigma_max = saved
