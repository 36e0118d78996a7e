"""Tiny random reward models written in the *real* file formats, for tests and the tiny configs.

Each ``make_*`` function writes into a folder and returns the options ``build_reward`` needs, so
the tests go through exactly the loading code real weights go through. Everything is seeded,
offline (tokenizers are built from in-memory vocabularies), small (< 2 MB a file) and fast.

    from tpdm_rl.builders.reward_fixtures import make_all
    opts = make_all("/tmp/tiny_rewards")        # {"hpsv2": {...}, "aesthetic": {...}, ...}
    build_reward("hpsv2", device="cpu", **opts["hpsv2"])
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from transformers import BertTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

from tpdm_rl.builders.tiny_backbone import tiny_clip_tokenizer
from tpdm_rl.rewards.aesthetic import RewardMLP
from tpdm_rl.rewards.hpsv2 import create_open_clip

TINY_OPEN_CLIP = "tiny-clip"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    # vocab_size must be open_clip's BPE vocabulary (49408) for its SimpleTokenizer
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
}
TINY_IMAGE_SIZE = 32

_WORDS = ("a an the of and with in on at photo picture painting drawing cat dog bird horse car house tree "
          "flower mountain river city street red blue green yellow black white small big old new beautiful "
          "portrait landscape sunset night day man woman child robot astronaut riding sitting standing "
          "prompt benchmark test image").split()


def write_tiny_open_clip_config(folder: str | Path, name: str = TINY_OPEN_CLIP) -> Path:
    """Write the tiny open_clip model config as ``<folder>/<name>.json``; a reward given this path as
    its ``model_name`` registers it itself (needed in Ray actor processes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG, indent=2))
    return path


def register_tiny_open_clip(name: str = TINY_OPEN_CLIP) -> str:
    """Register the tiny ViT + text-tower open_clip config under ``name`` in this process
    (idempotent); returns the name."""
    import open_clip

    if name in open_clip.list_models():
        return name
    open_clip.add_model_config(write_tiny_open_clip_config(Path(tempfile.gettempdir()) / "tpdm_rl_open_clip", name))
    return name


def _tiny_open_clip_model(seed: int, name: str):
    register_tiny_open_clip(name)

    torch.manual_seed(seed)
    model = create_open_clip(name, "tiny open_clip fixture")
    with torch.no_grad():  # open_clip zero-inits some projections; make every weight matter
        for p in model.parameters():
            if p.ndim >= 2:
                p.add_(0.02 * torch.randn_like(p))
    return model


def make_tiny_hpsv2(folder: str | Path, seed: int = 0, name: str = TINY_OPEN_CLIP) -> dict:
    """``HPS_v2.1_compressed.pt``: ``{'state_dict': ...}`` in fp16, as the released file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = _tiny_open_clip_model(seed, name)
    path = folder / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, path)
    return {"checkpoint": str(path), "model_name": str(write_tiny_open_clip_config(folder, name))}


def make_tiny_aesthetic(folder: str | Path, seed: int = 0, name: str = TINY_OPEN_CLIP) -> dict:
    """An open_clip CLIP state dict (fp16) + the MLP ``sac+logos+ava1-l14-linearMSE.pth`` (``layers.N``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = _tiny_open_clip_model(seed + 1, name)
    clip_path = folder / "open_clip_pytorch_model.bin"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, clip_path)
    torch.manual_seed(seed + 2)
    mlp = RewardMLP(TINY_OPEN_CLIP_CONFIG["embed_dim"])
    with torch.no_grad():  # variance-preserving weights so scores vary, centred on a realistic 5
        for layer in mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, layer.in_features ** -0.5)
        mlp.layers[7].bias.fill_(5.0)
    mlp_path = folder / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(mlp.state_dict(), mlp_path)
    return {"checkpoint": str(mlp_path), "clip_checkpoint": str(clip_path),
            "clip_model_name": str(write_tiny_open_clip_config(folder, name))}


