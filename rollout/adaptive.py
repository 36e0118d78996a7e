"""AdaptiveDiffusion's skip decision (Ye et al., NeurIPS 2024), vectorised over samples.

Notation: x_0 is the initial noise, x_k the latent after k denoising steps (the input of step k, 0-based),
and d_k = mean|x_k - x_{k-1}| over one sample's elements. A *skip* at step k reuses the previous velocity
instead of calling the transformer.

:class:`OfficialSkipRule` (methods ``adaptive`` and ``tpm+adaptive``) follows the authors' code,
github.com/UniModal4Reasoning/AdaptiveDiffusion @ cc143ad8777af50ae1e45b5997237cdcb0dba648,
``examples/AdaptiveDiffusion/acceleration/sparse_pipeline.py``. Every pipeline class of that file has the
same logic; line numbers below are those of ``StableDiffusionXLPipeline`` (``estimate_skipping`` at
929-940, denoising loop at 1331-1383; ``StableDiffusionPipeline``: 2156-2167 and 2399-2443):

* ``prev_latents`` holds the latents *after* each step, x_1, x_2, ... (appended at 1383); the initial
  noise x_0 is never stored, so d_1 (the step out of the noise) is never computed.
* steps 0-3 always call the model (``len(self.prev_latents) <= 3``, 1332); steps 2 and 3 append
  d_2 and d_3 to ``diff_list`` (1343-1344).
* at the end of every step k-1 >= 3 (``len(self.prev_latents) >= 3``, 1380) ``estimate_skipping`` gets
  x_k, appends d_k (935) and decides step k, stored in ``mask`` (True = call, 1381):
  step k is skipped when |(d_k + d_{k-2}) / 2 - d_{k-1}| <= threshold * d_{k-1} (938), unless
  ``len(self.mask) > 4 and not any(self.mask[-self.max_skip_steps:])`` (936) forces a call.
  ``mask`` holds the decisions of steps 4..k-1, so that cap is only checked from step 9 on and looks
  at the last min(max_skip, k - 4) decisions: steps 4-8 can all be skipped (5 in a row, whatever
  max_skip is), afterwards at most max_skip in a row (at step 9 with max_skip > 5: all 5 earlier ones).
* step k >= 4 calls the model iff ``self.mask[-1]`` (1346); the first possible skip is step 4.
* d_k is ``(latent - prev_latent).abs().mean()`` over the whole batch tensor (934): one decision for
  the batch. The authors run batches of one (``generate.py --batch_size`` default 1, the cache reset
  after each batch); here every sample decides on its own statistic, so each sample of a batch behaves
  exactly like its own batch-of-one official run.

One deliberate difference: ``max_skip = 0`` means "never skip" here. In the official code
``mask[-0:]`` is the whole list, so 0 would force a call only after all decisions so far were skips.

:func:`legacy_skip_mask` / :class:`LegacySkipRule` (methods ``adaptive-legacy`` and
``tpm+adaptive-legacy``) is this project's earlier variant, kept for comparison: the same third-order
test on d_k, d_{k-1}, d_{k-2}, but it may skip from step 3 on (so step 3 uses d_1, which involves the
noise), and it caps every run of consecutive skips at max_skip from the start.

Both rules are small state machines over [n] tensors: ``init(n, device)``, then per step
``decide()`` (True = skip this step) and ``observe(change, called, active)`` with the step's
``latent_change``. Only ``active`` samples advance, so samples that finished earlier keep their state.
"""

from __future__ import annotations

import torch

OFFICIAL_FIRST_SKIP = 4  # sparse_pipeline.py:1332, steps 0-3 always call
OFFICIAL_CAP_FROM = 9  # sparse_pipeline.py:936, len(mask) > 4 with mask = decisions of steps 4..k-1
LEGACY_WARMUP = 3  # the legacy rule never skips during the first 3 steps


def latent_change(x_new: torch.Tensor, x_old: torch.Tensor) -> torch.Tensor:
    """d = mean|x_new - x_old| per sample ([n, ...] -> [n])."""
    return (x_new - x_old).abs().flatten(1).mean(1)


def third_order_smooth(d_curr: torch.Tensor, d_prev: torch.Tensor, d_prev2: torch.Tensor,
                       threshold: float) -> torch.Tensor:
    """|(d_k + d_{k-2}) / 2 - d_{k-1}| <= threshold * d_{k-1} (False where any d is NaN)."""
    return ((d_curr + d_prev2) * 0.5 - d_prev).abs() <= threshold * d_prev


