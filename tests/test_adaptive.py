"""AdaptiveDiffusion's skip rules (rollout/adaptive.py): the official rule on hand-computed latents, per-sample
independence, a literal batch-of-one transcription of the authors' loop, the legacy rule, and the sampler."""

from __future__ import annotations

import pytest
import torch
from tpdm_rl.rollout.adaptive import (
    LegacySkipRule,
    OfficialSkipRule,
    latent_change,
    legacy_skip_mask,
)
from tpdm_rl.rollout.backbone import StepOutput
from tpdm_rl.rollout.baselines import BaselineSampler, Method, adaptive_skip_mask, parse_method
from tpdm_rl.rollout.sampler import MethodSampler

STEPS = 16


def _pattern(called: list[bool]) -> str:
    return "".join("C" if c else "S" for c in called)


def _replay(rule, seq: torch.Tensor) -> list[str]:
    """Run a rule over a given latent sequence [T+1, B, ...] (x_0..x_T; the latents do not depend on the
    decisions here): one C(all)/S(kip) string per sample."""
    b = seq.shape[1]
    rule.init(b, dtype=seq.dtype)
    rows = []
    for k in range(seq.shape[0] - 1):
        skip = rule.decide()
        rows.append(~skip)
        rule.observe(latent_change(seq[k + 1], seq[k]), ~skip)
    called = torch.stack(rows, dim=1)  # [B, T]
    return [_pattern(c.tolist()) for c in called]


def _official_batch_of_one(advance, x0: torch.Tensor, steps: int, threshold: float, max_skip: int):
    """The authors' bookkeeping, restated step by step (sparse_pipeline.py, StableDiffusionXLPipeline:
    loop 1331-1383, estimate_skipping 929-940) for one sample. ``advance(i, x, call)`` returns the
    latent after step i. Returns (called per step, final latent)."""
    prev_latents, diff_list, mask, called = [], [], [], []
    x = x0
    for i in range(steps):
        if len(prev_latents) <= 3:  # 1332
            call = True
            if len(prev_latents) > 1:  # 1343-1344
                diff_list.append((prev_latents[-1] - prev_latents[-2]).abs().mean())
        else:
            call = bool(mask[-1])  # 1346
        called.append(call)
        x = advance(i, x, call)
        if len(prev_latents) >= 3:  # 1380-1381: estimate_skipping(x)
            prev_diff, prev_prev_diff = diff_list[-1], diff_list[-2]
            cur_diff = (x - prev_latents[-1]).abs().mean()
            diff_list.append(cur_diff)
            if len(mask) > 4 and not any(mask[-max_skip:]):
                mask.append(True)
            elif abs((cur_diff + prev_prev_diff) / 2 - prev_diff) <= prev_diff * threshold:
                mask.append(False)
            else:
                mask.append(True)
        prev_latents.append(x)  # 1383
    return called, x


def _from_diffs(*diffs: list[float]) -> torch.Tensor:
    """Latents [T+1, B, 2, 2] with x_0 = 0 and x_k - x_{k-1} = d_k in every element (so d_k is exact)."""
    d = torch.tensor(diffs, dtype=torch.float64).T  # [T, B]
    x = torch.cat([torch.zeros(1, d.shape[1], dtype=d.dtype), d.cumsum(0)])
    return x[:, :, None, None].expand(-1, -1, 2, 2).contiguous()


# d_k for k = 1..16. A: perfectly flat. B: flat except the step out of the noise (d_1 = 5).
# C: flat, then the latent steps triple from d_5 on.
FLAT = [1.0] * STEPS
NOISY_START = [5.0] + [1.0] * (STEPS - 1)
JUMP = [1.0] * 4 + [3.0] * (STEPS - 4)


