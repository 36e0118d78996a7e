"""The Ray executor: the same roles as Ray actors, with scoring overlapped with the rollouts.

- rollout workers (``RolloutWorker`` under ``ray.remote``): tasks are handed out dynamically; results
  stay in the object store (summary / learner rows / images);
- reward workers (``RewardWorker`` under ``ray.remote``): a pool per component, scoring each task's
  images as soon as it finishes; requests that queue up while a worker is busy are scored together;
- the learner group (``tpdm_rl.training.ds_learner.LearnerRank``): N DeepSpeed ranks sharing the rows evenly;
- weight sync: the learner's weights are put in the object store once per version; every rollout
  worker loads that version before its next task.

All actors are reserved as one placement group before any starts (see ``ray_pool.Gang``).
Fault tolerance: a rollout or reward actor that dies is replaced and its unfinished task re-run.
All randomness is keyed by (seed, iteration, trajectory), so a re-run task gives exactly the
trajectories the dead worker would have produced: every trajectory counts exactly once.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from tpdm_rl.algorithm.messages import RolloutTask
from tpdm_rl.algorithm.policy import TimePredictionModule, TPMSpec
from tpdm_rl.core.config import Config
from tpdm_rl.core.console import waiting
from tpdm_rl.core.reward_registry import RewardError
from tpdm_rl.executors.base import Executor, FatalRoleError, RolloutPhase, task_advantages
from tpdm_rl.executors.ray_pool import ActorPool, Gang, actor_env, actor_error_types, creation_error, init_ray
from tpdm_rl.rewards.worker import RewardWorker
from tpdm_rl.rollout.backbone import BackboneError
from tpdm_rl.rollout.worker import RolloutWorker
from tpdm_rl.training.checkpoint import CheckpointError
from tpdm_rl.training.ds_learner import LearnerRank, check_resumable, merge_rank_states
from tpdm_rl.training.resources import role_bundles


class RayExecutor(Executor):
    """Rollout, reward and learner roles as Ray actors (see module docstring)."""

    def __init__(self, cfg: Config, backbone_path: str, address: str = "") -> None:
        self.cfg = cfg
        self.backbone_path = backbone_path
        self.address = address
        self.rollout_workers = cfg.distributed.rollout.num_workers
        self.learners: list = []
        self._started_ray = False
        self._gang: Gang | None = None
        self.on_dispatch = None  # test hook: called as on_dispatch(executor) after rollout tasks are sent

    # ------------------------------------------------------------------ set-up
    def start_workers(self) -> TPMSpec:
        import ray

        cfg, d = self.cfg, self.cfg.distributed
        self._started_ray = init_ray(self.address)
        self._gang = Gang(role_bundles(cfg), d.startup_timeout_s, local=self._started_ray)
        threads = d.threads_per_actor
        slot0 = 0

        def remote(cls, pool, first: int):
            return lambda i: ray.remote(num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, runtime_env=actor_env())(
                cls).options(**self._gang.options(first + i))

        rp = d.rollout
        rollout_cls = remote(RolloutWorker, rp, slot0)
        self.rollout_pool = ActorPool("rollout", lambda i: rollout_cls(i).remote(cfg, self.backbone_path, threads),
                                      rp.num_workers, d.max_actor_restarts)
        slot0 += rp.num_workers
        self.reward_pools: dict[str, ActorPool] = {}
        for name in cfg.rewards:
            pool = cfg.reward_pool(name)
            cls = remote(RewardWorker, pool, slot0)
            opts = cfg.reward_options(name)
            self.reward_pools[name] = ActorPool(f"reward[{name}]",
                                                lambda i, cls=cls, name=name, opts=opts: cls(i).remote(name, opts,
                                                                                                      threads),
                                                pool.num_workers, d.max_actor_restarts)
            slot0 += pool.num_workers
        self._learner_slot0 = slot0
        self.rollout_pool.start()
        for p in self.reward_pools.values():
            p.start()
        timeout = d.startup_timeout_s
        # start-up checks: every actor must construct (bad reward checkpoint -> one-line RewardError)
        for name, pool in self.reward_pools.items():
            try:
                with waiting(f"starting {len(pool.actors)} reward[{name}] actor(s)"):
                    ray.get([a.ping.remote() for a in pool.actors], timeout=timeout)
            except actor_error_types() as exc:
                self.close()
                raise RewardError(creation_error(exc)) from None
            except ray.exceptions.GetTimeoutError:
                self.close()
                raise FatalRoleError(f"reward[{name}] actors did not start within distributed.startup_timeout_s="
                                     f"{timeout:g}s") from None
        try:
            with waiting(f"starting {rp.num_workers} rollout actor(s) (each loads the backbone)"):
                ray.get([a.ping.remote() for a in self.rollout_pool.actors], timeout=timeout)
            spec = TPMSpec.from_dict(ray.get(self.rollout_pool.actors[0].spec.remote(), timeout=timeout))
            self._settings = ray.get(self.rollout_pool.actors[0].inference_settings.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise FatalRoleError(f"rollout actors did not start within distributed.startup_timeout_s={timeout:g}s"
                                 ) from None
        except actor_error_types() as exc:
            self.close()
            raise BackboneError(f"rollout worker failed to start: {creation_error(exc)}") from None
        return spec

    def start_learner(self, policy: TimePredictionModule, optimizer_state: dict | None) -> None:
        import ray

        lg = self.cfg.distributed.learner
        why = check_resumable(optimizer_state, lg.zero_stage, lg.num_ranks)
        if why:
            self.close()
            raise CheckpointError(why)
        cls = ray.remote(num_cpus=lg.num_cpus, num_gpus=lg.num_gpus, runtime_env=actor_env())(LearnerRank)
        cfg_json = self.cfg.model_dump_json()
        self.learners = [cls.options(**self._gang.options(self._learner_slot0 + r)).remote(
            r, lg.num_ranks, cfg_json, policy.spec.to_dict(), self.cfg.distributed.threads_per_actor)
            for r in range(lg.num_ranks)]
        timeout = self.cfg.distributed.startup_timeout_s
        try:
            with waiting(f"starting the learner group ({lg.num_ranks} DeepSpeed rank(s))"):
                addr, port = ray.get(self.learners[0].rendezvous.remote(), timeout=timeout)
                weights = {k: v.detach().cpu().clone() for k, v in policy.state_dict().items()}
                ray.get([a.setup.remote(addr, port, weights, optimizer_state) for a in self.learners],
                        timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise FatalRoleError(f"the learner group ({lg.num_ranks} ranks) did not start within "
                                 f"distributed.startup_timeout_s={timeout:g}s") from None

    # ------------------------------------------------------------------ weights
    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        """Put the weights in the object store once; every rollout worker loads that version."""
        import ray

        self._weights_ref = ray.put(weights)
        self._weights_version = version
        done = [a.set_weights.remote(version, self._weights_ref) for a in self.rollout_pool.actors]
        for slot, ref in enumerate(done):
            while True:
                try:
                    ray.get(ref)
                    break
                except actor_error_types() as exc:
                    self.rollout_pool.replace(slot, exc)
                    ref = self.rollout_pool.actors[slot].set_weights.remote(version, self._weights_ref)

    def weights(self) -> dict[str, torch.Tensor]:
        import ray

        return ray.get(self.learners[0].weights.remote())

    def optimizer_state(self) -> dict | None:
        import ray

        if self.cfg.distributed.learner.zero_stage == 0:  # replicated: rank 0's copy is everyone's
            return ray.get(self.learners[0].optimizer_state.remote())
        return merge_rank_states(ray.get([a.optimizer_state.remote() for a in self.learners]))

    def inference_settings(self) -> dict:
        return self._settings | {"backbone_path": self.backbone_path}

    def restarts(self) -> int:
        pools = [self.rollout_pool, *self.reward_pools.values()] if hasattr(self, "rollout_pool") else []
        return sum(p.total_restarts for p in pools)

    # ------------------------------------------------------------------ one phase
    def rollout_and_score(self, tasks: list[RolloutTask]) -> RolloutPhase:
        import ray

        t0 = time.perf_counter()
        queue = deque(range(len(tasks)))
        idle = deque(range(self.rollout_pool.size))
        running: dict = {}  # summary ref -> (task idx, slot, rows ref, images ref)
        summaries, rows, images = {}, {}, {}
        score_refs: dict = {}  # ref -> (component, [task idx], slot)
        waiting = {n: deque() for n in self.reward_pools}  # finished tasks not yet sent to this component
        free = {n: deque(range(p.size)) for n, p in self.reward_pools.items()}
        scores: dict[str, dict[int, tuple]] = {n: {} for n in self.reward_pools}
        busy = {n: 0.0 for n in self.reward_pools}
        calls = {n: 0 for n in self.reward_pools}
        generated_at = None

        def dispatch_rollouts() -> None:
            while queue and idle:
                ti, slot = queue.popleft(), idle.popleft()
                s_ref, r_ref, i_ref = self.rollout_pool.actors[slot].run_task.options(num_returns=3).remote(tasks[ti])
                running[s_ref] = (ti, slot, r_ref, i_ref)

        def dispatch_scores(name: str) -> None:
            """Every idle reward worker takes ALL tasks waiting for it in one batched call."""
            pool = self.reward_pools[name]
            while waiting[name] and free[name]:
                slot = free[name].popleft()
                batch = list(waiting[name])
                waiting[name].clear()
                ref = pool.actors[slot].score_many.remote(*[images[ti] for ti in batch])  # refs resolved by Ray
                score_refs[ref] = (name, batch, slot)

        dispatch_rollouts()
        if self.on_dispatch is not None:
            self.on_dispatch(self)
        while running or score_refs:
            ready, _ = ray.wait(list(running) + list(score_refs), num_returns=1)
            ref = ready[0]
            if ref in running:
                ti, slot, r_ref, i_ref = running.pop(ref)
                try:
                    summaries[ti] = ray.get(ref)
                except actor_error_types() as exc:
                    self.rollout_pool.replace(slot, exc)
                    self.rollout_pool.actors[slot].set_weights.remote(self._weights_version, self._weights_ref)
                    queue.appendleft(ti)  # re-run the whole task: keyed randomness gives the same result
                    idle.append(slot)
                    dispatch_rollouts()
                    continue
                rows[ti], images[ti] = r_ref, i_ref
                idle.append(slot)
                dispatch_rollouts()
                for name in self.reward_pools:
                    waiting[name].append(ti)
                    dispatch_scores(name)
                if not running and not queue:
                    generated_at = time.perf_counter()
            else:
                name, batch, slot = score_refs.pop(ref)
                try:
                    res = ray.get(ref)
                except actor_error_types() as exc:
                    self.reward_pools[name].replace(slot, exc)
                    waiting[name].extendleft(reversed(batch))
                    free[name].append(slot)
                    dispatch_scores(name)
                    continue
                for ti, s, m in zip(batch, res.scores, res.metrics):
                    scores[name][ti] = (s, m)
                busy[name] += res.busy_s
                calls[name] += 1
                free[name].append(slot)
                dispatch_scores(name)
        generated_s = (generated_at or time.perf_counter()) - t0
        return RolloutPhase.assemble(tasks, summaries, rows, scores, generated_s, busy, calls)

    def update(self, phase: RolloutPhase, advantages: torch.Tensor, iteration: int) -> dict[str, float]:
        """Split the rows evenly across learner ranks (by global row range) and update."""
        import ray

        world = len(self.learners)
        counts = [s.rows for s in phase.summaries]
        total = sum(counts)
        bounds = [round(r * total / world) for r in range(world + 1)]
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        advs = task_advantages(phase, advantages)
        calls = []
        for r in range(world):
            lo, hi = bounds[r], bounds[r + 1]
            pieces = []
            for ti in range(len(counts)):
                a, b = max(lo, offsets[ti]), min(hi, offsets[ti + 1])
                if a < b or (not pieces and ti == len(counts) - 1):
                    pieces.append((phase.rows[ti], a - offsets[ti], max(a, b) - offsets[ti], advs[ti]))
            calls.append(self.learners[r].update.remote(pieces, iteration, lo, total))
        outs = ray.get(calls)
        merged: dict = {}
        for k in outs[0]:
            vals = [o[k] for o in outs if isinstance(o.get(k), (int, float))]
            merged[k] = max(vals) if k in ("health/skipped_steps", "policy/behaviour_logp_err") else sum(vals) / len(vals)
        merged["learner/ranks"] = world
        merged["learner/rows"] = total
        return merged

    def close(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for a in self.learners:
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
        if self._gang is not None:
            self._gang.remove()
            self._gang = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
