"""Package helpers behind notebooks 04 (preference displacement) and 05 (the reward-KL frontier)."""

import math
import re

import pytest
import torch

from minidpo import bandit as B
from minidpo import evaluate as ev
from minidpo import world as W


# the exact review world --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def review():
    return B.make_review_world()


def test_review_world_tables(review):
    world, features, names = review
    assert world.reference_probs.shape == (3, 19) and features.shape == (19, 3) and len(set(names)) == 19
    assert torch.allclose(world.reference_probs.sum(-1), torch.ones(3, dtype=B.DTYPE), atol=1e-12)
    assert B.REVIEW_MOODS == W.MOODS  # the same moods as the GPT-2 world
    # the reward is the synthetic world's: positive minus negative words
    for name, r in zip(names, world.rewards[0].tolist()):
        assert r == name.count("+") - name.count("-")
    # an independent number: the positive prompt gives "+" probability P(len 1) * p_pos = 0.6 * 0.7
    plus = names.index("+")
    assert world.reference_probs[0, plus].item() == pytest.approx(0.6 * 0.7, abs=1e-12)
    # "++-" under the negative mood: 0.1 (length 3) * 3 (orderings) * 0.1^2 * 0.7
    assert world.reference_probs[1, names.index("++-")].item() == pytest.approx(0.1 * 3 * 0.01 * 0.7, abs=1e-12)
    with pytest.raises(ValueError, match="length probability"):
        B.make_review_world(max_words=2, length_probs=(1.0,))


def test_data_mass_and_log_ratios_by_hand(review):
    world, _, _ = review
    pairs = B.PreferencePairs(prompt=torch.tensor([0, 0]), chosen=torch.tensor([0, 1]), rejected=torch.tensor([1, 2]))
    probs = torch.full((3, 19), 1 / 19, dtype=B.DTYPE)
    mass = B.data_mass(probs, pairs, torch.tensor([1.0, 0.0, 0.0], dtype=B.DTYPE))
    # prompt 0: responses 0 and 1 were chosen, 2 only rejected, 16 never seen
    assert mass == pytest.approx({"chosen": 2 / 19, "rejected_only": 1 / 19, "unseen": 16 / 19})
    uniform_prompts = B.data_mass(probs, pairs)  # prompts 1 and 2 have no pairs: all unseen there
    assert uniform_prompts["unseen"] == pytest.approx((16 / 19 + 1 + 1) / 3)
    chosen, rejected = B.pair_log_ratios(probs, world.reference_probs, pairs)
    ref = world.reference_probs[0]
    assert chosen.tolist() == pytest.approx([math.log(1 / 19 / ref[0].item()), math.log(1 / 19 / ref[1].item())])
    assert rejected[1].item() == pytest.approx(math.log(1 / 19 / ref[2].item()))


def test_optimum_displaces_the_chosen_below_the_soft_max(review):
    """log pi*(y)/pi_ref(y) = r(y)/beta - log Z(x): negative exactly when r(y) < beta log Z(x)."""
    world, _, _ = review
    beta = 0.5
    star = world.optimal_policy(beta)
    log_ratio = torch.log(star) - torch.log(world.reference_probs)
    threshold = beta * B.log_partition(world.reference_probs, world.rewards, beta)  # (P,)
    assert torch.equal(log_ratio < 0, world.rewards < threshold[:, None])
    # Gibbs: the average log-ratio under pi_ref is -KL(pi_ref || pi*) < 0
    avg = (world.reference_probs * log_ratio).sum(-1)
    assert torch.allclose(avg, -B.kl_divergence(world.reference_probs, star), atol=1e-12)
    assert (avg < 0).all()


