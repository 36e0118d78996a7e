"""The known-optimum check of the learning (tpdm_rl/training/sanity.py): a world whose per-class optimum is known in closed
form, trained with the config's default objective and optimiser and the stop-ratio action, in seconds."""

from __future__ import annotations

import pytest
import torch

from tpdm_rl.training.sanity import SanityWorld, sanity_config, train_sanity

#: the stated budget: the defaults must find the per-class rule within this many iterations (64 trajectories each)
ITERATIONS = 40


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_world_optimum_is_known_in_closed_form():
    w = SanityWorld()
    opt = w.optimum()
    # class 0 saturates at once: 1 step; class 1 gains 0.072 from step 3 to 4 (> price 0.05) and 0.043 from 4 to 5
    assert opt["per_class_steps"] == [1, 4]
    assert opt["single_steps"] == 3
    assert opt["per_class_value"] == pytest.approx((0.9 - 0.05 + 0.5 + 0.5 * (1 - 0.6**3) - 0.2) / 2)
    assert opt["per_class_value"] - opt["single_value"] > 0.05  # the rule is clearly worth learning
    cls, steps = torch.tensor([0, 1, 1]), torch.tensor([1, 4, 40])
    torch.testing.assert_close(w.value(cls, steps), torch.tensor([0.85, 0.892 - 0.2, w.quality[1][-1] - 2.0],
                                                                 dtype=torch.float64))


def test_defaults_learn_the_per_class_optimum():
    """Per-class mean NFE within 0.5 of the optimum and >= 90% of the optimum's gain over the best single schedule,
    on held-out prompts, with deterministic inference and with sampling."""
    w = SanityWorld()
    cfg = sanity_config(w, **{"train.iterations": ITERATIONS})
    assert cfg.algorithm.adv_std == "group" and cfg.optim.lr == 1e-3  # the config's defaults, not tuned ones
    res = train_sanity(w, cfg, record=True)
    for mode in ("mode", "sample"):
        assert res.passes(mode), (mode, res.per_class_steps, res.gain_share)
    # the adaptation metric shows it: the spread of per-prompt mean steps grows from its noise floor to the class gap
    spread = [h["steps/prompt_spread"] for h in res.history]
    assert sum(spread[-10:]) / 10 > 1.0 > 0.5 > spread[0]


def test_a_class_the_tpm_cannot_see_gives_no_per_class_rule():
    """The check can fail: with the class code removed from what the TPM reads, no per-class rule is learnt."""
    w = SanityWorld(class_signal=0.0)
    res = train_sanity(w, sanity_config(w, **{"train.iterations": ITERATIONS}))
    assert not res.passes("mode") and not res.passes("sample")
    assert abs(res.per_class_steps["mode"][0] - res.per_class_steps["mode"][1]) < 1.0


def test_sixteen_prompts_per_iteration_learn_the_rule_under_reward_noise():
    """The places-like world (one class in three best at 1 step, the rest at 2; reward noise 7x the rule's gain), trained
    as configs/toy_places.yaml is: 16 prompts x 8 per iteration, global advantage std. In
    benchmarks/results/known_optimum.json 8 of 8 seeds find the per-class NFE this way, and 5 of 8 with 8 prompts x 240
    iterations (the same number of trajectories)."""
    w = SanityWorld.places_like()
    opt = w.optimum()
    assert opt["per_class_steps"] == [1, 2, 2] and opt["single_steps"] == 2
    cfg = sanity_config(w, **{"train.iterations": 120, "rollout.prompts_per_iteration": 16, "algorithm.adv_std": "global"})
    res = train_sanity(w, cfg)
    assert res.passes("mode", share=0.75), (res.per_class_steps, res.gain_share)


def test_a_tpm_started_at_one_step_crosses_the_places_valley():
    """The places world's own landscape (SanityWorld.places_valley, from training-split table scores): all-placed
    prompts are worse at 2 steps than at 1 or 3, and the optimum is 1 step for them, 3 for the rest. Started at the
    3-step table, the stop head never leaves 3 steps; started at 1 step (policy.init_stop_steps: 1, the table's ratios)
    every class climbs to its own optimum. Both with configs/toy_places.yaml's learning settings."""
    w = SanityWorld.places_valley()
    opt = w.optimum()
    assert opt["per_class_steps"] == [1, 3, 3] and opt["single_steps"] == 3
    sets = {"train.iterations": 120, "rollout.prompts_per_iteration": 16, "algorithm.adv_std": "global"}
    stuck = train_sanity(w, sanity_config(w, **sets))
    assert stuck.per_class_steps["mode"] == pytest.approx([3.0, 3.0, 3.0], abs=0.1)
    climbed = train_sanity(w, sanity_config(w, **sets, **{"policy.init_stop_steps": 1}))
    assert climbed.passes("mode", share=0.75), (climbed.per_class_steps, climbed.gain_share)