# ------------------------------------------------------------------ the official rule, by hand
def test_official_rule_on_hand_computed_latents():
    # Decision for step k (k >= 4) uses d_k, d_{k-1}, d_{k-2} (known once x_k exists); skip when
    # |(d_k + d_{k-2})/2 - d_{k-1}| <= 0.01 * d_{k-1}.
    # A (all d = 1): the test is 0 <= 0.01 everywhere.
    #   steps 0-3 call although flat (the official loop always calls while len(prev_latents) <= 3);
    #   steps 4-8 skip: 5 in a row, since the cap `len(mask) > 4` only applies from step 9
    #   (mask = decisions of steps 4..k-1);
    #   step 9: mask[-4:] = steps 5-8, all skips -> forced call;
    #   steps 10-13 skip (the window holds step 9's call until step 14); step 14: steps 10-13 skipped
    #   -> call; step 15 skips.
    # B: d_1 = 5 is never used (x_0 is not in prev_latents; step 4 uses d_4, d_3, d_2): same as A.
    # C: step 4: d_4, d_3, d_2 = 1, 1, 1 -> skip.
    #    step 5: d_5, d_4, d_3 = 3, 1, 1: |(3 + 1)/2 - 1| = 1 > 0.01 * 1 -> call.
    #    step 6: d_6, d_5, d_4 = 3, 3, 1: |(3 + 1)/2 - 3| = 1 > 0.01 * 3 -> call.
    #    steps 7, 8: all 3's -> skip (no cap before step 9).
    #    step 9: mask[-4:] = steps 5-8 = call, call, skip, skip -> not capped, skip; step 10: steps 6-9
    #    still hold step 6's call -> skip; step 11: steps 7-10 all skipped -> call; steps 12-15 skip.
    seq = _from_diffs(FLAT, NOISY_START, JUMP)
    got = _replay(OfficialSkipRule(0.01, 4), seq)
    assert got[0] == "CCCC" "SSSSS" "C" "SSSS" "C" "S"
    assert got[1] == got[0]
    assert got[2] == "CCCC" "S" "CC" "SSSS" "C" "SSSS"
    # the literal transcription of the authors' loop agrees, one sample at a time
    for i, want in enumerate(got):
        ref, _ = _official_batch_of_one(lambda k, x, call, i=i: seq[k + 1, i:i + 1], seq[0, i:i + 1],
                                        STEPS, 0.01, 4)
        assert _pattern(ref) == want


def test_official_cap_follows_the_mask_logic():
    seq = _from_diffs(FLAT)
    # MAX_SKIP = 1: still 5 skips at steps 4-8 (no cap before step 9), then every other step
    assert _replay(OfficialSkipRule(0.01, 1), seq) == ["CCCC" "SSSSS" "C" "SCSCSC"]
    # MAX_SKIP = 6 > 5 decisions at step 9: mask[-6:] is all 5 of them (steps 4-8, all skips) -> call;
    # afterwards 6 in a row are allowed (steps 10-15)
    assert _replay(OfficialSkipRule(0.01, 6), seq) == ["CCCC" "SSSSS" "C" "SSSSSS"]
    # MAX_SKIP = 0 turns skipping off (documented difference: the official mask[-0:] is the whole list)
    assert _replay(OfficialSkipRule(0.01, 0), seq) == ["C" * STEPS]
    # a zig-zag has a large third-order term: never skips
    assert _replay(OfficialSkipRule(0.01, 4), _from_diffs([1.0, 2.0] * 8)) == ["C" * STEPS]
    for ms in (1, 2, 4, 6):
        ref, _ = _official_batch_of_one(lambda k, x, call: seq[k + 1], seq[0], STEPS, 0.01, ms)
        assert _replay(OfficialSkipRule(0.01, ms), seq) == [_pattern(ref)]


def test_official_rule_decides_per_sample():
    seq = _from_diffs(FLAT, JUMP, NOISY_START)
    together = _replay(OfficialSkipRule(0.01, 4), seq)
    alone = [_replay(OfficialSkipRule(0.01, 4), seq[:, i:i + 1])[0] for i in range(3)]
    assert together == alone
    assert together[0] != together[1]  # the batch did not decide once for everyone


def test_official_rule_matches_the_transcription_on_random_sequences():
    g = torch.Generator().manual_seed(0)
    b, t = 6, 28
    # smooth, slowly varying step sizes with noise: some steps pass the test, some do not
    base = torch.linspace(0.3, 1.5, t, dtype=torch.float64)[:, None] * (1 + torch.rand(1, b, generator=g,
                                                                                        dtype=torch.float64))
    d = base * (1 + 0.03 * torch.randn(t, b, generator=g, dtype=torch.float64))
    seq = torch.cat([torch.zeros(1, b, dtype=d.dtype), d.cumsum(0)])[:, :, None].expand(-1, -1, 4)  # [T+1, B, 4]
    for thr in (0.0, 0.01, 0.03, 0.1, 1.0):
        for ms in (1, 2, 3, 4, 5, 6, 7):
            got = _replay(OfficialSkipRule(thr, ms), seq)
            for i in range(b):
                ref, _ = _official_batch_of_one(lambda k, x, call, i=i: seq[k + 1, i:i + 1], seq[0, i:i + 1],
                                                t, thr, ms)
                assert got[i] == _pattern(ref), (thr, ms, i)


def test_inactive_samples_keep_their_state():
    rule = OfficialSkipRule(0.01, 4).init(2)
    for _ in range(6):
        rule.observe(torch.ones(2), torch.tensor([True, True]))
    before = (rule.d.clone(), rule.run.clone(), rule.step.clone())
    rule.observe(torch.tensor([1.0, 9.0]), torch.tensor([False, False]), active=torch.tensor([True, False]))
    assert rule.step.tolist() == [7, 6] and rule.run.tolist() == [1, 0]
    assert torch.equal(rule.d[1], before[0][1]) and rule.d[0, 0] == 1.0


