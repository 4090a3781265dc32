"""A learned reward model for the synthetic world: Bradley-Terry logistic regression on bag-of-words counts.

What RLHF fits before PPO (Ouyang et al. 2022; the DPO paper's section 3, eq. 2), in its smallest form:
    r_phi(y) = w . c(y),    c(y) = counts of each word of the vocabulary in the completion y,
    loss(w) = -mean log sigma(r_phi(y_w) - r_phi(y_l)) + l2/2 |w|^2.
It is fit on the same labelled pairs DPO sees, so "best-of-n with a learned reward" and "RL on a learned
reward" spend the same labels as DPO. The true reward (positive minus negative words) is in this model's
family, so with enough pairs it is learnable up to scale; with few pairs it is a proxy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_WORD = re.compile(r"[a-z]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class BagOfWordsRewardModel:
    vocabulary: dict[str, int]  # word -> column of the weight vector
    weights: torch.Tensor  # (V,) float64: the reward of one occurrence of each word

    def counts(self, texts: Sequence[str]) -> torch.Tensor:
        """Word counts, (N, V); words outside the vocabulary count for nothing."""
        c = torch.zeros(len(texts), len(self.vocabulary), dtype=torch.float64)
        for i, t in enumerate(texts):
            for word in _words(t):
                j = self.vocabulary.get(word)
                if j is not None:
                    c[i, j] += 1
        return c

    def __call__(self, text: str) -> float:
        """r_phi(text): usable wherever the true ``world.reward`` is (e.g. ``world.label_pairs(reward_fn=...)``)."""
        return float(self.counts([text])[0] @ self.weights)

    def rewards(self, texts: Sequence[str]) -> torch.Tensor:
        return self.counts(texts) @ self.weights  # (N,)

    def accuracy(self, pairs) -> float:
        """Fraction of pairs where r_phi(chosen) > r_phi(rejected) (ties count one half)."""
        diff = self.rewards(list(pairs["chosen"])) - self.rewards(list(pairs["rejected"]))
        return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def fit_reward_model(pairs, l2: float = 1e-2) -> BagOfWordsRewardModel:
    """Fit ``BagOfWordsRewardModel`` by maximum likelihood (with an L2 penalty ``l2``) on prompt/chosen/rejected
    ``pairs``; the vocabulary is every word seen in their completions. Convex, solved with L-BFGS."""
    chosen, rejected = list(pairs["chosen"]), list(pairs["rejected"])
    if len(chosen) == 0:
        raise ValueError("fit_reward_model: no pairs")
    if not l2 >= 0:
        raise ValueError(f"fit_reward_model: l2 must be >= 0, got {l2}")
    vocabulary = {w: i for i, w in enumerate(sorted({w for t in chosen + rejected for w in _words(t)}))}
    model = BagOfWordsRewardModel(vocabulary, torch.zeros(len(vocabulary), dtype=torch.float64))
    diff = model.counts(chosen) - model.counts(rejected)  # (N, V)
    w = torch.zeros(len(vocabulary), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(diff @ w).mean() + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    model.weights = w.detach()
    return model
