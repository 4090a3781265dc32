"""The DPO loop: it learns, it is deterministic, it resumes to the same result, it caches pi_ref, it stops on NaN."""

import json

import pytest
import torch

from minidpo.tokenizer import train_tokenizer
from minidpo.train import (CHECKPOINT, DPOConfig, SFTConfig, TrainingDiverged, batch_loss, sft, sft_on_pairs,
                           train_dpo)
from _fixtures import fresh_model, make_pairs


@pytest.fixture(scope="module")
def setup():
    pairs, corpus = make_pairs()
    tokenizer = train_tokenizer(corpus, model_max_length=64)
    return pairs, tokenizer


def cfg(**kw):
    base = dict(batch_size=8, lr=5e-3, max_steps=12, warmup_steps=2, cache_dir=None, show_progress=False)
    return DPOConfig(**{**base, **kw})


def quiet(*_):
    pass


def test_dpo_learns_the_training_preferences(setup):
    pairs, tok = setup
    result = train_dpo(fresh_model(tok), tok, pairs, cfg(max_steps=40, beta=0.5), log=quiet)
    first, last = result.history[0], result.history[-5:]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # pi == pi_ref at step 0: ln 2
    assert sum(r["loss"] for r in last) / 5 < 0.55
    assert sum(r["rewards/margins"] for r in last) / 5 > 0.2
    for key in ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm"]:
        assert key in first, key


def test_same_seed_same_numbers(setup):
    pairs, tok = setup
    a = train_dpo(fresh_model(tok), tok, pairs, cfg(), log=quiet).history
    b = train_dpo(fresh_model(tok), tok, pairs, cfg(), log=quiet).history
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    c = train_dpo(fresh_model(tok), tok, pairs, cfg(seed=1), log=quiet).history
    assert [r["loss"] for r in a] != [r["loss"] for r in c]  # the seed does matter (data order)


def test_resume_gives_the_uninterrupted_result(setup, tmp_path):
    pairs, tok = setup
    full = train_dpo(fresh_model(tok), tok, pairs, cfg(max_steps=12), output_dir=tmp_path / "full", log=quiet)

    class Stop(Exception):
        pass

    def stop_at_7(step, model):
        if step == 7:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run: a checkpoint is saved, then it re-raises
        return {}

    with pytest.raises(KeyboardInterrupt):
        train_dpo(fresh_model(tok), tok, pairs, cfg(max_steps=12), output_dir=tmp_path / "cut", log=quiet,
                  callback=stop_at_7, callback_every=1)
    state = torch.load(tmp_path / "cut" / CHECKPOINT / "trainer_state.pt", weights_only=False)
    assert state["step"] == 7
    resumed = train_dpo(fresh_model(tok, seed=5), tok, pairs, cfg(max_steps=12), output_dir=tmp_path / "cut",
                        resume=True, log=quiet)
    assert [r["step"] for r in resumed.history] == list(range(8, 13))
    torch.testing.assert_close([r["loss"] for r in resumed.history], [r["loss"] for r in full.history[7:]],
                               rtol=1e-6, atol=1e-7)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 13))


def test_reference_logps_cached_and_reused(setup, tmp_path):
    pairs, tok = setup
    messages = []
    a = train_dpo(fresh_model(tok), tok, pairs, cfg(cache_dir=str(tmp_path)), log=messages.append)
    assert any("computed" in m for m in messages) and len(list(tmp_path.glob("ref-logps-*.pt"))) == 1
    messages.clear()
    b = train_dpo(fresh_model(tok), tok, pairs, cfg(cache_dir=str(tmp_path)), log=messages.append)
    assert any("reused" in m for m in messages)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    # other weights: another key, no reuse
    messages.clear()
    train_dpo(fresh_model(tok, seed=3), tok, pairs, cfg(cache_dir=str(tmp_path)), log=messages.append)
    assert any("computed" in m for m in messages) and len(list(tmp_path.glob("ref-logps-*.pt"))) == 2


