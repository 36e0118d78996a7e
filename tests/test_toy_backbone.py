"""The shipped, trained toy backbone: loads offline as a diffusers SD3 pipeline, small, word-level tokenizers;
the CLI copies it; the training code runs end to end (at a tiny size); a 2-iteration TPM run on it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import run_cli_in_process
from diffusers import StableDiffusion3Pipeline
from tpdm_rl.rollout.toy import shipped_toy_dir, toy_backbone_path, toy_text_len

from tpdm_rl.builders.toy_backbone import (
    TEXT_LEN,
    ToyTrainSettings,
    build_tokenizers,
    train_toy_backbone,
)
from tpdm_rl.commands.train import closing_evaluation
from tpdm_rl.core.config_io import load_config
from tpdm_rl.core.metrics_reader import read_metrics
from tpdm_rl.core.toyworld import IMAGE_SIZE, VOCABULARY, parse_prompt, toy_prompt_file
from tpdm_rl.training.controller import Controller

MAX_SHIPPED_BYTES = 25 * 2**20


@pytest.mark.parametrize("name, prompt", [
    ("builtin:toy", "a red circle on a white background"),
    ("builtin:toy-places", "a red circle in the top left and a blue square on a white background")])
def test_shipped_toy_backbone_is_small_safetensors_and_loads_offline(name, prompt):
    """Both shipped backbones: the reading-order world's (``builtin:toy``) and the places world's."""
    d = shipped_toy_dir(name)
    assert toy_backbone_path(name) == str(d)
    files = [p for p in d.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_SHIPPED_BYTES
    weights = [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".safetensors")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)  # never a pickle
    pipe = StableDiffusion3Pipeline.from_pretrained(str(d), local_files_only=True)
    assert pipe.vae.config.latent_channels == 16
    meta = json.loads((d / "tpdm_toy.json").read_text())
    assert meta["image_size"] == IMAGE_SIZE and meta["text_len"] == toy_text_len(d) <= TEXT_LEN
    pipe.set_progress_bar_config(disable=True)
    img = pipe([prompt], num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
               generator=torch.Generator().manual_seed(0), output_type="pt", max_sequence_length=toy_text_len(d)).images
    assert img.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(img).all()


def test_tokenizers_carry_every_grammar_word_as_one_token():
    clip, t5 = build_tokenizers()
    for w in VOCABULARY:
        assert len(clip(w, add_special_tokens=False).input_ids) == 1, w
        assert len(t5(w, add_special_tokens=False).input_ids) == 1, w
    longest = "two red circles, a blue square and a yellow triangle on a white background"
    assert len(clip(longest).input_ids) <= TEXT_LEN


def test_the_longest_places_prompt_fits_text_len_in_both_tokenizers():
    """Four placed objects is the longest form (7 words a group); every bundled places prompt fits too."""
    clip, t5 = build_tokenizers()
    longest = ("a orange triangle in the bottom right, a purple triangle in the bottom left, a yellow triangle in "
               "the top right and a orange square in the top left on a white background")
    parse_prompt(longest)
    assert len(clip(longest).input_ids) == 37 and len(t5(longest).input_ids) == 36
    prompts = [ln for name in ("toy-places-train", "toy-places-heldout") for ln in toy_prompt_file(name).splitlines()[1:]]
    lengths = [(len(clip(p).input_ids), len(t5(p).input_ids)) for p in prompts]
    assert max(max(c, t) for c, t in lengths) <= 37 <= TEXT_LEN


def test_make_toy_backbone_copies_the_shipped_folder_and_refuses_a_used_one(tmp_path):
    out = tmp_path / "toy"
    r = subprocess.run([sys.executable, "-m", "tpdm_rl.cli", "make-toy-backbone", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "model_index.json").is_file()
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (shipped_toy_dir() / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    r = run_cli_in_process("make-toy-backbone", str(out))  # the refusal: no need for a second interpreter
    assert r.returncode != 0 and "not an empty folder" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_toy_training_runs_end_to_end_at_a_tiny_size(tmp_path):
    """The --train path with a few steps of each stage: writes a loadable pipeline, the loss log and plot, and the
    quality report by object count (its numbers mean nothing at this size)."""
    s = ToyTrainSettings(seed=3, threads=1, vae_steps=2, vae_batch=4, scenes=16, steps=2, batch=4, warmup=1,
                         eval_prompts=3)  # one prompt of each kind (all placed, mixed, none placed)
    out = train_toy_backbone(tmp_path / "toy", s, progress=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.transformer.config.in_channels == 16
    assert (out / "training" / "loss.png").is_file()
    stages = {json.loads(line)["stage"] for line in (out / "training" / "loss.jsonl").read_text().splitlines()}
    assert stages == {"vae", "transformer"}
    quality = json.loads((out / "training" / "quality.json").read_text())
    assert set(quality) == {"4", "28"} and 0.0 <= quality["28"]["score"] <= 1.0
    assert quality["28"]["by_objects"] and quality["28"]["by_unplaced"]  # both classes reported
    assert json.loads((out / "tpdm_toy.json").read_text())["settings"]["seed"] == 3


@pytest.mark.slow
def test_two_iteration_tpm_run_on_the_toy_backbone(tmp_path):
    over = {"train.iterations": 2, "rollout.prompts_per_iteration": 2, "rollout.group_size": 4,
            "rollout.batch_size": 8, "rollout.max_steps": 10, "checkpoint.every": 1, "logging.progress": False,
            "logging.tensorboard": False, "train.threads": 1, "eval.enabled": True, "eval.limit": 4,
            "eval.methods": "tpm,tpm-mean,fixed:28", "eval.pareto_steps": [4, 28], "eval.batch_size": 8}
    cfg = load_config("configs/toy.yaml", [f"{k}={v}" for k, v in over.items()])
    Controller(cfg, output=tmp_path / "run").train()
    closing_evaluation(cfg, tmp_path / "run")  # what tpdm-rl train runs after the last iteration
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["iteration"] for r in recs] == [0, 1]
    assert all(0.0 <= r["reward/shapes"] <= 1.0 and 1 <= r["steps/mean"] <= 10 for r in recs)
    rep = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    names = {m["method"] for m in rep["methods"]}
    assert {"tpm", "fixed:28"} <= names and any(n.startswith("tpm-mean") for n in names)
    assert "spearman_tpm_nfe" in rep["complexity"] and "shapes" in rep["comparisons"]


def test_training_and_inference_shifts_are_settings():
    """``train_shift`` moves the training density (SD3's shift 3: most draws at high noise; 1.0: centred on 0.5);
    ``shift`` is the shipped scheduler's inference shift."""
    from tpdm_rl.builders.toy_backbone import (
        ToyTrainSettings,
        build_toy_pipeline,
        training_scheduler,
        training_timesteps,
    )

    pipe = build_toy_pipeline(0, shift=2.0)
    assert pipe.scheduler.config.shift == 2.0
    draws = {}
    for shift in (1.0, 3.0):
        sched = training_scheduler(pipe.scheduler.config, ToyTrainSettings(train_shift=shift))
        t, sig = training_timesteps(sched, 20_000, torch.Generator().manual_seed(0))
        assert torch.allclose(t, sig.flatten() * 1000, atol=1e-2)
        draws[shift] = sig.flatten()
    assert abs(draws[1.0].median() - 0.5) < 0.02 and abs(draws[3.0].median() - 0.75) < 0.02
    assert abs((draws[3.0] > 0.5).float().mean() - 0.86) < 0.02
    assert ToyTrainSettings().train_shift == 3.0 == ToyTrainSettings().shift  # the shipped recipe
