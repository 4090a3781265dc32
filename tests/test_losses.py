"""Each loss against its paper's formula, written out here independently in numpy float64."""

import math

import numpy as np
import pytest
import torch

import minidpo
from minidpo.losses import kto_loss, orpo_loss, preference_loss, simpo_loss


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def random_logps(seed, n=32):
    g = np.random.default_rng(seed)
    return [g.normal(-20, 5, size=n) for _ in range(4)]


def as_t(*arrays):
    return [torch.tensor(a, dtype=torch.float64) for a in arrays]


def reference_formula(loss_type, pc, pr, rc, rr, beta, eps):
    h = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    if loss_type == "robust":
        return ((1 - eps) * -logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps)
    if loss_type == "apo_zero":
        return (1 - sig(beta * (pc - rc))) + sig(beta * (pr - rr))
    if loss_type == "apo_down":
        return sig(beta * (pc - rc)) + (1 - sig(beta * h))
    raise AssertionError(loss_type)


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down"])
def test_preference_loss_matches_paper_formula(loss_type, beta):
    pc, pr, rc, rr = random_logps(seed=int(beta * 100))
    eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    losses, chosen_rewards, rejected_rewards = preference_loss(
        *as_t(pc, pr, rc, rr), beta=beta, loss_type=loss_type, label_smoothing=eps
    )
    np.testing.assert_allclose(losses.numpy(), reference_formula(loss_type, pc, pr, rc, rr, beta, eps), rtol=1e-10)
    np.testing.assert_allclose(chosen_rewards.numpy(), beta * (pc - rc), rtol=1e-12)
    np.testing.assert_allclose(rejected_rewards.numpy(), beta * (pr - rr), rtol=1e-12)


def test_reference_free_takes_reference_as_zero():
    pc, pr, rc, rr = random_logps(seed=3)
    free, _, _ = preference_loss(*as_t(pc, pr, rc, rr), beta=0.3, reference_free=True)
    np.testing.assert_allclose(free.numpy(), -logsig(0.3 * (pc - pr)), rtol=1e-10)


def test_rewards_are_detached():
    pc, pr, rc, rr = as_t(*random_logps(seed=4))
    pc.requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr)
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


@pytest.mark.parametrize("beta", [0.05, 0.5, 3.0])
def test_dpo_gradient_matches_closed_form(beta):
    # dL/dpc = -beta sigma(-beta h), dL/dpr = +beta sigma(-beta h)  (book chapter, eq:dpo_grad_3)
    pc, pr, rc, rr = as_t(*random_logps(seed=7))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    h = ((pc - pr) - (rc - rr)).detach().numpy()
    np.testing.assert_allclose(pc.grad.numpy(), -beta * sig(-beta * h), rtol=1e-9)
    np.testing.assert_allclose(pr.grad.numpy(), beta * sig(-beta * h), rtol=1e-9)


def test_policy_equal_reference_gives_log2_and_half_accuracy():
    pc, pr, _, _ = as_t(*random_logps(seed=8))
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    np.testing.assert_allclose(losses.numpy(), math.log(2), rtol=1e-12)
    # rewards tie at zero: counted as a coin flip, the accuracy is 0.5
    ties = (chosen_rewards == rejected_rewards).double()
    accuracy = ((chosen_rewards > rejected_rewards).double() + 0.5 * ties).mean()
    assert accuracy.item() == 0.5


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down"])
def test_finite_for_huge_margins(loss_type):
    big = torch.tensor([1e4, -1e4], dtype=torch.float32)
    zero = torch.zeros(2)
    eps = 0.2 if loss_type in ("sigmoid", "robust") else 0.0
    for sign in (1, -1):
        losses, _, _ = preference_loss(sign * big, zero, zero, zero, beta=1.0, loss_type=loss_type,
                                       label_smoothing=eps)
        assert torch.isfinite(losses).all(), (loss_type, losses)


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (10.0, 1.0), (0.5, 0.0)])
def test_simpo_matches_formula(beta, gamma):
    g = np.random.default_rng(1)
    ac, ar = g.uniform(-4, -0.1, 16), g.uniform(-4, -0.1, 16)
    losses, cr, rr = simpo_loss(*as_t(ac, ar), beta=beta, gamma=gamma)
    np.testing.assert_allclose(losses.numpy(), -logsig(beta * (ac - ar) - gamma), rtol=1e-10)
    np.testing.assert_allclose(cr.numpy(), beta * ac)
    np.testing.assert_allclose(rr.numpy(), beta * ar)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_formula(beta):
    g = np.random.default_rng(2)
    ac, ar = g.uniform(-5, -0.01, 16), g.uniform(-5, -0.01, 16)
    log_odds_expected = (ac - np.log(1 - np.exp(ac))) - (ar - np.log(1 - np.exp(ar)))
    losses, log_odds = orpo_loss(*as_t(ac, ar), beta=beta)
    np.testing.assert_allclose(log_odds.numpy(), log_odds_expected, rtol=1e-9)
    np.testing.assert_allclose(losses.numpy(), -beta * logsig(log_odds_expected), rtol=1e-9)


