"""Evaluation against the synthetic world's known reward: true reward, sequence KL, implicit-reward accuracy.

These are the three numbers of the DPO paper's controlled-sentiment experiment, measured instead of guessed:

- mean true reward of completions sampled from the policy on held-out prompts (± standard error);
- the sequence-level KL(π‖π_ref) = E_{y~π(·|x)}[log π(y|x) − log π_ref(y|x)], estimated by Monte Carlo on
  the same samples (± standard error): the exact sampled tokens, EOS included when the model stopped, are
  scored by both models with `minidpo.logps.completion_logps`;
- implicit-reward accuracy on held-out preference pairs: how often β(log π(y_w) − log π_ref(y_w)) exceeds
  β(log π(y_l) − log π_ref(y_l)).

Everything runs under `torch.no_grad()`, in batches, and is seeded: the same seed gives the same numbers.
The reward function defaults to `minidpo.world.reward`; pass `reward_fn` for another one.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from . import world
from .data import PreferenceCollator
from .logps import IGNORE_INDEX, completion_logps, concatenated_forward


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) = (x̄, s / √n) with the sample standard deviation s (n − 1).

    The standard error is NaN for a single value (it cannot be estimated); an empty list is a ValueError.
    """
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_and_se: got no values")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, float("nan")
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def mean_reward(texts: Sequence[str], reward_fn: Callable[[str], float] | None = None) -> tuple[float, float]:
    """(mean, standard error) of the true reward over `texts` (completions, without their prompts)."""
    if isinstance(texts, str):
        raise ValueError("mean_reward: texts must be a list of strings, not one string")
    reward_fn = reward_fn or world.reward
    return mean_and_se([reward_fn(t) for t in texts])


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_completions(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                      batch_size: int = 256, pad_token_id: int = 0) -> torch.Tensor:
    """log π(completion | prompt) summed over the completion's tokens, for token-id lists; (N,) float32 on CPU.

    Rows are right-padded (the pad id is never attended to nor counted) and scored in batches with
    `minidpo.logps.completion_logps`.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"score_completions: {len(prompt_ids)} prompts but {len(completion_ids)} completions")
    device = _device(model)
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = pack_completions(prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size],
                                 pad_token_id)
        logps = completion_logps(model, *(t.to(device) for t in batch))
        out.append(logps.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def pack_completions(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                     pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (N, T): prompt + completion right-padded, labels -100 except
    on the completion's tokens, what ``logps.completion_logps`` takes (here and in ``minidpo.online``)."""
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)  # (N, T)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)  # (N, T)
    labels = torch.full((len(prompt_ids), width), IGNORE_INDEX, dtype=torch.long)  # (N, T)
    for r, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        n = len(p) + len(c)
        input_ids[r, :n] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention[r, :n] = 1
        labels[r, len(p):n] = torch.tensor(list(c), dtype=torch.long)
    return input_ids, attention, labels


def sample_and_score(model, tokenizer, prompts: Sequence[str], n_samples: int = 1, max_new_tokens: int = 24,
                     temperature: float = 1.0, seed: int = 0, batch_size: int = 256,
                     reward_fn: Callable[[str], float] | None = None) -> dict:
    """Sample `n_samples` completions per prompt and score them with the true reward.

    Returns {"completions": list[list[str]], "rewards": list[list[float]], "reward": mean, "reward_se": SE}.
    """
    reward_fn = reward_fn or world.reward
    completions = world.sample_completions(model, tokenizer, list(prompts), k=n_samples,
                                           max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                           batch_size=batch_size)
    rewards = [[float(reward_fn(c)) for c in per_prompt] for per_prompt in completions]
    mean, se = mean_and_se([r for per_prompt in rewards for r in per_prompt])
    return {"completions": completions, "rewards": rewards, "reward": mean, "reward_se": se}


