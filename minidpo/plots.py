"""One function per figure: each takes data (and an optional ax or axes) and returns the Figure.

Nothing here computes: the numbers come from ``train`` (metric histories) and ``evaluate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

COLORS = {"chosen": "tab:green", "rejected": "tab:red", "reference": "tab:gray", "policy": "tab:blue"}


def _axes(ax, n: int = 1, figsize=(5, 3.4)):
    if ax is not None:
        axes = list(np.atleast_1d(ax))
        return axes[0].figure, axes
    fig, axes = plt.subplots(1, n, figsize=(figsize[0] * n, figsize[1]), squeeze=False)
    return fig, list(axes[0])


def smooth(values: Sequence[float], window: int = 5) -> np.ndarray:
    """Moving average over ``window`` steps (shorter at the start), for readable training curves."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) < 2:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_training_curves(history: list[dict], axes=None, window: int = 5, title: str | None = None):
    """Loss, reward margin and reward accuracy (TRL's loss, rewards/margins, rewards/accuracies) per step."""
    fig, axes = _axes(axes, 3, figsize=(4.2, 3.2))
    steps = [r["step"] for r in history]
    for ax, key, label in zip(axes, ["loss", "rewards/margins", "rewards/accuracies"],
                              ["loss", "reward margin  β(h)", "reward accuracy"]):
        ax.plot(steps, [r[key] for r in history], color="0.8", lw=1)
        ax.plot(steps, smooth([r[key] for r in history], window), color=COLORS["policy"], lw=2)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[2].axhline(0.5, color="0.5", ls=":", lw=1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_displacement(history: list[dict], beta: float, ax=None, window: int = 5, title: str | None = None):
    """log pi(y|x) - log pi_ref(y|x) for the chosen and the rejected, per step (from TRL's rewards/* / beta).

    When both curves fall below zero while their gap grows, DPO is lowering the probability of the very
    answers people preferred: preference displacement (Razin et al. 2024).
    """
    fig, (ax,) = _axes(ax)
    steps = [r["step"] for r in history]
    chosen = smooth([r["rewards/chosen"] / beta for r in history], window)
    rejected = smooth([r["rewards/rejected"] / beta for r in history], window)
    ax.plot(steps, chosen, color=COLORS["chosen"], lw=2, label="chosen  log π/π_ref")
    ax.plot(steps, rejected, color=COLORS["rejected"], lw=2, label="rejected  log π/π_ref")
    ax.fill_between(steps, rejected, chosen, color=COLORS["chosen"], alpha=0.08, label="margin")
    ax.axhline(0, color="0.4", lw=1, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("nats relative to π_ref")
    ax.set_title(title or "Chosen and rejected log-probs during DPO")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_reward_comparison(reference_rewards: Sequence[float], policy_rewards: Sequence[float], ax=None,
                           title: str | None = None):
    """Histogram of the true reward of samples from pi_ref and from the trained policy (held-out prompts)."""
    fig, (ax,) = _axes(ax)
    ref, pol = np.asarray(reference_rewards, float), np.asarray(policy_rewards, float)
    lo, hi = min(ref.min(), pol.min()), max(ref.max(), pol.max())
    bins = np.arange(np.floor(lo) - 0.5, np.ceil(hi) + 1.5, 1.0)  # the reward is an integer count
    ax.hist(ref, bins=bins, alpha=0.55, color=COLORS["reference"], label=f"π_ref  (mean {ref.mean():+.2f})")
    ax.hist(pol, bins=bins, alpha=0.55, color=COLORS["policy"], label=f"DPO policy  (mean {pol.mean():+.2f})")
    ax.set_xlabel("true reward of a sample  (positive − negative words)")
    ax.set_ylabel("samples")
    ax.set_title(title or "True reward on held-out prompts")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def save(fig, *paths) -> list[str]:
    """Save one figure to several places (the run folder and figures/); return the paths written."""
    written = []
    for p in paths:
        fig.savefig(p, dpi=110, bbox_inches="tight")
        written.append(str(p))
    return written
