"""The exact world: a few prompts, a finite set of responses, and everything computable in closed form.

Real DPO runs can only estimate how close they got to the RLHF optimum. Here the response set is small, so
pi_ref(y|x) and r(x, y) are tables of shape (P, K) (P prompts, K responses each) and the optimum of the
KL-regularised objective is known exactly:

    pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),   Z(x) = sum_y pi_ref(y|x) exp(r(x, y) / beta)

(the RLHF book's chapter "Direct Alignment Algorithms", eq:dpo_opt_policy and eq:dpo_partition; DPO paper, Rafailov et al. 2023, Eq. 4).
A tabular policy -- one free logit per (prompt, response) -- trained with DPO or IPO on preference pairs drawn
from a Bradley-Terry model can then be compared with pi* exactly, with no sampling error in the comparison.

Everything here works in float64: the point of this world is exact comparisons, and float32's 1e-7 would
blur the small KL values that the "more pairs -> closer to pi*" experiment measures.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .losses import preference_loss

DTYPE = torch.float64


# --------------------------------------------------------------------------------------------------------------
# Closed forms


def _check_beta(beta) -> None:
    b = torch.as_tensor(beta, dtype=DTYPE)
    if torch.isnan(b).any() or not (b > 0).all():  # beta = inf is allowed: it gives pi_ref back
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_tables(reference_probs: torch.Tensor, rewards: torch.Tensor) -> None:
    for name, t in (("reference_probs", reference_probs), ("rewards", rewards)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension (the responses), got a scalar")
    if reference_probs.shape != rewards.shape:
        raise ValueError(f"shape mismatch: reference_probs is {tuple(reference_probs.shape)} "
                         f"but rewards is {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    if (reference_probs < 0).any() or not torch.isfinite(reference_probs).all():
        raise ValueError("reference_probs must be finite and >= 0")
    if not (reference_probs.sum(-1) > 0).all():
        raise ValueError("every row of reference_probs needs some positive mass (sum over the last dim > 0)")


def optimal_policy(reference_probs: torch.Tensor, rewards: torch.Tensor, beta) -> torch.Tensor:
    """pi*(y|x) = pi_ref(y|x) exp(r(x,y)/beta) / Z(x): the maximiser of the KL-regularised objective.

    Book chapter eq:dpo_opt_policy (DPO paper, Eq. 4). Normalised over the last dim; torch in, torch out.
    Computed as softmax(log pi_ref + r / beta) so that a tiny beta (r / beta huge) does not overflow.
    Rows of ``reference_probs`` need not sum to 1: a constant factor per row cancels in Z(x). Responses with
    pi_ref = 0 get pi* = 0 whatever their reward (the optimum never leaves the reference's support).
    ``beta`` is a positive number (``float('inf')`` gives pi_ref) or a tensor that broadcasts against the
    tables with a trailing 1 (for example shape (n_betas, 1, 1) to sweep beta at once).
    """
    _check_tables(reference_probs, rewards)
    _check_beta(beta)
    beta = torch.as_tensor(beta, dtype=rewards.dtype if rewards.is_floating_point() else DTYPE)
    with torch.no_grad():
        log_ref = torch.log(reference_probs.to(beta.dtype))  # log 0 = -inf: zero-probability responses stay 0
        return torch.softmax(log_ref + rewards.to(beta.dtype) / beta, dim=-1)


def log_partition(reference_probs: torch.Tensor, rewards: torch.Tensor, beta) -> torch.Tensor:
    """log Z(x) = log sum_y pi_ref(y|x) exp(r(x,y)/beta), shape (...,) (book chapter eq:dpo_partition).

    beta * log Z(x) is the optimal value of the objective for prompt x (see ``rlhf_objective``).
    """
    _check_tables(reference_probs, rewards)
    _check_beta(beta)
    beta = torch.as_tensor(beta, dtype=DTYPE)
    return torch.logsumexp(torch.log(reference_probs.to(DTYPE)) + rewards.to(DTYPE) / beta, dim=-1)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_y p(y) log(p(y) / q(y)) over the last dim, with 0 log 0 = 0. Shape (...,).

    Infinite where p puts mass on a response that q gives probability 0 (as it should be).
    """
    if p.shape != q.shape:
        raise ValueError(f"shape mismatch: p is {tuple(p.shape)} but q is {tuple(q.shape)}")
    p, q = p.to(DTYPE), q.to(DTYPE)
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(-1)


def rlhf_objective(policy_probs: torch.Tensor, reference_probs: torch.Tensor, rewards: torch.Tensor, beta,
                   prompt_probs: torch.Tensor | None = None) -> torch.Tensor:
    """J(pi) = E_x [ E_{y~pi} r(x,y) - beta KL(pi(.|x) || pi_ref(.|x)) ].

    The KL-regularised RLHF objective, book chapter eq:rlhf_opt_eq_repeat written out as eq:dpo_deriv_1.
    The expectation over prompts uses ``prompt_probs`` (P,), uniform by default. ``policy_probs`` may carry
    leading dims (many policies at once, shape (..., P, K)); the result then has those dims. For any pi,
        J(pi*) - J(pi) = beta E_x KL(pi(.|x) || pi*(.|x)) >= 0       (eq:dpo_deriv_10 and Gibbs' inequality)
    and J(pi*) = beta E_x log Z(x).
    """
    _check_tables(reference_probs, rewards)
    _check_beta(beta)
    if policy_probs.shape[policy_probs.dim() - reference_probs.dim():] != reference_probs.shape:
        raise ValueError(f"shape mismatch: policy_probs is {tuple(policy_probs.shape)} "
                         f"but reference_probs is {tuple(reference_probs.shape)}")
    reference_probs = reference_probs.expand_as(policy_probs)  # leading dims of policy_probs: many policies
    expected_reward = (policy_probs.to(DTYPE) * rewards.to(DTYPE)).sum(-1)
    per_prompt = expected_reward - beta * kl_divergence(policy_probs, reference_probs)
    return _average_over_prompts(per_prompt, prompt_probs)


def _average_over_prompts(per_prompt: torch.Tensor, prompt_probs: torch.Tensor | None) -> torch.Tensor:
    if prompt_probs is None:
        return per_prompt.mean(-1)
    if prompt_probs.shape != per_prompt.shape[-1:]:
        raise ValueError(f"prompt_probs must have shape ({per_prompt.shape[-1]},), got {tuple(prompt_probs.shape)}")
    return (per_prompt * prompt_probs.to(DTYPE)).sum(-1)


def implicit_reward(policy_probs: torch.Tensor, reference_probs: torch.Tensor, beta) -> torch.Tensor:
    """r_hat(x, y) = beta log(pi(y|x) / pi_ref(y|x)), book chapter eq:dpo_reward (DPO paper, Sec. 5).

    For pi = pi* it equals the true reward minus beta log Z(x): a per-prompt shift, which no Bradley-Terry
    probability can see (eq:dpo_loss_deriv1).
    """
    _check_beta(beta)
    return beta * (torch.log(policy_probs.to(DTYPE)) - torch.log(reference_probs.to(DTYPE)))


def bradley_terry_matrix(rewards: torch.Tensor) -> torch.Tensor:
    """p(y_i > y_j | x) = sigma(r_i - r_j) for every pair, shape (..., K, K) (book chapter eq:bradley_terry_dpo)."""
    return torch.sigmoid(rewards.to(DTYPE).unsqueeze(-1) - rewards.to(DTYPE).unsqueeze(-2))


# --------------------------------------------------------------------------------------------------------------
# The world and its preference data


@dataclass
class ExactWorld:
    """pi_ref and r as (P, K) tables, and the prompt distribution d(x) as (P,)."""

    reference_probs: torch.Tensor
    rewards: torch.Tensor
    prompt_probs: torch.Tensor

    @property
    def n_prompts(self) -> int:
        return self.reference_probs.shape[0]

    @property
    def n_responses(self) -> int:
        return self.reference_probs.shape[1]

    def optimal_policy(self, beta) -> torch.Tensor:
        return optimal_policy(self.reference_probs, self.rewards, beta)

    def objective(self, policy_probs: torch.Tensor, beta) -> torch.Tensor:
        return rlhf_objective(policy_probs, self.reference_probs, self.rewards, beta, self.prompt_probs)


def make_world(n_prompts: int = 3, n_responses: int = 5, seed: int = 0, reward_scale: float = 1.0,
               reference_temperature: float = 1.0) -> ExactWorld:
    """A random exact world: pi_ref = softmax(N(0,1) / temperature), r ~ reward_scale * N(0,1), d(x) uniform.

    Rewards are continuous, so ties (which would make "the best response" ambiguous) have probability 0.
    """
    if n_prompts < 1 or n_responses < 2:
        raise ValueError(f"need n_prompts >= 1 and n_responses >= 2, got {n_prompts} and {n_responses}")
    if not reference_temperature > 0:
        raise ValueError(f"reference_temperature must be > 0, got {reference_temperature}")
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_prompts, n_responses, generator=gen, dtype=DTYPE) / reference_temperature
    rewards = reward_scale * torch.randn(n_prompts, n_responses, generator=gen, dtype=DTYPE)
    return ExactWorld(
        reference_probs=torch.softmax(logits, dim=-1),
        rewards=rewards,
        prompt_probs=torch.full((n_prompts,), 1.0 / n_prompts, dtype=DTYPE),
    )


