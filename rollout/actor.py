"""The rollout Ray actor: a thin wrapper around ``RolloutWorker`` (plus an inference TPM copy).

``generate`` returns three objects by reference so the controller pulls only what it needs: a small
summary (step counts), the learner rows (pooled features, actions, log-probs: fetched by the learner
ranks) and the images (+ fidelity references: fetched by the reward actors).
"""

from __future__ import annotations

import torch


class RolloutActor:
    """Wrapped with ``ray.remote(num_returns...)`` by the Ray trainer; usable directly in tests."""

    def __init__(self, cfg_json: str, backbone_path: str, threads: int = 1) -> None:
        from tpdm_rl.config import Config
        from tpdm_rl.trainer import build_policy

        from .worker import RolloutWorker

        torch.set_num_threads(threads)
        self.cfg = Config.model_validate_json(cfg_json)
        self.worker = RolloutWorker(self.cfg.backbone, self.cfg.rollout, backbone_path)
        bb = self.worker.backbone
        self.policy = build_policy(self.cfg, bb.feature_channels, bb.temb_dim).to(bb.device).eval()
        self.version = -1

    def spec(self) -> dict:
        return self.policy.spec.to_dict()

    def backbone_meta(self) -> dict:
        """The TPM file's inference metadata for this backbone (the controller does not load one)."""
        from tpdm_rl.trainer import inference_meta

        return inference_meta(self.cfg, self.worker.backbone, self.worker.backbone.path)

    def set_weights(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        """Load the published TPM weights of ``version`` (no-op if already loaded)."""
        if version != self.version:
            self.policy.load_state_dict(weights)
            self.version = int(version)
        return self.version

    def generate(self, task: dict) -> tuple[dict, dict, dict]:
        """Run one rollout task: {"task", "prompts", "noise_seeds", "sample_keys", "need_reference", "version"}."""
        if task["version"] != self.version:
            raise RuntimeError(f"rollout worker has policy version {self.version}, task needs {task['version']}")
        import time

        t0 = time.perf_counter()
        tr = self.worker.generate(self.policy, task["prompts"], task["noise_seeds"], task["sample_keys"],
                                  policy_version=self.version)
        refs = self.worker.references(task["prompts"], task["noise_seeds"]) if task["need_reference"] else None
        summary = {"task": task["task"], "steps": tr.steps, "rows": tr.num_rows, "policy_version": self.version,
                   "busy_s": time.perf_counter() - t0}
        rows = {"traj": tr.traj, "step": tr.step, "sigma": tr.sigma, "action": tr.action, "logp": tr.logp,
                "valid": tr.valid, "features": tr.features, "temb": tr.temb}
        images = {"images": tr.images, "references": refs, "prompts": list(task["prompts"])}
        return summary, rows, images

    def ping(self) -> bool:
        return True
