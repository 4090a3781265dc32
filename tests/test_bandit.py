"""The exact world: the closed-form optimum, the objective it maximises, and tabular DPO / IPO against it."""

import math

import pytest
import torch

from minidpo import bandit as B

BETA = 0.5


@pytest.fixture(scope="module")
def world():
    return B.make_world(n_prompts=3, n_responses=5, seed=0)


# optimal_policy ------------------------------------------------------------------------------------------------

def test_optimal_policy_is_normalised_and_matches_an_independent_formula(world):
    star = B.optimal_policy(world.reference_probs, world.rewards, BETA)
    assert torch.allclose(star.sum(-1), torch.ones(3, dtype=star.dtype), atol=1e-12)
    # the formula as written in eq:dpo_opt_policy, in plain Python, no softmax
    for x in range(3):
        ref, r = world.reference_probs[x].tolist(), world.rewards[x].tolist()
        Z = sum(p * math.exp(v / BETA) for p, v in zip(ref, r))
        for y in range(5):
            assert star[x, y].item() == pytest.approx(ref[y] * math.exp(r[y] / BETA) / Z, rel=1e-12)


def test_large_beta_gives_the_reference_and_small_beta_the_best_response(world):
    ref, r = world.reference_probs, world.rewards
    assert torch.allclose(B.optimal_policy(ref, r, 1e6), ref, atol=1e-5)
    assert torch.allclose(B.optimal_policy(ref, r, float("inf")), ref, rtol=0, atol=1e-15)
    near_zero = B.optimal_policy(ref, r, 1e-3)
    best = r.argmax(-1)
    assert (near_zero.gather(1, best[:, None]) > 1 - 1e-6).all()


def test_optimal_policy_float32_and_zero_reference_mass():
    ref = torch.tensor([[0.5, 0.5, 0.0]])
    r = torch.tensor([[0.0, 1.0, 100.0]])  # the best reward sits where pi_ref is 0: pi* never goes there
    star = B.optimal_policy(ref, r, 0.01)
    assert star.dtype == torch.float32 and star[0, 2] == 0 and star[0, 1] > 0.999


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_optimal_policy_rejects_bad_beta(world, bad):
    with pytest.raises(ValueError, match="beta"):
        B.optimal_policy(world.reference_probs, world.rewards, bad)


def test_optimal_policy_rejects_shape_mismatch(world):
    with pytest.raises(ValueError, match="shape mismatch"):
        B.optimal_policy(world.reference_probs, world.rewards[:, :4], BETA)


def test_optimal_policy_ignores_a_per_prompt_reward_shift(world):
    shifted = world.rewards + torch.tensor([[3.0], [-7.0], [0.5]], dtype=world.rewards.dtype)
    assert torch.allclose(world.optimal_policy(BETA), B.optimal_policy(world.reference_probs, shifted, BETA))


# the objective ---------------------------------------------------------------------------------------------------

def test_no_random_policy_beats_the_optimum_and_the_gap_is_beta_kl(world):
    star = world.optimal_policy(BETA)
    best = world.objective(star, BETA)
    log_Z = B.log_partition(world.reference_probs, world.rewards, BETA)
    assert best.item() == pytest.approx(BETA * log_Z.mean().item(), abs=1e-12)
    policies = torch.cat([B.random_policies(3000, 3, 5, seed=0),
                          0.99 * star + 0.01 * B.random_policies(1000, 3, 5, seed=1)])  # some very close to pi*
    values = world.objective(policies, BETA)
    assert (values < best).all()
    gap = best - values
    kl = B.kl_divergence(policies, star.expand_as(policies)).mean(-1)
    assert torch.allclose(gap, BETA * kl, atol=1e-12)


# tabular DPO and IPO ----------------------------------------------------------------------------------------------

def test_dpo_on_many_bradley_terry_pairs_approaches_the_optimum(world):
    few = B.train_tabular(world, B.sample_pairs(world, 2_000, seed=0), BETA, steps=150)
    many = B.train_tabular(world, B.sample_pairs(world, 200_000, seed=0), BETA, steps=150)
    kl_few, kl_many = B.kl_to_optimum(world, few.probs, BETA), B.kl_to_optimum(world, many.probs, BETA)
    assert kl_many < 2e-3
    assert kl_many < kl_few / 5  # the error shrinks roughly like 1 / n
    start = B.kl_to_optimum(world, world.reference_probs, BETA)
    assert kl_many < start / 50


def test_sampled_pairs_follow_bradley_terry():
    world = B.make_world(n_prompts=1, n_responses=2, seed=3)
    pairs = B.sample_pairs(world, 20_000, seed=0)
    counts = pairs.counts(1, 2)[0].double()
    first_wins = counts[0, 1] / counts.sum()
    expected = torch.sigmoid(world.rewards[0, 0] - world.rewards[0, 1]).item()
    assert first_wins.item() == pytest.approx(expected, abs=0.015)  # 4 standard errors


