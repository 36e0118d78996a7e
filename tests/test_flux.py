"""FLUX.1 through the one backbone interface: the rollout matches diffusers' FluxPipeline, and training, eval,
sample, export and the pipeline run on a tiny random Flux backbone (CPU, tiny widths)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli_in_process, small_overrides
from diffusers import FluxPipeline
from own_ray import run_own_ray
from tpdm_rl.rollout.backbone import Backbone, BackboneError
from tpdm_rl.rollout.engine import SamplingEngine
from tpdm_rl.rollout.families import detect_family, pack_latents, unpack_latents
from tpdm_rl.rollout.pipeline import TPDMPipeline
from tpdm_rl.rollout.schedules import FixedSchedule

from tpdm_rl.builders.tiny_backbone import make_tiny_backbone
from tpdm_rl.builders.tiny_flux_backbone import make_tiny_flux_backbone
from tpdm_rl.core.config_io import load_config
from tpdm_rl.core.metrics_reader import read_metrics
from tpdm_rl.training.controller import Controller

PROMPTS = ["a red circle", "two blue squares on a white background"]


@pytest.fixture(scope="module")
def flux_dev_dir(tmp_path_factory):
    return str(make_tiny_flux_backbone(tmp_path_factory.mktemp("tiny_flux_dev"), seed=0))


@pytest.fixture(scope="module")
def flux_schnell_dir(tmp_path_factory):
    return str(make_tiny_flux_backbone(tmp_path_factory.mktemp("tiny_flux_schnell"), seed=1, guidance_embeds=False))


def _diffusers_latents(path: str, steps: int, guidance: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffusers' own FluxPipeline: (initial noise, final latents, its sigmas), unpacked to [B, 16, h, w]."""
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    noise = pipe.prepare_latents(len(PROMPTS), 16, 64, 64, torch.float32, "cpu",
                                 [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))])[0]
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64, generator=gens,
               output_type="latent", max_sequence_length=32).images
    unpack = FluxPipeline._unpack_latents
    return unpack(noise, 64, 64, pipe.vae_scale_factor), unpack(out, 64, 64, pipe.vae_scale_factor), \
        pipe.scheduler.sigmas.float()


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_rollout_equals_diffusers_flux_pipeline(variant, flux_dev_dir, flux_schnell_dir):
    """Packing, positional ids, timestep (sigma, not 1000 sigma), the guidance embedding (dev) or none (schnell)
    and the dynamic shift: four Euler steps of our backbone give diffusers' latents exactly."""
    path = flux_dev_dir if variant == "dev" else flux_schnell_dir
    noise, ref, ref_sigmas = _diffusers_latents(path, 4, 3.5)
    bb = Backbone(path, device="cpu", guidance_scale=3.5, feature_blocks=(0, -1), feature_grid=4,
                  max_sequence_length=32)
    assert bb.family.name == "flux" and not bb.uses_cfg and bb.latent_channels == 16 and bb.num_blocks == 4
    sig = bb.default_sigmas(4, (8, 8))
    torch.testing.assert_close(sig, ref_sigmas, rtol=0, atol=0)
    dynamic = bb.pipe.scheduler.config.use_dynamic_shifting
    assert dynamic == (variant == "dev")
    if dynamic:  # the shift depends on the token count: a larger image keeps more of its sigmas high
        assert float(bb.default_sigmas(4, (64, 64))[1]) > float(sig[1])
    embeds, pooled = bb.encode_prompts(PROMPTS)
    x = noise.clone()
    for k in range(4):
        out = bb.step(x, sig[k:k + 1].expand(len(PROMPTS)), embeds, pooled)
        x = x + (sig[k + 1] - sig[k]) * out.velocity
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    # the TPM's view: image tokens of a double-stream and of the last single-stream block on the 4 x 4 token grid
    assert out.features.shape == (2, 2 * bb.hidden_size, 4, 4) and out.temb.shape == (2, bb.hidden_size)
    # the engine's fixed-table run (keyed noise, continuous batching) uses the same step
    eng = SamplingEngine(bb, 64, 64, batch_size=2, max_steps=8)
    res = eng.run_table(PROMPTS, [0, 1], FixedSchedule(sig).sigmas, decode=True)
    assert res.images.shape == (2, 3, 64, 64) and torch.isfinite(res.images).all()
    torch.testing.assert_close(res.latents, ref, rtol=0, atol=1e-5)  # same seeds -> diffusers' initial noise


def test_guidance_value_reaches_dev_and_is_unused_by_schnell(flux_dev_dir, flux_schnell_dir):
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    s = torch.full((2,), 0.7)
    outs = {}
    for path in (flux_dev_dir, flux_schnell_dir):
        for g in (1.0, 5.0):
            bb = Backbone(path, device="cpu", guidance_scale=g, feature_grid=4, max_sequence_length=32)
            e, p = bb.encode_prompts(PROMPTS)
            outs[path, g] = bb.step(x, s, e, p, need_features=False).velocity
    assert not torch.equal(outs[flux_dev_dir, 1.0], outs[flux_dev_dir, 5.0])
    assert torch.equal(outs[flux_schnell_dir, 1.0], outs[flux_schnell_dir, 5.0])


def test_packing_round_trips_and_matches_diffusers():
    x = torch.randn(3, 16, 6, 10)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 3, 16, 6, 10), rtol=0, atol=0)
    assert torch.equal(unpack_latents(packed, 6, 10), x)


