"""Autograding for the exercise notebooks (``exercises/``): one check per exercise, each with a hint.

``minidpo grade NOTEBOOK`` runs a filled-in exercise notebook from a fresh kernel (nbclient, errors allowed, so one
broken cell does not stop the others), then calls ``grade_namespace`` inside that same kernel on the objects the
student defined, and prints a row per exercise. An exercise is a code cell tagged ``exercise-N``; the exercise
numbers run over the whole course (1-16), so a hint can say "Exercise 5" wherever it is printed.

How the checks work (as Stanford CS336's DPO assignment does, and then some):
  * golden values: the student's function is called on fixed inputs and compared with an INDEPENDENT
    computation written here in numpy float64 (or sympy), never with the ``minidpo`` function the student is
    re-implementing, so the grader checks both;
  * properties where a value is not enough: masking invariance, gradient against autograd, detached rewards,
    no activations saved for a reference forward, Z(x) cancelling;
  * typical wrong answers are recognised (a sign, a missing shift, β in the wrong place, a missing detach) and
    get a hint that says what is wrong without giving the answer.

Each check raises ``Failed(hint)`` at the first problem; ``grade_namespace`` turns that into a ``Result``.
The notebook runner is ``grade_notebook``; ``run_in_process`` executes the same cells without a kernel (the
tests use it to grade every notebook quickly).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

LN2 = math.log(2.0)
TAG = re.compile(r"^exercise-(\d+)$")
MARKER = "@@minidpo-grade@@"  # the line the grading cell prints its JSON after


class Failed(Exception):
    """A check failed; the message is the hint shown to the student."""


class NotAnExerciseNotebook(ValueError):
    """The file is not a notebook with cells tagged exercise-N."""


@dataclass
class Result:
    number: int
    title: str
    passed: bool
    message: str  # "ok" or the hint


@dataclass(frozen=True)
class Exercise:
    number: int
    title: str
    notebook: str  # the course notebook it belongs to, "01" ... "07"
    confusion: str  # the common confusion it targets ("" when none)
    check: Callable


EXERCISES: dict[int, Exercise] = {}


def _exercise(number: int, title: str, notebook: str, confusion: str = ""):
    def register(check):
        EXERCISES[number] = Exercise(number, title, notebook, confusion, check)
        return check
    return register


# ---------------------------------------------------------------------------------------------------------------
# Helpers: fetch the student's objects, call them, compare.


class _Student:
    """The student's namespace, seen through one exercise: missing names and stubs become hints."""

    def __init__(self, namespace: dict, number: int):
        self.ns, self.number = namespace, number

    def get(self, name: str):
        if name not in self.ns:
            raise Failed(f"`{name}` is not defined: write it in the cell tagged exercise-{self.number} and run it")
        return self.ns[name]

    def call(self, name: str, *args, **kwargs):
        fn = self.get(name)
        if not callable(fn):
            raise Failed(f"`{name}` should be a function, got {type(fn).__name__}")
        try:
            return fn(*args, **kwargs)
        except NotImplementedError:
            raise Failed(f"`{name}` is still the stub: replace `raise NotImplementedError` with your code") from None
        except Failed:
            raise
        except Exception as e:  # noqa: BLE001  (any error of the student's is a hint, not a crash)
            raise Failed(f"`{name}` raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]) \
                from None


def _np(x) -> np.ndarray:
    """A float64 array from a torch tensor (detached), an array, a list or a number."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _close(a, b, tol: float = 1e-6) -> bool:
    a, b = _np(a), _np(b)
    return a.shape == b.shape and bool(np.all(np.isfinite(a))) and np.allclose(a, b, rtol=tol, atol=tol)


def _shape_is(value, shape: tuple, name: str) -> np.ndarray:
    arr = _np(value)
    if arr.shape != shape:
        raise Failed(f"`{name}` returned shape {arr.shape}, expected {shape}")
    return arr


def _torch():
    import torch
    return torch


def _t(x, requires_grad: bool = False):
    torch = _torch()
    return torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=requires_grad)


def _logsig(x):
    x = np.asarray(x, dtype=np.float64)
    return -np.logaddexp(0.0, -x)  # log sigma(x), finite for any x


def _sigmoid(x):
    return np.exp(_logsig(x))


def _choice(s: _Student, name: str, options: tuple, correct, hint: str):
    value = s.get(name)
    if isinstance(value, str):
        value = value.strip().lower()
    if value not in options:
        raise Failed(f"`{name}` must be one of {', '.join(map(repr, options))}, got {value!r}")
    if value != correct:
        raise Failed(f"`{name}` = {value!r} is not right: {hint}")


# ---------------------------------------------------------------------------------------------------------------
# Notebook 01: the optimal policy


def _fixed_tables(seed: int = 0, p: int = 3, k: int = 5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(p, k))
    ref = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    r = rng.normal(size=(p, k))
    return ref, r


def _tables_and_policy(table_seed: int, policy_seed: int):
    """``_fixed_tables(table_seed)`` and a random policy table of the same shape, (3, 5), from ``policy_seed``."""
    ref, r = _fixed_tables(table_seed)
    pi = np.random.default_rng(policy_seed).dirichlet(np.ones(ref.shape[-1]), size=ref.shape[0])
    return ref, r, pi


def _pi_star(ref, r, beta):
    """pi*(y|x) = pi_ref exp(r / beta) / Z(x), in log space so that small beta does not overflow."""
    with np.errstate(divide="ignore"):
        logits = np.log(ref) + r / beta
    logits = logits - logits.max(-1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(-1, keepdims=True)


@_exercise(1, "pi* = pi_ref exp(r/beta) / Z", "01", "which way beta works")
def check_pi_star(s: _Student) -> None:
    ref, r = _fixed_tables()
    beta = 0.5
    got = _shape_is(s.call("pi_star", _t(ref), _t(r), beta), ref.shape, "pi_star")
    if not np.allclose(got.sum(-1), 1.0, atol=1e-6):
        raise Failed(f"each row of pi* must sum to 1 (one distribution per prompt), yours sum to "
                     f"{np.round(got.sum(-1), 3).tolist()}: divide by Z(x), the sum over responses (last dim)")
    if not _close(got, _pi_star(ref, r, beta)):
        if _close(got, _pi_star(ref, r, 1.0 / beta)):
            raise Failed("beta is in the wrong place: pi* weighs the reward by exp(r/beta), so a LARGER beta must "
                         "keep pi* CLOSER to pi_ref; yours moves away from it")
        if _close(got, _pi_star(np.ones_like(ref) / ref.shape[1], r, beta)):
            raise Failed("your pi* ignores pi_ref: it is pi_ref(y|x) exp(r/beta) / Z(x), not a softmax of r alone")
        raise Failed("pi* differs from pi_ref exp(r/beta) / Z(x) on a fixed 3x5 world (beta = 0.5)")
    small = _np(s.call("pi_star", _t(ref), _t(10 * r), 0.01))
    if not np.all(np.isfinite(small)):
        raise Failed("at beta = 0.01 with rewards up to ~20, exp(r/beta) overflows and your pi* has nan/inf: "
                     "compute it in log space (subtract the row's maximum before exp, or use a softmax)")
    if not _close(small, _pi_star(ref, 10 * r, 0.01), 1e-5):
        raise Failed("pi* is wrong at beta = 0.01 (where exp(r/beta) is huge): compute it in log space")
    zero_ref = ref.copy()
    zero_ref[:, 0] = 0.0
    zero_ref /= zero_ref.sum(-1, keepdims=True)
    got0 = _np(s.call("pi_star", _t(zero_ref), _t(r + 5 * (np.arange(5) == 0)), 0.5))
    if not (np.all(np.isfinite(got0)) and np.allclose(got0[:, 0], 0.0, atol=1e-12)):
        raise Failed("a response with pi_ref = 0 must keep pi* = 0 however large its reward (pi* is pi_ref times "
                     "a factor); yours gives it mass or nan")


def _step4(pi, ref, r, beta):
    """eq:dpo_deriv_4 at one prompt: sum_y pi (log(pi / pi_ref) - r / beta)."""
    return float(np.sum(pi * (np.log(pi / ref) - r / beta)))


@_exercise(2, "step (10) in sympy, and what it assumes", "01")
def check_step10(s: _Student) -> None:
    import sympy as sp

    k = 3
    pi = [sp.Symbol(f"pi_{y}", positive=True) for y in range(k)]
    ref = [sp.Symbol(f"ref_{y}", positive=True) for y in range(k)]
    r = [sp.Symbol(f"r_{y}", real=True) for y in range(k)]
    beta = sp.Symbol("beta", positive=True)
    expr = s.call("step10", pi, ref, r, beta)
    if not isinstance(expr, sp.Expr):
        raise Failed(f"`step10` must return a sympy expression, got {type(expr).__name__}")
    free = {str(x) for x in expr.free_symbols}
    if not {"pi_0", "beta"} <= free:
        raise Failed("your expression does not contain pi and beta: build it from the symbols you are given")
    f = sp.lambdify([pi, ref, r, beta], expr, "mpmath")
    rng = np.random.default_rng(1)
    on_simplex, off_simplex = [], []
    for _ in range(8):
        p = rng.dirichlet(np.ones(k))
        q = rng.dirichlet(np.ones(k))
        rr = rng.normal(size=k)
        b = float(rng.uniform(0.3, 2.0))
        try:
            on_simplex.append(float(f(list(p), list(q), list(rr), b)) - _step4(p, q, rr, b))
            p_off = 1.7 * p  # sums to 1.7: not a distribution
            off_simplex.append(float(f(list(p_off), list(q), list(rr), b)) - _step4(p_off, q, rr, b))
        except Exception as e:  # noqa: BLE001
            raise Failed(f"your expression could not be evaluated at numbers ({type(e).__name__}: {e})"[:300]) \
                from None
        log_z = math.log(float(np.sum(q * np.exp(rr / b))))
        if abs(on_simplex[-1]) > 1e-8:
            if abs(on_simplex[-1] - 2 * log_z) < 1e-8:
                raise Failed("your expression is step (4) plus 2 log Z(x): check the sign of the log Z term")
            raise Failed(f"on a distribution pi (sum = 1) your expression differs from step (4) by "
                         f"{on_simplex[-1]:.4g} (log Z(x) there is {log_z:.4g}): step (10) must equal step (4) "
                         f"whenever sum_y pi(y|x) = 1")
    if max(abs(d) for d in off_simplex) < 1e-8:
        raise Failed("your expression equals step (4) even when sum_y pi != 1: log Z(x) is still inside the "
                     "expectation (or written as sum_y pi log Z). Step (10) takes it OUT, as a KL to pi* minus "
                     "log Z(x) alone; that move is the one that needs sum_y pi(y|x) = 1")
    # step10_given: the assumptions under which the step holds (found with minidpo.check_step in the notebook)
    given = s.get("step10_given")
    if not isinstance(given, (list, tuple)) or not given or not all(isinstance(g, sp.Basic) for g in given):
        raise Failed("`step10_given` must be a non-empty list of sympy facts such as sp.Eq(a, b), the assumptions "
                     "under which check_step says the step holds")
    by_name = {str(x): x for x in [*pi, *ref, *r, beta]}  # the student's symbols may be other objects, same names
    difference = expr - sp.Add(*[p * (sp.log(p / q) - ry / beta) for p, q, ry in zip(pi, ref, r)])
    for fact in given:
        fact = fact.xreplace({x: by_name.get(str(x), x) for x in fact.free_symbols})
        if isinstance(fact, sp.Equality):
            difference = difference.subs(fact.lhs, fact.rhs)
    if not any(str(x).startswith("pi_") for g in given for x in g.free_symbols):
        raise Failed("your assumptions in `step10_given` say nothing about pi: which property of pi does taking "
                     "log Z out of the expectation use?")
    f_diff = sp.lambdify(sorted(difference.free_symbols, key=str), difference, "mpmath")
    names = [str(x) for x in sorted(difference.free_symbols, key=str)]
    for _ in range(5):
        point = [float(rng.uniform(0.05, 0.3)) if n.startswith("pi_") else float(rng.uniform(0.3, 2.0))
                 for n in names]
        try:
            value = float(f_diff(*point))
        except Exception:  # noqa: BLE001
            raise Failed("step (4) - step (10) could not be evaluated under your assumptions in `step10_given`") \
                from None
        if abs(value) > 1e-8:
            raise Failed("under your assumptions in `step10_given` step (10) still differs from step (4): which "
                         "property of pi does taking log Z out of the expectation use? (minidpo.check_step says "
                         "'holds given ...' when you have it)")


def _objective(pi, ref, r, beta):
    """J(pi) = E_x [ E_{y~pi} r - beta KL(pi || pi_ref) ], prompts uniform."""
    return float(np.mean(np.sum(pi * r, -1) - beta * np.sum(pi * np.log(pi / ref), -1)))


@_exercise(3, "the objective J, and J(pi*) = beta E log Z", "01")
def check_objective(s: _Student) -> None:
    ref, r, pi = _tables_and_policy(2, 3)
    beta = 0.7
    got = float(_np(s.call("objective_J", _t(pi), _t(ref), _t(r), beta)))
    want = _objective(pi, ref, r, beta)
    if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9):
        if math.isclose(got, float(np.mean(np.sum(pi * r, -1) - beta * np.sum(ref * np.log(ref / pi), -1))),
                        rel_tol=1e-6):
            raise Failed("your KL is KL(pi_ref || pi): the objective penalises KL(pi || pi_ref), the expectation "
                         "under the policy being trained")
        if math.isclose(got, float(np.mean(np.sum(pi * r, -1) + beta * np.sum(pi * np.log(pi / ref), -1))),
                        rel_tol=1e-6):
            raise Failed("the KL is a cost: it is subtracted from the reward, not added")
        if math.isclose(got, float(np.mean(beta * np.sum(pi * r, -1) - np.sum(pi * np.log(pi / ref), -1))),
                        rel_tol=1e-6):
            raise Failed("beta multiplies the KL penalty, not the reward")
        raise Failed(f"J(pi) = {got:.5g} on a fixed world, expected {want:.5g}: E_x[ E_y~pi r - beta KL(pi||pi_ref) ]"
                     f", prompts weighted equally")
    star = _pi_star(ref, r, beta)
    log_z = np.log(np.sum(ref * np.exp(r / beta), -1))
    at_star = float(_np(s.call("objective_J", _t(star), _t(ref), _t(r), beta)))
    if not math.isclose(at_star, beta * float(log_z.mean()), rel_tol=1e-6):
        raise Failed(f"at pi* your J is {at_star:.5g}; the derivation says J(pi*) = beta E_x log Z(x)")


# ---------------------------------------------------------------------------------------------------------------
# Notebook 02: from Bradley-Terry to the DPO loss


@_exercise(4, "Z(x) cancels in Bradley-Terry (sympy)", "02")
def check_z_cancels(s: _Student) -> None:
    import sympy as sp

    r1, r2 = sp.Symbol("r_1", real=True), sp.Symbol("r_2", real=True)
    bt = s.call("bradley_terry", r1, r2)
    if not isinstance(bt, sp.Expr):
        raise Failed(f"`bradley_terry` must return a sympy expression, got {type(bt).__name__}")
    f_bt = sp.lambdify([r1, r2], bt, "mpmath")
    for a, b in ((0.3, -1.2), (2.0, 0.5), (-0.4, -0.4)):
        got, want = float(f_bt(a, b)), 1.0 / (1.0 + math.exp(b - a))
        if abs(got - want) > 1e-9:
            if abs(got - (1 - want)) < 1e-9:
                raise Failed("bradley_terry(r1, r2) is the probability that y1 WINS: it must grow with r1")
            raise Failed(f"bradley_terry({a}, {b}) = {got:.4g}, expected exp(r1)/(exp(r1)+exp(r2)) = {want:.4g}")
    star, ref, z = (sp.Symbol(n, positive=True) for n in ("pi_star", "pi_ref", "Z"))
    beta, r = sp.Symbol("beta", positive=True), sp.Symbol("r", real=True)
    reward = s.call("reward_from_policy", star, ref, z, beta)
    if not isinstance(reward, sp.Expr):
        raise Failed(f"`reward_from_policy` must return a sympy expression, got {type(reward).__name__}")
    # invert pi* = pi_ref exp(r / beta) / Z: substituting it back must give r
    back = reward.subs(star, ref * sp.exp(r / beta) / z)
    f_back = sp.lambdify([ref, z, beta, r], back, "mpmath")
    for q, zz, b, rr in ((0.2, 1.7, 0.5, 0.8), (0.05, 3.0, 2.0, -1.1)):
        got = float(f_back(q, zz, b, rr))
        if abs(got - rr) > 1e-9:
            if abs(got - (rr - 2 * b * math.log(zz))) < 1e-9:
                raise Failed("solving pi* = pi_ref exp(r/beta)/Z for r gives +beta log Z(x), not -beta log Z(x)")
            raise Failed(f"your reward does not invert pi* = pi_ref exp(r/beta)/Z: plugging pi* in gives "
                         f"{got:.4g} instead of r = {rr}")
    # Z cancels in Bradley-Terry when both responses answer the same prompt
    s1, s2, q1, q2 = (sp.Symbol(n, positive=True) for n in ("s1", "s2", "q1", "q2"))
    p = bt.subs({r1: reward.subs({star: s1, ref: q1}), r2: reward.subs({star: s2, ref: q2})}, simultaneous=True)
    dp_dz = sp.lambdify([s1, s2, q1, q2, z, beta], sp.diff(p, z), "mpmath")
    if abs(float(dp_dz(0.3, 0.1, 0.2, 0.4, 2.5, 0.7))) > 1e-9:
        raise Failed("the preference probability built from your two functions still depends on Z(x)")


def _dpo_ref(pc, pr, rc, rr, beta):
    h = (pc - rc) - (pr - rr)
    return -_logsig(beta * h), beta * (pc - rc), beta * (pr - rr)


def _fixed_logps(seed: int = 0, b: int = 6):
    rng = np.random.default_rng(seed)
    return [-rng.uniform(5, 30, size=b) for _ in range(4)]  # summed log-probs of short completions


@_exercise(5, "the DPO loss and its detached rewards", "02", "loss at ln 2; rewards that carry gradient")
def check_dpo_loss(s: _Student) -> None:
    pc, pr, rc, rr = _fixed_logps()
    out = s.call("dpo_loss", _t(pc), _t(pr), _t(pc), _t(pr), 0.1)
    if not (isinstance(out, tuple) and len(out) == 3):
        raise Failed("`dpo_loss` must return a tuple (losses, chosen_rewards, rejected_rewards)")
    losses = _np(out[0])
    if losses.shape != (6,):
        raise Failed(f"return one loss per pair, shape (B,) = (6,), got {losses.shape} (the caller takes the mean)")
    if not np.allclose(losses, LN2, atol=1e-6):
        v = float(losses.mean())
        hint = " is it -log sigma(beta h)?"
        if v < 0:
            hint = " is the sign of the log-sigmoid right?"
        elif math.isclose(v, 0.1 * LN2, rel_tol=1e-4):
            hint = " that is beta * ln 2 (beta = 0.1): beta belongs inside the sigmoid, not in front of the loss"
        raise Failed(f"your loss at policy = reference is {v:.3f}, expected ln 2 ≈ 0.693:{hint}")
    for beta in (0.1, 2.0):
        losses, cr, rj = s.call("dpo_loss", _t(pc), _t(pr), _t(rc), _t(rr), beta)
        want, want_c, want_r = _dpo_ref(pc, pr, rc, rr, beta)
        if not _close(losses, want):
            h = (pc - rc) - (pr - rr)
            if _close(losses, -beta * _logsig(h)):
                raise Failed("beta belongs inside the sigmoid, -log sigma(beta h); yours scales the loss instead")
            if _close(losses, -_logsig(-beta * h)):
                raise Failed("your loss falls when the REJECTED response gains: h = (chosen log-ratio) - "
                             "(rejected log-ratio)")
            if _close(losses, -_logsig(beta * (pc - pr))):
                raise Failed("your loss ignores the reference log-probs: each log-prob enters as a log-RATIO "
                             "log pi_theta - log pi_ref")
            raise Failed(f"losses differ from -log sigma(beta h) on fixed inputs at beta = {beta}")
        if not (_close(cr, want_c) and _close(rj, want_r)):
            if _close(cr, want_c / beta):
                raise Failed("the implicit rewards are beta * (policy - reference) log-probs: yours miss beta")
            raise Failed("chosen/rejected rewards must be beta * (policy log-prob - reference log-prob)")
    # property: rewards detached, gradient matches -beta sigma(-beta h) / B
    tpc, tpr = _t(pc, True), _t(pr, True)
    losses, cr, rj = s.call("dpo_loss", tpc, tpr, _t(rc), _t(rr), 0.5)
    if getattr(cr, "requires_grad", False) or getattr(rj, "requires_grad", False):
        raise Failed("your rewards carry gradient (requires_grad=True): they are for logging only, so detach them")
    if not getattr(losses, "requires_grad", False):
        raise Failed("your losses carry no gradient: compute them with torch ops on the inputs (no .item(), no numpy)")
    losses.mean().backward()
    h = (pc - rc) - (pr - rr)
    want_grad = -0.5 * _sigmoid(-0.5 * h) / len(h)
    if tpc.grad is None or not _close(tpc.grad, want_grad):
        raise Failed("the gradient of your mean loss in the chosen log-probs is not -beta sigma(-beta h) / B")
    big = s.call("dpo_loss", _t([0.0]), _t([2000.0]), _t([0.0]), _t([0.0]), 1.0)[0]
    if not np.all(np.isfinite(_np(big))):
        raise Failed("for a pair ranked very wrong (h = -2000) your loss is inf or nan: log(sigmoid(x)) underflows; "
                     "use torch.nn.functional.logsigmoid")


@_exercise(6, "the implicit reward beta log pi/pi_ref", "02")
def check_implicit_reward(s: _Student) -> None:
    ref, r, pi = _tables_and_policy(4, 5)
    beta = 0.3
    got = _shape_is(s.call("implicit_reward_table", _t(pi), _t(ref), beta), ref.shape, "implicit_reward_table")
    want = beta * np.log(pi / ref)
    if not _close(got, want):
        if _close(got, -want):
            raise Failed("the ratio is upside down: r_hat = beta log(pi / pi_ref)")
        if _close(got, want / beta):
            raise Failed("your implicit reward misses the factor beta")
        if _close(got, beta * (pi - ref)):
            raise Failed("the implicit reward is a ratio of probabilities, in logs: log(pi / pi_ref)")
        raise Failed("implicit reward differs from beta log(pi / pi_ref) on a fixed table")
    star = _pi_star(ref, r, beta)
    got = _np(s.call("implicit_reward_table", _t(star), _t(ref), beta))
    shift = got - r
    if not np.allclose(shift, shift[:, :1], atol=1e-8):
        raise Failed("at pi = pi*, r_hat - r should be the same for every response of a prompt (-beta log Z(x))")


# ---------------------------------------------------------------------------------------------------------------
# Notebook 03: the gradient, and sequence log-probs


@_exercise(7, "the gradient weight beta sigma(r_hat_l - r_hat_w)", "03")
def check_weight(s: _Student) -> None:
    torch = _torch()
    pc, pr, rc, rr = _fixed_logps(7)
    beta = 0.4
    got = _shape_is(s.call("gradient_weight", _t(pc), _t(pr), _t(rc), _t(rr), beta), (6,), "gradient_weight")
    # independent: autograd of the per-pair loss -log sigma(beta h), written here
    tpc = _t(pc, True)
    h = (tpc - _t(rc)) - (_t(pr) - _t(rr))
    (-torch.nn.functional.logsigmoid(beta * h)).sum().backward()
    want = -_np(tpc.grad)
    if not _close(got, want):
        hw, hl = beta * (pc - rc), beta * (pr - rr)
        if _close(got, beta * _sigmoid(hw - hl)):
            raise Failed("your weight is largest for pairs the model already ranks right; the chapter says the "
                         "weight is higher when the reward estimate is WRONG: check the sign inside sigma")
        if _close(got, _sigmoid(hl - hw)):
            raise Failed("the chain rule through beta h brings out a factor beta in front of sigma")
        if _close(got, beta * _sigmoid((pr - rr) - (pc - rc))):
            raise Failed("inside sigma the rewards are r_hat = beta * log-ratio: yours miss beta there")
        raise Failed("your weight is not -d loss / d log pi(y_w|x) (checked against autograd)")
    at_zero = _np(s.call("gradient_weight", _t(pc), _t(pr), _t(pc), _t(pr), beta))
    if not np.allclose(at_zero, beta / 2):
        raise Failed(f"at pi_theta = pi_ref every weight should be beta/2 = {beta / 2}")


def _seq_logps(logits, labels):
    """Shift by one, log-softmax in float64, gather, drop -100 positions, sum per row."""
    logits = np.asarray(logits, dtype=np.float64)[:, :-1]
    labels = np.asarray(labels)[:, 1:]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    mask = labels != -100
    safe = np.where(mask, labels, 0)
    tok = np.take_along_axis(logits, safe[..., None], -1)[..., 0] - logz
    return (tok * mask).sum(-1)


def _fixed_sequences(seed: int = 0, b: int = 3, t: int = 8, v: int = 11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, t, v)) * 2
    ids = rng.integers(0, v, size=(b, t))
    labels = ids.copy()
    labels[:, :3] = -100  # a 3-token prompt
    labels[0, 6:] = -100  # padding on row 0
    labels[2, 7:] = -100
    return logits, ids, labels


@_exercise(8, "sequence log-probs: shift, gather, -100 mask", "03", "an unshifted label, padding counted")
def check_seq_logps(s: _Student) -> None:
    torch = _torch()
    logits, ids, labels = _fixed_sequences()
    got = _shape_is(s.call("seq_logps", _t(logits).float(), torch.tensor(labels)), (3,), "seq_logps")
    want = _seq_logps(logits, labels)
    if not _close(got, want, 1e-4):
        unshifted = ((np.take_along_axis(logits - np.log(np.exp(logits).sum(-1, keepdims=True)),
                                         np.where(labels == -100, 0, labels)[..., None], -1)[..., 0])
                     * (labels != -100)).sum(-1)
        if _close(got, unshifted, 1e-4):
            raise Failed("your log-probs are not shifted: logits[:, t] predicts token t+1, so score labels[:, 1:] "
                         "with logits[:, :-1]")
        raw = (np.take_along_axis(logits[:, :-1], np.where(labels[:, 1:] == -100, 0, labels[:, 1:])[..., None],
                                  -1)[..., 0] * (labels[:, 1:] != -100)).sum(-1)
        if _close(got, raw, 1e-4):
            raise Failed("you gathered raw logits: take log_softmax over the vocabulary first")
        safe = np.where(labels == -100, 0, labels)
        if _close(got, _seq_logps(logits, safe), 1e-4):
            raise Failed("positions labelled -100 (prompt, padding) are counted in your sum: mask them out")
        n = (labels[:, 1:] != -100).sum(-1)
        if _close(got, want / n, 1e-4):
            raise Failed("you averaged over tokens; DPO's log pi(y|x) is the SUM over the completion's tokens")
        raise Failed(f"your log-probs {np.round(got, 3).tolist()} differ from the expected ones on fixed logits")
    # masking invariance: what sits at a -100 position (its label, its logits row) must not matter
    labels2 = labels.copy()
    logits2 = logits.copy()
    logits2[0, 6:] = 50.0 * np.random.default_rng(1).normal(size=logits2[0, 6:].shape)
    labels2[0, 7] = -100
    got2 = _np(s.call("seq_logps", _t(logits2).float(), torch.tensor(labels2)))
    if not _close(got2, want, 1e-4):
        raise Failed("changing the logits after the last counted token changed your result: only positions that "
                     "predict a counted label may enter")
    padded_logits = np.concatenate([logits, np.zeros((3, 4, 11))], 1)
    padded_labels = np.concatenate([labels, np.full((3, 4), -100)], 1)
    got3 = _np(s.call("seq_logps", _t(padded_logits).float(), torch.tensor(padded_labels)))
    if not _close(got3, want, 1e-4):
        raise Failed("adding 4 padding positions (label -100) changed your result: padding must not count")


# ---------------------------------------------------------------------------------------------------------------
# Notebook 04: tokens, EOS and displacement


def _example(prompt, completion, eos, pad, length):
    ids = list(prompt) + list(completion) + [eos]
    labels = [-100] * len(prompt) + list(completion) + [eos]
    attention = [1] * len(ids)
    n_pad = length - len(ids)
    return ids + [pad] * n_pad, attention + [0] * n_pad, labels + [-100] * n_pad


@_exercise(9, "one example: prompt mask, EOS, padding", "04", "a missing EOS, padding or prompt counted")
def check_build_example(s: _Student) -> None:
    prompt, completion, eos, pad, length = [5, 9, 2], [7, 7, 4, 8], 1, 1, 12  # pad = EOS, as for GPT-2
    out = s.call("build_example", prompt, completion, eos, pad, length)
    if not isinstance(out, dict) or not {"input_ids", "attention_mask", "labels"} <= set(out):
        raise Failed("`build_example` must return a dict with input_ids, attention_mask and labels")
    got = {k: [int(v) for v in _np(out[k]).tolist()] for k in ("input_ids", "attention_mask", "labels")}
    ids, att, lab = _example(prompt, completion, eos, pad, length)
    for k in got:
        if len(got[k]) != length:
            raise Failed(f"{k} has length {len(got[k])}, expected {length} (pad on the right up to `length`)")
    if got["labels"][len(prompt) + len(completion)] != eos:
        raise Failed("the completion's labels do not end with EOS: the model is never scored on stopping, so "
                     "log pi(y|x) is the log-prob of a prefix, and DPO can't prefer the shorter answer")
    if any(v != -100 for v in got["labels"][:len(prompt)]):
        raise Failed("the prompt's tokens are counted in the labels: mask them with -100 (log pi(y|x) conditions "
                     "on x, it does not score it)")
    if got["labels"] != lab:
        if got["labels"][-1] == pad:
            raise Failed("padding is labelled with the pad id; with pad = EOS (GPT-2) the model would be scored on "
                         "saying EOS forever: label padding -100")
        raise Failed(f"labels {got['labels']} are not prompt -100, completion, EOS, padding -100")
    if got["input_ids"] != ids:
        raise Failed("input_ids must be prompt + completion + EOS, then pad ids up to `length`")
    if got["attention_mask"] != att:
        raise Failed("attention_mask must be 1 on prompt, completion and EOS, 0 on padding")
    try:
        s.ns["build_example"](prompt, completion * 3, eos, pad, length)
    except ValueError:
        pass
    except Exception as e:  # noqa: BLE001
        raise Failed(f"a too-long example should raise ValueError, yours raised {type(e).__name__}") from None
    else:
        raise Failed("prompt + completion + EOS longer than `length` must raise ValueError (a silent cut would "
                     "drop the EOS)")


def _pairs_fixture():
    rng = np.random.default_rng(9)
    ref = rng.dirichlet(np.ones(6), size=2)
    pi = rng.dirichlet(np.ones(6), size=2)
    prompt = rng.integers(0, 2, size=10)
    chosen, rejected = rng.integers(0, 6, size=10), (rng.integers(1, 6, size=10))
    rejected = (chosen + rejected) % 6
    return pi, ref, prompt, chosen, rejected


@_exercise(10, "the chosen log-prob falls: why", "04", "chosen log-probs falling")
def check_displacement(s: _Student) -> None:
    torch = _torch()
    pi, ref, x, yw, yl = _pairs_fixture()
    out = s.call("logprob_shifts", _t(pi), _t(ref), torch.tensor(x), torch.tensor(yw), torch.tensor(yl))
    if not (isinstance(out, tuple) and len(out) == 2):
        raise Failed("`logprob_shifts` must return (delta_w, delta_l), one value per pair each")
    dw, dl = _shape_is(out[0], (10,), "logprob_shifts"), _shape_is(out[1], (10,), "logprob_shifts")
    lr = np.log(pi / ref)
    if not (_close(dw, lr[x, yw]) and _close(dl, lr[x, yl])):
        if _close(dw, -lr[x, yw]):
            raise Failed("delta = log pi_theta - log pi_ref (how far training moved it); yours is reversed")
        if _close(dw, (pi - ref)[x, yw]):
            raise Failed("measure the shift in nats: log pi_theta - log pi_ref, not a difference of probabilities")
        raise Failed("delta_w and delta_l must be log pi_theta - log pi_ref of each pair's chosen and rejected")
    got = float(_np(s.call("sum_rule_rhs", _t(pi), _t(ref))))
    want = -float(np.mean(np.sum(ref * np.log(ref / pi), -1)))
    if not math.isclose(got, want, rel_tol=1e-6):
        if math.isclose(got, -float(np.mean(np.sum(pi * np.log(pi / ref), -1))), rel_tol=1e-6):
            raise Failed("the pairs are sampled from pi_ref, so the expectation is under pi_ref: -KL(pi_ref || pi), "
                         "not -KL(pi || pi_ref)")
        if math.isclose(got, -want, rel_tol=1e-6):
            raise Failed("E_{y~pi_ref} log(pi/pi_ref) = MINUS KL(pi_ref || pi), which is <= 0")
        raise Failed(f"sum_rule_rhs = {got:.4g}, expected -E_x KL(pi_ref(.|x) || pi(.|x)) = {want:.4g}")
    _choice(s, "answer_10", ("a", "b", "c"), "b",
            "the loss only sees the margin h = delta_w - delta_l; look at what the sum rule pins the average of "
            "delta_w and delta_l to")


# ---------------------------------------------------------------------------------------------------------------
# Notebook 05: a training step, reference log-probs, a beta sweep


class TinyLM:
    """A bigram language model (embedding -> tanh -> vocabulary): causal, tiny, HF-like ``.logits`` output.

    The exercises of notebook 05 train it, so that a DPO step runs in milliseconds and the grader can redo it.
    """

    def __new__(cls, vocab_size: int = 13, dim: int = 8, seed: int = 0):
        torch = _torch()

        class _TinyLM(torch.nn.Module):
            def __init__(self):
                super().__init__()
                gen = torch.Generator().manual_seed(seed)
                self.embed = torch.nn.Parameter(torch.randn(vocab_size, dim, generator=gen) * 0.5)
                self.out = torch.nn.Parameter(torch.randn(dim, vocab_size, generator=gen) * 0.5)

            def forward(self, input_ids, attention_mask=None):
                hidden = torch.tanh(self.embed[input_ids])  # (B, T, dim)
                return SimpleNamespace(logits=hidden @ self.out)  # (B, T, V)

        return _TinyLM()


def toy_batch(seed: int = 0, b: int = 4, vocab_size: int = 13):
    """A preference batch in PreferenceCollator's format: prompt of 3 tokens, completions of 2-4, EOS = 1,
    right padding with pad id 0, labels -100 on prompt and padding."""
    torch = _torch()
    rng = np.random.default_rng(seed)
    batch = {}
    prompts = [list(rng.integers(2, vocab_size, size=3)) for _ in range(b)]
    for side in ("chosen", "rejected"):
        rows = [_example(p, list(rng.integers(2, vocab_size, size=int(rng.integers(2, 5)))), 1, 0, 8)
                for p in prompts]
        batch[f"{side}_input_ids"] = torch.tensor([r[0] for r in rows])
        batch[f"{side}_attention_mask"] = torch.tensor([r[1] for r in rows])
        batch[f"{side}_labels"] = torch.tensor([r[2] for r in rows])
    return batch


def _batch_logps(model, batch):
    """Independent of minidpo.sequence_logps: the numpy reference above, via float64 logits."""
    torch = _torch()
    with torch.no_grad():
        out = []
        for side in ("chosen", "rejected"):
            logits = model(input_ids=batch[f"{side}_input_ids"]).logits
            out.append(_seq_logps(_np(logits), batch[f"{side}_labels"].numpy()))
    return out


def _reference_step(model, batch, ref_c, ref_r, beta, lr):
    """One plain SGD step on the mean DPO loss, computed independently (float64 log-softmax here)."""
    torch = _torch()
    params = list(model.parameters())
    logps = {}
    for side in ("chosen", "rejected"):
        logits = model(input_ids=batch[f"{side}_input_ids"]).logits.double()[:, :-1]
        labels = batch[f"{side}_labels"][:, 1:]
        mask = labels != -100
        tok = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        logps[side] = (tok * mask).sum(-1)
    h = (logps["chosen"] - torch.as_tensor(ref_c, dtype=torch.float64)) - \
        (logps["rejected"] - torch.as_tensor(ref_r, dtype=torch.float64))
    loss = -torch.nn.functional.logsigmoid(beta * h).mean()
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g.to(p.dtype)
    return float(loss.detach())


@_exercise(11, "one DPO training step", "05", "loss stuck at ln 2 (frozen or mis-masked policy)")
def check_step(s: _Student) -> None:
    import copy

    torch = _torch()
    batch, beta, lr = toy_batch(3), 0.5, 0.5
    policy = TinyLM(seed=1)
    twin = copy.deepcopy(policy)
    ref_c, ref_r = (torch.tensor(v, dtype=torch.float32) for v in _batch_logps(policy, batch))
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    before = [p.detach().clone() for p in policy.parameters()]
    loss = s.call("dpo_step", policy, opt, batch, ref_c, ref_r, beta)
    try:
        loss = float(loss)
    except Exception:  # noqa: BLE001
        raise Failed(f"`dpo_step` must return the loss as a number, got {type(loss).__name__}") from None
    if not math.isclose(loss, LN2, abs_tol=1e-4):
        raise Failed(f"the first step starts at pi_theta = pi_ref, so the loss must be ln 2 ≈ 0.693; yours is "
                     f"{loss:.4f}: does the policy score the same tokens as the reference did (labels, -100 on "
                     f"prompt and padding), with the same h and beta?")
    if all(torch.equal(a, p.detach()) for a, p in zip(before, policy.parameters())):
        raise Failed("the policy's parameters did not change: the loss will stay at ln 2 forever. Is the forward "
                     "under torch.no_grad(), are the gradients detached, or is optimizer.step() missing?")
    _reference_step(twin, batch, ref_c, ref_r, beta, lr)
    if not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(policy.parameters(), twin.parameters())):
        moved = [p.detach() - a for a, p in zip(before, policy.parameters())]
        wanted = [p.detach() - a for a, p in zip(before, twin.parameters())]
        if all(torch.allclose(m, -w, atol=1e-5) for m, w in zip(moved, wanted)):
            raise Failed("your step went UP the loss: minimise -log sigma(beta h) (check the sign)")
        raise Failed("your parameter update is not one step on the mean DPO loss: check the -100 mask "
                     "(prompt and padding must not count), beta, and that you average over the batch")
    # a second step: gradients must not accumulate across calls
    s.call("dpo_step", policy, opt, batch, ref_c, ref_r, beta)
    _reference_step(twin, batch, ref_c, ref_r, beta, lr)
    if not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(policy.parameters(), twin.parameters())):
        raise Failed("the first step is right but the second is not: gradients accumulate across steps; "
                     "zero them before backward")
    losses = [float(s.call("dpo_step", policy, opt, batch, ref_c, ref_r, beta)) for _ in range(10)]
    if not losses[-1] < LN2 - 0.05:
        raise Failed(f"after 12 steps the loss is still {losses[-1]:.3f}, near ln 2")


@_exercise(12, "reference log-probs under no_grad", "05", "reference-model memory")
def check_reference(s: _Student) -> None:
    torch = _torch()
    batch = toy_batch(5)
    ref_model = TinyLM(seed=2)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = s.call("reference_logps", ref_model, batch)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise Failed("`reference_logps` must return (chosen_logps, rejected_logps)")
    want_c, want_r = _batch_logps(ref_model, batch)
    got_c = _shape_is(out[0], (4,), "reference_logps")
    got_r = _shape_is(out[1], (4,), "reference_logps")
    if not (_close(got_c, want_c, 1e-4) and _close(got_r, want_r, 1e-4)):
        raise Failed("your reference log-probs differ from the summed completion log-probs (shift by one, "
                     "labels -100 on prompt and padding)")
    if sum(saved) > 0:
        raise Failed(f"your reference forward kept {sum(saved)} bytes of activations for a backward that never "
                     f"comes (.detach() afterwards is too late: the graph was already built); run it so that "
                     f"autograd records nothing")
    if any(getattr(t, "requires_grad", False) for t in out):
        raise Failed("the reference log-probs require grad: they must be constants")


def _frontier(policy_logps, ref_logps, rewards):
    return float(np.mean(rewards)), float(np.mean(policy_logps - ref_logps))


@_exercise(13, "a beta sweep: reward and KL, read correctly", "05", "which way beta works")
def check_frontier(s: _Student) -> None:
    rng = np.random.default_rng(13)
    pl, rl, rw = -rng.uniform(2, 9, size=50), -rng.uniform(2, 12, size=50), rng.integers(-2, 4, size=50)
    out = s.call("frontier_point", _t(pl), _t(rl), _t(rw.astype(float)))
    if not (isinstance(out, tuple) and len(out) == 2):
        raise Failed("`frontier_point` must return (mean_reward, kl)")
    got_r, got_kl = float(_np(out[0])), float(_np(out[1]))
    want_r, want_kl = _frontier(pl, rl, rw)
    if not math.isclose(got_r, want_r, rel_tol=1e-6):
        raise Failed(f"mean reward {got_r:.4g}, expected the mean of the samples' rewards {want_r:.4g}")
    if not math.isclose(got_kl, want_kl, rel_tol=1e-6):
        if math.isclose(got_kl, -want_kl, rel_tol=1e-6):
            raise Failed("KL(pi || pi_ref) = E_{y~pi}[log pi - log pi_ref]: yours has the opposite sign")
        raise Failed(f"KL {got_kl:.4g}, expected the Monte-Carlo estimate E_y~pi[log pi(y|x) - log pi_ref(y|x)]")
    _choice(s, "closest_beta", (0.05, 0.5, 5.0), 5.0,
            "read the KL column: the policy closest to pi_ref has the smallest KL. beta is the price of each nat")
    _choice(s, "verdict_002", ("holds", "wrong"), "wrong",
            "compare the tutorial's sentence with the KL you measured for each beta")


# ---------------------------------------------------------------------------------------------------------------
# Notebook 06: variants


def _plackett_luce(u, beta):
    """-sum_k log( exp(beta u_k) / sum_{j >= k} exp(beta u_j) ), responses ranked best first."""
    z = beta * np.asarray(u, dtype=np.float64)
    k = z.shape[-1]
    total = np.zeros(z.shape[:-1])
    for i in range(k - 1):
        rest = z[..., i:]
        m = rest.max(-1)
        total -= z[..., i] - (m + np.log(np.exp(rest - m[..., None]).sum(-1)))
    return total


@_exercise(14, "the Plackett-Luce loss for K ranked responses", "06")
def check_plackett_luce(s: _Student) -> None:
    rng = np.random.default_rng(14)
    u = rng.normal(size=(5, 4)) * 3  # log-ratios log pi/pi_ref, each row ranked best first
    beta = 0.5
    got = _shape_is(s.call("plackett_luce_loss", _t(u), beta), (5,), "plackett_luce_loss")
    want = _plackett_luce(u, beta)
    if not _close(got, want):
        z = beta * u
        all_k = -np.sum(z[:, :-1] - np.log(np.exp(z).sum(-1, keepdims=True)), -1)
        if _close(got, all_k) or _close(got, all_k - (z[:, -1] - np.log(np.exp(z).sum(-1)))):
            raise Failed("the k-th choice is made among the responses still left (j >= k), not among all K")
        if _close(got, _plackett_luce(u[:, ::-1], beta)):
            raise Failed("your ranking runs the wrong way: row[0] is the BEST response, chosen first")
        raise Failed("your Plackett-Luce loss differs from the expected value on fixed log-ratios (K = 4)")
    two = _np(s.call("plackett_luce_loss", _t(u[:, :2]), beta))
    if not _close(two, -_logsig(beta * (u[:, 0] - u[:, 1]))):
        raise Failed("with K = 2 the Plackett-Luce loss must be the DPO loss -log sigma(beta (u_1 - u_2))")
    shifted = _np(s.call("plackett_luce_loss", _t(u + 7.0), beta))
    if not _close(shifted, want):
        raise Failed("adding the same constant to every response's log-ratio (what beta log Z(x) does) must not "
                     "change the loss")


@_exercise(15, "IPO's loss and where IPO and cDPO stop", "06")
def check_ipo(s: _Student) -> None:
    pc, pr, rc, rr = _fixed_logps(15)
    h = (pc - rc) - (pr - rr)
    for beta in (0.1, 1.0):
        got = _shape_is(s.call("ipo_loss", _t(pc), _t(pr), _t(rc), _t(rr), beta), (6,), "ipo_loss")
        want = (h - 1 / (2 * beta)) ** 2
        if not _close(got, want):
            if _close(got, (h - beta / 2) ** 2):
                raise Failed("the IPO target margin is 1/(2 beta): a SMALLER beta asks for a LARGER margin")
            if _close(got, (beta * h - 0.5) ** 2):
                raise Failed("IPO's square is on h itself, (h - 1/(2 beta))^2 (Azar et al., Eq. 17), not on beta h")
            raise Failed(f"ipo_loss differs from (h - 1/(2 beta))^2 at beta = {beta}")
    for beta, eps in ((0.1, 0.1), (0.5, 0.25)):
        got = float(_np(s.call("cdpo_margin", beta, eps)))
        want = math.log((1 - eps) / eps) / beta
        if not math.isclose(got, want, rel_tol=1e-6):
            if math.isclose(got, math.log((1 - eps) / eps) * beta, rel_tol=1e-6):
                raise Failed("the cDPO loss depends on beta h; solving for h divides by beta")
            raise Failed(f"cdpo_margin({beta}, {eps}) = {got:.4g}: set the derivative of "
                         f"-(1-eps) log sigma(beta h) - eps log sigma(-beta h) in h to zero")


# ---------------------------------------------------------------------------------------------------------------
# Notebook 07: a claim checked


def _best_of_n_kl(ref, r, n):
    """Exact KL(pi_bon || pi_ref) for one prompt, ties broken uniformly at random."""
    values = np.unique(r)
    p = np.array([ref[r == v].sum() for v in values])
    cdf = np.cumsum(p)
    below = np.concatenate([[0.0], cdf[:-1]])
    q = cdf ** n - below ** n
    keep = q > 0
    return float(np.sum(q[keep] * np.log(q[keep] / p[keep])))


@_exercise(16, "the best-of-n KL formula, checked", "07")
def check_best_of_n(s: _Student) -> None:
    ref = np.array([0.3, 0.1, 0.2, 0.25, 0.15])
    tied = np.array([0.0, 1.0, 1.0, 0.0, 2.0])
    for r, n in ((tied, 4), (np.array([0.0, 1.0, 2.0, 3.0, 4.0]), 3), (tied, 1)):
        got = float(_np(s.call("best_of_n_kl", _t(ref), _t(r), n)))
        want = _best_of_n_kl(ref, r, n)
        if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9):
            if n == 1:
                raise Failed(f"best-of-1 is pi_ref itself, so its KL is 0; yours is {got:.4g}")
            distinct = _best_of_n_kl(ref, r + 1e-6 * np.arange(5), n)
            if math.isclose(got, distinct, rel_tol=1e-4):
                raise Failed("your KL treats tied rewards as distinct: with ties broken at random the kept "
                             "response's reward value v has probability F(v)^n - F(v-)^n")
            if math.isclose(got, math.log(n) - (n - 1) / n, rel_tol=1e-6):
                raise Failed("you returned the formula log n - (n-1)/n; the exercise asks for the exact KL")
            raise Failed(f"best_of_n_kl = {got:.5g} for n = {n}, expected {want:.5g}")
    _choice(s, "formula_verdict", ("exact", "upper bound", "lower bound"), "upper bound",
            "compare log n - (n-1)/n with your exact values, with and without ties")


# ---------------------------------------------------------------------------------------------------------------
# Grading a namespace, a notebook


def grade_namespace(namespace: dict, numbers: list[int] | None = None) -> list[Result]:
    """Run the checks of the given exercises (all by default) on a namespace of the student's objects."""
    results = []
    for n in numbers if numbers is not None else sorted(EXERCISES):
        if n not in EXERCISES:
            results.append(Result(n, "?", False, f"there is no exercise {n} in this course (tag exercise-{n})"))
            continue
        ex = EXERCISES[n]
        try:
            ex.check(_Student(namespace, n))
        except Failed as f:
            results.append(Result(n, ex.title, False, str(f)))
        except Exception as e:  # noqa: BLE001  (a grader bug must not hide the other rows)
            results.append(Result(n, ex.title, False, f"the check itself failed ({type(e).__name__}: {e})"[:300]))
        else:
            results.append(Result(n, ex.title, True, "ok"))
    return results


def exercise_cells(nb) -> dict[int, int]:
    """{exercise number: index of its cell} from the cells' ``exercise-N`` tags."""
    found = {}
    for i, cell in enumerate(nb.cells):
        for tag in cell.get("metadata", {}).get("tags", []):
            m = TAG.match(tag)
            if m:
                found[int(m.group(1))] = i
    return found


def _read(path: str | Path):
    import nbformat

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such notebook")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:  # noqa: BLE001
        raise NotAnExerciseNotebook(f"{path} is not a readable notebook ({type(e).__name__})") from None
    cells = exercise_cells(nb)
    if not cells:
        raise NotAnExerciseNotebook(f"{path} has no cells tagged exercise-N: not an exercise notebook")
    return nb, cells


def _annotate(results: list[Result], cells: dict[int, int], errors: dict[int, str]) -> list[Result]:
    """Say when an exercise's own cell raised: a stub left in place, or an error to fix first."""
    for res in results:
        err = errors.get(cells.get(res.number, -1))
        if res.passed or not err:
            continue
        if err.startswith("NotImplementedError"):
            if "stub" not in res.message:
                res.message = "still the stub: its cell raises NotImplementedError; " + res.message
        elif err.startswith("KeyboardInterrupt"):  # interrupt_on_timeout: the cell ran past the time limit
            res.message = "its cell ran past the time limit (--timeout) and was stopped; " + res.message
        else:
            res.message = f"its cell raised {err}; " + res.message
    return results


def run_in_process(path: str | Path) -> list[Result]:
    """Execute the notebook's code cells in one fresh namespace in THIS process, then grade.

    No kernel: faster (torch is imported once for many notebooks), used by the tests. Cells must be plain Python
    (the exercise notebooks have no magics). A failing cell is recorded and the next one runs, as in the kernel.
    """
    import contextlib
    import io
    import os

    nb, cells = _read(path)
    namespace: dict = {"__name__": "__main__"}
    errors: dict[int, str] = {}
    cwd = os.getcwd()
    os.chdir(Path(path).resolve().parent)
    try:
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(cell.source, f"<cell {i}>", "exec"), namespace)  # noqa: S102
            except Exception as e:  # noqa: BLE001
                errors[i] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    finally:
        os.chdir(cwd)
    return _annotate(grade_namespace(namespace, sorted(cells)), cells, errors)