@dataclass
class PreferencePairs:
    """n preference pairs as index tensors, each (n,): prompt x, chosen y_w, rejected y_l."""

    prompt: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor

    def __len__(self) -> int:
        return self.prompt.numel()

    def counts(self, n_prompts: int, n_responses: int) -> torch.Tensor:
        """How often each (x, y_w, y_l) occurs, shape (P, K, K)."""
        flat = (self.prompt * n_responses + self.chosen) * n_responses + self.rejected
        counts = torch.bincount(flat, minlength=n_prompts * n_responses * n_responses)
        return counts.reshape(n_prompts, n_responses, n_responses)


def sample_pairs(world: ExactWorld, n_pairs: int, seed: int = 0, deterministic: bool = False,
                 flip_rate: float = 0.0) -> PreferencePairs:
    """Draw preference pairs the way the DPO paper builds its data: x ~ d(x), two different responses from
    pi_ref(.|x), then a label. Bradley-Terry labels (eq:bradley_terry_dpo): y1 wins with probability
    sigma(r(x,y1) - r(x,y2)). ``deterministic=True``: the higher reward always wins (the setting where IPO's
    authors show DPO overfits).

    The two responses are distinct (a pair of identical responses carries no information and no gradient).
    ``flip_rate`` = eps: then each label is flipped with probability eps, on top of Bradley-Terry or of the
    deterministic labels (the noise model of cDPO and robust DPO). The flips use their own random stream, so
    the same seed gives the same pairs and clean labels whatever eps is; only the flipped ones differ.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    if not 0.0 <= flip_rate < 0.5:
        raise ValueError(f"flip_rate must be in [0, 0.5), got {flip_rate}")
    gen = torch.Generator().manual_seed(seed)
    prompt = _sample_rows(world.prompt_probs.expand(n_pairs, -1), gen)
    ref = world.reference_probs[prompt].to(DTYPE)  # (n, K)
    first = _sample_rows(ref, gen)
    second = _sample_rows(ref.scatter(1, first[:, None], 0.0), gen)  # a different response from the first

    r_first = world.rewards[prompt, first]
    r_second = world.rewards[prompt, second]
    if deterministic:
        first_wins = r_first > r_second
    else:
        first_wins = torch.rand(n_pairs, generator=gen, dtype=DTYPE) < torch.sigmoid(r_first - r_second)
    if flip_rate > 0:
        flip_gen = torch.Generator().manual_seed(seed + 7_919)  # a stream of its own: the clean labels stay put
        first_wins = first_wins ^ (torch.rand(n_pairs, generator=flip_gen, dtype=DTYPE) < flip_rate)
    chosen = torch.where(first_wins, first, second)
    rejected = torch.where(first_wins, second, first)
    return PreferencePairs(prompt=prompt, chosen=chosen, rejected=rejected)


# --------------------------------------------------------------------------------------------------------------
# Tabular DPO / IPO


def _sample_rows(weights: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One index per row of (n, K) non-negative weights, by inverting the row's CDF (several times faster than
    torch.multinomial for many short rows)."""
    cdf = weights.to(DTYPE).cumsum(-1)
    u = torch.rand(weights.shape[0], 1, generator=gen, dtype=DTYPE) * cdf[:, -1:]
    # the first index whose CDF exceeds u; a zero-weight column never qualifies (its CDF equals its left one)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=weights.shape[1] - 1)


