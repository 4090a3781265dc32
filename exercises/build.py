"""Writes the exercise notebooks from one source: exercises/NN_*.ipynb (stubs) and exercises/solutions/ (worked).

    .venv/bin/python exercises/build.py --execute    # --execute: solutions keep their outputs

One source for both versions keeps statements, tags and checks in step: an exercise is a markdown statement, then
a code cell tagged ``exercise-N`` whose student version is ``STUB`` and whose solution is ``SOLUTION``. The checks
are in ``minidpo/grading.py``; ``minidpo grade NOTEBOOK`` runs them. Edit here, rerun, commit both folders.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """import math

import numpy as np
import sympy as sp
import torch
import torch.nn.functional as F

import minidpo

torch.manual_seed(0)"""


def md(text: str):
    return ("md", text.strip("\n"))


def code(text: str):
    return ("code", text.strip("\n"))


def exercise(number: int, statement: str, stub: str, solution: str):
    return ("exercise", number, statement.strip("\n"), stub.strip("\n"), solution.strip("\n"))


def check_cell(numbers: list[int]):
    return code(f"""# Check your work here, or from a terminal: minidpo grade THIS_NOTEBOOK.ipynb
from minidpo.grading import format_table, grade_namespace

print(format_table(grade_namespace(globals(), {numbers!r})))""")


# exercise notebook -> the course notebook it goes with
FILES = {
    "01": ("01_optimal_policy", "01_rlhf_objective_to_optimal_policy"),
    "02": ("02_dpo_loss", "02_bradley_terry_to_dpo_loss"),
    "03": ("03_gradient_and_logps", "03_dpo_gradient"),
    "04": ("04_tokens_and_displacement", "04_preference_displacement"),
    "05": ("05_training_step_and_sweep", "05_tiny_dpo_run_and_frontier"),
    "06": ("06_variants", "06_variants_side_by_side"),
    "07": ("07_claim_check", "07_claims_checked"),
}


def header(nn: str, title: str, minutes: int, numbers: list[int], goals: str) -> tuple:
    first, last = numbers[0], numbers[-1]
    mine, course = FILES[nn]
    count = f"Exercises {first} to {last}" if last > first else f"Exercise {first}"
    return md(f"""# Exercises {nn} · {title}

Goes with the course notebook [`{course}`](../notebooks/{course}.ipynb). {count}, about {minutes} minutes.

{goals.strip()}

**How it works.** Each exercise has a statement and a code cell tagged `exercise-N` with a stub that raises
`NotImplementedError`. Replace the stub, run the cell, then run the last cell of the notebook (or
`minidpo grade exercises/{mine}.ipynb` in a terminal): one row per exercise, passed or failed with a hint. Notation:
[`notes/NOTATION.md`](../notes/NOTATION.md) (y_w chosen, y_l rejected, h the difference of log-ratios, r the reward only).""")


# ---------------------------------------------------------------------------------------------------------------

NB01 = [
    header("01", "The optimal policy", 35, [1, 2, 3], """
You will write π\\* yourself (and see which way β pushes it), redo step (10) of the derivation in sympy, and
measure the objective that π\\* maximises."""),
    code(SETUP + """

world = minidpo.bandit.make_world(n_prompts=3, n_responses=5, seed=0)  # pi_ref and r as (3, 5) tables
ref, r = world.reference_probs, world.rewards
print("pi_ref =", ref.numpy().round(3), "\\nr =", r.numpy().round(2), sep="\\n")"""),
    exercise(1, """
## Exercise 1 · π\\* = π_ref · exp(r/β) / Z(x)

The KL-regularised objective is maximised by $\\pi^*(y|x)=\\frac{1}{Z(x)}\\pi_{\\text{ref}}(y|x)\\exp\\big(r(x,y)/\\beta\\big)$
with $Z(x)=\\sum_y\\pi_{\\text{ref}}(y|x)\\exp(r(x,y)/\\beta)$.

Write `pi_star(reference_probs, rewards, beta)` for $(P, K)$ tables (torch in, torch out; each row a
distribution). It must stay finite for small β (at β = 0.01, $e^{r/\\beta}$ overflows float64 once $r > 7$), and
a response with $\\pi_{\\text{ref}}=0$ must keep $\\pi^*=0$.""", """
def pi_star(reference_probs, rewards, beta):
    \"\"\"pi*(y|x) for (P, K) tables; rows sum to 1.\"\"\"
    raise NotImplementedError("Exercise 1: write pi_star")""", """
def pi_star(reference_probs, rewards, beta):
    \"\"\"pi*(y|x) for (P, K) tables; rows sum to 1.\"\"\"
    # In log space: log pi_ref + r / beta, normalised by a softmax (it subtracts the row max, so no overflow).
    # log 0 = -inf, and softmax turns it back into exactly 0: pi_ref = 0 keeps pi* = 0.
    logits = torch.log(reference_probs) + rewards / beta  # (P, K)
    return torch.softmax(logits, dim=-1)"""),
    md("""Now look at what β does. KL(π\\*‖π_ref) for three values of β: **before you run it, write down which one