def grade_notebook(path: str | Path, timeout: int = 300) -> list[Result]:
    """Run the notebook in a fresh kernel (nbclient, errors allowed), then grade in that same kernel."""
    import nbformat
    from nbclient import NotebookClient

    nb, cells = _read(path)
    numbers = sorted(cells)
    source = (f"import json as _json, minidpo.grading as _grading\n"
              f"print({MARKER!r} + _json.dumps([_grading.asdict(r) for r in "
              f"_grading.grade_namespace(globals(), {numbers!r})]))")
    nb.cells.append(nbformat.v4.new_code_cell(source))
    import subprocess

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True, interrupt_on_timeout=True,
                            startup_timeout=180,  # a busy shared machine can take a minute to start a kernel
                            resources={"metadata": {"path": str(Path(path).resolve().parent)}})
    # The kernel's own stderr is start-up chatter (a warning about local TCP); the cells' errors come back as
    # outputs, so the table is all a teacher sees.
    client.execute(stderr=subprocess.DEVNULL)
    errors: dict[int, str] = {}
    for i, cell in enumerate(nb.cells[:-1]):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                first = str(out.get("evalue", "")).splitlines()[0] if out.get("evalue") else ""
                errors[i] = f"{out.get('ename')}: {first}"[:200]
    text = "".join(o.get("text", "") for o in nb.cells[-1].get("outputs", []) if o.get("output_type") == "stream")
    if MARKER not in text:
        tail = [o for o in nb.cells[-1].get("outputs", []) if o.get("output_type") == "error"]
        why = f"{tail[0].get('ename')}: {tail[0].get('evalue')}" if tail else "no output"
        raise RuntimeError(f"the grading cell did not report ({why})")
    rows = json.loads(text.split(MARKER, 1)[1].strip().splitlines()[0])
    return _annotate([Result(**row) for row in rows], cells, errors)


def format_table(results: list[Result], width: int = 100) -> str:
    """One row per exercise: number, title, PASS/FAIL, the hint (wrapped)."""
    import textwrap

    lines = [f"{'#':>3}  {'exercise':<52}  result", "-" * width]
    for r in results:
        lines.append(f"{r.number:>3}  {r.title[:52]:<52}  {'passed' if r.passed else 'FAILED'}")
        if not r.passed:
            lines += textwrap.wrap(r.message, width - 7, initial_indent="       ", subsequent_indent="       ")
    passed = sum(r.passed for r in results)
    lines += ["-" * width, f"{passed}/{len(results)} exercises passed"]
    return "\n".join(lines)


__all__ = ["EXERCISES", "Exercise", "Failed", "NotAnExerciseNotebook", "Result", "TinyLM", "asdict",
           "exercise_cells", "format_table", "grade_namespace", "grade_notebook", "run_in_process", "toy_batch"]
