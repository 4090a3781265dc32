"""The book chapter's three DPO derivations, step by step, as sympy expressions -- and a check for each step.

Source: the book chapter "Direct Alignment Algorithms" (``seeds/000_2b3c07a38f0f5a2d.txt``); every function
names the equation label it implements. The same derivations are in the DPO paper (Rafailov et al. 2023,
Appendix A.1 for the optimal policy, Sec. 4 / Eq. 5-7 for the loss, Sec. 4 "What does the DPO update do?"
for the gradient).

    1. The optimal policy   eq:rlhf_opt_eq_repeat -> eq:dpo_deriv_1 ... eq:dpo_deriv_10 -> eq:dpo_opt_policy
    2. DPO from Bradley-Terry  eq:bradley_terry_dpo -> eq:dpo_reward_full -> eq:dpo_loss_deriv0 ... 3 (-> eq:dpo_core)
    3. The gradient          eq:dpo_grad_0 -> eq:dpo_grad_2 -> eq:dpo_grad_3 (= eq:dpo_gradient)

How the checks work. An expectation over an infinite response space is not something sympy can manipulate,
so derivation 1 is written on a FINITE world: 2 prompts x with weights d(x) > 0 and 3 responses y per prompt,
every probability a positive symbol, every reward a real symbol, beta a positive symbol. Each check function
returns a ``Step``: whether it holds, how it was checked (``"sympy"``: ``simplify(a - b) == 0``;
``"numeric"``: evaluated at random points; ``"assumption"``: a modelling step that no algebra can prove) and
a note with the condition under which it holds. Derivations 2 and 3 need no finite world: they are about one
pair (y1, y2) or one preference triple.

What the checks found (conditions the chapter does not state, and its slips):
  * eq:rlhf_opt_eq_repeat mixes RL notation (tau, s_t, a_t, r_theta, pi^RL) into a bandit problem; read as
    eq:dpo_deriv_1 it needs the KL term to be averaged over x ~ D as well.
  * eq:dpo_deriv_2 -> eq:dpo_deriv_3 -> eq:dpo_deriv_4 are joined by "=", but max f = -min(-f), and dividing
    by beta scales the value: the three problems share their OPTIMISER, not their optimal VALUE. Dividing by
    beta keeps the optimiser only because beta > 0. (The text says "remove the factor of -1 and beta", but
    eq:dpo_deriv_3 still has beta; beta is removed only in eq:dpo_deriv_4.)
  * eq:dpo_deriv_5 and eq:dpo_deriv_6 ... 9 hold for ANY positive Z(x); the choice of Z as the partition
    function matters only at eq:dpo_deriv_10.
  * eq:dpo_deriv_10 moves -log Z(x) out of E_{y~pi}: this needs sum_y pi(y|x) = 1 (sympy shows the two
    sides differ without it). The bracket is a true KL divergence only because pi* = pi_ref exp(r/beta)/Z
    sums to 1, which needs Z(x) finite (automatic on a finite set; on an infinite one it needs, e.g., bounded r).
  * "Z(x) does not depend on the final answer, we can ignore it": Z does not depend on pi, so dropping it
    leaves the minimiser unchanged, not the value. Gibbs' inequality then gives the minimiser pi = pi* for
    every prompt with d(x) > 0 (prompts outside the data are unconstrained), and pi* is 0 wherever pi_ref is 0.
  * eq:dpo_reward_full (taking logs of eq:dpo_opt_policy) needs pi_ref(y|x) > 0.
  * eq:dpo_loss_deriv0 -> 1: the factor that cancels is exp(beta log Z(x)) = Z(x)^beta, not exp(log Z(x)) as
    the text says; it cancels because both responses answer the SAME prompt x.
  * eq:dpo_loss_deriv3 is a preference probability, not a loss. The loss eq:dpo_core follows by replacing
    pi* with pi_theta and taking the negative log-likelihood of the observed labels (maximum likelihood): a
    modelling step. Its population minimiser satisfies sigma(beta h) = p*(y_w > y_l) (checked here); on
    finite data it can fail to exist (one response winning every comparison drives its rival to pi = 0).
  * eq:dpo_reward drops the beta log Z(x) term of eq:dpo_reward_full: it is the reward only up to a
    per-prompt shift, which is all Bradley-Terry can see (checked). The chapter also writes pi_r there for
    the trained policy pi_theta.
  * There is no eq:dpo_grad_1 in the chapter: the labels jump from eq:dpo_grad_0 to eq:dpo_grad_2.
  * eq:dpo_grad_0 -> 2 moves the gradient inside the expectation: the data distribution must not depend
    on theta (offline data). eq:dpo_grad_3 needs the reference log-probs to be constants (frozen pi_ref);
    sympy shows the extra terms that appear otherwise.
  * The per-pair weight of eq:dpo_gradient is beta sigma(r_hat_r - r_hat_c), in (0, beta); the chapter's
    bullet calls it "a weight from 0 to 1" (true of sigma alone).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import sympy as sp

N_PROMPTS = 2  # the finite world of derivation 1: small enough for simplify(), big enough to be general
N_RESPONSES = 3


@dataclass(frozen=True)
class Step:
    """The verdict on one step of a derivation."""

    label: str  # the chapter's equation label, e.g. "eq:dpo_deriv_3"
    holds: bool
    method: str  # "sympy", "numeric" or "assumption"
    note: str  # what exactly was checked, and under which condition it holds

    def __str__(self) -> str:
        mark = "holds" if self.holds else "FAILS"
        return f"{self.label:<27} {mark:<6} [{self.method}] {self.note}"


def is_zero(expression: sp.Expr) -> bool:
    """The one test every sympy check uses: simplify(a - b) == 0."""
    return sp.simplify(expression) == 0


def _follows(label: str, new, previous, symbols, how: str) -> "Step":
    """The plain sympy step: ``label`` holds when new(s) - previous(s) simplifies to 0 on ``symbols()``."""
    s = symbols()
    return Step(label, is_zero(new(s) - previous(s)), "sympy", how)


# ==============================================================================================================
# Derivation 1: the optimal policy of the KL-regularised objective


@dataclass(frozen=True)
class FiniteWorld:
    """Symbols for prompts x = 0..P-1 and responses y = 0..K-1: pi[x][y], ref[x][y], r[x][y], d[x], beta."""

    beta: sp.Symbol
    pi: tuple
    ref: tuple
    r: tuple
    d: tuple

    @property
    def prompts(self) -> range:
        return range(len(self.pi))

    @property
    def responses(self) -> range:
        return range(len(self.pi[0]))

    def expect(self, f) -> sp.Expr:
        """E_{x~D} E_{y~pi(y|x)} [f(x, y)] = sum_x d(x) sum_y pi(y|x) f(x, y)."""
        return sp.Add(*[self.d[x] * self.pi[x][y] * f(x, y) for x in self.prompts for y in self.responses])

    def simplex(self) -> dict:
        """The constraint sum_y pi(y|x) = 1, as a substitution for the last response's probability."""
        last = len(self.pi[0]) - 1
        return {self.pi[x][last]: 1 - sp.Add(*self.pi[x][:last]) for x in self.prompts}


