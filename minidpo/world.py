"""The synthetic world: a tiny language of movie reviews with a known reward.

Real DPO runs judge success with a reward model or GPT-4. Here the reward is a formula, so the true reward and
the KL to the reference can be measured exactly, as in the DPO paper's controlled-sentiment experiment (GPT-2
continuing IMDb prefixes, scored by a sentiment classifier), in miniature.

The language
------------
A review is a header and two to four sentences; every sentence has the same shape::

    review : the film was great . the acting felt very dull . the music is quiet .
             ^^^^^^^^^^^^^^^^^^^^ ^^^^^^^^^^^^^^^^^^^^^^^^^^ ^^^^^^^^^^^^^^^^^^^^^^
             "the" SUBJECT VERB [INTENSIFIER] ADJECTIVE "."

with 8 subjects, 4 verbs, 2 intensifiers and 16 adjectives: 6 positive, 6 negative, 4 neutral (the word
lists are `SUBJECTS`, `VERBS`, `INTENSIFIERS`, `POSITIVE`, `NEGATIVE`, `NEUTRAL`; 34 words in all with
"review", ":", "the" and "."). Each review has a hidden mood (positive, negative or mixed, equally likely)
that sets how likely each adjective class is (`MOODS`), so sentences within a review agree more often than
not, as in real reviews. The grammar is seeded: the same `WorldConfig.seed` gives the same corpus.

The reward
----------
`reward(text)` = (number of positive words) − (number of negative words), counting lower-case words
(maximal runs of the letters a–z) in the text that are in `POSITIVE` or `NEGATIVE`. It is defined for any
text at all, including what an untrained model generates ("great great great" scores 3, "xyz" scores 0).
The reward is applied to the completion only: the prompt is given, not chosen by the policy.

Prompts and completions
-----------------------
A prompt is the opening of a review up to the second sentence's verb, and the completion is the rest::

    prompt:     "review : the film was great . the acting felt"
    completion: " very dull . the music is quiet ."

So the policy chooses the second sentence's adjective and whether (and how) to go on; the prompt's first
sentence carries a mood that the reference tends to follow, which DPO must learn to override, like a
negative IMDb prefix continued positively.

Spacing convention: completions start with a space and prompts do not end with one. Words carry the space
before them in the tokenizer (`minidpo.tokenizer`), so tokenizing prompt and completion separately gives
exactly the tokens of prompt + completion (tested for world texts).

Preferences
-----------
`label_pairs` labels two completions of the same prompt by a Bradley–Terry labeller on the true reward,
P(a ≻ b) = σ((r(a) − r(b) + length_bonus · (n_words(a) − n_words(b))) / bt_scale), so the label noise is
known (`label_noise`), and `length_bonus > 0` gives a labeller who likes longer answers (for studying length
exploitation).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass

import torch

HEADER = "review :"
SUBJECTS = ("film", "acting", "plot", "music", "ending", "cast", "story", "script")
VERBS = ("was", "felt", "seemed", "is")
INTENSIFIERS = ("very", "really")
POSITIVE = ("great", "good", "fun", "moving", "wonderful", "brilliant")
NEGATIVE = ("bad", "dull", "boring", "awful", "weak", "poor")
NEUTRAL = ("long", "short", "simple", "quiet")
ADJECTIVES = POSITIVE + NEGATIVE + NEUTRAL
# mood -> probabilities of (positive, negative, neutral) for each sentence's adjective
MOODS = {
    "positive": (0.7, 0.1, 0.2),
    "negative": (0.1, 0.7, 0.2),
    "mixed": (0.35, 0.35, 0.3),
}
VOCABULARY = ("review", ":", "the", ".") + SUBJECTS + VERBS + INTENSIFIERS + ADJECTIVES

_POSITIVE_SET = frozenset(POSITIVE)
_NEGATIVE_SET = frozenset(NEGATIVE)
_WORD = re.compile(r"[a-z]+")
_SENTENCE = (rf"the (?:{'|'.join(SUBJECTS)}) (?:{'|'.join(VERBS)}) "
             rf"(?:(?:{'|'.join(INTENSIFIERS)}) )?(?:{'|'.join(ADJECTIVES)}) \.")


@dataclass
class WorldConfig:
    """Everything that defines one synthetic world; the defaults are the course's demo world."""

    seed: int = 0                  # seeds the grammar (corpus, prompts) and the labeller's coin flips
    n_corpus: int = 6000           # full reviews generated for SFT of the reference model
    min_sentences: int = 2         # sentences per review: uniform on [min_sentences, max_sentences];
    max_sentences: int = 4         # min_sentences must be >= 2 (a prompt cuts inside the second one)
    intensifier_prob: float = 0.25  # chance that a sentence has "very"/"really" before its adjective
    n_train_prompts: int = 1000    # distinct prompts whose sampled completions are labelled for DPO
    n_heldout_prompts: int = 200   # distinct prompts, disjoint from the training ones, for evaluation
    samples_per_prompt: int = 2    # completions sampled from pi_ref per prompt; consecutive ones are paired
    max_new_tokens: int = 24       # generation budget; the grammar's longest completion is 15 tokens + EOS
    temperature: float = 1.0       # sampling temperature for the completions that get labelled
    pair_top_k: int = 50           # the labelled completions come from pi_ref's 50 most likely next tokens
                                   # (transformers' default top-k, with which the course's world was made);
                                   # evaluation always samples the full distribution (top_k=0)
    bt_scale: float = 1.0          # Bradley-Terry temperature: P(a > b) = sigmoid(utility diff / bt_scale);
                                   # larger = noisier labels, 0 = deterministic (ties by a fair coin)
    length_bonus: float = 0.0      # utility per extra word in the labeller's eyes (0: labels follow the
                                   # true reward only; > 0: the labeller prefers longer answers)

    def __post_init__(self):
        for name in ("n_corpus", "n_train_prompts", "samples_per_prompt", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"WorldConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.n_heldout_prompts < 0:
            raise ValueError(f"WorldConfig.n_heldout_prompts must be >= 0, got {self.n_heldout_prompts!r}")
        if not 2 <= self.min_sentences <= self.max_sentences:
            raise ValueError("WorldConfig needs 2 <= min_sentences <= max_sentences, got "
                             f"{self.min_sentences} and {self.max_sentences}")
        if not 0.0 <= self.intensifier_prob <= 1.0:
            raise ValueError(f"WorldConfig.intensifier_prob must be in [0, 1], got {self.intensifier_prob!r}")
        if self.temperature < 0:
            raise ValueError(f"WorldConfig.temperature must be >= 0, got {self.temperature!r}")
        if int(self.pair_top_k) != self.pair_top_k or self.pair_top_k < 0:
            raise ValueError(f"WorldConfig.pair_top_k must be a whole number >= 0 (0: full distribution), "
                             f"got {self.pair_top_k!r}")
        if not self.bt_scale >= 0:
            raise ValueError(f"WorldConfig.bt_scale must be >= 0, got {self.bt_scale!r}")


# ----------------------------------------------------------------------------------------------- reward

def reward(text: str) -> float:
    """The true reward: positive words minus negative words in `text` (any text; see the module docstring).

    >>> reward(" great . the plot was very dull .")
    0.0
    >>> reward(" wonderful . the cast is brilliant .")
    2.0
    """
    if not isinstance(text, str):
        raise ValueError(f"reward: text must be a str, got {type(text).__name__}")
    words = _WORD.findall(text.lower())
    return float(sum(w in _POSITIVE_SET for w in words) - sum(w in _NEGATIVE_SET for w in words))


def n_words(text: str) -> int:
    """Whitespace-separated words in `text` ("." counts as a word): the length the labeller sees."""
    return len(text.split())


def is_grammatical(text: str, min_sentences: int = 1, max_sentences: int | None = None) -> bool:
    """Whether a full review (prompt + completion) is a sentence of the grammar.

    `text` must be "review :" followed by `min_sentences` to `max_sentences` (no limit if None) sentences of
    the shape "the SUBJECT VERB [INTENSIFIER] ADJECTIVE ." separated by single spaces. Used to check that the
    SFT model has learned the language.
    """
    upper = "" if max_sentences is None else str(max_sentences)
    pattern = rf"{re.escape(HEADER)}(?: {_SENTENCE}){{{min_sentences},{upper}}}"
    return re.fullmatch(pattern, text) is not None


# ----------------------------------------------------------------------------------------------- grammar

def _sentence(rng: random.Random, mood: str, cfg: WorldConfig) -> list[str]:
    p_pos, p_neg, _ = MOODS[mood]
    u = rng.random()
    adjectives = POSITIVE if u < p_pos else NEGATIVE if u < p_pos + p_neg else NEUTRAL
    words = ["the", rng.choice(SUBJECTS), rng.choice(VERBS)]
    if rng.random() < cfg.intensifier_prob:
        words.append(rng.choice(INTENSIFIERS))
    words += [rng.choice(adjectives), "."]
    return words


def _review(rng: random.Random, cfg: WorldConfig) -> list[list[str]]:
    mood = rng.choice(tuple(MOODS))
    n = rng.randint(cfg.min_sentences, cfg.max_sentences)
    return [_sentence(rng, mood, cfg) for _ in range(n)]


def _join(sentences: list[list[str]]) -> str:
    return " ".join([HEADER] + [" ".join(s) for s in sentences])


def generate_corpus(cfg: WorldConfig | None = None) -> list[str]:
    """`cfg.n_corpus` full reviews from the seeded grammar (the SFT data); the same seed, the same list."""
    cfg = cfg or WorldConfig()
    rng = random.Random(f"corpus-{cfg.seed}")
    return [_join(_review(rng, cfg)) for _ in range(cfg.n_corpus)]


def split_review(review: str) -> tuple[str, str]:
    """Cut a full review into (prompt, completion) after the second sentence's verb (see module docstring)."""
    words = review.split(" ")
    # header (2 words) + first sentence (up to the first ".") + "the SUBJECT VERB"
    try:
        first_end = words.index(".")
    except ValueError:
        raise ValueError(f"split_review: not a review of the world (no '.'): {review!r}") from None
    cut = first_end + 1 + 3
    if cut >= len(words):
        raise ValueError(f"split_review: the review has no second sentence to cut: {review!r}")
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def make_prompts(cfg: WorldConfig | None = None) -> tuple[list[str], list[str]]:
    """(train_prompts, heldout_prompts): distinct review openings, disjoint, from the seeded grammar.

    Prompts are drawn from the same grammar as the corpus (with another random stream) and deduplicated, so
    a prompt appears in at most one of the two lists; the lists have `cfg.n_train_prompts` and
    `cfg.n_heldout_prompts` prompts.
    """
    cfg = cfg or WorldConfig()
    rng = random.Random(f"prompts-{cfg.seed}")
    need = cfg.n_train_prompts + cfg.n_heldout_prompts
    seen: dict[str, None] = {}
    for _ in range(100 * need + 1000):
        if len(seen) == need:
            break
        seen.setdefault(split_review(_join(_review(rng, cfg)))[0], None)
    if len(seen) < need:
        raise ValueError(f"make_prompts: the grammar gave only {len(seen)} distinct prompts, {need} needed")
    prompts = list(seen)
    return prompts[:cfg.n_train_prompts], prompts[cfg.n_train_prompts:]


# ----------------------------------------------------------------------------------------------- sampling

@torch.no_grad()
def generate_completion_ids(model, tokenizer, prompts: list[str], k: int = 1, max_new_tokens: int = 24,
                            temperature: float = 1.0, seed: int = 0, batch_size: int = 256, top_k: int = 0,
                            return_logps: bool = False):
    """Sample `k` completions per prompt; return (prompt_ids, completion_ids) as token-id lists.

    `prompt_ids[i]` is the prompt's tokens (no special tokens added); `completion_ids[i][j]` is the j-th
    sample's tokens, ending with EOS when the model stopped (and without it when `max_new_tokens` ran out).
    These are the exact sampled tokens, which is what a Monte-Carlo KL estimate must score
    (`minidpo.evaluate`), since decoding and re-encoding need not give the same tokens back.

    Sampling is from the model's full distribution at `temperature` (`top_k=0`, no top-p), as a KL estimate
    needs; `top_k > 0` keeps only the k most likely next tokens; temperature 0 is greedy decoding. Prompts are
    left-padded in batches of `batch_size` rows (generate() derives the position
    ids from the attention mask, so padding does not change the distribution). The result depends only on
    `seed` (and `batch_size`); the global RNG is left as it was.

    `return_logps=True` (temperature 1, full distribution only) also returns `logps[i][j]`, log π(completion)
    summed over the sampled tokens (EOS included), read from the logits generate() computed to draw them:
    a Monte-Carlo KL then needs no second forward pass of the policy (`_SampledLogps`).
    """
    from transformers import GenerationConfig

    if k < 1:
        raise ValueError(f"k (samples per prompt) must be >= 1, got {k}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string")
    if return_logps and (temperature != 1.0 or top_k != 0):
        raise ValueError("return_logps needs samples from the model's own distribution (temperature 1, top_k 0)")
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token; generation would never stop")
    if pad_id is None:
        pad_id = eos_id

    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt must have at least one token (got an empty prompt)")
    rows = [(i, j) for i in range(len(prompts)) for j in range(k)]
    completion_ids: list[list[list[int]]] = [[None] * k for _ in prompts]  # type: ignore[list-item]
    logps: list[list[float]] = [[0.0] * k for _ in prompts]

    device = next(model.parameters()).device
    greedy = temperature == 0
    gen_cfg = GenerationConfig(
        # top_k=0, not None: transformers fills None with its default top-k of 50, which would sample from a
        # truncated distribution while the KL estimate scores the full one
        do_sample=not greedy, temperature=None if greedy else float(temperature), top_k=int(top_k), top_p=None,
        max_new_tokens=int(max_new_tokens), eos_token_id=eos_id, pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    was_training = model.training
    model.eval()
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                width = max(len(prompt_ids[i]) for i, _ in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, (i, _) in enumerate(chunk):
                    ids = prompt_ids[i]
                    input_ids[r, width - len(ids):] = torch.tensor(ids)
                    attention[r, width - len(ids):] = 1
                reader = _SampledLogps(eos_id) if return_logps else None
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                     generation_config=gen_cfg, logits_processor=[reader] if reader else None)
                new = out[:, width:].tolist()
                chunk_logps = reader.finish(out[:, -1]).tolist() if reader else None
                for r, (i, j) in enumerate(chunk):
                    ids = new[r]
                    completion_ids[i][j] = ids[:ids.index(eos_id) + 1] if eos_id in ids else ids
                    if reader:
                        logps[i][j] = chunk_logps[r]
    finally:
        model.train(was_training)
    return (prompt_ids, completion_ids, logps) if return_logps else (prompt_ids, completion_ids)


class _SampledLogps:
    """A logits processor for generate() that adds up, per row, log π of the tokens it samples.

    generate() calls it with the raw logits of each step before drawing (nothing else is in the processor list
    at temperature 1 and top_k 0); the token drawn at step t is the last column of `input_ids` at step t + 1, and
    `finish` reads the last one. Tokens after a row's EOS (generate's padding) are not counted.
    """

    def __init__(self, eos_token_id: int):
        self.eos, self.logprobs, self.total, self.done = eos_token_id, None, None, None

    def _count(self, token: torch.Tensor) -> None:  # token (R,): drawn from self.logprobs
        picked = self.logprobs.gather(1, token[:, None])[:, 0]  # (R,)
        self.total += torch.where(self.done, torch.zeros_like(picked), picked)
        self.done |= token == self.eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.logprobs is None:
            self.total = torch.zeros(scores.shape[0], device=scores.device)
            self.done = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
        else:
            self._count(input_ids[:, -1])
        self.logprobs = torch.log_softmax(scores.float(), dim=-1)  # (R, V)
        return scores

    def finish(self, last_token: torch.Tensor) -> torch.Tensor:
        self._count(last_token)
        return self.total.cpu()


def decode_completion(tokenizer, ids: list[int]) -> str:
    """Completion text from sampled ids: stop at the first EOS, drop special tokens, keep spaces as they are."""
    eos_id = tokenizer.eos_token_id
    if eos_id is not None and eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def sample_completions(model, tokenizer, prompts: list[str], k: int = 2, max_new_tokens: int = 24,
                       temperature: float = 1.0, seed: int = 0, batch_size: int = 256,
                       top_k: int = 0) -> list[list[str]]:
    """`k` sampled completions per prompt, as text (without the prompt and without EOS).

    Completions come back with their leading space (" great . the cast is fun ."), so `prompt + completion`
    is the full text. See `generate_completion_ids` for the sampling details (batched, left-padded, seeded,
    stops at EOS).
    """
    _, completion_ids = generate_completion_ids(model, tokenizer, prompts, k=k, max_new_tokens=max_new_tokens,
                                                temperature=temperature, seed=seed, batch_size=batch_size,
                                                top_k=top_k)
    return [[decode_completion(tokenizer, ids) for ids in per_prompt] for per_prompt in completion_ids]


# ----------------------------------------------------------------------------------------------- labelling

def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def preference_probability(text_a: str, text_b: str, bt_scale: float = 1.0, length_bonus: float = 0.0,
                           reward_fn=None) -> float:
    """The labeller's P(a ≻ b) = σ((r(a) − r(b) + length_bonus · (n_words(a) − n_words(b))) / bt_scale).

    bt_scale = 0 is the deterministic labeller: 1, 0, or 0.5 for equal utility.
    """
    reward_fn = reward_fn or reward
    if not bt_scale >= 0:
        raise ValueError(f"bt_scale must be >= 0, got {bt_scale}")
    diff = reward_fn(text_a) - reward_fn(text_b) + length_bonus * (n_words(text_a) - n_words(text_b))
    if bt_scale == 0:
        return 1.0 if diff > 0 else 0.0 if diff < 0 else 0.5
    return _sigmoid(diff / bt_scale)


def label_pairs(prompts: list[str], completions: list[list[str]], cfg: WorldConfig | None = None, *,
                bt_scale: float | None = None, length_bonus: float | None = None, seed: int | None = None,
                reward_fn=None, flip_rate: float = 0.0):
    """Label pairs of completions with the Bradley–Terry labeller; return a `datasets.Dataset`.

    For prompt i, completions[i][0] is paired with completions[i][1], [2] with [3], and so on (an odd last
    one is left out); pairs whose two texts are identical are skipped (nothing to prefer), and so are pairs
    with an empty completion (the model stopped at once: `minidpo.data` refuses empty completions). The labeller picks
    a over b with `preference_probability(a, b, bt_scale, length_bonus)`. The settings come from `cfg`
    (default `WorldConfig()`), and `bt_scale`, `length_bonus`, `seed` override it when given.

    Columns: prompt, chosen, rejected (strings: the format `minidpo.data` and `minidpo train` read),
    chosen_reward, rejected_reward (the true rewards), p_chosen (the probability the labeller had of making
    the choice it made). The same seed gives the same labels.

    ``flip_rate`` = eps adds label noise at a known rate on top of the labeller: after the labeller chooses,
    the label is flipped with probability eps (the noise model that cDPO and robust DPO assume, Mitchell 2023;
    Chowdhury et al. 2024). So P(a wins) = (1 - eps) P_BT(a > b) + eps (1 - P_BT(a > b)); with bt_scale = 0
    the labeller is deterministic and eps is the only noise. p_chosen is this overall probability.
    """
    import datasets

    cfg = cfg or WorldConfig()
    bt_scale = cfg.bt_scale if bt_scale is None else bt_scale
    length_bonus = cfg.length_bonus if length_bonus is None else length_bonus
    seed = cfg.seed if seed is None else seed
    reward_fn = reward_fn or reward
    if not bt_scale >= 0:
        raise ValueError(f"bt_scale must be >= 0, got {bt_scale}")
    if not 0.0 <= flip_rate < 0.5:
        raise ValueError(f"flip_rate must be in [0, 0.5), got {flip_rate}")
    if len(prompts) != len(completions):
        raise ValueError(f"label_pairs: {len(prompts)} prompts but {len(completions)} lists of completions")

    rng = random.Random(f"labels-{seed}")
    rows = {name: [] for name in ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward",
                                  "p_chosen")}
    for i, (prompt, texts) in enumerate(zip(prompts, completions)):
        if isinstance(texts, str):
            raise ValueError(f"label_pairs: completions[{i}] must be a list of strings, not one string")
        for a, b in zip(texts[0::2], texts[1::2]):
            if a == b or not a.strip() or not b.strip():  # nothing to prefer, or nothing to train on
                continue
            p_a = preference_probability(a, b, bt_scale, length_bonus, reward_fn)
            if flip_rate:  # the label is flipped with probability eps after the labeller chose
                p_a = (1.0 - flip_rate) * p_a + flip_rate * (1.0 - p_a)
            a_wins = rng.random() < p_a
            chosen, rejected, p = (a, b, p_a) if a_wins else (b, a, 1.0 - p_a)
            rows["prompt"].append(prompt)
            rows["chosen"].append(chosen)
            rows["rejected"].append(rejected)
            rows["chosen_reward"].append(float(reward_fn(chosen)))
            rows["rejected_reward"].append(float(reward_fn(rejected)))
            rows["p_chosen"].append(float(p))
    features = datasets.Features({
        "prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"), "chosen_reward": datasets.Value("float64"),
        "rejected_reward": datasets.Value("float64"), "p_chosen": datasets.Value("float64"),
    })
    return datasets.Dataset.from_dict(rows, features=features)


