"""DeepSpeed learner group: N ranks, each a DeepSpeed engine over the TPM, as Ray actors.

Rank 0 picks the rendezvous address (its node IP and a free port); every rank then joins the
process group (gloo on CPU, NCCL on GPU) and wraps the TPM in ``deepspeed.initialize``. Each rank
receives its share of the rollout rows, runs the same PPO epochs/minibatches as the single-process
learner (``tpdm_rl.learner.Learner``), and DeepSpeed averages the gradients.

Skipping a non-finite step is a collective decision (all ranks skip together), otherwise one rank
would wait forever in the gradient all-reduce.
"""

from __future__ import annotations

import os
import socket

import torch

from .learner import LearnBatch, Learner, minibatch_indices
from .policy import TimePredictionModule, TPMSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _ds_config(lr: float, betas, eps: float, weight_decay: float, max_grad_norm: float, zero_stage: int,
               world: int, optimizer: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "gradient_clipping": max_grad_norm,
        "optimizer": {"type": optimizer, "params": {"lr": lr, "betas": list(betas), "eps": eps,
                                                     "weight_decay": weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedLearner(Learner):
    """``Learner`` whose backward/step go through a DeepSpeed engine (gradients all-reduced)."""

    def __init__(self, policy: TimePredictionModule, rank: int, world: int, ds_config: dict, clip_eps: float,
                 epochs: int, minibatches: int, max_grad_norm: float, kl_coef: float, seed: int,
                 device: torch.device) -> None:
        import deepspeed

        self.rank, self.world = rank, world
        self.device = device
        self.clip_eps, self.epochs, self.minibatches = clip_eps, epochs, minibatches
        self.max_grad_norm, self.kl_coef, self.seed = max_grad_norm, kl_coef, seed
        policy = policy.to(device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=policy, config=ds_config,
                                                                 model_parameters=policy.parameters())
        self.policy = self.engine.module
        self.reference = None
        if kl_coef > 0:
            import copy

            self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()

    def _minibatches(self, n: int, iteration: int, epoch: int) -> list[torch.Tensor]:
        # every rank must run the same number of steps (each step is a collective)
        parts = minibatch_indices(max(n, 1), self.minibatches, self.seed, iteration * 1000 + self.rank, epoch)
        parts = [p[p < n] for p in parts]
        while len(parts) < self.minibatches:
            parts.append(torch.zeros(0, dtype=torch.int64))
        return parts

    def _apply(self, loss: torch.Tensor) -> torch.Tensor | None:
        import torch.distributed as dist

        ok = torch.tensor([1.0 if torch.isfinite(loss) else 0.0], device=self.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1:
            self.engine.zero_grad()
            return None
        self.engine.backward(loss)
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads \
            else torch.zeros((), device=self.device)
        if not torch.isfinite(gnorm):  # gradients are already all-reduced: every rank sees the same value
            self.engine.zero_grad()
            return None
        self.engine.step()
        return gnorm

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class LearnerRank:
    """One rank of the learner group (wrapped with ``ray.remote`` by the Ray trainer)."""

    def __init__(self, rank: int, world: int, cfg_json: str, spec: dict, threads: int = 1) -> None:
        from .config import Config

        torch.set_num_threads(threads)
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

        deepspeed.init_distributed(dist_backend=backend)
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        policy = TimePredictionModule(self.spec)
        policy.load_state_dict(weights)
        o = cfg.optim
        ds_cfg = _ds_config(o.lr, o.betas, o.eps, o.weight_decay, cfg.algorithm.max_grad_norm, lcfg.zero_stage,
                            self.world, lcfg.optimizer)
        a = cfg.algorithm
        self.learner = DeepSpeedLearner(policy, self.rank, self.world, ds_cfg, a.clip_eps, a.epochs, a.minibatches,
                                        a.max_grad_norm, a.kl_coef, cfg.seed, device)
        if optimizer_state is not None:
            self.learner.load_state_dict(optimizer_state)
        return True

    def update(self, pieces: list, iteration: int) -> dict:
        """``pieces``: [(rows_ref, row_start, row_end, advantages [n_traj])] making up this rank's share."""
        import ray

        parts = []
        refs = [p[0] for p in pieces]
        rows_list = ray.get(refs) if refs else []
        for rows, (_, start, end, adv) in zip(rows_list, pieces):
            sl = slice(start, end)
            parts.append(LearnBatch(features=rows["features"][sl].float(), temb=rows["temb"][sl].float(),
                                    sigma=rows["sigma"][sl], action=rows["action"][sl], old_logp=rows["logp"][sl],
                                    advantage=adv[rows["traj"][sl]].float(), mask=rows["valid"][sl]))
        batch = LearnBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in
                             ("features", "temb", "sigma", "action", "old_logp", "advantage", "mask")))
        return self.learner.update(batch, iteration)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.learner.policy.state_dict().items()}

    def optimizer_state(self) -> dict:
        return self.learner.state_dict()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