@functools.lru_cache(maxsize=None)
def finite_world(n_prompts: int = N_PROMPTS, n_responses: int = N_RESPONSES) -> FiniteWorld:
    """All probabilities and weights positive, rewards real, beta positive: what the derivation assumes."""
    positive = dict(positive=True)

    def table(name: str, **assumptions) -> tuple:
        return tuple(tuple(sp.Symbol(f"{name}_{x}{y}", **assumptions) for y in range(n_responses))
                     for x in range(n_prompts))

    return FiniteWorld(
        beta=sp.Symbol("beta", **positive),
        pi=table("pi", **positive),
        ref=table("pi_ref", **positive),
        r=table("r", real=True),
        d=tuple(sp.Symbol(f"d_{x}", **positive) for x in range(n_prompts)),
    )


def kl(p: tuple, q: tuple) -> sp.Expr:
    """KL(p || q) = sum_y p(y) log(p(y) / q(y)) for two rows of symbols or expressions."""
    return sp.Add(*[p_y * sp.log(p_y / q_y) for p_y, q_y in zip(p, q)])


# The objectives, each as the expression inside max_pi / min_pi. ------------------------------------------------


def rlhf_objective(w: FiniteWorld) -> sp.Expr:
    """eq:rlhf_opt_eq_repeat (maximised): E_x [ E_{y~pi} r(x,y) - beta KL(pi(.|x) || pi_ref(.|x)) ]."""
    reward = w.expect(lambda x, y: w.r[x][y])
    penalty = sp.Add(*[w.d[x] * kl(w.pi[x], w.ref[x]) for x in w.prompts])
    return reward - w.beta * penalty


def dpo_deriv_1(w: FiniteWorld) -> sp.Expr:
    """eq:dpo_deriv_1 (maximised): E_x E_{y~pi} [ r(x,y) - beta log(pi(y|x) / pi_ref(y|x)) ]."""
    return w.expect(lambda x, y: w.r[x][y] - w.beta * sp.log(w.pi[x][y] / w.ref[x][y]))


def dpo_deriv_2(w: FiniteWorld) -> sp.Expr:
    """eq:dpo_deriv_2 (maximised): E[r] - beta E[log(pi / pi_ref)], two separate expectations."""
    return w.expect(lambda x, y: w.r[x][y]) - w.beta * w.expect(lambda x, y: sp.log(w.pi[x][y] / w.ref[x][y]))


def dpo_deriv_3(w: FiniteWorld) -> sp.Expr:
    """eq:dpo_deriv_3 (minimised): -E[r] + beta E[log(pi / pi_ref)]."""
    return -w.expect(lambda x, y: w.r[x][y]) + w.beta * w.expect(lambda x, y: sp.log(w.pi[x][y] / w.ref[x][y]))


def dpo_deriv_4(w: FiniteWorld) -> sp.Expr:
    """eq:dpo_deriv_4 (minimised): E[ log(pi / pi_ref) - r / beta ]."""
    return w.expect(lambda x, y: sp.log(w.pi[x][y] / w.ref[x][y]) - w.r[x][y] / w.beta)


def partition_function(w: FiniteWorld) -> tuple:
    """eq:dpo_partition: Z(x) = sum_y pi_ref(y|x) exp(r(x,y) / beta), one expression per prompt."""
    return tuple(sp.Add(*[w.ref[x][y] * sp.exp(w.r[x][y] / w.beta) for y in w.responses]) for x in w.prompts)


def optimal_policy(w: FiniteWorld) -> tuple:
    """eq:dpo_opt_policy: pi*(y|x) = pi_ref(y|x) exp(r(x,y) / beta) / Z(x), as a table of expressions."""
    Z = partition_function(w)
    return tuple(tuple(w.ref[x][y] * sp.exp(w.r[x][y] / w.beta) / Z[x] for y in w.responses) for x in w.prompts)


