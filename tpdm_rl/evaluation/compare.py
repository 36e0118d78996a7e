"""Honest comparisons: the TPM against a schedule family at equal mean NFE, and steps by prompt complexity.

At equal NFE: a family of fixed tables (``fixed:N``, ``tpm-mean:N``) is read at the TPM's mean NFE m
by linear interpolation between its two members around m, image by image (every method sampled the
same prompts from the same noise). The difference TPM - family is reported with its *paired*
standard error (the std of the per-image differences / sqrt(n)): the methods share the noise, so the
paired SE is the right yardstick, and it is smaller than combining two unpaired SEs.
"""

from __future__ import annotations

import math

import torch
from scipy.stats import spearmanr

from tpdm_rl.core.toyworld import PromptError, parse_prompt


def mean_se(x: torch.Tensor) -> dict[str, float]:
    """Mean and standard error of the mean (sample std / sqrt(n))."""
    x = x.double().reshape(-1)
    n = x.numel()
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": float(x.mean()) if n else float("nan"), "se": se}


def at_equal_nfe(target: torch.Tensor, target_nfe: float, family: dict[int, torch.Tensor]) -> dict | None:
    """``target`` (per-image scores) against ``family`` ({steps: per-image scores}) read at ``target_nfe``.

    None when the family does not bracket ``target_nfe`` (no interpolation outside its range)."""
    steps = sorted(family)
    lo = max((n for n in steps if n <= target_nfe), default=None)
    hi = min((n for n in steps if n >= target_nfe), default=None)
    if lo is None or hi is None:
        return None
    w = 1.0 if hi == lo else (hi - target_nfe) / (hi - lo)
    interp = w * family[lo].double() + (1.0 - w) * family[hi].double()
    diff = target.double() - interp
    d = mean_se(diff)
    return {"nfe": target_nfe, "between": [lo, hi], "weight_low": w, "target": mean_se(target),
            "family": mean_se(interp), "difference": d,
            "z": d["mean"] / d["se"] if d["se"] > 0 else _sign_inf(d["mean"])}


def _sign_inf(x: float) -> float:
    """z of a difference with zero spread: +-inf, or 0 when the two methods gave identical scores."""
    return math.inf if x > 0 else (-math.inf if x < 0 else 0.0)


def complexity_of(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(objects, groups, unplaced objects) per prompt when every prompt is a toy-world prompt, else None."""
    try:
        parsed = [parse_prompt(p) for p in prompts]
    except PromptError:
        return None
    return (torch.tensor([p.num_objects for p in parsed]), torch.tensor([p.num_groups for p in parsed]),
            torch.tensor([p.num_unplaced for p in parsed]))


def by_level(values: torch.Tensor, levels: torch.Tensor) -> dict[str, dict[str, float]]:
    """Mean and SE of ``values`` per complexity level."""
    return {str(int(k)): mean_se(values[levels == k]) | {"n": int((levels == k).sum())}
            for k in torch.unique(levels).tolist()}


def rank_correlation(levels: torch.Tensor, values: torch.Tensor) -> dict[str, float]:
    """Spearman's rho (with its p-value) between complexity and a per-image quantity such as NFE."""
    if torch.unique(values).numel() < 2 or torch.unique(levels).numel() < 2:
        return {"rho": 0.0, "p": 1.0}
    r = spearmanr(levels.numpy(), values.double().numpy())
    return {"rho": float(r.statistic), "p": float(r.pvalue)}
