"""Preference-optimisation objectives, one short branch per paper.

Every function takes per-example sequence log-probs of shape (B,) (see ``logps.py``) and returns per-example
losses, so the caller chooses the reduction. Rewards are ``beta * (policy - reference)`` and detached: they are
for logging (TRL's ``rewards/chosen`` ...), never for the gradient.

Notation used in the docstrings, for a prompt x with chosen y_w and rejected y_l:
    pc, pr = log pi_theta(y_w|x), log pi_theta(y_l|x)      (policy_chosen_logps, policy_rejected_logps)
    rc, rr = log pi_ref(y_w|x),   log pi_ref(y_l|x)        (reference_chosen_logps, reference_rejected_logps)
    h      = (pc - pr) - (rc - rr)                          the difference of log-ratios
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down")
_SMOOTHABLE = ("sigmoid", "robust")  # the losses whose paper defines a label-noise rate


def _check_logps(**tensors: torch.Tensor) -> None:
    """Every argument must be a floating tensor of one shared shape (B,)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first_name, first_shape = next(iter(shapes.items()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must have shape (B,), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor of log-probs, got {t.dtype}")
        if tuple(t.shape) != first_shape:
            raise ValueError(f"shape mismatch: {first_name} is {first_shape} but {name} is {tuple(t.shape)}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {value}")


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paired preference losses on log-ratios. Returns (losses, chosen_rewards, rejected_rewards), each (B,).

    loss_type (the same names as TRL's DPOConfig.loss_type):
      "sigmoid"   DPO, Rafailov et al. 2023, Eq. 7:  -log sigma(beta h).
                  With label_smoothing = eps > 0 it is conservative DPO (cDPO, Mitchell 2023): the label is
                  assumed flipped with probability eps,  -(1-eps) log sigma(beta h) - eps log sigma(-beta h).
      "ipo"       IPO, Azar et al. 2023, Eq. 17:  (h - 1/(2 beta))^2, on summed log-probs as in the paper.
                  (TRL's "ipo" divides the log-probs by the sequence length first; ours does not.)
      "hinge"     SLiC-HF, Zhao et al. 2023, calibration loss with margin 1/beta, scaled by beta:  relu(1 - beta h).
      "robust"    robust DPO, Chowdhury et al. 2024, the unbiased loss under label-flip rate eps:
                  ((1-eps)(-log sigma(beta h)) + eps log sigma(-beta h)) / (1 - 2 eps).
                  Unbiased only where labels ARE flipped at rate eps: on unflipped labels a pair won at rate
                  p > 1 - eps gives an expected loss with no minimiser (it falls without bound as h grows).
      "apo_zero"  APO-zero, D'Oosterlinck et al. 2024: push chosen up and rejected down, each against zero:
                  (1 - sigma(beta (pc - rc))) + sigma(beta (pr - rr)).
      "apo_down"  APO-down, same paper: push both down, the rejected more:
                  sigma(beta (pc - rc)) + (1 - sigma(beta h)).
    reference_free=True takes rc = rr = 0 (the policy is compared with a uniform reference).
    """
    _check_logps(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    _check_positive("beta", beta)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type not in _SMOOTHABLE:
        raise ValueError(f"label_smoothing applies to {' and '.join(_SMOOTHABLE)} only, not {loss_type!r}")

    if reference_free:
        reference_chosen_logps = torch.zeros_like(reference_chosen_logps)
        reference_rejected_logps = torch.zeros_like(reference_rejected_logps)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        losses = ((1 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    else:  # "apo_down"
        losses = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * h))

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO, Meng et al. 2024, Eq. 6: -log sigma(beta (avg_c - avg_r) - gamma). No reference model.

    The reward is the length-normalised log-prob times beta (Eq. 4); gamma is the target margin.
    Returns (losses, chosen_rewards, rejected_rewards), each (B,), rewards detached.
    """
    _check_logps(policy_chosen_avg_logps=policy_chosen_avg_logps, policy_rejected_avg_logps=policy_rejected_avg_logps)
    _check_positive("beta", beta)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    chosen_rewards = beta * policy_chosen_avg_logps  # (B,)
    rejected_rewards = beta * policy_rejected_avg_logps  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term, Hong et al. 2024, Eq. 7: -beta log sigma(log odds(y_w) - log odds(y_l)).

    odds(y) = P(y) / (1 - P(y)) with P(y) = exp(avg log-prob), so log odds = avg - log(1 - exp(avg)).
    The full ORPO objective (Eq. 6) adds the chosen NLL; the trainer does that. Returns (losses, log_odds).
    """
    _check_logps(policy_chosen_avg_logps=policy_chosen_avg_logps, policy_rejected_avg_logps=policy_rejected_avg_logps)
    _check_positive("beta", beta)
    for name, t in (("policy_chosen_avg_logps", policy_chosen_avg_logps),
                    ("policy_rejected_avg_logps", policy_rejected_avg_logps)):
        if (t > 0).any():
            raise ValueError(f"{name} must be <= 0 (they are log-probabilities), got max {t.max().item():.4g}")
    # At avg == 0 (probability 1) the odds are infinite; a hair below keeps the loss finite.
    chosen = policy_chosen_avg_logps.clamp(max=-1e-6)
    rejected = policy_rejected_avg_logps.clamp(max=-1e-6)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))  # (B,)
    losses = -beta * F.logsigmoid(log_odds)
    return losses, log_odds.detach()


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO, Ethayarajh et al. 2024, Eq. 8: losses = lambda_y - v(x, y) on unpaired examples.

    r(x, y) = log pi_theta(y|x) - log pi_ref(y|x), and with the reference point z0 = ``kl``:
        v = lambda_D sigma(beta (r - z0))   if y is desirable
        v = lambda_U sigma(beta (z0 - r))   if y is undesirable
    z0 estimates KL(pi_theta || pi_ref) on mismatched (x, y') pairs; it is detached here, as in the paper,
    so it shifts the value function but carries no gradient (the trainer clamps its estimate at 0).
    ``desirable`` is a bool tensor (B,). Returns (losses, rewards), rewards = beta r, detached.
    """
    _check_logps(policy_logps=policy_logps, reference_logps=reference_logps)
    _check_positive("beta", beta)
    _check_positive("desirable_weight", desirable_weight)
    _check_positive("undesirable_weight", undesirable_weight)
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
        raise ValueError("desirable must be a bool tensor of shape (B,)")
    if desirable.shape != policy_logps.shape:
        raise ValueError(f"shape mismatch: policy_logps is {tuple(policy_logps.shape)} "
                         f"but desirable is {tuple(desirable.shape)}")
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    if z0.numel() != 1 or not torch.isfinite(z0):
        raise ValueError(f"kl must be one finite number (the reference point z0), got {kl}")

    logratios = policy_logps - reference_logps  # (B,)
    value = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(beta * (logratios - z0)),
        undesirable_weight * torch.sigmoid(beta * (z0 - logratios)),
    )
    weight = torch.where(
        desirable, torch.full_like(value, desirable_weight), torch.full_like(value, undesirable_weight)
    )
    return weight - value, beta * logratios.detach()


def kto_reference_point(mismatched_policy_logps: torch.Tensor, mismatched_reference_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean over mismatched pairs of log pi_theta(y'|x) - log pi_ref(y'|x)),
    detached (Ethayarajh et al. 2024, sec. 4.1: y' is another example's output, so (x, y') is a mismatched pair).

    On matched pairs (each y drawn for its own x) the same mean estimates E log pi/pi_ref over the data; where the
    data are pi_ref's samples that is -KL(pi_ref || pi) <= 0, so it would clamp to 0 almost always.
    """
    _check_logps(mismatched_policy_logps=mismatched_policy_logps,
                 mismatched_reference_logps=mismatched_reference_logps)
    return (mismatched_policy_logps - mismatched_reference_logps).detach().mean().clamp(min=0)