def test_precomputed_and_live_reference_agree(setup):
    pairs, tok = setup
    a = train_dpo(fresh_model(tok), tok, pairs, cfg(precompute_ref=True), log=quiet).history
    b = train_dpo(fresh_model(tok), tok, pairs, cfg(precompute_ref=False), log=quiet).history
    torch.testing.assert_close([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "robust", "apo_zero", "apo_down", "simpo", "orpo", "kto"])
def test_every_objective_trains(setup, loss_type):
    pairs, tok = setup
    extra = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    beta = 2.0 if loss_type == "simpo" else 0.1
    hist = train_dpo(fresh_model(tok), tok, pairs, cfg(loss_type=loss_type, beta=beta, max_steps=3, **extra),
                     log=quiet).history
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)


def test_rpo_term_adds_the_chosen_nll(setup):
    pairs, tok = setup
    model = fresh_model(tok)
    from minidpo.data import PreferenceCollator, tokenize_preferences

    features, _ = tokenize_preferences(pairs, tok, max_length=64)
    batch = PreferenceCollator(tok.pad_token_id)(features[:8])
    ref = {"chosen": torch.zeros(8), "rejected": torch.zeros(8)}
    plain, _ = batch_loss(model, batch, ref, cfg())
    with_nll, _ = batch_loss(model, batch, ref, cfg(rpo_alpha=0.5))
    from minidpo.logps import concatenated_forward

    nll = concatenated_forward(model, batch)["chosen_nll"]
    torch.testing.assert_close(with_nll - plain, 0.5 * nll)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    pairs, tok = setup
    model = fresh_model(tok)

    def poison(step, m):
        if step == 4:  # weights turn to NaN after step 4: the loss of step 5 is NaN
            with torch.no_grad():
                m.transformer.wte.weight.fill_(float("nan"))
        return {}

    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4; the weights are not finite; the last good "
                                               r"checkpoint \(step 4\)"):
        train_dpo(model, tok, pairs, cfg(save_every=2), output_dir=tmp_path, log=quiet, callback=poison,
                  callback_every=1)
    state = torch.load(tmp_path / CHECKPOINT / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4
    from transformers import AutoModelForCausalLM

    kept = AutoModelForCausalLM.from_pretrained(tmp_path / CHECKPOINT)
    assert all(torch.isfinite(p).all() for p in kept.parameters())


def test_nan_loss_from_finite_weights_saves_that_state(setup, tmp_path):
    pairs, tok = setup
    # IPO's target margin 1/(2 beta) = 5e38, squared, overflows float32 at once: the weights are still fine
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step (\d+); the last good state"):
        train_dpo(fresh_model(tok), tok, pairs, cfg(loss_type="ipo", beta=1e-39), output_dir=tmp_path, log=quiet)
    assert (tmp_path / CHECKPOINT / "trainer_state.pt").exists()


def test_bad_config_values_are_named(setup):
    pairs, tok = setup
    for kw, match in [({"beta": 0}, "beta must be > 0"), ({"lr": -1}, "lr must be > 0"),
                      ({"loss_type": "dpo"}, "unknown loss 'dpo'"), ({"batch_size": 0}, "batch_size must be"),
                      ({"batch_size": 1000}, "larger than the 64 usable pairs")]:
        with pytest.raises(ValueError, match=match):
            train_dpo(fresh_model(tok), tok, pairs, cfg(**kw), log=quiet)


def test_sft_and_preferred_ft_lower_their_loss(setup):
    pairs, tok = setup
    _, corpus = make_pairs()
    losses = sft(fresh_model(tok), tok, corpus[:200], SFTConfig(steps=30, batch_size=16, show_progress=False))
    assert losses[-1] < 0.7 * losses[0]
    model = fresh_model(tok)
    losses = sft_on_pairs(model, tok, pairs, SFTConfig(steps=30, batch_size=16, show_progress=False))
    assert losses[-1] < 0.7 * losses[0]
