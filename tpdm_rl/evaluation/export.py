"""``tpdm-rl export``: a self-contained TPM folder (weights + inference settings + model card)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml
from safetensors.torch import save_file

from tpdm_rl.core.defaults import EVAL_COMPLETE
from tpdm_rl.rollout.settings import transformer_geometry
from tpdm_rl.rollout.toy import toy_world
from tpdm_rl.training.tpm_file import (
    EXPORT_CONFIG,
    CheckpointError,
    locate_tpm,
    make_shareable,
    read_inference_settings,
    read_tpm_file,
)


def find_eval_results(tpm_file: Path) -> Path | None:
    """An eval ``results.md`` next to a checkpoint: in it, its ``eval/``, or the run's ``eval/``."""
    d = tpm_file.parent
    cands = [d / "results.md", d / "eval" / "results.md"]
    if d.parent.name == "checkpoints":
        cands.append(d.parent.parent / "eval" / "results.md")
    # an evaluation stopped while writing (no COMPLETE marker) is not one to describe the model with
    return next((c for c in cands if c.is_file() and (c.parent / EVAL_COMPLETE).is_file()), None)


#: the files an export consists of (an existing one in --output means an earlier export)
EXPORT_FILES = ("tpm.safetensors", EXPORT_CONFIG, "README.md", "eval_results.md")


class ExportError(RuntimeError):
    """The export folder cannot be used (one line naming it and what to do)."""


