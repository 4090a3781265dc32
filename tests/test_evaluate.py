"""Evaluation: reward with its standard error, Monte-Carlo sequence KL, implicit-reward accuracy."""

import copy
import json
import math

import pytest
import torch

from minidpo.evaluate import (evaluate_policy, implicit_reward_accuracy, mean_and_se, mean_reward, pair_logps,
                              sample_and_score, score_completions, sequence_kl)
from minidpo.models import tiny_gpt2
from minidpo.tokenizer import train_tokenizer
from minidpo.world import WorldConfig, generate_corpus, label_pairs, make_prompts, split_review

SMALL = WorldConfig(n_corpus=300, n_train_prompts=10, n_heldout_prompts=12)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(generate_corpus(SMALL))


@pytest.fixture(scope="module")
def models(tok):
    kw = dict(n_embd=32, n_layer=1, n_head=2)
    return tiny_gpt2(len(tok), seed=0, **kw), tiny_gpt2(len(tok), seed=1, **kw)


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(SMALL)[1]


def _tokenize_pairs(pairs, tok):
    """By hand, as minidpo.data does: prompt ids + completion ids + EOS, prompt labels -100."""
    rows = []
    for r in pairs:
        p = tok(r["prompt"])["input_ids"]
        row = {"prompt_input_ids": p}
        for side in ("chosen", "rejected"):
            c = tok(r[side])["input_ids"] + [tok.eos_token_id]
            row[f"{side}_input_ids"] = p + c
            row[f"{side}_labels"] = [-100] * len(p) + c
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def pairs(prompts):
    corpus = generate_corpus(WorldConfig(n_corpus=2 * len(prompts), seed=5))
    completions = [[split_review(corpus[2 * i])[1], split_review(corpus[2 * i + 1])[1]]
                   for i in range(len(prompts))]
    return label_pairs(prompts, completions, bt_scale=0.5)


def test_mean_and_se_known_values():
    mean, se = mean_and_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)         # s = sqrt(5/3), n = 4
    assert mean_and_se([2.0, 2.0]) == (2.0, 0.0)
    m, s = mean_and_se([7.0])
    assert m == 7.0 and math.isnan(s)
    with pytest.raises(ValueError, match="no values"):
        mean_and_se([])


def test_mean_reward_on_known_texts():
    texts = [" great . the cast is fun .", " bad .", " quiet .", " good ."]   # rewards 2, -1, 0, 1
    mean, se = mean_reward(texts)
    assert mean == 0.5
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert mean_reward(texts, reward_fn=len)[0] == sum(map(len, texts)) / 4
    with pytest.raises(ValueError):
        mean_reward(" great .")


def test_score_completions_matches_one_row_at_a_time(models, tok, prompts):
    model = models[0]
    prompt_ids = [tok(p)["input_ids"] for p in prompts[:5]]
    completion_ids = [tok(c)["input_ids"] + [0] for c in [" great .", " bad . the film is dull .", " fun .",
                                                         " quiet . the plot was long .", " poor ."]]
    batched = score_completions(model, prompt_ids, completion_ids, batch_size=3)
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            logits = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
            manual = sum(logits[len(p) - 1 + t, tok_id] for t, tok_id in enumerate(c))
            assert batched[i].item() == pytest.approx(manual.item(), abs=1e-4)


def test_sample_and_score(models, tok, prompts):
    out = sample_and_score(models[0], tok, prompts, n_samples=2, max_new_tokens=6, seed=0)
    assert len(out["completions"]) == len(prompts) and all(len(c) == 2 for c in out["completions"])
    flat = [r for per in out["rewards"] for r in per]
    assert out["reward"] == pytest.approx(sum(flat) / len(flat))
    assert out == sample_and_score(models[0], tok, prompts, n_samples=2, max_new_tokens=6, seed=0)


def test_sequence_kl_of_a_model_against_itself_is_zero(models, tok, prompts):
    model = models[0]
    assert sequence_kl(model, model, tok, prompts, n_samples=2, max_new_tokens=6) == (0.0, 0.0)
    kl, se = sequence_kl(model, copy.deepcopy(model), tok, prompts, n_samples=2, max_new_tokens=6)
    assert abs(kl) < 1e-5 and se < 1e-5


