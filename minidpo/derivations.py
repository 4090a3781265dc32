"""The book chapter's three DPO derivations, step by step, as sympy expressions -- and a check for each step that
is shown able to fail.

Sources: Nathan Lambert's RLHF book, chapter "Direct Alignment Algorithms" (equation labels eq:dpo_deriv_5 ...);
the DPO paper (Rafailov et al. 2023, arXiv:2305.18290: Appendix A.1 the optimal policy, Sec. 4 / Eq. 5-7 the loss,
Theorem 1 and Lemmas 1-2 in Sec. 5.1, Sec. 5.2 the normaliser, Appendix A.3 Plackett-Luce); the IPO paper (Azar
et al. 2023, arXiv:2310.12036: the PsiPO objective and IPO).

    1. The optimal policy      eq:rlhf_opt_eq_repeat -> eq:dpo_deriv_1 ... eq:dpo_deriv_10 -> eq:dpo_opt_policy
    2. DPO from Bradley-Terry  eq:bradley_terry_dpo -> eq:dpo_reward_full -> eq:dpo_loss_deriv0 ... 3 (-> eq:dpo_core)
    3. The gradient            eq:dpo_grad_0 -> eq:dpo_grad_2 -> eq:dpo_grad_3 (= eq:dpo_gradient)
    4. Theory the chapter leaves out: reward classes (Lemmas 1-2, Theorem 1), Plackett-Luce, the soft value
       baseline (Sec. 5.2), PsiPO and IPO.

How the checks work. Every check returns a ``Step`` (label, holds, method, note). ``method`` is

  * ``"sympy"``: an identity proved with ``simplify(new - previous) == 0``, a minimiser solved for on both sides
    (Lagrange multipliers on the simplex, plus the curvature that makes it a minimum), or a limit;
  * ``"numeric"``: measured at numbers; "these differ" claims are always a numeric counterexample;
  * ``"definitional"``: the step restates its predecessor (a substitution or the definition of a symbol);
  * ``"assumption"``: a modelling step that no algebra can prove.

A sympy step whose difference is already 0 BEFORE simplify runs was decided by sympy's automatic
canonicalisation (it reorders and merges terms on construction); ``Step.canonical`` says so, detected in code.
Only sympy and numeric steps that are not canonical count as checks (``Step.counts``). Every check, counted or
not, takes the expressions it compares as arguments, so a plausible wrong step can be passed in:
``NEGATIVE_CONTROLS`` holds one per check, and the tests require each to be rejected.

Derivation 1 is written on a FINITE world (2 prompts x 3 responses, every probability a positive symbol, every
reward a real symbol, beta positive), which students can read; the ``*_any_n`` checks redo the steps for any
number n of responses with sympy ``IndexedBase``/``Sum``. ``check_step`` checks a user's own step.

What the checks found (conditions the chapter does not state, and its slips):
  * eq:rlhf_opt_eq_repeat mixes RL notation (tau, s_t, a_t, r_theta, pi^RL) into a bandit problem; read as
    eq:dpo_deriv_1 it needs the KL term to be averaged over x ~ D as well.
  * eq:dpo_deriv_2 -> 3 -> 4 are joined by "=", but they share their OPTIMISER, not their optimal VALUE; dividing
    by beta keeps the minimiser only because beta > 0 (with beta < 0 the stationary point of (3) is a maximum).
  * eq:dpo_deriv_5 ... 9 hold for ANY positive Z(x); the partition function matters only at eq:dpo_deriv_10.
  * eq:dpo_deriv_10 moves -log Z(x) out of E_{y~pi}: (10) - (5) = (1 - sum_y pi(y|x)) log Z(x), zero only on the
    simplex. The bracket is a KL divergence only because Z(x) normalises (finite Z).
  * "Z(x) does not depend on the final answer, we can ignore it": dropping it keeps the minimiser (solved for on
    both sides), not the value. pi* is pinned down only where d(x) > 0, and is 0 wherever pi_ref is 0.
  * eq:dpo_reward_full needs pi_ref(y|x) > 0. In eq:dpo_loss_deriv0 -> 1 the factor that cancels is
    Z(x)^beta, not exp(log Z(x)); it cancels because both responses answer the SAME prompt.
  * eq:dpo_loss_deriv3 is a preference probability, not a loss; eq:dpo_core follows by a modelling step.
  * eq:dpo_grad_0 has the gradient OUTSIDE the expectation; eq:dpo_grad_2 has it inside: the swap needs data that
    do not depend on theta (offline pairs). eq:dpo_grad_3 needs a frozen reference. There is no eq:dpo_grad_1.
  * The chapter gives IPO's Psi as log(q / (1 - q)): that is the logit, the Psi that gives back RLHF/DPO; IPO's
    Psi is the identity (Azar et al. 2023).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from dataclasses import dataclass

import sympy as sp
from sympy.core.function import AppliedUndef

N_PROMPTS = 2  # the finite world of derivation 1: small enough for simplify(), big enough to be general
N_RESPONSES = 3
N_SOLVE = 2  # responses of the one-prompt world on which minimisers are solved for (sp.solve is the slow part)


@dataclass(frozen=True)
class Step:
    """The verdict on one step of a derivation."""

    label: str  # the chapter's equation label, e.g. "eq:dpo_deriv_3"
    holds: bool
    method: str  # "sympy", "numeric", "definitional" or "assumption"
    note: str  # what exactly was checked, and under which condition it holds
    canonical: bool = False  # the difference was 0 before simplify ran: sympy's construction decided it

    @property
    def counts(self) -> bool:
        """A real check: sympy or numeric, and not decided by canonicalisation."""
        return self.method in ("sympy", "numeric") and not self.canonical

    def __str__(self) -> str:
        mark = "holds" if self.holds else "FAILS"
        how = "canonical" if self.canonical and self.method != "definitional" else self.method
        return f"{self.label:<29} {mark:<6} [{how}] {self.note}"


def is_zero(expression: sp.Expr) -> bool:
    """The one test every sympy identity uses: simplify(a - b) == 0."""
    return sp.simplify(expression) == 0


def is_canonical_zero(expression) -> bool:
    """The difference is 0 as sympy built it, before any simplify: the automatic canonicalisation decided it."""
    return sp.sympify(expression) == 0


def _vanishes(difference) -> bool:
    """0 on construction, or simplify(difference) == 0. A numeric probe first: a difference that is visibly not 0
    at two random points is not 0 (this spares simplify the slow work of failing on a wrong step)."""
    if is_canonical_zero(difference):
        return True
    if counterexample(difference, trials=1, seed=1, tol=1e-6, digits=15) is not None:
        return False
    return is_zero(difference)


def _identity(label: str, differences, note: str, method: str = "sympy") -> Step:
    """A step that holds when every expression in ``differences`` simplifies to 0; canonical when all were 0
    before simplify."""
    differences = list(differences)
    canonical = all(is_canonical_zero(d) for d in differences)
    holds = all(_vanishes(d) for d in differences)
    return Step(label, holds, method, note, canonical)


def _follows(label: str, new, previous, symbols, how: str) -> Step:
    """The plain sympy step: ``label`` holds when new(s) - previous(s) simplifies to 0 on ``symbols()``."""
    s = symbols()
    return _identity(label, [new(s) - previous(s)], how)


# ==============================================================================================================
# Counterexamples: how a "these differ" claim is proved


def _random_value(atom, rng: random.Random) -> float:
    """A number that respects the atom's assumptions: positive, negative, or either sign."""
    size = round(rng.uniform(0.2, 2.0), 3)  # short numbers: the counterexample reported is the one evaluated
    if atom.is_positive or atom.is_nonnegative:
        return size
    if atom.is_negative or atom.is_nonpositive:
        return -size
    return size if rng.random() < 0.5 else -size


def _concrete(expression, rng: random.Random, n_value: int = 3) -> tuple:
    """Replace unknown functions f(theta) by random quadratics and symbolic sum limits by ``n_value``.
    Returns (the expression, {"f(t)": the quadratic used, as text})."""
    expr, used = sp.sympify(expression), {}
    for f in sorted({a.func for a in expr.atoms(AppliedUndef)}, key=str):
        c0, c1, c2 = (round(rng.uniform(-1, 1), 2) for _ in range(3))
        expr = expr.replace(f, lambda *args, c0=c0, c1=c1, c2=c2: c0 + c1 * args[0] + c2 * args[0] ** 2)
        used[f"{f}(t)"] = f"{c0} + {c1} t + {c2} t^2"
    integers = {s: n_value for s in expr.free_symbols if isinstance(s, sp.Symbol) and s.is_integer}
    if integers:
        expr = expr.subs(integers)
        used.update({str(s): v for s, v in integers.items()})
    return (expr.doit() if expr.has(sp.Sum, sp.Derivative, sp.Subs) else expr), used


def counterexample(difference, trials: int = 30, seed: int = 0, tol: float = 1e-8, digits: int = 30) -> dict | None:
    """Numbers at which ``difference`` is not 0 (a proof that two sides differ), or None if none was found.

    Symbols get random values that respect their assumptions (a positive symbol gets a positive number); unknown
    functions of theta become random quadratics; a sum up to a symbolic n is taken with n = 3. Returns
    {name: value} for the symbols (and the quadratics and n used), with the value of the difference under
    "difference".
    """
    rng = random.Random(seed)
    for _ in range(trials):
        expr, used = _concrete(difference, rng)
        atoms = expr.atoms(sp.Indexed) | {s for s in expr.free_symbols if isinstance(s, sp.Symbol)}
        atoms -= {a.base.label for a in expr.atoms(sp.Indexed)}  # the IndexedBase names themselves
        values = {a: _random_value(a, rng) for a in sorted(atoms, key=sp.default_sort_key)}  # sorted: same draws in every process
        try:
            value = complex(expr.xreplace({a: sp.Float(v, digits) for a, v in values.items()}).evalf(digits))
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if math.isfinite(value.real) and math.isfinite(value.imag) and abs(value) > tol:
            result = {str(a): v for a, v in sorted(values.items(), key=lambda kv: str(kv[0]))}
            result.update(used)  # the functions and the n it was evaluated with: enough to reproduce it
            result["difference"] = value.real if abs(value.imag) < tol else value
            return result
    return None