def export_tpm(checkpoint: str | os.PathLike, output: str | os.PathLike, eval_dir: str | os.PathLike | None = None,
               overwrite: bool = False) -> Path:
    """Write ``tpm.safetensors`` (with inference metadata) + ``tpdm_config.json`` + a ``README.md`` model card.

    An earlier export in ``output`` is refused unless ``overwrite``; then all its files are replaced or removed,
    so no file of the previous model (``eval_results.md``) stays beside the new one."""
    tpm_file = locate_tpm(checkpoint)
    out = Path(output)
    if out.resolve() == tpm_file.parent.resolve():
        raise CheckpointError(f"export folder {str(out)!r} is the checkpoint folder itself; choose another --output")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--output {str(out)!r} is a file; expected an export folder")
    earlier = [f for f in EXPORT_FILES if (out / f).exists()]
    if earlier and not overwrite:
        raise ExportError(f"--output {str(out)!r} holds an earlier export ({', '.join(earlier)}); pass --overwrite "
                          "to replace it, or choose another folder")
    settings, spec = read_inference_settings(tpm_file)
    geo = transformer_geometry(settings.get("backbone_path") or "")
    if geo is not None:
        settings["backbone_blocks"] = settings.get("backbone_blocks") or geo[0]
        settings["hidden_size"] = settings.get("hidden_size") or geo[1]
        settings["feature_blocks"] = [int(b) % geo[0] for b in settings["feature_blocks"]]
    tensors, meta = read_tpm_file(tpm_file)
    train_cfg_text = ""
    if (tpm_file.parent / "config.yaml").is_file():
        train_cfg_text = (tpm_file.parent / "config.yaml").read_text()
    elif (tpm_file.parent / EXPORT_CONFIG).is_file():
        prev = json.loads((tpm_file.parent / EXPORT_CONFIG).read_text()).get("training_config")
        train_cfg_text = yaml.safe_dump(prev, sort_keys=False) if prev else ""
    results_md = None
    if eval_dir is not None:
        p = Path(eval_dir)
        results_md = p if p.is_file() else p / "results.md"
        if not results_md.is_file():
            raise FileNotFoundError(f"--eval {str(eval_dir)!r} holds no results.md (run tpdm-rl eval first)")
        if not (results_md.parent / EVAL_COMPLETE).is_file():
            raise ExportError(f"--eval {str(eval_dir)!r} is an evaluation that did not finish (no {EVAL_COMPLETE} "
                              "marker: it was stopped while writing); expected a complete one: rerun tpdm-rl eval "
                              "with --overwrite")
    else:
        results_md = find_eval_results(tpm_file)

    out.mkdir(parents=True, exist_ok=True)
    for f in earlier:  # --overwrite: nothing of the previous model may survive beside the new one
        (out / f).unlink()
    new_meta = dict(meta)
    new_meta["inference"] = json.dumps(settings)
    save_file(tensors, str(out / "tpm.safetensors"), metadata=new_meta)
    make_shareable(out / "tpm.safetensors")
    it = meta.get("iteration")
    cfg = {"format": "tpdm-rl/export", "version": 1, "source": str(tpm_file),
           "iteration": int(it) if it is not None and str(it).isdigit() else it,
           "inference": settings, "tpm_spec": spec,
           "training_config": yaml.safe_load(train_cfg_text) if train_cfg_text else None}
    (out / EXPORT_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    if results_md is not None:
        shutil.copyfile(results_md, out / "eval_results.md")
    (out / "README.md").write_text(model_card(out, settings, spec, meta, train_cfg_text,
                                              results_md.read_text() if results_md else None))
    return out


#: how the TPM picks its ratio at inference (``policy.inference``), in words, per action
_PICK = {("beta", "mode"): "the mode of a Beta distribution", ("beta", "mean"): "the mean of a Beta distribution",
         ("beta", "sample"): "a draw from a Beta distribution keyed by the image's noise seed"}


def _what_it_predicts(spec: dict, settings: dict) -> str:
    """The model card's sentence on the TPM's action (the Beta ratio or the stop head + ratio)."""
    action, how = spec.get("action", "beta"), settings.get("inference", "mode")
    if action == "stop-ratio":
        pick = {"mode": "stop when p_stop > 1/2, else the median ratio", "mean": "the mean decision",
                "sample": "a draw keyed by the image's noise seed"}.get(how, how)
        return ("at every denoising step a stop head decides whether to jump to sigma 0, else the next noise level "
                f"is sigma_next = r * sigma with r from a logit-normal distribution (inference: {pick})")
    return (f"at every denoising step the next noise level (sigma_next = r * sigma, r = "
            f"{_PICK.get((action, how), how)})")


def _examples(backbone: str) -> tuple[str, str, str]:
    """(a prompt, the eval prompt set, the eval reward) that suit the backbone: toy-world ones on a toy backbone."""
    world = toy_world(backbone)
    if world == "places":
        return "a red circle in the top left on a white background", "builtin:toy-places-heldout", "shapes"
    if world is not None:
        return "two red circles and a blue square on a white background", "builtin:toy-heldout", "shapes"
    return "a red apple on a table", "builtin:eval", "fidelity"


def model_card(out: Path, settings: dict, spec: dict, meta: dict, train_cfg: str, results_md: str | None) -> str:
    backbone = str(settings.get("backbone_path") or "")
    family = {"sd3": "SD3-family", "flux": "FLUX.1"}.get(settings.get("backbone_family", ""), "flow-matching")
    on = f"the shipped toy backbone `{backbone}`" if toy_world(backbone) else f"a frozen {family} backbone"
    prompt, prompts, reward = _examples(backbone)
    lines = [
        f"# TPDM Time Prediction Module: {out.name}",
        "",
        f"A Time Prediction Module (TPM) trained with tpdm-rl: on {on} it predicts {_what_it_predicts(spec, settings)}, "
        "so every prompt gets its own schedule and number of steps.",
        "",
        "## Use",
        "",
        "```python",
        "from tpdm_rl.rollout.pipeline import TPDMPipeline",
        "",
        f'pipe = TPDMPipeline.from_pretrained(tpm="{out}")  # backbone: {backbone}',
        f'out = pipe([{prompt!r}], seed=[0])'.replace("'", '"'),
        "out.pil()[0].save(\"sample.png\"); print(out.steps, out.sigmas[0])",
        "```",
        "",
        "```bash",
        f'tpdm-rl sample --checkpoint {out} --prompt "{prompt}" --output sample.png --seed 0',
        f"tpdm-rl eval --checkpoint {out} --prompts {prompts} --methods tpm,tpm-mean,fixed:28,adaptive:0.01 "
        f"--rewards {reward} --output eval",
        "```",
        "",
        "Pass `backbone_path` / `--backbone` when the backbone lives elsewhere; the TPM checks that the backbone's "
        "geometry matches the values below and refuses a mismatch.",
        "",
        "## Inference settings (`tpdm_config.json`)",
        "",
        "| key | value |",
        "|---|---|",
    ]
    for k, v in settings.items():
        lines.append(f"| {k} | `{json.dumps(v)}` |")
    lines += ["", "## TPM architecture", "", "| key | value |", "|---|---|"]
    for k, v in spec.items():
        lines.append(f"| {k} | `{json.dumps(v)}` |")
    if meta.get("iteration") is not None:
        lines += ["", f"Trained for {meta['iteration']} iterations."]
    lines += ["", "## Evaluation", ""]
    if results_md:
        body = results_md.split("\n", 1)[1] if results_md.startswith("# ") else results_md
        lines += [body.strip().replace("\n## ", "\n### "), ""]
    else:
        lines += ["No evaluation found next to the checkpoint; run `tpdm-rl eval` and export again with `--eval DIR`.",
                  ""]
    lines += ["## Training configuration", ""]
    if train_cfg:
        lines += ["```yaml", train_cfg.rstrip(), "```"]
    else:
        lines += ["(not available)"]
    return "\n".join(lines) + "\n"
