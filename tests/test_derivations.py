"""Every step of the book chapter's three derivations (eq:* labels) and of the theory the course adds, asserted
through derivations.py -- and, for every step, a negative control: a plausible wrong step that the same check
must reject. A check that cannot fail proves nothing."""

import pytest
import sympy as sp

from minidpo import derivations as D

NAMES = D.check_names()


@pytest.fixture(scope="module")
def steps():
    """Each check runs once per session (sympy's simplify is the slow part)."""
    return {check.__name__: check() for check in D.ALL_CHECKS}


@pytest.mark.parametrize("name", NAMES)
def test_every_derivation_step_holds(steps, name):
    step = steps[name]
    assert step.holds, str(step)
    assert step.method in ("sympy", "numeric", "definitional", "assumption")


@pytest.mark.parametrize("name", sorted(D.NEGATIVE_CONTROLS))
def test_every_negative_control_is_rejected(name):
    description, control = D.NEGATIVE_CONTROLS[name]
    step = control()
    assert not step.holds, f"{name}: the wrong step '{description}' passed: {step}"


def test_every_check_has_a_negative_control():
    assert set(NAMES) <= {name.split(" ")[0] for name in D.NEGATIVE_CONTROLS}


def test_the_chapter_is_covered_label_by_label(steps):
    labels = {step.label.split()[0] for step in steps.values()}
    chapter = {f"eq:dpo_deriv_{i}" for i in range(1, 11)} | {
        "eq:dpo_partition", "eq:dpo_opt_policy", "eq:bradley_terry_dpo", "eq:dpo_reward_full",
        "eq:dpo_loss_deriv0", "eq:dpo_loss_deriv1", "eq:dpo_loss_deriv2", "eq:dpo_loss_deriv3", "eq:dpo_core",
        "eq:dpo_reward", "eq:dpo_grad_0", "eq:dpo_grad_2", "eq:dpo_grad_3", "eq:dpo_gradient"}
    assert chapter <= labels, chapter - labels


def test_canonical_steps_are_detected_and_not_counted(steps):
    # sympy cancels these on construction: the difference is 0 before simplify ever runs
    for name in ("check_dpo_deriv_7", "check_dpo_deriv_8", "check_dpo_loss_deriv0", "check_dpo_grad_0"):
        assert steps[name].canonical and not steps[name].counts, name
    # ... and these need simplify, so they count
    for name in ("check_dpo_deriv_9", "check_dpo_deriv_5", "check_dpo_loss_deriv1", "check_dpo_grad_3"):
        assert not steps[name].canonical and steps[name].counts, name
    assert D.is_canonical_zero(sp.Symbol("a") - sp.Symbol("a"))
    a = sp.Symbol("a", positive=True)
    assert not D.is_canonical_zero(sp.log(a ** 2) - 2 * sp.log(a))  # true, but only simplify sees it


def test_the_summary_counts_what_it_says(steps):
    summary = D.summary()
    assert summary["steps"] == len(NAMES)
    assert summary["counted"] == sum(s.counts for s in steps.values())
    assert summary["counted"] >= 40 and summary["canonical"] >= 5


def test_the_general_n_steps_cover_the_optimal_policy_derivation(steps):
    labels = {steps[name].label for name in NAMES if "(any n)" in steps[name].label}
    assert {f"eq:dpo_deriv_{i} (any n)" for i in (1, 2, 3, 4, 5, 10)} <= labels
    assert {"eq:dpo_partition (any n)", "eq:dpo_opt_policy (any n)"} <= labels


def test_step_10_for_any_n_reduces_to_the_simplex_condition():
    s = D.indexed_symbols()
    difference = sp.simplify(D.ANY_N_FORMS["10"](s) - D.ANY_N_FORMS["5"](s))
    assert sp.simplify(difference - (s.sum(s.pi[s.y]) - 1) * sp.log(s.Z)) == 0


def test_beta_positive_is_used_not_read_back():
    # the minimiser half of step 4 is decided by the sign beta is declared with, through the curvature of (3)
    assert D.check_dpo_deriv_4().holds
    assert not D.check_dpo_deriv_4(D.dpo_deriv_4, "negative").holds
    w = D.with_beta(D.finite_world(1, 2), real=True)  # sign unknown: the curvature cannot be proved positive
    assert not D.is_convex_in_pi(D.dpo_deriv_3(w), w)