def _kl_terms(policy, reference, prompt_ids, completion_ids, batch_size, pad_token_id, policy_logps=None):
    """Per-sample log π(y|x) − log π_ref(y|x) for the flattened samples. ``policy_logps``: π's log-probs of the
    samples as sampling read them (``generate_completion_ids(..., return_logps=True)``); else scored here."""
    flat_prompts = [p for p, per in zip(prompt_ids, completion_ids) for _ in per]
    flat_completions = [c for per in completion_ids for c in per]
    if reference is policy:  # the same model scores both sides: exactly 0
        return [0.0] * len(flat_completions)
    if policy_logps is not None:
        pol = torch.tensor([v for per in policy_logps for v in per], dtype=torch.float32)
    else:
        pol = score_completions(policy, flat_prompts, flat_completions, batch_size, pad_token_id)
    ref = score_completions(reference, flat_prompts, flat_completions, batch_size, pad_token_id)
    return (pol - ref).tolist()


def sequence_kl(policy, reference, tokenizer, prompts: Sequence[str], n_samples: int = 1,
                max_new_tokens: int = 24, seed: int = 0, batch_size: int = 256) -> tuple[float, float]:
    """Monte-Carlo sequence KL(π‖π_ref) = E_x E_{y~π(·|x)}[log π(y|x) − log π_ref(y|x)], with its SE.

    `n_samples` completions per prompt are sampled from the policy at temperature 1 (the estimator needs
    samples from π itself), and the exact sampled tokens (EOS included when the policy stopped) are scored by
    both models, in the pass that samples them (`_sample_with_kl_terms`). Returns (mean, standard error over
    all samples). Each term can be negative; the mean converges to the KL, which is >= 0. A model against
    itself gives exactly 0.
    """
    _, _, terms = _sample_with_kl_terms(policy, reference, tokenizer, list(prompts), n_samples, seed,
                                        max_new_tokens, batch_size)
    return mean_and_se(terms)


def _sample_with_kl_terms(policy, reference, tokenizer, prompts, k, seed, max_new_tokens, batch_size):
    """`k` samples of π per prompt and, per sample, log π(y|x) − log π_ref(y|x): (prompt_ids, completion_ids,
    terms). Two GPT-2s that `multiseed` can run (the course's world) take one pass that draws the samples and
    scores them under both (`multiseed.sample`: the draws generate() makes from the same seed and batches, with
    rows that ended dropped from the batch); other models sample with generate(), which reads π's log-probs,
    and π_ref scores the samples in one forward."""
    from . import multiseed

    stacked = None
    if policy is not reference:
        try:
            stacked = multiseed.stack([policy]), multiseed.stack([reference])
        except ValueError:  # not a GPT-2 that multiseed runs
            pass
        if stacked and any(v.shape != stacked[1][n].shape or v.device != stacked[1][n].device
                           for n, v in stacked[0].items()):
            stacked = None
    if stacked is None:
        prompt_ids, completion_ids, logps = world.generate_completion_ids(
            policy, tokenizer, prompts, k=k, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
            batch_size=batch_size, return_logps=True)
        return prompt_ids, completion_ids, _kl_terms(policy, reference, prompt_ids, completion_ids, batch_size,
                                                     _pad_id(tokenizer), logps)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; generation would never stop")
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completions, logp, ref_logp = multiseed.sample(stacked[0], policy.config, prompt_ids, k, [seed],
                                                   tokenizer.eos_token_id, _pad_id(tokenizer),
                                                   max_new_tokens=max_new_tokens, reference=stacked[1],
                                                   batch_size=batch_size)
    return prompt_ids, completions[0], (logp[0] - ref_logp[0]).tolist()


def _pad_id(tokenizer) -> int:
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


# ------------------------------------------------------------------------------------ implicit reward

