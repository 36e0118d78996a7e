"""DeepSpeed learner group: N ranks, each a DeepSpeed engine over the TPM, as Ray actors.

Rank 0 picks the rendezvous address (its node IP and a free port); every rank then joins the
process group (gloo on CPU, NCCL on GPU) and wraps the TPM in ``deepspeed.initialize``. Each rank
receives its share of the rollout rows, runs the same PPO epochs/minibatches as the single-process
learner (``tpdm_rl.training.learner.Learner``), and DeepSpeed averages the gradients.

Skipping a non-finite step is a collective decision (all ranks skip together), otherwise one rank
would wait forever in the gradient all-reduce.
"""

from __future__ import annotations

import importlib
import os
import socket

import torch
import torch.distributed as dist

from tpdm_rl.algorithm.messages import LearnBatch, StepRows
from tpdm_rl.algorithm.policy import TimePredictionModule, TPMSpec, build_policy
from tpdm_rl.core.config import AlgorithmConfig, Config, LearnerGroupConfig, OptimConfig
from tpdm_rl.core.threads import apply_threads
from tpdm_rl.training.learner import Learner, minibatch_indices


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def ds_config(optim: OptimConfig, algorithm: AlgorithmConfig, group: LearnerGroupConfig, world: int) -> dict:
    """The DeepSpeed config of the learner group (the same optimiser as the single-process learner)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "gradient_clipping": algorithm.max_grad_norm,
        "optimizer": {"type": group.optimizer, "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                                                           "weight_decay": optim.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": group.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _no_inference_shm_op() -> None:
    """Skip DeepSpeed's shared-memory all-reduce op on CPU. Its CPU accelerator JIT-compiles that op whenever a
    process group starts (about a minute of C++ on a fresh machine, measured here: 79 s on 2 busy cores), and only
    ``inference_all_reduce`` uses it; the learner's gradients go through ``torch.distributed`` (gloo) either way."""
    # by module name: the attribute ``deepspeed.comm.torch`` is the torch library itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class DeepSpeedLearner(Learner):
    """``Learner`` whose backward/step go through a DeepSpeed engine (gradients all-reduced)."""
    def __init__(self, policy: TimePredictionModule, rank: int, world: int, config: dict,
                 algorithm: AlgorithmConfig, seed: int, device: torch.device,
                 reference: TimePredictionModule | None = None) -> None:
        self.rank, self.world = rank, world
        self.zero_stage = int(config["zero_optimization"]["stage"])
        self._ds_config = config
        self.row_lo, self.total_rows = 0, 0
        super().__init__(policy, OptimConfig(), algorithm, seed, device, reference)

    def _make_optimizer(self, optim: OptimConfig):
        import deepspeed  # optional heavy dependency

        self.engine, optimizer, _, _ = deepspeed.initialize(model=self.policy, config=self._ds_config,
                                                            model_parameters=self.policy.parameters())
        self.policy = self.engine.module
        return optimizer

    def set_shard(self, row_lo: int, total_rows: int) -> None:
        """This rank holds global rows ``[row_lo, row_lo + n)`` of a rollout batch of ``total_rows``."""
        self.row_lo, self.total_rows = int(row_lo), int(total_rows)

    def _minibatches(self, n: int, iteration: int, epoch: int) -> list[torch.Tensor]:
        # the single-process learner's global minibatches, each cut down to this rank's rows: every rank
        # runs the same number of steps (each step is a collective) and together they see the same rows
        total = max(self.total_rows, self.row_lo + n, 1)
        parts = minibatch_indices(total, self.algorithm.minibatches, self.seed, iteration, epoch)
        return [p[(p >= self.row_lo) & (p < self.row_lo + n)] - self.row_lo for p in parts]

    def _apply(self, loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        # one collective: any rank non-finite? and the minibatch's valid steps over all ranks
        local_valid = mask.float().sum()
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(), local_valid]).to(self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        if flags[0].item() > 0:
            self.engine.zero_grad()
            return None
        # ``loss`` is this rank's masked mean; DeepSpeed averages gradients over ranks. Rescaled, the
        # averaged gradient is that of the masked mean over the whole minibatch, as in one process.
        scale = local_valid.to(self.device) * self.world / flags[1].clamp_min(1.0)
        self.engine.backward(loss * scale)
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads \
            else None
        if gnorm is not None and not torch.isfinite(gnorm):  # already all-reduced: every rank agrees
            self.engine.zero_grad()
            return None
        self.engine.step()
        if gnorm is None:  # ZeRO-1/2 keep gradients in their partitions; DeepSpeed computed the global norm
            gnorm = torch.tensor(float(self.engine.get_global_grad_norm() or 0.0))
        return gnorm

    def state_dict(self) -> dict:
        """Optimiser state that ``torch.load(weights_only=True)`` can read back.

        ZeRO-0: the (replicated) torch optimiser state. ZeRO-1/2: this rank's partition, without the
        Python objects DeepSpeed puts in it (loss scaler, enum, slice mappings), which are rebuilt on load.
        """
        sd = self.optimizer.state_dict()
        if self.zero_stage == 0:
            return {"optimizer": sd}
        safe = {k: v for k, v in sd.items() if k not in _ZERO_OBJECT_KEYS}
        return {"zero": {"stage": self.zero_stage, "world": self.world, "rank": self.rank, "state": safe}}

    def load_state_dict(self, state: dict) -> None:
        why = check_resumable(state, self.zero_stage, self.world)
        if why:
            raise ValueError(f"the checkpoint cannot resume this learner group: {why}")
        if "zero" not in state:
            self.optimizer.load_state_dict(state["optimizer"])
            return
        from deepspeed.runtime.zero.config import ZeroStageEnum

        full = [dict(r, loss_scaler=self.optimizer.loss_scaler, zero_stage=ZeroStageEnum(self.zero_stage),
                     param_slice_mappings=self.optimizer._param_slice_mappings) for r in state["zero"]["ranks"]]
        self.optimizer.load_state_dict(full, load_optimizer_states=True, load_from_fp32_weights=True)


_ZERO_OBJECT_KEYS = ("loss_scaler", "zero_stage", "param_slice_mappings")


def merge_rank_states(states: list[dict]) -> dict:
    """The learner group's optimiser state for a checkpoint: rank 0's for ZeRO-0 (replicated), every
    rank's partition for ZeRO-1/2 (loadable only by a group of the same size and stage)."""
    if "zero" not in states[0]:
        return states[0]
    z = states[0]["zero"]
    return {"zero": {"stage": z["stage"], "world": z["world"], "ranks": [s["zero"]["state"] for s in states]}}


def check_resumable(state: dict | None, zero_stage: int, num_ranks: int) -> str | None:
    """Why a checkpoint's optimiser state cannot go into this learner group (None when it can)."""
    if state is None:
        return None
    if "zero" in state:
        z = state["zero"]
        if z["stage"] != zero_stage or len(z["ranks"]) != num_ranks:
            return (f"its optimizer state is ZeRO-{z['stage']} partitioned over {len(z['ranks'])} learner ranks; "
                    f"resume with distributed.learner.zero_stage={z['stage']} and "
                    f"distributed.learner.num_ranks={len(z['ranks'])}")
        return None
    if zero_stage:
        return (f"its optimizer state is unpartitioned (ZeRO-0); resume with distributed.learner.zero_stage=0 "
                f"(got {zero_stage})")
    return None


class LearnerRank:
    """One rank of the learner group (run as a Ray actor by the Ray executor, ``tpdm_rl/executors/ray_executor.py``)."""
    def __init__(self, rank: int, world: int, cfg_json: str, spec: dict, threads: int = 1) -> None:
        apply_threads(threads, "actor")  # the thread policy (docs/threads.md)
        self.rank, self.world = rank, world
        self.cfg = Config.model_validate_json(cfg_json)
        self.spec = TPMSpec.from_dict(spec)
        self.learner: DeepSpeedLearner | None = None

    def rendezvous(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, addr: str, port: int, weights: dict[str, torch.Tensor], optimizer_state: dict | None) -> bool:
        cfg = self.cfg
        lcfg = cfg.distributed.learner
        use_cuda = lcfg.num_gpus > 0 and torch.cuda.is_available()
        backend = lcfg.backend if lcfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(self.rank), WORLD_SIZE=str(self.world),
                          LOCAL_RANK="0", LOCAL_SIZE="1")
        if not use_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if not use_cuda:
            _no_inference_shm_op()
        deepspeed.init_distributed(dist_backend=backend)
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        policy = TimePredictionModule(self.spec)
        policy.load_state_dict(weights)
        reference = build_policy(cfg, self.spec.in_channels, self.spec.temb_dim) if cfg.algorithm.kl_coef > 0 else None
        self.learner = DeepSpeedLearner(policy, self.rank, self.world,
                                        ds_config(cfg.optim, cfg.algorithm, lcfg, self.world), cfg.algorithm,
                                        cfg.seed, device, reference)
        if optimizer_state is not None:
            self.learner.load_state_dict(optimizer_state)
        return True

    def update(self, pieces: list, iteration: int, row_lo: int = 0, total_rows: int = 0) -> dict:
        """``pieces``: [(rows_ref, row_start, row_end, advantages [n_traj])] making up this rank's share,
        global rows ``[row_lo, row_lo + n)`` of ``total_rows``."""
        import ray

        rows: list[StepRows] = ray.get([p[0] for p in pieces]) if pieces else []
        batch = LearnBatch.from_rows([(r, start, end, adv) for r, (_, start, end, adv) in zip(rows, pieces)])
        return self.update_batch(batch, iteration, row_lo, total_rows)

    def update_batch(self, batch: LearnBatch, iteration: int, row_lo: int = 0, total_rows: int = 0) -> dict:
        """PPO update on this rank's rows of the rollout batch (all ranks call it together)."""
        self.learner.set_shard(row_lo, total_rows or len(batch))
        return self.learner.update(batch, iteration)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.learner.weights()

    def optimizer_state(self) -> dict:
        return self.learner.state_dict()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
