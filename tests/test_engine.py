import pytest
import torch
from tpdm_rl.rollout.engine import ReferenceRequest, SamplingEngine
from tpdm_rl.rollout.schedules import FixedSchedule, TPMSchedule

from tpdm_rl.algorithm.policy import TimePredictionModule, TPMSpec
from tpdm_rl.core.rng import derive_key


@pytest.fixture(scope="module")
def varied_tpm(backbone):
    # low concentration -> widely varying step counts, so slots free up at different times
    spec = TPMSpec(in_channels=backbone.feature_channels, temb_dim=backbone.temb_dim, grid=4, hidden=16,
                   init_ratio=0.6, init_concentration=4.0)
    torch.manual_seed(0)
    return TimePredictionModule(spec).eval()


def _requests(n):
    prompts = [f"prompt number {i % 3}" for i in range(n)]
    seeds = [derive_key(0, i) for i in range(n)]
    keys = torch.tensor([derive_key(1, i) for i in range(n)])
    return prompts, seeds, keys


def test_continuous_batching_completes_every_trajectory_once(backbone, varied_tpm):
    n = 11
    prompts, seeds, keys = _requests(n)
    eng = SamplingEngine(backbone, 64, 64, batch_size=4, max_steps=15, continuous=True)
    tr = eng.run(prompts, seeds, keys, TPMSchedule(varied_tpm, 0.01))
    assert tr.num_trajectories == n
    assert len(set(tr.steps.tolist())) > 2, "the TPM should give varied step counts"
    # each trajectory's rows are steps 0..steps-1 exactly once, the last one ends at sigma 0
    for i in range(n):
        rows = (tr.traj == i).nonzero().reshape(-1)
        assert tr.step[rows].tolist() == list(range(int(tr.steps[i])))
        assert tr.sigma_next[rows[-1]].item() == 0.0
        assert (tr.sigma_next[rows[:-1]] > 0).all()
    assert tr.num_rows == int(tr.steps.sum())
    assert tr.features.shape[0] == tr.num_rows
    # continuous batching keeps the slots busy: fewer backbone calls than the static schedule
    static = SamplingEngine(backbone, 64, 64, batch_size=4, max_steps=15, continuous=False)
    st = static.run(prompts, seeds, keys, TPMSchedule(varied_tpm, 0.01))
    assert eng.stats["backbone_calls"] < static.stats["backbone_calls"]
    torch.testing.assert_close(st.steps, tr.steps, rtol=0, atol=0)
    torch.testing.assert_close(st.latents, tr.latents, rtol=1e-5, atol=1e-6)


