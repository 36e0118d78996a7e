import pytest
import torch

from tpdm_rl.algorithm.objective import (
    RunningMeanStd,
    StepPenalty,
    compose_reward,
    group_normalize,
    grpo_advantages,
    ppo_clip_loss,
)


def test_grpo_advantages_on_hand_made_groups():
    fid = torch.tensor([10.0, 12.0, 14.0, 1.0, 1.0, 4.0])
    steps = torch.tensor([4, 4, 4, 2, 5, 2])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = grpo_advantages({"fidelity": fid}, {"fidelity": 1.0}, steps, group, StepPenalty("additive", 1.0), eps=0.0)
    # group 0: R = 6, 8, 10 -> mean 8, std (unbiased) 2 -> -1, 0, 1
    # group 1: R = -1, -4, 2 -> mean -1, std 3 -> 0, -1, 1
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, -1.0, 1.0]))


def test_group_normalize_global_and_none():
    x = torch.tensor([1.0, 3.0, 10.0, 20.0])
    g = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(group_normalize(x, g, "none"), torch.tensor([-1.0, 1.0, -5.0, 5.0]))
    glob = group_normalize(x, g, "global", eps=0.0)
    torch.testing.assert_close(glob, torch.tensor([-1.0, 1.0, -5.0, 5.0]) / x.std())


def test_per_reward_norm_balances_scales():
    big = torch.tensor([1000.0, 2000.0, 0.0, 0.0])
    small = torch.tensor([2.0, 1.0, 1.0, 2.0])
    g = torch.tensor([0, 0, 1, 1])
    adv = grpo_advantages({"a": big, "b": small}, {"a": 1.0, "b": 1.0}, torch.zeros(4), g,
                          per_reward_norm=True, eps=1e-8)
    # group 0: a -> (-.707, .707), b -> (.707, -.707): they cancel exactly
    torch.testing.assert_close(adv[:2], torch.zeros(2), atol=1e-6, rtol=0)