def dpo_deriv_5(w: FiniteWorld, Z: tuple | None = None) -> sp.Expr:
    """eq:dpo_deriv_5 (minimised): E[ log( pi / (pi_ref exp(r/beta) / Z) ) - log Z ]. Z defaults to eq:dpo_partition."""
    Z = partition_function(w) if Z is None else Z
    return w.expect(lambda x, y: sp.log(w.pi[x][y] / (w.ref[x][y] * sp.exp(w.r[x][y] / w.beta) / Z[x]))
                    - sp.log(Z[x]))


def dpo_deriv_10(w: FiniteWorld) -> sp.Expr:
    """eq:dpo_deriv_10 (minimised): E_x [ KL(pi(.|x) || pi*(.|x)) - log Z(x) ]."""
    Z, star = partition_function(w), optimal_policy(w)
    return sp.Add(*[w.d[x] * (kl(w.pi[x], star[x]) - sp.log(Z[x])) for x in w.prompts])


# The bracket of eq:dpo_deriv_4 at one (x, y): eq:dpo_deriv_6 ... eq:dpo_deriv_9. -------------------------------


@dataclass(frozen=True)
class PointSymbols:
    """pi(y|x), pi_ref(y|x), Z(x) > 0, r(x,y) real, beta > 0 at one (x, y)."""

    pi: sp.Symbol
    ref: sp.Symbol
    Z: sp.Symbol
    r: sp.Symbol
    beta: sp.Symbol


@functools.lru_cache(maxsize=None)
def point_symbols() -> PointSymbols:
    pi, ref, Z, beta = sp.symbols("pi pi_ref Z beta", positive=True)
    return PointSymbols(pi=pi, ref=ref, Z=Z, r=sp.Symbol("r", real=True), beta=beta)


def dpo_deriv_6(s: PointSymbols) -> sp.Expr:
    """eq:dpo_deriv_6: log(pi / pi_ref) - r / beta."""
    return sp.log(s.pi / s.ref) - s.r / s.beta


def dpo_deriv_7(s: PointSymbols) -> sp.Expr:
    """eq:dpo_deriv_7: ... + log Z - log Z. Built unevaluated, so that sympy does not cancel it on sight."""
    return sp.Add(dpo_deriv_6(s), sp.log(s.Z), -sp.log(s.Z), evaluate=False)


def dpo_deriv_8(s: PointSymbols) -> sp.Expr:
    """eq:dpo_deriv_8: (log(pi / pi_ref) + log Z) - log Z - r / beta."""
    return (sp.log(s.pi / s.ref) + sp.log(s.Z)) - sp.log(s.Z) - s.r / s.beta


def dpo_deriv_9(s: PointSymbols) -> sp.Expr:
    """eq:dpo_deriv_9: log( pi / (pi_ref / Z) ) - log Z - r / beta."""
    return sp.log(s.pi / (s.ref / s.Z)) - sp.log(s.Z) - s.r / s.beta


def dpo_deriv_5_bracket(s: PointSymbols) -> sp.Expr:
    """The bracket of eq:dpo_deriv_5: log( pi / (pi_ref exp(r/beta) / Z) ) - log Z."""
    return sp.log(s.pi / (s.ref * sp.exp(s.r / s.beta) / s.Z)) - sp.log(s.Z)


# The checks of derivation 1. -----------------------------------------------------------------------------------


@functools.cache  # a check is a pure function: the notebooks' summary tables reuse the result
def check_dpo_deriv_1() -> Step:
    w = finite_world()
    return Step("eq:dpo_deriv_1", is_zero(dpo_deriv_1(w) - rlhf_objective(w)), "sympy",
                "exact: the KL written out as E_y~pi[log pi/pi_ref] (the KL term read as averaged over x ~ D)")


@functools.cache
def check_dpo_deriv_2() -> Step:
    w = finite_world()
    return Step("eq:dpo_deriv_2", is_zero(dpo_deriv_2(w) - dpo_deriv_1(w)), "sympy",
                "exact: linearity of the expectation")


@functools.cache
def check_dpo_deriv_3() -> Step:
    w = finite_world()
    holds = is_zero(dpo_deriv_3(w) + dpo_deriv_2(w))
    return Step("eq:dpo_deriv_3", holds, "sympy",
                "exact as objectives: (3) = -(2), so argmax (2) = argmin (3); the values obey max f = -min(-f), "
                "not the chapter's '='")


@functools.cache
def check_dpo_deriv_4() -> Step:
    w = finite_world()
    holds = is_zero(dpo_deriv_4(w) - dpo_deriv_3(w) / w.beta) and w.beta.is_positive
    return Step("eq:dpo_deriv_4", holds, "sympy",
                "exact: (4) = (3) / beta; same argmin only because beta > 0 (value scaled by 1/beta)")


@functools.cache
def check_dpo_partition() -> Step:
    """Z(x) normalises: sum_y pi*(y|x) = 1 for every prompt."""
    w = finite_world()
    holds = all(is_zero(sp.Add(*row) - 1) for row in optimal_policy(w))
    return Step("eq:dpo_partition", holds, "sympy",
                "exact: with this Z(x), pi_ref exp(r/beta) / Z sums to 1 over y (needs Z finite: automatic here)")


