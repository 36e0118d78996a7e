"""The sweep report: final metrics per trial, quality, the Pareto front, budget picks, markdown."""

from __future__ import annotations

from pathlib import Path

from tpdm_rl.core.files import read_json, write_json_atomic
from tpdm_rl.core.metrics_reader import FINAL_WINDOW, final_window, finite, read_metrics
from tpdm_rl.sweep.plan import DONE_FILE, FINISHED_STATES, PLAN_FILE, TRIAL_FILE, short_keys
from tpdm_rl.sweep.plot import plot_pareto


# ---------------------------------------------------------------------------------------------- report
def fmt(v, digits: int = 3) -> str:
    x = finite(v)
    return "-" if x is None else f"{x:.{digits}f}"


def collect_report(output: str | Path) -> dict:
    """Rebuild the report from ``DIR/sweep_plan.json`` and the trial folders."""
    out = Path(output).resolve()
    plan = read_json(out / PLAN_FILE)
    trials_root = out / "trials"
    if plan is None:
        if not trials_root.is_dir():
            raise FileNotFoundError(f"{out} holds no sweep ({PLAN_FILE} and trials/ missing)")
        infos = [read_json(d / TRIAL_FILE) for d in sorted(trials_root.iterdir()) if d.is_dir()]
        infos = [i for i in infos if i]
        plan = {"trials": [{"name": i["name"], "overrides": i.get("overrides", {})} for i in infos],
                "keys": list(dict.fromkeys(k for i in infos for k in i.get("overrides", {}))),
                "quality_weights": {}, "config": None, "set": []}
    weights: dict[str, float] = dict(plan.get("quality_weights") or {})
    rows, components = [], []
    for t in plan["trials"]:
        tdir = trials_root / t["name"]
        done = read_json(tdir / DONE_FILE)
        info = read_json(tdir / TRIAL_FILE) or {}
        records = read_metrics(tdir / "metrics.jsonl")
        if done:
            status, final, iters = done.get("status", "finished"), done.get("final") or {}, done.get("iterations")
        else:
            status = "error" if info.get("status") == "error" else ("incomplete" if records else "pending")
            final, iters = final_window(records), len(records)
        total_iters = ((info.get("config") or {}).get("train") or {}).get("iterations")
        comps = [k[len("reward/"):] for k in final if k.startswith("reward/")
                 and k not in ("reward/total", "reward/step_penalty")]
        for c in comps:
            if c not in components:
                components.append(c)
        row = {"name": t["name"], "overrides": t["overrides"], "status": status, "iterations": iters,
               "planned_iterations": total_iters, "steps/mean": finite(final.get("steps/mean"))}
        for c in comps:
            row[f"reward/{c}"] = finite(final.get(f"reward/{c}"))
        row["reward/total"] = finite(final.get("reward/total"))
        row["wall_s"] = finite((done or {}).get("wall_s", info.get("wall_s")))
        if info.get("error"):
            row["error"] = info["error"]
        rows.append(row)
    for c in components:
        weights.setdefault(c, 1.0)
    for row in rows:
        vals = [row.get(f"reward/{c}") for c in components]
        row["quality"] = (sum(weights[c] * v for c, v in zip(components, vals))
                          if vals and all(v is not None for v in vals) else None)
    panels = components + (["quality"] if len(components) > 1 else [])
    for row in rows:
        row["pareto"] = {}
    for p in panels:
        key = p if p == "quality" else f"reward/{p}"
        front = pareto_front([(r["steps/mean"], r.get(key)) for r in rows])
        for r, on in zip(rows, front):
            r["pareto"][p] = on
    return {
        "output": str(out), "config": plan.get("config"), "set": plan.get("set", []), "keys": plan.get("keys", []),
        "components": components, "quality_weights": weights,
        "quality_definition": "sum over reward components of (base-config weight x mean raw component reward, "
                              "last min(3, n) iterations); step penalty excluded",
        "final_window": FINAL_WINDOW, "trials": rows,
    }


def pareto_front(points: list[tuple[float | None, float | None]]) -> list[bool]:
    """True for points (steps, quality) that no other point beats: fewer-or-equal steps AND higher-or-equal
    quality, strictly better in one. Points with a missing coordinate are never on the front."""
    ok = [s is not None and q is not None for s, q in points]
    out = []
    for i, (s, q) in enumerate(points):
        if not ok[i]:
            out.append(False)
            continue
        dominated = any(ok[j] and j != i and points[j][0] <= s and points[j][1] >= q
                        and (points[j][0] < s or points[j][1] > q) for j in range(len(points)))
        out.append(not dominated)
    return out


