"""Resource layout of a run: one bundle per role actor, their totals, and what a cluster lacks.

The Ray executor reserves these bundles as a placement group before it starts any actor, and a
sweep reserves the same bundles (plus the trial's controller) per trial, so both ask for exactly
what the roles need.
"""

from __future__ import annotations

from tpdm_rl.core.config import Config


def _bundle(cpu: float, gpu: float = 0.0) -> dict[str, float]:
    b = {"CPU": float(cpu)}
    if gpu > 0:
        b["GPU"] = float(gpu)
    return b


def role_bundles(cfg: Config) -> list[tuple[str, dict[str, float]]]:
    """(role, bundle) per actor of the distributed layout: rollout workers, reward workers per
    component, learner ranks, in that order."""
    d = cfg.distributed
    out = [("rollout", _bundle(d.rollout.num_cpus, d.rollout.num_gpus)) for _ in range(d.rollout.num_workers)]
    for name in cfg.rewards:
        p = cfg.reward_pool(name)
        out += [(f"reward[{name}]", _bundle(p.num_cpus, p.num_gpus)) for _ in range(p.num_workers)]
    out += [("learner", _bundle(d.learner.num_cpus, d.learner.num_gpus)) for _ in range(d.learner.num_ranks)]
    return out


def trial_bundles(cfg: Config, controller_cpus: float = 1.0) -> list[dict[str, float]]:
    """Placement-group bundles of one sweep trial: the controller first, then one per role actor when
    ``distributed.enabled``; otherwise one bundle for the single process (1 CPU, plus 1 GPU when
    ``train.device`` / ``backbone.device`` name a CUDA device)."""
    if not cfg.distributed.enabled:
        wants_gpu = any(str(d).startswith("cuda") for d in (cfg.train.device, cfg.backbone.device))
        return [_bundle(max(controller_cpus, 1.0), 1.0 if wants_gpu else 0.0)]
    out = [_bundle(controller_cpus)] + [b for _, b in role_bundles(cfg)]
    # Ray refuses empty bundles: an actor asking for no resources fits in any bundle of the group
    return [b for b in out if any(v > 0 for v in b.values())]


def total(bundles: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def shortfall(need: dict[str, float], have: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Resources where ``need`` exceeds ``have``: name -> (needed, available)."""
    return {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}


def describe(short: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{v:g} {k} (cluster has {h:g})" for k, (v, h) in short.items())