you expect to be closest to π_ref.** (One of the source texts, the tutorial article, says "higher β increases
divergence from the reference"; notebook 07 settles it.)"""),
    code("""for beta in (0.1, 1.0, 10.0):
    star = pi_star(ref, r, beta)
    kl = (star * (star.log() - ref.log())).sum(-1).mean()
    print(f"beta = {beta:>5}:  KL(pi* || pi_ref) = {kl:.3f} nats")"""),
    exercise(2, """
## Exercise 2 · Step (10) in sympy

For one prompt, step (4) of the derivation (`eq:dpo_deriv_4` in the book chapter) minimises

$$\\sum_y \\pi(y)\\Big[\\log\\frac{\\pi(y)}{\\pi_{\\text{ref}}(y)}-\\frac{r(y)}{\\beta}\\Big],$$

and step (10) (`eq:dpo_deriv_10`) writes the same thing as a KL divergence to π\\* minus a term that does not depend
on π:

$$\\mathrm{KL}\\big(\\pi\\,\\|\\,\\pi^*\\big)-\\log Z .$$

Write `step10(pi, ref, r, beta)`: given lists of sympy symbols for one prompt's $\\pi(y)$, $\\pi_{\\text{ref}}(y)$ and
$r(y)$, and the symbol β, return the expression of step (10), with π\\* and Z written out from `ref`, `r` and
`beta`. The grader checks that it equals step (4) on every distribution π, **and** that it is really step (10):
the move from (9) to (10) takes $\\log Z$ out of the expectation.

Then find what that move assumes. `minidpo.check_step(before, after, assumptions=[...])` says whether `after`
equals `before`, and with which assumptions (each `x > 0`-style, or `sp.Eq(a, b)` to substitute `b` for `a`). Use
it in the cell below on step (4) and your step (10), and set `step10_given` to the list of assumptions under which
it says "holds given". Use the symbols of that cell (`pi`, `q`, `rr`, `b`).""", """
def step10(pi, ref, r, beta):
    \"\"\"KL(pi || pi*) - log Z for one prompt, as a sympy expression.\"\"\"
    raise NotImplementedError("Exercise 2: write step (10)")


step10_given = None  # a list of sympy facts, e.g. [sp.Eq(...)]""", """
def step10(pi, ref, r, beta):
    \"\"\"KL(pi || pi*) - log Z for one prompt, as a sympy expression.\"\"\"
    Z = sp.Add(*[q * sp.exp(ry / beta) for q, ry in zip(ref, r)])
    star = [q * sp.exp(ry / beta) / Z for q, ry in zip(ref, r)]
    kl = sp.Add(*[p * sp.log(p / s) for p, s in zip(pi, star)])
    return kl - sp.log(Z)


pi = [sp.Symbol(f"pi_{y}", positive=True) for y in range(3)]
step10_given = [sp.Eq(pi[2], 1 - pi[0] - pi[1])]  # pi is a distribution: sum_y pi(y) = 1"""),
    code("""pi = [sp.Symbol(f"pi_{y}", positive=True) for y in range(3)]
q = [sp.Symbol(f"ref_{y}", positive=True) for y in range(3)]
rr = [sp.Symbol(f"r_{y}", real=True) for y in range(3)]
b = sp.Symbol("beta", positive=True)
step4 = sp.Add(*[p * (sp.log(p / qq) - ry / b) for p, qq, ry in zip(pi, q, rr)])
print("no assumptions:", minidpo.check_step(step4, step10(pi, q, rr, b)))
print("step10_given:  ", minidpo.check_step(step4, step10(pi, q, rr, b), assumptions=step10_given))"""),
    md("""sympy can also say exactly what separates the two steps: the difference is $(\\sum_y\\pi(y)-1)\\log Z$, zero
only for a distribution."""),
    code("""difference = sp.factor(sp.simplify(sp.expand_log(step10(pi, q, rr, b) - step4, force=True)))
print("step (10) - step (4) =", difference)"""),
    exercise(3, """
## Exercise 3 · The objective, and its value at π\\*

$$J(\\pi)=\\mathbb{E}_{x}\\Big[\\mathbb{E}_{y\\sim\\pi(\\cdot|x)}\\,r(x,y)-\\beta\\,\\mathrm{KL}\\big(\\pi(\\cdot|x)\\,\\|\\,\\pi_{\\text{ref}}(\\cdot|x)\\big)\\Big],
\\qquad\\text{prompts weighted equally.}$$

Write `objective_J(policy_probs, reference_probs, rewards, beta)` returning a scalar tensor. The derivation
says $J(\\pi^*)=\\beta\\,\\mathbb{E}_x\\log Z(x)$ and $J(\\pi^*)\\ge J(\\pi)$ for every π; the cell below tests the
second on random policies.""", """
def objective_J(policy_probs, reference_probs, rewards, beta):
    \"\"\"E_x [ E_{y~pi} r - beta KL(pi || pi_ref) ] for (P, K) tables.\"\"\"
    raise NotImplementedError("Exercise 3: write the objective")""", """
def objective_J(policy_probs, reference_probs, rewards, beta):
    \"\"\"E_x [ E_{y~pi} r - beta KL(pi || pi_ref) ] for (P, K) tables.\"\"\"
    reward = (policy_probs * rewards).sum(-1)  # (P,)
    kl = (policy_probs * (policy_probs.log() - reference_probs.log())).sum(-1)  # (P,)
    return (reward - beta * kl).mean()"""),
    code("""beta = 0.5
best = objective_J(pi_star(ref, r, beta), ref, r, beta)
random_policies = torch.distributions.Dirichlet(torch.ones(5, dtype=torch.float64)).sample((1000, 3))
others = torch.stack([objective_J(p, ref, r, beta) for p in random_policies])
print(f"J(pi*) = {best:.4f}, beta E log Z = {beta * torch.log((ref * torch.exp(r / beta)).sum(-1)).mean():.4f}, "
      f"best of 1000 random policies: {others.max():.4f}")"""),
    check_cell([1, 2, 3]),
]

