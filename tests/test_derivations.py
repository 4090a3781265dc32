"""Every step of the book chapter's three derivations (seeds/000, eq:* labels), asserted through derivations.py."""

import pytest
import sympy as sp

from minidpo import derivations as D


@pytest.fixture(scope="module")
def steps():
    """Each check runs once per session (sympy's simplify is the slow part)."""
    return {check.__name__: check() for check in D.ALL_CHECKS}


@pytest.mark.parametrize("name", [check.__name__ for check in D.ALL_CHECKS])
def test_every_derivation_step_holds(steps, name):
    step = steps[name]
    assert step.holds, str(step)
    assert step.method in ("sympy", "numeric", "assumption")


def test_the_chapter_is_covered_label_by_label(steps):
    labels = {step.label.split()[0] for step in steps.values()}
    chapter = {f"eq:dpo_deriv_{i}" for i in range(1, 11)} | {
        "eq:dpo_partition", "eq:dpo_opt_policy", "eq:bradley_terry_dpo", "eq:dpo_reward_full",
        "eq:dpo_loss_deriv0", "eq:dpo_loss_deriv1", "eq:dpo_loss_deriv2", "eq:dpo_loss_deriv3", "eq:dpo_core",
        "eq:dpo_reward", "eq:dpo_grad_0", "eq:dpo_grad_2", "eq:dpo_grad_3", "eq:dpo_gradient"}
    assert chapter <= labels, chapter - labels


# Negative controls: the same machinery must say "no" to a wrong step, or a pass would mean nothing.

def test_a_wrong_sign_in_step_5_is_caught():
    w = D.finite_world()
    Z = D.partition_function(w)
    wrong = w.expect(lambda x, y: sp.log(w.pi[x][y] / (w.ref[x][y] * sp.exp(w.r[x][y] / w.beta) / Z[x]))
                     + sp.log(Z[x]))
    assert not D.is_zero(wrong - D.dpo_deriv_4(w))


# (step 10 without sum_y pi = 1 failing is asserted inside check_dpo_deriv_10 itself)


def test_maximising_and_minimising_forms_have_opposite_values():
    # eq:dpo_deriv_2 and eq:dpo_deriv_3 are joined by "=" in the chapter; as values they are negatives.
    w = D.finite_world()
    assert not D.is_zero(D.dpo_deriv_3(w) - D.dpo_deriv_2(w))


def test_a_wrong_gradient_weight_is_caught():
    partials, (lc, lr, rc, rr, beta) = D.loss_partials()
    wrong_weight = beta * D.sigmoid(beta * (lc - rc) - beta * (lr - rr))  # sigma(r_hat_c - r_hat_r): flipped
    assert not D.is_zero(partials["policy_chosen"] + wrong_weight)


def test_lagrangian_solution_is_a_distribution_at_numbers():
    solved, (pi, ref, r, beta) = D.lagrangian_optimum()
    numbers = {ref[0]: 0.5, ref[1]: 0.3, ref[2]: 0.2, r[0]: 1.0, r[1]: -0.5, r[2]: 2.0, beta: 0.7}
    values = [float(p.subs(numbers)) for p in solved]
    assert sum(values) == pytest.approx(1.0, abs=1e-12)
    assert max(range(3), key=values.__getitem__) == 2  # the highest reward gets the most mass at this beta


def test_gibbs_inequality_is_numeric_and_tight():
    step = D.check_gibbs_inequality(n_policies=300, seed=1)
    assert step.holds and step.method == "numeric"
