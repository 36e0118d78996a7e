"""Baseline samplers measured side by side with the TPM: fixed schedules and AdaptiveDiffusion.

Method strings (``parse_method``):

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
    methods). ``rollout.tables`` has the hand-made families (``eval --tables``).
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .adaptive import latent_change, legacy_skip_mask, make_skip_rule
from .backbone import Backbone
from .engine import SamplingEngine
from .flow import euler_step, terminal
from .rng import derive_key, keyed_normal_noise
from .schedules import INFERENCE_MODES, FixedSchedule, TPMSchedule
from .tables import TableError, check_table

INFERENCE_STREAM = 0x1F3  # key of the Beta draws of ``policy.inference: sample`` (per image: its noise seed)

METHOD_FORMS = ("fixed:N, sigmas:S0,...,0, adaptive:THRESHOLD[:MAX_SKIP], adaptive-legacy:THRESHOLD[:MAX_SKIP], tpm, "
                "tpm+adaptive:THRESHOLD[:MAX_SKIP], tpm+adaptive-legacy:THRESHOLD[:MAX_SKIP], tpm-mean[:N]")
SKIPPING_KINDS = ("adaptive", "adaptive-legacy", "tpm+adaptive", "tpm+adaptive-legacy")
DEFAULT_THRESHOLD = 0.01
DEFAULT_MAX_SKIP = 4

#: the legacy rule under its old name (``adaptive:`` now uses :class:`~rollout.adaptive.OfficialSkipRule`)
adaptive_skip_mask = legacy_skip_mask


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


# ---------------------------------------------------------------------------- results
@dataclass
class SampleOutput:
    """One method's images and per-sample schedule bookkeeping."""

    method: str
    images: torch.Tensor  # [N, 3, H, W] in [0, 1] (empty when not decoded)
    latents: torch.Tensor  # [N, C, h, w] final latents
    nfe: torch.Tensor  # [N] int64 transformer calls (CFG counted once)
    steps: torch.Tensor  # [N] int64 denoising steps (>= nfe; = nfe without skipping)
    sigmas: list[torch.Tensor]  # per sample: sigma at every step, then the final 0
    called: list[torch.Tensor]  # per sample: bool per step, True = transformer called, False = reused
    seconds: float = 0.0  # wall clock of sampling + decoding
    cpu_seconds: float = 0.0  # CPU time of this process over the same span (all threads)
    extra: dict = field(default_factory=dict)


