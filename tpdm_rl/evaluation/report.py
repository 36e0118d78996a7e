"""``results.md``: the human-readable tables of an evaluation's ``results.json``."""

from __future__ import annotations

from tpdm_rl.core.methods import parse_method


def _fmt(ms: dict, digits: int = 2) -> str:
    return f"{ms['mean']:.{digits}f} ± {ms['se']:.2g}"


def results_markdown(report: dict) -> str:
    """The human-readable table of ``results.json``."""
    extra = [r for r in report.get("metrics", report["rewards"]) if r != "fidelity"]
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
    lines += comparison_lines(report) + complexity_lines(report)
    return "\n".join(lines) + "\n"


def comparison_lines(report: dict) -> list[str]:
    """The TPM against each schedule family at the TPM's mean NFE (paired differences)."""
    comp = report.get("comparisons")
    if not comp:
        return []
    out = ["", "## TPM vs fixed schedules at equal NFE", "",
           "Families: fixed = the backbone's own fixed:N tables; tpm-mean = the TPM's mean schedule as one table; "
           "tables = the hand-made table family given with --tables (one table per NFE, chosen beforehand on "
           "training-split prompts).", "",
           "Each family is read at the TPM's mean NFE by linear interpolation between its two members around it, "
           "image by image; the difference is TPM minus family with its paired standard error (same prompts, same "
           "noise), and z = difference / SE.", "",
           "| metric | family | between | TPM | family at equal NFE | TPM - family | z |", "|---|---|---|---|---|---|---|"]
    for metric, fams in comp.items():
        for fam, c in fams.items():
            if c is None:
                out.append(f"| {metric} | {fam} | (does not bracket the TPM's NFE) | | | | |")
                continue
            lo, hi = c["between"]
            out.append(f"| {metric} | {fam} | {lo}-{hi} steps | {_fmt(c['target'], 4)} | {_fmt(c['family'], 4)} | "
                       f"{c['difference']['mean']:+.4f} ± {c['difference']['se']:.2g} | {c['z']:+.1f} |")
    return out


def _level_tables(cx: dict, metrics: list[str], axis: str, label: str) -> list[str]:
    """Mean NFE, then each metric, per level of one complexity axis (``objects`` or ``unplaced``)."""
    nfe = cx.get(f"nfe_by_{axis}")
    if not nfe:
        return []
    methods = list(nfe)
    levels = sorted({k for lv in nfe.values() for k in lv}, key=int)
    head = "| method | " + " | ".join(f"{k} {label}" for k in levels) + " |"
    rule = "|" + "---|" * (len(levels) + 1)
    out = ["", f"NFE by number of {label}:", "", head, rule]
    for name in methods:
        lv = nfe[name]
        out.append(f"| {name} | " + " | ".join(_fmt(lv[k]) if k in lv else "" for k in levels) + " |")
    for metric in metrics:
        out += ["", f"{metric} by number of {label}:", "", head, rule]
        for name in methods:
            lv = cx.get(f"scores_by_{axis}", {}).get(name, {}).get(metric, {})
            out.append(f"| {name} | " + " | ".join(_fmt(lv[k], 3) if k in lv else "" for k in levels) + " |")
    return out


def complexity_lines(report: dict) -> list[str]:
    """Mean NFE and scores per number of objects and per number of unplaced objects (the places world's
    ambiguity class), and the TPM's rank correlation with each."""
    cx = report.get("complexity")
    if not cx:
        return []
    metrics = [m for m in report.get("metrics", []) if m != "fidelity"]
    out = ["", "## Steps by prompt complexity (steps_vs_complexity.png)"]
    out += _level_tables(cx, metrics, "objects", "object(s)")
    out += _level_tables(cx, metrics, "unplaced", "unplaced")
    if "spearman_tpm_nfe" in cx:
        sp = cx["spearman_tpm_nfe"]
        o, g = sp["objects"], sp["groups"]
        line = (f"Spearman rank correlation of the TPM's NFE with the number of objects: rho = {o['rho']:.3f} "
                f"(p = {o['p']:.2g}); with the number of groups: rho = {g['rho']:.3f} (p = {g['p']:.2g})")
        if "unplaced" in sp:
            u = sp["unplaced"]
            line += f"; with the number of unplaced objects: rho = {u['rho']:.3f} (p = {u['p']:.2g})"
        out += ["", line + "."]
    return out


def headline(report: dict) -> str:
    """A few lines for a terminal: each method's NFE and main scores, and the equal-NFE verdicts."""
    metrics = [m for m in report.get("metrics", []) if m != "fidelity"] or ["fidelity"]
    lines = [f"{'method':<16}{'NFE':>7}" + "".join(f"{m:>18}" for m in metrics)]
    for r in report["methods"]:
        cells = []
        for m in metrics:
            ms = r["rewards"].get(m)
            cells.append(f"{ms['mean']:>11.3f} ± {ms['se']:<4.2g}" if ms else f"{'':>18}")
        lines.append(f"{r['method']:<16}{r['nfe']['mean']:>7.2f}" + "".join(cells))
    for metric, fams in (report.get("comparisons") or {}).items():
        if metric not in metrics:
            continue
        for fam, c in fams.items():
            if c is not None:
                lines.append(f"tpm - {fam} at {c['nfe']:.2f} NFE, {metric}: {c['difference']['mean']:+.4f} ± "
                             f"{c['difference']['se']:.2g} (z {c['z']:+.1f})")
    cx = report.get("complexity")
    if cx and "spearman_tpm_nfe" in cx:
        lv = cx["nfe_by_objects"]["tpm"]
        lines.append("tpm NFE by objects: " + ", ".join(f"{k}: {v['mean']:.2f}" for k, v in lv.items())
                     + f"; Spearman rho {cx['spearman_tpm_nfe']['objects']['rho']:.3f}")
        if "unplaced" in cx["spearman_tpm_nfe"] and "nfe_by_unplaced" in cx:
            lu = cx["nfe_by_unplaced"]["tpm"]
            lines.append("tpm NFE by unplaced objects: " + ", ".join(f"{k}: {v['mean']:.2f}" for k, v in lu.items())
                         + f"; Spearman rho {cx['spearman_tpm_nfe']['unplaced']['rho']:.3f}")
    return "\n".join(lines)