@torch.no_grad()
def pair_logps(model, pairs_tokenized: Sequence[dict], batch_size: int = 64, pad_token_id: int = 0) -> dict:
    """{"chosen_logps", "rejected_logps"}: (N,) float32 CPU tensors of summed completion log-probs.

    `pairs_tokenized` is what `minidpo.data.tokenize_preferences` returns (dicts with chosen_input_ids,
    chosen_labels, rejected_input_ids, rejected_labels; labels -100 on the prompt), or a Dataset of such rows.
    Computed with `minidpo.logps.concatenated_forward`, exactly as in training. Precompute this once for the
    reference and pass it to `implicit_reward_accuracy` to avoid scoring the reference again.
    """
    rows = list(pairs_tokenized)
    device = _device(model)
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for start in range(0, len(rows), batch_size):
            batch = PreferenceCollator(pad_token_id)(rows[start:start + batch_size])
            out = concatenated_forward(model, {k: v.to(device) for k, v in batch.items()})
            chosen.append(out["chosen_logps"].float().cpu())
            rejected.append(out["rejected_logps"].float().cpu())
    finally:
        model.train(was_training)
    empty = torch.zeros(0)
    return {"chosen_logps": torch.cat(chosen) if chosen else empty,
            "rejected_logps": torch.cat(rejected) if rejected else empty}


def _as_logps(model_or_logps, pairs_tokenized, batch_size, pad_token_id, what):
    if isinstance(model_or_logps, torch.nn.Module):
        return pair_logps(model_or_logps, pairs_tokenized, batch_size, pad_token_id)
    if isinstance(model_or_logps, dict):
        c, r = model_or_logps["chosen_logps"], model_or_logps["rejected_logps"]
    elif isinstance(model_or_logps, (tuple, list)) and len(model_or_logps) == 2:
        c, r = model_or_logps
    else:
        raise ValueError(f"{what} must be a model, a dict with chosen_logps/rejected_logps, or a pair of "
                         f"tensors; got {type(model_or_logps).__name__}")
    return {"chosen_logps": torch.as_tensor(c, dtype=torch.float32).cpu(),
            "rejected_logps": torch.as_tensor(r, dtype=torch.float32).cpu()}


def _policy_and_reference_logps(policy, reference, pairs_tokenized, batch_size: int, pad_token_id: int, caller: str):
    """(rows, policy log-probs, reference log-probs) for the same pairs, each a model or precomputed dict."""
    rows = list(pairs_tokenized)
    if not rows:
        raise ValueError(f"{caller}: got no pairs")
    pol = _as_logps(policy, rows, batch_size, pad_token_id, "policy")
    ref = _as_logps(reference, rows, batch_size, pad_token_id, "reference")
    for name, d in (("policy", pol), ("reference", ref)):
        if d["chosen_logps"].shape != (len(rows),) or d["rejected_logps"].shape != (len(rows),):
            raise ValueError(f"{name} log-probs have shapes {tuple(d['chosen_logps'].shape)} and "
                             f"{tuple(d['rejected_logps'].shape)}, expected ({len(rows)},) for {len(rows)} pairs")
    return rows, pol, ref