class BaselineSampler:
    """Runs any :class:`Method` on a backbone (and optionally a TPM) for a list of prompts + seeds.

    ``policy`` / ``sigma_min`` / ``max_steps`` / ``sigma_max`` / ``feature_dtype`` configure the TPM
    methods (they come from the TPM file's inference metadata); ``base_steps`` is the table that
    ``adaptive`` skips on.
    """

    def __init__(self, backbone: Backbone, height: int, width: int, batch_size: int = 16, base_steps: int = 28,
                 policy: torch.nn.Module | None = None, sigma_min: float = 0.01, max_steps: int = 28,
                 sigma_max: float = 1.0, feature_dtype: torch.dtype = torch.float32, decode_batch_size: int = 16,
                 continuous: bool = True, inference: str = "mode") -> None:
        if inference not in INFERENCE_MODES:
            raise MethodError(f"TPM inference must be one of {INFERENCE_MODES}, got {inference!r}")
        self.inference = inference
        self.backbone = backbone
        self.height, self.width = int(height), int(width)
        self.latent_shape = backbone.latent_shape(self.height, self.width)
        self.batch_size = int(batch_size)
        self.base_steps = int(base_steps)
        self.policy = policy
        self.sigma_min = float(sigma_min)
        self.max_steps = int(max_steps)
        self.sigma_max = float(sigma_max)
        self.feature_dtype = feature_dtype
        self.decode_batch_size = int(decode_batch_size)
        self.engine = SamplingEngine(backbone, self.height, self.width, batch_size=self.batch_size,
                                     max_steps=self.max_steps, sigma_max=self.sigma_max, continuous=continuous,
                                     record_features=False, feature_dtype=feature_dtype,
                                     decode_batch_size=self.decode_batch_size)
        self.stats = {"backbone_calls": 0}

    def _tpm_schedule(self) -> TPMSchedule:
        if self.policy is None:
            raise MethodError("methods 'tpm' and 'tpm+adaptive[-legacy]' need a trained TPM (pass --checkpoint)")
        return TPMSchedule(self.policy, self.sigma_min, mode=self.inference, feature_dtype=self.feature_dtype)

    @staticmethod
    def _sample_keys(seeds: list[int]) -> torch.Tensor:
        """Keys of the TPM's Beta draws (``inference: sample``): one stream per image, keyed by its noise seed, so
        an image's schedule does not depend on its batch; mode and mean draw nothing."""
        return torch.tensor([derive_key(INFERENCE_STREAM, int(s)) for s in seeds], dtype=torch.int64)

    def run(self, method: Method | str, prompts: list[str], noise_seeds: list[int], decode: bool = True,
            progress: Callable[[int], None] | None = None, table: torch.Tensor | None = None) -> SampleOutput:
        """Sample every (prompt, noise seed) with ``method``; ``progress(k)`` is told of k finished images.

        ``table``: the sigma table of ``tpm-mean:N`` (N + 1 values ending with 0)."""
        m = parse_method(method) if isinstance(method, str) else method
        if len(prompts) != len(noise_seeds):
            raise ValueError(f"need one noise seed per prompt: {len(prompts)} prompts, {len(noise_seeds)} seeds")
        if m.kind == "tpm-mean" and (table is None or table.numel() < 2):
            raise MethodError(f"method {m.name!r} needs the TPM's mean schedule as a sigma table (tpdm-rl eval "
                              "computes it from the tpm run)")
        parts: list[SampleOutput] = []
        # chunks keep the progress bar moving; within a chunk the engine batches continuously
        chunk = self.batch_size * 4 if not m.skips else self.batch_size
        t0, c0 = time.perf_counter(), time.process_time()
        for start in range(0, len(prompts), chunk):
            p, s = prompts[start:start + chunk], noise_seeds[start:start + chunk]
            if m.kind in ("fixed", "sigmas", "tpm", "tpm-mean"):
                parts.append(self._run_engine(m, p, s, decode, table))
            else:
                parts.append(self._run_skipping(m, p, s, decode))
            if progress is not None:
                progress(len(p))
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        out = SampleOutput(
            method=m.name,
            images=torch.cat([x.images for x in parts]) if decode and parts else torch.empty(0),
            latents=torch.cat([x.latents for x in parts]) if parts else torch.empty(0),
            nfe=torch.cat([x.nfe for x in parts]) if parts else torch.zeros(0, dtype=torch.int64),
            steps=torch.cat([x.steps for x in parts]) if parts else torch.zeros(0, dtype=torch.int64),
            sigmas=[s for x in parts for s in x.sigmas], called=[c for x in parts for c in x.called],
            seconds=seconds, cpu_seconds=cpu_seconds,
        )
        return out

    # ------------------------------------------------------------------ fixed and tpm: the engine
    def _run_engine(self, m: Method, prompts: list[str], seeds: list[int], decode: bool,
                    table: torch.Tensor | None = None) -> SampleOutput:
        eng = self.engine
        before = eng.stats["backbone_calls"]
        if m.kind == "fixed":
            tr = eng.run_fixed(prompts, seeds, m.steps, decode=decode)
        elif m.kind == "tpm-mean":
            tr = eng.run_table(prompts, seeds, table, decode=decode)
        elif m.kind == "sigmas":
            tr = eng.run_table(prompts, seeds, torch.tensor(m.table, dtype=torch.float32), decode=decode)
        else:
            tr = eng.run(prompts, seeds, self._sample_keys(seeds), self._tpm_schedule(), decode=decode, max_steps=self.max_steps)
        self.stats["backbone_calls"] += eng.stats["backbone_calls"] - before
        sigmas = [tr.sigmas_of(i) for i in range(tr.num_trajectories)]
        called = [torch.ones(int(n), dtype=torch.bool) for n in tr.steps.tolist()]
        return SampleOutput(m.name, tr.images, tr.latents, tr.steps.clone(), tr.steps.clone(), sigmas, called)

    # ------------------------------------------------------------------ adaptive skipping
    @torch.no_grad()
    def _run_skipping(self, m: Method, prompts: list[str], seeds: list[int], decode: bool,
                      threshold: float | None = None) -> SampleOutput:
        """One static batch; per step the transformer runs only on the samples that need a call."""
        bb = self.backbone
        dev = bb.device
        n = len(prompts)
        keys = self._sample_keys(seeds)
        thr = m.threshold if threshold is None else threshold
        if m.uses_tpm:
            sched = self._tpm_schedule()
            table = None
            max_steps, sigma_min, sigma0 = self.max_steps, self.sigma_min, self.sigma_max
        else:
            sched = None
            table = FixedSchedule(bb.default_sigmas(self.base_steps)).sigmas  # ends with 0
            max_steps, sigma_min, sigma0 = self.base_steps, 0.0, float(table[0])
        embeds, pooled = bb.encode_prompts(prompts)
        x = keyed_normal_noise(seeds, self.latent_shape, device=dev)
        v = torch.zeros_like(x)
        sigma = torch.full((n,), sigma0, dtype=torch.float32)
        ratio = torch.zeros(n, dtype=torch.float32)
        rule = make_skip_rule(m.legacy, thr, m.max_skip).init(n, dev)
        nfe = torch.zeros(n, dtype=torch.int64)
        steps = torch.zeros(n, dtype=torch.int64)
        active = torch.ones(n, dtype=torch.bool)
        sig_hist = torch.full((n, max_steps + 1), float("nan"))
        sig_hist[:, 0] = sigma0
        call_hist = torch.zeros((n, max_steps), dtype=torch.bool)
        final = torch.zeros((n, *self.latent_shape), dtype=torch.float32)
        for k in range(max_steps):
            if not bool(active.any()):
                break
            skip = rule.decide().cpu() & active
            call = active & ~skip
            idx = torch.nonzero(call).reshape(-1)
            if idx.numel():
                di = idx.to(dev)
                out = bb.step(x[di], sigma[idx], embeds[di], pooled[di], need_features=sched is not None)
                self.stats["backbone_calls"] += 1
                v[di] = out.velocity
                if sched is not None:
                    feats = out.features.to(self.feature_dtype)
                    prop = sched.propose(feats, out.temb, sigma[idx], torch.full((idx.numel(),), k), keys[idx])
                    ratio[idx] = prop.action.float().cpu()
            nfe += call.to(torch.int64)
            nxt = ratio * sigma if table is None else table[k + 1].expand(n)
            done, _, target = terminal(nxt, sigma_min, torch.full((n,), k + 1 >= max_steps))
            done &= active
            a_dev = active.to(dev)
            x_new = euler_step(x, v, sigma, target)
            rule.observe(latent_change(x_new, x), call, active)
            x = torch.where(a_dev.reshape(-1, 1, 1, 1), x_new, x)
            sig_hist[active, k + 1] = target[active]
            call_hist[:, k] = call
            sigma = torch.where(active, target, sigma)
            steps += active.to(torch.int64)
            if bool(done.any()):
                final[done] = x[done.to(dev)].float().cpu()
            active &= ~done
        sigmas = [sig_hist[i, :int(steps[i]) + 1].clone() for i in range(n)]
        called = [call_hist[i, :int(steps[i])].clone() for i in range(n)]
        images = bb.decode(final, self.decode_batch_size) if decode else torch.empty(0)
        return SampleOutput(m.name, images, final, nfe, steps, sigmas, called)
