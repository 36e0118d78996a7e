"""``results.md``: the human-readable tables of an evaluation's ``results.json``."""

from __future__ import annotations

from tpdm_rl.rollout.baselines import parse_method


def _fmt(ms: dict, digits: int = 2) -> str:
    return f"{ms['mean']:.{digits}f} ± {ms['se']:.2g}"


def results_markdown(report: dict) -> str:
    """The human-readable table of ``results.json``."""
    extra = [r for r in report["rewards"] if r != "fidelity"]
    ref = report["reference"]
    head = ["method", "NFE mean [min-max]", f"PSNR vs {ref} (dB)", f"SSIM vs {ref}"] + extra + [
        "s / image", "CPU s / image", "speed-up (time)", "speed-up (NFE)"]
    lines = [
        "# TPDM evaluation",
        "",
        f"{report['num_images']} images ({report['num_prompts']} prompts from `{report['prompts']}` x "
        f"{report['seeds_per_prompt']} seed(s)), {report['resolution']} px, CFG {report['guidance_scale']}, "
        f"device {report['device']}; TPM `{report['tpm_file']}`, backbone `{report['backbone']}`.",
        f"Every method starts from the same initial noise per image; PSNR/SSIM are against the `{ref}` image of the "
        "same noise (PSNR = the `fidelity` reward). Values are mean ± standard error. NFE = transformer calls "
        "per image (CFG counted once); speed-ups are relative to the reference. s / image is wall clock of sampling "
        f"+ decoding (fastest of {report.get('timing_repeats', 1)} round-robin pass(es)); CPU s / image is this "
        "process's CPU time over the same span (all threads; less sensitive to other load on the machine).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in report["methods"]:
        nfe = f"{r['nfe']['mean']:.2f} [{r['nfe']['min']}-{r['nfe']['max']}]"
        if r["is_reference"]:
            cells = [f"{r['method']} (reference)", nfe, "ref", "ref"]
        else:
            cells = [r["method"], nfe, _fmt(r["psnr"]), _fmt(r["ssim"], 4)]
        cells += [_fmt(r["rewards"][e], 4) for e in extra]
        cells += [f"{r['seconds_per_image']:.4f}", f"{r['cpu_seconds_per_image']:.4f}", f"{r['speedup_time']:.2f}x",
                  f"{r['speedup_nfe']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Fixed-step curve (pareto.png)", "",
              "| steps | " + " | ".join(["PSNR (dB)", "SSIM"] + extra + ["s / image"]) + " |",
              "|" + "|".join("---" for _ in range(4 + len(extra))) + "|"]
    for r in report["pareto"]:
        ps = "ref" if r["is_reference"] else f"{r['psnr']['mean']:.2f}"
        cells = [str(r["nfe"]["min"]), ps, f"{r['ssim']['mean']:.4f}"]
        cells += [f"{r['rewards'][e]['mean']:.4f}" for e in extra] + [f"{r['seconds_per_image']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for r in report["methods"]:
        if parse_method(r["method"]).skips or parse_method(r["method"]).uses_tpm:
            notes.append(f"- `{r['method']}`: {r['nfe']['distinct']} distinct NFE values over the images "
                         f"({r['nfe']['min']}..{r['nfe']['max']}, std {r['nfe']['std']:.2f}); steps "
                         f"{r['steps']['min']}..{r['steps']['max']}.")
    if notes:
        lines += ["", "## Per-image variation", ""] + notes
    return "\n".join(lines) + "\n"
