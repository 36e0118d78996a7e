"""PickScore (and the shared transformers-CLIP loader that ``clip_score`` uses too)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tpdm_rl.rewards.base import RewardModel
from tpdm_rl.rewards.checkpoints import one_line, require_dir
from tpdm_rl.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PromptFeatureCache, clip_preprocess
from transformers import AutoTokenizer, CLIPModel
from transformers.utils import logging as hf_logging

from tpdm_rl.core.reward_registry import RewardError, register_reward


def _pooled(out) -> torch.Tensor:
    """transformers < 5 returns the projected features; 5.x returns an output object whose
    ``pooler_output`` holds them."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise RewardError(f"unexpected CLIP feature output {type(out).__name__} (no pooler_output)")
    return pooled


def read_image_processor_config(folder: Path, default_size: int) -> dict:
    """Resize / crop size and mean/std from a ``preprocessor_config.json`` (CLIP defaults if absent)."""
    cfg_path = folder / "preprocessor_config.json"
    out = {"size": default_size, "crop": default_size, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD}
    if not cfg_path.is_file():
        return out
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise RewardError(one_line(f"could not read {str(cfg_path)!r}: {exc}")) from None

    def side(value, keys):
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            for k in keys:
                if isinstance(value.get(k), int):
                    return value[k]
        return None

    size = side(cfg.get("size"), ("shortest_edge", "height"))
    crop = side(cfg.get("crop_size"), ("height", "shortest_edge"))
    if size is not None:
        out["size"] = size
    if cfg.get("do_center_crop", True) is False:
        out["crop"] = out["size"]
    elif crop is not None:
        out["crop"] = crop
    if cfg.get("image_mean") is not None:
        out["mean"] = tuple(float(v) for v in cfg["image_mean"])
    if cfg.get("image_std") is not None:
        out["std"] = tuple(float(v) for v in cfg["image_std"])
    return out


class HFCLIPReward(RewardModel):
    """A transformers ``CLIPModel`` folder + its tokenizer and image-processor config.

    ``checkpoint``: the model folder (``config.json`` + weights); ``processor``: folder with the
    tokenizer and ``preprocessor_config.json`` (default: the model folder). Images are resized
    (shortest side, bicubic, antialias), centre-cropped and normalised as that config says, on the
    device, batched; text is padded/truncated to 77 tokens; text features are cached per prompt.
    """

    hub_hint = "a transformers CLIP folder"
    text_cache_size = 4096

    def __init__(self, checkpoint: str | None = None, processor: str | None = None, device="auto",
                 dtype="auto", batch_size: int = 32) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        folder = require_dir(checkpoint, self.name, self.hub_hint)
        proc = require_dir(processor, f"{self.name} processor", self.hub_hint, must_contain=()) if processor \
            else folder

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in every reward actor's log
        try:
            model, info = CLIPModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
        except Exception as exc:
            raise RewardError(one_line(f"{self.name}: could not load CLIP model from {str(folder)!r} "
                                        f"({type(exc).__name__}: {str(exc)[:200]})")) from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        missing = list(info.get("missing_keys", []))
        if missing:
            raise RewardError(one_line(f"{self.name}: {str(folder)!r} lacks {len(missing)} CLIP weights "
                                        f"(e.g. {missing[:3]}); is it a CLIPModel folder?"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(proc), local_files_only=True)
        except Exception as exc:
            raise RewardError(one_line(f"{self.name}: no usable tokenizer in {str(proc)!r} ({type(exc).__name__}); "
                                        f"pass processor=<folder with the tokenizer files>")) from None
        self.checkpoint = str(folder)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.max_length = min(77, int(self.model.config.text_config.max_position_embeddings))
        self.pre = read_image_processor_config(proc, int(self.model.config.vision_config.image_size))
        self.text_cache = PromptFeatureCache(self.text_cache_size)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return torch.nn.functional.normalize(_pooled(out).float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 text features [B, D] (cached per prompt)."""
        return self.text_cache.get(list(prompts), self._encode_text)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image features [B, D] for images in [0, 1]."""
        p = self.pre
        pixels = clip_preprocess(images, p["size"], p["crop"], mean=p["mean"], std=p["std"], dtype=self.dtype)
        out = self.model.get_image_features(pixel_values=pixels)
        return torch.nn.functional.normalize(_pooled(out).float(), dim=-1)

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)


@register_reward("pickscore")
class PickScoreReward(HFCLIPReward):
    """PickScore: ``logit_scale.exp() * cosine(image, text)`` of the PickScore_v1 CLIP-H (~18-23 for
    real images). ``checkpoint``: local copy of hub repo ``yuvalkirstain/PickScore_v1``;
    ``processor``: local copy of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (its tokenizer and
    preprocessor config) when the model folder has no tokenizer."""

    unit = "scaled cosine"

    hub_hint = ("hub repo yuvalkirstain/PickScore_v1 (processor: laion/CLIP-ViT-H-14-laion2B-s32B-b79K), "
                "downloaded to a local folder")

    def _score_batch(self, images: torch.Tensor, prompts: Sequence[str],
                     references: torch.Tensor | None) -> torch.Tensor:
        return self.model.logit_scale.float().exp() * self.cosine(images, prompts)