@dataclass
class TabularResult:
    """A trained tabular policy: probs (P, K), the loss after each step, and pi_theta of every step if kept."""

    probs: torch.Tensor
    losses: list[float]
    history: list[torch.Tensor] = field(default_factory=list)


def train_tabular(world: ExactWorld, pairs: PreferencePairs, beta: float, loss_type: str = "sigmoid",
                  steps: int = 300, lr: float = 0.5, label_smoothing: float = 0.0, optimizer: str = "lbfgs",
                  keep_history: bool = False) -> TabularResult:
    """Fit a tabular policy pi_theta(y|x) = softmax(theta[x])_y to preference pairs, full batch.

    The loss is ``minidpo.preference_loss`` (DPO: loss_type "sigmoid", book chapter eq:dpo_core; IPO: "ipo"),
    fed the log-probs of the tabular policy: with one "token" per response, log pi_theta(y|x) is simply
    log_softmax(theta[x])[y]. theta starts at log pi_ref, so training starts at pi_theta = pi_ref.

    Identical pairs are grouped: the loss is evaluated once per distinct (x, y_w, y_l) and weighted by how
    often it occurs, which equals the mean over the list of pairs but costs O(P K^2) per step, not O(n).
    Both losses are convex in theta (log pi(y_w|x) - log pi(y_l|x) = theta[x, y_w] - theta[x, y_l] is linear),
    so full-batch L-BFGS reaches the minimiser of the empirical loss in tens of steps (it stops early once the
    loss stops changing, so ``losses`` may be shorter than ``steps``); ``optimizer="adam"`` gives the plain
    first-order trajectory instead, always ``steps`` long (``lr`` is then Adam's step size).
    """
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    counts = pairs.counts(world.n_prompts, world.n_responses).to(DTYPE)
    x, yw, yl = counts.nonzero(as_tuple=True)  # the distinct pairs
    weights = counts[x, yw, yl] / counts.sum()
    log_ref = torch.log(world.reference_probs.to(DTYPE))

    theta = log_ref.clone().requires_grad_(True)

    def loss_fn() -> torch.Tensor:
        log_pi = torch.log_softmax(theta, dim=-1)
        losses, _, _ = preference_loss(log_pi[x, yw], log_pi[x, yl], log_ref[x, yw], log_ref[x, yl],
                                       beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        return (weights * losses).sum()

    if optimizer == "lbfgs":
        # max_eval: the line search needs room (its default, max_iter * 5 // 4 = 1, stalls ill-conditioned fits)
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=1, max_eval=10, history_size=20,
                                line_search_fn="strong_wolfe")
    else:
        opt = torch.optim.Adam([theta], lr=lr)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    losses, history = [], []
    with _single_thread():
        for _ in range(steps):
            loss = opt.step(closure)
            losses.append(float(loss.detach()))
            if keep_history:
                history.append(torch.softmax(theta.detach(), -1).clone())
            if optimizer == "lbfgs" and len(losses) > 1 and abs(losses[-2] - losses[-1]) < 1e-14:
                break  # converged: the loss no longer moves at float64 precision
    probs = torch.softmax(theta.detach(), dim=-1)
    return TabularResult(probs=probs, losses=losses, history=history)


