"""The synthetic world and its tokenizer: reward, grammar, prompts, sampling, Bradley-Terry labelling."""

import json
import math
import random

import pytest
import torch

from minidpo import world
from minidpo.models import tiny_gpt2
from minidpo.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, train_tokenizer
from minidpo.world import (VOCABULARY, WorldConfig, generate_corpus, is_grammatical, label_noise, label_pairs,
                           make_prompts, preference_probability, reward, sample_completions, save_pairs_jsonl,
                           split_review)

SMALL = WorldConfig(n_corpus=400, n_train_prompts=60, n_heldout_prompts=20)


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(SMALL)


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_gpt2(len(tok), n_embd=32, n_layer=1, n_head=2, seed=0)


# ------------------------------------------------------------------------------------------------ reward

@pytest.mark.parametrize("text, expected", [
    ("review : the film was great . the acting felt wonderful .", 2.0),
    (" great . the plot was very dull .", 0.0),
    (" awful . the cast is bad . the music was poor .", -3.0),
    (" quiet . the story is long .", 0.0),                 # neutral adjectives score 0
    (" really brilliant . the ending felt fun .", 2.0),    # intensifiers score 0
    ("GREAT, great!good", 3.0),                            # case-insensitive, punctuation splits words
    ("greatgreat xyz gr eat", 0.0),                        # garbage: no whole positive word
    ("", 0.0),
    ("boring boring boring fun", -2.0),
])
def test_reward_exact(text, expected):
    assert reward(text) == expected
    assert isinstance(reward(text), float)


def test_reward_rejects_non_text():
    with pytest.raises(ValueError, match="str"):
        reward(3)


def test_word_lists_are_disjoint_and_small():
    assert len(set(VOCABULARY)) == len(VOCABULARY) <= 40
    assert not set(world.POSITIVE) & set(world.NEGATIVE)
    assert all(reward(w) == 1 for w in world.POSITIVE) and all(reward(w) == -1 for w in world.NEGATIVE)
    assert all(reward(w) == 0 for w in set(VOCABULARY) - set(world.POSITIVE) - set(world.NEGATIVE))


# ------------------------------------------------------------------------------------------------ grammar

def test_corpus_is_deterministic_per_seed(corpus):
    assert generate_corpus(SMALL) == corpus
    other = generate_corpus(WorldConfig(n_corpus=400, seed=1))
    assert other != corpus
    assert len(corpus) == SMALL.n_corpus


def test_corpus_is_grammatical_and_uses_the_vocabulary(corpus):
    vocab = set(VOCABULARY)
    for review in corpus:
        assert is_grammatical(review, SMALL.min_sentences, SMALL.max_sentences), review
        assert set(review.split()) <= vocab
    n_sentences = {r.count(" .") for r in corpus}
    assert n_sentences == {2, 3, 4}
    assert not is_grammatical("review : the film was great")            # unfinished sentence
    assert not is_grammatical("review : the film was great great .")
    assert not is_grammatical("review : the film was great .", min_sentences=2)


def test_corpus_reward_is_balanced(corpus):
    rewards = [reward(split_review(r)[1]) for r in corpus]
    assert abs(sum(rewards) / len(rewards)) < 0.3          # the moods are symmetric
    assert min(rewards) < 0 < max(rewards)


def test_split_review_spacing(corpus):
    for review in corpus[:50]:
        prompt, completion = split_review(review)
        assert prompt + completion == review
        assert completion.startswith(" ") and not prompt.endswith(" ")
        assert prompt.split()[-1] in world.VERBS
    with pytest.raises(ValueError):
        split_review("review : the film was great .")


def test_prompts_split_is_disjoint_and_deterministic():
    train, heldout = make_prompts(SMALL)
    assert len(train) == SMALL.n_train_prompts and len(heldout) == SMALL.n_heldout_prompts
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)
    assert make_prompts(SMALL) == (train, heldout)
    assert make_prompts(WorldConfig(n_train_prompts=60, n_heldout_prompts=20, seed=3)) != (train, heldout)
    for p in train + heldout:
        assert p.startswith("review : the ") and is_grammatical(p + " great .", 2, 2)


def test_config_validation():
    with pytest.raises(ValueError, match="min_sentences"):
        WorldConfig(min_sentences=1)
    with pytest.raises(ValueError, match="bt_scale"):
        WorldConfig(bt_scale=-1.0)
    with pytest.raises(ValueError, match="n_corpus"):
        WorldConfig(n_corpus=0)


# ------------------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_special_tokens(tok):
    assert tok.eos_token == tok.bos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    assert tok.padding_side == "right"
    assert tok("review : the film was")["input_ids"][0] not in (0, 1)   # nothing added when encoding


