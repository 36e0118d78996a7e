"""DeepSpeed learner group without Ray: N gloo ranks in spawned processes give the update of one process."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket

import pytest
import torch

from tpdm_rl.algorithm.messages import LearnBatch
from tpdm_rl.algorithm.policy import TimePredictionModule, TPMSpec
from tpdm_rl.core.config_io import load_config
from tpdm_rl.core.threads import apply_threads
from tpdm_rl.training.learner import Learner

pytestmark = pytest.mark.slow

SPEC = TPMSpec(in_channels=6, temb_dim=8, grid=4, hidden=16, init_ratio=0.7, init_concentration=10.0)
ROWS = 37  # odd on purpose: the two shards differ in size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(zero_stage: int, world: int):
    return load_config("configs/tiny.yaml", [
        "distributed.enabled=true", f"distributed.learner.num_ranks={world}",
        f"distributed.learner.zero_stage={zero_stage}", "algorithm.epochs=2", "algorithm.minibatches=3",
        "optim.lr=0.003", "algorithm.max_grad_norm=0.5"])


def _batch(seed: int = 0) -> LearnBatch:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the behaviour policy: the same in every process
    policy = TimePredictionModule(SPEC)
    feats = torch.randn(ROWS, SPEC.in_channels, SPEC.grid, SPEC.grid, generator=g)
    temb = torch.randn(ROWS, SPEC.temb_dim, generator=g)
    sigma = torch.rand(ROWS, generator=g) * 0.9 + 0.05
    action = torch.rand(ROWS, generator=g) * 0.8 + 0.1
    with torch.no_grad():
        alpha, beta = policy(feats, temb, sigma)
        old = torch.distributions.Beta(alpha, beta).log_prob(action)
    mask = torch.rand(ROWS, generator=g) > 0.25  # padded steps scattered over both shards
    adv = torch.randn(ROWS, generator=g)
    return LearnBatch(feats, temb, sigma, action, old, adv, mask)


def _initial_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return TimePredictionModule(SPEC).state_dict()


def _rank_main(rank: int, world: int, port: int, cfg_json: str, weights: dict, iterations: list[int],
               opt_state: dict | None, queue) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    apply_threads(1)
    from tpdm_rl.training.ds_learner import LearnerRank

    lr = LearnerRank(rank, world, cfg_json, SPEC.to_dict())
    lr.setup("127.0.0.1", port, weights, opt_state)
    batch = _batch()
    lo, hi = round(rank * ROWS / world), round((rank + 1) * ROWS / world)
    for it in iterations:
        lr.update_batch(batch.rows(torch.arange(lo, hi)), it, lo, ROWS)
    import deepspeed.comm.comm as ds_comm

    buf = io.BytesIO()  # and whether DeepSpeed built its shm inference op (a ~minute JIT compile on a fresh machine)
    torch.save({"weights": lr.weights(), "optim": lr.optimizer_state(),
                "shm_op_built": ds_comm.cdb.shm_comm_op is not None}, buf)
    queue.put((rank, buf.getvalue()))
    lr.shutdown()


def _run_group(zero_stage: int, world: int, iterations: list[int], weights: dict,
               opt_state: dict | None = None) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    cfg_json = _config(zero_stage, world).model_dump_json()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, cfg_json, weights, iterations, opt_state, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        rank, data = queue.get(timeout=600)
        out[rank] = torch.load(io.BytesIO(data), weights_only=True)  # what a checkpoint would hold
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    return [out[r] for r in range(world)]


def _single_process(iterations: list[int]) -> dict[str, torch.Tensor]:
    apply_threads(1)  # as the ranks: the same kernels, the same summation order
    cfg = _config(0, 1)
    policy = TimePredictionModule(SPEC)
    policy.load_state_dict(_initial_weights())
    learner = Learner(policy, cfg.optim, cfg.algorithm, cfg.seed)
    for it in iterations:
        learner.update(_batch(), it)
    return {k: v.detach().clone() for k, v in learner.policy.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def zero1_two_ranks_two_updates() -> list[dict]:
    """ZeRO-1, 2 ranks, iterations 0 and 1 from the initial weights (shared: spawning a group costs ~10 s)."""
    return _run_group(1, 2, [0, 1], _initial_weights())


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_ranks_give_the_single_process_update(zero_stage, request):
    w0 = _initial_weights()
    ref = _single_process([0, 1])
    assert _max_diff(ref, w0) > 1e-3  # the update moved the weights
    one = _run_group(zero_stage, 1, [0, 1], w0)[0]["weights"]
    two = request.getfixturevalue("zero1_two_ranks_two_updates") if zero_stage == 1 else _run_group(2, 2, [0, 1], w0)
    assert _max_diff(two[0]["weights"], two[1]["weights"]) == 0.0
    assert not any(r["shm_op_built"] for r in two)  # the CPU ranks skip it: no gradient uses it
    assert _max_diff(one, ref) < 1e-5
    assert _max_diff(two[0]["weights"], ref) < 1e-5


def test_zero_partitioned_optimizer_state_round_trips(zero1_two_ranks_two_updates):
    """ZeRO-1, 2 ranks: update, checkpoint every rank's partition, rebuild the group, update again ==
    two updates straight."""
    from tpdm_rl.training.ds_learner import check_resumable, merge_rank_states

    w0 = _initial_weights()
    straight = zero1_two_ranks_two_updates
    first = _run_group(1, 2, [0], w0)
    state = merge_rank_states([r["optim"] for r in first])
    assert check_resumable(state, 1, 2) is None
    assert "num_ranks=2" in check_resumable(state, 1, 3)
    assert "zero_stage=0" in check_resumable({"optimizer": {}}, 1, 2)
    resumed = _run_group(1, 2, [1], first[0]["weights"], state)
    assert _max_diff(resumed[0]["weights"], straight[0]["weights"]) < 1e-6