def implicit_reward_accuracy(policy, reference_or_reference_logps, pairs_tokenized: Sequence[dict],
                             beta: float = 0.1, batch_size: int = 64, pad_token_id: int = 0) -> float:
    """Fraction of pairs where the implicit reward prefers the chosen completion.

    The implicit reward is r̂(x, y) = β (log π(y|x) − log π_ref(y|x)); a pair counts as correct when
    r̂(x, y_w) > r̂(x, y_l). Ties (equal implicit rewards, e.g. policy == reference) count as 0.5, a coin
    flip, so the reference itself scores exactly 0.5, the chance level. (TRL's `rewards/accuracies` counts a
    tie as wrong, which would give the reference 0.) For β > 0 the result does not depend on β; it is taken
    for the record and checked.

    `policy` is a model or precomputed log-probs; `reference_or_reference_logps` is a model or the output of
    `pair_logps` (a dict with chosen_logps and rejected_logps) or a (chosen, rejected) tuple of tensors.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    rows, pol, ref = _policy_and_reference_logps(policy, reference_or_reference_logps, pairs_tokenized, batch_size,
                                                 pad_token_id, "implicit_reward_accuracy")
    chosen_rewards = beta * (pol["chosen_logps"] - ref["chosen_logps"])
    rejected_rewards = beta * (pol["rejected_logps"] - ref["rejected_logps"])
    # Log-probs summed in another batch layout differ in the last float32 bits; closer than that is a tie.
    margin = chosen_rewards - rejected_rewards
    tie = margin.abs() <= 1e-5 * beta * (1 + pol["chosen_logps"].abs() + pol["rejected_logps"].abs())
    wins = ((margin > 0) & ~tie).double() + 0.5 * tie.double()
    return float(wins.mean())


# ------------------------------------------------------------------------------------ all together

def _tokenize_if_needed(pairs, tokenizer):
    if "chosen_input_ids" in pairs[0]:
        return list(pairs)
    from .data import tokenize_preferences  # strings: tokenize as training does

    tokenized, _ = tokenize_preferences(pairs, tokenizer)
    return tokenized


@torch.no_grad()
def evaluate_policy(policy, reference, tokenizer, heldout_prompts: Sequence[str], heldout_pairs=None,
                    beta: float = 0.1, n_samples: int = 2, seed: int = 0, max_new_tokens: int = 24,
                    batch_size: int = 256, n_show: int = 5, reference_pair_logps: dict | None = None,
                    reward_fn: Callable[[str], float] | None = None) -> dict:
    """Sample from the policy on held-out prompts and report what the synthetic world can measure.

    One set of samples (`n_samples` per prompt, temperature 1, `seed`) serves both the reward and the KL.
    Returns a dict of plain Python values (JSON-ready):

    - reward, reward_se: mean true reward of the completions, and its standard error;
    - kl, kl_se: Monte-Carlo sequence KL(π‖π_ref) on those samples (0.0 when policy is reference);
    - accuracy: implicit-reward accuracy on `heldout_pairs` (ties 0.5), None without pairs;
    - length: mean completion length in words; grammatical: fraction of prompt + completion that the
      world's grammar accepts (2 to 4 sentences);
    - n: number of samples; samples: the first `n_show` as "prompt → completion" strings.

    `heldout_pairs`: tokenized pairs (see `pair_logps`) or a Dataset / list of string rows (prompt, chosen,
    rejected), which are then tokenized with `minidpo.data.tokenize_preferences`. `reference_pair_logps`:
    `pair_logps(reference, ...)` computed once, to reuse across many policies (a β sweep).
    """
    reward_fn = reward_fn or world.reward
    prompts = list(heldout_prompts)
    if not prompts:
        raise ValueError("evaluate_policy: got no held-out prompts")
    prompt_ids, completion_ids, kl_terms = _sample_with_kl_terms(policy, reference, tokenizer, prompts, n_samples,
                                                                 seed, max_new_tokens, batch_size)
    texts = [[world.decode_completion(tokenizer, ids) for ids in per] for per in completion_ids]
    flat = [(p, c) for p, per in zip(prompts, texts) for c in per]
    rewards = [reward_fn(c) for _, c in flat]
    reward_mean, reward_se = mean_and_se(rewards)
    pad = _pad_id(tokenizer)
    kl, kl_se = mean_and_se(kl_terms)

    accuracy = None
    if heldout_pairs is not None and len(heldout_pairs) > 0:
        rows = _tokenize_if_needed(heldout_pairs, tokenizer)
        ref = reference_pair_logps if reference_pair_logps is not None else reference
        accuracy = implicit_reward_accuracy(policy, ref, rows, beta=beta, batch_size=min(batch_size, 128),
                                            pad_token_id=pad)
    return {
        "reward": reward_mean,
        "reward_se": reward_se,
        "kl": kl,
        "kl_se": kl_se,
        "accuracy": accuracy,
        "length": sum(world.n_words(c) for _, c in flat) / len(flat),
        "grammatical": sum(world.is_grammatical(p + c, 2, 4) for p, c in flat) / len(flat),
        "n": len(flat),
        "rewards": rewards,  # per sample, for histograms
        "completions": [c for _, c in flat],  # per sample: to score them again with another reward
        "samples": [f"{p} →{c}" for p, c in flat[:n_show]],
    }


# ------------------------------------------------------------------------------------ where the mass goes

@torch.no_grad()
def next_token_mass(model, tokenizer, prompts: Sequence[str], groups: dict[str, Sequence[str]],
                    batch_size: int = 256) -> dict[str, float]:
    """The model's exact next-token distribution right after each prompt, summed over groups of tokens.

    ``groups`` maps a name to strings that are each ONE token of ``tokenizer`` (for the synthetic world a word
    with its leading space, " great", or ``tokenizer.eos_token``). Returns {name: mean over prompts of
    π(next token in the group | prompt)} plus "other": the mass on every token in no group. The values add
    up to 1. Nothing is sampled, so two models can be compared without Monte-Carlo noise.
    """
    prompts = list(prompts)
    if not prompts or isinstance(prompts, str):
        raise ValueError("next_token_mass: prompts must be a non-empty list of strings")
    if "other" in groups:
        raise ValueError("next_token_mass: 'other' is reserved for the tokens in no group")
    ids: dict[str, list[int]] = {}
    seen: dict[int, str] = {}
    for name, texts in groups.items():
        ids[name] = []
        for text in texts:
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) != 1:
                raise ValueError(f"next_token_mass: {text!r} (group {name!r}) is {len(encoded)} tokens, not one")
            if encoded[0] in seen:
                raise ValueError(f"next_token_mass: {text!r} is in groups {seen[encoded[0]]!r} and {name!r}")
            seen[encoded[0]] = name
            ids[name].append(encoded[0])
    device, pad = _device(model), _pad_id(tokenizer)
    encoded_prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(len(p) == 0 for p in encoded_prompts):
        raise ValueError("next_token_mass: every prompt must have at least one token")
    was_training = model.training
    model.eval()
    totals = {name: 0.0 for name in ids}
    try:
        for start in range(0, len(encoded_prompts), batch_size):
            rows = encoded_prompts[start:start + batch_size]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # right-padded: positions stay 0..n-1
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                input_ids[i, :len(r)] = torch.tensor(r)
                attention[i, :len(r)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits  # (B, T, V)
            last = torch.tensor([len(r) - 1 for r in rows], device=logits.device)
            probs = torch.softmax(logits[torch.arange(len(rows), device=logits.device), last].float(), -1)  # (B, V)
            for name, token_ids in ids.items():
                totals[name] += float(probs[:, token_ids].sum())
    finally:
        model.train(was_training)
    out = {name: total / len(prompts) for name, total in totals.items()}
    out["other"] = max(0.0, 1.0 - sum(out.values()))
    return out


# ------------------------------------------------------------------------------------ best-of-n

def best_of_n_kl_bound(n: int) -> float:
    """log n − (n − 1)/n: the KL(π_bon ‖ π_ref) long quoted for best-of-n (Stiennon et al. 2020).

    Beirami et al. 2024 (arXiv:2401.01879) show it is an upper bound, reached only when the reward takes a
    different value on every response (no ties): `best_of_n` computes the actual KL.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a whole number >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n(rewards_per_prompt: Sequence[Sequence[float]], ns: Sequence[int],
              true_rewards_per_prompt: Sequence[Sequence[float]] | None = None) -> list[dict]:
    """Best-of-n sampling from π_ref, computed exactly from reward samples: expected reward and KL(π_bon‖π_ref).

    ``rewards_per_prompt[i]`` holds the true rewards of N samples from π_ref for prompt i; their empirical
    distribution stands in for π_ref's reward distribution on that prompt (a plug-in estimate). Best-of-n
    draws n responses and keeps one with the highest reward, ties broken at random. With F the reward's
    CDF under π_ref, the kept response's reward is v with probability q(v) = F(v)^n − F(v⁻)^n, and within a
    reward level the kept response is distributed as π_ref restricted to that level, so exactly
        E[r] = Σ_v q(v) v,     KL(π_bon ‖ π_ref) = Σ_v q(v) log(q(v) / p(v)),    p(v) = F(v) − F(v⁻).
    Ties (the synthetic world's reward is a whole number) make the KL smaller than ``best_of_n_kl_bound``.

    Returns one dict per n, averaged over prompts: {"n", "reward", "kl", "kl_bound"}.

    ``true_rewards_per_prompt``: the same samples scored by another reward (the true one, when ``rewards_per_prompt``
    is a learned reward model's): the selection still follows ``rewards_per_prompt``, and "reward" is then the
    expected TRUE reward of the kept response, sum_v q(v) E[true reward | selection reward = v].
    """
    rows = [list(map(float, r)) for r in rewards_per_prompt]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("best_of_n: need at least one prompt, each with at least one reward sample")
    truths = rows if true_rewards_per_prompt is None else [list(map(float, t)) for t in true_rewards_per_prompt]
    if [len(t) for t in truths] != [len(r) for r in rows]:
        raise ValueError("best_of_n: true_rewards_per_prompt must have one value per sample of rewards_per_prompt")
    levels = []  # per prompt: (p(v), mean true reward at v) for each selection-reward level v, in order
    for r, truth in zip(rows, truths):
        at: dict[float, list[float]] = {}
        for v, t in zip(r, truth):
            at.setdefault(v, []).append(t)
        levels.append([(len(at[v]) / len(r), sum(at[v]) / len(at[v])) for v in sorted(at)])
    out = []
    for n in ns:
        bound = best_of_n_kl_bound(n)
        reward = kl = 0.0
        for per_level in levels:
            cdf = 0.0
            for pv, mean_truth in per_level:  # the kept response is uniform within its level
                q = (cdf + pv) ** n - cdf ** n
                cdf += pv
                reward += q * mean_truth
                if q > 0:
                    kl += q * math.log(q / pv)
        out.append({"n": int(n), "reward": reward / len(rows), "kl": kl / len(rows), "kl_bound": bound})
    return out