def test_train_policy_tabular_keeps_unseen_logits_and_loglinear_moves_them(review):
    world, features, _ = review
    pairs = B.sample_pairs(world, 60, seed=0)
    before = B.data_mass(world.reference_probs, pairs)
    tab = B.train_policy(world, pairs, beta=0.1, steps=100, lr=0.05)
    lin = B.train_policy(world, pairs, beta=0.1, features=features, steps=100, lr=0.05, keep_history=True)
    assert len(lin.history) == 100 and len(lin.losses) == 100 and lin.losses[-1] < lin.losses[0]
    # tabular: the gradient is e_w - e_l, so an unseen response's logit never moves and its mass only shrinks
    seen = torch.zeros(3, 19, dtype=torch.bool)
    seen[pairs.prompt, pairs.chosen] = True
    seen[pairs.prompt, pairs.rejected] = True
    logit_change = torch.log(tab.probs) - torch.log(world.reference_probs)
    for x in range(3):
        unseen = logit_change[x][~seen[x]]
        assert torch.allclose(unseen, unseen[0].expand_as(unseen), atol=1e-9)  # all shifted by -log of the same Z
    assert B.data_mass(tab.probs, pairs)["unseen"] < before["unseen"]
    # log-linear: shared weights carry the mass to responses the data never shows
    assert B.data_mass(lin.probs, pairs)["unseen"] > before["unseen"] + 0.2
    chosen, rejected = B.pair_log_ratios(lin.probs, world.reference_probs, pairs)
    assert chosen.mean() < 0 and rejected.mean() < chosen.mean()  # displacement


def test_train_policy_rpo_term_and_validation(review):
    world, features, _ = review
    pairs = B.sample_pairs(world, 60, seed=0)
    plain = B.train_policy(world, pairs, beta=0.1, features=features, steps=60, lr=0.05)
    rpo = B.train_policy(world, pairs, beta=0.1, features=features, steps=60, lr=0.05, rpo_alpha=1.0)
    c_plain, _ = B.pair_log_ratios(plain.probs, world.reference_probs, pairs)
    c_rpo, _ = B.pair_log_ratios(rpo.probs, world.reference_probs, pairs)
    assert c_rpo.mean() > c_plain.mean() + 1.0
    # zero steps: pi_ref itself
    assert torch.allclose(B.train_policy(world, pairs, 0.1, steps=0).probs, world.reference_probs, atol=1e-12)
    with pytest.raises(ValueError, match="features must have shape"):
        B.train_policy(world, pairs, 0.1, features=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="rpo_alpha"):
        B.train_policy(world, pairs, 0.1, rpo_alpha=-1.0)


# best-of-n ------------------------------------------------------------------------------------------------------

def test_best_of_n_by_hand_and_the_bound():
    # rewards 0, 1, 2 equally likely: best of 2 keeps 2 w.p. 1 - (2/3)^2 = 5/9, 1 w.p. 3/9, 0 w.p. 1/9
    out = ev.best_of_n([[0.0, 1.0, 2.0]], [1, 2])
    assert out[0]["reward"] == pytest.approx(1.0) and out[0]["kl"] == pytest.approx(0.0, abs=1e-12)
    q = [1 / 9, 3 / 9, 5 / 9]
    assert out[1]["reward"] == pytest.approx(3 / 9 + 2 * 5 / 9)
    assert out[1]["kl"] == pytest.approx(sum(v * math.log(v * 3) for v in q))
    assert out[1]["kl_bound"] == pytest.approx(math.log(2) - 0.5)
    assert ev.best_of_n_kl_bound(1) == 0.0
    with pytest.raises(ValueError):
        ev.best_of_n_kl_bound(0)


def test_best_of_n_kl_approaches_the_bound_without_ties_and_stays_below_it():
    distinct = [[float(i) for i in range(4000)]]  # no ties: the bound is (almost) reached
    with_ties = [[float(i % 3) for i in range(4000)]]  # three reward levels: far below the bound
    for n in (2, 4, 16):
        no_ties = ev.best_of_n(distinct, [n])[0]
        tied = ev.best_of_n(with_ties, [n])[0]
        assert no_ties["kl"] <= no_ties["kl_bound"] + 1e-12
        assert no_ties["kl"] == pytest.approx(no_ties["kl_bound"], abs=5e-3)
        assert tied["kl"] < tied["kl_bound"]
        assert tied["kl"] <= math.log(3) + 1e-12  # never more than log(#levels)
    assert ev.best_of_n(with_ties, [16])[0]["kl_bound"] - ev.best_of_n(with_ties, [16])[0]["kl"] > 0.7


