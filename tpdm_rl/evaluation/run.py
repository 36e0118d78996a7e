"""Evaluation of a trained TPM against fixed schedules and AdaptiveDiffusion.

Every method samples the same prompts from the same initial noises (one seed per (prompt, k),
``noise_seed``); the backbone's default 28-step schedule (``fixed:28``) is always run and is the
reference for PSNR/SSIM. ``evaluate`` writes ``results.json``, ``results.md``, ``schedules.png``,
``nfe_hist.png``, ``pareto.png`` and ``grid.png`` into the output folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torchmetrics.functional import structural_similarity_index_measure
from tqdm.auto import tqdm

from tpdm_rl.core.defaults import DEFAULT_METHODS, DEFAULT_PARETO_STEPS, EVAL_COMPLETE, EVAL_OUTPUT_FILES
from tpdm_rl.core.eval_output import check_output
from tpdm_rl.core.methods import Method, parse_method, parse_methods
from tpdm_rl.core.prompts import load_prompts
from tpdm_rl.core.reward_registry import RewardError, build_reward
from tpdm_rl.core.rng import derive_key
from tpdm_rl.core.tables import load_family
from tpdm_rl.evaluation.compare import at_equal_nfe, by_level, complexity_of, mean_se, rank_correlation
from tpdm_rl.evaluation.plots import plot_complexity, plot_grid, plot_nfe_hist, plot_pareto, plot_schedules
from tpdm_rl.evaluation.report import results_markdown
from tpdm_rl.rewards.fidelity import psnr
from tpdm_rl.rollout.pipeline import TPDMPipeline
from tpdm_rl.rollout.sampler import SampleOutput
from tpdm_rl.rollout.schedules import mean_schedule
from tpdm_rl.training.runfolder import LOCK_FILE, lock_folder, unlock_folder
from tpdm_rl.training.tpm_file import locate_tpm

REFERENCE = Method("fixed", steps=28)
#: written last by ``evaluate``: its absence marks an evaluation that did not finish
COMPLETE = EVAL_COMPLETE
#: every file ``evaluate`` writes (an earlier evaluation's are removed before a new one starts)
OUTPUT_FILES = EVAL_OUTPUT_FILES
EVAL_SEED = 0xE7A1


def noise_seed(prompt_index: int, k: int) -> int:
    """The initial-noise seed of the k-th image of prompt ``prompt_index`` (same for every method).

    ``tpdm-rl sample --seed`` with this value reproduces the image (it is recorded in results.json).
    """
    return derive_key(EVAL_SEED, prompt_index, k) & 0x7FFFFFFFFFFFFFFF


# ---------------------------------------------------------------------------- small helpers
def ssim_per_image(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """SSIM of each image against its reference (torchmetrics, data range 1)."""
    k = 11 if min(images.shape[-2:]) >= 11 else (min(images.shape[-2:]) // 2) * 2 - 1
    return structural_similarity_index_measure(images.float(), references.float(), data_range=1.0, reduction="none", kernel_size=k).reshape(-1)


def reward_options_for(tpm_file: Path) -> dict[str, dict]:
    """Reward options from the training config next to the TPM (checkpoint config.yaml or export json)."""
    cfg = None
    if (tpm_file.parent / "config.yaml").is_file():
        try:
            cfg = yaml.safe_load((tpm_file.parent / "config.yaml").read_text())
        except yaml.YAMLError:
            cfg = None
    elif (tpm_file.parent / "tpdm_config.json").is_file():
        try:
            cfg = json.loads((tpm_file.parent / "tpdm_config.json").read_text()).get("training_config")
        except json.JSONDecodeError:
            cfg = None
    rewards = (cfg or {}).get("rewards") or {}
    out = {}
    for name, spec in rewards.items():
        spec = dict(spec or {})
        for k in ("weight", "normalize", "num_workers", "num_cpus", "num_gpus"):
            spec.pop(k, None)
        out[name] = spec
    return out


def build_eval_rewards(names: list[str], options: dict[str, dict]) -> dict:
    """Reward models by name (options from the training config when it has that reward); fidelity always."""
    models = {}
    for name in list(dict.fromkeys(["fidelity", *names])):
        try:
            models[name] = build_reward(name, **options.get(name, {}))
        except RewardError as exc:
            raise RewardError(f"--rewards {name}: {exc}") from None
    return models


@dataclass
class MethodResult:
    method: str
    nfe: torch.Tensor
    steps: torch.Tensor
    seconds: float
    cpu_seconds: float
    psnr: torch.Tensor
    ssim: torch.Tensor
    rewards: dict[str, torch.Tensor]
    sigmas: list[torch.Tensor]
    called: list[torch.Tensor]
    grid_images: torch.Tensor  # the few images shown in grid.png
    is_reference: bool = False
    extra: dict = field(default_factory=dict)

    def row(self, ref: MethodResult, n_images: int) -> dict:
        s_img = self.seconds / max(n_images, 1)
        ref_s = ref.seconds / max(n_images, 1)
        nfe = self.nfe.double()
        return {
            "method": self.method, "is_reference": self.is_reference,
            "nfe": {"mean": float(nfe.mean()), "min": int(self.nfe.min()), "max": int(self.nfe.max()),
                    "std": float(nfe.std()) if nfe.numel() > 1 else 0.0,
                    "distinct": len(set(self.nfe.tolist()))},
            "steps": {"mean": float(self.steps.double().mean()), "min": int(self.steps.min()),
                      "max": int(self.steps.max())},
            "psnr": mean_se(self.psnr), "ssim": mean_se(self.ssim),
            "rewards": {k: mean_se(v) for k, v in self.rewards.items()},
            "seconds": self.seconds, "seconds_per_image": s_img,
            "cpu_seconds_per_image": self.cpu_seconds / max(n_images, 1),
            "speedup_time": ref_s / s_img if s_img > 0 else float("nan"),
            "speedup_nfe": float(ref.nfe.double().mean() / nfe.mean()),
        }


# ---------------------------------------------------------------------------- evaluation
def evaluate(checkpoint: str | os.PathLike, output: str | os.PathLike, prompts: str = "builtin:eval",
             methods: str | list[str] = DEFAULT_METHODS, rewards: str | list[str] = "fidelity", seeds: int = 1,
             backbone: str | None = None, limit: int | None = None,
             pareto_steps: list[int] | tuple[int, ...] = DEFAULT_PARETO_STEPS, batch_size: int = 16,
             device: str = "auto", grid_prompts: int = 4, schedule_prompts: int = 8, progress: bool = True,
             timing_repeats: int = 1, inference: str | None = None, tables: str | None = None,
             overwrite: bool = False) -> dict:
    """Run every method on the same prompts and noises, score, and write the report files.

    ``inference`` (mode, mean or sample) overrides the TPM file's ``policy.inference``.
    ``tables``: a family of hand-made sigma tables (``tpdm_rl.core.tables.load_family``: ``builtin:toy``,
    ``shift:S`` or a JSON file), one per NFE, run as ``sigmas:`` methods; the TPM is compared with the family at
    equal NFE and pareto.png draws it as a second curve (``shift:S`` is restricted to ``pareto_steps``).
    ``timing_repeats`` > 1 times every method that many times, in round-robin passes over all
    methods, and reports the fastest wall clock (the outputs are deterministic; this only damps noise
    from other processes sharing the machine).

    An ``output`` holding an earlier evaluation is refused unless ``overwrite`` (then its files are removed
    first); ``COMPLETE`` is written last, so a folder without it is an interrupted evaluation. The folder is
    locked for the whole evaluation (``.tpdm-rl.lock``, as a training run's): a second evaluation (or a run) into
    it is refused at once, so two evaluations can never mix their files.
    """
    out_dir = Path(output)
    check_output(out_dir, overwrite)
    created = not out_dir.exists()
    lock = lock_folder(out_dir, "eval folder", "wait for that evaluation to end or choose another --output")
    finished = False
    try:
        report = _evaluate(checkpoint, out_dir, prompts, methods, rewards, seeds, backbone, limit, pareto_steps,
                           batch_size, device, grid_prompts, schedule_prompts, progress, timing_repeats, inference,
                           tables, overwrite)
        finished = True
        return report
    finally:
        unlock_folder(lock)
        if created and not finished and not any(p.name != LOCK_FILE for p in out_dir.iterdir()):
            (out_dir / LOCK_FILE).unlink(missing_ok=True)  # failed before writing anything: leave no empty folder
            out_dir.rmdir()


def _evaluate(checkpoint, out_dir: Path, prompts, methods, rewards, seeds, backbone, limit, pareto_steps, batch_size,
              device, grid_prompts, schedule_prompts, progress, timing_repeats, inference, tables,
              overwrite) -> dict:
    """The body of :func:`evaluate`, run while the output folder is locked."""
    check_output(out_dir, overwrite)  # again, under the lock: another evaluation may have finished meanwhile
    table = parse_methods(methods)
    pareto = sorted({int(n) for n in pareto_steps})
    for n in pareto:
        parse_method(f"fixed:{n}")
    reward_names = [r.strip() for r in (rewards.split(",") if isinstance(rewards, str) else rewards) if r.strip()]
    if int(seeds) < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    family: dict[int, Method] = {}
    if tables:
        loaded = load_family(tables)
        if str(tables).startswith("shift:"):
            loaded = {n: t for n, t in loaded.items() if n in pareto}
        family = {n: Method.sigmas(t) for n, t in loaded.items()}
    prompt_list = load_prompts(prompts)
    if limit:
        prompt_list = prompt_list[:int(limit)]
    tpm_file = locate_tpm(checkpoint)
    reward_models = build_eval_rewards(reward_names, reward_options_for(tpm_file))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # the earlier evaluation's files (--overwrite): none may survive as if new
        (out_dir / name).unlink(missing_ok=True)

    pipe = TPDMPipeline.from_pretrained(backbone, tpm=tpm_file, device=device, batch_size=batch_size,
                                        inference=inference)
    pipe.check_prompts(prompt_list)  # a toy backbone draws only its world's prompts
    items = [(i, k) for i in range(len(prompt_list)) for k in range(int(seeds))]
    grid_idx = [j for j, (i, k) in enumerate(items) if k == 0][:max(int(grid_prompts), 0)]
    runner = _MethodRunner(pipe, [prompt_list[i] for i, _ in items], [noise_seed(i, k) for i, k in items],
                           reward_models, grid_idx)
    runner.run_all(table, pareto, family, max(int(timing_repeats), 1), progress)
    shown = _shown_methods(table, runner.mean_runs)
    report = _report(runner, shown, pareto, family, items, prompt_list) | {
        "checkpoint": str(checkpoint), "tpm_file": str(tpm_file), "prompts": str(prompts),
        "seeds_per_prompt": int(seeds), "tables": str(tables) if tables else None}
    report = {k: report[k] for k in REPORT_KEYS}  # results.json keeps its order of keys
    _write_outputs(out_dir, report, runner.results, shown, items, prompt_list, schedule_prompts, grid_idx)
    return report


#: the keys of results.json, in their order
REPORT_KEYS = ("checkpoint", "tpm_file", "backbone", "device", "prompts", "num_prompts", "seeds_per_prompt",
               "num_images", "resolution", "guidance_scale", "reference", "rewards", "metrics", "tpm_settings",
               "timing_repeats", "threads", "created", "methods", "pareto", "tables", "tables_curve",
               "tpm_mean_tables", "comparisons", "complexity", "per_image")


class _MethodRunner:
    """Runs every method of an evaluation on the same prompts and noises, scores it against the reference and
    keeps its :class:`MethodResult`."""

    def __init__(self, pipe: TPDMPipeline, prompts: list[str], seeds: list[int], reward_models: dict,
                 grid_idx: list[int]) -> None:
        self.pipe, self.sampler, self.bb = pipe, pipe.sampler(), pipe.backbone
        self.prompts, self.seeds = prompts, seeds
        self.reward_models, self.grid_idx = reward_models, grid_idx
        self.results: dict[str, MethodResult] = {}
        self.mean_tables: dict[str, torch.Tensor] = {}  # the tpm-mean:N tables
        self.mean_runs: list[Method] = []
        self.ref_images = None
        self.repeats = 1
        self.bar = None

    def run_all(self, table: list[Method], pareto: list[int], family: dict[int, Method], repeats: int,
                progress: bool) -> None:
        """The reference first, then the TPM, the asked methods, the ``fixed:N`` curve, the table family, the
        ``tpm-mean`` tables; then ``repeats - 1`` round-robin re-timings."""
        wants_mean = [m for m in table if m.kind == "tpm-mean"]
        tpm = Method("tpm")
        runs: list[Method] = [REFERENCE] + ([tpm] if wants_mean or tpm in table else [])
        runs += [m for m in table if m not in runs and m.kind != "tpm-mean"]
        runs += [m for m in (Method("fixed", steps=n) for n in pareto) if m not in runs]
        runs += [m for m in family.values() if m not in runs]
        self.repeats = repeats
        warm = list({m.kind: m for m in runs}.values())
        n_img = len(self.prompts)
        # the bar starts before the untimed warm-up (it took half a minute at 0% on the toy world): one unit for
        # encoding the prompts and one per warmed-up method kind, then one per image
        self.bar = tqdm(total=(len(runs) + 2 * len(wants_mean)) * n_img * repeats + 1 + len(warm), desc="eval",
                        unit="img", disable=not progress, dynamic_ncols=True)
        self._warm_up(warm)
        try:
            for m in runs:
                self.run_one(m)
            for m in wants_mean:  # the TPM's own mean schedule as one fixed table, at equal NFE with the TPM
                self._run_mean(m)
            for _ in range(repeats - 1):  # round-robin re-timing: a burst of load hits one pass, not one method
                self._retime(runs + self.mean_runs)
        finally:
            self.bar.close()

    def _warm_up(self, warm: list[Method]) -> None:
        """Untimed: encode every prompt once (cached) and warm every code path up on one image."""
        bar, bb = self.bar, self.bb
        bar.set_postfix_str(f"encoding {len(set(self.prompts))} prompts")
        bb.encode_prompts(sorted(set(self.prompts)) + [bb.negative_prompt])
        bar.update(1)
        for m in warm:
            bar.set_postfix_str(f"warm-up {m.kind}")
            self.sampler.run(Method("fixed", steps=2) if m.kind in ("fixed", "sigmas") else m, self.prompts[:1],
                             self.seeds[:1])
            bar.update(1)

    def run_one(self, m: Method, table: torch.Tensor | None = None) -> None:
        self.bar.set_postfix_str(m.name)
        out: SampleOutput = self.sampler.run(m, self.prompts, self.seeds, progress=self.bar.update, table=table)
        if self.ref_images is None:
            self.ref_images = out.images
        ref_images = self.ref_images
        scores = {}
        for name, model in self.reward_models.items():
            s, extra = model.score_details(out.images, self.prompts, ref_images if model.needs_reference else None)
            scores[name] = s
            scores.update({f"{name}_{k}": v for k, v in extra.items()})
        self.results[m.name] = MethodResult(
            method=m.name, nfe=out.nfe, steps=out.steps, seconds=out.seconds, cpu_seconds=out.cpu_seconds,
            psnr=psnr(out.images, ref_images), ssim=ssim_per_image(out.images, ref_images), rewards=scores,
            sigmas=out.sigmas, called=out.called, grid_images=out.images[self.grid_idx].clone(),
            is_reference=m == REFERENCE)

    def _run_mean(self, m: Method) -> None:
        """``tpm-mean[:N]``: the TPM's schedules averaged into one N-step table (without N: the two integers around
        the TPM's mean NFE)."""
        mean_nfe = float(self.results["tpm"].nfe.double().mean())
        ns = [m.steps] if m.steps else sorted({max(1, math.floor(mean_nfe)), max(1, math.ceil(mean_nfe))})
        for n in ns:
            mm = Method("tpm-mean", steps=n)
            if mm.name not in self.results:
                self.mean_tables[mm.name] = mean_schedule(self.results["tpm"].sigmas, n)
                self.run_one(mm, self.mean_tables[mm.name])
                self.mean_runs.append(mm)

    def _retime(self, methods: list[Method]) -> None:
        for m in methods:
            self.bar.set_postfix_str(f"{m.name} (timing)")
            again = self.sampler.run(m, self.prompts, self.seeds, progress=self.bar.update,
                                     table=self.mean_tables.get(m.name))
            r = self.results[m.name]
            r.seconds, r.cpu_seconds = min(r.seconds, again.seconds), min(r.cpu_seconds, again.cpu_seconds)


def _shown_methods(table: list[Method], mean_runs: list[Method]) -> list[str]:
    """The methods the report shows, in the order asked (``tpm-mean`` without N: its runs), and the reference."""
    shown = []
    for m in table:
        names = [x.name for x in mean_runs] if m.kind == "tpm-mean" and not m.steps else [m.name]
        shown += [n for n in names if n not in shown]
    if REFERENCE.name not in shown:
        shown.append(REFERENCE.name)
    return shown


def _report(runner: _MethodRunner, shown: list[str], pareto: list[int], family: dict[int, Method],
            items: list[tuple[int, int]], prompt_list: list[str]) -> dict:
    """What results.json holds (less the run's own arguments, which the caller adds)."""
    results, bb, n_img = runner.results, runner.bb, len(items)
    ref = results[REFERENCE.name]
    per_image = []
    for j, (i, k) in enumerate(items):
        rec = {"prompt_index": i, "k": k, "prompt": prompt_list[i], "seed": runner.seeds[j],
               "nfe": {name: int(results[name].nfe[j]) for name in shown},
               "psnr": {name: round(float(results[name].psnr[j]), 4) for name in shown},
               "ssim": {name: round(float(results[name].ssim[j]), 5) for name in shown},
               "rewards": {name: {r: round(float(v[j]), 5) for r, v in results[name].rewards.items()}
                           for name in shown}}
        sch = {name: [round(float(s), 5) for s in results[name].sigmas[j]] for name in shown
               if parse_method(name).uses_tpm}
        if sch:
            rec["sigmas"] = sch
        per_image.append(rec)
    return {
        "backbone": bb.name, "device": str(bb.device), "num_prompts": len(prompt_list), "num_images": n_img,
        "resolution": runner.sampler.height, "guidance_scale": bb.guidance_scale, "reference": REFERENCE.name,
        "rewards": list(runner.reward_models), "metrics": list(results[REFERENCE.name].rewards),
        "tpm_settings": runner.pipe.settings, "timing_repeats": runner.repeats, "threads": torch.get_num_threads(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "methods": [results[name].row(ref, n_img) for name in shown],
        "pareto": [results[f"fixed:{n}"].row(ref, n_img) for n in pareto],
        "tables_curve": [results[m.name].row(ref, n_img) | {"nfe_table": n} for n, m in family.items()],
        "tpm_mean_tables": {k: [round(float(x), 5) for x in v] for k, v in runner.mean_tables.items()},
        "comparisons": compare_tpm(results, {n: m.name for n, m in family.items()}),
        "complexity": complexity_report(results, runner.prompts, shown),
        "per_image": per_image,
    }


def _write_outputs(out_dir: Path, report: dict, results: dict[str, MethodResult], shown: list[str],
                   items: list[tuple[int, int]], prompt_list: list[str], schedule_prompts, grid_idx: list[int]) -> None:
    """results.json, results.md and the plots; the COMPLETE marker last."""
    (out_dir / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "results.md").write_text(results_markdown(report))
    plot_schedules(out_dir / "schedules.png", results, shown, items, prompt_list, schedule_prompts)
    plot_nfe_hist(out_dir / "nfe_hist.png", results, shown)
    plot_pareto(out_dir / "pareto.png", report, shown)
    plot_grid(out_dir / "grid.png", results, shown, [prompt_list[items[j][0]] for j in grid_idx], grid_idx)
    if report["complexity"] is not None:
        plot_complexity(out_dir / "steps_vs_complexity.png", report)
    (out_dir / COMPLETE).write_text(f"evaluation complete {report['created']}\n")  # last: marks a whole folder


def compare_tpm(results: dict[str, MethodResult], tables: dict[int, str] | None = None) -> dict | None:
    """Every score of the TPM against the fixed:N curve, the tpm-mean tables and the hand-made table family
    (``tables``: NFE -> method name) at the TPM's mean NFE."""
    if "tpm" not in results:
        return None
    tpm = results["tpm"]
    m = float(tpm.nfe.double().mean())
    families: dict[str, dict[int, MethodResult]] = {"fixed": {}, "tpm-mean": {}}
    for name, r in results.items():
        head, _, n = name.partition(":")
        if head in families and n.isdigit():
            families[head][int(n)] = r
    if tables:
        families["tables"] = {n: results[name] for n, name in tables.items()}
    out = {}
    for metric in tpm.rewards:
        out[metric] = {fam: at_equal_nfe(tpm.rewards[metric], m, {n: r.rewards[metric] for n, r in members.items()})
                       for fam, members in families.items() if members}
    return out


def complexity_report(results: dict[str, MethodResult], prompts: list[str], shown: list[str]) -> dict | None:
    """NFE and scores per complexity level (objects, groups, unplaced objects: the places world's ambiguity
    class) and Spearman's rho of the TPM's NFE with each (toy-world prompts only)."""
    levels = complexity_of(prompts)
    if levels is None:
        return None
    objects, groups, unplaced = levels
    # no prompt places an object (the reading-order world): "unplaced" is "objects" again, not a second axis
    places = bool((unplaced != objects).any())
    out = {"nfe_by_objects": {n: by_level(results[n].nfe, objects) for n in shown},
           "nfe_by_groups": {n: by_level(results[n].nfe, groups) for n in shown},
           "scores_by_objects": {n: {r: by_level(v, objects) for r, v in results[n].rewards.items()} for n in shown}}
    if places:
        out["nfe_by_unplaced"] = {n: by_level(results[n].nfe, unplaced) for n in shown}
        out["scores_by_unplaced"] = {n: {r: by_level(v, unplaced) for r, v in results[n].rewards.items()}
                                     for n in shown}
    if "tpm" in results:
        out["spearman_tpm_nfe"] = {"objects": rank_correlation(objects, results["tpm"].nfe),
                                   "groups": rank_correlation(groups, results["tpm"].nfe)}
        if places:
            out["spearman_tpm_nfe"]["unplaced"] = rank_correlation(unplaced, results["tpm"].nfe)
    return out
