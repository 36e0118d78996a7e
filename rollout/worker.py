"""A rollout worker: the frozen backbone, the sampling engine, its own copy of the TPM, and references.

The local executor calls it directly; the Ray executor runs it as an actor (``ray.remote``) with no
wrapper, so one process and a cluster generate trajectories through the same code. The worker
holds a copy of the policy and loads each published weight version (``set_weights``) before a task:
a task names the version it must run with, and a stale worker refuses it.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from tpdm_rl.config import Config
from tpdm_rl.messages import ImageBatch, RolloutSummary, RolloutTask, StepRows
from tpdm_rl.policy import build_policy
from tpdm_rl.utils import DTYPES, PhaseTimer

from .backbone import Backbone
from .engine import SamplingEngine
from .schedules import TPMSchedule
from .settings import inference_settings
from .tiny_backbone import ensure_tiny_backbone
from .toy_backbone import BUILTIN_TOY, shipped_toy_dir
from .trajectory import Trajectories


def resolve_backbone_path(path: str, tiny_dir: str | Path, tiny_seed: int, resolution: int) -> str:
    """``builtin:toy``: the shipped trained toy backbone; empty: the tiny random backbone, built once in
    ``tiny_dir``; anything else: a local diffusers folder or a hub id, as given."""
    if path == BUILTIN_TOY:
        return str(shipped_toy_dir())
    if path:
        return path
    return str(ensure_tiny_backbone(tiny_dir, seed=tiny_seed, sample_size=min(resolution, 128)))


class RolloutWorker:
    """Generates the trajectories (and cached fidelity references) of rollout tasks."""

    def __init__(self, cfg: Config, backbone_path: str, threads: int | None = None,
                 reference_cache_size: int = 4096) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        b, r = cfg.backbone, cfg.rollout
        self.backbone = Backbone(backbone_path, device=b.device, dtype=b.dtype, guidance_scale=b.guidance_scale,
                                 feature_blocks=tuple(b.feature_blocks), feature_grid=b.feature_grid,
                                 max_sequence_length=b.max_sequence_length, negative_prompt=b.negative_prompt)
        self.feature_dtype = DTYPES[b.feature_dtype]
        self.engine = SamplingEngine(self.backbone, b.resolution, b.resolution, batch_size=r.batch_size,
                                     max_steps=r.max_steps, sigma_max=r.sigma_max, continuous=r.continuous_batching,
                                     record_features=True, feature_dtype=self.feature_dtype,
                                     decode_batch_size=r.decode_batch_size)
        self.policy = build_policy(cfg, self.backbone.feature_channels, self.backbone.temb_dim)
        self.policy = self.policy.to(self.backbone.device).eval()
        self.version = 0
        self._refs: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._ref_cap = int(reference_cache_size)

    # ------------------------------------------------------------------ set-up queries
    def spec(self) -> dict:
        return self.policy.spec.to_dict()

    def inference_settings(self) -> dict:
        """The TPM file's inference metadata for this backbone."""
        return inference_settings(self.cfg, self.backbone, self.backbone.path)

    def set_weights(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        """Load the published TPM weights of ``version`` (no-op if already loaded)."""
        if version != self.version:
            self.policy.load_state_dict(weights)
            self.version = int(version)
        return self.version

    def ping(self) -> bool:
        return True

    # ------------------------------------------------------------------ work
    def generate(self, prompts: list[str], noise_seeds: list[int], sample_keys: torch.Tensor,
                 mode: str = "sample") -> Trajectories:
        schedule = TPMSchedule(self.policy, self.cfg.rollout.sigma_min, mode=mode, feature_dtype=self.feature_dtype)
        return self.engine.run(prompts, noise_seeds, sample_keys, schedule, policy_version=self.version)

    def references(self, prompts: list[str], noise_seeds: list[int]) -> torch.Tensor:
        """Images of the backbone's default ``reference_steps`` schedule for the same prompt and noise.

        Computed once per distinct (prompt, noise seed) and cached, so the G samples of a group that
        share their noise share one reference.
        """
        keys = list(zip(prompts, [int(s) for s in noise_seeds]))
        todo = list(OrderedDict.fromkeys(k for k in keys if k not in self._refs))
        if todo:
            ref = self.engine.run_fixed([p for p, _ in todo], [s for _, s in todo], self.cfg.rollout.reference_steps)
            for k, img in zip(todo, ref.images):
                self._refs[k] = img
                while len(self._refs) > self._ref_cap:
                    self._refs.popitem(last=False)
        return torch.stack([self._refs[k] for k in keys])

    def run_task(self, task: RolloutTask) -> tuple[RolloutSummary, StepRows, ImageBatch]:
        """One rollout task: (summary for the controller, rows for the learner, images for the rewards)."""
        if task.version != self.version:
            raise RuntimeError(f"rollout worker has policy version {self.version}, task needs {task.version}")
        timer = PhaseTimer()
        calls0 = self.engine.stats["backbone_calls"]
        with timer("busy"):
            tr = self.generate(task.prompts, task.noise_seeds, task.sample_keys)
            refs = None
            if task.need_reference:
                with timer("reference"):
                    refs = self.references(task.prompts, task.noise_seeds)
        t = timer.seconds
        summary = RolloutSummary(task=task.task, steps=tr.steps, rows=tr.num_rows, policy_version=self.version,
                                 busy_s=t["busy"], reference_s=t.get("reference", 0.0),
                                 backbone_calls=self.engine.stats["backbone_calls"] - calls0)
        return summary, tr.step_rows(), ImageBatch(tr.images, list(task.prompts), refs)
