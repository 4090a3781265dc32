"""Notebook 06's helpers: where DPO and IPO stop on the exact world, log-prob shifts, length statistics, plots."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minidpo import bandit as B  # noqa: E402
from minidpo import evaluate as ev  # noqa: E402
from minidpo import plots  # noqa: E402


def _pairs(rows):
    """PreferencePairs from (prompt, chosen, rejected) triples."""
    t = torch.tensor(rows, dtype=torch.long)
    return B.PreferencePairs(prompt=t[:, 0], chosen=t[:, 1], rejected=t[:, 2])


def _ipo_loss(world, pairs, probs, beta):
    counts = pairs.counts(world.n_prompts, world.n_responses).to(torch.float64)
    w = counts / counts.sum()
    u = torch.log(probs) - torch.log(world.reference_probs)
    h = u[:, :, None] - u[:, None, :]  # h[x, winner, loser]
    return (w * (h - 1 / (2 * beta)) ** 2).sum()


# ipo_optimum ---------------------------------------------------------------------------------------------------

def test_ipo_optimum_two_responses_is_the_target_margin():
    # One prompt, two responses, the first always wins: IPO puts log-ratio margin exactly 1/(2 beta) between them.
    world = B.ExactWorld(reference_probs=torch.tensor([[0.3, 0.7]], dtype=torch.float64),
                         rewards=torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                         prompt_probs=torch.ones(1, dtype=torch.float64))
    pairs = _pairs([(0, 0, 1)] * 10)
    for beta in (0.1, 0.5, 2.0):
        probs = B.ipo_optimum(world, pairs, beta)
        odds = 0.3 / 0.7 * math.exp(1 / (2 * beta))  # pi(winner) / pi(loser)
        assert probs[0, 1].item() == pytest.approx(1 / (1 + odds), rel=1e-12)
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("deterministic", [True, False])
def test_ipo_optimum_is_a_stationary_point_and_beats_training(deterministic):
    world = B.make_world(n_prompts=3, n_responses=5, seed=0)
    pairs = B.sample_pairs(world, 3000, seed=1, deterministic=deterministic)
    beta = 0.3
    probs = B.ipo_optimum(world, pairs, beta)
    theta = torch.log(probs).clone().requires_grad_(True)
    _ipo_loss(world, pairs, torch.softmax(theta, -1), beta).backward()
    assert theta.grad.abs().max().item() < 1e-10  # gradient of the empirical IPO loss vanishes there
    trained = B.train_tabular(world, pairs, beta, loss_type="ipo", steps=1500, lr=0.05, optimizer="adam").probs
    assert _ipo_loss(world, pairs, probs, beta) <= _ipo_loss(world, pairs, trained, beta) + 1e-12
    assert (trained - probs).abs().max().item() < 2e-3  # Adam from pi_ref ends on the closed form


def test_ipo_optimum_moves_with_beta_and_never_compared_responses_keep_their_ratio():
    world = B.make_world(n_prompts=1, n_responses=4, seed=0)
    pairs = _pairs([(0, 0, 1)] * 3 + [(0, 1, 2)] * 2)  # response 3 never compared
    small, large = B.ipo_optimum(world, pairs, 0.1), B.ipo_optimum(world, pairs, 10.0)
    ratio = lambda p: (p / world.reference_probs)[0]  # noqa: E731
    # response 3 and the middle of the chain (u = 0 on both) share their ratio to pi_ref
    assert ratio(small)[3].item() == pytest.approx(ratio(small)[1].item(), rel=1e-9)
    assert small[0, 2] < large[0, 2]  # smaller beta, larger target margin: the loser falls further
    assert torch.allclose(B.ipo_optimum(world, pairs, 1e9), world.reference_probs, atol=1e-8)


# dpo_optimum_exists ----------------------------------------------------------------------------------------------

def test_dpo_optimum_exists_follows_the_comparison_graph():
    world = B.make_world(n_prompts=4, n_responses=3, seed=0)
    pairs = _pairs([
        (0, 0, 1), (0, 1, 2), (0, 2, 0),  # a cycle of wins: every response beats every other via a chain
        (1, 0, 1), (1, 0, 1),  # response 0 never loses: no finite optimum
        (2, 0, 1), (2, 1, 0), (2, 2, 1), (2, 1, 2),  # everyone both wins and loses against response 1
        # prompt 3: no pairs
    ])
    assert B.dpo_optimum_exists(world, pairs).tolist() == [True, False, True, True]


def test_dpo_optimum_exists_deterministic_vs_bradley_terry():
    world = B.make_world(n_prompts=3, n_responses=5, seed=0)
    assert not B.dpo_optimum_exists(world, B.sample_pairs(world, 5000, seed=0, deterministic=True)).any()
    assert B.dpo_optimum_exists(world, B.sample_pairs(world, 50_000, seed=0)).all()


# logprob_shift, length_preference --------------------------------------------------------------------------------

def test_logprob_shift_numbers():
    rows = [{}] * 3  # only their number matters when log-probs are given
    policy = (torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-6.0, -5.0, -4.0]))
    reference = {"chosen_logps": torch.tensor([-2.0, -2.0, -2.0]), "rejected_logps": torch.tensor([-3.0, -3.0, -3.0])}
    out = ev.logprob_shift(policy, reference, rows)
    assert out["n"] == 3
    assert out["chosen"] == pytest.approx(0.0)  # +1, 0, -1
    assert out["rejected"] == pytest.approx(-2.0)  # -3, -2, -1
    assert out["margin"] == pytest.approx(2.0)  # 4, 2, 0
    assert out["chosen_se"] == pytest.approx(1 / math.sqrt(3))  # sample sd 1, n = 3
    same = ev.logprob_shift(reference, reference, rows)
    assert same["chosen"] == same["rejected"] == 0.0
    with pytest.raises(ValueError, match="expected \\(2,\\)"):
        ev.logprob_shift(policy, reference, rows[:2])
    with pytest.raises(ValueError, match="no pairs"):
        ev.logprob_shift(policy, reference, [])


def test_length_preference_numbers():
    pairs = {"chosen": [" a b c .", " a .", " a b ."], "rejected": [" a .", " a b c d .", " x y ."],
             "chosen_reward": [1.0, 0.0, 2.0], "rejected_reward": [0.0, 1.0, 2.0]}
    out = ev.length_preference(pairs)
    assert out["n"] == 3 and out["n_unequal"] == 2
    assert out["chosen_longer"] == pytest.approx(0.5)
    assert out["chosen_words"] == pytest.approx(3.0) and out["rejected_words"] == pytest.approx(10 / 3)
    assert out["lower_reward_chosen"] == pytest.approx(1 / 3)
    assert ev.length_preference({"chosen": ["a b"], "rejected": ["a"]})["lower_reward_chosen"] is None
    with pytest.raises(ValueError, match="no pairs"):
        ev.length_preference({"chosen": [], "rejected": []})


# plots -----------------------------------------------------------------------------------------------------------

def test_variant_plots_draw_what_they_are_given():
    history = [{"step": s, "loss": 1.0 / s} for s in range(1, 21)]
    fig = plots.plot_loss_curves({"A": history, "B": history, "C": history, "D": history}, ncols=3)
    assert sum(ax.get_visible() for ax in fig.axes) == 4 and len(fig.axes) == 6
    results = {"A": {"reward": 1.0, "reward_se": 0.1, "kl": 2.0, "kl_se": 0.2},
               "B": {"reward": 0.5, "reward_se": 0.1, "kl": 0.2, "kl_se": 0.05}}
    fig = plots.plot_frontier_points(results, reference={"reward": 0.0})
    assert fig.axes[0].get_xscale() == "symlog"
    shifts = {"A": {"chosen": -1.0, "rejected": -3.0}, "B": {"chosen": 0.5, "rejected": -0.5}}
    fig = plots.plot_logprob_shift(shifts)
    heights = sorted(p.get_height() for p in fig.axes[0].patches)
    assert heights == [-3.0, -1.0, -0.5, 0.5]
    fig = plots.plot_length_shift({"A": (7.0, 9.0), "B": (6.0, 6.5)}, reference_length=7.4)
    assert len(fig.axes[0].collections) >= 3  # the bars and two sets of dots
    fig = plots.plot_probability_paths({"DPO": [0.1, 0.01, 0.001], "IPO": [0.1, 0.05, 0.05]}, targets={"IPO": 0.05},
                                       reference=0.1)
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes[0].lines) == 4
    plt.close("all")


def test_margin_paths_and_coinciding_frontier_points():
    history = [{"step": s, "rewards/margins": 0.01 * s} for s in range(1, 31)]  # beta 0.1: h = 0.1 * step
    fig = plots.plot_margin_paths({"DPO": history, "IPO": history}, {"DPO": 0.1, "IPO": 0.1}, stops={"IPO": 5.0},
                                  window=1)
    left, right = fig.axes[:2]
    assert right.lines[0].get_ydata()[-1] == pytest.approx(3.0)  # h = margins / beta
    assert any(line.get_ydata()[0] == 5.0 for line in left.lines)  # the stop line, left panel only
    assert not any(len(line.get_ydata()) == 2 and line.get_ydata()[0] == 5.0 for line in right.lines)
    same = {"reward": 1.0, "kl": 2.0}
    fig = plots.plot_frontier_points({"KTO": same, "APO-zero": same, "DPO": {"reward": 1.5, "kl": 2.0}})
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["DPO", "KTO = APO-zero"]
    plt.close("all")


# label flips at a known rate (noise models of cDPO / robust DPO) ------------------------------------------------

def test_sample_pairs_flip_rate_flips_that_fraction_and_keeps_the_clean_draw():
    world = B.make_world(n_prompts=3, n_responses=5, seed=0)
    clean = B.sample_pairs(world, 20_000, seed=3, deterministic=True)
    noisy = B.sample_pairs(world, 20_000, seed=3, deterministic=True, flip_rate=0.2)
    assert torch.equal(clean.prompt, noisy.prompt)  # same prompts and responses: only labels differ
    flipped = (clean.chosen != noisy.chosen).double().mean().item()
    assert flipped == pytest.approx(0.2, abs=0.01)
    assert torch.equal(B.sample_pairs(world, 500, seed=3, flip_rate=0.0).chosen,
                       B.sample_pairs(world, 500, seed=3).chosen)  # eps = 0 is the old labeller
    with pytest.raises(ValueError, match="flip_rate"):
        B.sample_pairs(world, 10, flip_rate=0.5)


def test_label_pairs_flip_rate_on_deterministic_labels():
    from minidpo import world as W

    prompts = ["review : the film was great . the plot is"] * 4000
    completions = [[" good .", " bad ."]] * 4000  # rewards +1 and -1
    clean = W.label_pairs(prompts, completions, bt_scale=0)
    noisy = W.label_pairs(prompts, completions, bt_scale=0, flip_rate=0.25)
    assert W.label_noise(clean)["measured"] == 0.0
    assert W.label_noise(noisy)["measured"] == pytest.approx(0.25, abs=0.025)
    assert W.label_noise(noisy)["expected"] == pytest.approx(0.25)  # p_chosen carries the flip
    with pytest.raises(ValueError, match="flip_rate"):
        W.label_pairs(prompts[:1], completions[:1], flip_rate=-0.1)


# KTO's reference point on mismatched pairs ------------------------------------------------------------------------

def test_kto_reference_point_by_hand_and_its_negative_control():
    from minidpo.losses import kto_reference_point

    policy = torch.tensor([-3.0, -5.0, -2.0, -6.0])
    reference = torch.tensor([-4.0, -4.5, -2.5, -5.0])
    # log-ratios +1, -0.5, +0.5, -1 -> mean 0; one more positive row -> mean 0.4
    assert kto_reference_point(policy, reference).item() == pytest.approx(0.0)
    assert kto_reference_point(torch.cat([policy, torch.tensor([-1.0])]),
                               torch.cat([reference, torch.tensor([-3.0])])).item() == pytest.approx(0.4)
    # clamped at 0, detached
    assert kto_reference_point(reference, policy + 0.0).item() == pytest.approx(0.0)
    lp = torch.tensor([-1.0, -1.0], requires_grad=True)
    assert not kto_reference_point(lp, torch.tensor([-2.0, -3.0])).requires_grad


def test_kto_mismatched_features_pair_each_prompt_with_the_next_rows_completions():
    from minidpo.train import kto_mismatched_features

    rows = [{"chosen_input_ids": [1, 2, 10, 11], "chosen_labels": [-100, -100, 10, 11],
             "rejected_input_ids": [1, 2, 12], "rejected_labels": [-100, -100, 12]},
            {"chosen_input_ids": [3, 20], "chosen_labels": [-100, 20],
             "rejected_input_ids": [3, 21, 22], "rejected_labels": [-100, 21, 22]}]
    out = kto_mismatched_features(rows)
    assert out[0] == {"chosen_input_ids": [1, 2, 20], "chosen_labels": [-100, -100, 20],
                      "rejected_input_ids": [1, 2, 21, 22], "rejected_labels": [-100, -100, 21, 22]}
    assert out[1]["chosen_input_ids"] == [3, 10, 11] and out[1]["rejected_labels"] == [-100, 12]
    # negative control: the matched rows give back the original pairs, which the estimator must not use
    assert out[0]["chosen_input_ids"] != rows[0]["chosen_input_ids"]
    with pytest.raises(ValueError, match="at least 2"):
        kto_mismatched_features(rows[:1])


def test_kto_training_logs_its_reference_point_from_mismatched_pairs():
    """train_dpo's KTO logs z0 ("kl"); both with cached and with live reference log-probs it is the estimator on
    the mismatched rows, so the two runs agree; z0 = 0 at step 0 (pi_theta = pi_ref: every log-ratio is 0)."""
    from _fixtures import fresh_model, make_pairs
    from minidpo.tokenizer import train_tokenizer
    from minidpo.train import DPOConfig, train_dpo

    pairs, corpus = make_pairs()
    tok = train_tokenizer(corpus, model_max_length=64)
    runs = []
    for precompute in (True, False):
        cfg = DPOConfig(loss_type="kto", beta=0.5, batch_size=8, lr=5e-3, max_steps=8, warmup_steps=2,
                        cache_dir=None, show_progress=False, precompute_ref=precompute)
        runs.append(train_dpo(fresh_model(tok), tok, pairs, cfg, log=lambda *a: None).history)
    z0 = [[r["kl"] for r in h] for h in runs]
    assert z0[0][0] == 0.0 and all(v >= 0 for v in z0[0])
    torch.testing.assert_close(torch.tensor(z0[0]), torch.tensor(z0[1]), rtol=1e-4, atol=1e-5)


def test_robust_dpo_minimiser_on_unflipped_labels_and_where_it_has_none():
    """Robust DPO (eps) on Bradley-Terry labels nobody flipped: for a pair won at rate p_hat its empirical loss is
    minimised where sigma(beta h) = (p_hat - eps) / (1 - 2 eps), which exists only while p_hat < 1 - eps."""
    def fit(reward_gap):
        world = B.ExactWorld(reference_probs=torch.tensor([[0.5, 0.5]], dtype=torch.float64),
                             rewards=torch.tensor([[reward_gap, 0.0]], dtype=torch.float64),
                             prompt_probs=torch.ones(1, dtype=torch.float64))
        pairs = B.sample_pairs(world, 20_000, seed=0)
        p_hat = (pairs.chosen == 0).double().mean().item()
        probs = B.train_tabular(world, pairs, 1.0, loss_type="robust", label_smoothing=0.1, steps=300).probs
        return p_hat, math.log(probs[0, 0] / probs[0, 1])

    p_hat, h = fit(1.0)  # p = sigma(1) = 0.73 < 0.9: a finite minimiser, off the clean one (logit p_hat)
    assert torch.sigmoid(torch.tensor(h)).item() == pytest.approx((p_hat - 0.1) / 0.8, abs=1e-4)
    p_hat, h = fit(3.0)  # negative control: p = 0.95 > 0.9, the loss falls without bound and h runs away
    assert p_hat > 0.9 and h > 20