def test_ipo_stops_at_its_target_while_dpo_drives_the_loser_to_zero():
    # Two responses, deterministic preferences: the winner wins every pair (Azar et al. 2023, Sec. 4.2).
    world = B.make_world(n_prompts=1, n_responses=2, seed=3)
    pairs = B.sample_pairs(world, 200, seed=0, deterministic=True)
    winner = int(world.rewards[0].argmax())
    loser = 1 - winner
    log_ref = world.reference_probs[0].log()

    def margin(probs):  # h = log-ratio of the winner minus that of the loser
        log_ratio = probs[0].log() - log_ref
        return (log_ratio[winner] - log_ratio[loser]).item()

    ipo_short = B.train_tabular(world, pairs, BETA, "ipo", steps=300, lr=0.05, optimizer="adam")
    ipo_long = B.train_tabular(world, pairs, BETA, "ipo", steps=1500, lr=0.05, optimizer="adam")
    assert margin(ipo_long.probs) == pytest.approx(1 / (2 * BETA), abs=1e-6)  # IPO's finite target
    assert torch.allclose(ipo_short.probs, ipo_long.probs, atol=1e-6)  # and it stays there

    dpo_short = B.train_tabular(world, pairs, BETA, "sigmoid", steps=300, lr=0.05, optimizer="adam")
    dpo_long = B.train_tabular(world, pairs, BETA, "sigmoid", steps=1500, lr=0.05, optimizer="adam")
    assert dpo_long.probs[0, loser] < dpo_short.probs[0, loser] / 10  # still falling
    assert dpo_long.probs[0, loser] < 1e-4
    assert margin(dpo_long.probs) > 10 * margin(ipo_long.probs)


def test_training_starts_at_the_reference(world):
    pairs = B.sample_pairs(world, 100, seed=0)
    assert torch.allclose(B.train_tabular(world, pairs, BETA, steps=0).probs, world.reference_probs)


def test_lbfgs_reaches_the_closed_form_ipo_optimum_with_deterministic_labels():
    # An ill-conditioned fit: L-BFGS must be given room in its line search, or it stalls short of the optimum.
    world = B.make_world(n_prompts=3, n_responses=5, seed=0)
    pairs = B.sample_pairs(world, 300, seed=1, deterministic=True)
    for beta in (0.1, 0.5):  # without max_eval these stopped 0.12 and 0.007 away from the optimum
        trained = B.train_tabular(world, pairs, beta, loss_type="ipo", steps=500).probs
        assert (trained - B.ipo_optimum(world, pairs, beta)).abs().max().item() < 1e-5


# Plackett-Luce rankings (DPO paper, Appendix A.3) and the reward model DPO is (Theorem 1) ------------------------

@pytest.fixture(scope="module")
def world4():
    return B.make_world(n_prompts=3, n_responses=4, seed=0)


def test_plackett_luce_loss_matches_its_formula_and_is_dpo_for_two():
    g = torch.Generator().manual_seed(0)
    pol, ref = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(2))
    beta = 0.3
    losses = B.plackett_luce_loss(pol, ref, beta)
    for i in range(6):  # -log prod_k exp(u_k) / sum_{j >= k} exp(u_j), in plain Python
        u = (beta * (pol[i] - ref[i])).tolist()
        expected = -sum(u[k] - math.log(sum(math.exp(v) for v in u[k:])) for k in range(4))
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)
    from minidpo import preference_loss
    dpo, _, _ = preference_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=beta)
    assert torch.allclose(B.plackett_luce_loss(pol[:, :2], ref[:, :2], beta), dpo, atol=1e-12)
    # negative control: the order matters (the same responses ranked the other way give another loss)
    assert not torch.allclose(B.plackett_luce_loss(pol.flip(-1), ref.flip(-1), beta), losses)


def test_plackett_luce_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="must both be"):
        B.plackett_luce_loss(torch.zeros(3, 1), torch.zeros(3, 1), 0.1)
    with pytest.raises(ValueError, match="beta"):
        B.plackett_luce_loss(torch.zeros(3, 2), torch.zeros(3, 2), 0.0)


def test_sampled_rankings_follow_plackett_luce(world4):
    rankings = B.sample_rankings(world4, 40_000, seed=0)  # all 4 responses ranked
    first = torch.zeros(3, 4, dtype=torch.float64)
    first.index_put_((rankings.prompt, rankings.order[:, 0]), torch.ones(len(rankings), dtype=torch.float64),
                     accumulate=True)
    first /= first.sum(-1, keepdim=True)
    assert torch.allclose(first, torch.softmax(world4.rewards, -1), atol=0.015)  # P(top = y) = softmax(r)
    assert not torch.allclose(first, torch.softmax(-world4.rewards, -1), atol=0.015)  # control: reversed order
    assert all(len(set(row)) == 4 for row in rankings.order.tolist())  # distinct responses


@pytest.mark.parametrize("k", [3, 4])
def test_plackett_luce_fit_on_rankings_lands_on_the_optimum(world4, k):
    rankings = B.sample_rankings(world4, 20_000, k=k, seed=1)
    fit = B.train_tabular_rankings(world4, rankings, BETA)
    kl_reference = B.kl_to_optimum(world4, world4.reference_probs, BETA)
    assert B.kl_to_optimum(world4, fit.probs, BETA) < kl_reference / 300
    # negative control: the rankings read worst-first land far from pi*
    flipped = B.Rankings(rankings.prompt, rankings.order.flip(-1))
    assert B.kl_to_optimum(world4, B.train_tabular_rankings(world4, flipped, BETA).probs, BETA) > kl_reference


def test_dpo_is_the_bradley_terry_reward_model_under_a_change_of_variables(world):
    # Theorem 1 / Sec. 5.1: fitting a reward model and then solving RLHF exactly gives DPO's policy
    pairs = B.sample_pairs(world, 20_000, seed=2)
    r_hat = B.fit_reward_model(world, pairs)
    dpo = B.train_tabular(world, pairs, BETA).probs
    assert (B.optimal_policy(world.reference_probs, r_hat, BETA) - dpo).abs().max() < 1e-3
    # negative control: the same reward model solved at another beta is another policy
    assert (B.optimal_policy(world.reference_probs, r_hat, 2 * BETA) - dpo).abs().max() > 0.02
