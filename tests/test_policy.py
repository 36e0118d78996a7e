import math

import pytest
import torch

from tpdm_rl.algorithm.actions import beta_log_prob, beta_mode
from tpdm_rl.algorithm.policy import TimePredictionModule, TPMSpec
from tpdm_rl.core.rng import counter_beta, counter_normal, counter_uniform, derive_key


def test_beta_log_prob_matches_direct_formula():
    a = torch.tensor([1.5, 2.0, 16.0, 3.3])
    b = torch.tensor([4.0, 1.2, 4.0, 7.1])
    r = torch.tensor([0.2, 0.9, 0.75, 0.31])
    direct = ((a - 1) * torch.log(r) + (b - 1) * torch.log1p(-r)
              - (torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)))
    torch.testing.assert_close(beta_log_prob(a, b, r), direct, rtol=1e-5, atol=1e-5)


def test_beta_mode_is_argmax_of_density():
    a, b = torch.tensor([16.0]), torch.tensor([4.0])
    grid = torch.linspace(0.01, 0.99, 9801)
    dens = beta_log_prob(a.expand_as(grid), b.expand_as(grid), grid)
    assert abs(grid[dens.argmax()].item() - beta_mode(a, b).item()) < 2e-4


def test_counter_uniform_depends_only_on_key_and_counter():
    keys = torch.tensor([derive_key(0, i) for i in range(6)])
    ctr = torch.tensor([0, 1, 2, 3, 4, 5])
    full = counter_uniform(keys, ctr, 4)
    # the same rows in another order and batch composition give identical numbers
    perm = torch.tensor([5, 2, 0])
    torch.testing.assert_close(counter_uniform(keys[perm], ctr[perm], 4), full[perm], rtol=0, atol=0)
    assert ((full > 0) & (full < 1)).all()
    assert len(set(full.flatten().tolist())) == full.numel()


def test_counter_streams_are_uniform_and_normal():
    keys = torch.full((200_000,), derive_key(1, 2))
    u = counter_uniform(keys, torch.arange(200_000), 1).reshape(-1)
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.005
    z = counter_normal(keys[:50_000], torch.arange(50_000), 2)
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02


def test_counter_beta_matches_beta_moments():
    n = 40_000
    a, b = torch.full((n,), 16.0), torch.full((n,), 4.0)
    x = counter_beta(a, b, torch.full((n,), 12345), torch.arange(n))
    mean, var = 16 / 20, 16 * 4 / (20**2 * 21)
    assert abs(x.mean().item() - mean) < 0.003
    assert abs(x.var().item() - var) / var < 0.05
    a2, b2 = torch.full((n,), 1.3), torch.full((n,), 2.5)
    y = counter_beta(a2, b2, torch.full((n,), 7), torch.arange(n))
    assert abs(y.mean().item() - 1.3 / 3.8) < 0.005


def test_tpm_initial_distribution_and_shapes():
    spec = TPMSpec(in_channels=64, temb_dim=32, grid=4, hidden=16, init_ratio=0.7, init_concentration=10)
    tpm = TimePredictionModule(spec)
    a, b = tpm(torch.randn(5, 64, 4, 4), torch.randn(5, 32), torch.rand(5))
    assert a.shape == b.shape == (5,)
    torch.testing.assert_close(a / (a + b), torch.full((5,), 0.7), atol=0.01, rtol=0)
    torch.testing.assert_close(a + b, torch.full((5,), 10.0), atol=0.1, rtol=0)
    assert math.isfinite(beta_log_prob(a, b, torch.full((5,), 0.5)).sum().item())


def test_paper_head_uses_exp_and_avg_then_max_pooling():
    """inputs=paper: alpha, beta = 1 + exp(.) of the head (the official code's), features average-pooled to at most
    16 x 16 and then max-pooled; the initial distribution is the configured one as with our head."""
    spec = TPMSpec(in_channels=64, temb_dim=32, grid=4, hidden=16, init_ratio=0.7, init_concentration=10,
                   inputs="paper")
    tpm = TimePredictionModule(spec)
    feats, temb, sigma = torch.randn(5, 64, 4, 4), torch.randn(5, 32), torch.rand(5)
    a, b = tpm(feats, temb, sigma)
    torch.testing.assert_close(a / (a + b), torch.full((5,), 0.7), atol=0.01, rtol=0)
    torch.testing.assert_close(a + b, torch.full((5,), 10.0), atol=0.1, rtol=0)
    with torch.no_grad():
        tpm.head[-1].bias.add_(torch.tensor([1.0, -1.0]))
        a2, b2 = tpm(feats, temb, sigma)
    # exp head: adding 1 to the pre-activation multiplies alpha - 1 by e (softplus would not)
    torch.testing.assert_close((a2 - 1) / (a - 1), torch.full((5,), math.e), rtol=1e-4, atol=0)
    torch.testing.assert_close((b - 1) / (b2 - 1), torch.full((5,), math.e), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="paper"):
        TimePredictionModule(TPMSpec(in_channels=64, temb_dim=32, grid=4, hidden=16, inputs="other"))


# ---------------------------------------------------------------------------- the stop-ratio action
STOP_SPEC = TPMSpec(in_channels=8, temb_dim=8, grid=4, hidden=16, action="stop-ratio",
                    init_table=(1.0, 0.95, 0.9, 0.6, 0.3, 0.0), init_spread=0.3)


def _params(tpm, sigma):
    n = sigma.numel()
    g = torch.Generator().manual_seed(0)
    return tpm(torch.randn(n, 8, 4, 4, generator=g), torch.randn(n, 8, generator=g), sigma)


