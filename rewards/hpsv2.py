"""HPSv2 / HPSv2.1 (Human Preference Score v2) on ``open_clip_torch`` directly.

The ``hpsv2`` PyPI package is not used (its wheel lacks the BPE vocabulary, it pins old pytest and
protobuf, reloads the checkpoint on every call and scores one PIL image at a time).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tpdm_rl.rewards.base import RewardModel
from tpdm_rl.rewards.checkpoints import load_exact, load_torch_state, one_line, resolve_file
from tpdm_rl.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PromptFeatureCache,
    resize_longest_preprocess,
)

from tpdm_rl.core.reward_registry import RewardError, register_reward

HPS_HUB_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def resolve_open_clip_name(model_name: str, what: str) -> str:
    """An open_clip config name; a path to a ``<name>.json`` model config is registered first (so a
    custom config, e.g. the tiny test one, works in any process) and its stem returned."""
    try:
        import open_clip
    except ModuleNotFoundError as exc:
        raise RewardError(f"{what} needs open_clip_torch ({exc}); install tpdm-rl[rewards]") from None
    if str(model_name).endswith(".json"):
        path = Path(model_name).expanduser()
        if not path.is_file():
            raise RewardError(f"{what}: open_clip model config file {str(path)!r} not found")
        try:
            wanted = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RewardError(one_line(f"{what}: open_clip model config {str(path)!r} unreadable ({exc})")) from None
        if open_clip.get_model_config(path.stem) != wanted:
            open_clip.add_model_config(path)  # a later file with the same name wins in open_clip's registry
            if open_clip.get_model_config(path.stem) != wanted:
                raise RewardError(f"{what}: open_clip did not register model config {str(path)!r}")
        return path.stem
    return str(model_name)


def create_open_clip(model_name: str, what: str):
    """``open_clip.create_model(model_name, pretrained=None)`` with one-line errors (``model_name``
    already resolved by ``resolve_open_clip_name``)."""
    import open_clip

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "No pretrained weights loaded": we load them right after
    try:
        return open_clip.create_model(model_name, pretrained=None)
    except RuntimeError as exc:
        if "not found" in str(exc):
            raise RewardError(f"{what}: open_clip has no model config {model_name!r}") from None
        raise
    finally:
        logging.disable(previous)


def image_size_of(visual) -> int:
    """The square input size of an open_clip visual tower."""
    size = getattr(visual, "image_size", 224)
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise RewardError(f"non-square open_clip image size {tuple(size)} is not supported")
        size = size[0]
    return int(size)


@register_reward("hpsv2")
class HPSv2Reward(RewardModel):
    """HPSv2 score: cosine(image features, text features) of the HPS-fine-tuned open_clip ViT-H-14.

    Both feature vectors are L2-normalised; no logit scale. Papers report 100x this value
    (HPS 29.59 there is 0.2959 here). v2.0 and v2.1 scores are not comparable with each other.

    Options: ``checkpoint`` (local ``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt``; when left
    out and ``HF_HUB_OFFLINE`` is unset it is fetched from hub repo ``xswu/HPSv2``), ``version``
    (``v2.0``/``v2.1``, only picks that default file), ``model_name`` (open_clip config name,
    ``ViT-H-14``, or a path to a ``<name>.json`` open_clip model config). Images are preprocessed as
    the ``hpsv2`` package does (open_clip ``ResizeMaxSize``): the longest side is resized (bicubic,
    antialias) to the model's input size (224) and the short side zero-padded to a square, so a
    non-square image is scored whole, not centre-cropped (a square image is simply resized); then
    clamped to [0, 1] (as the other rewards; the package itself does not clamp its float tensors) and
    normalised with the OpenAI CLIP mean/std, on the device, batched.
    Text features are cached per prompt (a group of images for one prompt costs one text pass).
    """

    unit = "cosine"

    text_cache_size = 4096

    def __init__(self, checkpoint: str | None = None, version: str = "v2.1", model_name: str = "ViT-H-14",
                 device="auto", dtype="auto", batch_size: int = 32) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        if version not in HPS_FILES:
            raise RewardError(f"hpsv2: version must be one of {sorted(HPS_FILES)}, got {version!r}")
        self.version = version
        self.model_name = model_name = resolve_open_clip_name(model_name, "hpsv2")
        hub_file = HPS_FILES[version]
        path = resolve_file(checkpoint, "hpsv2", f"hub repo {HPS_HUB_REPO} file {hub_file}",
                            hub_repo=HPS_HUB_REPO, hub_file=hub_file)
        self.checkpoint = str(path)
        state = load_torch_state(path)  # before building the model: a bad file fails fast
        model = create_open_clip(model_name, "hpsv2")
        load_exact(model, state, "hpsv2", path, ignore=("attn_mask", "text.transformer.embeddings.position_ids"))
        del state
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)

        import open_clip

        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.image_size = image_size_of(self.model.visual)
        self.text_cache = PromptFeatureCache(self.text_cache_size)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        feats = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(feats, dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 text features [B, D] (cached per prompt)."""
        return self.text_cache.get(list(prompts), self._encode_text)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image features [B, D] for images in [0, 1]."""
        pixels = resize_longest_preprocess(images, self.image_size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                                           dtype=self.dtype)
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def _score_batch(self, images: torch.Tensor, prompts: Sequence[str],
                     references: torch.Tensor | None) -> torch.Tensor:
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)