def make_tiny_hf_clip(folder: str | Path, seed: int = 0) -> dict:
    """A transformers CLIP folder (model + tokenizer + preprocessor config), as PickScore_v1 /
    openai/clip-vit-large-patch14 ship; for ``pickscore`` and ``clip_score``."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok, vocab = tiny_clip_tokenizer()
    text = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, hidden_act="gelu")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=TINY_IMAGE_SIZE, patch_size=8, hidden_act="gelu")
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                                 logit_scale_init_value=4.6052))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                       crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(folder)
    return {"checkpoint": str(folder)}


def tiny_bert_vocab() -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(_WORDS) + list(letters)
            + ["##" + c for c in letters] + list(".,;:!?'\"-()"))


# Tiny BLIP: ViT width 128 (two 64-d heads, as the real ViT-L's 16), BERT width 32.
TINY_IR_VISION = {"width": 128, "layers": 2, "mlp": 128, "patch": 8, "image": TINY_IMAGE_SIZE}
TINY_IR_MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
               "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
               "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert",
               "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
               "encoder_width": 128, "add_cross_attention": True}


def imagereward_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an ImageReward.pt (original BLIP names) for the tiny sizes."""
    v, m = TINY_IR_VISION, TINY_IR_MED
    w, h, inter = v["width"], m["hidden_size"], m["intermediate_size"]
    grid = v["image"] // v["patch"]
    s: dict[str, tuple[int, ...]] = {
        "blip.visual_encoder.cls_token": (1, 1, w),
        "blip.visual_encoder.pos_embed": (1, grid * grid + 1, w),
        "blip.visual_encoder.patch_embed.proj.weight": (w, 3, v["patch"], v["patch"]),
        "blip.visual_encoder.patch_embed.proj.bias": (w,),
    }
    for i in range(v["layers"]):
        b = f"blip.visual_encoder.blocks.{i}."
        s.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.qkv.weight": (3 * w, w),
                  b + "attn.qkv.bias": (3 * w,), b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                  b + "norm2.weight": (w,), b + "norm2.bias": (w,), b + "mlp.fc1.weight": (v["mlp"], w),
                  b + "mlp.fc1.bias": (v["mlp"],), b + "mlp.fc2.weight": (w, v["mlp"]), b + "mlp.fc2.bias": (w,)})
    s.update({"blip.visual_encoder.norm.weight": (w,), "blip.visual_encoder.norm.bias": (w,)})
    t = "blip.text_encoder."
    s.update({t + "embeddings.word_embeddings.weight": (vocab_size, h),
              t + "embeddings.position_embeddings.weight": (m["max_position_embeddings"], h),
              t + "embeddings.LayerNorm.weight": (h,), t + "embeddings.LayerNorm.bias": (h,)})
    for i in range(m["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, kv_in in (("attention", h), ("crossattention", w)):
            s.update({f"{b}{att}.self.query.weight": (h, h), f"{b}{att}.self.query.bias": (h,),
                      f"{b}{att}.self.key.weight": (h, kv_in), f"{b}{att}.self.key.bias": (h,),
                      f"{b}{att}.self.value.weight": (h, kv_in), f"{b}{att}.self.value.bias": (h,),
                      f"{b}{att}.output.dense.weight": (h, h), f"{b}{att}.output.dense.bias": (h,),
                      f"{b}{att}.output.LayerNorm.weight": (h,), f"{b}{att}.output.LayerNorm.bias": (h,)})
        s.update({b + "intermediate.dense.weight": (inter, h), b + "intermediate.dense.bias": (inter,),
                  b + "output.dense.weight": (h, inter), b + "output.dense.bias": (h,),
                  b + "output.LayerNorm.weight": (h,), b + "output.LayerNorm.bias": (h,)})
    s.update({"blip.vision_proj.weight": (256, w), "blip.vision_proj.bias": (256,),
              "blip.text_proj.weight": (256, h), "blip.text_proj.bias": (256,)})
    dims = [h, 1024, 128, 64, 16, 1]
    for idx, (din, dout) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        s.update({f"mlp.layers.{idx}.weight": (dout, din), f"mlp.layers.{idx}.bias": (dout,)})
    return s


def make_tiny_imagereward(folder: str | Path, seed: int = 0) -> dict:
    """``ImageReward.pt`` with the released key names (``blip.visual_encoder.*``,
    ``blip.text_encoder.*`` incl. ``embeddings.position_ids``, ``blip.vision_proj/text_proj``,
    ``mlp.layers.*``), ``med_config.json`` beside it and a tiny BERT tokenizer folder."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = folder / "bert_tokenizer"
    tok_dir.mkdir(exist_ok=True)
    vocab = tiny_bert_vocab()
    vocab_file = tok_dir / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    # transformers 5: BertTokenizer takes `vocab` (dict or path); a `vocab_file=` keyword is silently ignored
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=512)
    tok.save_pretrained(tok_dir)
    vocab_size = len(vocab) + 2  # BLIP adds [DEC] and [ENC]
    med = dict(TINY_IR_MED, vocab_size=vocab_size)
    (folder / "med_config.json").write_text(json.dumps(med, indent=2))

    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in imagereward_shapes(vocab_size).items():
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "LayerNorm.weight")):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key.startswith("mlp."):
            state[key] = torch.randn(shape, generator=gen) / (shape[-1] ** 0.5 if len(shape) == 2 else 10.0)
        else:
            state[key] = (0.05 if key.endswith("bias") else 0.2) * torch.randn(shape, generator=gen)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(TINY_IR_MED["max_position_embeddings"])[None]
    path = folder / "ImageReward.pt"
    torch.save(state, path)
    return {"checkpoint": str(path), "tokenizer": str(tok_dir)}


def make_all(folder: str | Path, seed: int = 0) -> dict[str, dict]:
    """Every tiny reward fixture under ``folder``; returns build options per reward name."""
    folder = Path(folder)
    clip_opts = make_tiny_hf_clip(folder / "hf_clip", seed)
    return {
        "hpsv2": make_tiny_hpsv2(folder / "hpsv2", seed),
        "aesthetic": make_tiny_aesthetic(folder / "aesthetic", seed),
        "pickscore": dict(clip_opts),
        "clip_score": dict(clip_opts),
        "imagereward": make_tiny_imagereward(folder / "imagereward", seed),
    }
