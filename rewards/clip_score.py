"""CLIPScore (Hessel et al. 2021, as in torchmetrics): ``max(100 * cosine(image, text), 0)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tpdm_rl.rewards.pickscore import HFCLIPReward

from tpdm_rl.core.reward_registry import register_reward


@register_reward("clip_score")
class CLIPScoreReward(HFCLIPReward):
    """``max(100 * cosine(image features, text features), 0)`` of a transformers CLIP folder, the
    definition torchmetrics' ``CLIPScore`` uses (typical real images with ViT-L/14: ~20-35).

    ``checkpoint``: a local transformers CLIP folder (e.g. hub repo ``openai/clip-vit-large-patch14``,
    torchmetrics' default); ``processor``: folder with its tokenizer / preprocessor config when the
    model folder lacks them. Never negative (the clamp at 0 is part of the definition)."""

    unit = "cosine"

    nonnegative = True
    hub_hint = "hub repo openai/clip-vit-large-patch14 (or another CLIP), downloaded to a local folder"

    def _score_batch(self, images: torch.Tensor, prompts: Sequence[str],
                     references: torch.Tensor | None) -> torch.Tensor:
        return (100.0 * self.cosine(images, prompts)).clamp_min(0.0)