def test_tokenizer_round_trip(tok, corpus):
    texts = corpus[:20] + [" great . the cast is fun .", "  two  spaces\tand a tab\n", "héllo wörld ☃ 123 !?"]
    for text in texts:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_tokenizer_is_word_level_on_the_world(tok):
    assert len(tok("review")["input_ids"]) == 1
    for word in VOCABULARY[1:]:
        assert len(tok(" " + word)["input_ids"]) == 1, word
    assert len(tok) < 512


def test_tokenizer_joint_equals_separate_tokenization(tok, corpus):
    for review in corpus:
        prompt, completion = split_review(review)
        assert tok(prompt)["input_ids"] + tok(completion)["input_ids"] == tok(review)["input_ids"]


def test_tokenizer_save_load_offline(tok, corpus, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)):
        assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (0, 1, 0)
        for text in corpus[:10]:
            assert loaded(text)["input_ids"] == tok(text)["input_ids"]
            assert loaded.decode(loaded(text)["input_ids"]) == text
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_tokenizer_training_is_deterministic(tok, corpus):
    again = train_tokenizer(corpus)
    assert again.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, vocab_size=100)
    with pytest.raises(ValueError, match="no texts"):
        train_tokenizer([])


# ------------------------------------------------------------------------------------------------ sampling

def test_sample_completions_shape_seed_and_rng(model, tok):
    prompts = make_prompts(SMALL)[1][:6]
    state = torch.get_rng_state()
    a = sample_completions(model, tok, prompts, k=3, max_new_tokens=6, seed=0, batch_size=4)
    assert torch.equal(state, torch.get_rng_state())                 # global RNG untouched
    assert len(a) == 6 and all(len(per) == 3 and all(isinstance(c, str) for c in per) for per in a)
    assert a == sample_completions(model, tok, prompts, k=3, max_new_tokens=6, seed=0, batch_size=4)
    assert a != sample_completions(model, tok, prompts, k=3, max_new_tokens=6, seed=1, batch_size=4)
    for per in a:
        for c in per:
            assert EOS_TOKEN not in c and PAD_TOKEN not in c


def test_generation_stops_at_eos_and_left_padding_is_harmless(tok):
    # a model that likes EOS (its logit raised by about 5 nats: p(EOS) ~ 0.3) so that some samples stop early
    model = tiny_gpt2(len(tok), n_embd=32, n_layer=1, n_head=2, seed=1)
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[tok.eos_token_id, 0] = 5.0
    prompts = make_prompts(SMALL)[0][:40]
    prompt_ids, completion_ids = world.generate_completion_ids(model, tok, prompts, k=2, max_new_tokens=5)
    stopped = 0
    for p, ids, per in zip(prompts, prompt_ids, completion_ids):
        assert ids == tok(p)["input_ids"]
        for c in per:
            assert 1 <= len(c) <= 5
            assert tok.eos_token_id not in c[:-1]              # EOS only ever last
            stopped += c[-1] == tok.eos_token_id
    assert 0 < stopped < 80
    # the greedy first token of a left-padded batch equals the unpadded model's argmax
    greedy = world.generate_completion_ids(model, tok, prompts, k=1, max_new_tokens=1, temperature=0)[1]
    with torch.no_grad():
        for ids, per in zip(prompt_ids, greedy):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert per[0][0] == int(logits.argmax())


def test_sampling_rejects_bad_arguments(model, tok):
    with pytest.raises(ValueError, match="k"):
        sample_completions(model, tok, ["review : the film was"], k=0)
    with pytest.raises(ValueError, match="list of strings"):
        sample_completions(model, tok, "review : the film was")


# ------------------------------------------------------------------------------------------------ labelling

def _synthetic_completions(n_prompts, seed=0):
    """Pairs of grammar completions (no model needed): (prompts, [[a, b], ...])."""
    corpus = generate_corpus(WorldConfig(n_corpus=2 * n_prompts, seed=seed))
    completions = [split_review(r)[1] for r in corpus]
    prompts = [f"p{i}" for i in range(n_prompts)]
    return prompts, [completions[2 * i:2 * i + 2] for i in range(n_prompts)]