def test_family_is_detected_and_can_be_forced(flux_dev_dir, tiny_backbone_dir, tmp_path):
    assert detect_family(flux_dev_dir) == "flux" and detect_family(tiny_backbone_dir) == "sd3"
    assert detect_family("black-forest-labs/FLUX.1-dev") == "flux"  # a hub id: guessed from its name
    assert detect_family("black-forest-labs/FLUX.1-dev", "sd3") == "sd3"
    with pytest.raises(BackboneError, match="'flx' is not one of"):
        Backbone(flux_dev_dir, device="cpu", family="flx")
    # forcing the other family is refused before a loader runs, naming the folder's class (issue 30)
    with pytest.raises(BackboneError, match="backbone.family 'sd3' does not fit .*FluxPipeline"):
        Backbone(flux_dev_dir, device="cpu", family="sd3")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(BackboneError, match="KandinskyPipeline.*backbone.family"):
        Backbone(str(odd), device="cpu")


def test_sd3_is_unchanged_by_the_family_interface(tmp_path, tiny_backbone_dir):
    """The SD3 path through the interface equals diffusers' StableDiffusion3Pipeline transformer call (1000 sigma in
    float32, CFG over two branches)."""
    bb = Backbone(tiny_backbone_dir, device="cpu", feature_grid=4, max_sequence_length=32)
    assert bb.family.name == "sd3" and bb.uses_cfg and bb.num_blocks == len(bb.transformer.transformer_blocks)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    s = torch.tensor([0.9, 0.4])
    e, p = bb.encode_prompts(PROMPTS)
    ne, npl = bb.encode_prompts([""])
    raw = bb.transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([s, s]) * 1000.0,
                         encoder_hidden_states=torch.cat([ne.expand(2, -1, -1), e]),
                         pooled_projections=torch.cat([npl.expand(2, -1), p]), return_dict=False)[0]
    u, c = raw.chunk(2)
    torch.testing.assert_close(bb.step(x, s, e, p, need_features=False).velocity, u + 4.5 * (c - u), rtol=0, atol=0)
    other = make_tiny_backbone(tmp_path / "sd3_default_sigmas", seed=0)
    assert torch.equal(Backbone(str(other), device="cpu").default_sigmas(6), bb.default_sigmas(6, (8, 8)))


def _flux_overrides(path: str, **extra) -> list[str]:
    return small_overrides(path, **{"backbone.guidance_scale": 3.5, "backbone.max_sequence_length": 32,
                                    "rollout.max_steps": 8, "rollout.reference_steps": 8, **extra})


@pytest.mark.slow
def test_tiny_flux_trains_evaluates_samples_and_exports(tmp_path, flux_dev_dir):
    """2 iterations in one process with each TPM input, then eval (fixed:N, sigmas:, adaptive, tpm, tpm-mean),
    sample, export and the diffusers-style pipeline, all on the Flux backbone."""
    for inputs in ("paper", "blocks"):
        cfg = load_config("configs/tiny.yaml", _flux_overrides(flux_dev_dir, **{"policy.inputs": inputs}))
        Controller(cfg, output=tmp_path / inputs).train()
        recs = read_metrics(tmp_path / inputs / "metrics.jsonl")
        assert [r["iteration"] for r in recs] == [0, 1]
        assert all(r["policy/behaviour_logp_err"] < 1e-5 and r["steps/mean"] >= 1 for r in recs)
    run = tmp_path / "blocks"
    meta = json.loads((run / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert meta["iteration"] == 2
    r = run_cli_in_process("eval", "--checkpoint", str(run), "--output", str(tmp_path / "eval"), "--limit", "2",
                           "--methods", "tpm,tpm-mean,fixed:3,sigmas:1,0.6,0.3,0,adaptive:0.05",
                           "--pareto-steps", "2,4", "--no-progress", "--threads", "1", "--rewards", "fidelity")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {m["method"]: m for m in res["methods"]}
    assert {"tpm", "fixed:3", "adaptive:0.05"} <= set(rows) and any(n.startswith("tpm-mean") for n in rows)
    table = [m for name, m in rows.items() if name.startswith("sigmas:")]
    assert len(table) == 1 and table[0]["nfe"]["mean"] == 3.0
    out = tmp_path / "img.png"
    r = run_cli_in_process("sample", "--checkpoint", str(run), "--prompt", "a red circle", "--output", str(out),
                           "--size", "64", "--threads", "1")
    assert r.returncode == 0 and out.is_file(), r.stderr
    r = run_cli_in_process("export", "--checkpoint", str(run), "--output", str(tmp_path / "export"))
    assert r.returncode == 0, r.stderr
    settings = json.loads((tmp_path / "export" / "tpdm_config.json").read_text())["inference"]
    assert settings["backbone_family"] == "flux" and settings["backbone_blocks"] == 4
    pipe = TPDMPipeline.from_pretrained(tpm=str(tmp_path / "export"), device="cpu")
    img = pipe("a red circle", seed=0)
    assert pipe.backbone.family.name == "flux" and img.images.shape[-2:] == (64, 64)
    assert 1 <= int(img.nfe[0]) <= 8


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_flux_trains_on_ray(tmp_path, flux_dev_dir):
    """The same loop with Ray rollout/reward actors and a learner rank, on the Flux backbone."""
    sets = _flux_overrides(flux_dev_dir, **{"distributed.enabled": True, "distributed.rollout.num_workers": 1,
                                            "distributed.learner.num_ranks": 1})
    args = [sys.executable, "-m", "tpdm_rl.cli", "train", "--config", "configs/tiny.yaml", "--output",
            str(tmp_path / "ray")]
    for s in sets:
        args += ["--set", s]
    r = run_own_ray(args, timeout=900, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = read_metrics(tmp_path / "ray" / "metrics.jsonl")
    assert [m["policy/version"] for m in recs] == [1, 2] and all(m["learner/ranks"] == 1 for m in recs)
