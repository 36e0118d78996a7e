"""Sampling methods by name: what ``tpdm-rl eval --methods`` and the inference pipeline accept.

``rollout/sampler.py`` (:class:`~rollout.sampler.MethodSampler`) runs them. Method strings (``parse_method``):

``fixed:N``
    The backbone scheduler's own (shifted) sigma table with N steps, run through the
    :class:`~rollout.engine.SamplingEngine` (identical to ``StableDiffusion3Pipeline`` with
    ``num_inference_steps=N`` for the same seed).
``adaptive:THRESHOLD[:MAX_SKIP]`` (defaults 0.01 and 4)
    AdaptiveDiffusion (Ye et al., NeurIPS 2024) on top of the default ``base_steps``-step table,
    with the authors' decision rule (:class:`~rollout.adaptive.OfficialSkipRule`: steps 0-3 always
    call, the third-order test on d_k, d_{k-1}, d_{k-2}, their consecutive-skip cap). At every step
    each sample decides on its own, exactly as it would in a batch of one, whether to call the
    transformer or to reuse its previous velocity. The transformer runs only on the samples that
    need a call at this step (the batch is indexed with a mask), so NFE differs per sample.
``adaptive-legacy:THRESHOLD[:MAX_SKIP]`` (same defaults)
    The same sampler with this project's earlier rule (:class:`~rollout.adaptive.LegacySkipRule`:
    may skip from step 3 on, every run of skips capped at MAX_SKIP), kept for comparison.
``tpm``
    The trained TPM's schedule with the Beta mode (``TPMSchedule(mode="mode")`` in the engine).
``tpm+adaptive:THRESHOLD[:MAX_SKIP]``
    The TPM's schedule with the same skipping on top. On a skipped step the sample reuses its
    previous velocity AND its previous TPM ratio decision (sigma_next = r_prev * sigma): the TPM
    reads the transformer's features, which do not exist on a skipped step.
``tpm+adaptive-legacy:THRESHOLD[:MAX_SKIP]``
    The same with the legacy rule.
``sigmas:S0,S1,...,0``
    An explicit sigma table (strictly decreasing, in [0, 1], ending at 0; NFE = its length - 1), run
    through the engine like ``fixed:N``. In a comma-separated method list the numbers after ``sigmas:``
    belong to the table up to the next token that is not a number (``tpm,sigmas:1,0.5,0,fixed:4`` is three
    methods). ``tpdm_rl.core.tables`` has the hand-made families (``eval --tables``).
``tpm-mean[:N]``
    The control for "adapts to the prompt" vs "learned a better global schedule": the TPM's own
    schedules on the evaluated prompts, averaged over prompts (``schedules.mean_schedule``) and
    resampled to one fixed N-step table that every prompt then uses. Without N, ``tpm-eval`` runs it
    at the two integers around the TPM's mean NFE, so it can be compared at equal NFE.

MAX_SKIP = 0 turns skipping off for either rule.

Accounting is the engine's (see ``rollout/engine.py``): the terminal step goes to sigma 0 with the
velocity at hand, so a run of S steps makes S transformer calls, minus the skipped ones. NFE counts
transformer calls per sample, CFG's two branches counted once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpdm_rl.core.tables import TableError, check_table

METHOD_FORMS = ("fixed:N, sigmas:S0,...,0, adaptive:THRESHOLD[:MAX_SKIP], adaptive-legacy:THRESHOLD[:MAX_SKIP], tpm, "
                "tpm+adaptive:THRESHOLD[:MAX_SKIP], tpm+adaptive-legacy:THRESHOLD[:MAX_SKIP], tpm-mean[:N]")
SKIPPING_KINDS = ("adaptive", "adaptive-legacy", "tpm+adaptive", "tpm+adaptive-legacy")
DEFAULT_THRESHOLD = 0.01
DEFAULT_MAX_SKIP = 4

class MethodError(ValueError):
    """A method string could not be parsed (one-line message naming it and the expected forms)."""


@dataclass(frozen=True)
class Method:
    """A parsed sampling method."""

    kind: str  # "fixed" | "sigmas" | "tpm" | "tpm-mean" | one of SKIPPING_KINDS
    steps: int = 0  # fixed:N, tpm-mean:N (0: around the TPM's mean NFE), sigmas: its NFE
    threshold: float = DEFAULT_THRESHOLD
    max_skip: int = DEFAULT_MAX_SKIP
    table: tuple[float, ...] = ()  # sigmas: the table, ending with 0

    @classmethod
    def sigmas(cls, values: list[float] | tuple[float, ...]) -> Method:
        """An explicit sigma table as a method (validated: decreasing, in [0, 1], ending at 0)."""
        try:
            table = check_table(tuple(values))
        except TableError as exc:
            raise MethodError(f"bad method sigmas: {exc}") from None
        return cls("sigmas", steps=len(table) - 1, table=table)

    @property
    def name(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.steps}"
        if self.kind == "sigmas":
            return "sigmas:" + ",".join(f"{v:.4g}" for v in self.table)
        if self.kind == "tpm":
            return "tpm"
        if self.kind == "tpm-mean":
            return f"tpm-mean:{self.steps}" if self.steps else "tpm-mean"
        tail = f"{self.threshold:g}" + (f":{self.max_skip}" if self.max_skip != DEFAULT_MAX_SKIP else "")
        return f"{self.kind}:{tail}"

    @property
    def uses_tpm(self) -> bool:
        """The TPM decides this method's steps (``tpm-mean`` replays a fixed table instead)."""
        return self.kind.startswith("tpm") and self.kind != "tpm-mean"

    @property
    def skips(self) -> bool:
        return self.kind in SKIPPING_KINDS

    @property
    def legacy(self) -> bool:
        """True for the ``*-legacy`` kinds (the earlier skip rule)."""
        return self.kind.endswith("-legacy")

    def __str__(self) -> str:
        return self.name