@functools.cache
def check_dpo_deriv_5() -> Step:
    w = finite_world()
    any_Z = tuple(sp.Symbol(f"Z_{x}", positive=True) for x in w.prompts)
    holds = is_zero(dpo_deriv_5(w) - dpo_deriv_4(w)) and is_zero(dpo_deriv_5(w, any_Z) - dpo_deriv_4(w))
    return Step("eq:dpo_deriv_5", holds, "sympy",
                "exact: equals (4) for the partition Z(x) and for ANY positive Z(x)")


@functools.cache
def check_dpo_deriv_6() -> Step:
    w, s = finite_world(), point_symbols()
    # (6) is the bracket of (4): substitute the point symbols into (4)'s summand
    summand = sp.log(w.pi[0][0] / w.ref[0][0]) - w.r[0][0] / w.beta
    at_point = summand.subs({w.pi[0][0]: s.pi, w.ref[0][0]: s.ref, w.r[0][0]: s.r, w.beta: s.beta})
    return Step("eq:dpo_deriv_6", is_zero(dpo_deriv_6(s) - at_point), "sympy", "exact: the bracket of (4)")


@functools.cache
def check_dpo_deriv_7() -> Step:
    return _follows("eq:dpo_deriv_7", dpo_deriv_7, dpo_deriv_6, point_symbols,
                    "exact: adds log Z - log Z = 0")


@functools.cache
def check_dpo_deriv_8() -> Step:
    s = point_symbols()
    return Step("eq:dpo_deriv_8", is_zero(dpo_deriv_8(s) - dpo_deriv_7(s)), "sympy", "exact: regrouping")


@functools.cache
def check_dpo_deriv_9() -> Step:
    return _follows("eq:dpo_deriv_9", dpo_deriv_9, dpo_deriv_8, point_symbols,
                    "exact: log a + log Z = log(a Z) = log(a / (1/Z)), for positive a and Z")


@functools.cache
def check_dpo_deriv_9_to_5() -> Step:
    return _follows("eq:dpo_deriv_9 -> 5", dpo_deriv_5_bracket, dpo_deriv_9, point_symbols,
                    "exact: r/beta = log exp(r/beta) folded into the same log gives the bracket of (5), any Z > 0")


@functools.cache
def check_dpo_deriv_10() -> Step:
    w = finite_world()
    difference = dpo_deriv_10(w) - dpo_deriv_5(w)
    holds_on_simplex = is_zero(difference.subs(w.simplex()))
    needs_simplex = not is_zero(difference)  # without sum_y pi = 1 the two sides differ
    return Step("eq:dpo_deriv_10", holds_on_simplex and needs_simplex, "sympy",
                "exact only given sum_y pi(y|x) = 1 (sympy: the sides differ without it), which moves -log Z(x) "
                "out of E_y~pi")


def lagrangian_optimum(n_responses: int = N_RESPONSES) -> tuple:
    """Solve the objective for one prompt with a Lagrange multiplier on sum_y pi(y) = 1, with sympy.

    L = sum_y pi(y) r(y) - beta sum_y pi(y) log(pi(y)/pi_ref(y)) + lambda (sum_y pi(y) - 1).
    dL/dpi(y) = 0 gives pi(y) as a function of lambda; the constraint then fixes lambda.
    Returns (the solved pi(y) expressions, the symbols (pi, pi_ref, r, beta)).
    """
    w = finite_world(1, n_responses)
    pi, ref, r, beta = w.pi[0], w.ref[0], w.r[0], w.beta
    lam = sp.Symbol("lambda", real=True)
    lagrangian = (sp.Add(*[pi[y] * r[y] - beta * pi[y] * sp.log(pi[y] / ref[y]) for y in w.responses])
                  + lam * (sp.Add(*pi) - 1))
    stationary = {}
    for y in w.responses:
        (solution,) = sp.solve(sp.diff(lagrangian, pi[y]), pi[y])  # one root: log is monotone
        stationary[pi[y]] = solution
    (lam_value,) = sp.solve(sp.Eq(sp.Add(*stationary.values()), 1), lam)
    solved = tuple(sp.simplify(stationary[pi[y]].subs(lam, lam_value)) for y in w.responses)
    return solved, (pi, ref, r, beta)


@functools.cache
def check_optimal_policy_lagrangian() -> Step:
    solved, (pi, ref, r, beta) = lagrangian_optimum()
    Z = sp.Add(*[ref[y] * sp.exp(r[y] / beta) for y in range(len(ref))])
    holds = all(is_zero(solved[y] - ref[y] * sp.exp(r[y] / beta) / Z) for y in range(len(ref)))
    return Step("eq:dpo_opt_policy", holds, "sympy",
                f"exact: sympy solves the Lagrangian on {N_RESPONSES} responses; its stationary point is "
                "pi_ref exp(r/beta) / Z")


@functools.cache
def check_optimal_policy_convexity() -> Step:
    """The objective (4) is strictly convex in pi, so its stationary point on the simplex is the global min."""
    w = finite_world()
    flat = [w.pi[x][y] for x in w.prompts for y in w.responses]
    hessian = sp.hessian(dpo_deriv_4(w), flat)
    expected = sp.diag(*[w.d[x] / w.pi[x][y] for x in w.prompts for y in w.responses])
    holds = (hessian - expected).applyfunc(sp.simplify) == sp.zeros(len(flat), len(flat))
    return Step("eq:dpo_opt_policy (unique)", holds, "sympy",
                "exact: Hessian of (4) is diag(d(x)/pi(y|x)), positive definite: the stationary point is the "
                "unique global minimum (prompts with d(x) > 0)")