def _differs(label: str, difference, note: str) -> Step:
    """A "these differ" claim: holds when a numeric counterexample is found."""
    found = counterexample(difference)
    shown = "" if found is None else " (e.g. " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                            for k, v in found.items()) + ")"
    return Step(label, found is not None, "numeric", note + shown)


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


def with_beta(w: FiniteWorld, **assumptions) -> FiniteWorld:
    """The same world with beta re-declared, e.g. ``with_beta(w, negative=True)`` to see what beta > 0 buys."""
    return dataclasses.replace(w, beta=sp.Symbol("beta", **assumptions))


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


def optimal_policy(w: FiniteWorld, Z: tuple | None = None) -> tuple:
    """eq:dpo_opt_policy: pi*(y|x) = pi_ref(y|x) exp(r(x,y) / beta) / Z(x), as a table of expressions."""
    Z = partition_function(w) if Z is None else Z
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


def expected_kl_to_optimum(w: FiniteWorld) -> sp.Expr:
    """eq:dpo_deriv_10 with -log Z(x) dropped: E_x KL(pi(.|x) || pi*(.|x)), what the chapter minimises last."""
    star = optimal_policy(w)
    return sp.Add(*[w.d[x] * kl(w.pi[x], star[x]) for x in w.prompts])


# Minimisers on the simplex: how "keeps the minimiser" is measured. -------------------------------------------


@functools.lru_cache(maxsize=None)  # several checks solve the same objective
def simplex_minimiser(objective: sp.Expr, w: FiniteWorld, simplify: bool = True) -> tuple | None:
    """The stationary point of ``objective`` over each prompt's simplex, solved with sympy, or None.

    One multiplier per prompt: d objective / d pi(y|x) + lambda_x = 0 is solved for pi(y|x) (one root each, or
    None), then sum_y pi(y|x) = 1 for lambda_x. Returns the table of solved pi(y|x) (simplified).
    """
    table = []
    for x in w.prompts:
        lam = sp.Symbol(f"lambda_{x}", real=True)
        row = []
        for y in w.responses:
            roots = sp.solve(sp.diff(objective, w.pi[x][y]) + lam, w.pi[x][y])
            if len(roots) != 1:
                return None
            row.append(roots[0])
        lam_roots = sp.solve(sp.Add(*row) - 1, lam)
        if len(lam_roots) != 1:
            return None
        row = [p.subs(lam, lam_roots[0]) for p in row]
        table.append(tuple(sp.simplify(p) if simplify else p for p in row))
    return tuple(table)


@functools.lru_cache(maxsize=None)
def is_convex_in_pi(objective: sp.Expr, w: FiniteWorld) -> bool:
    """The Hessian in the probabilities is diagonal with entries sympy can prove positive (from the symbols'
    assumptions: beta's sign among them), so a stationary point on the simplex is the unique minimum."""
    flat = [w.pi[x][y] for x in w.prompts for y in w.responses]
    for i, p in enumerate(flat):
        if sp.simplify(sp.diff(objective, p, 2)).is_positive is not True:
            return False
        if any(sp.simplify(sp.diff(objective, p, q)) != 0 for q in flat[i + 1:]):
            return False
    return True


