"""minidpo.seeds and minidpo.reward_model: the machinery every multi-seed claim and learned reward rests on."""

import numpy as np
import pytest
import torch

from minidpo import world as w
from minidpo.reward_model import fit_reward_model
from minidpo.seeds import bootstrap_interval, holds_for_all, over_seeds, summarize


def test_bootstrap_interval_contains_median_and_is_inside_the_values():
    s = bootstrap_interval([3.0, 1.0, 2.0, 10.0, 4.0])
    assert s.median == 3.0
    assert 1.0 <= s.low <= s.median <= s.high <= 10.0
    assert s.low < s.high  # five different values: the interval has width


def test_bootstrap_interval_coverage_is_near_nominal():
    # median of N(0,1) samples of size 25: a 90% interval should cover 0 in roughly 90% of repeats
    rng = np.random.default_rng(1)
    covered = [bootstrap_interval(rng.normal(size=25), level=0.9, n_boot=1000, seed=i) for i in range(200)]
    rate = np.mean([s.low <= 0 <= s.high for s in covered])
    assert 0.82 <= rate <= 0.97, rate


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [[1.0, 2.0]]])
def test_bootstrap_interval_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        bootstrap_interval(bad)


def test_over_seeds_summarize_and_holds_for_all():
    rows = over_seeds(lambda s: {"x": float(s), "y": 10.0 - s}, seeds=[0, 1, 2, 3, 4])
    assert [r["seed"] for r in rows] == [0, 1, 2, 3, 4]
    summary = summarize(rows)
    assert set(summary) == {"x", "y"} and summary["x"].median == 2.0 and summary["y"].median == 8.0
    assert holds_for_all(rows, lambda r: r["y"] > r["x"]) == (True, [])  # 10 - s > s for s < 5
    assert holds_for_all(rows, lambda r: r["y"] > r["x"] + 5) == (False, [3, 4])  # 10 - s > s + 5 only for s < 2.5


def test_holds_for_all_names_the_failing_seeds():
    rows = over_seeds(lambda s: {"x": float(s)}, seeds=[0, 1, 2, 3, 4])
    assert holds_for_all(rows, lambda r: r["x"] < 10) == (True, [])
    assert holds_for_all(rows, lambda r: r["x"] < 3) == (False, [3, 4])  # negative control: a claim that fails


def _pairs(n, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    words = list(w.POSITIVE + w.NEGATIVE + w.NEUTRAL)
    prompts, completions = [], []
    for _ in range(n):
        a = " the film was " + " ".join(rng.choice(words, size=2)) + " ."
        b = " the plot is " + " ".join(rng.choice(words, size=2)) + " ."
        prompts.append("review :")
        completions.append([a, b])
    return w.label_pairs(prompts, completions, bt_scale=scale, seed=seed)


def test_reward_model_learns_the_true_reward_up_to_scale():
    model = fit_reward_model(_pairs(2000, 0), l2=1e-3)
    pos = np.mean([model(x) for x in w.POSITIVE])
    neg = np.mean([model(x) for x in w.NEGATIVE])
    neutral = np.mean([abs(model(x)) for x in w.NEUTRAL])
    assert pos > 0.6 and neg < -0.6 and neutral < 0.25, (pos, neg, neutral)
    held = _pairs(500, 1)
    gap = np.asarray(held["chosen_reward"]) - np.asarray(held["rejected_reward"])
    true_acc = np.mean((gap > 0) + 0.5 * (gap == 0))  # the true reward's own accuracy on these noisy labels
    assert model.accuracy(held) > 0.7 and abs(model.accuracy(held) - true_acc) < 0.1


def test_reward_model_negative_control_on_shuffled_labels():
    pairs = _pairs(2000, 0)
    # swap chosen and rejected on a random half: the labels carry no signal, so the fit should learn ~nothing
    rng = np.random.default_rng(0)
    flip = rng.random(len(pairs)) < 0.5
    chosen = [r if f else c for c, r, f in zip(pairs["chosen"], pairs["rejected"], flip)]
    rejected = [c if f else r for c, r, f in zip(pairs["chosen"], pairs["rejected"], flip)]
    model = fit_reward_model({"chosen": chosen, "rejected": rejected}, l2=1e-3)
    assert abs(np.mean([model(x) for x in w.POSITIVE]) - np.mean([model(x) for x in w.NEGATIVE])) < 0.3


def test_fit_reward_model_rejects_bad_input():
    with pytest.raises(ValueError):
        fit_reward_model({"chosen": [], "rejected": []})
    with pytest.raises(ValueError):
        fit_reward_model(_pairs(10, 0), l2=-1.0)
