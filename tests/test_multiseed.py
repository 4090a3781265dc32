"""Seeds as an axis: several DPO runs trained together (experiment.run_dpo_seeds), relabelled pairs
(experiment.relabel), paths read at matched KL (evaluate.at_matched_kl) and the over-seeds plots."""

import math
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from _fixtures import fresh_model
from minidpo import experiment, plots
from minidpo import world as w
from minidpo.evaluate import at_matched_kl
from minidpo.tokenizer import train_tokenizer
from minidpo.train import DPOConfig

quiet = lambda *args: None  # noqa: E731


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A World small enough for tests: a 1-layer GPT-2 (untrained; the equality tests need no fluency) and 96
    pairs of real completions of the grammar, labelled by the Bradley-Terry labeller."""
    cfg = w.WorldConfig(n_corpus=400)
    corpus = w.generate_corpus(cfg)
    tokenizer = train_tokenizer(corpus, model_max_length=64, full_byte_alphabet=False)
    prompts, completions = [], []
    for a, b, c in zip(corpus[0::3], corpus[1::3], corpus[2::3]):
        prompt, ca = w.split_review(a)
        prompts.append(prompt)
        completions.append([ca, w.split_review(b)[1] if w.split_review(b)[1] != ca else w.split_review(c)[1]])
    pairs = w.label_pairs(prompts, completions, cfg)
    train_pairs = pairs.select(range(96))
    return experiment.World(tokenizer, fresh_model(tokenizer), train_pairs, pairs.select(range(96, 112)),
                            prompts[96:112], cfg, Path(tmp_path_factory.mktemp("world")))


def _cfg(**kw):
    return DPOConfig(**{"batch_size": 8, "max_steps": 10, "lr": 3e-3, "warmup_steps": 2, "cache_dir": None,
                        "show_progress": False, "device": "cpu", **kw})


def _max_weight_gap(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("change", [dict(loss_type="sigmoid", max_grad_norm=0.05), dict(loss_type="ipo", beta=0.5),
                                    dict(loss_type="hinge"), dict(loss_type="kto"), dict(rpo_alpha=1.0)])
def test_run_dpo_seeds_equals_separate_runs(tiny_world, change):
    cfg, seeds = _cfg(**change), [0, 1, 2]
    together = experiment.run_dpo_seeds(tiny_world, cfg, seeds, log=quiet)
    for seed, run in zip(seeds, together):
        alone = experiment.run_dpo(tiny_world, replace(cfg, seed=seed), log=quiet)
        assert len(run.history) == len(alone.history) == cfg.max_steps
        for a, b in zip(run.history, alone.history):
            assert a["step"] == b["step"] and a["learning_rate"] == pytest.approx(b["learning_rate"], abs=1e-12)
            # float32 sums in another order (GPT-2 written out on stacked weights, packed rows): ~1e-5 relative
            assert a["loss"] == pytest.approx(b["loss"], rel=3e-5, abs=1e-6), (seed, a["step"])
            for key in ("logps/chosen", "logps/rejected"):
                assert a[key] == pytest.approx(b[key], rel=3e-5), (seed, a["step"], key)
        # Adam divides by sqrt(v), so float32 rounding in a gradient near 0 moves a weight by up to ~lr * 1e-2:
        # ~1e-5 after 10 steps at lr 3e-3, against ~1.5e-2 moved in all and > 1e-3 between seeds (below)
        assert _max_weight_gap(run.model, alone.model) < 3e-5
    if change.get("max_grad_norm") == 0.05:  # clipping was active, and per seed: the equality above covers it
        assert all(r["grad_norm"] > 0.05 for r in together[0].history)
    # negative control: another seed's run is far from this one, so the tolerance above can fail
    other = experiment.run_dpo(tiny_world, replace(cfg, seed=seeds[1]), log=quiet)
    assert _max_weight_gap(together[0].model, other.model) > 1e-3


def test_run_dpo_seeds_with_relabelled_pairs_per_seed(tiny_world):
    cfg, seeds = _cfg(), [3, 4]
    pairs = [experiment.relabel(tiny_world, s) for s in seeds]
    together = experiment.run_dpo_seeds(tiny_world, cfg, seeds, pairs_per_seed=pairs, log=quiet)
    for seed, data, run in zip(seeds, pairs, together):
        alone = experiment.run_dpo(tiny_world, replace(cfg, seed=seed), pairs=data, log=quiet)
        assert max(abs(a["loss"] - b["loss"]) for a, b in zip(run.history, alone.history)) < 1e-5
        assert _max_weight_gap(run.model, alone.model) < 3e-5
    # the reference's weights are untouched
    assert _max_weight_gap(tiny_world.reference, fresh_model(tiny_world.tokenizer)) == 0.0


def test_run_dpo_seeds_callbacks(tiny_world):
    seen = []

    def trace(step, policies):
        seen.append(step)
        return [{"w": float(next(p.parameters()).detach().sum()), "training": p.training} for p in policies]

    runs = experiment.run_dpo_seeds(tiny_world, _cfg(max_steps=6), [0, 1], callback=trace, callback_every=4, log=quiet)
    assert seen == [0, 4, 6]
    assert [e["step"] for e in runs[0].evaluations] == [0, 4, 6]
    assert runs[0].evaluations[0]["w"] == runs[1].evaluations[0]["w"]  # both start at pi_ref
    assert runs[0].evaluations[-1]["w"] != runs[1].evaluations[-1]["w"]  # and end apart
    assert not runs[0].evaluations[1]["training"]  # callbacks see eval mode
    assert runs[0].evaluations[-1]["w"] == pytest.approx(float(next(runs[0].model.parameters()).detach().sum()))
    per_seed = experiment.run_dpo_seeds(tiny_world, _cfg(max_steps=2), [0, 1],
                                        callback=[lambda s, m: {"seed": 0}, lambda s, m: {"seed": 1}], log=quiet)
    assert [e["seed"] for e in per_seed[1].evaluations] == [1, 1]


def test_run_dpo_seeds_rejects_bad_input(tiny_world):
    with pytest.raises(ValueError, match="at least one seed"):
        experiment.run_dpo_seeds(tiny_world, _cfg(), [], log=quiet)
    with pytest.raises(ValueError, match="pairs_per_seed"):
        experiment.run_dpo_seeds(tiny_world, _cfg(), [0, 1], pairs_per_seed=[tiny_world.train_pairs], log=quiet)
    with pytest.raises(ValueError, match="different step counts"):
        experiment.run_dpo_seeds(tiny_world, _cfg(max_steps=None), [0, 1],
                                 pairs_per_seed=[tiny_world.train_pairs, tiny_world.train_pairs.select(range(48))],
                                 log=quiet)


def test_relabel_keeps_completions_and_draws_new_labels(tiny_world):
    a, b, a2 = experiment.relabel(tiny_world, 1), experiment.relabel(tiny_world, 2), experiment.relabel(tiny_world, 1)
    orig = tiny_world.train_pairs
    assert len(a) == len(orig)
    for row, o in zip(a, orig):
        assert row["prompt"] == o["prompt"] and {row["chosen"], row["rejected"]} == {o["chosen"], o["rejected"]}
    assert list(a["chosen"]) == list(a2["chosen"])  # the same seed, the same labels
    differ = np.mean([x != y for x, y in zip(a["chosen"], b["chosen"])])
    assert 0.02 < differ < 0.6, differ  # another seed flips some labels, not all
    # Bradley-Terry labels: the rate of lower-reward choices matches the labeller's expectation
    noise = w.label_noise(a)
    assert abs(noise["measured"] - noise["expected"]) < 0.12


def test_at_matched_kl_interpolates_every_numeric_key():
    path = [{"step": 0, "kl": 0.0, "reward": 0.0, "grammatical": 1.0, "samples": ["x"]},
            {"step": 16, "kl": 2.0, "reward": 4.0, "grammatical": 0.5, "samples": ["y"]},
            {"step": 32, "kl": 4.0, "reward": 5.0, "grammatical": 0.0, "samples": ["z"]}]
    got = at_matched_kl(path, [1.0, 3.0, 4.0, 5.0])
    assert got[0] == {"kl": 1.0, "step": 8.0, "reward": 2.0, "grammatical": 0.75}
    assert got[1] == {"kl": 3.0, "step": 24.0, "reward": 4.5, "grammatical": 0.25}
    assert got[2]["reward"] == 5.0
    assert all(math.isnan(v) for k, v in got[3].items() if k != "kl")  # beyond the path's reach
    # a path that comes back across a KL it passed is read where it first got there
    back = path + [{"step": 48, "kl": 1.0, "reward": 9.0, "grammatical": 0.0, "samples": []}]
    assert at_matched_kl(back, [1.0])[0]["reward"] == 2.0
    with pytest.raises(ValueError):
        at_matched_kl([], [1.0])
    with pytest.raises(ValueError):
        at_matched_kl([{"reward": 1.0}], [1.0])


def test_at_matched_kl_changes_the_verdict_where_end_points_mislead():
    # A buys reward at 1 per nat and stops at KL 4; B buys it at 0.5 per nat and goes on to KL 10.
    a = [{"kl": float(k), "reward": float(k)} for k in range(5)]
    b = [{"kl": float(k), "reward": 0.5 * k} for k in range(11)]
    assert b[-1]["reward"] > a[-1]["reward"]  # negative control: the end points rank B first
    grid = [0.5, 1.0, 2.0, 3.0, 4.0]
    ra, rb = at_matched_kl(a, grid), at_matched_kl(b, grid)
    assert all(x["reward"] > y["reward"] for x, y in zip(ra, rb))  # at equal KL, A is ahead everywhere
    assert math.isnan(at_matched_kl(a, [6.0])[0]["reward"]) and at_matched_kl(b, [6.0])[0]["reward"] == 3.0


def test_seed_plots_draw_the_medians_they_are_given():
    paths = {"A": [[{"kl": 0.0, "reward": 0.0, "grammatical": 1.0}, {"kl": 2.0, "reward": 2.0 * s,
                                                                        "grammatical": 0.5}] for s in (1, 2, 3)]}
    fig = plots.plot_seed_bands(paths, grid=[0.0, 1.0, 2.0])
    line = fig.axes[0].get_lines()[0]
    assert np.allclose(line.get_xdata(), [0.0, 1.0, 2.0]) and np.allclose(line.get_ydata(), [0.0, 2.0, 4.0])
    # beyond one seed's reach the band stops: the median would be over fewer seeds
    short = {"A": paths["A"] + [[{"kl": 0.0, "reward": 0.0, "grammatical": 1.0}, {"kl": 1.0, "reward": 1.0,
                                                                                  "grammatical": 1.0}]]}
    line = plots.plot_seed_bands(short, grid=[0.0, 1.0, 2.0]).axes[0].get_lines()[0]
    assert np.allclose(line.get_xdata(), [0.0, 1.0])
    rows = {"B": [{"kl": k, "reward": r, "grammatical": 0.0} for k, r in ((1, 3), (2, 5), (3, 4))]}
    fig = plots.plot_seed_points(rows, reference={"reward": 0.0})
    marker = fig.axes[0].get_lines()[0]
    assert marker.get_xdata()[0] == 2 and marker.get_ydata()[0] == 4  # the medians
    assert marker.get_markerfacecolor()[:3] == (1.0, 1.0, 1.0)  # no grammatical samples: a hollow marker
    plots.plt.close("all")


def test_multiseed_forward_is_gpt2(tiny_world):
    from minidpo import multiseed

    models = [fresh_model(tiny_world.tokenizer, seed=s) for s in (0, 1)]
    ids = torch.randint(2, len(tiny_world.tokenizer), (3, 12))
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 9:] = False  # right padding
    logits = multiseed.forward(multiseed.stack(models), models[0].config, ids.expand(2, -1, -1),
                               torch.arange(12).expand(3, 12), mask)  # (2, 3, 12, V)
    for s, model in enumerate(models):
        expected = model(input_ids=ids, attention_mask=mask.long()).logits
        assert (logits[s][mask] - expected[mask]).abs().max() < 1e-4
    # negative control: the other copy's logits are far off
    assert (logits[0][mask] - models[1](input_ids=ids).logits[mask]).abs().max() > 1e-2


def test_evaluate_seeds_equals_evaluate_per_policy(tiny_world):
    policies = [fresh_model(tiny_world.tokenizer, seed=s) for s in (1, 2)]  # seed 0 is pi_ref itself
    together = experiment.evaluate_seeds(tiny_world, policies, 0.1, [5, 6])
    for seed, policy, got in zip((5, 6), policies, together):
        alone = experiment.evaluate(tiny_world, policy, beta=0.1, n_samples=1, seed=seed)
        assert got["samples"] == alone["samples"][:4] and got["rewards"] == alone["rewards"]  # the same draws
        for key in ("reward", "kl", "kl_se", "accuracy", "grammatical", "length"):
            assert got[key] == pytest.approx(alone[key], rel=1e-4, abs=1e-4), key
    assert together[0]["kl"] > 0.1  # an untrained copy is far from pi_ref: the KL check can fail
    same = experiment.evaluate_seeds(tiny_world, [tiny_world.reference], 0.1, [5])[0]
    assert abs(same["kl"]) < 1e-5 and same["accuracy"] == 0.5 and abs(same["margin"]) < 1e-5


def test_sample_with_each_copy_on_its_own_prompts(tiny_world):
    from minidpo import multiseed

    tok = tiny_world.tokenizer
    models = [fresh_model(tok, seed=s) for s in (1, 2)]
    prompts = [[tok(p, add_special_tokens=False)["input_ids"] for p in tiny_world.heldout_prompts[i:i + 4]]
               for i in (0, 4)]  # copy 0 on prompts 0-3, copy 1 on prompts 4-7 (their lengths differ)
    ref = multiseed.stack([tiny_world.reference])
    both, logp, ref_logp = multiseed.sample(multiseed.stack(models), models[0].config, prompts, 2, [5, 6],
                                            tok.eos_token_id, tok.pad_token_id, max_new_tokens=8, reference=ref)
    for s, model in enumerate(models):  # each copy alone on its own prompts: the same draws and log-probs
        alone, lp, rl = multiseed.sample(multiseed.stack([model]), model.config, prompts[s], 2, [5 + s],
                                         tok.eos_token_id, tok.pad_token_id, max_new_tokens=8, reference=ref)
        assert both[s] == alone[0]
        assert torch.allclose(logp[s], lp[0], atol=1e-4) and torch.allclose(ref_logp[s], rl[0], atol=1e-4)
    # negative control: copy 1 on copy 0's prompts scores its draws differently (an untrained copy's draws are
    # mostly its seed's noise, so the log-probs, not the tokens, show which prompts it read)
    _, other, _ = multiseed.sample(multiseed.stack([models[1]]), models[1].config, prompts[0], 2, [6],
                                   tok.eos_token_id, tok.pad_token_id, max_new_tokens=8)
    assert (other[0] - logp[1]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="per-copy prompts"):
        multiseed.sample(multiseed.stack(models), models[0].config, prompts[:1], 2, [5, 6], tok.eos_token_id,
                         tok.pad_token_id)


def _packed_logits(model, batches, leak: bool = False):
    """run_dpo_seeds' forward (multiseed.forward on packed rows; optionally with a mask that lets the rejected side
    see the chosen side: the negative control), gathered back into the unpacked layout: (S, 2B, T, V)."""
    from minidpo import multiseed

    ids, packed, index = experiment._packed_inputs(batches, "cpu")
    if leak:  # every earlier token of the row visible, as if chosen and rejected were one sequence
        L = packed["attention_mask"].shape[-1]
        packed["attention_mask"] = torch.zeros(L, L).masked_fill_(~torch.ones(L, L, dtype=torch.bool).tril(),
                                                                  torch.finfo(torch.float32).min
                                                                  ).expand_as(packed["attention_mask"])
    logits = multiseed.forward(multiseed.stack([model] * len(batches)), model.config, packed["input_ids"],
                               packed["position_ids"], None, attention_bias=packed["attention_mask"])
    return ids, experiment._unpack(logits, index), packed


def test_packed_pairs_give_the_logits_of_the_unpacked_forward(tiny_world):
    """Chosen and rejected share their common prefix in one packed segment; each token must see exactly what it
    sees in its own row. Edge cases: a common prefix longer than the prompt, a rejected row that is a prefix of
    the chosen one, and seeds whose batches differ in length."""
    from minidpo.data import PreferenceCollator, tokenize_preferences

    tok, model = tiny_world.tokenizer, tiny_world.reference
    prompt = tiny_world.train_pairs[0]["prompt"]
    rows = [dict(r) for r in tiny_world.train_pairs.select(range(6))] + [
        {"prompt": prompt, "chosen": " the food was great. the staff", "rejected": " the food was great. the room"},
        {"prompt": prompt, "chosen": " the food was great. the staff was kind.", "rejected": " the food was great."},
    ]
    features, _ = tokenize_preferences(datasets.Dataset.from_list(rows), tok)
    collate = PreferenceCollator(tok.pad_token_id)
    batches = [collate(features[:4]), collate(features[4:])]  # two seeds, different rows and lengths
    ids, logits, packed = _packed_logits(model, batches)
    tokens = sum(int((x != 0).sum()) for x in ids)
    assert packed["input_ids"].numel() < tokens  # the common prefixes are run once
    for s, b in enumerate(batches):
        mask = torch.cat([b["chosen_attention_mask"], b["rejected_attention_mask"]])  # (2B, T_s)
        expected = model(input_ids=ids[s], attention_mask=mask).logits  # (2B, T_s, V)
        counted = mask.bool()
        assert torch.allclose(logits[s, :, : ids[s].shape[1]][counted], expected[counted], atol=1e-5)
    # negative control: the rejected side seeing the chosen side changes its logits, and the check sees it
    _, leaked, _ = _packed_logits(model, batches, leak=True)
    b = batches[1]
    mask = torch.cat([b["chosen_attention_mask"], b["rejected_attention_mask"]]).bool()
    expected = model(input_ids=ids[1], attention_mask=mask.long()).logits
    assert not torch.allclose(leaked[1, :, : ids[1].shape[1]][mask], expected[mask], atol=1e-3)


def test_train_and_evaluate_seeds_rows_and_one_end_measurement(tiny_world, monkeypatch):
    from minidpo import evaluate as ev

    calls = []
    original = ev.evaluate_policy
    monkeypatch.setattr(ev, "evaluate_policy", lambda *a, **k: calls.append(len(a[3])) or original(*a, **k))
    cfg = _cfg(max_steps=4)
    rows = experiment.train_and_evaluate_seeds(tiny_world, cfg, [0, 1], path_prompts=tiny_world.heldout_prompts[:4],
                                               path_every=2, log=quiet)
    n_all = len(tiny_world.heldout_prompts)
    # pi_ref once (step 0), 2 policies on the path prompts at step 2, and each end point once: not again at step 4
    assert calls == [n_all, 4, 4, n_all, n_all]
    for seed, row in zip([0, 1], rows):
        assert row["seed"] == seed and len(row["history"]) == 4
        assert [p["step"] for p in row["path"]] == [0, 2, 4] and row["path"][0]["kl"] == 0.0
        assert all(row["path"][-1][k] == row[k] for k in ("reward", "kl", "grammatical", "length"))
        assert 0.0 <= row["accuracy"] <= 1.0 and row["margin"] == pytest.approx(row["chosen"] - row["rejected"])
    assert rows[0]["history"][-1]["loss"] != rows[1]["history"][-1]["loss"]  # the seeds trained differently
    with pytest.raises(ValueError, match="max_steps"):
        experiment.train_and_evaluate_seeds(tiny_world, _cfg(max_steps=None, epochs=1), [0], path_every=2, log=quiet)


def test_sample_drops_ended_rows_without_changing_the_draws(tiny_world):
    """Rows that ended leave the batch (and the cache) while the others go on; the noise is still drawn for
    every row, so the samples are generate()'s from the same seed, row for row."""
    from minidpo import multiseed
    from minidpo.world import generate_completion_ids

    tok, model = tiny_world.tokenizer, fresh_model(tiny_world.tokenizer, seed=3)
    with torch.no_grad():  # raise EOS's logit (the lm_head is tied to wte), so rows end at different steps
        eos = model.transformer.wte.weight[tok.eos_token_id]
        model.transformer.ln_f.bias += 3.0 * eos / eos.norm() ** 2
    prompts = list(tiny_world.heldout_prompts[:12])
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    drawn, _, _ = multiseed.sample(multiseed.stack([model]), model.config, prompt_ids, 4, [5], tok.eos_token_id,
                                   tok.pad_token_id, max_new_tokens=40)
    ended = [c[-1] == tok.eos_token_id and len(c) < 30 for per in drawn[0] for c in per]
    assert sum(ended) > 0.25 * len(ended)  # rows left the batch well before the end: the dropping was exercised
    _, expected = generate_completion_ids(model, tok, prompts, k=4, max_new_tokens=40, seed=5, batch_size=48)
    assert drawn[0] == expected
    # negative control: another seed draws other completions, so the comparison can fail
    other, _, _ = multiseed.sample(multiseed.stack([model]), model.config, prompt_ids, 4, [6], tok.eos_token_id,
                                   tok.pad_token_id, max_new_tokens=40)
    assert other[0] != expected


def test_run_dpo_seeds_refuses_dropout_it_cannot_apply(tiny_world):
    """The stacked forward has no dropout: a model that keeps it (disable_dropout=False) gets a clear error, while
    the same model with dropout switched off (the default, as TRL) trains."""
    import copy as copy_

    reference = copy_.deepcopy(tiny_world.reference)
    for module in reference.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    world = replace(tiny_world, reference=reference)
    with pytest.raises(ValueError, match="dropout"):
        experiment.run_dpo_seeds(world, _cfg(max_steps=1, disable_dropout=False), [0, 1], log=quiet)
    runs = experiment.run_dpo_seeds(world, _cfg(max_steps=1), [0, 1], log=quiet)
    assert runs[0].history[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # pi = pi_ref at step 1, dropout off