NB02 = [
    header("02", "From Bradley–Terry to the DPO loss", 35, [4, 5, 6], """
You will watch Z(x) cancel in sympy, write the DPO loss with its logged rewards (and make it fail the way a
popular tutorial's code does), and compute the implicit reward."""),
    code(SETUP),
    exercise(4, """
## Exercise 4 · Z(x) cancels

Bradley–Terry: $p(y_1\\succ y_2|x)=\\frac{\\exp r(x,y_1)}{\\exp r(x,y_1)+\\exp r(x,y_2)}$. Taking logs of
$\\pi^*=\\pi_{\\text{ref}}e^{r/\\beta}/Z$ and solving for $r$ gives the reward in terms of the optimal policy
(`eq:dpo_reward_full`).

Write two sympy functions: `bradley_terry(r1, r2)` and `reward_from_policy(pi_star, pi_ref, Z, beta)`. The grader
checks that your reward inverts π\\*, and that once both rewards are put into Bradley–Terry **for the same prompt**
the probability no longer depends on $Z$.""", """
def bradley_terry(r1, r2):
    \"\"\"p(y1 > y2) under Bradley-Terry, as a sympy expression.\"\"\"
    raise NotImplementedError("Exercise 4: write Bradley-Terry")


def reward_from_policy(pi_star, pi_ref, Z, beta):
    \"\"\"r(x, y) solved from pi* = pi_ref exp(r / beta) / Z, as a sympy expression.\"\"\"
    raise NotImplementedError("Exercise 4: write the reward in terms of pi*")""", """
def bradley_terry(r1, r2):
    \"\"\"p(y1 > y2) under Bradley-Terry, as a sympy expression.\"\"\"
    return sp.exp(r1) / (sp.exp(r1) + sp.exp(r2))


def reward_from_policy(pi_star, pi_ref, Z, beta):
    \"\"\"r(x, y) solved from pi* = pi_ref exp(r / beta) / Z, as a sympy expression.\"\"\"
    return beta * sp.log(pi_star / pi_ref) + beta * sp.log(Z)"""),
    code("""s1, s2, q1, q2, Z, beta = sp.symbols("pi1 pi2 ref1 ref2 Z beta", positive=True)
p = bradley_terry(reward_from_policy(s1, q1, Z, beta), reward_from_policy(s2, q2, Z, beta))
print("d p / d Z =", sp.simplify(sp.diff(p, Z)))
Z1, Z2 = sp.symbols("Z1 Z2", positive=True)  # two DIFFERENT prompts: nothing cancels
p_two_prompts = bradley_terry(reward_from_policy(s1, q1, Z1, beta), reward_from_policy(s2, q2, Z2, beta))
print("with two prompts, d p / d Z1 is zero:", sp.simplify(sp.diff(p_two_prompts, Z1)) == 0)"""),
    exercise(5, """
## Exercise 5 · The DPO loss and its rewards

With $h=\\big(\\log\\pi_\\theta(y_w|x)-\\log\\pi_{\\text{ref}}(y_w|x)\\big)-\\big(\\log\\pi_\\theta(y_l|x)-\\log\\pi_{\\text{ref}}(y_l|x)\\big)$,
the DPO loss per pair is $-\\log\\sigma(\\beta h)$ (`eq:dpo_core`). Trainers also log the implicit rewards
$\\beta(\\log\\pi_\\theta-\\log\\pi_{\\text{ref}})$ of the chosen and the rejected response (TRL's `rewards/chosen`).

Write `dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)`
returning `(losses, chosen_rewards, rejected_rewards)`, each of shape (B,). The rewards are for logging: nothing
may backpropagate through them. The loss must stay finite for a pair ranked very wrong.""", """
def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    \"\"\"(losses, chosen_rewards, rejected_rewards), each (B,).\"\"\"
    raise NotImplementedError("Exercise 5: write the DPO loss")""", """
def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    \"\"\"(losses, chosen_rewards, rejected_rewards), each (B,).\"\"\"
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    losses = -F.logsigmoid(beta * h)  # logsigmoid, not log(sigmoid): finite for any h
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()"""),
    md("""Two things to see. First, at the start of training π_θ = π_ref, so $h=0$ and the loss is $\\ln 2$
whatever the data: a loss that *stays* at 0.693 means the policy is not moving (exercise 11). Second, the
tutorial article's pseudocode writes `log(sigmoid(...))`: watch it overflow where `logsigmoid` does not."""),
    code("""pc, pr = torch.tensor([-12.0, -30.0]), torch.tensor([-15.0, -8.0])
losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, pc, pr, beta=0.1)
print("at pi_theta = pi_ref:", losses, " ln 2 =", math.log(2))
h = torch.tensor([-100.0, -1000.0])
print("log(sigmoid):", -torch.log(torch.sigmoid(h)), "  logsigmoid:", -F.logsigmoid(h))"""),
    exercise(6, """
## Exercise 6 · The implicit reward

"Your language model is secretly a reward model": $\\hat r(x,y)=\\beta\\log\\frac{\\pi(y|x)}{\\pi_{\\text{ref}}(y|x)}$
(`eq:dpo_reward`). It is `eq:dpo_reward_full` without the $\\beta\\log Z(x)$ term, so at π = π\\* it equals the true
reward shifted by $-\\beta\\log Z(x)$, one constant per prompt, invisible to any preference.

Write `implicit_reward_table(policy_probs, reference_probs, beta)` for $(P, K)$ tables.""", """
def implicit_reward_table(policy_probs, reference_probs, beta):
    \"\"\"beta log(pi / pi_ref) for (P, K) tables.\"\"\"
    raise NotImplementedError("Exercise 6: write the implicit reward")""", """
def implicit_reward_table(policy_probs, reference_probs, beta):
    \"\"\"beta log(pi / pi_ref) for (P, K) tables.\"\"\"
    return beta * (policy_probs.log() - reference_probs.log())"""),
    code("""world = minidpo.bandit.make_world(n_prompts=2, n_responses=4, seed=1)
star = minidpo.optimal_policy(world.reference_probs, world.rewards, 0.5)
print("r_hat - r at pi* (one constant per row):")
print((implicit_reward_table(star, world.reference_probs, 0.5) - world.rewards).numpy().round(4))"""),
    check_cell([4, 5, 6]),
]