@contextlib.contextmanager
def _single_thread():
    """Run tiny (P x K) tensor ops on one thread: on a busy machine, waking a second thread for a 15-element
    softmax costs far more than the work (measured: 6 s instead of 0.05 s for one fit on 2 shared cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def kl_to_optimum(world: ExactWorld, policy_probs: torch.Tensor, beta: float) -> float:
    """E_x KL(pi*(.|x) || pi_theta(.|x)) under d(x): how far a trained policy is from the exact optimum."""
    per_prompt = kl_divergence(world.optimal_policy(beta), policy_probs)
    return float(_average_over_prompts(per_prompt, world.prompt_probs))


def random_policies(n: int, n_prompts: int, n_responses: int, seed: int = 0,
                    concentration: float = 1.0) -> torch.Tensor:
    """n random tabular policies (n, P, K), each row drawn from a symmetric Dirichlet(concentration)."""
    if not concentration > 0:
        raise ValueError(f"concentration must be > 0, got {concentration}")
    with torch.random.fork_rng(devices=[]):  # a seeded draw that leaves the caller's global RNG untouched
        torch.manual_seed(seed)
        alpha = torch.full((n_prompts, n_responses), concentration, dtype=DTYPE)
        return torch.distributions.Dirichlet(alpha).sample((n,))


__all__ = [
    "optimal_policy", "log_partition", "kl_divergence", "rlhf_objective", "implicit_reward",
    "bradley_terry_matrix", "ExactWorld", "make_world", "PreferencePairs", "sample_pairs", "TabularResult",
    "train_tabular", "kl_to_optimum", "random_policies",
]


# --------------------------------------------------------------------------------------------------------------
# Where DPO and IPO stop on a finite set of pairs (notebook 06)


def ipo_optimum(world: ExactWorld, pairs: PreferencePairs, beta: float) -> torch.Tensor:
    """The tabular policy that minimises the empirical IPO loss on ``pairs``, in closed form. Shape (P, K).

    With u(x, y) = log pi(y|x) - log pi_ref(y|x), IPO (Azar et al. 2023, Eq. 17) minimises
        sum over pairs  (u(x, y_w) - u(x, y_l) - tau)^2,     tau = 1 / (2 beta),
    a linear least-squares problem. Setting the gradient to zero gives, for each prompt, L u = b with L the
    Laplacian of the comparison graph (edge weight = how often two responses were compared) and
    b_y = tau (wins of y - losses of y). The solution is unique up to a constant on each connected set of
    compared responses; the one returned (pinv, minimum norm: u averages 0 over each connected set, and
    never-compared responses keep u = 0) is where gradient descent from pi_ref ends, since every step keeps those
    averages at 0; Adam (``train_tabular(..., loss_type="ipo", optimizer="adam")``) lands there too (tested). The
    target is finite even when labels are deterministic, and it moves with beta: that is IPO's point.
    """
    _check_beta(beta)
    counts = pairs.counts(world.n_prompts, world.n_responses).to(DTYPE)  # (P, K, K): [x, winner, loser]
    weights = counts / counts.sum()
    tau = 1.0 / (2.0 * float(beta))
    sym = weights + weights.transpose(-1, -2)  # how often y and y' met, either way round
    laplacian = torch.diag_embed(sym.sum(-1)) - sym  # (P, K, K)
    b = tau * (weights.sum(-1) - weights.sum(-2))  # (P, K): tau (wins - losses)
    u = (torch.linalg.pinv(laplacian, hermitian=True) @ b.unsqueeze(-1)).squeeze(-1)  # (P, K)
    return torch.softmax(torch.log(world.reference_probs.to(DTYPE)) + u, dim=-1)


def dpo_optimum_exists(world: ExactWorld, pairs: PreferencePairs) -> torch.Tensor:
    """Whether the empirical DPO loss on ``pairs`` has a finite minimiser, per prompt: bool (P,).

    DPO's loss is the Bradley-Terry negative log-likelihood in u = log pi / pi_ref, so its minimiser exists exactly
    when the Bradley-Terry maximum-likelihood estimate does (Zermelo 1929; Ford 1957): among the responses that
    were compared, every one must have beaten, directly or through a chain of wins, every other one. If some
    response never loses to the others of its group (deterministic labels on a total order, for a start), the loss
    keeps falling as its margin grows, and training drives the responses below it towards probability 0 for
    every beta. A prompt with no pairs counts as True (nothing pulls it anywhere).
    """
    counts = pairs.counts(world.n_prompts, world.n_responses)  # (P, K, K): [x, winner, loser]
    beats = counts > 0
    compared = (beats | beats.transpose(-1, -2)).any(-1)  # (P, K): took part in some pair
    eye = torch.eye(world.n_responses, dtype=torch.bool).expand_as(beats)
    reach = (beats | eye).to(torch.float64)
    for _ in range(max(1, (world.n_responses - 1).bit_length())):  # transitive closure by squaring
        reach = ((reach @ reach) > 0).to(torch.float64)
    reach = reach > 0
    both_ways = reach & reach.transpose(-1, -2)
    need = compared.unsqueeze(-1) & compared.unsqueeze(-2)  # both took part
    return (both_ways | ~need).all(-1).all(-1)


__all__ += ["ipo_optimum", "dpo_optimum_exists"]


# --------------------------------------------------------------------------------------------------------------
# Where the probability goes: a feature world and a log-linear policy (notebook 04, preference displacement)

# Per mood, the probabilities of a (positive, negative, neutral) word: the same table as ``minidpo.world.MOODS``
# (bandit imports nothing of ours but ``losses``; a test keeps the two equal).
REVIEW_MOODS = {"positive": (0.7, 0.1, 0.2), "negative": (0.1, 0.7, 0.2), "mixed": (0.35, 0.35, 0.3)}


def make_review_world(max_words: int = 3, length_probs=(0.6, 0.3, 0.1)) -> tuple[ExactWorld, torch.Tensor, list[str]]:
    """The synthetic world's reviews shrunk to an exact world: returns (world, features (K, 3), names).

    A response is a bag of 1..``max_words`` adjectives, described by its counts (n_pos, n_neg, n_neutral): the
    features. Its name writes them as "+", "-", "0" ("++-" = two positive words and one negative). There is one
    prompt per mood of ``REVIEW_MOODS``; pi_ref(y|x) = P(length) * multinomial(counts | the mood's word
    probabilities), so a positive prompt is mostly continued positively, as the SFT model of ``minidpo.world``
    does. The reward is that of ``minidpo.world.reward``: r(y) = n_pos - n_neg. K = 19 for three words.
    """
    if max_words < 1 or len(length_probs) != max_words:
        raise ValueError(f"need max_words >= 1 and one length probability per length, got {max_words} and "
                         f"{len(length_probs)}")
    if any(p < 0 for p in length_probs) or not sum(length_probs) > 0:
        raise ValueError(f"length_probs must be >= 0 with a positive sum, got {tuple(length_probs)}")
    from math import factorial

    bags = [(a, b, n - a - b) for n in range(1, max_words + 1) for a in range(n, -1, -1) for b in range(n - a + 1)]
    features = torch.tensor(bags, dtype=DTYPE)  # (K, 3)
    names = ["+" * a + "-" * b + "0" * c for a, b, c in bags]
    total = float(sum(length_probs))
    rows = []
    for p_pos, p_neg, p_neu in REVIEW_MOODS.values():
        row = []
        for a, b, c in bags:
            multinomial = factorial(a + b + c) / (factorial(a) * factorial(b) * factorial(c))
            row.append(length_probs[a + b + c - 1] / total * multinomial * p_pos ** a * p_neg ** b * p_neu ** c)
        rows.append(row)
    reference = torch.tensor(rows, dtype=DTYPE)
    reference = reference / reference.sum(-1, keepdim=True)
    rewards = (features[:, 0] - features[:, 1]).expand(len(REVIEW_MOODS), -1).clone()
    world = ExactWorld(reference_probs=reference, rewards=rewards,
                       prompt_probs=torch.full((len(REVIEW_MOODS),), 1.0 / len(REVIEW_MOODS), dtype=DTYPE))
    return world, features, names


def train_policy(world: ExactWorld, pairs: PreferencePairs, beta: float, features: torch.Tensor | None = None,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, rpo_alpha: float = 0.0,
                 steps: int = 300, lr: float = 0.05, keep_history: bool = False) -> TabularResult:
    """Train a policy on preference pairs with Adam, full batch, starting at pi_ref; tabular or log-linear.

    - ``features=None``: tabular, one free logit per (prompt, response), as in ``train_tabular``.
    - ``features`` of shape (K, d) or (P, K, d): log-linear, pi_theta(y|x) proportional to
      pi_ref(y|x) exp(theta . phi(x, y)) with ONE theta in R^d shared by every prompt and response, the way a
      network shares its weights. Pushing one response down then moves every response with similar features.

    The loss is ``minidpo.preference_loss`` (any ``loss_type``, ``label_smoothing``) averaged over the pairs,
    plus ``rpo_alpha`` times the mean negative log-likelihood of the chosen, -log pi_theta(y_w|x): the RPO term
    (Pang et al. 2024), here per response (the GPT-2 trainer averages it per token). Adam with step ``lr`` gives
    the first-order trajectory; ``keep_history`` keeps pi_theta after every step.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    log_ref = torch.log(world.reference_probs.to(DTYPE))  # (P, K)
    if features is None:
        theta = torch.zeros_like(log_ref, requires_grad=True)  # (P, K)

        def logits() -> torch.Tensor:
            return log_ref + theta
    else:
        feats = features.to(DTYPE)
        if feats.shape[-2] != world.n_responses or feats.dim() not in (2, 3) or (
                feats.dim() == 3 and feats.shape[0] != world.n_prompts):
            raise ValueError(f"features must have shape (K, d) or (P, K, d) with P = {world.n_prompts} and "
                             f"K = {world.n_responses}, got {tuple(feats.shape)}")
        theta = torch.zeros(feats.shape[-1], dtype=DTYPE, requires_grad=True)  # (d,)

        def logits() -> torch.Tensor:
            return log_ref + feats @ theta  # (P, K)

    x, yw, yl = pairs.prompt, pairs.chosen, pairs.rejected
    opt = torch.optim.Adam([theta], lr=lr)
    losses, history = [], []
    with _single_thread():
        for _ in range(steps):
            log_pi = torch.log_softmax(logits(), dim=-1)
            per_pair, _, _ = preference_loss(log_pi[x, yw], log_pi[x, yl], log_ref[x, yw], log_ref[x, yl],
                                             beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
            loss = per_pair.mean() - rpo_alpha * log_pi[x, yw].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if keep_history:
                history.append(torch.softmax(logits().detach(), dim=-1))
    return TabularResult(probs=torch.softmax(logits().detach(), dim=-1), losses=losses, history=history)


def pair_log_ratios(policy_probs: torch.Tensor, reference_probs: torch.Tensor,
                    pairs: PreferencePairs) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_w|x) - log pi_ref(y_w|x), the same for y_l): one value per pair, (n,) each.

    Both negative with the first larger is preference displacement: the margin grew, yet the chosen lost mass.
    """
    if policy_probs.shape != reference_probs.shape:
        raise ValueError(f"shape mismatch: policy_probs is {tuple(policy_probs.shape)} "
                         f"but reference_probs is {tuple(reference_probs.shape)}")
    log_ratio = torch.log(policy_probs.to(DTYPE)) - torch.log(reference_probs.to(DTYPE))
    return log_ratio[pairs.prompt, pairs.chosen], log_ratio[pairs.prompt, pairs.rejected]


def data_mass(policy_probs: torch.Tensor, pairs: PreferencePairs,
              prompt_probs: torch.Tensor | None = None) -> dict[str, float]:
    """How a policy's probability splits between the responses the data shows and the ones it never shows.

    Per prompt, the responses fall in three sets: chosen in some pair; rejected but never chosen; in no pair
    at all ("unseen"). Returns {"chosen", "rejected_only", "unseen"}: pi's mass on each set, averaged over
    prompts with ``prompt_probs`` (uniform by default). The three add up to 1.
    """
    n_prompts, n_responses = policy_probs.shape[-2:]
    chosen = torch.zeros(n_prompts, n_responses, dtype=torch.bool)
    rejected = torch.zeros(n_prompts, n_responses, dtype=torch.bool)
    chosen[pairs.prompt, pairs.chosen] = True
    rejected[pairs.prompt, pairs.rejected] = True
    sets = {"chosen": chosen, "rejected_only": rejected & ~chosen, "unseen": ~(chosen | rejected)}
    probs = policy_probs.to(DTYPE)
    return {name: float(_average_over_prompts((probs * members).sum(-1), prompt_probs))
            for name, members in sets.items()}


__all__ += ["REVIEW_MOODS", "make_review_world", "train_policy", "pair_log_ratios", "data_mass"]


# --------------------------------------------------------------------------------------------------------------
# Rankings of more than two responses: Plackett-Luce (DPO paper, Rafailov et al. 2023, Appendix A.3)


@dataclass
class Rankings:
    """n rankings: prompt (n,) and order (n, k), the ranked responses best first."""

    prompt: torch.Tensor
    order: torch.Tensor

    def __len__(self) -> int:
        return self.prompt.numel()


def sample_rankings(world: ExactWorld, n_rankings: int, k: int | None = None, seed: int = 0) -> Rankings:
    """x ~ d(x); k distinct responses from pi_ref(.|x) (all K if k is None); a ranking of them drawn from the
    Plackett-Luce model on the true reward: the best is picked with probability softmax(r), then the best of the
    rest, and so on. Both draws use the Gumbel-top-k trick: sorting log-weights plus Gumbel noise samples
    without replacement proportionally to the weights (Plackett-Luce is exactly that on r)."""
    n_responses = world.n_responses
    k = n_responses if k is None else k
    if n_rankings < 1 or not 2 <= k <= n_responses:
        raise ValueError(f"need n_rankings >= 1 and 2 <= k <= {n_responses}, got {n_rankings} and {k}")
    gen = torch.Generator().manual_seed(seed)
    prompt = _sample_rows(world.prompt_probs.expand(n_rankings, -1), gen)

    def gumbel(shape) -> torch.Tensor:
        u = torch.rand(shape, generator=gen, dtype=DTYPE).clamp_min(1e-300)
        return -torch.log(-torch.log(u))

    log_ref = torch.log(world.reference_probs.to(DTYPE))[prompt]  # (n, K)
    shown = torch.topk(log_ref + gumbel(log_ref.shape), k, dim=-1).indices  # (n, k): k distinct from pi_ref
    rewards = world.rewards.to(DTYPE)[prompt.unsqueeze(-1), shown]  # (n, k)
    ranked = torch.argsort(rewards + gumbel(rewards.shape), dim=-1, descending=True)  # Plackett-Luce on r
    return Rankings(prompt=prompt, order=shown.gather(-1, ranked))


def plackett_luce_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The DPO loss for rankings (DPO paper, Appendix A.3, Eq. 19), one value per ranking, shape (n,).

    policy_logps, reference_logps: (n, k) log-probs of the ranked responses, best first. With
    u_k = beta (log pi_theta(y_k|x) - log pi_ref(y_k|x)), the loss is -sum_k [u_k - log sum_{j >= k} exp(u_j)];
    Z(x) has cancelled from every factor (minidpo.derivations.check_plackett_luce_z_cancels). k = 2 is the DPO
    loss of eq:dpo_core.
    """
    if policy_logps.shape != reference_logps.shape or policy_logps.dim() != 2 or policy_logps.shape[-1] < 2:
        raise ValueError(f"policy_logps and reference_logps must both be (n, k) with k >= 2, got "
                         f"{tuple(policy_logps.shape)} and {tuple(reference_logps.shape)}")
    _check_beta(beta)
    u = beta * (policy_logps - reference_logps)  # (n, k)
    tail = torch.logcumsumexp(u.flip(-1), dim=-1).flip(-1)  # (n, k): log sum_{j >= k} exp(u_j)
    return (tail - u).sum(-1)