# ------------------------------------------------------------------------------------ comparing objectives

def logprob_shift(policy, reference_or_reference_logps, pairs_tokenized: Sequence[dict], batch_size: int = 64,
                  pad_token_id: int = 0) -> dict:
    """How far training moved log π(y|x) from π_ref on the chosen and on the rejected completions of `pairs`.

    Returns {"chosen", "chosen_se", "rejected", "rejected_se", "margin", "margin_se", "n"}: the mean (and its
    standard error) over pairs of log π(y_w|x) − log π_ref(y_w|x), of the same for y_l, and of their
    difference (the quantity every paired objective pushes up). Nats, summed over the completion's tokens.
    Unlike TRL's rewards/chosen it needs no β, so objectives without a reference (SimPO, ORPO) can be put on
    the same axis as DPO. Both numbers below 0 is preference displacement: the chosen answers lost probability
    too. `reference_or_reference_logps`: a model or `pair_logps(reference, ...)` computed once.
    """
    rows, pol, ref = _policy_and_reference_logps(policy, reference_or_reference_logps, pairs_tokenized, batch_size,
                                                 pad_token_id, "logprob_shift")
    chosen = (pol["chosen_logps"] - ref["chosen_logps"]).tolist()
    rejected = (pol["rejected_logps"] - ref["rejected_logps"]).tolist()
    out = {"n": len(rows)}
    for key, values in (("chosen", chosen), ("rejected", rejected),
                        ("margin", [c - r for c, r in zip(chosen, rejected)])):
        out[key], out[f"{key}_se"] = mean_and_se(values)
    return out