def best_under_budget(report: dict, steps: float) -> dict | None:
    """The finished (or early-stopped) trial with the highest quality whose mean steps are <= ``steps``
    (ties: fewer steps). None when no trial fits."""
    fits = [r for r in report["trials"] if r["status"] in FINISHED_STATES and r.get("quality") is not None
            and r.get("steps/mean") is not None and r["steps/mean"] <= steps]
    if not fits:
        return None
    return max(fits, key=lambda r: (r["quality"], -r["steps/mean"]))


def budget_line(report: dict, steps: float) -> str:
    best = best_under_budget(report, steps)
    if best is None:
        done = [r["steps/mean"] for r in report["trials"] if r["status"] in FINISHED_STATES
                and r.get("steps/mean") is not None]
        fewest = f" (fewest mean steps of a finished trial: {min(done):.2f})" if done else ""
        return f"budget {steps:g} steps: no finished trial fits{fewest}"
    ov = ", ".join(f"{k}={v}" for k, v in best["overrides"].items())
    return (f"budget {steps:g} steps: best trial {best['name']} ({ov}): quality {best['quality']:.4f}, "
            f"steps/mean {best['steps/mean']:.2f}, reward/total {fmt(best.get('reward/total'), 4)}")


def report_table(report: dict) -> str:
    keys = report["keys"] or list(dict.fromkeys(k for r in report["trials"] for k in r["overrides"]))
    short = short_keys(keys)
    comps = report["components"]
    head = ["trial"] + [short[k] for k in keys] + ["status", "iters", "steps/mean"] + [f"reward/{c}" for c in comps] \
        + ["reward/total", "quality", "wall s", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["trials"]:
        pareto = ", ".join(p for p, on in r["pareto"].items() if on) or ""
        iters = "-" if r["iterations"] is None else str(r["iterations"])
        if r.get("planned_iterations"):
            iters += f"/{r['planned_iterations']}"
        cells = [f"`{r['name']}`"] + [str(r["overrides"].get(k, "")) for k in keys] + [
            r["status"], iters, fmt(r["steps/mean"], 2)] + [fmt(r.get(f"reward/{c}"), 3) for c in comps] + [
            fmt(r.get("reward/total"), 3), fmt(r.get("quality"), 3), fmt(r.get("wall_s"), 1), pareto]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(report: dict, budget: float | None = None) -> str:
    w = ", ".join(f"{c} x {report['quality_weights'][c]:g}" for c in report["components"])
    parts = [
        "# Sweep report", "",
        f"Base config: `{report.get('config') or '(built-in defaults)'}`"
        + (f" with `--set {' '.join(report['set'])}`" if report.get("set") else ""), "",
        f"Swept: {', '.join(f'`{k}`' for k in report['keys'])}. One row per trial; metrics are the mean of the "
        f"last min({report['final_window']}, n) iterations of its `metrics.jsonl`.", "",
        report_table(report), "",
        f"**quality** = {w or '-'} (the base config's weights for every trial; step penalty excluded), so "
        "trials that optimise different weights or step penalties are compared on one scale. **Pareto**: the "
        "panels (reward component, or quality) in which no other trial has fewer-or-equal mean steps and a "
        "higher-or-equal value. Plot: `sweep_pareto.png`.",
    ]
    if budget is not None:
        parts += ["", f"**Budget**: {budget_line(report, budget)}"]
    errors = [r for r in report["trials"] if r.get("error")]
    if errors:
        parts += ["", "Errors:"] + [f"- `{r['name']}`: {r['error']}" for r in errors]
    return "\n".join(parts) + "\n"


def write_report(output: str | Path, report: dict, budget: float | None = None) -> None:
    out = Path(output)
    data = dict(report)
    if budget is not None:
        best = best_under_budget(report, budget)
        data["budget"] = {"steps": budget, "best": best["name"] if best else None}
    write_json_atomic(out / "sweep.json", data)
    (out / "sweep.md").write_text(render_markdown(report, budget))
    plot_pareto(report, out / "sweep_pareto.png", budget)
