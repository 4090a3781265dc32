"""One function per figure: each takes data (and an optional ax or axes) and returns the Figure.

Nothing here computes: the numbers come from ``train`` (metric histories) and ``evaluate``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

# Slide-ready everywhere: no text under 10 pt, and legends placed where they cover the fewest points.
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 10,
                     "ytick.labelsize": 10, "legend.fontsize": 10, "legend.loc": "best", "svg.hashsalt": "minidpo"})

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
    """Save one figure to several places; return the paths written. A ``.png`` path gets an ``.svg`` beside it
    (slides want vectors, GitHub wants the PNG)."""
    written = []
    for p in paths:
        p = Path(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=110, bbox_inches="tight")
        written.append(str(p))
        if p.suffix == ".png":
            fig.savefig(p.with_suffix(".svg"), bbox_inches="tight", metadata={"Date": None})  # no date: same bytes
            written.append(str(p.with_suffix(".svg")))
    return written


FIGURES_ENV = "MINIDPO_FIGURES"  # set by `make figures` to the repository's figures/


def figures_dir() -> Path:
    """Where notebooks and the demo put figures: ``$MINIDPO_FIGURES`` when set (``make figures`` points it at
    the tracked ``figures/``), else ``runs/figures`` (ignored by git), so running the course never rewrites a
    tracked file."""
    return Path(os.environ.get(FIGURES_ENV) or "runs/figures")


def save_figure(fig, name: str) -> list[str]:
    """Save ``fig`` as ``figures_dir()/name.png`` and ``.svg``; return the paths written."""
    return save(fig, figures_dir() / f"{name}.png")


# ---------------------------------------------------------------------------------------- the variants (06)

# one colour per objective in every figure of notebook 06 (grey stays reserved for pi_ref)
VARIANT_COLORS = {"DPO": "tab:blue", "cDPO": "tab:orange", "IPO": "tab:green", "hinge": "tab:red",
                  "robust": "tab:purple", "SimPO": "tab:brown", "ORPO": "tab:pink", "KTO": "tab:cyan",
                  "APO-zero": "tab:olive"}


def _variant_colors(names: Sequence[str]) -> dict[str, object]:
    cmap = plt.get_cmap("tab10")
    return {name: VARIANT_COLORS.get(name, cmap(i % 10)) for i, name in enumerate(names)}


def _label_points(ax, items: list[tuple[str, float, float, object]], fontsize: int = 10) -> None:
    """Write each label to the right of its point, nudged down where it would overlap one already written.

    Points that coincide (two objectives that trained to the same numbers) share one label, "A = B".
    """
    groups: dict[tuple, list] = {}
    for label, x, y, color in items:
        groups.setdefault((round(x, 3), round(y, 3)), []).append((label, color))
    fig = ax.figure
    px_per_pt = fig.dpi / 72
    placed: list[tuple[float, float]] = []
    for (x, y), members in sorted(groups.items(), key=lambda kv: -kv[0][1]):
        px, py = ax.transData.transform((x, y))
        dy = 4.0
        while any(abs(px - qx) < 60 * px_per_pt and abs(py + dy * px_per_pt - qy) < 9 * px_per_pt for qx, qy in placed):
            dy -= 9.0
        placed.append((px, py + dy * px_per_pt))
        ax.annotate(" = ".join(m[0] for m in members), (x, y), textcoords="offset points", xytext=(6, dy),
                    fontsize=fontsize, color=members[0][1], va="center")


def plot_loss_curves(histories: dict[str, list[dict]], key: str = "loss", window: int = 5, ncols: int = 3,
                     axes=None, title: str | None = None):
    """One small panel per objective: the training curve of ``key`` (a TRL metric name), raw and smoothed.

    Panels do not share a y axis: every objective has its own scale (DPO starts at log 2, IPO at 1/(4 beta^2),
    hinge at 1), so what can be compared is the shape (how fast, whether it flattens), not the level.
    """
    names = list(histories)
    if not names:
        raise ValueError("plot_loss_curves: got no histories")
    nrows = -(-len(names) // ncols)
    if axes is None:
        fig, grid = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.4 * nrows), squeeze=False)
        axes = list(grid.flat)
    else:
        axes = list(np.ravel(axes))
        fig = axes[0].figure
    colors = _variant_colors(names)
    for ax, name in zip(axes, names):
        steps = [r["step"] for r in histories[name]]
        values = [r[key] for r in histories[name]]
        ax.plot(steps, values, color="0.82", lw=1)
        ax.plot(steps, smooth(values, window), color=colors[name], lw=2)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    for i, ax in enumerate(axes[:len(names)]):
        if i + ncols >= len(names):  # the lowest panel of its column
            ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_frontier_points(results: dict[str, dict], reference: dict | None = None, ax=None,
                         title: str | None = None, linthresh: float = 0.1):
    """Mean true reward against KL(pi || pi_ref) on held-out prompts, one labelled point (± SE) per objective.

    ``results[name]`` holds reward, reward_se, kl, kl_se (what ``evaluate.evaluate_policy`` returns). The KL axis
    is symlog (linear below ``linthresh``), because the objectives land from ~0.1 to tens of nats apart.
    """
    fig, (ax,) = _axes(ax, figsize=(6.4, 4.4))
    colors = _variant_colors(list(results))
    for name, r in results.items():
        ax.errorbar(r["kl"], r["reward"], xerr=r.get("kl_se"), yerr=r.get("reward_se"), fmt="o", ms=7,
                    color=colors[name], capsize=2, label=name)
    if reference is not None:
        ax.axhline(reference["reward"], color=COLORS["reference"], ls=":", lw=1.2)
        ax.plot([0], [reference["reward"]], "s", color=COLORS["reference"], ms=7, label="π_ref")
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.autoscale_view()
    left, right = ax.get_xlim()
    ax.set_xlim(0, right * 1.6)  # room for the labels on the right
    _label_points(ax, [(name, r["kl"], r["reward"], colors[name]) for name, r in results.items()])
    ax.set_xlabel("KL(π ‖ π_ref) on held-out prompts  (nats, symlog)")
    ax.set_ylabel("mean true reward")
    ax.set_title(title or "Where each objective lands")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_logprob_shift(shifts: dict[str, dict], ax=None, title: str | None = None):
    """Grouped bars, one pair per objective: mean change of log pi(y_w|x) and of log pi(y_l|x) from pi_ref.

    ``shifts[name]`` is what ``evaluate.logprob_shift`` returns (chosen, rejected and their SEs).
    """
    names = list(shifts)
    fig, (ax,) = _axes(ax, figsize=(max(6.0, 0.75 * len(names) + 1.5), 3.6))
    x = np.arange(len(names))
    width = 0.38
    for offset, key in ((-width / 2, "chosen"), (width / 2, "rejected")):
        ax.bar(x + offset, [shifts[n][key] for n in names], width, yerr=[shifts[n].get(f"{key}_se", 0) for n in names],
               color=COLORS[key], alpha=0.8, capsize=2, label=f"{key}  log π − log π_ref")
    ax.axhline(0, color="0.3", lw=1)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("nats (summed over the completion)")
    ax.set_title(title or "What each objective does to the chosen and the rejected")
    ax.legend(frameon=False, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def plot_length_shift(lengths: dict[str, tuple[float, float]], reference_length: float, ax=None,
                      labels: tuple[str, str] = ("true-reward labels", "length-biased labels"),
                      marks: dict[str, float] | None = None, title: str | None = None):
    """Dumbbell chart: mean answer length per objective under two labellers, and the reference's length.

    ``lengths[name] = (length when trained on the first labels, length on the second)``, in words.
    ``marks[label] = x`` adds a dashed vertical line (a length worth comparing with, e.g. the grammar's longest).
    """
    names = list(lengths)
    fig, (ax,) = _axes(ax, figsize=(6.4, 0.42 * len(names) + 1.4))
    y = np.arange(len(names))[::-1]
    first = np.array([lengths[n][0] for n in names], float)
    second = np.array([lengths[n][1] for n in names], float)
    ax.hlines(y, np.minimum(first, second), np.maximum(first, second), color="0.75", lw=3, zorder=1)
    ax.scatter(first, y, color="tab:blue", s=45, zorder=2, label=labels[0])
    ax.scatter(second, y, color="tab:orange", s=45, zorder=3, label=labels[1])
    ax.axvline(reference_length, color=COLORS["reference"], ls=":", lw=1.2, label=f"π_ref ({reference_length:.1f})")
    for label, x in (marks or {}).items():
        ax.axvline(x, color="0.35", ls="--", lw=1, label=label)
    ax.set_yticks(y, names)
    ax.set_xlabel("mean answer length on held-out prompts (words)")
    ax.set_title(title or "Answer length under two labellers")
    ax.legend(frameon=False, fontsize=10, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def plot_probability_paths(paths: dict[str, Sequence[float]], targets: dict[str, float] | None = None,
                           reference: float | None = None, styles: dict[str, dict] | None = None, ax=None,
                           title: str | None = None, ylabel: str = "π_θ(y | x)"):
    """Probability of one response per training step, on a log axis: one line per run.

    ``targets[name]`` draws a dotted line where that run should stop (a closed form), in the run's colour;
    ``reference`` marks pi_ref's probability. ``styles[name]`` are extra keyword arguments for ``ax.plot``.
    """
    fig, (ax,) = _axes(ax, figsize=(7.4, 4.0))  # wide: the legend sits outside, on the right
    styles = styles or {}
    colors = _variant_colors(list(paths))
    for name, values in paths.items():
        style = {"color": colors[name], "lw": 2, **styles.get(name, {})}
        values = np.asarray(values, float)
        (line,) = ax.plot(np.arange(1, len(values) + 1), values, label=name, **style)
        if targets and name in targets:
            first = name == next(n for n in paths if n in targets)
            ax.axhline(targets[name], color=line.get_color(), ls=":", lw=1.5,
                       label="closed-form target" if first else None)
    if reference is not None:
        ax.axhline(reference, color=COLORS["reference"], ls=":", lw=1.2, label="π_ref")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "")
    ax.legend(frameon=False, fontsize=10, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: lines fill the axes
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_margin_paths(histories: dict[str, list[dict]], betas: dict[str, float], stops: dict[str, float] | None = None,
                      window: int = 9, axes=None, title: str | None = None):
    """The batch's mean margin h = (log-ratio of chosen) - (log-ratio of rejected), in nats, per training step.

    TRL's rewards/margins is beta * h, so h = rewards/margins / beta (``betas[name]``). Left: the curves against
    ``stops[name]``, drawn dashed in the run's colour: the margin where that objective stops pushing (IPO
    1/(2 beta), hinge 1/beta, cDPO log((1 - eps)/eps)/beta). Right: the same curves, zoomed to the data.
    """
    fig, axes = _axes(axes, 2, figsize=(5.0, 3.8))
    colors = _variant_colors(list(histories))
    for i, ax in enumerate(axes[:2]):
        for name, history in histories.items():
            steps = [r["step"] for r in history]
            h = [r["rewards/margins"] / betas[name] for r in history]
            ax.plot(steps, smooth(h, window), color=colors[name], lw=2, label=name)
            if i == 0 and stops and name in stops:
                ax.axhline(stops[name], color=colors[name], ls="--", lw=1.2)
                ax.annotate(f"{name} stops at {stops[name]:.3g}", (0, stops[name]), textcoords="offset points",
                            xytext=(2, 3), fontsize=10, color=colors[name])
        ax.axhline(0, color="0.4", lw=1, ls=":")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("margin h on the batch (nats)")
    axes[0].set_title("against where each objective stops", fontsize=10)
    axes[1].set_title("zoomed in", fontsize=10)
    axes[1].legend(frameon=False, fontsize=10, ncol=2)
    fig.suptitle(title or "How far each objective pushes the margin")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- displacement and frontier (04, 05)

MASS_COLORS = {"positive": "tab:green", "negative": "tab:red", "neutral": "tab:olive", "intensifier": "tab:cyan",
               "end": "tab:purple", "other": "0.25", "chosen": "tab:green", "rejected_only": "tab:red",
               "unseen": "tab:orange"}
MASS_LABELS = {"rejected_only": "rejected only", "unseen": "in no pair"}  # bandit.data_mass's keys, for legends


def plot_log_ratio_trace(steps: Sequence[float], chosen: Sequence[float], rejected: Sequence[float], ax=None,
                         title: str | None = None, xlabel: str = "step"):
    """Mean log pi(y|x) - log pi_ref(y|x) of a FIXED set of pairs, chosen and rejected, against training step.

    Unlike ``plot_displacement`` (each step's own batch), the pairs never change, so the curves are not noisy
    from batch to batch. The shaded gap is the margin that DPO's loss sees; the level is what it does not see.
    """
    fig, (ax,) = _axes(ax, figsize=(5.6, 3.8))
    steps, chosen, rejected = (np.asarray(v, float) for v in (steps, chosen, rejected))
    style = "o-" if len(steps) <= 40 else "-"  # markers only where they can be told apart
    ax.plot(steps, chosen, style, ms=3, color=COLORS["chosen"], lw=2, label="chosen  log π/π_ref")
    ax.plot(steps, rejected, style, ms=3, color=COLORS["rejected"], lw=2, label="rejected  log π/π_ref")
    ax.fill_between(steps, rejected, chosen, color=COLORS["chosen"], alpha=0.1, label="margin (what the loss sees)")
    ax.axhline(0, color="0.4", lw=1, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("nats relative to π_ref")
    ax.set_title(title or "Chosen and rejected log-probabilities during DPO")
    ax.legend(frameon=False, fontsize=10, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_mass_shift(masses: dict[str, dict[str, float]], ax=None, title: str | None = None,
                    colors: dict[str, object] | None = None, xlabel: str = "probability mass"):
    """Horizontal stacked bars: how each model splits its probability over named groups (each row sums to 1).

    ``masses[model][group]`` is a probability, e.g. what ``evaluate.next_token_mass`` or ``bandit.data_mass``
    returns. Groups keep the order of the first model's dict; segments wider than 6% carry their value.
    """
    names = list(masses)
    if not names:
        raise ValueError("plot_mass_shift: got no models")
    groups = list(masses[names[0]])
    colors = {**MASS_COLORS, **(colors or {})}
    fig, (ax,) = _axes(ax, figsize=(6.4, 0.55 * len(names) + 1.6))
    y = np.arange(len(names))[::-1]
    left = np.zeros(len(names))
    for i, g in enumerate(groups):
        widths = np.array([masses[n].get(g, 0.0) for n in names], float)
        color = colors.get(g, plt.get_cmap("tab10")(i % 10))
        ax.barh(y, widths, left=left, color=color, alpha=0.85, edgecolor="white", label=MASS_LABELS.get(g, g))
        for yy, lo, wd in zip(y, left, widths):
            if wd > 0.06:
                ax.text(lo + wd / 2, yy, f"{wd:.2f}", ha="center", va="center", fontsize=10, color="white")
        left += widths
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_title(title or "Where the probability goes")
    longest = max(len(g) for g in groups)
    ncol = min(len(groups), 6 if longest <= 12 else 3 if longest <= 24 else 1)  # long labels: fewer columns
    ax.legend(frameon=False, fontsize=10, ncol=ncol, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.tight_layout()
    return fig


def plot_mass_over_steps(masses: Sequence[dict[str, float]], steps: Sequence[float] | None = None, ax=None,
                         title: str | None = None, colors: dict[str, object] | None = None):
    """Stacked areas: a policy's mass on each group (e.g. ``bandit.data_mass``: chosen, rejected_only, unseen)
    after every training step."""
    if not masses:
        raise ValueError("plot_mass_over_steps: got no rows")
    groups = list(masses[0])
    colors = {**MASS_COLORS, **(colors or {})}
    x = np.arange(len(masses)) if steps is None else np.asarray(steps, float)
    fig, (ax,) = _axes(ax, figsize=(5.6, 3.8))
    ax.stackplot(x, *[[m[g] for m in masses] for g in groups], colors=[colors.get(g) for g in groups], alpha=0.8,
                 labels=[MASS_LABELS.get(g, g) for g in groups])
    ax.set_ylim(0, 1)
    ax.set_xlim(x[0], x[-1])
    ax.set_xlabel("step")
    ax.set_ylabel("probability mass")
    ax.set_title(title or "Where the probability goes during training")
    ax.legend(frameon=False, fontsize=10, loc="upper left")
    fig.tight_layout()
    return fig


def plot_response_probs(names: Sequence[str], probs: dict[str, Sequence[float]], highlight=None, ax=None,
                        title: str | None = None, highlight_label: str = "never in the data", log: bool = False,
                        ymin: float = 1e-6):
    """Grouped bars over a finite set of responses, one bar per policy; ``highlight[k]`` True hatches response k
    (for example, the responses that no preference pair contains) and marks its name with a star.
    ``log=True``: a log probability axis from ``ymin`` to 1, so that small probabilities stay visible next to a
    dominant one (bars below ``ymin`` are cut off)."""
    fig, (ax,) = _axes(ax, figsize=(max(6.0, 0.42 * len(names) + 1.5), 3.6))
    x = np.arange(len(names))
    labels = list(probs)
    width = 0.8 / max(1, len(labels))
    palette = [COLORS["reference"], COLORS["policy"], "tab:orange", "tab:green", "tab:purple"]
    mask = np.zeros(len(names), bool) if highlight is None else np.asarray(highlight, bool)
    for i, label in enumerate(labels):
        values = np.asarray(probs[label], float)
        bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, values, width, color=palette[i % len(palette)],
                      alpha=0.85, label=label)
        for bar, hatched in zip(bars, mask):
            if hatched:
                bar.set_hatch("///")
                bar.set_edgecolor("white")
    ax.set_xticks(x, [f"{n}*" if m else n for n, m in zip(names, mask)], rotation=60, fontsize=10)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(ymin, 30)  # headroom above 1 for the legend
    ax.set_ylabel("probability" + ("  (log scale)" if log else ""))
    ax.set_xlabel(f"response  (* and hatched: {highlight_label})" if mask.any() else "response")
    ax.set_title(title or "")
    ax.legend(frameon=False, fontsize=10, loc="upper right", ncol=len(labels))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def plot_frontier(paths: dict[str, Sequence[dict]], points: dict[str, dict] | None = None,
                  best_of_n: Sequence[dict] | None = None, reference: dict | None = None, ax=None,
                  title: str | None = None, linthresh: float = 1.0):
    """The reward-KL frontier (DPO paper, Fig. 2 left, in miniature).

    ``paths[label]``: checkpoints of one run in training order, dicts with "kl" and "reward" (what
    ``evaluate.evaluate_policy`` returns), drawn as a line in one colour per run, the last checkpoint larger.
    ``points[label]``: single baselines (e.g. Preferred-FT), drawn as stars. ``best_of_n``: rows of
    ``evaluate.best_of_n``, drawn at their exact KL (solid) and at the log n - (n-1)/n bound (dashed).
    ``reference``: pi_ref's reward, at KL 0. The KL axis is symlog, linear below ``linthresh``.
    """
    fig, (ax,) = _axes(ax, figsize=(7.2, 4.8))
    cmap = plt.get_cmap("viridis")
    labels = list(paths)
    for i, label in enumerate(labels):
        rows = list(paths[label])
        color = cmap(i / max(1, len(labels) - 1) * 0.9)
        kl = [r["kl"] for r in rows]
        reward = [r["reward"] for r in rows]
        ax.plot(kl, reward, "o-", ms=3.5, lw=1.4, color=color, alpha=0.85, label=label)
        ax.plot(kl[-1:], reward[-1:], "o", ms=8, color=color, markeredgecolor="black", markeredgewidth=0.6)
    for j, (label, p) in enumerate((points or {}).items()):
        ax.plot([p["kl"]], [p["reward"]], "*", ms=15, color=["tab:red", "tab:orange", "tab:pink"][j % 3],
                markeredgecolor="black", markeredgewidth=0.6, label=label, zorder=5)
    if best_of_n:
        ax.plot([r["kl"] for r in best_of_n], [r["reward"] for r in best_of_n], "s-", ms=4, color="0.15", lw=1.6,
                label="best-of-n from π_ref (exact KL)", zorder=4)
        ax.plot([r["kl_bound"] for r in best_of_n], [r["reward"] for r in best_of_n], "s--", ms=3, color="0.55",
                lw=1.2, label="best-of-n at log n − (n−1)/n", zorder=3)
        for r in best_of_n[1:] if best_of_n[0]["n"] == 1 else best_of_n:  # n = 1 is pi_ref itself
            ax.annotate(f"n={r['n']}", (r["kl"], r["reward"]), textcoords="offset points", xytext=(-4, 6),
                        fontsize=10, color="0.15", ha="right")
    if reference is not None:
        ax.plot([0], [reference["reward"]], "s", ms=8, color=COLORS["reference"], markeredgecolor="black",
                label="π_ref", zorder=6)
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"KL(π ‖ π_ref), nats per completion  (symlog: linear below {linthresh:g})")
    ax.set_ylabel("mean true reward (held-out prompts)")
    ax.set_title(title or "Reward against KL: the frontier")
    ax.legend(frameon=False, fontsize=10, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_overoptimization(steps: Sequence[float], true_reward: Sequence[float], implicit: Sequence[float],
                          ax=None, title: str | None = None, implicit_label: str = "implicit reward margin",
                          true_se: Sequence[float] | None = None, kl: Sequence[float] | None = None,
                          grammatical: Sequence[float] | None = None, objective: Sequence[float] | None = None,
                          objective_label: str = "J = reward − β·KL"):
    """True reward (left axis) and DPO's implicit reward (right axis) at the same checkpoints of one run.

    Over-optimization is where the second keeps rising while the first falls: the policy still gets better
    at what the loss measures, and worse at what we wanted. ``objective`` (e.g. the KL-regularised objective
    E[r] - beta KL that DPO is derived from) is drawn on the reward's axis. With ``kl`` (and optionally
    ``grammatical``, a fraction) a second panel shows how far the policy is from pi_ref at the same checkpoints;
    ``ax`` is then a pair of axes.
    """
    two = kl is not None
    fig, axes = _axes(ax, 2 if two else 1, figsize=(6.0, 3.8))
    ax = axes[0]
    steps = np.asarray(steps, float)
    ax.plot(steps, true_reward, "o-", color=COLORS["policy"], lw=2, label="true reward of samples")
    if true_se is not None:
        lo = np.asarray(true_reward, float) - np.asarray(true_se, float)
        hi = np.asarray(true_reward, float) + np.asarray(true_se, float)
        ax.fill_between(steps, lo, hi, color=COLORS["policy"], alpha=0.15)
    if objective is not None:
        ax.plot(steps, objective, "D-", ms=4, color="tab:purple", lw=2, label=objective_label)
        ax.axhline(0, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("mean true reward" + (" / objective" if objective is not None else ""), color=COLORS["policy"])
    right = ax.twinx()
    right.plot(steps, implicit, "s--", color="tab:orange", lw=2, label=implicit_label)
    right.set_ylabel(implicit_label, color="tab:orange")
    lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")] + right.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], frameon=False, fontsize=10, loc="upper left")
    ax.set_title(title or "Over-optimization")
    ax.grid(alpha=0.3)
    if two:
        ax2 = axes[1]
        ax2.plot(steps, kl, "o-", color="0.2", lw=2, label="KL(π ‖ π_ref)")
        ax2.set_xlabel("step")
        ax2.set_ylabel("KL(π ‖ π_ref), nats")
        ax2.set_title("How far from π_ref, and what is left of the language")
        ax2.grid(alpha=0.3)
        lines = ax2.get_lines()
        if grammatical is not None:
            right2 = ax2.twinx()
            right2.plot(steps, grammatical, "^:", color="tab:green", lw=2, label="grammatical samples")
            right2.set_ylim(0, 1.02)
            right2.set_ylabel("fraction grammatical", color="tab:green")
            lines = lines + right2.get_lines()
        ax2.legend(lines, [ln.get_label() for ln in lines], frameon=False, fontsize=10, loc="center right")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# over seeds: median lines with bootstrap bands, interval bars, and grammaticality as marker fill
# ---------------------------------------------------------------------------------------------------------

def _fill(color, share: float):
    """A marker face that shows a share in [0, 1]: the full colour at 1, white (a hollow marker) at 0."""
    import matplotlib.colors as mcolors

    rgb = np.asarray(mcolors.to_rgb(color))
    share = 0.0 if not np.isfinite(share) else float(np.clip(share, 0.0, 1.0))
    return tuple(share * rgb + (1.0 - share) * np.ones(3))


def _fill_legend(ax, fill_key: str, handles: list, labels: list) -> None:
    from matplotlib.lines import Line2D

    for share, text in ((1.0, f"marker fill = share {fill_key}: all"), (0.5, "half"), (0.0, "none")):
        handles.append(Line2D([], [], marker="o", ls="", ms=7, color="0.3", markerfacecolor=_fill("0.3", share)))
        labels.append(text)
    ax.legend(handles, labels, frameon=False, fontsize=10, loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_seed_bands(paths: dict[str, Sequence[Sequence[dict]]], x: str = "kl", y: str = "reward",
                    grid: Sequence[float] | None = None, fill_key: str | None = "grammatical", ax=None,
                    title: str | None = None, colors: dict | None = None, linthresh: float | None = 1.0,
                    n_grid: int = 12, level: float = 0.95):
    """Paths over seeds: for each label, the median over seeds of ``y`` at equal ``x`` and a bootstrap band.

    ``paths[label]`` holds one path per seed (rows in step order, as ``TrainResult.evaluations``). Each seed's
    path is read at the same ``x`` values (``evaluate.at_matched_kl``, with ``key=x``): ``grid``, or ``n_grid``
    values from the smallest start to the largest reach over seeds. The band (``seeds.bootstrap_interval`` of
    the median, ``level``) and the line are drawn only where every seed's path reaches: beyond that the median
    would be over fewer seeds than the label claims. Markers show the median of ``fill_key`` (a share) as
    their fill: full colour = all samples grammatical, hollow = none. ``linthresh``: symlog x axis (None: linear).
    """
    from .evaluate import at_matched_kl
    from .seeds import bootstrap_interval

    fig, (ax,) = _axes(ax, figsize=(7.2, 4.8))
    cmap = plt.get_cmap("viridis")
    handles, labels = [], []
    for i, (label, per_seed) in enumerate(paths.items()):
        per_seed = [list(p) for p in per_seed]
        if not per_seed or any(not p for p in per_seed):
            raise ValueError(f"plot_seed_bands: {label!r} needs at least one non-empty path per seed")
        color = (colors or {}).get(label, cmap(i / max(1, len(paths) - 1) * 0.9))
        xs = np.asarray(grid, float) if grid is not None else np.linspace(
            min(min(r[x] for r in p) for p in per_seed), max(max(r[x] for r in p) for p in per_seed), n_grid)
        read = [at_matched_kl(p, xs, key=x) for p in per_seed]  # (seeds, grid)
        ys = np.array([[row.get(y, np.nan) for row in seed] for seed in read], float)  # (seeds, grid)
        ok = np.all(np.isfinite(ys), axis=0)
        if not ok.any():
            continue
        summaries = [bootstrap_interval(ys[:, j], level=level) for j in np.flatnonzero(ok)]
        gx = xs[ok]
        line, = ax.plot(gx, [s.median for s in summaries], "-", lw=1.8, color=color)
        ax.fill_between(gx, [s.low for s in summaries], [s.high for s in summaries], color=color, alpha=0.2, lw=0)
        if fill_key is not None:
            shares = np.array([[row.get(fill_key, np.nan) for row in seed] for seed in read], float)[:, ok]
            for gxj, yj, share in zip(gx, [s.median for s in summaries], np.nanmedian(shares, axis=0)):
                ax.plot([gxj], [yj], "o", ms=6, color=color, markerfacecolor=_fill(color, share),
                        markeredgewidth=1.2, zorder=4)
        handles.append(line)
        labels.append(label if len(per_seed) == 1 else f"{label} (median of {len(per_seed)} seeds, {level:.0%} band)")
    return _finish_seed_axes(fig, ax, x, y, title or f"{y} against {x}, over seeds", fill_key, handles, labels,
                             linthresh)


def plot_seed_points(points: dict[str, Sequence[dict]], x: str = "kl", y: str = "reward",
                     fill_key: str | None = "grammatical", reference: dict | None = None, ax=None,
                     title: str | None = None, colors: dict | None = None, linthresh: float | None = 1.0,
                     marker: str = "o", level: float = 0.95):
    """End points over seeds: the median of ``x`` and ``y`` with bootstrap interval bars in both directions.

    ``points[label]`` holds one row per seed (dicts with ``x``, ``y`` and optionally ``fill_key``, a share
    drawn as the marker's fill: full colour = all samples grammatical, hollow = none). ``reference``: pi_ref's
    row, drawn at x = 0. Returns the Figure; the numbers are ``seeds.summarize`` of the same rows.
    """
    from .seeds import bootstrap_interval

    fig, (ax,) = _axes(ax, figsize=(7.2, 4.8))
    cmap = plt.get_cmap("tab10")
    handles, labels = [], []
    for i, (label, rows) in enumerate(points.items()):
        rows = list(rows)
        if not rows:
            raise ValueError(f"plot_seed_points: {label!r} has no rows")
        color = (colors or {}).get(label, cmap(i % 10))
        sx = bootstrap_interval([r[x] for r in rows], level=level)
        sy = bootstrap_interval([r[y] for r in rows], level=level)
        share = float(np.median([r[fill_key] for r in rows])) if fill_key is not None else 1.0
        bars = ax.errorbar([sx.median], [sy.median], xerr=[[sx.median - sx.low], [sx.high - sx.median]],
                           yerr=[[sy.median - sy.low], [sy.high - sy.median]], fmt=marker, ms=8, color=color,
                           markerfacecolor=_fill(color, share), markeredgewidth=1.3, capsize=3, lw=1.2, zorder=4)
        ax.plot([r[x] for r in rows], [r[y] for r in rows], ".", ms=4, color=color, alpha=0.5, zorder=3)
        handles.append(bars.lines[0])
        labels.append(f"{label} ({len(rows)} seeds)")
    if reference is not None:
        ref, = ax.plot([0], [reference[y]], "s", ms=8, color=COLORS["reference"], markeredgecolor="black", zorder=5)
        handles.append(ref)
        labels.append("π_ref")
    title = title or f"median over seeds, {level:.0%} bootstrap intervals; dots: single seeds"
    return _finish_seed_axes(fig, ax, x, y, title, fill_key, handles, labels, linthresh)


def _finish_seed_axes(fig, ax, x: str, y: str, title: str, fill_key, handles, labels, linthresh):
    """Axes, title, grid and legend shared by the two over-seeds plots."""
    if linthresh is not None and x == "kl":
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlim(left=0)
    ax.set_xlabel("KL(π ‖ π_ref), nats per completion" if x == "kl" else x)
    ax.set_ylabel(f"{y} (held-out prompts)" if y == "reward" else y)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if fill_key is not None:
        _fill_legend(ax, fill_key, handles, labels)
    else:
        ax.legend(handles, labels, frameon=False, fontsize=10, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ interactive beta (01 and 03)


def plot_beta_explorer(reference_probs: Sequence[float], optimal_probs: Sequence[float], rewards: Sequence[float],
                       beta: float, reward_gap: float, axes=None):
    """Two panels for one prompt of the exact world at one beta (notebooks 01 and 03, behind a slider).

    Left: pi_ref(y|x) and pi*(y|x) = pi_ref exp(r/beta)/Z per response (the caller computes pi*). Right: the DPO
    gradient weight beta sigma(-beta h) against the log-ratio margin h, with the pair whose implicit-reward gap
    r_hat_w - r_hat_l = beta h equals ``reward_gap`` marked.
    """
    fig, (ax1, ax2) = _axes(axes, 2, figsize=(5.2, 3.6))
    ref, star, r = (np.asarray(v, dtype=float) for v in (reference_probs, optimal_probs, rewards))
    ys = np.arange(len(ref))
    ax1.bar(ys - 0.2, ref, 0.4, color=COLORS["reference"], label="π_ref")
    ax1.bar(ys + 0.2, star, 0.4, color=COLORS["policy"], label=f"π* (β = {beta:.2g})")
    ax1.set_xticks(ys, [f"y{y}\nr={v:+.1f}" for y, v in zip(ys, r)])
    ax1.set(ylim=(0, 1.3), yticks=np.linspace(0, 1, 6), ylabel="probability", title="π* on the exact world (one prompt)")
    ax1.legend(frameon=False, loc="upper center", ncol=2)  # in the band above 1, where no bar reaches
    h_pair = reward_gap / beta
    h_max = max(6 / beta, 1.2 * abs(h_pair))  # wide enough for the sigmoid's bend and for the marked pair
    h = np.linspace(-h_max, h_max, 401)
    ax2.plot(h, beta / (1 + np.exp(beta * h)), color=COLORS["policy"])
    weight = beta / (1 + np.exp(reward_gap))
    ax2.plot([h_pair], [weight], "o", color=COLORS["rejected"], ms=8,
             label=f"gap r̂_w − r̂_l = {reward_gap:+.1f}: weight {weight:.3g}")
    ax2.axhline(beta / 2, color=COLORS["reference"], ls=":", lw=1, label="β/2 (at π_θ = π_ref)")
    ax2.set(xlim=(-h_max, h_max), ylim=(0, beta * 1.45), xlabel="log-ratio margin h",
            ylabel="weight β σ(−β h)", title="DPO gradient weight of one pair")
    ax2.legend(frameon=False, loc="upper right", fontsize=10)  # above the curve, which stays below beta
    fig.tight_layout()
    return fig
