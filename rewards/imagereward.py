"""ImageReward (THUDM) rebuilt from transformers' ``BlipVisionModel`` + ``BlipTextModel``.

The ``image-reward`` package does not import on this stack (timm==0.6.13 pin, OpenAI clip, removed
transformers APIs). Its network is BLIP's ViT (timm-style) and BLIP's ``med.py`` BERT with
cross-attention, which transformers' BLIP classes reproduce once the checkpoint keys are renamed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from tpdm_rl.rewards.aesthetic import load_reward_mlp
from tpdm_rl.rewards.base import RewardModel
from tpdm_rl.rewards.checkpoints import load_exact, load_torch_state, one_line, resolve_file
from tpdm_rl.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess
from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from tpdm_rl.core.reward_registry import RewardError, register_reward

IR_HUB_REPO = "THUDM/ImageReward"
IR_MEAN = 0.16717362830052426
IR_STD = 1.0333394966054072
IR_MAX_LENGTH = 35
# Parts of BLIP_Pretrain saved in ImageReward.pt that the reward does not use.
IR_UNUSED_PREFIXES = ("vision_proj.", "text_proj.", "itm_head.", "temp", "image_queue", "text_queue",
                      "ptr_queue", "idx_queue")

_VISION_RULES = [
    (re.compile(r"^cls_token$"), "embeddings.class_embedding"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embedding"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"embeddings.patch_embedding.\1"),
    (re.compile(r"^blocks\.(\d+)\.norm1\.(weight|bias)$"), r"encoder.layers.\1.layer_norm1.\2"),
    (re.compile(r"^blocks\.(\d+)\.norm2\.(weight|bias)$"), r"encoder.layers.\1.layer_norm2.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"), r"encoder.layers.\1.self_attn.qkv.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), r"encoder.layers.\1.self_attn.projection.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"encoder.layers.\1.mlp.\2.\3"),
    (re.compile(r"^norm\.(weight|bias)$"), r"post_layernorm.\1"),
]


def rename_vision_key(key: str) -> str:
    """BLIP ViT (timm-style) key -> transformers ``BlipVisionModel`` key (unknown keys unchanged)."""
    for pattern, repl in _VISION_RULES:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return key


def split_imagereward_state(state: dict[str, torch.Tensor], path) -> tuple[dict, dict, dict, list[str]]:
    """(vision, text, mlp, ignored keys) of an ImageReward checkpoint; vision keys renamed for
    transformers, text keys unchanged except ``embeddings.position_ids`` dropped. Accepts the
    released layout (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) and the
    same without the ``blip.`` prefix; fails on any key it does not know."""
    vision, text, mlp, ignored, unknown = {}, {}, {}, [], []
    for key, value in state.items():
        k = key[len("blip."):] if key.startswith("blip.") else key
        if k.startswith("visual_encoder."):
            vision[rename_vision_key(k[len("visual_encoder."):])] = value
        elif k.startswith("text_encoder."):
            sub = k[len("text_encoder."):]
            if sub != "embeddings.position_ids":
                text[sub] = value
        elif k.startswith("mlp."):
            mlp[k[len("mlp."):]] = value
        elif k.startswith(IR_UNUSED_PREFIXES) or k.endswith("_m") or "_m." in k:
            ignored.append(key)  # BLIP pre-training heads / momentum encoders
        else:
            unknown.append(key)
    if unknown:
        raise RewardError(one_line(f"imagereward: checkpoint {str(path)!r} has {len(unknown)} unknown keys "
                                    f"(e.g. {unknown[:3]}); not an ImageReward.pt?"))
    for part, name in ((vision, "visual_encoder"), (text, "text_encoder"), (mlp, "mlp")):
        if not part:
            raise RewardError(f"imagereward: checkpoint {str(path)!r} has no {name}.* weights; not an ImageReward.pt?")
    return vision, text, mlp, ignored


def vision_config_from_state(vision: dict[str, torch.Tensor], path):
    """A ``BlipVisionConfig`` sized from the (renamed) vision weights: BLIP ViT, LayerNorm eps 1e-6,
    GELU, 64-d attention heads (ViT-B: 12, ViT-L: 16)."""

    try:
        hidden = int(vision["embeddings.class_embedding"].shape[-1])
        patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
        positions = int(vision["embeddings.position_embedding"].shape[1])
        intermediate = int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as exc:
        raise RewardError(f"imagereward: checkpoint {str(path)!r} lacks vision weight {exc}") from None
    grid = int(round((positions - 1) ** 0.5))
    if grid * grid != positions - 1:
        raise RewardError(f"imagereward: pos_embed in {str(path)!r} has {positions} positions (not 1 + a square)")
    if hidden % 64:
        raise RewardError(f"imagereward: vision width {hidden} in {str(path)!r} is not a multiple of 64-d heads")
    layers = 1 + max(int(m.group(1)) for k in vision if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    return BlipVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=hidden // 64, image_size=grid * patch, patch_size=patch,
                            hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)


def text_config_from_med(med: dict, encoder_width: int, path):
    """A ``BlipTextConfig`` from ImageReward's ``med_config.json`` (BLIP's BERT-base settings);
    ``encoder_width`` is the vision width (BLIP overrides the file's value the same way)."""

    if med.get("position_embedding_type", "absolute") != "absolute":
        raise RewardError(f"imagereward: {str(path)!r}: only absolute position embeddings are supported")
    try:
        vocab = int(med["vocab_size"])
        cfg = dict(vocab_size=vocab, hidden_size=int(med["hidden_size"]),
                   encoder_hidden_size=int(encoder_width),
                   intermediate_size=int(med["intermediate_size"]),
                   num_hidden_layers=int(med["num_hidden_layers"]),
                   num_attention_heads=int(med["num_attention_heads"]),
                   max_position_embeddings=int(med.get("max_position_embeddings", 512)),
                   hidden_act=str(med.get("hidden_act", "gelu")),
                   layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   pad_token_id=int(med.get("pad_token_id", 0)),
                   is_decoder=True)  # builds the cross-attention layers; forward() runs bidirectionally
    except (KeyError, TypeError, ValueError) as exc:
        raise RewardError(one_line(f"imagereward: med_config {str(path)!r} is missing or has a bad {exc}")) from None
    for name, default in (("bos_token_id", 30522), ("sep_token_id", 102)):
        cfg[name] = default if default < vocab else None
    return BlipTextConfig(**cfg)


@register_reward("imagereward")
class ImageRewardReward(RewardModel):
    """ImageReward v1.0: BLIP ViT-L/16 (224 px) image tokens cross-attended by a BERT-base text
    encoder; the [CLS] state -> MLP 768->1024->128->64->16->1; reward = (mlp - 0.16717) / 1.03334
    (z-normalised: can be negative, typical range about -2..2).

    Options: ``checkpoint`` (``ImageReward.pt``; fetched from hub repo ``THUDM/ImageReward`` only when
    left out and ``HF_HUB_OFFLINE`` is unset), ``med_config`` (default: ``med_config.json`` beside the
    checkpoint), ``tokenizer`` (a BERT tokenizer folder or id, local files only; default
    ``bert-base-uncased`` from the local Hugging Face cache). Text is padded/truncated to 35 tokens.
    """

    unit = "z-score"

    def __init__(self, checkpoint: str | None = None, med_config: str | None = None,
                 tokenizer: str = "bert-base-uncased", device="auto", dtype="auto", batch_size: int = 32) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        where = f"hub repo {IR_HUB_REPO} file ImageReward.pt"
        path = resolve_file(checkpoint, "imagereward", where, hub_repo=IR_HUB_REPO, hub_file="ImageReward.pt")
        if med_config is None and (path.parent / "med_config.json").is_file():
            med_config = str(path.parent / "med_config.json")
        med_path = resolve_file(med_config, "imagereward med_config", f"hub repo {IR_HUB_REPO} file med_config.json",
                                hub_repo=IR_HUB_REPO, hub_file="med_config.json")
        try:
            med = json.loads(Path(med_path).read_text())
            if not isinstance(med, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise RewardError(one_line(f"imagereward: med_config {str(med_path)!r} could not be read ({exc})")) from None
        state = load_torch_state(path)
        vision_sd, text_sd, mlp_sd, self.ignored_keys = split_imagereward_state(state, path)
        del state

        vcfg = vision_config_from_state(vision_sd, path)
        vision = BlipVisionModel(vcfg)
        load_exact(vision, vision_sd, "imagereward visual_encoder", path)
        tcfg = text_config_from_med(med, vcfg.hidden_size, med_path)
        text = BlipTextModel(tcfg, add_pooling_layer=False)
        load_exact(text, text_sd, "imagereward text_encoder", path)
        mlp = load_reward_mlp(mlp_sd, "imagereward mlp", path, expected_input=tcfg.hidden_size)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        except Exception as exc:
            raise RewardError(one_line(
                f"imagereward: BERT tokenizer {tokenizer!r} not available locally ({type(exc).__name__}); pass "
                f"tokenizer=<folder> (hub repo google-bert/bert-base-uncased)")) from None
        if len(self.tokenizer) > tcfg.vocab_size:
            raise RewardError(f"imagereward: tokenizer {tokenizer!r} has {len(self.tokenizer)} tokens but the text "
                              f"encoder only {tcfg.vocab_size}")
        self.checkpoint, self.med_config = str(path), str(med_path)
        self.image_size = int(vcfg.image_size)
        self.vision = vision.to(self.device, self.dtype).eval().requires_grad_(False)
        self.text = text.to(self.device, self.dtype).eval().requires_grad_(False)
        self.mlp = mlp.to(self.device, torch.float32).eval().requires_grad_(False)

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=IR_MAX_LENGTH,
                             return_tensors="pt")
        return {"input_ids": tok["input_ids"].to(self.device), "attention_mask": tok["attention_mask"].to(self.device)}

    def _score_batch(self, images: torch.Tensor, prompts: Sequence[str],
                     references: torch.Tensor | None) -> torch.Tensor:
        pixels = clip_preprocess(images, self.image_size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                                 dtype=self.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        tok = self.tokenize(prompts)
        out = self.text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        cls = out.last_hidden_state[:, 0, :].float()
        return ((self.mlp(cls) - IR_MEAN) / IR_STD).squeeze(-1)
