"""The benchmark's model and data, written to disk so that minidpo and TRL read the very same files.

* Tokenizer: byte-level (256 byte symbols + <|endoftext|> + <|pad|> = 258 ids, no merges), so a text of n
  ASCII characters is exactly n tokens and the sequence lengths are under our control.
* Model: the tiny GPT-2 of DESIGN.md (n_embd 128, 4 layers, 4 heads, vocab 258), random weights.
* Pairs: short reviews from the synthetic world's word lists: a prompt of 4-6 words, completions of 6-10 words
  (chosen: positive adjectives, rejected: negative ones). Every prompt + completion + EOS fits in 64 tokens,
  so neither library truncates anything and both see the same tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from minidpo.world import INTENSIFIERS, NEGATIVE, NEUTRAL, POSITIVE, SUBJECTS, VERBS

MAX_LENGTH = 64


def _words(rng: random.Random, adjectives, n_words: int) -> str:
    words: list[str] = []
    while len(words) < n_words:
        words += ["the", rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(INTENSIFIERS + ("",)),
                  rng.choice(adjectives), "."]
        words = [w for w in words if w]
    return " ".join(words[:n_words])


def make_pairs(n: int, seed: int = 0, max_length: int = MAX_LENGTH) -> list[dict[str, str]]:
    """``n`` prompt/chosen/rejected rows whose byte length (+1 for EOS) is at most ``max_length``."""
    rng = random.Random(f"bench-{seed}")
    rows = []
    while len(rows) < n:
        prompt = _words(rng, POSITIVE + NEGATIVE + NEUTRAL, rng.randint(4, 6))
        chosen = " " + _words(rng, POSITIVE, rng.randint(6, 10))
        rejected = " " + _words(rng, NEGATIVE, rng.randint(6, 10))
        if len(prompt) + max(len(chosen), len(rejected)) + 1 <= max_length:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def make_fixed_pairs(n: int, length: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows of exactly ``length`` tokens (prompt + completion + EOS) each: no padding, so the FLOPs of a step
    are known exactly. Random lower-case letters; the prompt takes a quarter of the length."""
    rng = random.Random(f"fixed-{seed}-{length}")
    n_prompt = length // 4
    n_completion = length - n_prompt - 1  # + EOS

    def text(k: int) -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(k))

    rows = []
    while len(rows) < n:
        chosen, rejected = text(n_completion), text(n_completion)
        if chosen != rejected:
            rows.append({"prompt": text(n_prompt), "chosen": chosen, "rejected": rejected})
    return rows


def byte_tokenizer(model_max_length: int = 1024):
    """256 byte symbols + 2 special tokens (EOS = BOS = 0, pad = 1): vocab 258, one token per byte."""
    from minidpo.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["a"], vocab_size=258, model_max_length=model_max_length)
    assert len(tokenizer) == 258, len(tokenizer)
    return tokenizer


def gpt2(n_embd: int = 128, n_layer: int = 4, n_head: int = 4, vocab_size: int = 258, n_positions: int = 128,
         seed: int = 0, **overrides):
    """minidpo.models.tiny_gpt2 (GPT2Config defaults otherwise: GELU 'gelu_new', dropout 0)."""
    from minidpo.models import tiny_gpt2

    return tiny_gpt2(vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions, seed=seed,
                     **overrides)


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_assets(directory: Path, n_pairs: int = 512, n_embd: int = 128, n_layer: int = 4, n_head: int = 4,
                 seed: int = 0) -> tuple[Path, Path]:
    """(model folder, data file): the model and tokenizer saved with save_pretrained, the pairs as jsonl."""
    directory.mkdir(parents=True, exist_ok=True)
    model_dir = directory / "model"
    gpt2(n_embd, n_layer, n_head, seed=seed).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    data = write_jsonl(make_pairs(n_pairs, seed), directory / "pairs.jsonl")
    return model_dir, data


def matmul_flops(model) -> int:
    """Weights that multiply every token, lm_head included (tied to wte, but still a matmul); position and
    token embeddings are look-ups, not matmuls."""
    cfg = model.config
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    inner = cfg.n_inner or 4 * d
    return L * (3 * d * d + d * d + 2 * d * inner) + V * d


def step_flops(model, rows: int, length: int) -> float:
    """Model FLOPs of one training step (forward + backward) over ``rows`` sequences of ``length`` tokens:
    6 * N * tokens for the weight matmuls (2 forward, 4 backward per weight per token) plus the attention
    scores and the weighted sum, 2 * 2 * L * T * d per token forward, 3x that with backward (causal
    masking not subtracted: the kernels compute the full T x T)."""
    cfg = model.config
    tokens = rows * length
    return 6 * matmul_flops(model) * tokens + 3 * 4 * cfg.n_layer * length * cfg.n_embd * tokens