def test_batched_trajectory_equals_trajectory_run_alone(backbone, varied_tpm):
    prompts, seeds, keys = _requests(7)
    eng = SamplingEngine(backbone, 64, 64, batch_size=3, max_steps=15)
    together = eng.run(prompts, seeds, keys, TPMSchedule(varied_tpm, 0.01))
    for i in (0, 4, 6):
        alone = eng.run([prompts[i]], [seeds[i]], keys[i:i + 1], TPMSchedule(varied_tpm, 0.01))
        assert alone.steps.item() == together.steps[i].item()
        rows = together.traj == i
        torch.testing.assert_close(alone.sigma, together.sigma[rows], rtol=1e-5, atol=0)
        torch.testing.assert_close(alone.logp, together.logp[rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone.latents[0], together.latents[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone.images[0], together.images[i], rtol=1e-5, atol=1e-5)


def test_references_share_the_rollout_run(backbone, varied_tpm):
    """Fidelity references ride in the rollout's slots: the same trajectories and reference images as two
    separate runs, no learner rows for them, and fewer backbone calls than running them apart."""
    prompts, seeds, keys = _requests(5)
    eng = SamplingEngine(backbone, 64, 64, batch_size=4, max_steps=15)
    both = eng.run(prompts, seeds, keys, TPMSchedule(varied_tpm, 0.01),
                   references=ReferenceRequest(prompts[:3], seeds[:3], 8))
    c_both = eng.stats["backbone_calls"]
    alone = eng.run(prompts, seeds, keys, TPMSchedule(varied_tpm, 0.01))
    refs = eng.run_fixed(prompts[:3], seeds[:3], 8)
    c_apart = eng.stats["backbone_calls"] - c_both
    assert both.steps.tolist() == alone.steps.tolist() and both.num_rows == alone.num_rows
    assert torch.equal(both.traj, alone.traj) and torch.equal(both.action, alone.action)
    torch.testing.assert_close(both.logp, alone.logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both.images, alone.images, rtol=1e-5, atol=1e-5)
    assert both.reference_images.shape == refs.images.shape == (3, 3, 64, 64)
    torch.testing.assert_close(both.reference_images, refs.images, rtol=1e-5, atol=1e-5)
    assert c_both < c_apart


def test_terminal_step_goes_to_zero_with_current_velocity(backbone):
    # a schedule that drops below sigma_min at step 2: the last update must be x0 = x - sigma * v
    sched = FixedSchedule(torch.tensor([1.0, 0.5, 0.2, 0.001, 0.0005]))
    sched.sigma_min = 0.01
    eng = SamplingEngine(backbone, 64, 64, batch_size=2, max_steps=10)
    prompts, seeds, keys = _requests(2)
    tr = eng.run(prompts, seeds, keys, sched)
    assert tr.steps.tolist() == [3, 3]
    assert tr.sigma_next[tr.traj == 0].tolist() == pytest.approx([0.5, 0.2, 0.0])
    # replay manually
    x = eng.initial_noise(seeds[:1])
    e, p = backbone.encode_prompts(prompts[:1])
    for s, s_next in ((1.0, 0.5), (0.5, 0.2), (0.2, 0.0)):
        v = backbone.step(x, torch.tensor([s]), e, p, need_features=False).velocity
        x = x + (s_next - s) * v
    torch.testing.assert_close(x[0], tr.latents[0], rtol=1e-5, atol=1e-5)


def test_max_steps_forces_the_last_step_and_masks_it(backbone, varied_tpm):
    prompts, seeds, keys = _requests(3)
    eng = SamplingEngine(backbone, 64, 64, batch_size=3, max_steps=2)
    tr = eng.run(prompts, seeds, keys, TPMSchedule(varied_tpm, 1e-6))
    assert tr.steps.tolist() == [2, 2, 2]
    last = tr.step == 1
    assert (tr.sigma_next[last] == 0).all()
    assert not tr.valid[last].any() and tr.valid[~last].all()


def test_forced_step_is_masked_whatever_its_action(backbone):
    """The budget step is masked even when its own proposal fell below sigma_min (keeping exactly those
    would select samples by their action); a step that ends below sigma_min before the budget counts."""
    prompts, seeds, keys = _requests(2)
    forced = FixedSchedule(torch.tensor([1.0, 0.5, 0.001]))  # step 1 proposes 0.001 < sigma_min = budget step
    forced.sigma_min = 0.01
    tr = SamplingEngine(backbone, 64, 64, batch_size=2, max_steps=2).run(prompts, seeds, keys, forced)
    assert tr.steps.tolist() == [2, 2]
    assert tr.valid.tolist() == [True, False, True, False]
    early = FixedSchedule(torch.tensor([1.0, 0.001]))  # ends below sigma_min at step 0, budget 5
    early.sigma_min = 0.01
    tr = SamplingEngine(backbone, 64, 64, batch_size=2, max_steps=5).run(prompts, seeds, keys, early)
    assert tr.steps.tolist() == [1, 1] and tr.valid.all()


def test_fixed_schedule_reproduces_diffusers_pipeline(backbone):
    from tpdm_rl.core.rng import keyed_normal_noise

    eng = SamplingEngine(backbone, 64, 64, batch_size=2)
    ref = eng.run_fixed(["a red apple on a table", "a dog"], [3, 4], 8)
    assert ref.steps.tolist() == [8, 8]
    for i, (prompt, seed) in enumerate((("a red apple on a table", 3), ("a dog", 4))):
        out = backbone.pipe(prompt, num_inference_steps=8, height=64, width=64, max_sequence_length=32,
                            guidance_scale=backbone.guidance_scale, output_type="pt",
                            generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out.images[0], ref.images[i], rtol=0, atol=1e-4)
    # the engine's noise is diffusers' CPU-generator noise
    torch.testing.assert_close(keyed_normal_noise([3], (16, 8, 8))[0],
                               torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(3))[0])