@functools.cache
def check_optimal_value() -> Step:
    """At pi = pi*, the KL term of (10) vanishes: (10) = -E log Z, and the objective is beta E_x log Z(x)."""
    w = finite_world()
    at_optimum = {w.pi[x][y]: optimal_policy(w)[x][y] for x in w.prompts for y in w.responses}
    Z = partition_function(w)
    value_10 = -sp.Add(*[w.d[x] * sp.log(Z[x]) for x in w.prompts])
    holds = (is_zero(dpo_deriv_10(w).subs(at_optimum) - value_10)
             and is_zero(rlhf_objective(w).subs(at_optimum) + w.beta * value_10))
    return Step("eq:dpo_deriv_10 at pi*", holds, "sympy",
                "exact: KL(pi* || pi*) = 0, and the optimal objective is beta E_x log Z(x)")


@functools.cache
def check_gibbs_inequality(n_policies: int = 2000, seed: int = 0) -> Step:
    """Gibbs' inequality, numerically: no random policy gets a lower (10) than pi*, and the gap is the KL.

    sympy cannot prove KL >= 0 for symbolic distributions in one simplify; the convexity check above is the
    proof, this is the measurement. Evaluated with Python floats (derivations imports sympy only).
    """
    w = finite_world()
    rng = random.Random(seed)
    flat_pi = [w.pi[x][y] for x in w.prompts for y in w.responses]
    numbers = {w.beta: rng.uniform(0.2, 2.0)}
    for x in w.prompts:
        numbers[w.d[x]] = 1.0 / len(w.d)
        ref_row = _random_distribution(rng, len(w.responses))
        for y in w.responses:
            numbers[w.ref[x][y]] = ref_row[y]
            numbers[w.r[x][y]] = rng.gauss(0.0, 1.0)
    objective_10 = sp.lambdify(flat_pi, dpo_deriv_10(w).subs(numbers), modules="math")
    star = [float(optimal_policy(w)[x][y].subs(numbers)) for x in w.prompts for y in w.responses]
    best = objective_10(*star)
    worst_gap = float("inf")
    for _ in range(n_policies):
        policy = [p for _x in w.prompts for p in _random_distribution(rng, len(w.responses))]
        kl_to_star = sum(numbers[w.d[i // len(w.responses)]] * p * math.log(p / q) for i, (p, q) in
                         enumerate(zip(policy, star)))
        gap = objective_10(*policy) - best
        worst_gap = min(worst_gap, gap)
        if abs(gap - kl_to_star) > 1e-9:  # the gap must be exactly E_x KL(pi || pi*)
            return Step("Gibbs' inequality", False, "numeric", f"gap {gap} != KL {kl_to_star}")
    return Step("Gibbs' inequality", worst_gap > 0, "numeric",
                f"{n_policies} random policies: none beats pi* on (10); the gap equals E_x KL(pi || pi*) "
                f"to 1e-9 (smallest gap {worst_gap:.2e})")


def _random_distribution(rng: random.Random, k: int) -> list:
    draws = [rng.expovariate(1.0) for _ in range(k)]  # normalised exponentials: uniform on the simplex
    total = sum(draws)
    return [v / total for v in draws]


@functools.cache
def check_drop_log_Z() -> Step:
    """The step from (10) to pi*: -log Z(x) does not depend on pi, so dropping it keeps the argmin."""
    w = finite_world()
    Z = partition_function(w)
    minus_log_Z = -sp.Add(*[w.d[x] * sp.log(Z[x]) for x in w.prompts])
    holds = all(sp.diff(minus_log_Z, p) == 0 for row in w.pi for p in row)
    return Step("eq:dpo_deriv_10 -> opt", holds, "sympy",
                "up to a term that does not depend on pi: d(log Z)/d pi = 0, so dropping -log Z(x) changes the "
                "value, not the minimiser")


OPTIMAL_POLICY_CHECKS = (
    check_dpo_deriv_1, check_dpo_deriv_2, check_dpo_deriv_3, check_dpo_deriv_4, check_dpo_partition,
    check_dpo_deriv_5, check_dpo_deriv_6, check_dpo_deriv_7, check_dpo_deriv_8, check_dpo_deriv_9,
    check_dpo_deriv_9_to_5, check_dpo_deriv_10, check_drop_log_Z, check_optimal_value,
    check_optimal_policy_lagrangian, check_optimal_policy_convexity, check_gibbs_inequality,
)


# ==============================================================================================================
# Derivation 2: from Bradley-Terry to the DPO loss


@dataclass(frozen=True)
class PairSymbols:
    """One prompt x and two responses: pi*(y_i|x), pi_ref(y_i|x), Z(x) > 0, rewards r_i real, beta > 0."""

    star: tuple
    ref: tuple
    r: tuple
    Z: sp.Symbol
    beta: sp.Symbol


@functools.lru_cache(maxsize=None)
def pair_symbols() -> PairSymbols:
    star = sp.symbols("pi^*_1 pi^*_2", positive=True)
    ref = sp.symbols("pi_ref_1 pi_ref_2", positive=True)
    Z, beta = sp.symbols("Z beta", positive=True)
    return PairSymbols(star=star, ref=ref, r=sp.symbols("r_1 r_2", real=True), Z=Z, beta=beta)


def sigmoid(u: sp.Expr) -> sp.Expr:
    """sigma(u) = 1 / (1 + exp(-u)), the definition the chapter uses before eq:dpo_loss_deriv3."""
    return 1 / (1 + sp.exp(-u))


def bradley_terry(r1: sp.Expr, r2: sp.Expr) -> sp.Expr:
    """eq:bradley_terry_dpo: p*(y1 > y2 | x) = exp(r1) / (exp(r1) + exp(r2))."""
    return sp.exp(r1) / (sp.exp(r1) + sp.exp(r2))


def dpo_reward_full(star: sp.Expr, ref: sp.Expr, Z: sp.Expr, beta: sp.Expr) -> sp.Expr:
    """eq:dpo_reward_full: r*(x, y) = beta log(pi*(y|x) / pi_ref(y|x)) + beta log Z(x)."""
    return beta * sp.log(star / ref) + beta * sp.log(Z)


def _log_ratio_terms(s: PairSymbols) -> tuple:
    """beta log(pi*(y_i|x) / pi_ref(y_i|x)) for i = 1, 2."""
    return tuple(s.beta * sp.log(s.star[i] / s.ref[i]) for i in range(2))


def dpo_loss_deriv0(s: PairSymbols) -> sp.Expr:
    """eq:dpo_loss_deriv0: Bradley-Terry with r* from eq:dpo_reward_full written out."""
    a1, a2 = _log_ratio_terms(s)
    e1, e2 = sp.exp(a1 + s.beta * sp.log(s.Z)), sp.exp(a2 + s.beta * sp.log(s.Z))
    return e1 / (e1 + e2)


def dpo_loss_deriv1(s: PairSymbols) -> sp.Expr:
    """eq:dpo_loss_deriv1: the same with Z(x) cancelled."""
    a1, a2 = _log_ratio_terms(s)
    return sp.exp(a1) / (sp.exp(a1) + sp.exp(a2))


def dpo_loss_deriv2(s: PairSymbols) -> sp.Expr:
    """eq:dpo_loss_deriv2: 1 / (1 + exp(a2 - a1))."""
    a1, a2 = _log_ratio_terms(s)
    return 1 / (1 + sp.exp(a2 - a1))


def dpo_loss_deriv3(s: PairSymbols) -> sp.Expr:
    """eq:dpo_loss_deriv3: sigma(beta log pi*_1/pi_ref_1 - beta log pi*_2/pi_ref_2)."""
    a1, a2 = _log_ratio_terms(s)
    return sigmoid(a1 - a2)


@functools.cache
def check_dpo_reward_full() -> Step:
    s = point_symbols()
    star = s.ref * sp.exp(s.r / s.beta) / s.Z  # eq:dpo_opt_policy at one (x, y)
    holds = is_zero(dpo_reward_full(star, s.ref, s.Z, s.beta) - s.r)
    return Step("eq:dpo_reward_full", holds, "sympy",
                "exact: with pi* from eq:dpo_opt_policy it returns r; needs pi_ref(y|x) > 0 (log of both sides)")


@functools.cache
def check_dpo_loss_deriv0() -> Step:
    s = pair_symbols()
    substituted = bradley_terry(dpo_reward_full(s.star[0], s.ref[0], s.Z, s.beta),
                                dpo_reward_full(s.star[1], s.ref[1], s.Z, s.beta))
    return Step("eq:dpo_loss_deriv0", is_zero(dpo_loss_deriv0(s) - substituted), "sympy",
                "exact: eq:dpo_reward_full substituted into eq:bradley_terry_dpo")


@functools.cache
def check_dpo_loss_deriv1() -> Step:
    return _follows("eq:dpo_loss_deriv1", dpo_loss_deriv1, dpo_loss_deriv0, pair_symbols,
                    "exact: the common factor exp(beta log Z) = Z^beta cancels (the text says e^{log Z}); needs "
                    "both responses to share the prompt x")


@functools.cache
def check_dpo_loss_deriv2() -> Step:
    return _follows("eq:dpo_loss_deriv2", dpo_loss_deriv2, dpo_loss_deriv1, pair_symbols,
                    "exact: numerator and denominator times exp(-a1)")


@functools.cache
def check_dpo_loss_deriv3() -> Step:
    return _follows("eq:dpo_loss_deriv3", dpo_loss_deriv3, dpo_loss_deriv2, pair_symbols,
                    "exact: sigma(u) = 1 / (1 + exp(-u))")


@functools.cache
def check_bradley_terry_is_sigmoid() -> Step:
    s = pair_symbols()
    holds = is_zero(bradley_terry(*s.r) - sigmoid(s.r[0] - s.r[1]))
    return Step("eq:bradley_terry_dpo", holds, "sympy",
                "exact: exp(r1) / (exp(r1) + exp(r2)) = sigma(r1 - r2); only reward DIFFERENCES matter")


@functools.cache
def check_dpo_core_is_max_likelihood() -> Step:
    """eq:dpo_core from eq:dpo_loss_deriv3: the negative log-likelihood of the labels, pi* -> pi_theta.

    The replacement is a modelling choice (fit the preference model by maximum likelihood). What sympy CAN
    check: the expected loss of one pair, with the true preference probability p, is minimised exactly
    where the model's probability sigma(beta h) equals p.
    """
    h = sp.Symbol("h", real=True)
    beta = sp.Symbol("beta", positive=True)
    p = sp.Symbol("p", positive=True)
    expected_loss = -p * sp.log(sigmoid(beta * h)) - (1 - p) * sp.log(sigmoid(-beta * h))
    (h_opt,) = sp.solve(sp.diff(expected_loss, h), h)
    holds = is_zero(sigmoid(beta * h_opt) - p) and is_zero(sp.diff(expected_loss, h, 2).subs(h, h_opt)
                                                           - beta ** 2 * p * (1 - p))
    return Step("eq:dpo_core", holds, "assumption",
                "modelling step: pi* -> pi_theta and negative log-likelihood (max likelihood). sympy: the "
                "expected pair loss is minimised where sigma(beta h) = p* (0 < p* < 1; no minimiser if p* is 0 or 1)")


@functools.cache
def check_implicit_reward_same_preferences() -> Step:
    """eq:dpo_reward drops beta log Z(x): the Bradley-Terry probabilities do not change."""
    s = pair_symbols()
    full = [dpo_reward_full(s.star[i], s.ref[i], s.Z, s.beta) for i in range(2)]
    implicit = list(_log_ratio_terms(s))
    return Step("eq:dpo_reward", is_zero(bradley_terry(*full) - bradley_terry(*implicit)), "sympy",
                "exact: the implicit reward beta log(pi/pi_ref) is r* minus beta log Z(x), a per-prompt shift "
                "that leaves every preference probability unchanged")


@functools.cache
def check_reward_shift_invariance() -> Step:
    """Rewards r(x, y) + f(x) give the same pi* (Z absorbs exp(f(x)/beta)): rewards are defined up to f(x)."""
    w = finite_world(1, N_RESPONSES)
    f = sp.Symbol("f", real=True)
    shifted = FiniteWorld(beta=w.beta, pi=w.pi, ref=w.ref, r=(tuple(r + f for r in w.r[0]),), d=w.d)
    holds = all(is_zero(a - b) for a, b in zip(optimal_policy(shifted)[0], optimal_policy(w)[0]))
    return Step("reward shift f(x)", holds, "sympy",
                f"exact on {N_RESPONSES} responses: pi* for r + f(x) equals pi* for r")


BRADLEY_TERRY_CHECKS = (
    check_bradley_terry_is_sigmoid, check_dpo_reward_full, check_dpo_loss_deriv0, check_dpo_loss_deriv1,
    check_dpo_loss_deriv2, check_dpo_loss_deriv3, check_dpo_core_is_max_likelihood,
    check_implicit_reward_same_preferences, check_reward_shift_invariance,
)


# ==============================================================================================================
# Derivation 3: the gradient


@dataclass(frozen=True)
class GradientSymbols:
    """theta, log pi_theta(y_c|x) and log pi_theta(y_r|x) as functions of theta, reference log-probs, beta."""

    theta: sp.Symbol
    logp_chosen: sp.Expr
    logp_rejected: sp.Expr
    ref_chosen: sp.Symbol
    ref_rejected: sp.Symbol
    beta: sp.Symbol


@functools.lru_cache(maxsize=None)
def gradient_symbols() -> GradientSymbols:
    theta = sp.Symbol("theta", real=True)
    return GradientSymbols(
        theta=theta,
        logp_chosen=sp.Function("ell_c")(theta),  # ell_c = log pi_theta(y_c|x), rendered as \ell_c
        logp_rejected=sp.Function("ell_r")(theta),
        ref_chosen=sp.Symbol("ell^ref_c", real=True),  # log pi_ref(y_c|x): a constant
        ref_rejected=sp.Symbol("ell^ref_r", real=True),
        beta=sp.Symbol("beta", positive=True),
    )


def margin_u(g: GradientSymbols) -> sp.Expr:
    """u = beta log(pi_theta(y_c)/pi_ref(y_c)) - beta log(pi_theta(y_r)/pi_ref(y_r)) = r_hat_c - r_hat_r."""
    return g.beta * (g.logp_chosen - g.ref_chosen) - g.beta * (g.logp_rejected - g.ref_rejected)


def dpo_loss(g: GradientSymbols) -> sp.Expr:
    """The DPO loss of one triple (eq:dpo_core without the expectation): -log sigma(u)."""
    return -sp.log(sigmoid(margin_u(g)))


def dpo_grad_0(g: GradientSymbols) -> sp.Expr:
    """eq:dpo_grad_0: d/dtheta of the loss, computed by sympy."""
    return sp.diff(dpo_loss(g), g.theta)


def dpo_grad_2(g: GradientSymbols) -> sp.Expr:
    """eq:dpo_grad_2: -(sigma'(u) / sigma(u)) du/dtheta."""
    t = sp.Symbol("t", real=True)
    sigma_prime = sp.diff(sigmoid(t), t).subs(t, margin_u(g))
    return -(sigma_prime / sigmoid(margin_u(g))) * sp.diff(margin_u(g), g.theta)


def dpo_grad_3(g: GradientSymbols) -> sp.Expr:
    """eq:dpo_grad_3 (= eq:dpo_gradient): -beta sigma(r_hat_r - r_hat_c) (dlog pi_c - dlog pi_r)."""
    r_hat_c = g.beta * (g.logp_chosen - g.ref_chosen)
    r_hat_r = g.beta * (g.logp_rejected - g.ref_rejected)
    return -g.beta * sigmoid(r_hat_r - r_hat_c) * (sp.diff(g.logp_chosen, g.theta) - sp.diff(g.logp_rejected, g.theta))


@functools.cache
def check_dpo_grad_0() -> Step:
    """The gradient of an average over a fixed dataset is the average of the gradients (2 triples here)."""
    g = gradient_symbols()
    other = GradientSymbols(g.theta, sp.Function("ell_c2")(g.theta), sp.Function("ell_r2")(g.theta),
                            sp.Symbol("ell^ref_c2", real=True), sp.Symbol("ell^ref_r2", real=True), g.beta)
    mean_loss = (dpo_loss(g) + dpo_loss(other)) / 2
    holds = is_zero(sp.diff(mean_loss, g.theta) - (dpo_grad_0(g) + dpo_grad_0(other)) / 2)
    return Step("eq:dpo_grad_0", holds, "sympy",
                "exact on a 2-triple dataset: grad of the mean = mean of grads; assumes the data distribution "
                "does not depend on theta (offline pairs)")


@functools.cache
def check_sigmoid_identities() -> Step:
    t = sp.Symbol("t", real=True)
    holds = (is_zero(sp.diff(sigmoid(t), t) - sigmoid(t) * (1 - sigmoid(t)))
             and is_zero(sigmoid(-t) - (1 - sigmoid(t))))
    return Step("sigma' and sigma(-x)", holds, "sympy", "exact: sigma' = sigma (1 - sigma), sigma(-x) = 1 - sigma(x)")


@functools.cache
def check_dpo_grad_2() -> Step:
    g = gradient_symbols()
    return Step("eq:dpo_grad_2", is_zero(dpo_grad_2(g) - dpo_grad_0(g)), "sympy",
                "exact: chain rule, d/du (-log sigma(u)) = -sigma'(u)/sigma(u)")


@functools.cache
def check_dpo_grad_3() -> Step:
    g = gradient_symbols()
    return Step("eq:dpo_grad_3", is_zero(dpo_grad_3(g) - dpo_grad_2(g)), "sympy",
                "exact: sigma'/sigma = sigma(-u) and du/dtheta = beta (dlog pi_c - dlog pi_r), given a frozen "
                "pi_ref (no eq:dpo_grad_1 in the chapter)")


def moving_reference_symbols() -> GradientSymbols:
    """As ``gradient_symbols``, but with reference log-probs that depend on theta (a reference that is trained)."""
    g = gradient_symbols()
    return GradientSymbols(g.theta, g.logp_chosen, g.logp_rejected, sp.Function("ell^ref_c")(g.theta),
                           sp.Function("ell^ref_r")(g.theta), g.beta)


@functools.cache
def check_grad_needs_frozen_reference() -> Step:
    """If the reference log-probs moved with theta, eq:dpo_grad_3 would miss terms: the condition is real."""
    moving = moving_reference_symbols()
    differs = not is_zero(dpo_grad_0(moving) - dpo_grad_3(moving))
    return Step("eq:dpo_grad_3 (condition)", differs, "sympy",
                "with pi_ref depending on theta the formula is wrong (extra beta sigma(-u) dlog pi_ref terms): "
                "the reference must be frozen")


def loss_partials() -> tuple:
    """d(-log sigma(u)) / d(each of the four log-probs), the log-probs as plain symbols.

    Returns ({"policy_chosen": ..., "policy_rejected": ..., "reference_chosen": ..., "reference_rejected": ...},
    (ell_c, ell_r, ell^ref_c, ell^ref_r, beta)), where ell_c = log pi_theta(y_c|x), ell^ref_c = log pi_ref(y_c|x).
    """
    lc, lr, rc, rr = sp.symbols("ell_c ell_r ell^ref_c ell^ref_r", real=True)
    beta = sp.Symbol("beta", positive=True)
    loss = -sp.log(sigmoid(beta * (lc - rc) - beta * (lr - rr)))
    names = {"policy_chosen": lc, "policy_rejected": lr, "reference_chosen": rc, "reference_rejected": rr}
    return {name: sp.diff(loss, v) for name, v in names.items()}, (lc, lr, rc, rr, beta)


def dpo_weight(lc, lr, rc, rr, beta) -> sp.Expr:
    """beta sigma(r_hat_r - r_hat_c): how hard one pair pulls (eq:dpo_gradient / eq:dpo_grad_3)."""
    return beta * sigmoid(beta * (lr - rr) - beta * (lc - rc))


@functools.cache
def check_loss_partials() -> Step:
    partials, symbols = loss_partials()
    weight = dpo_weight(*symbols)
    holds = (is_zero(partials["policy_chosen"] + weight) and is_zero(partials["policy_rejected"] - weight)
             and is_zero(partials["reference_chosen"] - weight) and is_zero(partials["reference_rejected"] + weight))
    return Step("eq:dpo_gradient", holds, "sympy",
                "exact: dL/dell_c = -w, dL/dell_r = +w (reference: the opposite), w = beta sigma(r_hat_r - "
                "r_hat_c)")


GRADIENT_CHECKS = (
    check_dpo_grad_0, check_sigmoid_identities, check_dpo_grad_2, check_dpo_grad_3,
    check_grad_needs_frozen_reference, check_loss_partials,
)

ALL_CHECKS = OPTIMAL_POLICY_CHECKS + BRADLEY_TERRY_CHECKS + GRADIENT_CHECKS


def run_all() -> list:
    """Every check, in the chapter's order. ``[print(s) for s in run_all()]`` prints the table."""
    return [check() for check in ALL_CHECKS]