# next-token mass --------------------------------------------------------------------------------------------------

class _Bigram(torch.nn.Module):
    """A model whose next-token distribution is a fixed softmax(logits), whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits_ = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None):
        out = self.logits_.expand(*input_ids.shape, -1)
        return type("Out", (), {"logits": out})()


class _Tok:
    """Whitespace tokenizer over a fixed vocabulary (a word with its leading space is one token)."""

    vocab = ["<eos>", "<pad>", " a", " b", "x", " x"]
    eos_token, eos_token_id, pad_token_id = "<eos>", 0, 1

    def __call__(self, text, add_special_tokens=False):
        if text in self.vocab:
            return {"input_ids": [self.vocab.index(text)]}
        return {"input_ids": [self.vocab.index(t) for t in re.findall(r" ?[^ ]+", text)]}


def test_next_token_mass_sums_groups():
    probs = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.15, 0.25])
    model = _Bigram(torch.log(probs.clamp(min=1e-12)))
    out = ev.next_token_mass(model, _Tok(), ["x", "x x"], {"ab": [" a", " b"], "end": ["<eos>"]})
    assert out["ab"] == pytest.approx(0.5, abs=1e-6) and out["end"] == pytest.approx(0.1, abs=1e-6)
    assert out["other"] == pytest.approx(0.4, abs=1e-6)
    with pytest.raises(ValueError, match="groups"):
        ev.next_token_mass(model, _Tok(), ["x"], {"a": [" a"], "again": [" a"]})
    with pytest.raises(ValueError, match="not one"):
        ev.next_token_mass(model, _Tok(), ["x"], {"two": [" a b"]})


# plots --------------------------------------------------------------------------------------------------------------

def test_plots_draw_the_numbers_they_are_given():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minidpo import plots

    fig = plots.plot_mass_shift({"a": {"x": 0.25, "y": 0.75}, "b": {"x": 0.6, "y": 0.4}})
    widths = sorted(round(p.get_width(), 6) for p in fig.axes[0].patches)
    assert widths == [0.25, 0.4, 0.6, 0.75]
    plt.close(fig)

    bon = ev.best_of_n([[0.0, 1.0, 2.0]], [1, 2, 4])
    paths = {"run": [{"kl": 0.0, "reward": 0.0}, {"kl": 2.0, "reward": 1.5}]}
    fig = plots.plot_frontier(paths, points={"PFT": {"kl": 0.3, "reward": 0.4}}, best_of_n=bon,
                              reference={"reward": 0.0})
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert list(lines["run"].get_xdata()) == [0.0, 2.0]
    assert list(lines["best-of-n from π_ref (exact KL)"].get_xdata()) == pytest.approx([r["kl"] for r in bon])
    assert list(lines["best-of-n at log n − (n−1)/n"].get_xdata()) == pytest.approx([r["kl_bound"] for r in bon])
    plt.close(fig)

    fig = plots.plot_overoptimization([0, 1, 2], [0.0, 1.0, 0.5], [0.0, 0.2, 0.4], objective=[0.0, 0.5, -1.0],
                                      kl=[0.0, 1.0, 3.0], grammatical=[1.0, 0.8, 0.3])
    assert len(fig.axes) == 4  # reward + its twin, KL + its twin
    plt.close(fig)

    fig = plots.plot_response_probs(["a", "b"], {"p": [0.9, 0.1]}, highlight=[False, True], log=True)
    bars = fig.axes[0].patches
    assert [b.get_hatch() for b in bars] == [None, "///"] and fig.axes[0].get_yscale() == "log"
    plt.close(fig)