NB03 = [
    header("03", "The gradient, and the log-probs it flows through", 30, [7, 8], """
You will compute the per-pair weight of the DPO gradient and check it against autograd, then write the function
every DPO trainer depends on: the log-probability of a completion, with the shift and the −100 mask."""),
    code(SETUP),
    exercise(7, """
## Exercise 7 · The gradient weight

The DPO gradient (`eq:dpo_grad_3`) is
$-\\mathbb{E}\\big[\\,w\\,\\big(\\nabla_\\theta\\log\\pi_\\theta(y_w|x)-\\nabla_\\theta\\log\\pi_\\theta(y_l|x)\\big)\\big]$ with one
weight per pair, $w=-\\partial\\mathcal{L}/\\partial\\log\\pi_\\theta(y_w|x)$, written with the implicit rewards
$\\hat r_w,\\hat r_l$.

Write `gradient_weight(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)`
returning $w$ for each pair, (B,), from a formula (no autograd). The grader compares it with autograd. Which pairs
get the largest weight: those the model ranks right, or wrong?""", """
def gradient_weight(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    beta):
    \"\"\"The per-pair weight of the DPO gradient, (B,).\"\"\"
    raise NotImplementedError("Exercise 7: write the gradient weight")""", """
def gradient_weight(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    beta):
    \"\"\"The per-pair weight of the DPO gradient, (B,).\"\"\"
    chosen_reward = beta * (policy_chosen_logps - reference_chosen_logps)  # r_hat_w, (B,)
    rejected_reward = beta * (policy_rejected_logps - reference_rejected_logps)  # r_hat_l, (B,)
    return beta * torch.sigmoid(rejected_reward - chosen_reward)"""),
    code("""pc = torch.tensor([-10.0, -10.0], requires_grad=True)   # pair 0 ranked right, pair 1 ranked wrong
pr, rc, rr = torch.tensor([-14.0, -6.0]), torch.tensor([-11.0, -11.0]), torch.tensor([-11.0, -11.0])
minidpo.preference_loss(pc, pr, rc, rr, beta=0.5)[0].sum().backward()
print("autograd -dL/d log pi(y_w):", -pc.grad, "  your weights:", gradient_weight(pc.detach(), pr, rc, rr, 0.5))"""),
    exercise(8, """
## Exercise 8 · Sequence log-probs: the shift and the −100 mask

A causal LM's `logits[:, t]` is its prediction for token $t+1$. The labels are the input ids with −100 on every
position that does not count (prompt, padding). $\\log\\pi(y|x)$ is the **sum** over the completion's tokens of
the log-softmax at the right position.

Write `seq_logps(logits, labels)`: logits (B, T, V), labels (B, T), returns (B,). Two classic bugs make log-probs
silently wrong: forgetting the shift (every token is scored by the prediction made *at* it, not *before* it),
and letting padding or the prompt count. Produce the first on purpose in the cell after the exercise, then fix
it in yours.""", """
def seq_logps(logits, labels):
    \"\"\"Summed log-probs of the counted tokens, (B,). logits (B, T, V), labels (B, T) with -100 = not counted.\"\"\"
    raise NotImplementedError("Exercise 8: write seq_logps")""", """
def seq_logps(logits, labels):
    \"\"\"Summed log-probs of the counted tokens, (B,). logits (B, T, V), labels (B, T) with -100 = not counted.\"\"\"
    logits = logits[:, :-1, :].float()  # (B, T-1, V): position t predicts token t+1
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != -100  # (B, T-1)
    safe = torch.where(mask, labels, 0)  # any valid id where masked; removed by the mask below
    token_logps = torch.log_softmax(logits, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (token_logps * mask).sum(-1)"""),
    code("""logits = torch.randn(2, 6, 9)
labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, -100, 1, 2, 7, 8]])
unshifted = (torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
             * (labels != -100)).sum(-1)
print("unshifted (wrong):", unshifted)
print("yours:            ", seq_logps(logits, labels))
print("minidpo:          ", minidpo.sequence_logps(logits, labels))"""),
    check_cell([7, 8]),
]