# ------------------------------------------------------------------ the legacy rule is unchanged
def test_legacy_rule_is_unchanged():
    seq = _from_diffs(FLAT, NOISY_START, JUMP)
    got = _replay(LegacySkipRule(0.01, 4), seq)
    # A: skips from step 3 (d_3, d_2, d_1 = 1, 1, 1), at most 4 in a row from the start
    assert got[0] == "CCC" "SSSS" "C" "SSSS" "C" "SSS"
    # B: step 3 uses d_1 = 5 (the step out of the noise): |(1 + 5)/2 - 1| = 2 > 0.01 -> call
    assert got[1] == "CCCC" "SSSS" "C" "SSSS" "C" "SS"
    # C: steps 3, 4 skip, the jump costs steps 5 and 6, then runs of 4
    assert got[2] == "CCC" "SS" "CC" "SSSS" "C" "SSSS"
    # the official rule does not skip step 3 on the same latents
    assert _replay(OfficialSkipRule(0.01, 4), seq)[0][3] == "C"
    # the old function name is the legacy rule
    assert adaptive_skip_mask is legacy_skip_mask
    assert BaselineSampler is MethodSampler  # the deprecated name still works


# ------------------------------------------------------------------ methods and the sampler
def test_method_strings():
    assert parse_method("adaptive:0.05") == Method("adaptive", threshold=0.05)
    assert parse_method("adaptive-legacy:0.05:2") == Method("adaptive-legacy", threshold=0.05, max_skip=2)
    assert parse_method("tpm+adaptive-legacy:0.02").uses_tpm
    m = parse_method("tpm+adaptive-legacy:0.02:3")
    assert m.skips and m.legacy and m.name == "tpm+adaptive-legacy:0.02:3"
    assert parse_method("adaptive").skips and not parse_method("adaptive").legacy
    assert not parse_method("fixed:8").skips


class _FakeBackbone:
    """An analytic 'transformer' (the velocity is a smooth function of x, sigma and a per-prompt scalar):
    enough for MethodSampler's skipping loop, and batch-invariant by construction."""

    device = torch.device("cpu")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (2, height // 8, width // 8)

    def default_sigmas(self, num_steps: int, latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        t = torch.linspace(1.0, 0.0, num_steps + 1)
        return 3.0 * t / (1.0 + 2.0 * t)  # SD3's shift 3

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.tensor([float(len(p) % 7) / 3.0 for p in prompts])
        return a[:, None, None], a[:, None]

    @staticmethod
    def velocity(x: torch.Tensor, sigma: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, 1, 1, 1)
        a = a.reshape(-1, 1, 1, 1)
        return x * (1.0 + 0.5 * torch.sin(6.0 * a * s)) - a * s

    def step(self, latents, sigma, prompt_embeds, pooled_embeds, need_features=True) -> StepOutput:
        return StepOutput(self.velocity(latents, sigma, pooled_embeds[:, 0]), torch.empty(0), torch.empty(0))


PROMPTS = ["a", "a dog", "two cats", "a red apple", "lighthouse"]


@pytest.mark.parametrize("legacy", [False, True])
def test_sampler_equals_each_sample_run_alone(legacy):
    bb = _FakeBackbone()
    sampler = BaselineSampler(bb, 32, 32, batch_size=len(PROMPTS), base_steps=28)
    seeds = list(range(len(PROMPTS)))
    thr, ms = 0.05, 4
    name = f"adaptive{'-legacy' if legacy else ''}:{thr}"
    out = sampler.run(name, PROMPTS, seeds, decode=False)
    sig = bb.default_sigmas(28)
    noise = torch.stack([torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])
    embeds, _ = bb.encode_prompts(PROMPTS)
    for i in range(len(PROMPTS)):
        a = embeds[i:i + 1, 0, 0]
        v = [None]

        def advance(k, x, call, a=a, v=v):
            if call:
                v[0] = bb.velocity(x, sig[k:k + 1], a)
            return x + (sig[k + 1] - sig[k]) * v[0]

        if legacy:  # the legacy rule alone on one sample, driven by hand
            rule = LegacySkipRule(thr, ms).init(1)
            x, called = noise[i:i + 1], []
            for k in range(28):
                call = ~rule.decide()
                x_new = advance(k, x, bool(call))
                rule.observe(latent_change(x_new, x), call)
                called.append(bool(call))
                x = x_new
        else:
            called, x = _official_batch_of_one(advance, noise[i:i + 1], 28, thr, ms)
        assert _pattern(out.called[i].tolist()) == _pattern(called), i
        assert int(out.nfe[i]) == sum(called)
        torch.testing.assert_close(out.latents[i], x[0], rtol=1e-5, atol=1e-5)
    assert out.steps.tolist() == [28] * len(PROMPTS)
    assert (out.nfe < 28).all() and len(set(out.nfe.tolist())) > 1, out.nfe
    assert all(bool(c[:4 - legacy].all()) for c in out.called)
