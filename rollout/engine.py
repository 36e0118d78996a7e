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
from tpdm_rl.rollout.flow import euler_step, terminal
from tpdm_rl.rollout.schedules import FixedSchedule, Schedule
from tpdm_rl.rollout.trajectory import Trajectories

from tpdm_rl.core.rng import keyed_normal_noise

if TYPE_CHECKING:
    from tpdm_rl.rollout.backbone import Backbone


@dataclass
class ReferenceRequest:
    """Trajectories on the backbone's default ``num_steps`` schedule to run alongside a rollout."""

    prompts: list[str]
    noise_seeds: list[int]
    num_steps: int


@dataclass
class _Run:
    """The state of one :meth:`SamplingEngine.run`: per-trajectory settings (the policy's trajectories, then the
    references'), the slots and what has been produced so far."""

    n: int  # policy trajectories
    m: int  # reference trajectories
    total: int
    max_steps: int
    record_feats: bool
    sample_keys: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    seeds: list[int]
    initial_latents: torch.Tensor | None
    ref_sched: FixedSchedule | None
    is_ref: torch.Tensor
    budget: torch.Tensor
    start: torch.Tensor
    floor: torch.Tensor
    slots: int
    slot_traj: torch.Tensor  # the trajectory in each slot, -1 when free
    lat: torch.Tensor
    sig: torch.Tensor
    stp: torch.Tensor
    final: torch.Tensor
    steps_out: torch.Tensor
    rows: dict[str, list[torch.Tensor]]
    queue: int = 0  # trajectories handed to a slot so far


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
        run = self._start(prompts, noise_seeds, sample_keys, schedule, int(max_steps or self.max_steps),
                          initial_latents, references or ReferenceRequest([], [], 1))
        while True:
            self._fill_free_slots(run)
            act = torch.nonzero(run.slot_traj >= 0).reshape(-1)
            if act.numel() == 0:
                break
            self._advance(run, act, schedule)
        return self._collect(run, list(prompts), decode, policy_version)

    def _start(self, prompts: list[str], noise_seeds: list[int], sample_keys: torch.Tensor, schedule: Schedule,
               max_steps: int, initial_latents: torch.Tensor | None, ref: ReferenceRequest) -> _Run:
        """The run's per-trajectory settings (the policy's trajectories first, then the references') and its
        empty slots."""
        n, m = len(prompts), len(ref.prompts)
        total = n + m
        bb = self.backbone
        embeds, pooled = bb.encode_prompts(list(prompts) + list(ref.prompts))  # cached per distinct prompt
        ref_sched = FixedSchedule(bb.default_sigmas(ref.num_steps, self.latent_shape[1:])) if m else None
        is_ref = torch.arange(total) >= n
        s = min(self.batch_size, max(total, 1))
        return _Run(
            n=n, m=m, total=total, max_steps=max_steps, record_feats=self.record_features and schedule.uses_features,
            sample_keys=sample_keys.to(torch.int64).cpu(), embeds=embeds, pooled=pooled,
            seeds=list(noise_seeds) + list(ref.noise_seeds), initial_latents=initial_latents, ref_sched=ref_sched,
            is_ref=is_ref, budget=torch.where(is_ref, ref.num_steps, max_steps),
            start=torch.where(is_ref, float(ref_sched.sigmas[0]) if m else 0.0, self.sigma_max),
            floor=torch.where(is_ref, ref_sched.sigma_min if m else 0.0, schedule.sigma_min).float(),
            slots=s, slot_traj=torch.full((s,), -1, dtype=torch.int64),
            lat=torch.zeros((s, *self.latent_shape), device=bb.device, dtype=torch.float32),
            sig=torch.zeros(s, dtype=torch.float32), stp=torch.zeros(s, dtype=torch.int64),
            final=torch.zeros((total, *self.latent_shape), dtype=torch.float32),
            steps_out=torch.zeros(total, dtype=torch.int64),
            rows={k: [] for k in ("traj", "step", "sigma", "sigma_next", "action", "logp", "valid", "features",
                                  "temb")})

    def _fill_free_slots(self, run: _Run) -> None:
        """Queued trajectories join the free slots (with continuous batching at once, else when all are free)."""
        free = torch.nonzero(run.slot_traj < 0).reshape(-1)
        if not (run.queue < run.total and free.numel() and (self.continuous or free.numel() == run.slots)):
            return
        dev = self.backbone.device
        k = min(int(free.numel()), run.total - run.queue)
        idx, new = free[:k], torch.arange(run.queue, run.queue + k)
        run.queue += k
        run.slot_traj[idx] = new
        if run.initial_latents is not None:
            run.lat[idx.to(dev)] = run.initial_latents[new].to(dev, torch.float32)
        else:
            run.lat[idx.to(dev)] = self.initial_noise([run.seeds[i] for i in new.tolist()])
        run.sig[idx] = run.start[new]
        run.stp[idx] = 0

    def _advance(self, run: _Run, act: torch.Tensor, schedule: Schedule) -> None:
        """One backbone call for the active slots ``act``: propose, step, record the policy's rows, retire the
        finished trajectories."""
        dev, bb = self.backbone.device, self.backbone
        traj = run.slot_traj[act]
        pol = ~run.is_ref[traj]
        out = bb.step(run.lat[act.to(dev)], run.sig[act], run.embeds[traj.to(dev)], run.pooled[traj.to(dev)],
                      need_features=schedule.uses_features and bool(pol.any()))
        self.stats["backbone_calls"] += 1
        self.stats["slot_steps"] += int(act.numel())
        sigma_now = run.sig[act]
        proposal = torch.zeros_like(sigma_now)
        if pol.any():
            pi = torch.nonzero(pol).reshape(-1)
            feats = out.features[pi.to(out.features.device)].to(self.feature_dtype) if schedule.uses_features \
                else out.features
            temb = out.temb[pi.to(out.temb.device)].to(self.feature_dtype) if schedule.uses_features \
                else out.temb
            prop = schedule.propose(feats, temb, sigma_now[pi], run.stp[act][pi], run.sample_keys[traj[pi]])
            proposal[pi] = prop.sigma_next.float().cpu()
        if not pol.all():
            ri = torch.nonzero(~pol).reshape(-1)
            proposal[ri] = run.ref_sched.propose(None, None, sigma_now[ri], run.stp[act][ri], None).sigma_next.float()
        at_budget = run.stp[act] + 1 >= run.budget[traj]
        done, _, target = terminal(proposal, run.floor[traj], at_budget)
        new_lat = euler_step(run.lat[act.to(dev)], out.velocity, sigma_now, target)
        if pol.any():
            rows = run.rows
            rows["traj"].append(traj[pi])
            rows["step"].append(run.stp[act][pi])
            rows["sigma"].append(sigma_now[pi])
            rows["sigma_next"].append(target[pi])
            rows["action"].append(prop.action.float().cpu())
            rows["logp"].append(prop.logp.float().cpu())
            # a step forced by the budget is masked whatever its action was: keeping it only when the sampled
            # ratio happened to fall below sigma_min would select samples by their own action (a biased term)
            rows["valid"].append(~at_budget[pi])
            if run.record_feats:
                rows["features"].append(feats.cpu())
                rows["temb"].append(temb.cpu())
        run.lat[act.to(dev)] = new_lat
        run.sig[act] = target
        run.stp[act] += 1
        fin = act[done]
        if fin.numel():
            ft = run.slot_traj[fin]
            run.final[ft] = run.lat[fin.to(dev)].float().cpu()
            run.steps_out[ft] = run.stp[fin]
            run.slot_traj[fin] = -1

    def _collect(self, run: _Run, prompts: list[str], decode: bool, policy_version: int) -> Trajectories:
        """The learner rows sorted by (trajectory, step), the final latents and the decoded images."""
        n, m = run.n, run.m
        cat = {k: torch.cat(v) if v else torch.empty(0) for k, v in run.rows.items()}
        order = torch.argsort(cat["traj"] * (run.max_steps + 1) + cat["step"]) if cat["traj"].numel() else cat["traj"]
        per_row = {k: (v[order] if v.numel() else v) for k, v in cat.items()}
        if not run.record_feats:
            per_row["features"] = torch.empty(0)
            per_row["temb"] = torch.empty(0)
        images = self.backbone.decode(run.final, self.decode_batch_size) if decode else torch.empty(0)
        return Trajectories(
            traj=per_row["traj"].to(torch.int64), step=per_row["step"].to(torch.int64), sigma=per_row["sigma"],
            sigma_next=per_row["sigma_next"], action=per_row["action"], logp=per_row["logp"],
            valid=per_row["valid"].to(torch.bool), features=per_row["features"], temb=per_row["temb"],
            steps=run.steps_out[:n], latents=run.final[:n], images=images[:n] if decode else images, prompts=prompts,
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