def _same_table(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None:
        return False
    return all(is_zero(p - q) for row_a, row_b in zip(a, b) for p, q in zip(row_a, row_b))


def _same_minimiser(minimised, other, w: FiniteWorld, other_sense: str = "min") -> bool:
    """argmin minimised(w) == arg{min|max} other(w): both solved for, both the right kind of extremum."""
    a, b = minimised(w), other(w)
    other_curved = is_convex_in_pi(b if other_sense == "min" else -b, w)
    return is_convex_in_pi(a, w) and other_curved and _same_table(simplex_minimiser(a, w),
                                                                  simplex_minimiser(b, w))


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
    """eq:dpo_deriv_7: ... + log Z - log Z (sympy cancels the pair as soon as the expression is built)."""
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


def _at(w: FiniteWorld, x: int, y: int, bracket, Z=None) -> sp.Expr:
    """A bracket written on the point symbols, evaluated at (x, y) of the finite world."""
    s = point_symbols()
    Z_x = partition_function(w)[x] if Z is None else Z[x]
    return bracket(s).subs({s.pi: w.pi[x][y], s.ref: w.ref[x][y], s.r: w.r[x][y], s.beta: w.beta, s.Z: Z_x})


# The checks of derivation 1. -----------------------------------------------------------------------------------


@functools.cache  # a check is a pure function: the notebooks' summary tables reuse the result
def check_dpo_deriv_1(new=dpo_deriv_1) -> Step:
    w = finite_world()
    return _identity("eq:dpo_deriv_1", [new(w) - rlhf_objective(w)],
                     "exact: the KL written out as E_y~pi[log pi/pi_ref] (the KL term read as averaged over x ~ D)")


@functools.cache
def check_dpo_deriv_2(new=dpo_deriv_2) -> Step:
    w = finite_world()
    return _identity("eq:dpo_deriv_2", [new(w) - dpo_deriv_1(w)], "exact: linearity of the expectation")


@functools.cache
def check_dpo_deriv_3(new=dpo_deriv_3) -> Step:
    """(3) = -(2) as expressions, and argmin (3) = argmax (2), both solved for on a one-prompt world."""
    w = finite_world()
    relation = _identity("", [new(w) + dpo_deriv_2(w)], "")
    same = _same_minimiser(new, dpo_deriv_2, finite_world(1, N_SOLVE), other_sense="max")
    return Step("eq:dpo_deriv_3", relation.holds and same, "sympy",
                "(3) = -(2) exactly; argmin (3) = argmax (2) solved for on both sides (Lagrangian, curvature); the "
                "values obey max f = -min(-f), not the chapter's '='")


@functools.cache
def check_dpo_deriv_4(new=dpo_deriv_4, beta_sign: str = "positive") -> Step:
    """(4) = (3) / beta, and argmin (4) = argmin (3): the second needs beta > 0, which enters as an assumption of
    the world the minimisers are solved on (``beta_sign="negative"`` makes (3)'s stationary point a maximum)."""
    w = finite_world()
    relation = _identity("", [new(w) - dpo_deriv_3(w) / w.beta], "")
    w1 = with_beta(finite_world(1, N_SOLVE), **{beta_sign: True})
    same = _same_minimiser(new, dpo_deriv_3, w1)
    return Step("eq:dpo_deriv_4", relation.holds and same, "sympy",
                "(4) = (3) / beta exactly; argmin (4) = argmin (3) solved for on both sides, a minimum of (3) only "
                "because beta > 0 (value scaled by 1/beta)")


@functools.cache
def check_dpo_partition(Z=partition_function) -> Step:
    """Z(x) normalises: sum_y pi*(y|x) = 1 for every prompt."""
    w = finite_world()
    return _identity("eq:dpo_partition", [sp.Add(*row) - 1 for row in optimal_policy(w, Z(w))],
                     "exact: with this Z(x), pi_ref exp(r/beta) / Z sums to 1 over y (needs Z finite: automatic here)")


@functools.cache
def check_dpo_deriv_5(new=dpo_deriv_5) -> Step:
    w = finite_world()
    any_Z = tuple(sp.Symbol(f"Z_{x}", positive=True) for x in w.prompts)
    return _identity("eq:dpo_deriv_5", [new(w) - dpo_deriv_4(w), new(w, any_Z) - dpo_deriv_4(w)],
                     "exact: equals (4) for the partition Z(x) and for ANY positive Z(x)")


@functools.cache
def check_dpo_deriv_6(previous=dpo_deriv_4) -> Step:
    """(6) is the bracket of (4): E[(6)] is compared with (4) itself, so a change to either shows."""
    w = finite_world()
    return _identity("eq:dpo_deriv_6", [previous(w) - w.expect(lambda x, y: _at(w, x, y, dpo_deriv_6))],
                     "definitional: E[(6)] is (4); compared with (4) itself", method="definitional")


@functools.cache
def check_dpo_deriv_7(new=dpo_deriv_7) -> Step:
    return _follows("eq:dpo_deriv_7", new, dpo_deriv_6, point_symbols, "exact: adds log Z - log Z = 0")


@functools.cache
def check_dpo_deriv_8(new=dpo_deriv_8) -> Step:
    return _follows("eq:dpo_deriv_8", new, dpo_deriv_7, point_symbols, "exact: regrouping")


@functools.cache
def check_dpo_deriv_9(new=dpo_deriv_9) -> Step:
    return _follows("eq:dpo_deriv_9", new, dpo_deriv_8, point_symbols,
                    "exact: log a + log Z = log(a Z) = log(a / (1/Z)), for positive a and Z")


@functools.cache
def check_dpo_deriv_9_to_5(new=dpo_deriv_5_bracket) -> Step:
    return _follows("eq:dpo_deriv_9 -> 5", new, dpo_deriv_9, point_symbols,
                    "exact: r/beta = log exp(r/beta) folded into the same log gives the bracket of (5), any Z > 0")


@functools.cache
def check_dpo_deriv_10(new=dpo_deriv_10) -> Step:
    """(10) = (5) on the simplex (sympy), and (10) != (5) off it (a numeric counterexample)."""
    w = finite_world()
    difference = new(w) - dpo_deriv_5(w)
    on_simplex = _identity("", [difference.subs(w.simplex())], "")
    off_simplex = counterexample(difference)
    return Step("eq:dpo_deriv_10", on_simplex.holds and off_simplex is not None, "sympy",
                "exact only given sum_y pi(y|x) = 1, which moves -log Z(x) out of E_y~pi (off the simplex the "
                "sides differ: numeric counterexample)")


def lagrangian_optimum(n_responses: int = N_RESPONSES, simplify: bool = True) -> tuple:
    """Solve the objective for one prompt with a Lagrange multiplier on sum_y pi(y) = 1, with sympy.

    L = sum_y pi(y) r(y) - beta sum_y pi(y) log(pi(y)/pi_ref(y)) + lambda (sum_y pi(y) - 1).
    dL/dpi(y) = 0 gives pi(y) as a function of lambda; the constraint then fixes lambda.
    Returns (the solved pi(y) expressions, the symbols (pi, pi_ref, r, beta)).
    """
    w = finite_world(1, n_responses)
    solved = simplex_minimiser(-rlhf_objective(w), w, simplify)  # the maximiser of J: the minimiser of -J
    return solved[0], (w.pi[0], w.ref[0], w.r[0], w.beta)


@functools.cache
def check_optimal_policy_lagrangian(target=optimal_policy) -> Step:
    solved, _ = lagrangian_optimum(simplify=False)  # as solved: simplify runs in the comparison, not before
    w = finite_world(1, N_RESPONSES)
    step = _identity("eq:dpo_opt_policy", [p - q for p, q in zip(solved, target(w)[0])],
                     f"exact: sympy solves the Lagrangian on {N_RESPONSES} responses; its stationary point is "
                     "pi_ref exp(r/beta) / Z")
    # sp.solve's answer comes out in exactly the target's form, so the final difference is 0 on construction;
    # the work (and what a wrong target fails) is the solve, not canonicalisation: this one counts.
    return dataclasses.replace(step, canonical=False)


@functools.cache
def check_optimal_policy_convexity(objective=dpo_deriv_4) -> Step:
    """The objective (4) is strictly convex in pi, so its stationary point on the simplex is the global min."""
    w = finite_world()
    return Step("eq:dpo_opt_policy (unique)", is_convex_in_pi(objective(w), w), "sympy",
                "exact: Hessian of (4) is diag(d(x)/pi(y|x)), positive definite: the stationary point is the "
                "unique global minimum (prompts with d(x) > 0)")


@functools.cache
def check_optimal_value(value=None) -> Step:
    """At pi = pi*, the KL term of (10) vanishes: (10) = -E log Z, and the objective is beta E_x log Z(x)."""
    w = finite_world()
    at_optimum = {w.pi[x][y]: optimal_policy(w)[x][y] for x in w.prompts for y in w.responses}
    Z = partition_function(w)
    value_10 = -sp.Add(*[w.d[x] * sp.log(Z[x]) for x in w.prompts]) if value is None else value(w)
    return _identity("eq:dpo_deriv_10 at pi*", [dpo_deriv_10(w).subs(at_optimum) - value_10,
                                                rlhf_objective(w).subs(at_optimum) + w.beta * value_10],
                     "exact: KL(pi* || pi*) = 0, and the optimal objective is beta E_x log Z(x)")


@functools.cache
def check_gibbs_inequality(n_policies: int = 2000, seed: int = 0, star=None) -> Step:
    """Gibbs' inequality, measured on the ORIGINAL objective: J(pi*) - J(pi) = beta E_x KL(pi || pi*) > 0.

    J is eq:rlhf_opt_eq_repeat at numbers (not (10), where the gap would be the KL by construction); the KL is
    computed separately, so both the equality and the sign are measurements. Python floats only.
    """
    w = finite_world()
    rng = random.Random(seed)
    flat_pi = [w.pi[x][y] for x in w.prompts for y in w.responses]
    beta = rng.uniform(0.2, 2.0)
    numbers = {w.beta: beta}
    for x in w.prompts:
        numbers[w.d[x]] = 1.0 / len(w.d)
        ref_row = _random_distribution(rng, len(w.responses))
        for y in w.responses:
            numbers[w.ref[x][y]] = ref_row[y]
            numbers[w.r[x][y]] = rng.gauss(0.0, 1.0)
    objective = sp.lambdify(flat_pi, rlhf_objective(w).subs(numbers), modules="math")
    star = optimal_policy(w) if star is None else star(w)
    star = [float(star[x][y].subs(numbers)) for x in w.prompts for y in w.responses]
    best = objective(*star)
    worst_gap, worst_mismatch = float("inf"), 0.0
    K = len(w.responses)
    for _ in range(n_policies):
        policy = [p for _x in w.prompts for p in _random_distribution(rng, K)]
        kl_to_star = sum(numbers[w.d[i // K]] * p * math.log(p / q) for i, (p, q) in enumerate(zip(policy, star)))
        gap = best - objective(*policy)
        worst_gap = min(worst_gap, gap)
        worst_mismatch = max(worst_mismatch, abs(gap - beta * kl_to_star))
    holds = worst_gap > 0 and worst_mismatch < 1e-9
    return Step("Gibbs' inequality", holds, "numeric",
                f"{n_policies} random policies on J itself: none beats pi* (smallest gap {worst_gap:.2e}); "
                f"J(pi*) - J(pi) = beta E_x KL(pi || pi*) to {worst_mismatch:.0e}")


def _random_distribution(rng: random.Random, k: int) -> list:
    draws = [rng.expovariate(1.0) for _ in range(k)]  # normalised exponentials: uniform on the simplex
    total = sum(draws)
    return [v / total for v in draws]


@functools.cache
def check_drop_log_Z(kept=expected_kl_to_optimum) -> Step:
    """The step from (10) to pi*: drop -log Z(x). The minimiser of (10) and of what is kept, both solved for."""
    w = finite_world(1, N_SOLVE)
    star = optimal_policy(w)
    same = (_same_table(simplex_minimiser(dpo_deriv_10(w), w), star)
            and _same_table(simplex_minimiser(kept(w), w), star) and is_convex_in_pi(kept(w), w))
    return Step("eq:dpo_deriv_10 -> opt", same, "sympy",
                "minimiser solved for with and without -log Z(x): both pi*; the VALUE changes, the minimiser not")


OPTIMAL_POLICY_CHECKS = (
    check_dpo_deriv_1, check_dpo_deriv_2, check_dpo_deriv_3, check_dpo_deriv_4, check_dpo_partition,
    check_dpo_deriv_5, check_dpo_deriv_6, check_dpo_deriv_7, check_dpo_deriv_8, check_dpo_deriv_9,
    check_dpo_deriv_9_to_5, check_dpo_deriv_10, check_drop_log_Z, check_optimal_value,
    check_optimal_policy_lagrangian, check_optimal_policy_convexity, check_gibbs_inequality,
)


# --------------------------------------------------------------------------------------------------------------
# Derivation 1 for ANY number n of responses: one prompt (prompts only add a d(x)-weighted sum), y = 1..n.


@dataclass(frozen=True)
class IndexedSymbols:
    """pi[y], pi_ref[y] > 0, r[y] real for y = 1..n (n a positive integer symbol), beta > 0, a free Z > 0."""

    n: sp.Symbol
    y: sp.Symbol
    j: sp.Symbol
    pi: sp.IndexedBase
    ref: sp.IndexedBase
    r: sp.IndexedBase
    beta: sp.Symbol
    Z: sp.Symbol

    def sum(self, term, index=None) -> sp.Sum:
        """sum over y = 1..n of term (an expression in self.y, or in ``index``)."""
        index = self.y if index is None else index
        return sp.Sum(term, (index, 1, self.n))

    def partition(self) -> sp.Sum:
        """Z = sum_y pi_ref[y] exp(r[y] / beta) (y is bound inside the sum, so Z holds no free index)."""
        return self.sum(self.ref[self.y] * sp.exp(self.r[self.y] / self.beta))

    def star(self, y=None, Z=None) -> sp.Expr:
        """pi*[y] = pi_ref[y] exp(r[y] / beta) / Z."""
        y = self.y if y is None else y
        return self.ref[y] * sp.exp(self.r[y] / self.beta) / (self.partition() if Z is None else Z)


@functools.lru_cache(maxsize=None)
def indexed_symbols() -> IndexedSymbols:
    return IndexedSymbols(
        n=sp.Symbol("n", integer=True, positive=True), y=sp.Symbol("y", integer=True, positive=True),
        j=sp.Symbol("j", integer=True, positive=True), pi=sp.IndexedBase("pi", positive=True),
        ref=sp.IndexedBase("pi_ref", positive=True), r=sp.IndexedBase("r", real=True),
        beta=sp.Symbol("beta", positive=True), Z=sp.Symbol("Z", positive=True))


# One prompt's bracket of each step, as a summand in y. The sums are E_{y~pi}[bracket] = sum_y pi[y] bracket.
def _n_bracket_1(s):
    return s.r[s.y] - s.beta * sp.log(s.pi[s.y] / s.ref[s.y])


def _n_bracket_4(s):
    return sp.log(s.pi[s.y] / s.ref[s.y]) - s.r[s.y] / s.beta


def _n_bracket_5(s):
    return sp.log(s.pi[s.y] / (s.ref[s.y] * sp.exp(s.r[s.y] / s.beta) / s.Z)) - sp.log(s.Z)


ANY_N_FORMS = {
    # name: the objective for one prompt, any n (the free Z of (5) is any positive number, as in the chapter)
    "J": lambda s: s.sum(s.pi[s.y] * s.r[s.y]) - s.beta * s.sum(s.pi[s.y] * sp.log(s.pi[s.y] / s.ref[s.y])),
    "1": lambda s: s.sum(s.pi[s.y] * _n_bracket_1(s)),
    "2": lambda s: s.sum(s.pi[s.y] * s.r[s.y]) - s.beta * s.sum(s.pi[s.y] * sp.log(s.pi[s.y] / s.ref[s.y])),
    "3": lambda s: -s.sum(s.pi[s.y] * s.r[s.y]) + s.beta * s.sum(s.pi[s.y] * sp.log(s.pi[s.y] / s.ref[s.y])),
    "4": lambda s: s.sum(s.pi[s.y] * _n_bracket_4(s)),
    "5": lambda s: s.sum(s.pi[s.y] * _n_bracket_5(s)),
    "10": lambda s: s.sum(s.pi[s.y] * sp.log(s.pi[s.y] / s.star(Z=s.Z))) - sp.log(s.Z),
}
# how each step relates to the one before: new - relation(previous) must be 0
_ANY_N_RELATIONS = {"1": ("J", 1), "2": ("1", 1), "3": ("2", -1), "4": ("3", "1/beta"), "5": ("4", 1),
                    "10": ("5", 1)}


@functools.cache
def check_deriv_chain_any_n(step: str, new=None) -> Step:
    """eq:dpo_deriv_<step> for any n responses: new - factor * previous simplifies to 0 inside sympy Sums.

    Step 10 holds only on the simplex: sympy reduces (10) - (5) to (1 - sum_y pi[y]) log Z, which is 0 exactly
    when sum_y pi[y] = 1 (substituted); the (any n) check requires both.
    """
    s = indexed_symbols()
    previous, factor = _ANY_N_RELATIONS[step]
    factor = 1 / s.beta if factor == "1/beta" else factor
    new_form = (new or ANY_N_FORMS[step])(s)
    difference = new_form - factor * ANY_N_FORMS[previous](s)
    if step != "10":
        result = _identity("", [difference], "")
        return Step(f"eq:dpo_deriv_{step} (any n)", result.holds, "sympy",
                    f"exact for any n: ({step}) = {factor} x ({previous}) as sums over y = 1..n", result.canonical)
    reduced = sp.simplify(difference)
    on_simplex = sp.simplify(reduced.subs(s.sum(s.pi[s.y]), 1)) == 0
    return Step("eq:dpo_deriv_10 (any n)", on_simplex and reduced != 0, "sympy",
                f"for any n, (10) - (5) = {reduced}: zero exactly when sum_y pi[y] = 1")


@functools.cache
def check_partition_any_n(Z=None) -> Step:
    """sum_{y=1}^n pi*[y] = 1 for any n, with Z = sum_j pi_ref[j] exp(r[j]/beta)."""
    s = indexed_symbols()
    Z = s.partition() if Z is None else Z(s)
    return _identity("eq:dpo_partition (any n)", [s.sum(s.star(Z=Z)) - 1], "exact for any n: pi* sums to 1")


@functools.cache
def check_optimal_policy_any_n(candidate=None) -> Step:
    """pi* is the minimiser of (4) on the simplex for any n: (4) is separable, so the stationarity condition
    d bracket/d pi[y] + lambda = 0 is one equation per y; pi* satisfies it with one lambda for all y, sums to 1,
    and the second derivative 1/pi[y] > 0 makes it the minimum."""
    s = indexed_symbols()
    p = sp.Symbol("p", positive=True)
    summand = p * _n_bracket_4(s).subs(s.pi[s.y], p)  # pi[y] * bracket, with pi[y] written p
    candidate = s.star() if candidate is None else candidate(s)
    multiplier = sp.simplify(-sp.diff(summand, p).subs(p, candidate))  # -lambda: must not depend on y
    stationary = s.y not in multiplier.free_symbols
    normalised = is_zero(s.sum(candidate) - 1)
    convex = sp.diff(summand, p, 2).is_positive is True
    return Step("eq:dpo_opt_policy (any n)", stationary and normalised and convex, "sympy",
                "for any n: pi* = pi_ref exp(r/beta)/Z is stationary (lambda = 1 - log Z, the same for every y), "
                "sums to 1, and (4) is strictly convex")


ANY_N_CHECKS = (
    functools.partial(check_deriv_chain_any_n, "1"), functools.partial(check_deriv_chain_any_n, "2"),
    functools.partial(check_deriv_chain_any_n, "3"), functools.partial(check_deriv_chain_any_n, "4"),
    functools.partial(check_deriv_chain_any_n, "5"), functools.partial(check_deriv_chain_any_n, "10"),
    check_partition_any_n, check_optimal_policy_any_n,
)
for _check, _step in zip(ANY_N_CHECKS[:6], ("1", "2", "3", "4", "5", "10")):
    _check.__name__ = f"check_deriv_chain_any_n_{_step}"  # partials have no name; the tests use one


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


def dpo_loss_deriv0(s: PairSymbols, Z2: sp.Expr | None = None) -> sp.Expr:
    """eq:dpo_loss_deriv0: Bradley-Terry with r* from eq:dpo_reward_full written out. ``Z2``: the second
    response's partition function, if it answered another prompt (then nothing cancels)."""
    a1, a2 = _log_ratio_terms(s)
    e1, e2 = sp.exp(a1 + s.beta * sp.log(s.Z)), sp.exp(a2 + s.beta * sp.log(s.Z if Z2 is None else Z2))
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
def check_bradley_terry_is_sigmoid(form=lambda r1, r2: sigmoid(r1 - r2)) -> Step:
    s = pair_symbols()
    return _identity("eq:bradley_terry_dpo", [bradley_terry(*s.r) - form(*s.r)],
                     "exact: exp(r1) / (exp(r1) + exp(r2)) = sigma(r1 - r2); only reward DIFFERENCES matter")


@functools.cache
def check_dpo_reward_full(reward=dpo_reward_full) -> Step:
    s = point_symbols()
    star = s.ref * sp.exp(s.r / s.beta) / s.Z  # eq:dpo_opt_policy at one (x, y)
    return _identity("eq:dpo_reward_full", [reward(star, s.ref, s.Z, s.beta) - s.r],
                     "exact: with pi* from eq:dpo_opt_policy it returns r; needs pi_ref(y|x) > 0 (log of both sides)")


@functools.cache
def check_dpo_loss_deriv0(new=dpo_loss_deriv0) -> Step:
    s = pair_symbols()
    substituted = bradley_terry(dpo_reward_full(s.star[0], s.ref[0], s.Z, s.beta),
                                dpo_reward_full(s.star[1], s.ref[1], s.Z, s.beta))
    return _identity("eq:dpo_loss_deriv0", [new(s) - substituted],
                     "eq:dpo_reward_full substituted into eq:bradley_terry_dpo")


@functools.cache
def check_dpo_loss_deriv1(previous=dpo_loss_deriv0) -> Step:
    return _follows("eq:dpo_loss_deriv1", dpo_loss_deriv1, previous, pair_symbols,
                    "exact: the common factor exp(beta log Z) = Z^beta cancels (the text says e^{log Z}); needs "
                    "both responses to share the prompt x")


@functools.cache
def check_dpo_loss_deriv2(new=dpo_loss_deriv2) -> Step:
    return _follows("eq:dpo_loss_deriv2", new, dpo_loss_deriv1, pair_symbols,
                    "exact: numerator and denominator times exp(-a1)")


@functools.cache
def check_dpo_loss_deriv3(new=dpo_loss_deriv3) -> Step:
    return _follows("eq:dpo_loss_deriv3", new, dpo_loss_deriv2, pair_symbols,
                    "exact: sigma(u) = 1 / (1 + exp(-u))")


def _pair_nll(h, beta, p):
    """Expected DPO loss of one pair whose first response wins with probability p."""
    return -p * sp.log(sigmoid(beta * h)) - (1 - p) * sp.log(sigmoid(-beta * h))


@functools.cache
def check_dpo_core_is_max_likelihood(expected_loss=_pair_nll) -> Step:
    """eq:dpo_core from eq:dpo_loss_deriv3: the negative log-likelihood of the labels, pi* -> pi_theta.

    The replacement is a modelling choice (fit the preference model by maximum likelihood). What sympy CAN
    check: the expected loss of one pair, with the true preference probability p, is minimised exactly where
    the model's probability sigma(beta h) equals p (solved for, with positive curvature there).
    """
    h, beta, p = sp.Symbol("h", real=True), sp.Symbol("beta", positive=True), sp.Symbol("p", positive=True)
    loss = expected_loss(h, beta, p)
    roots = sp.solve(sp.diff(loss, h), h)
    holds = (len(roots) == 1 and is_zero(sigmoid(beta * roots[0]) - p)
             and is_zero(sp.diff(loss, h, 2).subs(h, roots[0]) - beta ** 2 * p * (1 - p)))
    return Step("eq:dpo_core", holds, "sympy",
                "modelling step pi* -> pi_theta (max likelihood); checked: the expected pair loss is minimised "
                "where sigma(beta h) = p* (0 < p* < 1; no minimiser if p* is 0 or 1)")


@functools.cache
def check_implicit_reward_same_preferences(implicit=None) -> Step:
    """eq:dpo_reward drops beta log Z(x): the Bradley-Terry probabilities do not change."""
    s = pair_symbols()
    full = [dpo_reward_full(s.star[i], s.ref[i], s.Z, s.beta) for i in range(2)]
    implicit = list(_log_ratio_terms(s)) if implicit is None else implicit(s)
    return _identity("eq:dpo_reward", [bradley_terry(*full) - bradley_terry(*implicit)],
                     "exact: the implicit reward beta log(pi/pi_ref) is r* minus beta log Z(x), a per-prompt "
                     "shift that leaves every preference probability unchanged")


@functools.cache
def check_reward_shift_invariance(shift=None) -> Step:
    """Rewards r(x, y) + f(x) give the same pi* (Z absorbs exp(f(x)/beta)): rewards are defined up to f(x)."""
    w = finite_world(1, N_RESPONSES)
    f = sp.Symbol("f", real=True)
    shifts = [f] * N_RESPONSES if shift is None else shift(N_RESPONSES)
    shifted = dataclasses.replace(w, r=(tuple(r + g for r, g in zip(w.r[0], shifts)),))
    return _identity("reward shift f(x)", [a - b for a, b in zip(optimal_policy(shifted)[0], optimal_policy(w)[0])],
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
    """theta, log pi_theta(y_w|x) and log pi_theta(y_l|x) as functions of theta, reference log-probs, beta."""

    theta: sp.Symbol
    logp_chosen: sp.Expr
    logp_rejected: sp.Expr
    ref_chosen: sp.Expr
    ref_rejected: sp.Expr
    beta: sp.Symbol


@functools.lru_cache(maxsize=None)
def gradient_symbols() -> GradientSymbols:
    theta = sp.Symbol("theta", real=True)
    return GradientSymbols(
        theta=theta,
        logp_chosen=sp.Function("ell_w")(theta),  # ell_w = log pi_theta(y_w|x), rendered as \ell_w
        logp_rejected=sp.Function("ell_l")(theta),
        ref_chosen=sp.Symbol("ell^ref_w", real=True),  # log pi_ref(y_w|x): a constant
        ref_rejected=sp.Symbol("ell^ref_l", real=True),
        beta=sp.Symbol("beta", positive=True),
    )


def margin_u(g: GradientSymbols) -> sp.Expr:
    """u = beta log(pi_theta(y_w)/pi_ref(y_w)) - beta log(pi_theta(y_l)/pi_ref(y_l)) = beta h = r_hat_w - r_hat_l."""
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
    """eq:dpo_grad_3 (= eq:dpo_gradient): -beta sigma(r_hat_l - r_hat_w) (dlog pi_w - dlog pi_l)."""
    r_hat_w = g.beta * (g.logp_chosen - g.ref_chosen)
    r_hat_l = g.beta * (g.logp_rejected - g.ref_rejected)
    return -g.beta * sigmoid(r_hat_l - r_hat_w) * (sp.diff(g.logp_chosen, g.theta) - sp.diff(g.logp_rejected, g.theta))


def _second_triple(g: GradientSymbols) -> GradientSymbols:
    return GradientSymbols(g.theta, sp.Function("ell_w2")(g.theta), sp.Function("ell_l2")(g.theta),
                           sp.Symbol("ell^ref_w2", real=True), sp.Symbol("ell^ref_l2", real=True), g.beta)


@functools.cache
def check_dpo_grad_0(loss=dpo_loss) -> Step:
    """eq:dpo_grad_0 is the gradient of eq:dpo_core, nabla OUTSIDE the expectation: a definition."""
    g = gradient_symbols()
    return _identity("eq:dpo_grad_0", [dpo_grad_0(g) - sp.diff(loss(g), g.theta)],
                     "definitional: nabla_theta of eq:dpo_core (the chapter keeps nabla outside E)",
                     method="definitional")


@functools.cache
def check_grad_into_expectation(data_weight=None) -> Step:
    """eq:dpo_grad_0 -> 2 moves nabla inside E: on a 2-triple dataset, the gradient of the weighted mean loss
    equals the weighted mean of gradients when the weights (the data distribution) do not depend on theta.
    ``data_weight(theta)`` makes them depend on it (on-policy data): then the swap is wrong."""
    g = gradient_symbols()
    other = _second_triple(g)
    q = sp.Symbol("q", positive=True) if data_weight is None else data_weight(g.theta)
    mean_loss = q * dpo_loss(g) + (1 - q) * dpo_loss(other)
    swapped = q * dpo_grad_0(g) + (1 - q) * dpo_grad_0(other)
    step = _identity("eq:dpo_grad_0 -> 2 (swap)", [sp.diff(mean_loss, g.theta) - swapped],
                     "nabla into E_D: exact when the data distribution does not depend on theta (offline pairs)")
    return step


@functools.cache
def check_grad_swap_needs_offline_data() -> Step:
    """With data whose distribution moves with theta, nabla E != E nabla: a numeric counterexample."""
    g = gradient_symbols()
    other = _second_triple(g)
    q = sigmoid(g.theta)  # e.g. the share of pairs sampled from the policy itself
    difference = (sp.diff(q * dpo_loss(g) + (1 - q) * dpo_loss(other), g.theta)
                  - (q * dpo_grad_0(g) + (1 - q) * dpo_grad_0(other)))
    return _differs("eq:dpo_grad_0 -> 2 (condition)", difference,
                    "with data sampled from pi_theta the swap misses a term (nabla q) x loss")


@functools.cache
def check_sigmoid_identities(derivative=lambda s: s * (1 - s), mirror=lambda s: 1 - s) -> Step:
    t = sp.Symbol("t", real=True)
    return _identity("sigma' and sigma(-x)", [sp.diff(sigmoid(t), t) - derivative(sigmoid(t)),
                                              sigmoid(-t) - mirror(sigmoid(t))],
                     "exact: sigma' = sigma (1 - sigma), sigma(-x) = 1 - sigma(x)")


@functools.cache
def check_dpo_grad_2(new=dpo_grad_2) -> Step:
    g = gradient_symbols()
    return _identity("eq:dpo_grad_2", [new(g) - dpo_grad_0(g)],
                     "exact: chain rule, d/du (-log sigma(u)) = -sigma'(u)/sigma(u)")


@functools.cache
def check_dpo_grad_3(new=dpo_grad_3) -> Step:
    g = gradient_symbols()
    return _identity("eq:dpo_grad_3", [new(g) - dpo_grad_2(g)],
                     "exact: sigma'/sigma = sigma(-u) and du/dtheta = beta (dlog pi_w - dlog pi_l), given a frozen "
                     "pi_ref (no eq:dpo_grad_1 in the chapter)")


def moving_reference_symbols() -> GradientSymbols:
    """As ``gradient_symbols``, but with reference log-probs that depend on theta (a reference that is trained)."""
    g = gradient_symbols()
    return GradientSymbols(g.theta, g.logp_chosen, g.logp_rejected, sp.Function("ell^ref_w")(g.theta),
                           sp.Function("ell^ref_l")(g.theta), g.beta)


@functools.cache
def check_grad_needs_frozen_reference(symbols=moving_reference_symbols) -> Step:
    """If the reference log-probs moved with theta, eq:dpo_grad_3 would miss terms: a numeric counterexample."""
    g = symbols()
    return _differs("eq:dpo_grad_3 (condition)", dpo_grad_0(g) - dpo_grad_3(g),
                    "with pi_ref depending on theta the formula misses beta sigma(-u) dlog pi_ref terms")


def loss_partials() -> tuple:
    """d(-log sigma(u)) / d(each of the four log-probs), the log-probs as plain symbols.

    Returns ({"policy_chosen": ..., "policy_rejected": ..., "reference_chosen": ..., "reference_rejected": ...},
    (ell_w, ell_l, ell^ref_w, ell^ref_l, beta)), where ell_w = log pi_theta(y_w|x), ell^ref_w = log pi_ref(y_w|x).
    """
    lc, lr, rc, rr = sp.symbols("ell_w ell_l ell^ref_w ell^ref_l", real=True)
    beta = sp.Symbol("beta", positive=True)
    loss = -sp.log(sigmoid(beta * (lc - rc) - beta * (lr - rr)))
    names = {"policy_chosen": lc, "policy_rejected": lr, "reference_chosen": rc, "reference_rejected": rr}
    return {name: sp.diff(loss, v) for name, v in names.items()}, (lc, lr, rc, rr, beta)


def dpo_weight(lc, lr, rc, rr, beta) -> sp.Expr:
    """beta sigma(r_hat_l - r_hat_w): how hard one pair pulls (eq:dpo_gradient / eq:dpo_grad_3)."""
    return beta * sigmoid(beta * (lr - rr) - beta * (lc - rc))


@functools.cache
def check_loss_partials(weight=dpo_weight) -> Step:
    partials, symbols = loss_partials()
    w = weight(*symbols)
    return _identity("eq:dpo_gradient", [partials["policy_chosen"] + w, partials["policy_rejected"] - w,
                                         partials["reference_chosen"] - w, partials["reference_rejected"] + w],
                     "exact: dL/dell_w = -w, dL/dell_l = +w (reference: the opposite), w = beta sigma(r_hat_l - "
                     "r_hat_w)")


GRADIENT_CHECKS = (
    check_dpo_grad_0, check_grad_into_expectation, check_grad_swap_needs_offline_data, check_sigmoid_identities,
    check_dpo_grad_2, check_dpo_grad_3, check_grad_needs_frozen_reference, check_loss_partials,
)


# ==============================================================================================================
# 4. Theory the chapter leaves out (the DPO paper's Sec. 5 and Appendix A.3; the IPO paper)


def plackett_luce(rewards) -> sp.Expr:
    """Plackett-Luce probability of the ranking y_1 > y_2 > ... > y_K (DPO paper, Appendix A.3, Eq. 18):
    prod_k exp(r_k) / sum_{j >= k} exp(r_j). K = 2 is Bradley-Terry."""
    rewards = list(rewards)
    return sp.Mul(*[sp.exp(rewards[k]) / sp.Add(*[sp.exp(r) for r in rewards[k:]]) for k in range(len(rewards))])


def plackett_luce_dpo_loss(log_ratios, beta) -> sp.Expr:
    """The DPO loss for one ranking (Appendix A.3, Eq. 19): -log PL(beta log pi_theta(y_k)/pi_ref(y_k))."""
    return -sp.log(plackett_luce([beta * a for a in log_ratios]))


@functools.cache
def check_lemma_1(per_response: bool = False) -> Step:
    """Lemma 1: rewards of one class (r' = r + f(x)) give the same Plackett-Luce (so also Bradley-Terry)
    preferences: for rankings of 4, and for every factor of a ranking of any n. ``per_response``: the shift
    f depends on y as well (not a reward class)."""
    rs = sp.symbols("r_1:5", real=True)
    shifts = sp.symbols("f_1:5", real=True) if per_response else [sp.Symbol("f", real=True)] * 4
    s = indexed_symbols()
    k = sp.Symbol("k", integer=True, positive=True)
    a, fb = sp.IndexedBase("r", real=True), sp.IndexedBase("f", real=True)
    f_at = (lambda i: fb[i]) if per_response else (lambda i: sp.Symbol("f", real=True))
    shifted = sp.exp(a[k] + f_at(k)) / sp.Sum(sp.exp(a[s.j] + f_at(s.j)), (s.j, k, s.n))
    plain = sp.exp(a[k]) / sp.Sum(sp.exp(a[s.j]), (s.j, k, s.n))
    return _identity("Lemma 1 (same class)", [plackett_luce([r + f for r, f in zip(rs, shifts)]) - plackett_luce(rs),
                                              shifted - plain],
                     "exact: r and r + f(x) give the same Plackett-Luce ranking probabilities (K = 4 and any n)")


@functools.cache
def check_lemma_2(per_response: bool = False) -> Step:
    """Lemma 2: rewards of one class give the same optimal policy, for any n responses."""
    s = indexed_symbols()
    fb = sp.IndexedBase("f", real=True)
    f_at = (lambda i: fb[i]) if per_response else (lambda i: sp.Symbol("f", real=True))
    shifted_Z = s.sum(s.ref[s.y] * sp.exp((s.r[s.y] + f_at(s.y)) / s.beta))
    shifted_star = s.ref[s.y] * sp.exp((s.r[s.y] + f_at(s.y)) / s.beta) / shifted_Z
    return _identity("Lemma 2 (same pi*)", [shifted_star - s.star()],
                     "exact for any n: pi* for r + f(x) equals pi* for r (exp(f/beta) cancels against Z)")


@functools.cache
def check_theorem_1(projection=None) -> Step:
    """Theorem 1: every reward class has the representative r - beta log Z(x) = beta log(pi_r / pi_ref), where
    pi_r is the optimal policy for r; the representative's own partition function is 1. Any n responses."""
    s = indexed_symbols()
    Z = s.partition()
    representative = s.r[s.y] - s.beta * sp.log(Z) if projection is None else projection(s, Z)
    own_Z = s.sum(s.ref[s.y] * sp.exp(representative / s.beta))  # the y inside Z stays bound
    return _identity("Theorem 1 (representative)", [representative - s.beta * sp.log(s.star() / s.ref[s.y]),
                                                    own_Z - 1],
                     "exact for any n: r - beta log Z = beta log(pi_r / pi_ref) is in r's class, with Z = 1; every "
                     "class is reached by some policy, so DPO loses no generality")


@functools.cache
def check_dpo_is_reward_likelihood(reward=None) -> Step:
    """The DPO loss of pi IS the Bradley-Terry reward-model loss of the reward r_pi = beta log(pi / pi_ref):
    a change of variables (with Theorem 1, it covers every reward class)."""
    lw, ll, rw, rl = sp.symbols("ell_w ell_l ell^ref_w ell^ref_l", real=True)
    beta = sp.Symbol("beta", positive=True)
    reward = (lambda l, ref: beta * (l - ref)) if reward is None else reward
    bt_likelihood = bradley_terry(reward(lw, rw), reward(ll, rl))  # -log of each side is the loss
    dpo_likelihood = sigmoid(beta * (lw - rw) - beta * (ll - rl))
    return _identity("DPO = reward-model NLL", [bt_likelihood - dpo_likelihood],
                     "exact: -log BT(r_pi(y_w), r_pi(y_l)) with r_pi = beta log pi/pi_ref is the DPO loss")


@functools.cache
def check_plackett_luce_z_cancels(Z_per_response: bool = False) -> Step:
    """Appendix A.3: r = beta log(pi*/pi_ref) + beta log Z(x) put into Plackett-Luce: Z cancels, for rankings of
    K = 3 and 4 and for each factor at any n. ``Z_per_response``: each response from another prompt."""
    beta = sp.Symbol("beta", positive=True)
    parts = []
    for K in (3, 4):
        a = sp.symbols(f"a_1:{K + 1}", real=True)  # log(pi*(y_k)/pi_ref(y_k))
        Zs = sp.symbols(f"Z_1:{K + 1}", positive=True) if Z_per_response else [sp.Symbol("Z", positive=True)] * K
        full = plackett_luce([beta * a_k + beta * sp.log(Z) for a_k, Z in zip(a, Zs)])
        parts.append(full - plackett_luce([beta * a_k for a_k in a]))
    s = indexed_symbols()
    k = sp.Symbol("k", integer=True, positive=True)
    a = sp.IndexedBase("a", real=True)
    Zk = sp.IndexedBase("Z", positive=True) if Z_per_response else None
    c = (lambda i: s.beta * sp.log(Zk[i])) if Z_per_response else (lambda i: s.beta * sp.log(s.Z))
    factor = sp.exp(s.beta * a[k] + c(k)) / sp.Sum(sp.exp(s.beta * a[s.j] + c(s.j)), (s.j, k, s.n))
    parts.append(factor - sp.exp(s.beta * a[k]) / sp.Sum(sp.exp(s.beta * a[s.j]), (s.j, k, s.n)))
    return _identity("Plackett-Luce (A.3)", parts,
                     "exact: Z(x) cancels from every factor (K = 3, 4 and any n): the ranking loss needs no Z")


@functools.cache
def check_plackett_luce_two_is_bradley_terry(model=plackett_luce) -> Step:
    r1, r2 = sp.symbols("r_1 r_2", real=True)
    return _identity("Plackett-Luce K = 2", [model([r1, r2]) - bradley_terry(r1, r2)],
                     "exact: a ranking of two is a Bradley-Terry pair, so the PL loss is the DPO loss at K = 2")


@functools.cache
def check_soft_value_baseline(baseline=None) -> Step:
    """Sec. 5.2: for one prompt and any n, J(pi; r) and J(pi; r - beta log Z) differ by beta log Z on the simplex
    (same optimiser); at pi* every response's soft advantage r - beta log(pi*/pi_ref) equals beta log Z(x): the
    soft value an actor-critic method must estimate as its baseline, and which DPO's reparametrisation cancels."""
    s = indexed_symbols()
    Z = s.partition()
    V = s.beta * sp.log(Z) if baseline is None else baseline(s, Z)

    def J(reward):
        return s.sum(s.pi[s.y] * reward) - s.beta * s.sum(s.pi[s.y] * sp.log(s.pi[s.y] / s.ref[s.y]))

    shift = sp.simplify(J(s.r[s.y]) - J(s.r[s.y] - V))
    constant_on_simplex = sp.simplify(shift.subs(s.sum(s.pi[s.y]), 1) - V) == 0
    advantage = s.r[s.y] - s.beta * sp.log(s.star() / s.ref[s.y]) - V
    return Step("Sec. 5.2 soft value", constant_on_simplex and is_zero(advantage), "sympy",
                "for any n: r - beta log(pi*/pi_ref) = beta log Z(x) at every y (the soft value V*(x)); subtracting "
                "it changes J by a constant only")


def psi_po_optimal_margin(psi, p, beta) -> sp.Expr:
    """PsiPO (Azar et al. 2023, Eq. 6) on one pair (y1, y2) with p = p*(y1 > y2) and the behaviour policy mu uniform
    on the pair: pi*(y) is proportional to pi_ref(y) exp(E_{y'~mu} Psi(p*(y > y')) / beta), so the optimal
    log-ratio margin is h* = (Psi(p) - Psi(1 - p)) / (2 beta). Returns h*."""
    return (psi(p) - psi(1 - p)) / (2 * beta)


def _logit(q):
    return sp.log(q / (1 - q))


@functools.cache
def check_psi_logit_is_dpo(psi=_logit) -> Step:
    """Psi = logit gives back RLHF/DPO: Psi(sigma(delta r)) = delta r, its PsiPO margin is DPO's pair optimum
    logit(p)/beta (where sigma(beta h) = p), and that margin grows without bound as p -> 1: deterministic labels
    push the DPO margin to infinity."""
    p, beta, d = sp.Symbol("p", positive=True), sp.Symbol("beta", positive=True), sp.Symbol("delta", real=True)
    dpo_optimum = _logit(p) / beta
    margin = psi_po_optimal_margin(psi, p, beta)
    # p = sigma(t), t real, ranges over exactly (0, 1): sympy then knows 1 - p > 0
    holds = (is_zero(psi(sigmoid(d)) - d) and is_zero((margin - dpo_optimum).subs(p, sigmoid(d)))
             and sp.limit(margin, p, 1, "-") == sp.oo)
    return Step("PsiPO: Psi = logit", holds, "sympy",
                "logit(sigma(delta)) = delta (PsiPO with Psi = logit is RLHF, hence DPO); its margin logit(p)/beta "
                "-> oo as p -> 1")


def _ipo_pair_loss(h, beta, p):
    """IPO's expected loss on a pair preferred with probability p (Azar et al. 2023, Eq. 17, tau = beta)."""
    return p * (h - 1 / (2 * beta)) ** 2 + (1 - p) * (-h - 1 / (2 * beta)) ** 2


@functools.cache
def check_ipo_target(claimed=lambda p, beta: (2 * p - 1) / (2 * beta), loss=_ipo_pair_loss) -> Step:
    """IPO (Psi = identity): the expected pair loss is minimised at h* = (2p - 1)/(2 beta) = (Psi(p) - Psi(1-p))
    / (2 beta), bounded by 1/(2 beta) even at p = 1."""
    p, beta, h = sp.Symbol("p", positive=True), sp.Symbol("beta", positive=True), sp.Symbol("h", real=True)
    roots = sp.solve(sp.diff(loss(h, beta, p), h), h)
    holds = (len(roots) == 1 and is_zero(roots[0] - claimed(p, beta))
             and sp.diff(loss(h, beta, p), h, 2).is_positive is True
             and is_zero(psi_po_optimal_margin(lambda q: q, p, beta) - claimed(p, beta))
             and is_zero(claimed(1, beta) - 1 / (2 * beta)))
    return Step("IPO target", holds, "sympy",
                "the IPO pair loss is minimised at h* = (2p - 1)/(2 beta) (PsiPO with Psi = identity), at most "
                "1/(2 beta): finite even for p = 1")


THEORY_CHECKS = (
    check_lemma_1, check_lemma_2, check_theorem_1, check_dpo_is_reward_likelihood, check_plackett_luce_z_cancels,
    check_plackett_luce_two_is_bradley_terry, check_soft_value_baseline, check_psi_logit_is_dpo, check_ipo_target,
)

ALL_CHECKS = OPTIMAL_POLICY_CHECKS + ANY_N_CHECKS + BRADLEY_TERRY_CHECKS + GRADIENT_CHECKS + THEORY_CHECKS


def run_all() -> list:
    """Every check, in the chapter's order. ``[print(s) for s in run_all()]`` prints the table."""
    return [check() for check in ALL_CHECKS]


# ==============================================================================================================
# Negative controls: for every check, a plausible wrong step that the same check must reject


def _n(step, form):
    """The control of an any-n step: the chain check with ``form`` in place of the step's objective."""
    return lambda: check_deriv_chain_any_n(step, form)


NEGATIVE_CONTROLS = {
    "check_dpo_deriv_1": ("KL sign flipped: E[r + beta log pi/pi_ref]", lambda: check_dpo_deriv_1(
        lambda w: w.expect(lambda x, y: w.r[x][y] + w.beta * sp.log(w.pi[x][y] / w.ref[x][y])))),
    "check_dpo_deriv_2": ("beta dropped: E[r] - E[log pi/pi_ref]", lambda: check_dpo_deriv_2(
        lambda w: w.expect(lambda x, y: w.r[x][y]) - w.expect(lambda x, y: sp.log(w.pi[x][y] / w.ref[x][y])))),
    "check_dpo_deriv_3": ("only the reward negated: -E[r] - beta E[log pi/pi_ref]", lambda: check_dpo_deriv_3(
        lambda w: -w.expect(lambda x, y: w.r[x][y])
        - w.beta * w.expect(lambda x, y: sp.log(w.pi[x][y] / w.ref[x][y])))),
    "check_dpo_deriv_4": ("beta dropped: E[log pi/pi_ref - r]", lambda: check_dpo_deriv_4(
        lambda w: w.expect(lambda x, y: sp.log(w.pi[x][y] / w.ref[x][y]) - w.r[x][y]))),
    "check_dpo_deriv_4 (beta < 0)": ("the same division with beta < 0", lambda: check_dpo_deriv_4(
        dpo_deriv_4, "negative")),
    "check_dpo_partition": ("wrong normaliser: Z = sum pi_ref exp(r) (no beta)", lambda: check_dpo_partition(
        lambda w: tuple(sp.Add(*[w.ref[x][y] * sp.exp(w.r[x][y]) for y in w.responses]) for x in w.prompts))),
    "check_dpo_deriv_5": ("+log Z instead of -log Z", lambda: check_dpo_deriv_5(
        lambda w, Z=None: dpo_deriv_5(w, Z) + 2 * sp.Add(*[w.d[x] * w.pi[x][y] * sp.log(
            (partition_function(w) if Z is None else Z)[x]) for x in w.prompts for y in w.responses]))),
    "check_dpo_deriv_6": ("(4) with the reward's sign flipped", lambda: check_dpo_deriv_6(
        lambda w: w.expect(lambda x, y: sp.log(w.pi[x][y] / w.ref[x][y]) + w.r[x][y] / w.beta))),
    "check_dpo_deriv_7": ("log Z + log Z added", lambda: check_dpo_deriv_7(
        lambda s: dpo_deriv_6(s) + 2 * sp.log(s.Z))),
    "check_dpo_deriv_8": ("regrouped with +log Z twice", lambda: check_dpo_deriv_8(
        lambda s: (sp.log(s.pi / s.ref) + sp.log(s.Z)) + sp.log(s.Z) - s.r / s.beta)),
    "check_dpo_deriv_9": ("Z on the wrong side: log(pi / (pi_ref Z))", lambda: check_dpo_deriv_9(
        lambda s: sp.log(s.pi / (s.ref * s.Z)) - sp.log(s.Z) - s.r / s.beta)),
    "check_dpo_deriv_9_to_5": ("exp(-r/beta) folded in", lambda: check_dpo_deriv_9_to_5(
        lambda s: sp.log(s.pi / (s.ref * sp.exp(-s.r / s.beta) / s.Z)) - sp.log(s.Z))),
    "check_dpo_deriv_10": ("missing Z: KL to pi_ref exp(r/beta), unnormalised", lambda: check_dpo_deriv_10(
        lambda w: sp.Add(*[w.d[x] * (kl(w.pi[x], optimal_policy(w, (1,) * len(w.d))[x])
                                     - sp.log(partition_function(w)[x])) for x in w.prompts]))),
    "check_drop_log_Z": ("also drops E_pi[r/beta] ('r does not depend on pi'): E[log pi/pi_ref]",
                         lambda: check_drop_log_Z(lambda w: w.expect(lambda x, y: sp.log(w.pi[x][y] / w.ref[x][y])))),
    "check_optimal_value": ("value +E log Z", lambda: check_optimal_value(
        lambda w: sp.Add(*[w.d[x] * sp.log(partition_function(w)[x]) for x in w.prompts]))),
    "check_optimal_policy_lagrangian": ("beta on the wrong side: pi_ref exp(beta r)/Z", lambda:
                                        check_optimal_policy_lagrangian(lambda w: tuple(tuple(
                                            w.ref[x][y] * sp.exp(w.beta * w.r[x][y]) / sp.Add(*[
                                                w.ref[x][j] * sp.exp(w.beta * w.r[x][j]) for j in w.responses])
                                            for y in w.responses) for x in w.prompts))),
    "check_optimal_policy_convexity": ("the maximised form (2) in place of (4)",
                                       lambda: check_optimal_policy_convexity(dpo_deriv_2)),
    "check_gibbs_inequality": ("pi* with beta dropped: pi_ref exp(r)/Z", lambda: check_gibbs_inequality(
        300, 0, lambda w: optimal_policy(dataclasses.replace(w, beta=sp.Integer(1))))),
    "check_deriv_chain_any_n_1": ("KL sign flipped", _n("1", lambda s: s.sum(
        s.pi[s.y] * (s.r[s.y] + s.beta * sp.log(s.pi[s.y] / s.ref[s.y]))))),
    "check_deriv_chain_any_n_2": ("beta dropped", _n("2", lambda s: s.sum(s.pi[s.y] * s.r[s.y])
                                                     - s.sum(s.pi[s.y] * sp.log(s.pi[s.y] / s.ref[s.y])))),
    "check_deriv_chain_any_n_3": ("only the reward negated", _n("3", lambda s: -s.sum(s.pi[s.y] * s.r[s.y]) - s.beta
                                                                * s.sum(s.pi[s.y] * sp.log(s.pi[s.y] / s.ref[s.y])))),
    "check_deriv_chain_any_n_4": ("beta dropped", _n("4", lambda s: s.sum(
        s.pi[s.y] * (sp.log(s.pi[s.y] / s.ref[s.y]) - s.r[s.y])))),
    "check_deriv_chain_any_n_5": ("+log Z", _n("5", lambda s: s.sum(s.pi[s.y] * (
        sp.log(s.pi[s.y] / (s.ref[s.y] * sp.exp(s.r[s.y] / s.beta) / s.Z)) + sp.log(s.Z))))),
    "check_deriv_chain_any_n_10": ("missing Z in the KL's target", _n("10", lambda s: s.sum(
        s.pi[s.y] * sp.log(s.pi[s.y] / (s.ref[s.y] * sp.exp(s.r[s.y] / s.beta)))) - sp.log(s.Z))),
    "check_partition_any_n": ("wrong normaliser (no beta)", lambda: check_partition_any_n(
        lambda s: s.sum(s.ref[s.y] * sp.exp(s.r[s.y])))),
    "check_optimal_policy_any_n": ("pi_ref exp(-r/beta)/Z", lambda: check_optimal_policy_any_n(
        lambda s: s.ref[s.y] * sp.exp(-s.r[s.y] / s.beta) / s.sum(s.ref[s.y] * sp.exp(-s.r[s.y] / s.beta)))),
    "check_bradley_terry_is_sigmoid": ("sigma(r2 - r1)", lambda: check_bradley_terry_is_sigmoid(
        lambda r1, r2: sigmoid(r2 - r1))),
    "check_dpo_reward_full": ("beta log Z(x) dropped", lambda: check_dpo_reward_full(
        lambda star, ref, Z, beta: beta * sp.log(star / ref))),
    "check_dpo_loss_deriv0": ("beta dropped from the log-ratios", lambda: check_dpo_loss_deriv0(
        lambda s: (lambda e1, e2: e1 / (e1 + e2))(sp.exp(sp.log(s.star[0] / s.ref[0]) + s.beta * sp.log(s.Z)),
                                                   sp.exp(sp.log(s.star[1] / s.ref[1]) + s.beta * sp.log(s.Z))))),
    "check_dpo_loss_deriv1": ("the two responses answer different prompts (Z_1 != Z_2)", lambda:
                              check_dpo_loss_deriv1(lambda s: dpo_loss_deriv0(s, sp.Symbol("Z_2", positive=True)))),
    "check_dpo_loss_deriv2": ("1 / (1 + exp(a1 - a2))", lambda: check_dpo_loss_deriv2(
        lambda s: 1 / (1 + sp.exp(_log_ratio_terms(s)[0] - _log_ratio_terms(s)[1])))),
    "check_dpo_loss_deriv3": ("sigma(a2 - a1)", lambda: check_dpo_loss_deriv3(
        lambda s: sigmoid(_log_ratio_terms(s)[1] - _log_ratio_terms(s)[0]))),
    "check_dpo_core_is_max_likelihood": ("labels swapped in the likelihood", lambda: check_dpo_core_is_max_likelihood(
        lambda h, beta, p: _pair_nll(h, beta, 1 - p))),
    "check_implicit_reward_same_preferences": ("reference dropped: beta log pi*", lambda:
                                               check_implicit_reward_same_preferences(
                                                   lambda s: [s.beta * sp.log(st) for st in s.star])),
    "check_reward_shift_invariance": ("a shift that depends on y", lambda: check_reward_shift_invariance(
        lambda k: sp.symbols(f"f_1:{k + 1}", real=True))),
    "check_dpo_grad_0": ("the gradient of +log sigma(u) (loss sign flipped)", lambda: check_dpo_grad_0(
        lambda g: sp.log(sigmoid(margin_u(g))))),
    "check_grad_into_expectation": ("data sampled from pi_theta (weights depend on theta)", lambda:
                                    check_grad_into_expectation(sigmoid)),
    "check_grad_swap_needs_offline_data": None,  # filled below: needs its own function
    "check_sigmoid_identities": ("sigma' = sigma (1 + sigma)", lambda: check_sigmoid_identities(
        lambda s: s * (1 + s))),
    "check_dpo_grad_2": ("sign slip in the chain rule: +sigma'(u)/sigma(u) du/dtheta", lambda: check_dpo_grad_2(
        lambda g: -dpo_grad_2(g))),
    "check_dpo_grad_3": ("weight sigma(r_hat_w - r_hat_l) (flipped)", lambda: check_dpo_grad_3(
        lambda g: -g.beta * sigmoid(margin_u(g)) * (sp.diff(g.logp_chosen, g.theta) - sp.diff(g.logp_rejected,
                                                                                                 g.theta)))),
    "check_grad_needs_frozen_reference": ("claimed for a frozen reference (nothing missing)", lambda:
                                          check_grad_needs_frozen_reference(gradient_symbols)),
    "check_loss_partials": ("weight beta sigma(r_hat_w - r_hat_l) (flipped)", lambda: check_loss_partials(
        lambda lc, lr, rc, rr, beta: beta * sigmoid(beta * (lc - rc) - beta * (lr - rr)))),
    "check_lemma_1": ("a shift that depends on the response", lambda: check_lemma_1(True)),
    "check_lemma_2": ("a shift that depends on the response", lambda: check_lemma_2(True)),
    "check_theorem_1": ("r - log Z (beta dropped)", lambda: check_theorem_1(
        lambda s, Z: s.r[s.y] - sp.log(Z))),
    "check_dpo_is_reward_likelihood": ("reward log(pi/pi_ref) without beta", lambda: check_dpo_is_reward_likelihood(
        lambda l, ref: l - ref)),
    "check_plackett_luce_z_cancels": ("responses from different prompts (Z_k per response)",
                                      lambda: check_plackett_luce_z_cancels(True)),
    "check_plackett_luce_two_is_bradley_terry": ("normaliser over all K at every position", lambda:
                                                 check_plackett_luce_two_is_bradley_terry(lambda rs: sp.Mul(*[
                                                     sp.exp(r) / sp.Add(*[sp.exp(q) for q in rs]) for r in rs]))),
    "check_soft_value_baseline": ("baseline log Z (beta dropped)", lambda: check_soft_value_baseline(
        lambda s, Z: sp.log(Z))),
    "check_psi_logit_is_dpo": ("Psi = identity (IPO's) in place of the logit", lambda: check_psi_logit_is_dpo(
        lambda q: q)),
    "check_ipo_target": ("the loss's constant target 1/(2 beta) read as the optimum for every p", lambda:
                         check_ipo_target(lambda p, beta: 1 / (2 * beta))),
}


@functools.cache
def _swap_claimed_for_offline_data() -> Step:
    """The control for check_grad_swap_needs_offline_data: the same counterexample search on offline data."""
    g = gradient_symbols()
    other = _second_triple(g)
    q = sp.Symbol("q", positive=True)
    difference = (sp.diff(q * dpo_loss(g) + (1 - q) * dpo_loss(other), g.theta)
                  - (q * dpo_grad_0(g) + (1 - q) * dpo_grad_0(other)))
    return _differs("eq:dpo_grad_0 -> 2 (condition)", difference, "offline data")


NEGATIVE_CONTROLS["check_grad_swap_needs_offline_data"] = (
    "claimed for offline data (the swap is then exact)", _swap_claimed_for_offline_data)


def check_names() -> list:
    """The name of every check in ALL_CHECKS (partials carry theirs in __name__)."""
    return [check.__name__ for check in ALL_CHECKS]


def summary() -> dict:
    """How many checks there are, and how many count (sympy or numeric, not decided by canonicalisation)."""
    steps = run_all()
    return {"steps": len(steps), "counted": sum(s.counts for s in steps),
            "canonical": sum(s.canonical for s in steps),
            "definitional": sum(s.method == "definitional" for s in steps),
            "assumption": sum(s.method == "assumption" for s in steps)}


# ==============================================================================================================
# check_step: check your own step


@dataclass(frozen=True)
class StepCheck:
    """The verdict of ``check_step``.

    verdict: "holds" (for all values the symbols' own assumptions allow), "holds given" (only under ``given``),
    "differs" (``counterexample`` holds numbers where the two sides differ), or "undecided" (sympy could not
    simplify the difference to 0 and no counterexample was found: not a proof either way).
    """

    verdict: str
    given: tuple = ()
    counterexample: dict | None = None  # numbers where before != after (for "holds given": where it fails without)
    canonical: bool = False  # decided before simplify ran: sympy's automatic canonicalisation
    difference: sp.Expr = sp.Integer(0)  # after - before, simplified

    def __bool__(self) -> bool:
        return self.verdict in ("holds", "holds given")

    def __str__(self) -> str:
        text = self.verdict
        if self.verdict == "holds given":
            text += " " + ", ".join(self.given)
        if self.canonical:
            text += " (decided by sympy's automatic canonicalisation, before simplify)"
        if self.counterexample is not None:
            values = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                               for k, v in self.counterexample.items() if k != "difference")
            where = "without them, e.g." if self.verdict == "holds given" else "e.g."
            text += f"; {where} at {values}: after - before = {self.counterexample['difference']:.4g}"
        return text


_SIGN = {">": "positive", ">=": "nonnegative", "<": "negative", "<=": "nonpositive"}


def _apply_assumptions(expression, assumptions) -> tuple:
    """Apply ``x > 0``-style sign assumptions (the symbol is re-declared) and ``Eq(a, b)`` substitutions."""
    expr, given = sp.sympify(expression), []
    for fact in assumptions:
        if fact is sp.true:
            continue
        if isinstance(fact, sp.Equality):
            expr = expr.subs(fact.lhs, fact.rhs)
        elif isinstance(fact, sp.core.relational.Relational) and fact.rhs == 0 and isinstance(fact.lhs, sp.Symbol):
            sign = _SIGN.get(fact.rel_op)
            if sign is None:
                raise ValueError(f"assumption {fact} not understood: use x > 0, x >= 0, x < 0, x <= 0 or Eq(a, b)")
            expr = expr.xreplace({fact.lhs: sp.Symbol(fact.lhs.name, real=True, **{sign: True})})
        else:
            raise ValueError(f"assumption {fact} not understood: use x > 0, x >= 0, x < 0, x <= 0 (a symbol against "
                             "0) or Eq(a, b)")
        given.append(str(fact))
    return expr, tuple(given)


def check_step(before, after, assumptions=()) -> StepCheck:
    """Check one step of your own derivation: is ``after`` equal to ``before``?

    before, after: sympy expressions (or strings sympy can parse). assumptions: facts the step may use, each
    ``symbol > 0`` (or >=, <, <=) or ``sp.Eq(a, b)`` (substitutes b for a, e.g. a constraint sum = 1).
    Returns a ``StepCheck``: holds / holds given <assumptions> (with a counterexample showing they are needed,
    when one exists) / differs with a counterexample / undecided. Raises ValueError for an assumption it cannot
    use.
    """
    difference = sp.sympify(after) - sp.sympify(before)
    assumed, given = _apply_assumptions(difference, assumptions)  # first: a bad assumption is an error anyway
    if is_canonical_zero(difference):
        return StepCheck("holds", canonical=True)
    simplified = sp.simplify(difference)
    if simplified == 0:
        return StepCheck("holds")
    if given and (is_canonical_zero(assumed) or is_zero(assumed)):
        return StepCheck("holds given", given, counterexample(difference), difference=simplified)
    found = counterexample(assumed)
    if found is not None:
        return StepCheck("differs", given, found, difference=sp.simplify(assumed))
    return StepCheck("undecided", given, None, difference=sp.simplify(assumed))
