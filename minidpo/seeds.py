"""Seeds as an axis of every experiment: run the same thing under several seeds, report the median with a
bootstrap interval, and say whether a comparison held for every seed.

A seed here fixes everything random in one run (data order, labeller's coins, sampling); what a given seed
varies is said where the experiment is defined. One run's number is an anecdote: the course asserts a
comparison only when it holds for every seed of at least ``SEEDS`` (or on the intervals, when the prose says so).

    rows = over_seeds(lambda s: {"kl": run(seed=s).kl}, seeds=SEEDS)
    summarize(rows)["kl"]            # Summary(median, low, high, values)
    holds_for_all(rows, lambda r: r["kl"] > 1.0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

SEEDS = (0, 1, 2, 3, 4)  # the course's default: five seeds for every claim about training


@dataclass(frozen=True)
class Summary:
    """The median of one number over seeds, with a percentile-bootstrap interval and the values themselves."""

    median: float
    low: float  # bootstrap interval for the median (level in ``level``)
    high: float
    values: tuple[float, ...]
    level: float = 0.95

    @property
    def n(self) -> int:
        return len(self.values)

    def __str__(self) -> str:
        return f"{self.median:.3g} [{self.low:.3g}, {self.high:.3g}] (median of {self.n} seeds)"


def bootstrap_interval(values: Sequence[float], level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> Summary:
    """Median of ``values`` and a percentile-bootstrap interval for it (Efron & Tibshirani 1993, ch. 13).

    With 5 seeds the interval's ends are order statistics of the values, so it is wide on purpose: it shows
    how much a result moves between runs, which is what a reader needs before trusting a ranking.
    """
    v = np.asarray(list(values), dtype=float)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"bootstrap_interval: need a non-empty list of numbers, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"bootstrap_interval: values must be finite, got {v.tolist()}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_interval: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    medians = np.median(v[rng.integers(0, len(v), size=(n_boot, len(v)))], axis=1)  # (n_boot,)
    low, high = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return Summary(float(np.median(v)), float(low), float(high), tuple(v.tolist()), level)


def over_seeds(run: Callable[[int], dict], seeds: Sequence[int] = SEEDS) -> list[dict]:
    """``[run(seed) | {"seed": seed} for seed in seeds]``: the same experiment under each seed, in order."""
    if len(seeds) == 0:
        raise ValueError("over_seeds: need at least one seed")
    return [{**run(int(s)), "seed": int(s)} for s in seeds]


def summarize(rows: Sequence[dict], keys: Sequence[str] | None = None, level: float = 0.95) -> dict[str, Summary]:
    """One ``Summary`` per numeric key of the per-seed ``rows`` (the ``seed`` key itself is left out)."""
    if not rows:
        raise ValueError("summarize: no rows")
    keys = keys or [k for k, v in rows[0].items() if k != "seed" and isinstance(v, (int, float, np.floating))]
    return {k: bootstrap_interval([r[k] for r in rows], level=level) for k in keys}


def holds_for_all(rows: Sequence[dict], claim: Callable[[dict], bool]) -> tuple[bool, list[int]]:
    """Whether ``claim(row)`` is true for every seed's row, and the seeds where it failed."""
    failed = [int(r.get("seed", i)) for i, r in enumerate(rows) if not claim(r)]
    return not failed, failed
