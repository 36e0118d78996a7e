import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tpdm_rl.rollout.backbone import Backbone, BackboneError

from tpdm_rl.builders.tiny_backbone import make_tiny_backbone


def test_tiny_backbone_is_a_diffusers_sd3_folder_and_seeded(tmp_path, tiny_backbone_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_backbone_dir)
    assert pipe.transformer.config.in_channels == 16 and pipe.transformer.config.patch_size == 2
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert pipe.text_encoder is not None and pipe.text_encoder_2 is not None and pipe.text_encoder_3 is not None
    again = make_tiny_backbone(tmp_path / "again", seed=0)
    other = make_tiny_backbone(tmp_path / "other", seed=1)
    f = "transformer/diffusion_pytorch_model.safetensors"
    a, b, c = (load_file(str(Path(d) / f)) for d in (tiny_backbone_dir, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert json.loads((Path(tiny_backbone_dir) / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusion3Pipeline"


def test_hooks_capture_block_outputs_and_temb(backbone):
    tr = backbone.transformer
    captured = {}
    hooks = [tr.transformer_blocks[i].register_forward_hook(
        lambda m, a, o, i=i: captured.__setitem__(i, o[1])) for i in (0, 1)]
    hooks.append(tr.time_text_embed.register_forward_hook(lambda m, a, o: captured.__setitem__("temb", o)))
    try:
        e, p = backbone.encode_prompts(["a cat", "a dog"])
        x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        sigma = torch.tensor([0.9, 0.4])
        out = backbone.step(x, sigma, e, p)
    finally:
        for h in hooks:
            h.remove()
    assert out.velocity.shape == (2, 16, 8, 8)
    assert out.features.shape == (2, 2 * backbone.hidden_size, 4, 4)
    assert out.temb.shape == (2, backbone.hidden_size)
    # conditional half of the CFG batch, tokens laid out on the 4x4 patch grid (pool 4 -> 4 = identity)
    blk0 = captured[0][2:].transpose(1, 2).reshape(2, backbone.hidden_size, 4, 4)
    torch.testing.assert_close(out.features[:, :backbone.hidden_size], blk0)
    torch.testing.assert_close(out.temb, captured["temb"][2:])
    # CFG combination of one batched forward
    with torch.no_grad():
        ne, npl = backbone.encode_prompts([""])
        raw = tr(hidden_states=torch.cat([x, x]), timestep=torch.cat([sigma, sigma]) * 1000,
                 encoder_hidden_states=torch.cat([ne.expand(2, -1, -1), e]),
                 pooled_projections=torch.cat([npl.expand(2, -1), p]), return_dict=False)[0]
    u, c = raw.chunk(2)
    torch.testing.assert_close(out.velocity, u + backbone.guidance_scale * (c - u), rtol=1e-5, atol=1e-5)


def test_prompt_embeddings_are_encoded_once(backbone, monkeypatch):
    calls = []
    orig = backbone.pipe.encode_prompt

    def counting(**kw):
        calls.append(list(kw["prompt"]))
        return orig(**kw)

    monkeypatch.setattr(backbone.pipe, "encode_prompt", counting)
    backbone.encode_prompts(["unique prompt alpha"] * 8 + ["unique prompt beta"] * 8)
    backbone.encode_prompts(["unique prompt alpha"] * 4)
    assert calls == [["unique prompt alpha", "unique prompt beta"]]


def test_backbone_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="does not exist") as e:
        Backbone(str(tmp_path / "nope"))
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="model_index.json"):
        Backbone(str(tmp_path / "empty"))


def test_bf16_fixed_schedule_matches_diffusers_with_identical_timesteps(tiny_backbone_dir):
    """In bf16 the transformer gets float32 timesteps bit-identical to diffusers' pipeline (1000 * sigma in bf16
    would round 760.74 to 760), and the fixed:N images agree within bf16 tolerance."""
    from tpdm_rl.rollout.engine import SamplingEngine

    bb = Backbone(tiny_backbone_dir, device="cpu", dtype="bfloat16", feature_grid=4, max_sequence_length=32)
    seen: list[torch.Tensor] = []
    hook = bb.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["timestep"].detach().clone()), with_kwargs=True)
    try:
        ours = SamplingEngine(bb, 64, 64, batch_size=1).run_fixed(["a red apple on a table"], [3], 8)
        n_ours = len(seen)
        ref = bb.pipe("a red apple on a table", num_inference_steps=8, height=64, width=64, max_sequence_length=32,
                      guidance_scale=bb.guidance_scale, output_type="pt", generator=torch.Generator().manual_seed(3))
    finally:
        hook.remove()
    mine, theirs = seen[:n_ours], seen[n_ours:]
    assert len(mine) == len(theirs) == 8
    for a, b in zip(mine, theirs):
        assert a.dtype == torch.float32 and b.dtype == torch.float32
        assert torch.equal(a, b[: a.numel()]) or torch.equal(a.unique(), b.unique())
    assert any((t - t.round()).abs().max() > 0.1 for t in mine)  # fractional timesteps survive
    torch.testing.assert_close(ref.images[0].float(), ours.images[0], rtol=0, atol=0.05)
    assert (ref.images[0].float() - ours.images[0]).abs().mean() < 0.005


