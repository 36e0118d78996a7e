"""LAION improved aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE.pth``) on open_clip embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tpdm_rl.rewards.base import RewardModel
from tpdm_rl.rewards.checkpoints import load_exact, load_torch_state, require_file
from tpdm_rl.rewards.hpsv2 import create_open_clip, image_size_of, resolve_open_clip_name
from tpdm_rl.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

from tpdm_rl.core.reward_registry import RewardError, register_reward

AESTHETIC_WHERE = ("github.com/christophschuhmann/improved-aesthetic-predictor "
                   "file sac+logos+ava1-l14-linearMSE.pth")
CLIP_WHERE = ("an open_clip state dict of OpenAI CLIP ViT-L/14, e.g. open_clip_pytorch_model.bin "
              "from hub repo timm/vit_large_patch14_clip_224.openai")


class RewardMLP(nn.Module):
    """The LAION aesthetic / ImageReward head: in->1024->128->64->16->1, dropouts 0.2/0.2/0.1, no
    activations; state dict keys ``layers.{0,2,4,6,7}.{weight,bias}`` as in the released files."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_reward_mlp(state: dict[str, torch.Tensor], what: str, path, expected_input: int | None = None
                    ) -> RewardMLP:
    """Build a RewardMLP sized from ``layers.0.weight`` and load ``state`` exactly."""
    w0 = state.get("layers.0.weight")
    if w0 is None or w0.ndim != 2:
        raise RewardError(f"{what}: checkpoint {str(path)!r} has no 'layers.0.weight' (not an aesthetic-style MLP)")
    if expected_input is not None and w0.shape[1] != expected_input:
        raise RewardError(f"{what}: MLP in {str(path)!r} takes {w0.shape[1]}-d input but the embeddings are "
                          f"{expected_input}-d")
    mlp = RewardMLP(int(w0.shape[1]))
    load_exact(mlp, state, what, path)
    return mlp


@register_reward("aesthetic")
class AestheticReward(RewardModel):
    """LAION improved aesthetic predictor v2: the linear MLP on L2-normalised CLIP ViT-L/14 image
    embeddings (float32). Scores are roughly 1-10.

    Options: ``checkpoint`` (the MLP ``.pth``), ``clip_checkpoint`` (an open_clip state dict of the
    CLIP the MLP was trained on; only its ``visual.*`` weights are kept), ``clip_model_name`` (open_clip
    config name, or a path to a ``<name>.json`` open_clip model config). The default is ``ViT-L-14-quickgelu``: OpenAI's ViT-L/14 uses QuickGELU, and open_clip's
    plain ``ViT-L-14`` config (GELU) would load the same weights without complaint and give wrong
    embeddings. The MLP input width must equal the CLIP embedding width.
    """

    unit = "score, about 1-10"

    def __init__(self, checkpoint: str | None = None, clip_checkpoint: str | None = None,
                 clip_model_name: str = "ViT-L-14-quickgelu", device="auto", dtype="auto",
                 batch_size: int = 32) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        mlp_path = require_file(checkpoint, "aesthetic", AESTHETIC_WHERE)
        clip_path = require_file(clip_checkpoint, "aesthetic clip_checkpoint", CLIP_WHERE)
        mlp_state = load_torch_state(mlp_path)
        clip_state = load_torch_state(clip_path)
        clip_model_name = resolve_open_clip_name(clip_model_name, "aesthetic")
        model = create_open_clip(clip_model_name, "aesthetic")
        visual = model.visual
        embed_dim = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[-1])
        del model  # only the image tower is needed
        if any(k.startswith("visual.") for k in clip_state):
            clip_state = {k[len("visual."):]: v for k, v in clip_state.items() if k.startswith("visual.")}
        load_exact(visual, clip_state, "aesthetic clip_checkpoint", clip_path)
        del clip_state
        self.mlp = load_reward_mlp(mlp_state, "aesthetic", mlp_path, expected_input=embed_dim)
        self.checkpoint, self.clip_checkpoint = str(mlp_path), str(clip_path)
        self.clip_model_name = clip_model_name
        self.visual = visual.to(self.device, self.dtype).eval().requires_grad_(False)
        self.mlp = self.mlp.to(self.device, torch.float32).eval().requires_grad_(False)
        self.image_size = image_size_of(self.visual)

    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 CLIP image embeddings [B, D]."""
        pixels = clip_preprocess(images, self.image_size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                                 dtype=self.dtype)
        return torch.nn.functional.normalize(self.visual(pixels).float(), dim=-1)

    def _score_batch(self, images: torch.Tensor, prompts: Sequence[str],
                     references: torch.Tensor | None) -> torch.Tensor:
        return self.mlp(self.embeddings(images)).squeeze(-1)