NB04 = [
    header("04", "Tokens, EOS, and the chosen log-prob that falls", 30, [9, 10], """
You will build one training example by hand (where a missing EOS or a labelled pad token hides), then train DPO on
the exact world and find the chosen response losing probability while the loss falls, and explain why."""),
    code(SETUP),
    exercise(9, """
## Exercise 9 · One training example: prompt mask, EOS, padding

Write `build_example(prompt_ids, completion_ids, eos_id, pad_id, length)` returning a dict of three lists (or
tensors) of length `length`:

- `input_ids`: prompt, completion, then `eos_id`, then `pad_id` up to `length` (right padding);
- `attention_mask`: 1 on real tokens, 0 on padding;
- `labels`: −100 on the prompt, the completion's ids **and the EOS**, −100 on padding.

Raise `ValueError` if prompt + completion + EOS is longer than `length` (cutting silently would drop the EOS).
GPT-2 has no pad token, so trainers pad with EOS (`pad_id == eos_id`): then labelling padding with its id would
teach the model to say EOS forever, and without the EOS label the model is never scored on *stopping*.

Why ids and not text: the prompt's tokens must be an exact prefix of the full sequence, or the −100 boundary lands
in the wrong place. Tokenizing `prompt + completion` as one string can merge tokens across the boundary, and a
chat model's prompt must be rendered by its chat template *with* the generation prompt (the assistant header),
exactly as at inference. Tokenize the parts, then concatenate the ids, as here.""", """
def build_example(prompt_ids, completion_ids, eos_id, pad_id, length):
    \"\"\"{"input_ids", "attention_mask", "labels"}, each of length `length`.\"\"\"
    raise NotImplementedError("Exercise 9: build one example")""", """
def build_example(prompt_ids, completion_ids, eos_id, pad_id, length):
    \"\"\"{"input_ids", "attention_mask", "labels"}, each of length `length`.\"\"\"
    ids = list(prompt_ids) + list(completion_ids) + [eos_id]
    if len(ids) > length:
        raise ValueError(f"prompt + completion + EOS is {len(ids)} tokens, more than length {length}")
    labels = [-100] * len(prompt_ids) + list(completion_ids) + [eos_id]  # the EOS is scored: stopping counts
    n_pad = length - len(ids)
    return {"input_ids": ids + [pad_id] * n_pad,
            "attention_mask": [1] * len(ids) + [0] * n_pad,
            "labels": labels + [-100] * n_pad}"""),
    md("""How much does the EOS matter? On a small random model, the log-prob of the same completion with and
without its EOS token (the difference is exactly the log-prob of stopping there):"""),
    code("""from minidpo.grading import TinyLM

model = TinyLM(seed=0)
with_eos = build_example([5, 6, 7], [8, 9, 10], eos_id=1, pad_id=1, length=10)
without_eos = dict(with_eos, labels=with_eos["labels"][:6] + [-100] * 4)
for name, ex in (("with EOS", with_eos), ("without EOS", without_eos)):
    logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits
    print(f"{name:12}: log pi(y|x) = {minidpo.sequence_logps(logits, torch.tensor([ex['labels']])).item():.3f}")"""),
    md("""## The chosen response loses probability

DPO on the exact world of notebook 04 (bags of adjectives; reward = positive − negative words), with a log-linear
policy that shares its parameters across responses as a network does. 60 pairs sampled from π_ref, labelled by
Bradley–Terry. The loss falls; now look at the chosen responses."""),
    code("""world, features, names = minidpo.bandit.make_review_world()
pairs = minidpo.bandit.sample_pairs(world, 60, seed=0)
run = minidpo.bandit.train_policy(world, pairs, beta=0.1, features=features, steps=300)
policy, reference = run.probs, world.reference_probs
print(f"loss {run.losses[0]:.3f} -> {run.losses[-1]:.3f}")"""),
    exercise(10, """
## Exercise 10 · Measure it, and explain it

Write `logprob_shifts(policy_probs, reference_probs, prompt, chosen, rejected)` returning
$(\\Delta_w,\\Delta_l)$, one value per pair each, with $\\Delta=\\log\\pi_\\theta(y|x)-\\log\\pi_{\\text{ref}}(y|x)$ in nats
(`prompt`, `chosen`, `rejected` are index tensors). Then `sum_rule_rhs(policy_probs, reference_probs)`: the
prompt-average of $\\mathbb{E}_{y\\sim\\pi_{\\text{ref}}(\\cdot|x)}\\big[\\log\\frac{\\pi(y|x)}{\\pi_{\\text{ref}}(y|x)}\\big]$,
which Gibbs' inequality says is ≤ 0. Both completions of every pair were sampled from π_ref, so the average of
$\\Delta_w$ and $\\Delta_l$ over many pairs estimates it.

Finally set `answer_10` to the letter of the right explanation of "the loss fell, yet the chosen log-prob fell":

- **a** the run is broken: the DPO gradient raises the chosen log-prob, so it cannot fall;
- **b** nothing is broken: the loss only asks the margin $h=\\Delta_w-\\Delta_l$ to grow, while the average of
  $\\Delta_w$ and $\\Delta_l$ is pinned near $-\\mathrm{KL}(\\pi_{\\text{ref}}\\|\\pi)\\le 0$, so the chosen falls unless
  the margin grows faster than the policy leaves π_ref;
- **c** the learning rate is too high: at convergence the chosen log-prob always rises.""", """
def logprob_shifts(policy_probs, reference_probs, prompt, chosen, rejected):
    \"\"\"(delta_w, delta_l): log pi_theta - log pi_ref of each pair's chosen and rejected, (n,) each.\"\"\"
    raise NotImplementedError("Exercise 10: write logprob_shifts")


def sum_rule_rhs(policy_probs, reference_probs):
    \"\"\"The prompt-average of E_{y ~ pi_ref}[log pi / pi_ref].\"\"\"
    raise NotImplementedError("Exercise 10: write sum_rule_rhs")


answer_10 = None  # "a", "b" or "c"
raise NotImplementedError("Exercise 10: choose answer_10")""", """
def logprob_shifts(policy_probs, reference_probs, prompt, chosen, rejected):
    \"\"\"(delta_w, delta_l): log pi_theta - log pi_ref of each pair's chosen and rejected, (n,) each.\"\"\"
    log_ratio = policy_probs.log() - reference_probs.log()  # (P, K)
    return log_ratio[prompt, chosen], log_ratio[prompt, rejected]


def sum_rule_rhs(policy_probs, reference_probs):
    \"\"\"The prompt-average of E_{y ~ pi_ref}[log pi / pi_ref].\"\"\"
    return (reference_probs * (policy_probs.log() - reference_probs.log())).sum(-1).mean()


answer_10 = "b\""""),
    code("""dw, dl = logprob_shifts(policy, reference, pairs.prompt, pairs.chosen, pairs.rejected)
print(f"mean delta_w = {dw.mean():+.2f}, mean delta_l = {dl.mean():+.2f}, margin = {(dw - dl).mean():+.2f} nats")
print(f"chosen responses that lost probability: {(dw < 0).float().mean():.0%}")
print(f"(delta_w + delta_l) / 2 = {((dw + dl) / 2).mean():+.2f}   vs   -KL(pi_ref || pi) = "
      f"{sum_rule_rhs(policy, reference):+.2f}  (60 pairs: close, not equal)")"""),
    check_cell([9, 10]),
]