def legacy_skip_mask(d_curr: torch.Tensor, d_prev: torch.Tensor, d_prev2: torch.Tensor,
                     consecutive_skips: torch.Tensor, step: int | torch.Tensor, threshold: float,
                     max_skip: int, warmup: int = LEGACY_WARMUP) -> torch.Tensor:
    """The legacy rule, vectorised over samples: True = skip the call at ``step``.

    At 0-based step k the sampler holds latents x_0..x_k; ``d_curr`` = d_k, ``d_prev`` = d_{k-1},
    ``d_prev2`` = d_{k-2}. The call at step k is replaced by the previous velocity when
    ``|(d_k + d_{k-2}) / 2 - d_{k-1}| <= threshold * d_{k-1}``, never during the first ``warmup`` (3)
    steps, and never after ``max_skip`` consecutive skips (``consecutive_skips`` counts the reuses
    immediately before this step).
    """
    smooth = third_order_smooth(d_curr, d_prev, d_prev2, threshold)
    step_t = torch.as_tensor(step, device=d_curr.device)
    finite = torch.isfinite(d_curr) & torch.isfinite(d_prev) & torch.isfinite(d_prev2)
    return smooth & finite & (step_t >= warmup) & (consecutive_skips.to(d_curr.device) < max_skip)


class SkipRule:
    """Per-sample state shared by both rules: the last three d's, the skip run and the step index."""

    def __init__(self, threshold: float, max_skip: int) -> None:
        self.threshold = float(threshold)
        self.max_skip = int(max_skip)
        self.d = torch.empty(0, 3)
        self.run = torch.empty(0, dtype=torch.int64)
        self.step = torch.empty(0, dtype=torch.int64)

    def init(self, n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> SkipRule:
        """Fresh state for ``n`` samples about to take step 0 (nothing observed yet)."""
        self.d = torch.full((n, 3), float("nan"), device=device, dtype=dtype)  # d_k, d_{k-1}, d_{k-2}
        self.run = torch.zeros(n, dtype=torch.int64, device=device)  # skips right before the next step
        self.step = torch.zeros(n, dtype=torch.int64, device=device)  # index k of each sample's next step
        return self

    def decide(self) -> torch.Tensor:
        """[n] bool on the state's device: True = skip (reuse the velocity) at each sample's next step."""
        raise NotImplementedError

    def observe(self, change: torch.Tensor, called: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Record a finished step: ``change`` = d_{k+1} = mean|x_{k+1} - x_k| per sample, ``called`` whether
        the transformer ran. Only ``active`` samples (default: all) advance."""
        dev = self.d.device
        a = torch.ones_like(self.run, dtype=torch.bool) if active is None else active.to(dev, torch.bool)
        shifted = torch.cat([change.to(dev, self.d.dtype).reshape(-1, 1), self.d[:, :2]], dim=1)
        self.d = torch.where(a[:, None], shifted, self.d)
        run = torch.where(called.to(dev, torch.bool), torch.zeros_like(self.run), self.run + 1)
        self.run = torch.where(a, run, self.run)
        self.step = self.step + a.to(torch.int64)


class OfficialSkipRule(SkipRule):
    """The authors' rule (see the module docstring), applied per sample."""

    def decide(self) -> torch.Tensor:
        d_k, d_k1, d_k2 = self.d.unbind(1)
        smooth = third_order_smooth(d_k, d_k1, d_k2, self.threshold)
        k = self.step
        # sparse_pipeline.py:936: from step 9 on a call is forced when the last min(max_skip, k - 4)
        # decisions were all skips (the skip run cannot reach back past step 4, steps 0-3 call)
        window = torch.clamp(k - OFFICIAL_FIRST_SKIP, max=self.max_skip)
        forced = (k >= OFFICIAL_CAP_FROM) & (self.run >= window)
        return smooth & ~forced & (k >= OFFICIAL_FIRST_SKIP) & (self.max_skip > 0)


class LegacySkipRule(SkipRule):
    """This project's earlier rule (:func:`legacy_skip_mask`): skips from step 3, caps every run."""

    def decide(self) -> torch.Tensor:
        d_k, d_k1, d_k2 = self.d.unbind(1)
        return legacy_skip_mask(d_k, d_k1, d_k2, self.run, self.step, self.threshold, self.max_skip)


def make_skip_rule(legacy: bool, threshold: float, max_skip: int) -> SkipRule:
    """:class:`LegacySkipRule` or :class:`OfficialSkipRule` (not yet initialised)."""
    return (LegacySkipRule if legacy else OfficialSkipRule)(threshold, max_skip)
