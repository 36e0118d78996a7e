"""A rollout worker without Ray: the frozen backbone, the engine, an inference TPM and references.

The Ray rollout actor (distributed issue) is a thin wrapper around this class, so the single-process
trainer and the distributed one produce the same trajectories for the same inputs.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from .backbone import DTYPES, Backbone
from .engine import SamplingEngine, TPMSchedule
from .tiny_backbone import ensure_tiny_backbone
from .trajectory import Trajectories


def resolve_backbone_path(path: str, tiny_dir: str | Path, tiny_seed: int, resolution: int) -> str:
    """An empty path means: the tiny offline backbone, built once in ``tiny_dir``."""
    if path:
        return path
    return str(ensure_tiny_backbone(tiny_dir, seed=tiny_seed, sample_size=min(resolution, 128)))


class RolloutWorker:
    """Holds the backbone and generates trajectories (and cached fidelity references)."""

    def __init__(self, backbone_cfg, rollout_cfg, backbone_path: str, reference_cache_size: int = 4096) -> None:
        self.bcfg, self.rcfg = backbone_cfg, rollout_cfg
        self.backbone = Backbone(
            backbone_path, device=backbone_cfg.device, dtype=backbone_cfg.dtype,
            guidance_scale=backbone_cfg.guidance_scale, feature_blocks=tuple(backbone_cfg.feature_blocks),
            feature_grid=backbone_cfg.feature_grid, max_sequence_length=backbone_cfg.max_sequence_length,
            negative_prompt=backbone_cfg.negative_prompt,
        )
        self.feature_dtype = DTYPES[backbone_cfg.feature_dtype]
        res = backbone_cfg.resolution
        self.engine = SamplingEngine(
            self.backbone, res, res, batch_size=rollout_cfg.batch_size, max_steps=rollout_cfg.max_steps,
            sigma_max=rollout_cfg.sigma_max, continuous=rollout_cfg.continuous_batching, record_features=True,
            feature_dtype=self.feature_dtype, decode_batch_size=rollout_cfg.decode_batch_size,
        )
        self._refs: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._ref_cap = int(reference_cache_size)

    def generate(self, policy: torch.nn.Module, prompts: list[str], noise_seeds: list[int],
                 sample_keys: torch.Tensor, policy_version: int = 0, mode: str = "sample") -> Trajectories:
        schedule = TPMSchedule(policy, self.rcfg.sigma_min, mode=mode, feature_dtype=self.feature_dtype)
        return self.engine.run(prompts, noise_seeds, sample_keys, schedule, policy_version=policy_version)

    def references(self, prompts: list[str], noise_seeds: list[int]) -> torch.Tensor:
        """Images of the backbone's default ``reference_steps`` schedule for the same prompt and noise.

        Computed once per distinct (prompt, noise seed) and cached, so the G samples of a group that
        share their noise share one reference.
        """
        keys = list(zip(prompts, [int(s) for s in noise_seeds]))
        todo = list(OrderedDict.fromkeys(k for k in keys if k not in self._refs))
        if todo:
            ref = self.engine.run_fixed([p for p, _ in todo], [s for _, s in todo], self.rcfg.reference_steps)
            for k, img in zip(todo, ref.images):
                self._refs[k] = img
                while len(self._refs) > self._ref_cap:
                    self._refs.popitem(last=False)
        return torch.stack([self._refs[k] for k in keys])
