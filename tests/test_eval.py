"""Baselines (fixed, AdaptiveDiffusion), evaluation, sampling, export and TPDMPipeline on the tiny backbone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_overrides
from tpdm_rl.rollout.baselines import adaptive_skip_mask
from tpdm_rl.rollout.sampler import MethodSampler

from tpdm_rl.algorithm.policy import TimePredictionModule, TPMSpec
from tpdm_rl.cli import main
from tpdm_rl.core.methods import Method, MethodError, parse_method, parse_methods
from tpdm_rl.core.rng import derive_key
from tpdm_rl.training.tpm_file import CheckpointError, save_tpm

PROMPTS = ["a red apple on a table", "a lighthouse at dusk", "a bowl of ramen", "a cat on a sofa",
           "a snowy mountain", "a blue bicycle"]


# ------------------------------------------------------------------ the decision rule
def _decisions(latents: torch.Tensor, threshold: float, max_skip: int) -> torch.Tensor:
    """Replay the rule over a hand-made latent sequence [T+1, B, ...]: skip decision per step [T, B]."""
    d = (latents[1:] - latents[:-1]).abs().flatten(2).mean(2)  # d_1..d_T  [T, B]
    b = latents.shape[1]
    nan = torch.full((b,), float("nan"))
    skips = torch.zeros(b, dtype=torch.int64)
    out = []
    for k in range(d.shape[0]):
        # at step k the sampler holds x_0..x_k, i.e. d_1..d_k
        d1 = d[k - 1] if k >= 1 else nan
        d2 = d[k - 2] if k >= 2 else nan
        d3 = d[k - 3] if k >= 3 else nan
        s = adaptive_skip_mask(d1, d2, d3, skips, k, threshold, max_skip)
        skips = torch.where(s, skips + 1, torch.zeros_like(skips))
        out.append(s)
    return torch.stack(out)


def test_adaptive_rule_on_hand_made_differences():
    steps = 13
    diffs = torch.tensor([
        [1.0] * steps,  # perfectly smooth: skip whenever allowed
        [1.0, 2.0] * 6 + [1.0],  # zig-zag: the third-order term is large, never skip
        [1.0] * 4 + [3.0] * 9,  # the latent steps triple in size from d_5 on
    ]).T  # [T, B]
    latents = torch.cat([torch.zeros(1, 3), diffs.cumsum(0)])[:, :, None, None].expand(-1, -1, 2, 2)
    got = _decisions(latents, threshold=0.01, max_skip=4)
    T, F = True, False
    # step k uses d_k, d_{k-1}, d_{k-2}; steps 0..2 always call, then at most 4 skips in a row
    assert got[:, 0].tolist() == [F, F, F, T, T, T, T, F, T, T, T, T, F]
    assert got[:, 1].tolist() == [F] * 13
    # d_5 = 3 breaks the pattern at steps 5 and 6 (|(3+1)/2 - 1| = 1 > 0.01 * 1, |(3+1)/2 - 3| = 1 > 0.01 * 3)
    assert got[:, 2].tolist() == [F, F, F, T, T, F, F, T, T, T, T, F, T]
    # never in the first 3 steps, never more than MAX_SKIP in a row, for any threshold / max_skip
    for thr in (0.0, 0.01, 0.5, 10.0):
        for ms in (0, 1, 2, 4):
            g = _decisions(latents, thr, ms)
            assert not g[:3].any()
            run = torch.zeros(3, dtype=torch.int64)
            for row in g:
                run = torch.where(row, run + 1, torch.zeros_like(run))
                assert int(run.max()) <= ms
    # a looser threshold accepts the jump's second step: |(3 + 1)/2 - 3| = 1 <= 0.5 * 3
    assert _decisions(latents, 0.5, 4)[:, 2].tolist() == [F, F, F, T, T, F, T, T, T, T, F, T, T]


def test_parse_methods_and_bad_strings():
    assert [m.name for m in parse_methods("tpm, fixed:28,fixed:14,adaptive:0.01,adaptive,tpm+adaptive:0.02:3")] == \
        ["tpm", "fixed:28", "fixed:14", "adaptive:0.01", "tpm+adaptive:0.02:3"]
    assert parse_method("adaptive:0.05:2") == Method("adaptive", threshold=0.05, max_skip=2)
    for bad in ("fixed", "fixed:0", "fixed:x", "adaptive:abc", "adaptive:-1", "adaptive:0.1:2:3", "tpm:3",
                "ddim:20", ""):
        with pytest.raises(MethodError, match="expected one of fixed:N"):
            parse_method(bad)


def test_bad_method_string_is_a_one_line_cli_error(capsys):
    rc = main(["eval", "--checkpoint", "nowhere", "--methods", "tpm,fixd:8", "--output", "unused"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert "'fixd:8'" in err and "fixed:N" in err and "adaptive:THRESHOLD" in err and "Traceback" not in err


# ------------------------------------------------------------------ samplers
def test_adaptive_sampler_skips_different_steps_per_prompt(backbone):
    s = MethodSampler(backbone, 64, 64, batch_size=4)
    seeds = [derive_key(5, i) for i in range(len(PROMPTS))]
    out = s.run("adaptive:0.01", PROMPTS, seeds)
    assert out.steps.tolist() == [28] * len(PROMPTS)
    assert (out.nfe < 28).all(), out.nfe
    assert len(set(out.nfe.tolist())) > 1, f"every prompt skipped the same number of steps: {out.nfe.tolist()}"
    # the official rule: steps 0-3 always call; steps 4-8 may all be skipped (5 in a row), later at most
    # MAX_SKIP = 4 in a row (rollout/adaptive.py)
    for c, n in zip(out.called, out.nfe.tolist()):
        assert c[:4].all() and int(c.sum()) == n
        run = 0
        for k, called in enumerate(c.tolist()):
            run = 0 if called else run + 1
            assert run <= (5 if k <= 8 else 4)
    assert torch.isfinite(out.images).all() and out.images.shape == (len(PROMPTS), 3, 64, 64)
    # the legacy rule: may skip from step 3, never more than MAX_SKIP in a row
    legacy = s.run("adaptive-legacy:0.01", PROMPTS, seeds, decode=False)
    assert (legacy.nfe < 28).all(), legacy.nfe
    for c in legacy.called:
        assert c[:3].all()
        run = 0
        for called in c.tolist():
            run = 0 if called else run + 1
            assert run <= 4
    # with MAX_SKIP = 0 the adaptive sampler is exactly the fixed 28-step sampler
    never = s.run("adaptive:0.01:0", PROMPTS[:3], seeds[:3])
    ref = s.run("fixed:28", PROMPTS[:3], seeds[:3])
    assert never.nfe.tolist() == [28, 28, 28]
    torch.testing.assert_close(never.latents, ref.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(never.sigmas[0], ref.sigmas[0])


def test_fixed_method_reproduces_diffusers_pipeline(backbone):
    s = MethodSampler(backbone, 64, 64, batch_size=2)
    out = s.run("fixed:6", PROMPTS[:2], [11, 12])
    assert out.nfe.tolist() == [6, 6] and len(out.sigmas[0]) == 7
    for i, seed in enumerate((11, 12)):
        ref = backbone.pipe(PROMPTS[i], num_inference_steps=6, height=64, width=64, max_sequence_length=32,
                            guidance_scale=backbone.guidance_scale, output_type="pt",
                            generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out.images[i], ref.images[0], rtol=0, atol=1e-4)


def test_tpm_adaptive_without_skips_is_the_tpm(backbone):
    spec = TPMSpec(in_channels=backbone.feature_channels, temb_dim=backbone.temb_dim, grid=4, hidden=16,
                   init_ratio=0.6, init_concentration=4.0)
    torch.manual_seed(0)
    policy = TimePredictionModule(spec).eval()
    s = MethodSampler(backbone, 64, 64, batch_size=4, policy=policy, max_steps=15)
    seeds = [derive_key(9, i) for i in range(4)]
    tpm = s.run("tpm", PROMPTS[:4], seeds)
    same = s.run("tpm+adaptive:0.01:0", PROMPTS[:4], seeds)
    assert same.steps.tolist() == tpm.steps.tolist() == tpm.nfe.tolist()
    for a, b in zip(same.sigmas, tpm.sigmas):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(same.latents, tpm.latents, rtol=1e-4, atol=1e-5)
    skipping = s.run("tpm+adaptive:0.5", PROMPTS[:4], seeds)
    assert (skipping.nfe <= skipping.steps).all() and (skipping.nfe < skipping.steps).any()


def test_tpm_inference_mode_mean_and_sample(backbone):
    """policy.inference: the first ratio is the Beta mode, the Beta mean or a draw; a draw is keyed by the image's
    noise seed, so it repeats exactly and does not depend on which images share the batch."""
    from tpdm_rl.algorithm.actions import beta_mode

    spec = TPMSpec(in_channels=backbone.feature_channels, temb_dim=backbone.temb_dim, grid=4, hidden=16,
                   init_ratio=0.6, init_concentration=4.0)
    torch.manual_seed(0)
    policy = TimePredictionModule(spec).eval()
    seeds = [derive_key(11, i) for i in range(4)]
    runs = {m: MethodSampler(backbone, 64, 64, batch_size=4, policy=policy, max_steps=15, inference=m)
            .run("tpm", PROMPTS[:4], seeds) for m in ("mode", "mean", "sample")}
    first = {m: torch.stack([sg[1] for sg in r.sigmas]) for m, r in runs.items()}  # sigma after step 0 (sigma0 = 1)
    a, b = torch.tensor(0.6 * 4.0), torch.tensor(0.4 * 4.0)  # the untrained TPM's Beta (init bias, near-zero weights)
    assert first["mode"] == pytest.approx(torch.full((4,), float(beta_mode(a, b))), abs=0.02)
    assert first["mean"] == pytest.approx(torch.full((4,), 0.6), abs=0.02)
    assert first["sample"].std() > 0.01  # draws differ between images
    again = MethodSampler(backbone, 64, 64, batch_size=2, policy=policy, max_steps=15, inference="sample")
    alone = again.run("tpm", PROMPTS[2:3], seeds[2:3])
    torch.testing.assert_close(alone.sigmas[0], runs["sample"].sigmas[2])
    assert alone.steps.tolist() == runs["sample"].steps[2:3].tolist()
    with pytest.raises(MethodError, match="inference"):
        MethodSampler(backbone, 64, 64, policy=policy, inference="median")


# ------------------------------------------------------------------ eval / sample / export end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone_dir):
    from tpdm_rl.core.config_io import load_config
    from tpdm_rl.training.controller import Controller

    out = tmp_path_factory.mktemp("evalrun")
    cfg = load_config("configs/tiny.yaml", small_overrides(tiny_backbone_dir))
    Controller(cfg, output=out).train()
    return out / "checkpoints" / "step_2"


def test_eval_end_to_end_writes_every_file(trained, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    out = tmp_path / "eval"
    rc = main(["eval", "--checkpoint", str(trained), "--prompts", str(prompts), "--methods",
               "tpm,fixed:4,adaptive:0.01,tpm+adaptive:0.01", "--rewards", "fidelity", "--output", str(out),
               "--pareto-steps", "2,4", "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    for f in ("results.json", "results.md", "schedules.png", "nfe_hist.png", "pareto.png", "grid.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    rep = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in rep["methods"]}
    assert set(rows) == {"tpm", "fixed:4", "adaptive:0.01", "tpm+adaptive:0.01", "fixed:28"}
    assert rows["fixed:28"]["is_reference"] and rows["fixed:28"]["nfe"]["mean"] == 28
    assert rows["tpm"]["nfe"]["mean"] < rows["fixed:28"]["nfe"]["mean"]
    assert rows["adaptive:0.01"]["nfe"]["max"] < 28
    for name, r in rows.items():
        for key in ("psnr", "ssim"):
            assert r[key]["mean"] == r[key]["mean"], (name, key)  # finite, not NaN
        assert r["rewards"]["fidelity"]["mean"] <= r["psnr"]["mean"] + 1e-3  # the reward saturates, PSNR does not
        assert r["seconds_per_image"] > 0 and r["speedup_nfe"] > 0
    assert rows["fixed:4"]["nfe"]["mean"] == 4 and rows["fixed:4"]["psnr"]["mean"] < 100
    from tpdm_rl.rewards.fidelity import DEFAULT_MAX_PSNR, saturate
    for rec in rep["per_image"]:  # image by image, the fidelity reward is the saturated PSNR
        for name, value in rec["psnr"].items():
            want = float(saturate(torch.tensor([value]), DEFAULT_MAX_PSNR)[0])
            assert rec["rewards"][name]["fidelity"] == pytest.approx(want, abs=1e-3), name
    assert [p["nfe"]["mean"] for p in rep["pareto"]] == [2, 4]
    assert len(rep["per_image"]) == 3 and "tpm" in rep["per_image"][0]["sigmas"]
    md = (out / "results.md").read_text()
    assert "| tpm |" in md and "fixed:28 (reference)" in md and "adaptive:0.01" in md
    assert rep["per_image"][0]["seed"] != rep["per_image"][1]["seed"]


def test_sample_export_and_pipeline_round_trip(trained, tmp_path, capsys):
    from tpdm_rl.rollout.pipeline import TPDMPipeline

    png = tmp_path / "apple.png"
    assert main(["sample", "--checkpoint", str(trained), "--prompt", PROMPTS[0], "--output", str(png),
                 "--seed", "7", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert png.is_file() and "steps:" in printed and "sigmas: 1.0000" in printed
    steps_printed = int(printed.split("steps:")[1].split()[0])

    exp = tmp_path / "export"
    assert main(["export", "--checkpoint", str(trained), "--output", str(exp)]) == 0
    assert {p.name for p in exp.iterdir()} >= {"tpm.safetensors", "tpdm_config.json", "README.md"}
    cfg = json.loads((exp / "tpdm_config.json").read_text())
    assert cfg["inference"]["feature_grid"] == 4 and cfg["training_config"]["rewards"]["fidelity"]["weight"] == 1.0
    card = (exp / "README.md").read_text()
    assert "TPDMPipeline.from_pretrained" in card and "## Training configuration" in card

    a = TPDMPipeline.from_pretrained(tpm=exp, device="cpu")
    b = TPDMPipeline.from_pretrained(tpm=trained / "tpm.safetensors", device="cpu")
    oa = a([PROMPTS[0], PROMPTS[1]], seed=[7, 8])
    ob = b([PROMPTS[0], PROMPTS[1]], seed=[7, 8])
    assert oa.images.shape == (2, 3, 64, 64) and 0 <= float(oa.images.min()) and float(oa.images.max()) <= 1
    assert oa.steps.dtype == torch.int64 and int(oa.steps[0]) == steps_printed
    assert oa.steps.tolist() == ob.steps.tolist() == [len(s) - 1 for s in oa.sigmas]
    torch.testing.assert_close(oa.images, ob.images)
    assert float(oa.sigmas[0][-1]) == 0.0 and len(oa.pil()) == 2
    # export with an eval folder puts the eval table into the model card
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "results.md").write_text("# TPDM evaluation\n\n| method | NFE |\n|---|---|\n| tpm | 9.0 |\n")
    (ev / "COMPLETE").write_text("evaluation complete\n")  # an unfinished evaluation is refused (issue 30)
    assert main(["export", "--checkpoint", str(exp), "--output", str(tmp_path / "export2"), "--eval", str(ev)]) == 0
    assert "| tpm | 9.0 |" in (tmp_path / "export2" / "README.md").read_text()


def test_mismatched_tpm_is_a_clear_error(backbone, trained, tmp_path, capsys):
    from tpdm_rl.rollout.pipeline import TPDMPipeline

    # the session backbone pools features to a 4x4 grid; this TPM was made for 8x8
    spec = TPMSpec(in_channels=backbone.feature_channels, temb_dim=backbone.temb_dim, grid=8, hidden=16)
    bad = tmp_path / "grid8.safetensors"
    save_tpm(TimePredictionModule(spec), bad, {"inference": {
        "backbone_path": backbone.path, "backbone_blocks": 2, "hidden_size": backbone.hidden_size,
        "feature_blocks": [0, 1], "feature_grid": 8, "resolution": 64, "guidance_scale": 4.5,
        "max_sequence_length": 32}})
    with pytest.raises(CheckpointError, match=r"feature_grid is 8 for the TPM but 4 for the backbone"):
        TPDMPipeline.from_pretrained(backbone, tpm=bad)
    # a TPM trained on a 24-block, 1536-wide backbone, pointed at the tiny one
    spec = TPMSpec(in_channels=2 * 1536, temb_dim=1536, grid=4, hidden=16)
    big = tmp_path / "sd3m.safetensors"
    save_tpm(TimePredictionModule(spec), big, {"inference": {
        "backbone_path": backbone.path, "backbone_blocks": 24, "hidden_size": 1536, "feature_blocks": [0, 23],
        "feature_grid": 4, "resolution": 64}})
    rc = main(["sample", "--checkpoint", str(big), "--prompt", "x", "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert "backbone_blocks is 24 for the TPM but 2 for the backbone" in err


def test_import_rollout_stays_light():
    code = ("import sys, rollout; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules; "
            "from tpdm_rl.rollout.pipeline import TPDMPipeline; print(TPDMPipeline.__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "TPDMPipeline"