def test_untrained_stop_ratio_tpm_follows_its_table_and_stops_where_it_jumps_to_zero():
    from tpdm_rl.algorithm.actions import STOP

    tpm = TimePredictionModule(STOP_SPEC)
    table = torch.tensor(STOP_SPEC.init_table)
    sigma = table[:-1].clone()
    act = tpm.deterministic(_params(tpm, sigma), "mode")
    nxt = torch.where(act == STOP, torch.zeros_like(sigma), act * sigma)
    torch.testing.assert_close(nxt, table[1:], atol=2e-3, rtol=0)
    assert act[-1] == STOP and bool((act[:-1] > 0).all())
    # a deterministic run from sigma 1 walks the table: 5 steps, the last one a stop
    s, steps = torch.ones(1), 0
    while float(s) > 0 and steps < 20:
        a = tpm.deterministic(_params(tpm, s), "mode").detach()
        s = torch.zeros(1) if float(a) == STOP else a * s
        steps += 1
    assert steps == 5


def test_stop_ratio_log_prob_matches_sampling_frequencies():
    """Draws from the counter streams follow the distribution whose log-prob the learner uses: the stop frequency
    is sigmoid(stop logit) and the ratio's logit has the predicted mean and std."""
    tpm = TimePredictionModule(STOP_SPEC)
    n = 20000
    sigma = torch.full((n,), 0.45)  # halfway between 0.6 and 0.3: p_stop = 1/2
    with torch.no_grad():
        params = _params(tpm, sigma)
        a = tpm.sample(params, torch.arange(n), torch.zeros(n, dtype=torch.int64))
    stop = a == 0
    p = torch.sigmoid(params[0]).mean()
    assert abs(stop.float().mean() - p) < 0.02
    z = torch.logit(a[~stop].double())
    assert abs(float(z.mean() - params[1][~stop].double().mean())) < 0.02
    assert abs(float(z.std() - params[2].exp().mean())) < 0.02
    # log-probs are finite for both kinds of action, and integrate: sum over stop + density of r
    lp = tpm.log_prob(params, a)
    assert bool(torch.isfinite(lp).all())
    r = torch.linspace(1e-4, 1 - 1e-4, 20001)
    one = tpm.log_prob(tuple(x[:1].expand(r.numel()) for x in params), r).exp()
    mass = float(torch.trapezoid(one, r)) + float(torch.sigmoid(params[0][0]))
    assert abs(mass - 1.0) < 1e-3


def test_stop_ratio_kl_and_entropy():
    tpm = TimePredictionModule(STOP_SPEC)
    with torch.no_grad():
        p = _params(tpm, torch.tensor([1.0, 0.45, 0.3]))
        assert torch.allclose(tpm.kl(p, p), torch.zeros(3), atol=1e-6)
        q = (p[0] + 1.0, p[1] + 0.5, p[2])
        assert bool((tpm.kl(p, q) > 0).all())
        assert bool(torch.isfinite(tpm.entropy(p)).all())


def test_stop_ratio_spec_round_trips_and_validates_its_table():
    assert TPMSpec.from_dict(STOP_SPEC.to_dict()) == STOP_SPEC
    for bad in ((), (1.0, 0.5), (1.0, 0.6, 0.7, 0.0)):
        with pytest.raises(ValueError, match="init_table"):
            TimePredictionModule(TPMSpec(8, 8, 4, action="stop-ratio", init_table=bad))


def test_init_stop_steps_moves_only_where_the_untrained_tpm_stops():
    """policy.init_stop_steps m: the untrained TPM keeps the table's ratios but stops after m steps (0: the table's
    own count); a spec written before the setting loads with 0."""
    from tpdm_rl.algorithm.actions import table_base

    table = torch.tensor([1.0, 0.95, 0.9, 0.0])
    on_table = torch.tensor([1.0, 0.95, 0.9])  # the sigma before step 1, 2 and 3
    stops = {m: (table_base(table, on_table, 3.0, m)[0] > 0).tolist() for m in (0, 1, 2, 3)}
    assert stops == {0: [False, False, True], 1: [True, True, True], 2: [False, True, True], 3: [False, False, True]}
    ratios = {m: table_base(table, on_table, 3.0, m)[1] for m in (0, 1, 2)}
    torch.testing.assert_close(ratios[1], ratios[0])
    torch.testing.assert_close(ratios[2], ratios[0])
    # the first decision of m = 1 is as sure as the table's own last one: p_stop 0.82
    assert torch.sigmoid(table_base(table, on_table[:1], 3.0, 1)[0]).item() == pytest.approx(1 / (1 + math.exp(-1.5)))
    spec = TPMSpec(8, 8, 4, action="stop-ratio", init_table=(1.0, 0.95, 0.9, 0.0), init_stop_steps=1)
    assert TPMSpec.from_dict(spec.to_dict()) == spec
    old = spec.to_dict()
    del old["init_stop_steps"]
    assert TPMSpec.from_dict(old).init_stop_steps == 0
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="init_stop_steps"):
            TimePredictionModule(TPMSpec(8, 8, 4, action="stop-ratio", init_table=(1.0, 0.95, 0.9, 0.0),
                                         init_stop_steps=bad))


def test_config_rejects_an_init_stop_steps_the_table_cannot_reach():
    from tpdm_rl.core.config import Config

    with pytest.raises(ValueError, match=r"init_stop_steps must be 0 \(the table's own 2 steps\) or 1..2.*got 3"):
        Config.model_validate({"policy": {"action": "stop-ratio", "init_table": [1, 0.5, 0], "init_stop_steps": 3}})