def test_paper_inputs_are_pos_embed_and_norm_out_after_cfg(tiny_backbone_dir):
    """policy.inputs=paper: the TPM reads the outputs of pos_embed and norm_out and temb, each combined with
    classifier-free guidance (as the official TPDM code does), not the conditional branch of two blocks."""
    from tpdm_rl.rollout.backbone import Backbone

    bb = Backbone(tiny_backbone_dir, device="cpu", feature_grid=4, max_sequence_length=32, feature_source="paper")
    tr = bb.transformer
    captured = {}
    hooks = [tr.pos_embed.register_forward_hook(lambda m, a, o: captured.__setitem__("pos", o)),
             tr.norm_out.register_forward_hook(lambda m, a, o: captured.__setitem__("norm", o)),
             tr.time_text_embed.register_forward_hook(lambda m, a, o: captured.__setitem__("temb", o))]
    try:
        e, p = bb.encode_prompts(["a cat", "a dog"])
        x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
        out = bb.step(x, torch.tensor([0.9, 0.4]), e, p)
    finally:
        for h in hooks:
            h.remove()

    def guided(t):
        u, c = t.float().chunk(2)
        return u + bb.guidance_scale * (c - u)

    h = bb.hidden_size
    assert out.features.shape == (2, 2 * h, 4, 4)
    pos = guided(captured["pos"]).transpose(1, 2).reshape(2, h, 4, 4)
    norm = guided(captured["norm"]).transpose(1, 2).reshape(2, h, 4, 4)
    torch.testing.assert_close(out.features[:, :h], pos)
    torch.testing.assert_close(out.features[:, h:], norm)
    torch.testing.assert_close(out.temb, guided(captured["temb"]))
    assert not torch.allclose(out.temb, captured["temb"][2:].float())  # not the conditional branch


@pytest.mark.slow
def test_compiled_transformer_matches_eager_in_bf16(tiny_backbone_dir):
    """backbone.compile: the torch.compile'd transformer stays within bf16 tolerance. Inductor fuses ops and so
    rounds differently from eager bf16; both are compared with a float32 reference, and the compiled error must be
    of the same size as eager bf16's own error. The feature hooks still fire under compilation."""
    pytest.importorskip("torch._inductor")
    kw = dict(device="cpu", feature_grid=4, max_sequence_length=32)
    ref_bb = Backbone(tiny_backbone_dir, dtype="float32", **kw)
    eager = Backbone(tiny_backbone_dir, dtype="bfloat16", **kw)
    compiled = Backbone(tiny_backbone_dir, dtype="bfloat16", compile=True, **kw)
    e32, p32 = ref_bb.encode_prompts(["a cat", "a dog"])
    e, p = eager.encode_prompts(["a cat", "a dog"])
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    for sigma in ([0.9, 0.4], [0.7, 0.2]):  # the second call reuses the compiled graph
        r = ref_bb.step(x, torch.tensor(sigma), e32, p32)
        a = eager.step(x.to(torch.bfloat16), torch.tensor(sigma), e, p)
        b = compiled.step(x.to(torch.bfloat16), torch.tensor(sigma), e, p)
        assert b.features.shape == a.features.shape and b.features.dtype == a.features.dtype
        for name in ("velocity", "features", "temb"):
            ref = getattr(r, name).float()
            err_eager = (getattr(a, name).float() - ref).abs().mean()
            err_compiled = (getattr(b, name).float() - ref).abs().mean()
            assert err_compiled < 2.0 * err_eager + 1e-3 * ref.abs().mean(), (name, err_compiled, err_eager)
            assert err_compiled < 0.05 * ref.abs().mean(), (name, err_compiled)
