"""Reward models on tiny random weights in the real file formats, checked against independent
reference computations (open_clip / transformers used directly, and a plain re-implementation of
ImageReward's original BLIP forward over the original checkpoint key names)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tpdm_rl.rewards import RewardError, build_reward, reward_options

from tpdm_rl.builders.reward_fixtures import make_all, register_tiny_open_clip
from tpdm_rl.core.threads import apply_threads

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a photo of a cat", "a red car on a street", "a photo of a cat", "sunset over the mountain river",
           "portrait of an astronaut riding a horse", "a red car on a street"]
MODEL_REWARDS = ("hpsv2", "aesthetic", "pickscore", "clip_score", "imagereward")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models: thread start-up costs more than it saves (and the 2-core CI box is shared)
    threads = torch.get_num_threads()
    apply_threads(1)
    yield
    apply_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, dict]:
    return make_all(tmp_path_factory.mktemp("tiny_rewards"), seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # not the models' 32 px: exercises resize-shortest-side + centre crop
    return torch.rand(len(PROMPTS), 3, 48, 40, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def models(tiny) -> dict:
    return {name: build_reward(name, device="cpu", dtype="float32", **tiny[name]) for name in MODEL_REWARDS}


def ref_pixels(images: torch.Tensor, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """torchvision's transforms on tensors (Resize(int) bicubic antialias, CenterCrop, Normalize),
    clamped to [0, 1] after the resize as PIL's uint8 output would be."""
    import torchvision.transforms.functional as TF

    x = TF.resize(images, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    x = TF.center_crop(x, [size, size])
    return TF.normalize(x, list(mean), list(std))


def resize_max_size_ref(image: torch.Tensor, max_size: int, fill: float = 0.0) -> torch.Tensor:
    """HPSv2's ``ResizeMaxSize.forward`` (hpsv2/src/open_clip/transform.py, applied after ``ToTensor``)
    on one [3, H, W] tensor, with torchvision's v1 functional API as there."""
    import torchvision.transforms.functional as TF

    height, width = image.shape[1:]
    scale = max_size / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        image = TF.resize(image, list(new_size), TF.InterpolationMode.BICUBIC)
        pad_h = max_size - new_size[0]
        pad_w = max_size - new_size[1]
        image = TF.pad(image, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=fill)
    return image


def hps_ref_pixels(images: torch.Tensor, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """HPSv2's evaluation transform image by image (ResizeMaxSize, Normalize), clamped to [0, 1]
    before normalising like every reward here."""
    import torchvision.transforms.functional as TF

    x = torch.stack([resize_max_size_ref(im, size) for im in images]).clamp(0, 1)
    return TF.normalize(x, list(mean), list(std))


# ---------------------------------------------------------------------------------------------
# scores against independent references


def test_hpsv2_matches_open_clip(tiny, models, images) -> None:
    import open_clip

    opts = tiny["hpsv2"]
    assert opts["model_name"].endswith("tiny-clip.json")
    name = register_tiny_open_clip()
    model = open_clip.create_model(name, pretrained=None).eval()
    model.load_state_dict(torch.load(opts["checkpoint"], map_location="cpu", weights_only=True)["state_dict"])
    tokens = open_clip.get_tokenizer(name)(PROMPTS)
    with torch.no_grad():
        img, txt, _ = model(hps_ref_pixels(images, 32), tokens)  # both L2-normalised; 48x40: padded
    want = (img * txt).sum(-1)
    got = models["hpsv2"].score(images, PROMPTS)
    assert got.dtype == torch.float32 and got.shape == (len(PROMPTS),)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert got.abs().max() <= 1.0 + 1e-6  # a cosine, not x100


def test_aesthetic_matches_open_clip_and_manual_mlp(tiny, models, images) -> None:
    import open_clip

    opts = tiny["aesthetic"]
    model = open_clip.create_model(register_tiny_open_clip(), pretrained=opts["clip_checkpoint"]).eval()
    mlp = torch.load(opts["checkpoint"], map_location="cpu", weights_only=True)
    assert sorted({k.split(".")[1] for k in mlp}) == ["0", "2", "4", "6", "7"]
    with torch.no_grad():
        x = model.encode_image(ref_pixels(images, 32), normalize=True).float()
    for i in (0, 2, 4, 6, 7):  # dropouts are identity at eval; no activations
        x = x @ mlp[f"layers.{i}.weight"].T + mlp[f"layers.{i}.bias"]
    got = models["aesthetic"].score(images, PROMPTS)
    torch.testing.assert_close(got, x[:, 0], atol=1e-4, rtol=0)
    assert got.std() > 1e-3  # the fixture is not a constant


def _hf_clip_reference(folder: str, images: torch.Tensor):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")  # as PickScore's demo
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                    pixel_values=ref_pixels(images, 32))
    return out, model


def test_pickscore_matches_transformers(tiny, models, images) -> None:
    out, _ = _hf_clip_reference(tiny["pickscore"]["checkpoint"], images)
    want = out.logits_per_image.diagonal()  # logit_scale.exp() * cosine
    torch.testing.assert_close(models["pickscore"].score(images, PROMPTS), want, atol=1e-4, rtol=0)


def test_clip_score_matches_transformers(tiny, models, images) -> None:
    out, _ = _hf_clip_reference(tiny["clip_score"]["checkpoint"], images)
    cos = (out.image_embeds * out.text_embeds).sum(-1)
    want = (100 * cos).clamp_min(0)
    got = models["clip_score"].score(images, PROMPTS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got >= 0).all()
    # the un-clamped cosine too (random tiny weights may put every pair below 0)
    torch.testing.assert_close(100 * models["clip_score"].cosine(images, PROMPTS), 100 * cos, atol=1e-4, rtol=0)


def _blip_reference(sd: dict, med: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """ImageReward.score as written in THUDM/ImageReward (BLIP vit.py + med.py), over the original
    checkpoint keys, with plain torch ops."""
    V = lambda k: sd["blip.visual_encoder." + k]  # noqa: E731
    T = lambda k: sd["blip.text_encoder." + k]  # noqa: E731
    patch = V("patch_embed.proj.weight").shape[-1]
    x = F.conv2d(pixels, V("patch_embed.proj.weight"), V("patch_embed.proj.bias"), stride=patch)
    x = x.flatten(2).transpose(1, 2)
    B, _, W = x.shape
    x = torch.cat([V("cls_token").expand(B, -1, -1), x], 1)
    x = x + V("pos_embed")[:, : x.shape[1]]
    N, heads = x.shape[1], W // 64
    n_blocks = len({k.split(".")[3] for k in sd if k.startswith("blip.visual_encoder.blocks.")})
    assert n_blocks == 2
    for i in range(n_blocks):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (W,), V(b + "norm1.weight"), V(b + "norm1.bias"), eps=1e-6)
        qkv = F.linear(h, V(b + "attn.qkv.weight"), V(b + "attn.qkv.bias")).reshape(B, N, 3, heads, W // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (W // heads) ** -0.5).softmax(-1)
        x = x + F.linear((att @ v).transpose(1, 2).reshape(B, N, W), V(b + "attn.proj.weight"), V(b + "attn.proj.bias"))
        h = F.layer_norm(x, (W,), V(b + "norm2.weight"), V(b + "norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, V(b + "mlp.fc1.weight"), V(b + "mlp.fc1.bias"))),
                         V(b + "mlp.fc2.weight"), V(b + "mlp.fc2.bias"))
    image_embeds = F.layer_norm(x, (W,), V("norm.weight"), V("norm.bias"), eps=1e-6)

    H, nh, eps = med["hidden_size"], med["num_attention_heads"], med["layer_norm_eps"]
    L = ids.shape[1]
    h = T("embeddings.word_embeddings.weight")[ids] + T("embeddings.position_embeddings.weight")[:L]
    h = F.layer_norm(h, (H,), T("embeddings.LayerNorm.weight"), T("embeddings.LayerNorm.bias"), eps=eps)
    ext = (1.0 - mask[:, None, None, :].float()) * -10000.0  # BERT's extended attention mask

    def attention(p: str, hq: torch.Tensor, kv: torch.Tensor, add_mask) -> torch.Tensor:
        def split(t):
            return t.view(t.shape[0], t.shape[1], nh, H // nh).permute(0, 2, 1, 3)

        q = split(F.linear(hq, T(p + "self.query.weight"), T(p + "self.query.bias")))
        k = split(F.linear(kv, T(p + "self.key.weight"), T(p + "self.key.bias")))
        v = split(F.linear(kv, T(p + "self.value.weight"), T(p + "self.value.bias")))
        s = q @ k.transpose(-1, -2) / math.sqrt(H // nh) + add_mask
        ctx = (s.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(hq.shape[0], hq.shape[1], H)
        out = F.linear(ctx, T(p + "output.dense.weight"), T(p + "output.dense.bias"))
        return F.layer_norm(out + hq, (H,), T(p + "output.LayerNorm.weight"), T(p + "output.LayerNorm.bias"), eps=eps)

    for i in range(med["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        h = attention(p + "attention.", h, h, ext)
        h = attention(p + "crossattention.", h, image_embeds, 0.0)  # image_atts are all ones
        inter = F.gelu(F.linear(h, T(p + "intermediate.dense.weight"), T(p + "intermediate.dense.bias")))
        h = F.layer_norm(F.linear(inter, T(p + "output.dense.weight"), T(p + "output.dense.bias")) + h, (H,),
                         T(p + "output.LayerNorm.weight"), T(p + "output.LayerNorm.bias"), eps=eps)
    r = h[:, 0, :].float()
    for i in (0, 2, 4, 6, 7):
        r = F.linear(r, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
    return ((r - 0.16717362830052426) / 1.0333394966054072)[:, 0]


def test_imagereward_matches_original_blip_forward(tiny, models, images) -> None:
    from transformers import BertTokenizer

    opts = tiny["imagereward"]
    sd = torch.load(opts["checkpoint"], map_location="cpu", weights_only=True)
    med = json.loads((Path(opts["checkpoint"]).parent / "med_config.json").read_text())
    tok = BertTokenizer.from_pretrained(opts["tokenizer"])
    text = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert text["attention_mask"].sum(1).min() < 35  # padding is exercised
    with torch.no_grad():
        want = _blip_reference(sd, med, ref_pixels(images, 32), text["input_ids"], text["attention_mask"])
    reward = models["imagereward"]
    assert reward.ignored_keys == ["blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
                                   "blip.text_proj.bias"]
    got = reward.score(images, PROMPTS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert got.std() > 1e-2


def test_imagereward_accepts_keys_without_blip_prefix_and_rejects_unknown(tiny, tmp_path, images) -> None:
    opts = tiny["imagereward"]
    sd = torch.load(opts["checkpoint"], map_location="cpu", weights_only=True)
    med = str(Path(opts["checkpoint"]).parent / "med_config.json")
    bare = tmp_path / "bare.pt"
    torch.save({k.removeprefix("blip."): v for k, v in sd.items()}, bare)
    r1 = build_reward("imagereward", device="cpu", checkpoint=str(bare), med_config=med, tokenizer=opts["tokenizer"])
    r2 = build_reward("imagereward", device="cpu", **opts)
    torch.testing.assert_close(r1.score(images, PROMPTS), r2.score(images, PROMPTS), atol=0, rtol=0)
    for extra in ("blip.visual_encoder.blocks.0.attn.extra.weight", "blip.something_else"):
        bad = tmp_path / "bad.pt"
        torch.save({**sd, extra: torch.zeros(2)}, bad)
        with pytest.raises(RewardError, match="extra|something_else"):
            build_reward("imagereward", device="cpu", checkpoint=str(bad), med_config=med, tokenizer=opts["tokenizer"])
    dropped = tmp_path / "dropped.pt"
    torch.save({k: v for k, v in sd.items() if "blocks.1.mlp.fc2.bias" not in k}, dropped)
    with pytest.raises(RewardError, match="missing"):
        build_reward("imagereward", device="cpu", checkpoint=str(dropped), med_config=med, tokenizer=opts["tokenizer"])


# ---------------------------------------------------------------------------------------------
# batching, caching, dtypes


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_batch_equals_single_and_chunked(tiny, models, images, name) -> None:
    batch = models[name].score(images, PROMPTS)
    single = torch.cat([models[name].score(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(len(PROMPTS))])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    chunked = build_reward(name, device="cpu", dtype="float32", batch_size=4, **tiny[name])
    torch.testing.assert_close(chunked.score(images, PROMPTS), batch, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ("hpsv2", "pickscore"))
def test_text_features_encoded_once_per_distinct_prompt(tiny, images, name) -> None:
    reward = build_reward(name, device="cpu", **tiny[name])
    calls: list[list[str]] = []
    encode = reward._encode_text
    reward._encode_text = lambda prompts: (calls.append(list(prompts)), encode(prompts))[1]
    first = reward.score(images, PROMPTS)
    assert calls == [list(dict.fromkeys(PROMPTS))]
    again = reward.score(images, PROMPTS)  # cached across calls
    assert len(calls) == 1
    torch.testing.assert_close(first, again, atol=0, rtol=0)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_bfloat16_runs_and_is_close(tiny, models, images, name) -> None:
    bf = build_reward(name, device="cpu", dtype="bfloat16", **tiny[name])
    got, want = bf.score(images, PROMPTS), models[name].score(images, PROMPTS)
    assert got.dtype == torch.float32
    scale = float(want.abs().max()) + 1.0
    assert (got - want).abs().max() < 0.05 * scale


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_cuda_matches_cpu(tiny, models, images, name) -> None:
    gpu = build_reward(name, device="cuda", dtype="float32", **tiny[name])
    torch.testing.assert_close(gpu.score(images.cuda(), PROMPTS), models[name].score(images, PROMPTS),
                               atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# errors


def _primary(name: str, tiny: dict) -> str:
    return tiny[name]["checkpoint"]


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_missing_checkpoint_is_one_line_naming_the_path(tiny, tmp_path, name) -> None:
    missing = str(tmp_path / "nowhere" / "weights.pt")
    with pytest.raises(RewardError) as info:
        build_reward(name, device="cpu", **{**tiny[name], "checkpoint": missing})
    msg = str(info.value)
    assert "\n" not in msg and missing in msg


def test_missing_aesthetic_clip_checkpoint(tiny, tmp_path) -> None:
    missing = str(tmp_path / "clip.bin")
    with pytest.raises(RewardError) as info:
        build_reward("aesthetic", device="cpu", **{**tiny["aesthetic"], "clip_checkpoint": missing})
    assert "\n" not in str(info.value) and missing in str(info.value) and "ViT-L/14" in str(info.value)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_corrupt_checkpoint_names_the_path(tiny, tmp_path, name) -> None:
    import shutil

    opts = dict(tiny[name])
    src = Path(opts["checkpoint"])
    if src.is_dir():  # transformers folder: garbage weights file
        dst = tmp_path / "model"
        shutil.copytree(src, dst)
        (dst / "model.safetensors").write_bytes(b"\x00garbage" * 100)
        opts["checkpoint"] = str(dst)
    else:
        dst = tmp_path / src.name
        dst.write_bytes(b"this is not a checkpoint \x00\x01\x02" * 50)
        opts["checkpoint"] = str(dst)
        if name == "imagereward":
            opts["med_config"] = str(src.parent / "med_config.json")
    with pytest.raises(RewardError) as info:
        build_reward(name, device="cpu", **opts)
    assert "\n" not in str(info.value) and str(dst) in str(info.value)


def test_hpsv2_without_checkpoint_offline_names_hub_file(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for version, fname in (("v2.1", "HPS_v2.1_compressed.pt"), ("v2.0", "HPS_v2_compressed.pt")):
        with pytest.raises(RewardError, match=f"xswu/HPSv2 file {fname}"):
            build_reward("hpsv2", device="cpu", version=version)
    with pytest.raises(RewardError, match="version"):
        build_reward("hpsv2", device="cpu", version="v3")


def test_wrong_model_for_checkpoint_fails_loudly(tiny, tmp_path) -> None:
    from tpdm_rl.builders.reward_fixtures import TINY_OPEN_CLIP_CONFIG

    cfg = json.loads(json.dumps(TINY_OPEN_CLIP_CONFIG))
    cfg["vision_cfg"]["layers"] = 3
    (tmp_path / "tiny-clip-3l.json").write_text(json.dumps(cfg))
    with pytest.raises(RewardError, match="does not match the model.*unexpected|does not match the model.*missing"):
        build_reward("hpsv2", device="cpu", checkpoint=tiny["hpsv2"]["checkpoint"],
                     model_name=str(tmp_path / "tiny-clip-3l.json"))
    with pytest.raises(RewardError, match="config file .* not found"):
        build_reward("hpsv2", device="cpu", checkpoint=tiny["hpsv2"]["checkpoint"],
                     model_name=str(tmp_path / "absent.json"))
    with pytest.raises(RewardError, match="no model config"):
        build_reward("hpsv2", device="cpu", checkpoint=tiny["hpsv2"]["checkpoint"], model_name="no-such-clip")


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_unknown_option(tiny, name) -> None:
    with pytest.raises(RewardError, match="unknown option 'nope'"):
        build_reward(name, device="cpu", nope=1, **tiny[name])
    assert {"checkpoint", "device", "dtype", "batch_size"} <= reward_options(name)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_wrong_image_shape(models, name) -> None:
    reward = models[name]
    for bad in (torch.rand(2, 1, 32, 32), torch.rand(3, 32, 32), [[0.0]]):
        with pytest.raises(RewardError, match=r"\[B, 3, H, W\]"):
            reward.score(bad, ["a", "b"])
    with pytest.raises(RewardError, match="prompts"):
        reward.score(torch.rand(2, 3, 32, 32), ["only one"])
    assert reward.score(torch.rand(0, 3, 32, 32), []).shape == (0,)


# ---------------------------------------------------------------------------------------------
# helpers


def old_clip_preprocess(images: torch.Tensor, size: int, crop=None, mean=OPENAI_MEAN, std=OPENAI_STD,
                        dtype=None) -> torch.Tensor:
    """The previous hand-written preprocessing (before torchvision.transforms.v2), kept verbatim as a
    reference: resize the shortest side (int(size * long / short)) with ``F.interpolate`` bicubic
    antialias, centre crop (zero-padded when too small), clamp, normalise."""
    x = images.float()
    h, w = x.shape[-2:]
    shape = (size, max(1, int(size * w / h))) if h <= w else (max(1, int(size * h / w)), size)
    if shape != (h, w):
        x = F.interpolate(x, size=shape, mode="bicubic", align_corners=False, antialias=True)
    ch, cw = (size, size) if crop is None else ((crop, crop) if isinstance(crop, int) else crop)
    h, w = x.shape[-2:]
    if h < ch or w < cw:
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = x.shape[-2:]
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    x = x[..., top:top + ch, left:left + cw].clamp(0.0, 1.0)
    m = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - m) / s).to(dtype or torch.float32).contiguous()


def smooth_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Photo-like images (no pixel-level hard edges): random 8x8 colours, bilinearly upsampled."""
    low = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


PREPROCESS_SHAPES = ((512, 512), (300, 500), (500, 300), (48, 40), (33, 97), (500, 224), (20, 20))


def test_clip_preprocess_equals_previous_implementation() -> None:
    from tpdm_rl.rewards.preprocess import clip_preprocess

    for h, w in PREPROCESS_SHAPES:
        x = torch.rand(3, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        for size, crop in ((224, None), (32, None), (32, (24, 28)), (32, 40)):
            got = clip_preprocess(x, size, crop)
            want = old_clip_preprocess(x, size, crop)
            assert got.shape == want.shape and got.dtype == torch.float32
            assert (got - want).abs().max().item() == 0.0, (h, w, size, crop)  # measured: exactly 0.0
        torch.testing.assert_close(clip_preprocess(x, 32), ref_pixels(x, 32), atol=1e-5, rtol=0)
        got = clip_preprocess(x, 32, dtype=torch.bfloat16)
        assert got.dtype == torch.bfloat16 and torch.equal(got, old_clip_preprocess(x, 32, dtype=torch.bfloat16))
    same = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(clip_preprocess(same, 32, mean=(0, 0, 0), std=(1, 1, 1)), same, atol=0, rtol=0)


def test_clip_preprocess_close_to_pil() -> None:
    """open_clip / HF's PIL path: uint8 image, PIL bicubic resize of the shortest side, centre crop."""
    import numpy as np
    import torchvision.transforms as T
    from PIL import Image
    from tpdm_rl.rewards.preprocess import clip_preprocess

    pil_transform = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                               T.ToTensor()])
    for h, w in ((512, 512), (300, 500)):
        u8 = (smooth_images(3, h, w, seed=h + w) * 255).round().to(torch.uint8)
        want = torch.stack([pil_transform(Image.fromarray(np.ascontiguousarray(im.permute(1, 2, 0).numpy())))
                            for im in u8])
        got = clip_preprocess(u8.float() / 255, 224, mean=(0, 0, 0), std=(1, 1, 1))
        diff = (got - want).abs()
        # PIL rounds to uint8 (also between its two separable passes): measured max 1.06/255, mean 0.28/255
        assert diff.max().item() <= 1.5 / 255, (h, w, diff.max().item() * 255)
        assert diff.mean().item() <= 0.4 / 255, (h, w, diff.mean().item() * 255)


def test_resize_longest_and_pad_matches_hpsv2_resize_max_size() -> None:
    from tpdm_rl.rewards.preprocess import resize_longest_and_pad

    for h, w in PREPROCESS_SHAPES + ((40, 48), (97, 33)):
        x = torch.rand(3, 3, h, w, generator=torch.Generator().manual_seed(h * w + 1))
        for size, fill in ((224, 0.0), (32, 0.0), (32, 0.5)):
            got = resize_longest_and_pad(x, size, fill)
            want = torch.stack([resize_max_size_ref(im, size, fill) for im in x])
            assert got.shape == want.shape == (3, 3, size, size)
            assert (got - want).abs().max().item() == 0.0, (h, w, size, fill)  # measured: exactly 0.0
    # 300x500 -> 134x224 (134.4 rounds down), 45 padded rows above and below
    x = torch.rand(2, 3, 300, 500, generator=torch.Generator().manual_seed(3))
    got = resize_longest_and_pad(x, 224, fill=0.25)
    assert (got[..., :45, :] == 0.25).all() and (got[..., 179:, :] == 0.25).all()
    assert not (got[..., 45, :] == 0.25).all() and not (got[..., 178, :] == 0.25).all()
    # longest side already the model size: still padded to a square (ResizeMaxSize would leave 32x20)
    x = torch.rand(1, 3, 32, 20, generator=torch.Generator().manual_seed(4))
    got = resize_longest_and_pad(x, 32, fill=0.0)
    assert got.shape == (1, 3, 32, 32) and torch.equal(got[..., 6:26], x)
    assert (got[..., :6] == 0).all() and (got[..., 26:] == 0).all()


def test_hpsv2_square_images_score_as_before(models) -> None:
    from tpdm_rl.rewards.preprocess import clip_preprocess, resize_longest_preprocess

    reward = models["hpsv2"]
    for side in (32, 48, 20, 512):
        x = torch.rand(len(PROMPTS), 3, side, side, generator=torch.Generator().manual_seed(side))
        old = old_clip_preprocess(x, reward.image_size)
        assert torch.equal(resize_longest_preprocess(x, reward.image_size), old), side
        with torch.no_grad():
            feats = F.normalize(reward.model.encode_image(old).float(), dim=-1)
            want = (feats * reward.text_features(PROMPTS)).sum(-1)
        got = reward.score(x, PROMPTS)
        assert (got - want).abs().max().item() == 0.0, side
    # non-square: the official rule (pad), not the previous one (crop)
    x = torch.rand(len(PROMPTS), 3, 30, 50, generator=torch.Generator().manual_seed(5))
    padded = resize_longest_preprocess(x, reward.image_size)
    torch.testing.assert_close(padded, hps_ref_pixels(x, reward.image_size), atol=0, rtol=0)
    assert (padded - clip_preprocess(x, reward.image_size)).abs().max() > 1.0
    with torch.no_grad():
        feats = F.normalize(reward.model.encode_image(padded).float(), dim=-1)
        want = (feats * reward.text_features(PROMPTS)).sum(-1)
    assert (reward.score(x, PROMPTS) - want).abs().max().item() == 0.0


def test_load_torch_state_formats(tmp_path) -> None:
    from safetensors.torch import save_file
    from tpdm_rl.rewards.checkpoints import load_torch_state, require_file

    t = {"a.weight": torch.ones(2, 2), "b": torch.zeros(3)}
    torch.save({"state_dict": {"module." + k: v for k, v in t.items()}}, tmp_path / "wrapped.pt")
    save_file(t, str(tmp_path / "plain.safetensors"))
    for f in ("wrapped.pt", "plain.safetensors"):
        got = load_torch_state(tmp_path / f)
        assert sorted(got) == sorted(t) and all(torch.equal(got[k], t[k]) for k in t)
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(RewardError, match="bad.safetensors"):
        load_torch_state(tmp_path / "bad.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(RewardError, match="does not hold a state dict"):
        load_torch_state(tmp_path / "list.pt")
    with pytest.raises(RewardError, match="hub repo x/y file z.pt"):
        require_file(tmp_path / "none.pt", "thing", "hub repo x/y file z.pt")


def test_fidelity_saturates_so_only_a_copy_of_the_reference_reaches_the_cap() -> None:
    """The reference schedule's own image scores the cap; a near-copy (~89 dB raw, the old gameable case) is
    within 1e-5 of it; a good short schedule's PSNR (below the knee) is unchanged; the reward is increasing."""
    from tpdm_rl.rewards.fidelity import DEFAULT_MAX_PSNR, SATURATION_DB, FidelityReward, psnr

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(5, 3, 16, 16, generator=g)
    noise = torch.randn(5, 3, 16, 16, generator=g)
    target_db = torch.tensor([89.0, 60.0, 52.0, 48.0, 40.0])
    std = (10 ** (-target_db / 10)).sqrt().reshape(-1, 1, 1, 1)
    noise = noise / noise.pow(2).flatten(1).mean(1).sqrt().reshape(-1, 1, 1, 1)
    images = ref + std * noise  # PSNR exactly target_db (no clamping to [0, 1] needed for the metric)
    raw = psnr(images, ref)
    assert raw == pytest.approx(target_db, abs=1e-2)
    model = FidelityReward()
    assert model.max_psnr == DEFAULT_MAX_PSNR
    prompts = ["p"] * 5
    s = model.score(images, prompts, ref)
    assert float(model.score(ref[:1], prompts[:1], ref[:1])[0]) == pytest.approx(DEFAULT_MAX_PSNR, abs=1e-6)
    assert float(s[0]) == pytest.approx(DEFAULT_MAX_PSNR, abs=1e-5)  # a near-copy: at the cap
    assert float(s[1]) < DEFAULT_MAX_PSNR - 0.05  # 60 dB is good but not a copy: below the cap
    knee = DEFAULT_MAX_PSNR - SATURATION_DB
    assert torch.equal(s[3:], raw[3:]) and float(raw[3]) < knee  # short schedules' PSNR is unchanged
    assert bool((s[:-1] > s[1:]).all())  # still increasing in PSNR
    with pytest.raises(RewardError, match="max_psnr"):
        FidelityReward(max_psnr=3.0)