def label_noise(pairs) -> dict:
    """How noisy the labels are, against the true reward.

    Returns {"measured", "expected", "n_pairs", "n_reward_ties"}: `measured` is the fraction of pairs whose
    chosen completion has the strictly lower true reward; `expected` is its expectation under the labeller,
    the mean over pairs of P(the lower-reward one is chosen) (0 for pairs of equal reward), computed from the
    `p_chosen` column. With length_bonus = 0, a pair with reward gap d is flipped with probability
    σ(−|d| / bt_scale). `pairs` is what `label_pairs` returns (or any mapping of those columns).
    """
    chosen_r, rejected_r, p_chosen = pairs["chosen_reward"], pairs["rejected_reward"], pairs["p_chosen"]
    n = len(chosen_r)
    if n == 0:
        return {"measured": float("nan"), "expected": float("nan"), "n_pairs": 0, "n_reward_ties": 0}
    wrong = expected = ties = 0.0
    for rc, rr, p in zip(chosen_r, rejected_r, p_chosen):
        if rc == rr:
            ties += 1
        elif rc > rr:       # right choice, made with probability p: the wrong one had 1 - p
            expected += 1.0 - p
        else:               # wrong choice, made with probability p
            wrong += 1
            expected += p
    return {"measured": wrong / n, "expected": expected / n, "n_pairs": n, "n_reward_ties": int(ties)}


