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


# -------------------------------------------------------------------- issue 12: never lose a run; TRL parity

def dropout_model(tok, seed: int = 0):
    """The fixtures' tiny GPT-2 with dropout 0.1 everywhere, as GPT-2 from the Hub has."""
    from minidpo.models import tiny_gpt2

    return tiny_gpt2(len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, seed=seed,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.1)


@pytest.mark.parametrize("kw, match", [
    ({"lr": float("inf")}, "lr must be a finite number, got inf"),
    ({"lr": float("nan")}, "lr must be a finite number, got nan"),
    ({"beta": float("inf")}, "beta must be a finite number, got inf"),
    ({"save_every": -1}, "save_every must be >= 0, got -1"),
    ({"warmup_steps": -2}, "warmup_steps must be >= 0"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
    ({"epochs": 1.5}, "epochs must be a whole number"),
    ({"scheduler": "linar"}, "unknown scheduler 'linar'"),
])
def test_every_number_is_checked_before_any_work(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw).validate()


def test_an_update_that_makes_the_weights_non_finite_is_caught_even_at_the_last_step(setup, tmp_path, monkeypatch):
    pairs, tok = setup
    step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):  # an update that overflows, as `--lr inf` gave (0 x inf = NaN)
        out = step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    # the loss and gradient of the one and only step were finite: only a check after the update can see it
    with pytest.raises(TrainingDiverged, match="the update of step 1 made the weights non-finite"):
        train_dpo(fresh_model(tok), tok, pairs, cfg(max_steps=1), output_dir=tmp_path, log=quiet)
    assert not (tmp_path / "model.safetensors").exists()  # no non-finite model is saved as the result


def test_dropout_is_off_by_default_so_step_one_is_ln2(setup):
    pairs, tok = setup
    import math

    row = train_dpo(dropout_model(tok), tok, pairs, cfg(max_steps=1), log=quiet).history[0]
    # independent of minidpo's code: pi = pi_ref at step 1, so the DPO loss is ln 2 and the margin 0 exactly
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6) and row["rewards/margins"] == pytest.approx(0, abs=1e-6)
    # negative control: with dropout kept, pi is scored with random masks and pi_ref without
    kept = train_dpo(dropout_model(tok), tok, pairs, cfg(max_steps=1, disable_dropout=False), log=quiet).history[0]
    assert abs(kept["loss"] - math.log(2)) > 1e-4 and abs(kept["rewards/margins"]) > 1e-4


def test_the_logged_learning_rate_is_the_one_applied(setup):
    pairs, tok = setup
    warmup, total, lr = 3, 8, 5e-3
    snapshots = {}

    def keep(step, model):
        snapshots[step] = [p.detach().clone() for p in model.parameters()]
        return {}

    hist = train_dpo(fresh_model(tok), tok, pairs, cfg(lr=lr, warmup_steps=warmup, max_steps=total), log=quiet,
                     callback=keep, callback_every=1).history
    # transformers' linear schedule written out: step s (1-based) applies lr * factor(s - 1)
    expected = [lr * (k / warmup if k < warmup else (total - k) / (total - warmup)) for k in range(total)]
    assert [r["learning_rate"] for r in hist] == pytest.approx(expected, rel=1e-12, abs=0)
    # and the weights agree: the first update was applied with rate 0 (AdamW without decay leaves them as they were)
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))


def test_ctrl_c_mid_step_then_resume_is_exact_with_dropout(setup, tmp_path):
    import os
    import signal

    pairs, tok = setup
    run = cfg(max_steps=10, disable_dropout=False)
    full = train_dpo(dropout_model(tok), tok, pairs, run, log=quiet)

    model = dropout_model(tok)
    calls = []

    def ctrl_c_during_step_6(module, inputs):  # Ctrl-C arrives inside a forward pass, after dropout was drawn
        if module.training:
            calls.append(1)
            if len(calls) == 6:
                os.kill(os.getpid(), signal.SIGINT)

    model.transformer.h[0].register_forward_pre_hook(ctrl_c_during_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(model, tok, pairs, run, output_dir=tmp_path, log=quiet)
    resumed = train_dpo(dropout_model(tok, seed=7), tok, pairs, run, output_dir=tmp_path, resume=True, log=quiet)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    torch.testing.assert_close([r["loss"] for r in rows], [r["loss"] for r in full.history], rtol=0, atol=1e-6)


def test_a_damaged_cache_entry_is_recomputed_not_trusted(setup, tmp_path):
    pairs, tok = setup
    messages = []
    first = train_dpo(fresh_model(tok), tok, pairs, cfg(cache_dir=str(tmp_path)), log=messages.append).history
    (entry,) = tmp_path.glob("ref-logps-*.pt")
    entry.write_bytes(entry.read_bytes()[:-40])  # truncated, as by a full disk or a killed copy
    messages.clear()
    again = train_dpo(fresh_model(tok), tok, pairs, cfg(cache_dir=str(tmp_path)), log=messages.append).history
    assert any("damaged; recomputing" in m for m in messages) and [r["loss"] for r in again] == [r["loss"] for r in first]
    messages.clear()
    train_dpo(fresh_model(tok), tok, pairs, cfg(cache_dir=str(tmp_path)), log=messages.append)
    assert any("reused" in m for m in messages)  # the recomputed entry replaced the damaged one


def test_checkpoints_are_periodic_by_default():
    assert DPOConfig().save_every > 0


def test_max_length_is_left_alone_when_every_row_fits(setup):
    pairs, tok = setup
    messages = []
    train_dpo(fresh_model(tok), tok, pairs, cfg(max_length=128, max_steps=1), log=messages.append)  # 64 positions
    assert not any("positions" in m for m in messages) and any("max_length=128" in m for m in messages)