def test_sequence_kl_between_different_models_is_positive(models, tok, prompts):
    # Two random initialisations are both near uniform (KL ~0.05 nats, too close to tell apart from 24 samples
    # drawn from the full distribution); sharpen one of them so the two differ clearly.
    sharp = copy.deepcopy(models[1])
    with torch.no_grad():
        sharp.transformer.wte.weight.mul_(20)  # tied lm_head: logits ~20x larger
    kl, se = sequence_kl(models[0], sharp, tok, prompts, n_samples=2, max_new_tokens=6, seed=0)
    assert kl > 0 and kl > 3 * se
    assert (kl, se) == sequence_kl(models[0], sharp, tok, prompts, n_samples=2, max_new_tokens=6, seed=0)


def test_implicit_accuracy_of_the_reference_is_one_half(models, tok, pairs):
    rows = _tokenize_pairs(pairs, tok)
    model = models[0]
    assert implicit_reward_accuracy(model, model, rows, beta=0.1) == 0.5          # all ties: 0.5 each
    ref = pair_logps(model, rows, batch_size=4)
    assert implicit_reward_accuracy(model, ref, rows, beta=0.1) == 0.5
    acc = implicit_reward_accuracy(models[1], ref, rows, beta=0.1)
    assert 0.0 <= acc <= 1.0
    assert acc == implicit_reward_accuracy(models[1], model, rows, beta=3.0)     # beta > 0 does not matter


def test_implicit_accuracy_from_given_logps():
    ref = {"chosen_logps": torch.zeros(4), "rejected_logps": torch.zeros(4)}
    policy = (torch.tensor([1.0, -1.0, 0.5, 0.0]), torch.tensor([0.0, 0.0, 0.0, 0.0]))
    # correct, wrong, correct, tie
    assert implicit_reward_accuracy(policy, ref, [{}] * 4, beta=0.1) == pytest.approx(2.5 / 4)
    # float32 noise from another batch layout (~1 ulp of a -40 nat log-prob) is a tie, a 0.01 nat gap is not
    base = {"chosen_logps": torch.full((4,), -40.0), "rejected_logps": torch.full((4,), -41.0)}
    noisy = (base["chosen_logps"] + torch.tensor([4e-6, -4e-6, 0.0, 0.01]), base["rejected_logps"])
    assert implicit_reward_accuracy(noisy, base, [{}] * 4, beta=0.1) == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError, match="beta"):
        implicit_reward_accuracy(policy, ref, [{}] * 4, beta=0.0)
    with pytest.raises(ValueError, match="expected"):
        implicit_reward_accuracy(policy, ref, [{}] * 3, beta=0.1)


def test_pair_logps_agree_with_score_completions(models, tok, pairs):
    rows = _tokenize_pairs(pairs, tok)
    out = pair_logps(models[0], rows, batch_size=5)
    p_ids = [r["prompt_input_ids"] for r in rows]
    chosen = score_completions(models[0], p_ids, [r["chosen_input_ids"][len(p):] for r, p in zip(rows, p_ids)])
    assert torch.allclose(out["chosen_logps"], chosen, atol=1e-4)


def test_evaluate_policy(models, tok, prompts, pairs):
    rows = _tokenize_pairs(pairs, tok)
    ref = models[0]
    base = evaluate_policy(ref, ref, tok, prompts, rows, beta=0.1, n_samples=2, seed=0, max_new_tokens=6)
    assert {"reward", "reward_se", "kl", "kl_se", "accuracy", "samples", "length", "grammatical", "n"} <= set(base)
    assert base["kl"] == 0.0 and base["kl_se"] == 0.0 and base["accuracy"] == 0.5
    assert base["n"] == 2 * len(prompts) and len(base["samples"]) == 5
    assert base["samples"][0].startswith(prompts[0] + " →")
    json.dumps(base)                                                   # JSON-ready
    other = evaluate_policy(models[1], ref, tok, prompts, rows, beta=0.1, n_samples=2, seed=0, max_new_tokens=6,
                            reference_pair_logps=pair_logps(ref, rows))
    assert other["kl"] > 0
    assert other == evaluate_policy(models[1], ref, tok, prompts, rows, beta=0.1, n_samples=2, seed=0,
                                    max_new_tokens=6)
    assert evaluate_policy(ref, ref, tok, prompts, None, n_samples=1, max_new_tokens=4)["accuracy"] is None