NB05 = [
    header("05", "A training step, the reference, and a β sweep", 40, [11, 12, 13], """
You will get a DPO loss stuck at ln 2 and unstick it, compute the reference log-probs without paying for their
activations, and read a β sweep the right way round."""),
    code(SETUP + """
from minidpo.grading import TinyLM, toy_batch

batch = toy_batch(seed=0)  # 4 pairs in PreferenceCollator's format: chosen_/rejected_ input_ids, attention_mask, labels
print({k: tuple(v.shape) for k, v in batch.items()})
print("chosen labels:", batch["chosen_labels"][0].tolist(), "(-100: prompt and padding)")"""),
    md("""## A loss stuck at ln 2

Here is a training loop with a bug that users of DPO trainers report again and again: the loss sits at
0.6931 and never moves. Run it. (The bug is in one line: find it before you read on.)"""),
    code("""def buggy_training(steps=5):
    policy = TinyLM(seed=1)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    for _ in range(steps):
        logps = {}
        for side in ("chosen", "rejected"):
            logits = policy(input_ids=batch[f"{side}_input_ids"]).logits
            logps[side] = minidpo.sequence_logps(logits, batch[f"{side}_labels"])
        ref = {side: logps[side] for side in logps}  # the reference log-probs
        loss = minidpo.preference_loss(logps["chosen"], logps["rejected"], ref["chosen"], ref["rejected"],
                                       beta=0.5)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"{loss.item():.4f}", end="  ")


buggy_training()"""),
    md("""The reference *is* the policy, so $h\\equiv0$: the loss is $\\ln 2$ and its gradient is exactly zero at
every step. The same flat line appears when every label is −100 (both log-probs are 0), or when the policy's
forward runs under `torch.no_grad()` or with frozen parameters. The fix is a **frozen** reference whose
log-probs are computed once, before training."""),
    exercise(11, """
## Exercise 11 · One DPO training step

Write `dpo_step(policy, optimizer, batch, ref_chosen_logps, ref_rejected_logps, beta)`: score the batch's chosen
and rejected completions with the policy (summed log-probs over the counted tokens; `minidpo.sequence_logps` or
your `seq_logps` from exercise 8), take the **mean** DPO loss against the given reference log-probs, and make one
optimizer step. Return the loss as a float. The grader redoes your step independently, twice (so gradients that
pile up across calls show), and checks that the loss starts at ln 2 and then leaves it.""", """
def dpo_step(policy, optimizer, batch, ref_chosen_logps, ref_rejected_logps, beta):
    \"\"\"One optimizer step on the mean DPO loss; returns the loss as a float.\"\"\"
    raise NotImplementedError("Exercise 11: write one training step")""", """
def dpo_step(policy, optimizer, batch, ref_chosen_logps, ref_rejected_logps, beta):
    \"\"\"One optimizer step on the mean DPO loss; returns the loss as a float.\"\"\"
    chosen = minidpo.sequence_logps(policy(input_ids=batch["chosen_input_ids"],
                                           attention_mask=batch["chosen_attention_mask"]).logits,
                                    batch["chosen_labels"])  # (B,)
    rejected = minidpo.sequence_logps(policy(input_ids=batch["rejected_input_ids"],
                                             attention_mask=batch["rejected_attention_mask"]).logits,
                                      batch["rejected_labels"])  # (B,)
    h = (chosen - ref_chosen_logps) - (rejected - ref_rejected_logps)  # (B,)
    loss = -F.logsigmoid(beta * h).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()"""),
    exercise(12, """
## Exercise 12 · Reference log-probs, without the reference's memory

The reference model is never trained, so its forward pass must not build an autograd graph: with autograd on,
every layer keeps its activations for a backward that never comes, and the reference costs as much activation
memory as the policy. (The book chapter's "Implementation Considerations" suggests caching the reference log-probs;
notebook 07 measures what that saves.)

Write `reference_logps(ref_model, batch)` returning `(chosen_logps, rejected_logps)`, each (B,), computed so that
autograd records nothing. Calling `.detach()` on the result is not enough: by then the graph has been built.""", """
def reference_logps(ref_model, batch):
    \"\"\"(chosen_logps, rejected_logps) of the reference, (B,) each, with no autograd graph.\"\"\"
    raise NotImplementedError("Exercise 12: write reference_logps")""", """
def reference_logps(ref_model, batch):
    \"\"\"(chosen_logps, rejected_logps) of the reference, (B,) each, with no autograd graph.\"\"\"
    out = []
    with torch.no_grad():  # no graph: no activations kept, outputs are constants
        for side in ("chosen", "rejected"):
            logits = ref_model(input_ids=batch[f"{side}_input_ids"],
                               attention_mask=batch[f"{side}_attention_mask"]).logits  # (B, T, V)
            out.append(minidpo.sequence_logps(logits, batch[f"{side}_labels"]))
    return tuple(out)"""),
    md("""Now train for real: the reference is a frozen copy of the starting policy, scored once. And measure
what the autograd graph of a reference forward would have kept (`saved_tensors_hooks` sees every tensor autograd
saves for backward):"""),
    code("""policy, ref_model = TinyLM(seed=1), TinyLM(seed=1)
ref_c, ref_r = reference_logps(ref_model, batch)
opt = torch.optim.SGD(policy.parameters(), lr=0.5)
print(" ".join(f"{dpo_step(policy, opt, batch, ref_c, ref_r, beta=0.5):.4f}" for _ in range(8)))

saved = []
with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
    logits = ref_model(input_ids=batch["chosen_input_ids"]).logits
    minidpo.sequence_logps(logits, batch["chosen_labels"])
print(f"a reference forward with autograd on keeps {sum(saved)} bytes for backward; under no_grad: 0")"""),
    md("""## A β sweep

On the exact world the policy at the optimum is known for every β. Below, for three values of β we sample 4,000
responses from π\\*_β (prompts uniform) and score each under π\\*_β and π_ref, as an evaluation of a trained policy
would: `policy_logps`, `reference_logps_s`, `rewards`, one value per sample."""),
    code("""world = minidpo.bandit.make_world(n_prompts=4, n_responses=8, seed=3, reward_scale=2.0)
gen = torch.Generator().manual_seed(0)
sweep = {}
for beta in (0.05, 0.5, 5.0):
    star = minidpo.optimal_policy(world.reference_probs, world.rewards, beta)  # (P, K)
    x = torch.randint(0, 4, (4000,), generator=gen)
    y = torch.multinomial(star[x], 1, generator=gen).squeeze(-1)
    sweep[beta] = (star[x, y].log(), world.reference_probs[x, y].log(), world.rewards[x, y])"""),
    exercise(13, """
## Exercise 13 · Read the sweep

Write `frontier_point(policy_logps, reference_logps, rewards)` returning `(mean_reward, kl)`: the mean true
reward of the samples and the Monte-Carlo estimate of $\\mathrm{KL}(\\pi\\|\\pi_{\\text{ref}})=\\mathbb{E}_{y\\sim\\pi}
[\\log\\pi(y|x)-\\log\\pi_{\\text{ref}}(y|x)]$, the two axes of the DPO paper's frontier plot. Print the point for
each β (cell below), then set:

- `closest_beta`: the β of the sweep whose policy stays closest to π_ref (0.05, 0.5 or 5.0);
- `verdict_002`: the tutorial article says "higher β increases divergence from the reference; small β keeps the
  model closer to the base". Is that `"holds"` or `"wrong"`?""", """
def frontier_point(policy_logps, reference_logps, rewards):
    \"\"\"(mean reward, Monte-Carlo KL(pi || pi_ref)) from samples y ~ pi.\"\"\"
    raise NotImplementedError("Exercise 13: write frontier_point")


closest_beta = None  # 0.05, 0.5 or 5.0
verdict_002 = None  # "holds" or "wrong"
raise NotImplementedError("Exercise 13: read the sweep")""", """
def frontier_point(policy_logps, reference_logps, rewards):
    \"\"\"(mean reward, Monte-Carlo KL(pi || pi_ref)) from samples y ~ pi.\"\"\"
    return rewards.mean(), (policy_logps - reference_logps).mean()


closest_beta = 5.0  # smallest KL: beta is the price of each nat away from pi_ref
verdict_002 = "wrong\""""),
    code("""for beta, (lp, lr, rw) in sweep.items():
    reward, kl = frontier_point(lp, lr, rw)
    print(f"beta = {beta:>4}:  reward {float(reward):+.3f}   KL(pi || pi_ref) {float(kl):.3f}")"""),
    check_cell([11, 12, 13]),
]