def train_tabular_rankings(world: ExactWorld, rankings: Rankings, beta: float, steps: int = 100) -> TabularResult:
    """Fit a tabular policy softmax(theta[x]) to rankings with ``plackett_luce_loss``, full-batch L-BFGS from
    theta = log pi_ref. The loss is convex in theta (u is linear in it), as for pairs in ``train_tabular``."""
    log_ref = torch.log(world.reference_probs.to(DTYPE))
    theta = log_ref.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=1, max_eval=10, history_size=20, line_search_fn="strong_wolfe")
    x = rankings.prompt.unsqueeze(-1)  # (n, 1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        log_pi = torch.log_softmax(theta, dim=-1)
        loss = plackett_luce_loss(log_pi[x, rankings.order], log_ref[x, rankings.order], beta).mean()
        loss.backward()
        return loss

    losses = []
    with _single_thread():
        for _ in range(steps):
            losses.append(float(opt.step(closure).detach()))
            if len(losses) > 1 and abs(losses[-2] - losses[-1]) < 1e-14:
                break
    return TabularResult(probs=torch.softmax(theta.detach(), dim=-1), losses=losses)


def fit_reward_model(world: ExactWorld, pairs: PreferencePairs, steps: int = 100) -> torch.Tensor:
    """A tabular Bradley-Terry reward model r_hat(x, y), fit by maximum likelihood on ``pairs`` (the RLHF
    pipeline's first stage), shape (P, K), each prompt's row centred (only differences are identified).

    Theorem 1 of the DPO paper says DPO fits exactly this model, with r_hat = beta log(pi_theta / pi_ref): so
    optimal_policy(pi_ref, r_hat, beta) equals the DPO fit on the same pairs (notebook 02 measures it).
    """
    counts = pairs.counts(world.n_prompts, world.n_responses).to(DTYPE)
    x, yw, yl = counts.nonzero(as_tuple=True)
    weights = counts[x, yw, yl] / counts.sum()
    r_hat = torch.zeros(world.n_prompts, world.n_responses, dtype=DTYPE, requires_grad=True)
    opt = torch.optim.LBFGS([r_hat], lr=1.0, max_iter=1, max_eval=10, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -(weights * torch.nn.functional.logsigmoid(r_hat[x, yw] - r_hat[x, yl])).sum()
        loss.backward()
        return loss

    previous = None
    with _single_thread():
        for _ in range(steps):
            loss = float(opt.step(closure).detach())
            if previous is not None and abs(previous - loss) < 1e-14:
                break
            previous = loss
    r = r_hat.detach()
    return r - r.mean(-1, keepdim=True)


__all__ += ["Rankings", "sample_rankings", "plackett_luce_loss", "train_tabular_rankings", "fit_reward_model"]