def test_evaluate_policy_accepts_string_pairs(models, tok, prompts, pairs):
    pytest.importorskip("minidpo.data")
    ref = models[0]
    out = evaluate_policy(models[1], ref, tok, prompts, pairs, beta=0.1, n_samples=1, max_new_tokens=4)
    by_hand = implicit_reward_accuracy(models[1], ref, _tokenize_pairs(pairs, tok), beta=0.1)
    assert out["accuracy"] == pytest.approx(by_hand)


@pytest.mark.parametrize("batch_size", [256, 5])
def test_sampled_logps_equal_a_second_forward(models, tok, prompts, batch_size):
    """generate_completion_ids(return_logps=True) reads log pi of each sample from the logits that drew it; it
    must equal scoring the same tokens again, for rows that stop at EOS and rows cut at max_new_tokens."""
    from minidpo.world import generate_completion_ids

    sharp = models[0]  # near uniform: over 30 tokens some rows draw EOS, others run to the limit
    prompt_ids, completion_ids, logps = generate_completion_ids(sharp, tok, prompts, k=4, max_new_tokens=30,
                                                                seed=1, batch_size=batch_size, return_logps=True)
    assert completion_ids == generate_completion_ids(sharp, tok, prompts, k=4, max_new_tokens=30, seed=1,
                                                     batch_size=batch_size)[1]  # the same samples
    flat_prompts = [p for p, per in zip(prompt_ids, completion_ids) for _ in per]
    flat = [c for per in completion_ids for c in per]
    ended = [c[-1] == tok.eos_token_id for c in flat]
    assert any(ended) and not all(ended)
    read = torch.tensor([v for per in logps for v in per])
    scored = score_completions(sharp, flat_prompts, flat)
    assert torch.allclose(read, scored, atol=1e-4)
    # negative control: the same samples scored by another model are far from what sampling read
    assert (read - score_completions(models[1], flat_prompts, flat)).abs().max() > 0.1
    with pytest.raises(ValueError, match="temperature 1"):
        generate_completion_ids(sharp, tok, prompts, k=1, temperature=0.7, return_logps=True)


def test_evaluate_policy_gpt2_path_equals_the_generate_path(models, tok, prompts, monkeypatch):
    """GPT-2s are sampled and scored in one multiseed pass; any other model by generate() and a forward of pi_ref.
    Both must give the same samples and the same KL (here the GPT-2 is forced down the general path)."""
    from minidpo import multiseed

    sharp = copy.deepcopy(models[1])
    with torch.no_grad():
        sharp.transformer.wte.weight.mul_(5)
    fast = evaluate_policy(sharp, models[0], tok, prompts, None, n_samples=3, max_new_tokens=10, seed=2, batch_size=7)

    def refuse(models_):
        raise ValueError("not a GPT-2 multiseed runs")

    monkeypatch.setattr(multiseed, "stack", refuse)
    general = evaluate_policy(sharp, models[0], tok, prompts, None, n_samples=3, max_new_tokens=10, seed=2,
                              batch_size=7)
    assert fast["completions"] == general["completions"] and fast["rewards"] == general["rewards"]
    assert fast["kl"] == pytest.approx(general["kl"], abs=1e-4) and fast["kl"] > 0.1
    # negative control: another sampling seed draws other completions
    assert evaluate_policy(sharp, models[0], tok, prompts, None, n_samples=3, max_new_tokens=10, seed=3,
                           batch_size=7)["completions"] != general["completions"]