NB06 = [
    header("06", "Variants: rankings, IPO and cDPO", 30, [14, 15], """
You will extend DPO from pairs to rankings (Plackett–Luce, where Z(x) cancels again), and find where IPO and
conservative DPO stop pushing the margin."""),
    code(SETUP),
    exercise(14, """
## Exercise 14 · Plackett–Luce: DPO for rankings

When a labeller ranks $K$ responses $y_1\\succ y_2\\succ\\dots\\succ y_K$, the Plackett–Luce model picks them one at a
time: the best among all, then the best among those left, and so on,

$$p(y_1\\succ\\dots\\succ y_K|x)=\\prod_{k=1}^{K}\\frac{\\exp r(x,y_k)}{\\sum_{j=k}^{K}\\exp r(x,y_j)} .$$

Put in $r=\\beta\\log\\frac{\\pi}{\\pi_{\\text{ref}}}+\\beta\\log Z(x)$ (exercise 4): every factor's numerator and
denominator carry the same $Z(x)^\\beta$, which cancels, as it did for pairs (the DPO paper, Appendix A.3). The loss
is the negative log of the product, with $u_k=\\log\\frac{\\pi_\\theta(y_k|x)}{\\pi_{\\text{ref}}(y_k|x)}$.

Write `plackett_luce_loss(logratios, beta)`: logratios (B, K), each row ranked **best first**, returns (B,).
For $K=2$ it must be the DPO loss. (`torch.logcumsumexp` helps with the sums over "those left".)""", """
def plackett_luce_loss(logratios, beta):
    \"\"\"-log p(ranking) under Plackett-Luce with r = beta * logratio; rows ranked best first. (B,)\"\"\"
    raise NotImplementedError("Exercise 14: write the Plackett-Luce loss")""", """
def plackett_luce_loss(logratios, beta):
    \"\"\"-log p(ranking) under Plackett-Luce with r = beta * logratio; rows ranked best first. (B,)\"\"\"
    z = beta * logratios  # (B, K)
    left = torch.logcumsumexp(z.flip(-1), dim=-1).flip(-1)  # (B, K): log sum_{j >= k} exp z_j
    return -(z - left).sum(-1)  # the last factor is exp z_K / exp z_K = 1, so it adds 0"""),
    code("""u = torch.tensor([[1.0, -0.5], [0.2, 0.9]])
print("K = 2:", plackett_luce_loss(u, 0.5), " DPO:", -F.logsigmoid(0.5 * (u[:, 0] - u[:, 1])))"""),
    exercise(15, """
## Exercise 15 · Where IPO and cDPO stop

DPO's loss keeps falling as the margin $h$ grows, so with deterministic labels it never stops pushing. Two
variants have a finite target:

- IPO (Azar et al. 2023, Eq. 17): $(h-\\frac{1}{2\\beta})^2$, on summed log-probs;
- conservative DPO (cDPO): $-(1-\\varepsilon)\\log\\sigma(\\beta h)-\\varepsilon\\log\\sigma(-\\beta h)$ for a label
  that is wrong with probability ε.

Write `ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)`
(per pair, (B,)) and `cdpo_margin(beta, eps)`: the margin $h$ at which the cDPO loss is smallest (set its
derivative in $h$ to zero; sympy can do it). Which way does β move each target?""", """
def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    \"\"\"IPO's per-pair loss, (B,).\"\"\"
    raise NotImplementedError("Exercise 15: write the IPO loss")


def cdpo_margin(beta, eps):
    \"\"\"The margin h that minimises the cDPO loss.\"\"\"
    raise NotImplementedError("Exercise 15: find the cDPO margin")""", """
def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    \"\"\"IPO's per-pair loss, (B,).\"\"\"
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return (h - 1 / (2 * beta)) ** 2


def cdpo_margin(beta, eps):
    \"\"\"The margin h that minimises the cDPO loss.\"\"\"
    # d/dh: -(1-eps) beta sigma(-beta h) + eps beta sigma(beta h) = 0  <=>  sigma(beta h) = 1 - eps
    return math.log((1 - eps) / eps) / beta"""),
    code("""h, b, e = sp.symbols("h beta epsilon", positive=True)
sig = lambda v: 1 / (1 + sp.exp(-v))  # noqa: E731
cdpo = -(1 - e) * sp.log(sig(b * h)) - e * sp.log(sig(-b * h))
print("sympy: d cDPO / dh = 0 at h =", sp.solve(sp.diff(cdpo, h), h))
print("your margins at beta = 0.1, 1:", cdpo_margin(0.1, 0.1), cdpo_margin(1.0, 0.1))"""),
    check_cell([14, 15]),
]