def test_orpo_finite_near_probability_one():
    losses, log_odds = orpo_loss(torch.tensor([0.0, -1e-9]), torch.tensor([-3.0, -3.0]))
    assert torch.isfinite(losses).all() and torch.isfinite(log_odds).all()


@pytest.mark.parametrize("beta,lam_d,lam_u,z0", [(0.1, 1.0, 1.0, 0.0), (0.5, 1.33, 1.0, 2.5), (2.0, 1.0, 0.7, 0.3)])
def test_kto_matches_formula(beta, lam_d, lam_u, z0):
    g = np.random.default_rng(5)
    p, r = g.normal(-20, 3, 20), g.normal(-20, 3, 20)
    desirable = g.random(20) < 0.5
    ratio = p - r
    value = np.where(desirable, lam_d * sig(beta * (ratio - z0)), lam_u * sig(beta * (z0 - ratio)))
    expected = np.where(desirable, lam_d, lam_u) - value
    losses, rewards = kto_loss(*as_t(p, r), torch.tensor(desirable), z0, beta=beta,
                               desirable_weight=lam_d, undesirable_weight=lam_u)
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(rewards.numpy(), beta * ratio)


def test_kto_reference_point_carries_no_gradient():
    p = torch.tensor([-3.0, -4.0], requires_grad=True)
    z0 = torch.tensor(0.5, requires_grad=True)
    losses, _ = kto_loss(p, torch.tensor([-3.5, -3.5]), torch.tensor([True, False]), z0)
    losses.sum().backward()
    assert z0.grad is None and p.grad is not None


# ---- bad input: a ValueError that names the problem -----------------------------------------------------

def four(n=3):
    return [torch.zeros(n) for _ in range(4)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta": 0.0}, "beta must be > 0"),
        ({"beta": -1.0}, "beta must be > 0"),
        ({"beta": float("nan")}, "beta must be > 0"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"loss_type": "dpo"}, "unknown loss_type 'dpo'; valid: sigmoid, ipo"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing applies to sigmoid and robust only"),
    ],
)
def test_preference_loss_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preference_loss(*four(), **kwargs)


def test_shape_mismatch_names_the_tensors():
    pc, pr, rc, rr = four()
    with pytest.raises(ValueError, match="shape mismatch: policy_chosen_logps is \\(3,\\) but reference_rejected_logps"):
        preference_loss(pc, pr, rc, torch.zeros(4))
    with pytest.raises(ValueError, match="must have shape \\(B,\\)"):
        preference_loss(pc.view(3, 1), pr.view(3, 1), rc.view(3, 1), rr.view(3, 1))


def test_other_losses_bad_arguments():
    a = torch.full((3,), -1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        simpo_loss(a, a, beta=0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        simpo_loss(a, a, gamma=-1)
    with pytest.raises(ValueError, match="must be <= 0"):
        orpo_loss(a, -a)
    with pytest.raises(ValueError, match="desirable must be a bool tensor"):
        kto_loss(a, a, torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="kl must be one finite number"):
        kto_loss(a, a, torch.ones(3, dtype=torch.bool), float("inf"))


def test_public_api_is_exported():
    for name in ["preference_loss", "simpo_loss", "orpo_loss", "kto_loss", "sequence_logps", "optimal_policy"]:
        assert callable(getattr(minidpo, name)), name