def save_pairs_jsonl(dataset, path: str | os.PathLike) -> str:
    """Write the pairs as JSON Lines (one object per row, all columns), the file `minidpo train --data` reads.

    Creates the parent folder if needed; returns the path written.
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    columns = list(dataset.column_names) if hasattr(dataset, "column_names") else list(dataset[0].keys())
    with open(path, "w", encoding="utf-8") as f:
        for row in dataset:
            f.write(json.dumps({c: row[c] for c in columns}, ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------------------------- gold reward

# A completion finishes the prompt's second sentence ("[INTENSIFIER] ADJECTIVE .") and adds up to two more
# sentences: exactly the completions for which is_grammatical(prompt + completion, 2, 4) holds.
_CONTINUATION = (rf" (?:(?:{'|'.join(INTENSIFIERS)}) )?(?:{'|'.join(ADJECTIVES)}) \.(?: {_SENTENCE}){{0,2}}")


def completion_is_grammatical(completion: str) -> bool:
    """Whether `completion` continues any prompt of the world into a review of the grammar (2-4 sentences)."""
    return re.fullmatch(_CONTINUATION, completion) is not None


def repeated_words(completion: str) -> int:
    """Occurrences of an adjective already used earlier in `completion` ("great . the cast is great ." has 1)."""
    seen: set[str] = set()
    repeats = 0
    for word in _WORD.findall(completion.lower()):
        if word in ADJECTIVES:
            repeats += word in seen
            seen.add(word)
    return repeats


def gold_reward(completion: str, repeat_penalty: float = 2.0, grammar_penalty: float = 2.0) -> float:
    """The gold reward of the over-optimisation world: what we want, of which the labeller sees only a part.

        gold(y) = reward(y) - repeat_penalty * repeated_words(y) - grammar_penalty * [y leaves the grammar]

    The labeller still judges by `reward` alone (positive minus negative words), so `reward` is a proxy: a
    policy can raise it by repeating praise (a repeated word costs 2 and earns 1) or by leaving the language,
    and the gold reward then falls. This is
    the setting of Gao et al. 2022 ("Scaling laws for reward model overoptimization") and of Rafailov et al.
    2024 for direct alignment algorithms, with a gold reward that is a formula instead of a larger model.

    >>> gold_reward(" great . the cast is great .")   # reward 2, one repeat
    0.0
    >>> gold_reward(" great . the cast is fun .")     # reward 2, no repeat
    2.0
    >>> gold_reward(" great great great")             # reward 3, two repeats, not a sentence of the grammar
    -3.0
    """
    if not repeat_penalty >= 0 or not grammar_penalty >= 0:
        raise ValueError(f"penalties must be >= 0, got {repeat_penalty} and {grammar_penalty}")
    ungrammatical = not completion_is_grammatical(completion)
    return reward(completion) - repeat_penalty * repeated_words(completion) - grammar_penalty * ungrammatical
