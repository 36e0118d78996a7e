"""A rollout worker: the frozen backbone, the sampling engine, its own copy of the TPM, and references.

The local executor calls it directly; the Ray executor runs it as an actor (``ray.remote``) with no
wrapper, so one process and a cluster generate trajectories through the same code. The worker
holds a copy of the policy and loads each published weight version (``set_weights``) before a task:
a task names the version it must run with, and a stale worker refuses it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from tpdm_rl.rollout.backbone import Backbone
from tpdm_rl.rollout.engine import ReferenceRequest, SamplingEngine
from tpdm_rl.rollout.schedules import TPMSchedule
from tpdm_rl.rollout.settings import inference_settings
from tpdm_rl.rollout.trajectory import Trajectories

from tpdm_rl.algorithm.messages import ImageBatch, RolloutSummary, RolloutTask, StepRows
from tpdm_rl.algorithm.policy import build_policy
from tpdm_rl.core.config import Config
from tpdm_rl.core.devices import DTYPES
from tpdm_rl.core.prompts import load_prompts
from tpdm_rl.core.threads import apply_threads
from tpdm_rl.core.timing import PhaseTimer


class RolloutWorker:
    """Generates the trajectories (and cached fidelity references) of rollout tasks."""

    def __init__(self, cfg: Config, backbone_path: str, threads: int | None = None) -> None:
        if threads:  # a Ray actor (distributed.threads_per_actor); in one process the controller's setting holds
            apply_threads(threads, "actor")
        self.cfg = cfg
        b, r = cfg.backbone, cfg.rollout
        self.backbone = Backbone(backbone_path, device=b.device, dtype=b.dtype, guidance_scale=b.guidance_scale,
                                 feature_blocks=tuple(b.feature_blocks), feature_grid=b.feature_grid,
                                 max_sequence_length=b.max_sequence_length, negative_prompt=b.negative_prompt,
                                 feature_source=cfg.policy.inputs, compile=b.compile, family=b.family)
        if b.offload_text_encoders:
            self.text_encoder_bytes_freed = self.backbone.offload_text_encoders(load_prompts(r.prompts))
        self.feature_dtype = DTYPES[b.feature_dtype]
        self.engine = SamplingEngine(self.backbone, b.resolution, b.resolution, batch_size=r.batch_size,
                                     max_steps=r.max_steps, sigma_max=r.sigma_max, continuous=r.continuous_batching,
                                     record_features=True, feature_dtype=self.feature_dtype,
                                     decode_batch_size=r.decode_batch_size)
        self.policy = build_policy(cfg, self.backbone.feature_channels, self.backbone.temb_dim)
        self.policy = self.policy.to(self.backbone.device).eval()
        self.version = 0
        # fidelity references by (prompt, noise seed), in the storage dtype, least recently used dropped first
        self._refs: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._ref_bytes = 0
        self._ref_cap = int(r.reference_cache_mb * 2**20)
        self._ref_dtype = self.feature_dtype if self.feature_dtype != torch.float32 else torch.float16
        self.ref_stats = {"hits": 0, "misses": 0}

    # ------------------------------------------------------------------ set-up queries
    def spec(self) -> dict:
        return self.policy.spec.to_dict()

    def inference_settings(self) -> dict:
        """The TPM file's inference metadata for this backbone."""
        return inference_settings(self.cfg, self.backbone, self.backbone.name)

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
                 mode: str = "sample", references: ReferenceRequest | None = None) -> Trajectories:
        schedule = TPMSchedule(self.policy, self.cfg.rollout.sigma_min, mode=mode, feature_dtype=self.feature_dtype)
        return self.engine.run(prompts, noise_seeds, sample_keys, schedule, policy_version=self.version,
                               references=references)

    def missing_references(self, prompts: list[str], noise_seeds: list[int]) -> ReferenceRequest:
        """The distinct (prompt, noise seed) pairs whose reference image is not cached."""
        keys = list(OrderedDict.fromkeys(zip(prompts, [int(s) for s in noise_seeds])))
        todo = [k for k in keys if k not in self._refs]
        self.ref_stats["hits"] += len(keys) - len(todo)
        self.ref_stats["misses"] += len(todo)
        return ReferenceRequest([p for p, _ in todo], [s for _, s in todo], self.cfg.rollout.reference_steps)

    def cache_references(self, request: ReferenceRequest, images: torch.Tensor) -> None:
        for key, img in zip(zip(request.prompts, request.noise_seeds), images):
            stored = img.to(self._ref_dtype).clone()
            self._refs[key] = stored
            self._ref_bytes += stored.numel() * stored.element_size()
        while self._ref_bytes > self._ref_cap and len(self._refs) > 1:
            _, old = self._refs.popitem(last=False)
            self._ref_bytes -= old.numel() * old.element_size()

    def _lookup(self, prompts: list[str], noise_seeds: list[int]) -> torch.Tensor:
        out = []
        for key in zip(prompts, [int(s) for s in noise_seeds]):
            self._refs.move_to_end(key)
            out.append(self._refs[key].float())
        return torch.stack(out)

    def run_task(self, task: RolloutTask) -> tuple[RolloutSummary, StepRows, ImageBatch]:
        """One rollout task: (summary for the controller, rows for the learner, images for the rewards)."""
        if task.version != self.version:
            raise RuntimeError(f"rollout worker has policy version {self.version}, task needs {task.version}")
        timer = PhaseTimer()
        calls0, slots0 = self.engine.stats["backbone_calls"], self.engine.stats["slot_steps"]
        with timer("busy"):
            # uncached fidelity references share the rollout's slots and backbone calls
            todo = self.missing_references(task.prompts, task.noise_seeds) if task.need_reference else None
            tr = self.generate(task.prompts, task.noise_seeds, task.sample_keys, references=todo)
            refs = None
            if todo is not None:
                self.cache_references(todo, tr.reference_images)
                refs = self._lookup(task.prompts, task.noise_seeds)
        slot_steps = self.engine.stats["slot_steps"] - slots0
        ref_steps = len(todo.prompts) * todo.num_steps if todo is not None else 0
        summary = RolloutSummary(task=task.task, steps=tr.steps, rows=tr.num_rows, policy_version=self.version,
                                 busy_s=timer.seconds["busy"],
                                 reference_s=timer.seconds["busy"] * ref_steps / max(slot_steps, 1),
                                 backbone_calls=self.engine.stats["backbone_calls"] - calls0,
                                 slot_steps=slot_steps, reference_slot_steps=ref_steps,
                                 reference_hits=self.ref_stats["hits"], reference_misses=self.ref_stats["misses"])
        return summary, tr.step_rows(), ImageBatch(tr.images, list(task.prompts), refs)