def test_compose_reward_additive_and_discount():
    comps = {"x": torch.tensor([2.0, 4.0]), "y": torch.tensor([1.0, 0.0])}
    w = {"x": 0.5, "y": 2.0}
    steps = torch.tensor([10, 20])
    torch.testing.assert_close(compose_reward(comps, w, steps, StepPenalty("additive", 0.1)), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(compose_reward(comps, w, steps, StepPenalty("discount", gamma=0.9)),
                               torch.tensor([3.0 * 0.9**10, 2.0 * 0.9**20]))


def test_ppo_clip_loss_against_hand_computation():
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    new = torch.log(torch.tensor([1.5, 0.5, 1.1, 3.0]))
    adv = torch.tensor([1.0, 1.0, -2.0, 5.0])
    mask = torch.tensor([True, True, True, False])
    st = ppo_clip_loss(new, old, adv, mask, clip_eps=0.2)
    # per step: max(-A r, -A clip(r)):
    # r=1.5,A=1: max(-1.5,-1.2)=-1.2; r=.5,A=1: max(-.5,-.8)=-.5; r=1.1,A=-2: max(2.2,2.2)=2.2; masked
    expected = (-1.2 - 0.5 + 2.2) / 3
    assert abs(st.loss.item() - expected) < 1e-6
    assert abs(st.clipfrac.item() - 2 / 3) < 1e-6
    r = torch.tensor([1.5, 0.5, 1.1])
    assert abs(st.approx_kl.item() - ((r - 1) - torch.log(r)).mean().item()) < 1e-6


def test_entropy_bonus_subtracts_the_masked_mean_entropy_and_raises_it():
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    adv, mask = torch.tensor([1.0, 1.0, -2.0]), torch.tensor([True, True, False])
    logit = torch.tensor([2.0, -1.0, 7.0], requires_grad=True)  # a stop bit per step: its entropy
    p = torch.sigmoid(logit)
    ent = -(p * torch.log(p) + (1 - p) * torch.log(1 - p))
    plain = ppo_clip_loss(new, old, adv, mask, 0.2, entropy=ent)
    bonus = ppo_clip_loss(new, old, adv, mask, 0.2, entropy=ent, entropy_coef=0.1)
    assert abs((plain.loss - bonus.loss).item() - 0.1 * ent[:2].mean().item()) < 1e-6  # the masked step counts not
    assert plain.entropy.item() == bonus.entropy.item()  # the reported entropy is the same either way
    bonus.loss.backward()
    # descending the loss moves each valid logit toward 0 (more entropy); the masked step gets no gradient
    assert logit.grad[0] > 0 > logit.grad[1] and logit.grad[2] == 0
    with pytest.raises(ValueError, match="entropy"):
        ppo_clip_loss(new, old, adv, mask, 0.2, entropy_coef=0.1)


def test_ppo_gradient_zero_when_clipped():
    new = torch.log(torch.tensor([1.5])).requires_grad_(True)
    st = ppo_clip_loss(new, torch.zeros(1), torch.tensor([1.0]), torch.tensor([True]), 0.2)
    st.loss.backward()
    assert new.grad.abs().item() == 0.0


def test_running_mean_std_matches_batch_statistics():
    rms = RunningMeanStd()
    data = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3 + 5
    for chunk in data.split(37):
        rms.update(chunk)
    assert abs(rms.mean - data.double().mean().item()) < 1e-9
    assert abs(rms.var - data.double().var(unbiased=False).item()) < 1e-9


def test_tpdm_penalty_mode_is_the_official_mean_discount():
    """step_penalty.mode=tpdm: R * (1 - gamma^N) / (N (1 - gamma)), the mean of gamma^0..gamma^(N-1)."""
    comps = {"x": torch.tensor([2.0, 2.0, 1.0])}
    steps = torch.tensor([1, 10, 28])
    got = compose_reward(comps, {"x": 1.0}, steps, StepPenalty("tpdm", gamma=0.97))
    want = torch.tensor([2.0 * sum(0.97**k for k in range(n)) / n for n in (1, 10)]
                        + [1.0 * sum(0.97**k for k in range(28)) / 28])
    torch.testing.assert_close(got, want)
    assert got[0] == 2.0 and got[1] < got[0]  # one step: no discount; more steps: less reward


def test_the_step_penalty_object_answers_for_every_mode():
    """One object says what each mode charges, how it reads and which rewards it accepts (the config asks it)."""
    add, disc, tpdm = StepPenalty("additive", 0.5), StepPenalty("discount", 0.5, 0.9), StepPenalty("tpdm", 0.5, 0.9)
    assert add.charged(torch.tensor(4.0)) == 2.0 and disc.charged(4.0) == 0.0 and tpdm.charged(4.0) == 0.0
    assert add.formula("1 x a") == "1 x a - 0.5 x steps (mean over the iteration's trajectories)"
    assert disc.formula("1 x a") == "(1 x a) x 0.9^steps"
    assert tpdm.formula("1 x a") == "(1 x a) x (1 - 0.9^N) / (N (1 - 0.9)), N = steps"
    signed, positive = [("r", "none", 1.0, False)], [("r", "none", 1.0, True)]
    add.check(signed, per_reward_norm=True)
    disc.check(positive, per_reward_norm=False)
    with pytest.raises(ValueError, match="rewards MORE steps"):
        tpdm.check(signed, per_reward_norm=False)
    with pytest.raises(ValueError, match="per_reward_norm needs step_penalty.mode 'additive'"):
        disc.check(positive, per_reward_norm=True)
    with pytest.raises(ValueError, match="step penalty mode"):
        StepPenalty("linear")


def test_learner_entropy_coef_raises_the_stop_entropy_where_the_advantage_is_silent():
    """algorithm.entropy_coef reaches the learner: with zero advantages the plain update leaves the TPM as it is, the
    bonus moves it toward a less certain stop head."""
    from tpdm_rl.algorithm.messages import LearnBatch
    from tpdm_rl.algorithm.policy import TimePredictionModule, TPMSpec
    from tpdm_rl.core.config import AlgorithmConfig, OptimConfig
    from tpdm_rl.training.learner import Learner

    torch.manual_seed(0)
    spec = TPMSpec(in_channels=8, temb_dim=4, grid=4, hidden=8, action="stop-ratio", init_table=(1.0, 0.5, 0.0))
    g = torch.Generator().manual_seed(1)
    n = 16
    sigma = torch.full((n,), 0.25)  # near the table's end: the untrained stop head is fairly sure
    batch = LearnBatch(torch.randn(n, 8, 4, 4, generator=g), torch.randn(n, 4, generator=g), sigma,
                       torch.full((n,), 0.0), torch.zeros(n), torch.zeros(n), torch.ones(n, dtype=torch.bool))

    def entropy_after(coef: float) -> tuple[float, float]:
        learner = Learner(TimePredictionModule(spec), OptimConfig(lr=1e-2), AlgorithmConfig(entropy_coef=coef), 0)
        params = learner.policy(batch.features, batch.temb, batch.sigma)
        batch.old_logp = learner.policy.log_prob(params, batch.action).detach()
        before = float(learner.policy.entropy(params).mean().detach())
        for it in range(5):
            learner.update(batch, it)
        with torch.no_grad():
            return before, float(learner.policy.entropy(learner.policy(batch.features, batch.temb, batch.sigma)).mean())

    before, plain = entropy_after(0.0)
    assert plain == pytest.approx(before, abs=1e-6)
    _, bonus = entropy_after(0.5)
    assert bonus > before + 0.01