def length_preference(pairs, length_fn: Callable[[str], int] | None = None) -> dict:
    """How much a set of labelled pairs rewards length, and how often the label goes against the true reward.

    `pairs` has columns chosen and rejected (strings) and, optionally, chosen_reward and rejected_reward.
    Returns {"n", "n_unequal", "chosen_longer", "chosen_words", "rejected_words", "lower_reward_chosen"}:
    chosen_longer is the fraction of pairs of unequal length whose chosen completion is the longer one (0.5 for a
    labeller blind to length, when length and reward are unrelated); chosen_words and rejected_words are mean
    lengths; lower_reward_chosen is the fraction of all pairs whose chosen completion has the strictly lower
    true reward (None without reward columns). Length is `minidpo.world.n_words` unless `length_fn` is given.
    """
    length_fn = length_fn or world.n_words
    chosen, rejected = list(pairs["chosen"]), list(pairs["rejected"])
    if len(chosen) != len(rejected):
        raise ValueError(f"length_preference: {len(chosen)} chosen but {len(rejected)} rejected")
    if not chosen:
        raise ValueError("length_preference: got no pairs")
    lc = [length_fn(t) for t in chosen]
    lr = [length_fn(t) for t in rejected]
    unequal = [(a, b) for a, b in zip(lc, lr) if a != b]
    columns = pairs.column_names if hasattr(pairs, "column_names") else list(pairs.keys())
    lower = None
    if "chosen_reward" in columns and "rejected_reward" in columns:
        rc, rr = list(pairs["chosen_reward"]), list(pairs["rejected_reward"])
        lower = sum(a < b for a, b in zip(rc, rr)) / len(rc)
    return {
        "n": len(chosen),
        "n_unequal": len(unequal),
        "chosen_longer": sum(a > b for a, b in unequal) / len(unequal) if unequal else float("nan"),
        "chosen_words": sum(lc) / len(lc),
        "rejected_words": sum(lr) / len(lr),
        "lower_reward_chosen": lower,
    }


