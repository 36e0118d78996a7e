"""The Ray controller: the same algorithm as ``Trainer``, with its roles as Ray actors.

- rollout workers (``rollout.actor.RolloutActor``): backbone + inference TPM; tasks are groups of
  prompts handed out dynamically; results stay in the object store (summary / learner rows / images);
- reward workers (``rewards.actor.RewardActor``): a pool per component, scoring each rollout task's
  images as soon as it finishes, so scoring overlaps with the rollouts still running;
- a learner group (``tpdm_rl.ds_learner.LearnerRank``): N DeepSpeed ranks sharing the rows evenly;
- weight sync: after each update the learner's weights are put in the object store once with a
  version number; every rollout worker loads that version before its next task.

Fault tolerance: a rollout or reward actor that dies is replaced and its unfinished task re-run.
All randomness is keyed by (seed, iteration, trajectory), so a re-run task gives exactly the
trajectories the dead worker would have produced: every trajectory counts exactly once.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rewards import RewardError
from rewards.composition import RewardSet

from .checkpoint import CheckpointError
from .config import Config
from .policy import TimePredictionModule, TPMSpec
from .trainer import FatalRoleError, Trainer, plan_iteration, score_iteration


def init_ray(address: str = "", num_cpus: int | None = None) -> bool:
    """Connect to ``address`` / RAY_ADDRESS, or start a local instance sized to the machine.

    Returns True when this process started Ray (and so should shut it down).
    """
    import ray

    if ray.is_initialized():
        return False
    addr = address or os.environ.get("RAY_ADDRESS", "")
    if addr:  # a job's own runtime_env (working_dir, ...) is inherited as it is
        ray.init(address=addr, log_to_driver=False)
        return False
    # address="local": a new instance, never one recorded in /tmp/ray/ray_current_cluster by another user
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return True


def actor_env() -> dict:
    """Environment variables every actor gets (merged into the job's runtime_env)."""
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    for k in ("HF_HUB_OFFLINE", "HF_HOME", "DS_ACCELERATOR"):
        if k in os.environ:
            env[k] = os.environ[k]
    return {"env_vars": env}


def _actor_error_types() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return (RayActorError, ActorDiedError, ActorUnavailableError)


def _creation_error(exc: BaseException) -> str:
    """The first meaningful line of an actor-creation failure (e.g. a RewardError)."""
    text = str(exc)
    for line in text.splitlines():
        for marker in ("RewardError: ", "BackboneError: ", "CheckpointError: ", "PromptFileError: "):
            if marker in line:
                return line.split(marker, 1)[1].strip()
    return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__


@dataclass
class ActorPool:
    """A fixed number of actor slots; a dead actor is replaced in its slot (up to ``max_restarts``)."""

    name: str
    factory: object  # callable() -> actor handle
    size: int
    max_restarts: int
    actors: list = field(default_factory=list)
    restarts: list = field(default_factory=list)

    def start(self) -> None:
        self.actors = [self.factory() for _ in range(self.size)]
        self.restarts = [0] * self.size

    def replace(self, slot: int, cause: BaseException) -> None:
        import ray

        self.restarts[slot] += 1
        if self.restarts[slot] > self.max_restarts:
            raise FatalRoleError(f"{self.name} worker {slot} died {self.restarts[slot]} times (limit "
                                 f"distributed.max_actor_restarts={self.max_restarts}): {_creation_error(cause)}")
        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[slot] = self.factory()

    def kill_all(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass


class RayTrainer(Trainer):
    """``Trainer`` with rollout/reward/learner roles as Ray actors (see module docstring)."""

    def __init__(self, cfg: Config, output: str | Path | None = None, resume: str | None = None,
                 address: str | None = None) -> None:
        self._address = address if address is not None else cfg.distributed.address
        self._started_ray = False
        self.on_dispatch = None  # test hook: called as on_dispatch(trainer, iteration) after tasks are sent
        super().__init__(cfg, output, resume)

    # ------------------------------------------------------------------ set-up
    def _setup_roles(self, ckpt: dict | None) -> None:
        import ray

        cfg, dcfg = self.cfg, self.cfg.distributed
        self._started_ray = init_ray(self._address)
        from rewards.actor import RewardActor
        from rollout.actor import RolloutActor

        from .ds_learner import LearnerRank

        cfg_json = cfg.model_dump_json()
        threads = dcfg.threads_per_actor
        self.rewards = RewardSet(cfg.rewards, build=False)

        rp = dcfg.rollout
        rollout_cls = ray.remote(num_cpus=rp.num_cpus, num_gpus=rp.num_gpus, runtime_env=actor_env())(RolloutActor)
        self.rollout_pool = ActorPool("rollout", lambda: rollout_cls.remote(cfg_json, self.backbone_path, threads),
                                      rp.num_workers, dcfg.max_actor_restarts)
        self.reward_pools: dict[str, ActorPool] = {}
        for name in cfg.rewards:
            pool = cfg.reward_pool(name)
            cls = ray.remote(num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, runtime_env=actor_env())(RewardActor)
            opts = cfg.reward_options(name)
            self.reward_pools[name] = ActorPool(f"reward[{name}]",
                                                lambda cls=cls, name=name, opts=opts: cls.remote(name, opts, threads),
                                                pool.num_workers, dcfg.max_actor_restarts)
        need = self._resource_needs()
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
        if short:
            import sys

            print("tpdm-rl: warning: the actor pools need " + ", ".join(f"{v:g} {k} (cluster has {h:g})" for k, (v, h)
                  in short.items()) + "; waiting for the cluster to grow", file=sys.stderr)
        self.rollout_pool.start()
        for p in self.reward_pools.values():
            p.start()
        timeout = dcfg.startup_timeout_s
        # start-up checks: every actor must construct (bad reward checkpoint -> one-line RewardError)
        for name, pool in self.reward_pools.items():
            try:
                ray.get([a.ping.remote() for a in pool.actors], timeout=timeout)
            except _actor_error_types() as exc:
                self.close()
                raise RewardError(f"rewards.{name}: {_creation_error(exc)}") from None
            except ray.exceptions.GetTimeoutError:
                self.close()
                raise FatalRoleError(f"reward[{name}] actors were not placed within distributed.startup_timeout_s="
                                     f"{timeout:g}s; the pools need {need}, the cluster has {have}") from None
        try:
            spec = TPMSpec.from_dict(ray.get(self.rollout_pool.actors[0].spec.remote(), timeout=timeout))
            self._backbone_meta = ray.get(self.rollout_pool.actors[0].backbone_meta.remote())
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise FatalRoleError(f"rollout actors were not placed within distributed.startup_timeout_s={timeout:g}s; "
                                 f"the pools need {need}, the cluster has {have}") from None
        except _actor_error_types() as exc:
            self.close()
            from rollout.backbone import BackboneError

            raise BackboneError(f"rollout worker failed to start: {_creation_error(exc)}") from None
        from .trainer import build_policy

        policy = build_policy(cfg, spec.in_channels, spec.temb_dim)
        if policy.spec != spec:
            raise CheckpointError(f"rollout worker TPM spec {spec} differs from the controller's {policy.spec}")
        optim_state = None
        if ckpt is not None:
            self._check_spec(ckpt, policy)
            policy.load_state_dict(ckpt["policy"].state_dict())
            optim_state = ckpt["optimizer"]
            from .ds_learner import check_resumable

            why = check_resumable(optim_state, dcfg.learner.zero_stage, dcfg.learner.num_ranks)
            if why:
                self.close()
                raise CheckpointError(f"checkpoint {str(ckpt['path'])!r} cannot resume this learner group: {why}")
        self._policy = policy.eval()
        lg = dcfg.learner
        learner_cls = ray.remote(num_cpus=lg.num_cpus, num_gpus=lg.num_gpus, runtime_env=actor_env())(LearnerRank)
        self.learners = [learner_cls.remote(r, lg.num_ranks, cfg_json, spec.to_dict(), threads)
                         for r in range(lg.num_ranks)]
        addr, port = ray.get(self.learners[0].rendezvous.remote())
        weights = {k: v.clone() for k, v in policy.state_dict().items()}
        ray.get([a.setup.remote(addr, port, weights, optim_state) for a in self.learners])
        self._publish(weights, self.policy_version_from(ckpt))

    def _resource_needs(self) -> dict[str, float]:
        """Total logical CPUs/GPUs of every actor pool (what the cluster or a Tune trial must provide)."""
        d = self.cfg.distributed
        cpu = d.rollout.num_workers * d.rollout.num_cpus + d.learner.num_ranks * d.learner.num_cpus
        gpu = d.rollout.num_workers * d.rollout.num_gpus + d.learner.num_ranks * d.learner.num_gpus
        for name in self.cfg.rewards:
            p = self.cfg.reward_pool(name)
            cpu += p.num_workers * p.num_cpus
            gpu += p.num_workers * p.num_gpus
        return {"CPU": cpu, "GPU": gpu} if gpu else {"CPU": cpu}

    @staticmethod
    def policy_version_from(ckpt: dict | None) -> int:
        if ckpt is None:
            return 0
        st = ckpt["state"]
        return int(st.get("policy_version", st["iteration"]))

    def _publish(self, weights: dict[str, torch.Tensor], version: int) -> float:
        """Put the weights in the object store once; every rollout worker loads that version."""
        import ray

        t0 = time.perf_counter()
        self._weights_ref = ray.put(weights)
        self._weights_version = version
        done = [a.set_weights.remote(version, self._weights_ref) for a in self.rollout_pool.actors]
        for slot, ref in enumerate(done):
            self._get_with_restart(self.rollout_pool, slot, ref, resync=True)
        return time.perf_counter() - t0

    def _get_with_restart(self, pool: ActorPool, slot: int, ref, resync: bool = False):
        import ray

        while True:
            try:
                return ray.get(ref)
            except _actor_error_types() as exc:
                pool.replace(slot, exc)
                self.actor_restarts += 1
                if resync:
                    ref = pool.actors[slot].set_weights.remote(self._weights_version, self._weights_ref)

    @property
    def policy(self) -> TimePredictionModule:
        return self._policy

    def _optimizer_state(self) -> dict | None:
        import ray

        from .ds_learner import merge_rank_states

        if self.cfg.distributed.learner.zero_stage == 0:  # replicated: rank 0's copy is everyone's
            return ray.get(self.learners[0].optimizer_state.remote())
        return merge_rank_states(ray.get([a.optimizer_state.remote() for a in self.learners]))

    def _inference_meta(self) -> dict:
        return self._backbone_meta | {"backbone_path": self.backbone_path}

    def close(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for a in getattr(self, "learners", []):
            try:
                ray.get(a.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001
                pass
            ray.kill(a, no_restart=True)
        self.learners = []
        if hasattr(self, "rollout_pool"):
            self.rollout_pool.kill_all()
        for p in getattr(self, "reward_pools", {}).values():
            p.kill_all()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    # ------------------------------------------------------------------ one iteration
    def _tasks(self, it: int):
        cfg = self.cfg
        plan = plan_iteration(cfg, self.sampler, self.prompts, it)
        g, p = cfg.rollout.group_size, cfg.rollout.prompts_per_iteration
        per = cfg.distributed.groups_per_task or -(-p // cfg.distributed.rollout.num_workers)
        tasks = []
        for t, g0 in enumerate(range(0, p, per)):
            lo, hi = g0 * g, min(p, g0 + per) * g
            tasks.append({"task": t, "lo": lo, "hi": hi, "prompts": plan.prompts[lo:hi],
                          "noise_seeds": plan.noise_seeds[lo:hi], "sample_keys": plan.sample_keys[lo:hi],
                          "need_reference": self._needs_reference, "version": self._weights_version})
        return plan, tasks

    @property
    def _needs_reference(self) -> bool:
        from rewards import reward_class

        return any(reward_class(n).needs_reference for n in self.cfg.rewards)

    def run_iteration(self, it: int) -> dict:
        import ray

        cfg = self.cfg
        t0 = time.perf_counter()
        plan, tasks = self._tasks(it)
        queue = deque(range(len(tasks)))
        idle = deque(range(self.rollout_pool.size))
        running: dict = {}  # summary ref -> (task idx, slot, rows ref, images ref)
        results: dict[int, tuple] = {}
        score_refs: dict = {}  # ref -> (component, [task idx], slot)
        waiting = {n: deque() for n in cfg.rewards}  # finished tasks not yet sent to this component
        free = {n: deque(range(p.size)) for n, p in self.reward_pools.items()}
        scores: dict[tuple[str, int], torch.Tensor] = {}
        reward_busy = {n: 0.0 for n in cfg.rewards}
        reward_calls = {n: 0 for n in cfg.rewards}
        rollout_busy = 0.0
        t_rollout_end = None

        def dispatch_rollouts():
            while queue and idle:
                ti, slot = queue.popleft(), idle.popleft()
                actor = self.rollout_pool.actors[slot]
                s_ref, rows_ref, img_ref = actor.generate.options(num_returns=3).remote(tasks[ti])
                running[s_ref] = (ti, slot, rows_ref, img_ref)

        def dispatch_scores(name: str):
            """Every idle reward actor takes ALL tasks waiting for it in one batched call."""
            pool = self.reward_pools[name]
            while waiting[name] and free[name]:
                slot = free[name].popleft()
                batch = list(waiting[name])
                waiting[name].clear()
                ref = pool.actors[slot].score_many.remote(*[results[ti][2] for ti in batch])  # refs resolved by Ray
                score_refs[ref] = (name, batch, slot)

        dispatch_rollouts()
        if self.on_dispatch is not None:
            self.on_dispatch(self, it)
        while running or score_refs:
            ready, _ = ray.wait(list(running) + list(score_refs), num_returns=1)
            ref = ready[0]
            if ref in running:
                ti, slot, rows_ref, img_ref = running.pop(ref)
                try:
                    summary = ray.get(ref)
                except _actor_error_types() as exc:
                    self.rollout_pool.replace(slot, exc)
                    self.actor_restarts += 1
                    self.rollout_pool.actors[slot].set_weights.remote(self._weights_version, self._weights_ref)
                    queue.appendleft(ti)  # re-run the whole task: keyed randomness gives the same result
                    idle.append(slot)
                    dispatch_rollouts()
                    continue
                results[ti] = (summary, rows_ref, img_ref)
                rollout_busy += summary["busy_s"]
                idle.append(slot)
                dispatch_rollouts()
                for name in cfg.rewards:
                    waiting[name].append(ti)
                    dispatch_scores(name)
                if not running and not queue:
                    t_rollout_end = time.perf_counter()
            else:
                name, batch, slot = score_refs.pop(ref)
                try:
                    outs, busy = ray.get(ref)
                except _actor_error_types() as exc:
                    self.reward_pools[name].replace(slot, exc)
                    self.actor_restarts += 1
                    waiting[name].extendleft(reversed(batch))
                    free[name].append(slot)
                    dispatch_scores(name)
                    continue
                for ti, out in zip(batch, outs):
                    scores[(name, ti)] = out
                reward_busy[name] += busy
                reward_calls[name] += 1
                free[name].append(slot)
                dispatch_scores(name)
        t1 = t_rollout_end or time.perf_counter()
        t2 = time.perf_counter()
        order = sorted(results)
        if order != list(range(len(tasks))):
            raise FatalRoleError(f"iteration {it}: rollout tasks {order} returned, expected {len(tasks)}")
        steps = torch.cat([results[ti][0]["steps"] for ti in order])
        raw = {n: torch.cat([scores[(n, ti)] for ti in order]) for n in cfg.rewards}
        metrics, adv = score_iteration(cfg, self.rewards, raw, steps, plan.group)
        metrics = {"iteration": it, **metrics}
        learn: dict = {}
        sync_s = 0.0
        if adv is None:
            self.skipped_updates += 1
        else:
            learn = self._learn(it, tasks, results, adv)
            if learn.get("health/skipped_steps", 0):
                self.skipped_updates += 1
            t_sync = time.perf_counter()
            weights = ray.get(self.learners[0].weights.remote())
            self._policy.load_state_dict(weights)
            self.policy_version += 1
            sync_s = self._publish(weights, self.policy_version)
            learn["time/learn_s"] = t_sync - learn.pop("_t_start")
        t4 = time.perf_counter()
        metrics.update(learn)
        n = int(steps.numel())
        metrics.update({
            "time/rollout_s": t1 - t0, "time/reward_s": sum(reward_busy.values()), "time/reward_wait_s": t2 - t1,
            "time/sync_s": sync_s, "time/iteration_s": t4 - t0,
            "time/rollout_worker_busy_s": rollout_busy / max(self.rollout_pool.size, 1),
            "throughput/images_per_s": n / max(t1 - t0, 1e-9), "rollout/trajectories": n,
            "policy/version": self.policy_version, "health/skipped_updates": self.skipped_updates,
            "health/actor_restarts": self.actor_restarts,
        })
        for name, busy in reward_busy.items():
            metrics[f"time/reward_{name}_s"] = busy
            metrics[f"rewards/{name}_calls"] = reward_calls[name]
        metrics.setdefault("time/learn_s", 0.0)
        return metrics

    def _learn(self, it: int, tasks: list, results: dict, adv: torch.Tensor) -> dict:
        """Split the rows evenly across learner ranks (by global row range) and update."""
        import ray

        t0 = time.perf_counter()
        world = len(self.learners)
        counts = [int(results[ti][0]["rows"]) for ti in range(len(tasks))]
        total = sum(counts)
        bounds = [round(r * total / world) for r in range(world + 1)]
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        calls = []
        for r in range(world):
            lo, hi = bounds[r], bounds[r + 1]
            pieces = []
            for ti in range(len(tasks)):
                a, b = max(lo, offsets[ti]), min(hi, offsets[ti + 1])
                if a < b or (not pieces and ti == len(tasks) - 1):
                    task = tasks[ti]
                    pieces.append((results[ti][1], a - offsets[ti], max(a, b) - offsets[ti],
                                   adv[task["lo"]:task["hi"]]))
            calls.append(self.learners[r].update.remote(pieces, it, lo, total))
        outs = ray.get(calls)
        merged: dict = {}
        for k in outs[0]:
            vals = [o[k] for o in outs if isinstance(o.get(k), (int, float))]
            if k in ("health/skipped_steps",):
                merged[k] = max(vals)
            elif k == "policy/behaviour_logp_err":
                merged[k] = max(vals)
            else:
                merged[k] = sum(vals) / len(vals)
        merged["_t_start"] = t0
        merged["learner/ranks"] = world
        merged["learner/rows"] = total
        return merged
