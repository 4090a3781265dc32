"""Small shared fixtures for the training tests: preference pairs from the world's grammar, a tiny GPT-2."""

from minidpo.data import load_preferences
from minidpo.models import tiny_gpt2
from minidpo.world import WorldConfig, generate_corpus, reward, split_review


def make_pairs(n: int = 64, seed: int = 0):
    """(pairs, corpus): for each prompt, the more positive of two real completions is chosen."""
    corpus = generate_corpus(WorldConfig(seed=seed, n_corpus=4 * n))
    rows = []
    for a, b in zip(corpus[0::2], corpus[1::2]):
        (prompt, ca), (_, cb) = split_review(a), split_review(b)
        if reward(ca) != reward(cb):
            chosen, rejected = (ca, cb) if reward(ca) > reward(cb) else (cb, ca)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return load_preferences(rows[:n]), corpus


def fresh_model(tokenizer, seed: int = 0):
    """A 1-layer, 32-wide GPT-2 for the tokenizer: big enough to learn the pairs in a few steps."""
    return tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64, seed=seed,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