def test_label_pairs_columns_and_determinism():
    prompts, completions = _synthetic_completions(50)
    completions[0] = [" great .", " great ."]                    # identical pair: skipped
    pairs = label_pairs(prompts, completions, SMALL)
    assert pairs.column_names == ["prompt", "chosen", "rejected", "chosen_reward", "rejected_reward",
                                  "p_chosen"]
    n_distinct = sum(a != b for a, b in completions)
    assert len(pairs) == n_distinct < 50 and "p0" not in pairs["prompt"]
    for row in pairs:
        assert row["chosen_reward"] == reward(row["chosen"]) and row["rejected_reward"] == reward(row["rejected"])
        assert 0.0 <= row["p_chosen"] <= 1.0
    assert label_pairs(prompts, completions, SMALL).to_dict() == pairs.to_dict()
    # k = 4: two pairs per prompt
    four = label_pairs(prompts[:1], [[" good .", " bad .", " fun .", " dull ."]], bt_scale=0.0)
    assert four["chosen"] == [" good .", " fun ."]
    with pytest.raises(ValueError, match="prompts"):
        label_pairs(prompts, completions[:3])


def test_bradley_terry_huge_scale_is_a_coin_flip():
    prompts, completions = _synthetic_completions(2000)
    pairs = label_pairs(prompts, completions, bt_scale=1e6, seed=0)
    decided = [(c, r) for c, r in zip(pairs["chosen_reward"], pairs["rejected_reward"]) if c != r]
    frac_higher = sum(c > r for c, r in decided) / len(decided)
    assert abs(frac_higher - 0.5) < 0.05
    assert abs(label_noise(pairs)["expected"] - 0.5 * len(decided) / len(pairs)) < 1e-3


@pytest.mark.parametrize("bt_scale", [1e-6, 0.0])
def test_bradley_terry_tiny_scale_always_prefers_higher_reward(bt_scale):
    prompts, completions = _synthetic_completions(500)
    pairs = label_pairs(prompts, completions, bt_scale=bt_scale, seed=0)
    assert all(c >= r for c, r in zip(pairs["chosen_reward"], pairs["rejected_reward"]))
    noise = label_noise(pairs)
    assert noise["measured"] == 0.0 and noise["expected"] < 1e-9
    assert noise["n_reward_ties"] > 0                                # ties happen, and are coin flips


def test_label_noise_matches_bradley_terry_expectation():
    prompts, completions = _synthetic_completions(3000)
    pairs = label_pairs(prompts, completions, bt_scale=1.0, seed=0)
    noise = label_noise(pairs)
    assert noise["n_pairs"] == len(pairs) > 2500
    assert 0.05 < noise["expected"] < 0.3
    assert abs(noise["measured"] - noise["expected"]) < 0.025        # ~4 standard errors
    # the per-pair flip probability is sigma(-|gap| / bt_scale)
    assert preference_probability(" great . fun .", " bad .", bt_scale=2.0) == pytest.approx(
        1 / (1 + math.exp(-3 / 2.0)))


def test_length_bonus_makes_the_labeller_prefer_longer():
    short, long = " great .", " quiet . the plot is long . the film was short ."
    assert preference_probability(short, long, bt_scale=1.0) > 0.5
    assert preference_probability(short, long, bt_scale=1.0, length_bonus=1.0) < 0.01
    prompts, completions = _synthetic_completions(300)
    pairs = label_pairs(prompts, completions, bt_scale=1e-3, length_bonus=10.0)
    assert all(len(c.split()) >= len(r.split()) for c, r in zip(pairs["chosen"], pairs["rejected"]))


def test_save_pairs_jsonl_round_trip(tmp_path):
    prompts, completions = _synthetic_completions(20)
    pairs = label_pairs(prompts, completions, SMALL)
    path = save_pairs_jsonl(pairs, tmp_path / "sub" / "pairs.jsonl")
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert rows == [dict(r) for r in pairs]
    assert set(rows[0]) >= {"prompt", "chosen", "rejected"}


def test_two_processes_building_one_world_build_it_once(tmp_path):
    """`make test` runs notebooks two at a time: the second build_world waits for the first and loads its cache."""
    import subprocess
    import sys

    code = ("import sys; from minidpo import experiment as ex, world as w; from minidpo.train import SFTConfig; "
            "ex.build_world(w.WorldConfig(n_corpus=200, n_train_prompts=20, n_heldout_prompts=5), SFTConfig(steps=5), "
            "cache_dir=sys.argv[1], show_progress=False)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted("built" in o for o in outs) == [False, True], outs  # one built, the other reused
    assert sum("reused" in o for o in outs) == 1


def test_pair_top_k_is_validated_and_changes_the_world_key():
    from minidpo import experiment as ex
    from minidpo.train import SFTConfig

    with pytest.raises(ValueError, match="pair_top_k"):
        WorldConfig(pair_top_k=-1)
    keys = {ex.world_key(WorldConfig(pair_top_k=k), SFTConfig(), ex.ModelConfig()) for k in (0, 50)}
    assert len(keys) == 2  # a world sampled another way is another world, never a stale cache hit
