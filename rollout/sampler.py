"""Running a sampling method (``tpdm_rl/core/methods.py``) on a backbone, with or without a trained TPM.

:class:`MethodSampler` runs every method: ``fixed:N``, ``sigmas:``, ``tpm`` and ``tpm-mean`` through the
:class:`~rollout.engine.SamplingEngine` (the training rollout's own loop), and the skipping methods
(``adaptive*``, ``tpm+adaptive*``) through ``_run_skipping``, a second denoising loop kept on purpose (see there).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tpdm_rl.rollout.adaptive import latent_change, make_skip_rule
from tpdm_rl.rollout.backbone import Backbone
from tpdm_rl.rollout.engine import SamplingEngine
from tpdm_rl.rollout.flow import euler_step, terminal
from tpdm_rl.rollout.schedules import INFERENCE_MODES, FixedSchedule, TPMSchedule

from tpdm_rl.core.methods import Method, MethodError, parse_method
from tpdm_rl.core.rng import derive_key, keyed_normal_noise

INFERENCE_STREAM = 0x1F3  # key of the Beta draws of ``policy.inference: sample`` (per image: its noise seed)


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


class MethodSampler:
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
        # chunks keep the progress bar moving; within a chunk the engine batches continuously. A table every image
        # follows (fixed, sigmas, tpm-mean) finishes a whole batch at once, so larger chunks gain nothing there and
        # only held the bar still (the reference fixed:28 kept it at 0% for half a minute): one batch per chunk
        per_prompt = m.kind == "tpm" and not m.skips
        chunk = self.batch_size * 4 if per_prompt else self.batch_size
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
        """One static batch; per step the transformer runs only on the samples that need a call.

        A deliberate copy of the engine's denoising loop (``SamplingEngine``): skipping needs per-sample masked
        transformer calls and reused velocities, which the engine's continuous batching does not have. Two tests
        keep the copies in step: with MAX_SKIP 0, ``adaptive`` gives the ``fixed:28`` latents and ``tpm+adaptive``
        the ``tpm`` latents and sigmas (tests/test_eval.py, ``test_adaptive_sampler_skips_different_steps_per_prompt``
        and ``test_tpm_adaptive_without_skips_is_the_tpm``)."""
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
            table = FixedSchedule(bb.default_sigmas(self.base_steps, self.latent_shape[1:])).sigmas  # ends with 0
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