NB07 = [
    header("07", "Checking a claim: the best-of-n KL", 25, [16], """
Notebook 07 checks every claim of the source texts. Here you check one yourself: a formula quoted everywhere for
the KL of best-of-n sampling, on a world with integer rewards (so ties happen)."""),
    code(SETUP + """

world, features, names = minidpo.bandit.make_review_world()
ref0, r0 = world.reference_probs[0], world.rewards[0]  # one prompt: 19 responses, rewards -3 .. 3
print(list(zip(names, r0.tolist()))[:6], "...")"""),
    exercise(16, """
## Exercise 16 · The exact KL of best-of-n

Best-of-n draws $n$ responses from π_ref and keeps the one with the highest reward (ties broken at random). Its
KL to π_ref is often quoted as $\\log n-\\frac{n-1}{n}$ (Stiennon et al. 2020). With $F(v)$ the π_ref-probability
that a response's reward is at most $v$, the kept response's reward is $v$ with probability
$q(v)=F(v)^n-F(v^-)^n$, and within a reward value the kept response is distributed as under π_ref. So

$$\\mathrm{KL}(\\pi_{\\text{bon}}\\|\\pi_{\\text{ref}})=\\sum_v q(v)\\log\\frac{q(v)}{p(v)},\\qquad p(v)=\\pi_{\\text{ref}}(r=v).$$

Write `best_of_n_kl(reference_probs, rewards, n)` for one prompt (tensors (K,)), returning the exact KL. Then
compare it with the formula for n = 1 … 16 (cell below) and set `formula_verdict` to `"exact"`,
`"upper bound"` or `"lower bound"`.""", """
def best_of_n_kl(reference_probs, rewards, n):
    \"\"\"Exact KL(pi_bon || pi_ref) for one prompt, ties broken at random.\"\"\"
    raise NotImplementedError("Exercise 16: write best_of_n_kl")


formula_verdict = None  # "exact", "upper bound" or "lower bound"
raise NotImplementedError("Exercise 16: give the verdict")""", """
def best_of_n_kl(reference_probs, rewards, n):
    \"\"\"Exact KL(pi_bon || pi_ref) for one prompt, ties broken at random.\"\"\"
    values = torch.unique(rewards)  # sorted ascending
    p = torch.stack([reference_probs[rewards == v].sum() for v in values])  # (V,) p(v)
    cdf = p.cumsum(0)  # F(v)
    below = torch.cat([cdf.new_zeros(1), cdf[:-1]])  # F(v-)
    q = cdf ** n - below ** n  # (V,) the kept reward's distribution
    keep = q > 0
    return (q[keep] * (q[keep] / p[keep]).log()).sum()


formula_verdict = "upper bound\""""),
    code("""for n in (1, 2, 4, 8, 16):
    print(f"n = {n:>2}: exact {float(best_of_n_kl(ref0, r0, n)):.3f}   formula {math.log(n) - (n - 1) / n:.3f}")"""),
    md("""Beirami et al. (2024, *Theoretical guarantees on the best-of-n alignment policy*, arXiv:2401.01879) prove
the formula is an upper bound, reached only in the limit where no two responses share a reward; notebook 05 §6
draws both on the GPT-2 world."""),
    check_cell([16]),
]

NOTEBOOKS = {FILES[nn][0]: cells for nn, cells in
             zip(FILES, (NB01, NB02, NB03, NB04, NB05, NB06, NB07))}


def build(cells, solution: bool):
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for item in cells:
        if item[0] == "md":
            nb.cells.append(new_markdown_cell(item[1]))
        elif item[0] == "code":
            nb.cells.append(new_code_cell(item[1]))
        else:
            _, number, statement, stub, sol = item
            nb.cells.append(new_markdown_cell(statement))
            cell = new_code_cell(sol if solution else stub)
            cell.metadata["tags"] = [f"exercise-{number}"]
            nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids, so a rebuild does not change unchanged cells
        cell["id"] = f"cell-{i:02d}"
    return nb


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true",
                        help="run each solution notebook and keep its outputs (what a teacher reads on GitHub)")
    args = parser.parse_args()
    (HERE / "solutions").mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells, solution=False), HERE / f"{name}.ipynb")  # students get no outputs
        solution = build(cells, solution=True)
        if args.execute:
            import subprocess

            from nbclient import NotebookClient

            client = NotebookClient(solution, timeout=300, kernel_name="python3",
                                    resources={"metadata": {"path": str(HERE / "solutions")}})
            client.execute(stderr=subprocess.DEVNULL)  # the kernel's start-up chatter, not the cells' output
        nbformat.write(solution, HERE / "solutions" / f"{name}.ipynb")
        print(f"wrote exercises/{name}.ipynb and exercises/solutions/{name}.ipynb"
              + (" (executed)" if args.execute else ""))


if __name__ == "__main__":
    main()