def test_lagrangian_solution_is_a_distribution_at_numbers():
    solved, (pi, ref, r, beta) = D.lagrangian_optimum()
    numbers = {ref[0]: 0.5, ref[1]: 0.3, ref[2]: 0.2, r[0]: 1.0, r[1]: -0.5, r[2]: 2.0, beta: 0.7}
    values = [float(p.subs(numbers)) for p in solved]
    assert sum(values) == pytest.approx(1.0, abs=1e-12)
    assert max(range(3), key=values.__getitem__) == 2  # the highest reward gets the most mass at this beta


def test_gibbs_inequality_is_numeric_and_tight():
    step = D.check_gibbs_inequality(n_policies=300, seed=1)
    assert step.holds and step.method == "numeric"


def test_counterexample_respects_assumptions_and_finds_differences():
    a, b = sp.symbols("a b", positive=True)
    assert D.counterexample(sp.log(a * b) - sp.log(a) - sp.log(b)) is None  # an identity for positive a, b
    found = D.counterexample(sp.log(a + b) - sp.log(a) - sp.log(b))
    assert found is not None and found["a"] > 0 and found["b"] > 0 and abs(found["difference"]) > 1e-8


def test_ipo_target_matches_the_ipo_paper():
    p, beta = sp.Symbol("p", positive=True), sp.Symbol("beta", positive=True)
    margin = D.psi_po_optimal_margin(lambda q: q, p, beta)
    assert sp.simplify(margin - (2 * p - 1) / (2 * beta)) == 0
    assert sp.simplify(margin.subs(p, 1) - 1 / (2 * beta)) == 0


# check_step: a user's own step ---------------------------------------------------------------------------------


def test_check_step_holds():
    x = sp.Symbol("x", real=True)
    result = D.check_step(sp.exp(x) / (sp.exp(x) + 1), 1 / (1 + sp.exp(-x)))
    assert result.verdict == "holds" and bool(result) and not result.canonical


def test_check_step_reports_canonical_decisions():
    a, b = sp.symbols("a b")
    result = D.check_step(a + b, b + a)
    assert result.verdict == "holds" and result.canonical


def test_check_step_holds_given_assumptions_and_shows_they_are_needed():
    a, b = sp.symbols("a b")
    result = D.check_step(sp.log(a * b), sp.log(a) + sp.log(b), assumptions=[a > 0, b > 0])
    assert result.verdict == "holds given" and result.given == ("a > 0", "b > 0")
    assert result.counterexample is not None  # without the assumptions: a counterexample (negative a, b)
    assert D.check_step(sp.log(a * b), sp.log(a) + sp.log(b)).verdict == "differs"  # the same step, no assumptions


def test_check_step_uses_an_equality_constraint():
    p1, p2 = sp.symbols("p1 p2", positive=True)
    Z = sp.Symbol("Z", positive=True)
    before = p1 * (sp.log(p1) - sp.log(Z)) + p2 * (sp.log(p2) - sp.log(Z))
    after = p1 * sp.log(p1) + p2 * sp.log(p2) - sp.log(Z)  # step (10): needs p1 + p2 = 1
    assert D.check_step(before, after, assumptions=[sp.Eq(p2, 1 - p1)]).verdict == "holds given"
    assert D.check_step(before, after).verdict == "differs"


def test_check_step_rejects_a_wrong_step_with_a_counterexample():
    pi, ref, beta = sp.symbols("pi pi_ref beta")
    r = sp.Symbol("r", real=True)
    wrong = D.check_step(sp.log(pi / ref) - r / beta, sp.log(pi / (ref * sp.exp(-r / beta))),
                         assumptions=[pi > 0, ref > 0, beta > 0])
    assert wrong.verdict == "differs" and not wrong
    numbers = {sp.Symbol(k) if k != "r" else r: v for k, v in wrong.counterexample.items() if k != "difference"}
    value = complex((sp.log(pi / (ref * sp.exp(-r / beta))) - sp.log(pi / ref) + r / beta).subs(numbers))
    assert abs(value - wrong.counterexample["difference"]) < 1e-6  # the counterexample is real
    right = D.check_step(sp.log(pi / ref) - r / beta, sp.log(pi / (ref * sp.exp(r / beta))),
                         assumptions=[pi > 0, ref > 0, beta > 0])
    assert right.verdict == "holds given"


def test_check_step_rejects_assumptions_it_cannot_use():
    a, b = sp.symbols("a b")
    with pytest.raises(ValueError, match="not understood"):
        D.check_step(a, a, assumptions=[a > b])


def test_check_step_is_exported():
    import minidpo
    assert minidpo.check_step is D.check_step