# ------------------------------------------------------------------------------------ matched KL

def at_matched_kl(path: Sequence[dict], kls: Sequence[float], key: str = "kl") -> list[dict]:
    """A training path read at given KL values: every numeric key linearly interpolated where ``key`` = k.

    ``path`` is a run's rows in step order (checkpoints of reward, kl, grammatical, step ...). Objectives
    reach different KLs, so their end points are not comparable: one that went further buys reward with KL.
    Reading each path at the same KL values compares what each bought for the same price (the DPO paper's
    Fig. 2 compares frontiers the same way). For each k the first segment of the path whose KL range holds k
    is used (a path can come back across a KL it passed); a k the path never reaches gives NaN for every key.
    Non-numeric values (lists, strings, None) are left out. Returns one dict per k, with ``key`` = k.
    """
    rows = list(path)
    if not rows:
        raise ValueError("at_matched_kl: the path has no rows")
    if any(key not in r for r in rows):
        raise ValueError(f"at_matched_kl: every row needs {key!r}")
    numeric = [k for k, v in rows[0].items() if k != key and isinstance(v, (int, float)) and not isinstance(v, bool)
               and all(isinstance(r.get(k), (int, float)) for r in rows)]
    xs = [float(r[key]) for r in rows]
    out = []
    for k in kls:
        k = float(k)
        point = {key: k, **{name: float("nan") for name in numeric}}
        segments = [(0, 0)] if len(rows) == 1 else zip(range(len(rows) - 1), range(1, len(rows)))
        for i, j in segments:
            lo, hi = min(xs[i], xs[j]), max(xs[i], xs[j])
            if lo <= k <= hi:
                t = 0.0 if xs[j] == xs[i] else (k - xs[i]) / (xs[j] - xs[i])
                point.update({name: (1 - t) * float(rows[i][name]) + t * float(rows[j][name]) for name in numeric})
                break
        out.append(point)
    return out
