"""``tpdm-rl export``: a self-contained TPM folder (weights + inference settings + model card)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml
from safetensors.torch import save_file

from tpdm_rl.rollout.settings import transformer_geometry
from tpdm_rl.tpm_file import (
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
    return next((c for c in cands if c.is_file()), None)


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


def model_card(out: Path, settings: dict, spec: dict, meta: dict, train_cfg: str, results_md: str | None) -> str:
    lines = [
        f"# TPDM Time Prediction Module: {out.name}",
        "",
        "A Time Prediction Module (TPM) trained with tpdm-rl: on a frozen SD3-family backbone it predicts, at every "
        "denoising step, the next noise level (sigma_next = r * sigma, r = mode of a Beta distribution), so every "
        "prompt gets its own schedule and number of steps.",
        "",
        "## Use",
        "",
        "```python",
        "from tpdm_rl.rollout.pipeline import TPDMPipeline",
        "",
        f'pipe = TPDMPipeline.from_pretrained(tpm="{out}")  # backbone: {settings.get("backbone_path")}',
        'out = pipe(["a red apple on a table"], seed=[0])',
        "out.pil()[0].save(\"apple.png\"); print(out.steps, out.sigmas[0])",
        "```",
        "",
        "```bash",
        f'tpdm-rl sample --checkpoint {out} --prompt "a red apple on a table" --output apple.png --seed 0',
        f"tpdm-rl eval --checkpoint {out} --prompts builtin:eval --methods tpm,fixed:28,fixed:14,adaptive:0.01 "
        "--output eval",
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