def _bad(text: str, why: str) -> MethodError:
    return MethodError(f"bad method {text!r} ({why}); expected one of {METHOD_FORMS}, e.g. "
                       "tpm,fixed:28,fixed:14,adaptive:0.01")


def parse_method(text: str) -> Method:
    """``fixed:28`` / ``adaptive[-legacy]:0.01[:4]`` / ``tpm`` / ``tpm+adaptive[-legacy]:0.01[:4]`` -> Method."""
    raw = str(text)
    s = raw.strip().lower().replace(" ", "")
    if not s:
        raise _bad(raw, "empty")
    head, _, rest = s.partition(":")
    if head == "sigmas":
        values = []
        for tok in (rest.split(",") if rest else []):
            try:
                values.append(float(tok))
            except ValueError:
                raise MethodError(f"bad method sigmas: value {tok!r} of {raw!r} is not a number; expected "
                                  "decreasing sigmas in [0, 1] ending at 0, e.g. sigmas:1,0.9,0.5,0") from None
        return Method.sigmas(values if rest else [])
    if head == "tpm":
        if rest:
            raise _bad(raw, "'tpm' takes no argument")
        return Method("tpm")
    if head == "tpm-mean":
        if rest and not rest.isdigit():
            raise _bad(raw, "tpm-mean takes an optional integer step count N >= 1")
        n = int(rest) if rest else 0
        if rest and not 1 <= n <= 1000:
            raise _bad(raw, "N must be in 1..1000")
        return Method("tpm-mean", steps=n)
    if head == "fixed":
        if not rest.isdigit():
            raise _bad(raw, "fixed needs an integer step count N >= 1")
        n = int(rest)
        if not 1 <= n <= 1000:
            raise _bad(raw, "N must be in 1..1000")
        return Method("fixed", steps=n)
    if head in SKIPPING_KINDS:
        parts = rest.split(":") if rest else []
        if len(parts) > 2:
            raise _bad(raw, "too many ':' fields")
        try:
            thr = float(parts[0]) if parts else DEFAULT_THRESHOLD
        except ValueError:
            raise _bad(raw, f"threshold {parts[0]!r} is not a number") from None
        if not math.isfinite(thr) or thr < 0:
            raise _bad(raw, "threshold must be a finite number >= 0")
        if len(parts) == 2:
            if not parts[1].isdigit():
                raise _bad(raw, f"MAX_SKIP {parts[1]!r} is not an integer >= 0")
            ms = int(parts[1])
        else:
            ms = DEFAULT_MAX_SKIP
        return Method(head, threshold=thr, max_skip=ms)
    raise _bad(raw, f"unknown method {head!r}")


def parse_methods(text: str | list[str]) -> list[Method]:
    """A comma-separated list (or a list of strings) of methods, duplicates dropped, order kept."""
    items = _join_tables(text.split(",")) if isinstance(text, str) else list(text)
    out: list[Method] = []
    for item in items:
        m = parse_method(item)
        if m not in out:
            out.append(m)
    if not out:
        raise _bad(str(text), "no method given")
    return out


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _join_tables(tokens: list[str]) -> list[str]:
    """Re-join ``sigmas:`` tables split on commas: the numbers after ``sigmas:`` belong to the table."""
    out: list[str] = []
    in_table = False
    for tok in tokens:
        t = tok.strip()
        if in_table and _is_number(t):
            out[-1] += "," + t
            continue
        in_table = t.lower().startswith("sigmas:")
        out.append(tok)
    return out
