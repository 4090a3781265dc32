"""The online estimators against exact gradients on the exact world, then short runs on a tiny GPT-2.

On ``minidpo.bandit``'s finite world every expectation can be enumerated, so the Monte-Carlo gradient of RLOO's
surrogate loss, averaged over many sample groups, must match the exact gradient of
J(pi) = E_x E_{y~pi}[r - beta log pi/pi_ref]; online DPO's, the exact gradient of its expected loss over pairs
drawn from the current policy and labelled by Bradley-Terry. Each check has a negative control that must fail it.
"""

import copy
import json
from dataclasses import replace

import pytest
import torch

from minidpo import bandit, world as w
from minidpo.online import OnlineConfig, budget, online_dpo_loss, rloo_loss, train_online
from minidpo.tokenizer import train_tokenizer
from minidpo.train import SFTConfig, sft

from _fixtures import fresh_model

DT = torch.float64


@pytest.fixture(scope="module")
def exact():
    world = bandit.make_world(n_prompts=3, n_responses=5, seed=3, reward_scale=1.5)
    gen = torch.Generator().manual_seed(1)
    theta = torch.log(world.reference_probs) + 0.7 * torch.randn(world.reference_probs.shape, generator=gen, dtype=DT)
    return world, theta  # a policy away from pi_ref and from pi*, so both terms of J's gradient matter


def exact_rlhf_gradient(world, theta, beta):
    t = theta.clone().requires_grad_(True)
    bandit.rlhf_objective(torch.softmax(t, -1), world.reference_probs, world.rewards, beta).backward()
    return t.grad


def rloo_gradient(world, theta, beta, k=4, groups=20000, seed=0, **kwargs):
    """-grad of RLOO's loss on `groups` groups of k samples per prompt (the prompts weighted equally, as d(x))."""
    gen = torch.Generator().manual_seed(seed)
    t = theta.clone().requires_grad_(True)
    log_pi = torch.log_softmax(t, -1)  # (P, K)
    P = theta.shape[0]
    y = torch.multinomial(torch.softmax(theta, -1).repeat_interleave(groups, 0), k, replacement=True,
                          generator=gen)  # (P * groups, k)
    x = torch.arange(P).repeat_interleave(groups)[:, None].expand_as(y)  # (P * groups, k)
    log_ref = torch.log(world.reference_probs)
    loss, _ = rloo_loss(log_pi[x, y], log_ref[x, y], world.rewards[x, y], beta, **kwargs)
    loss.backward()
    return -t.grad


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_rloo_gradient_is_the_exact_gradient_of_the_kl_penalised_reward(exact):
    world, theta = exact
    beta = 0.5
    truth = exact_rlhf_gradient(world, theta, beta)
    estimate = rloo_gradient(world, theta, beta)
    assert relative_error(estimate, truth) < 0.03
    # negative controls: the KL penalty with the wrong sign, or a baseline that includes the sample itself
    flipped = rloo_gradient(world, theta, -beta)
    assert relative_error(flipped, truth) > 0.2
    own_mean = rloo_gradient(world, theta, beta, baseline="mean")  # biased by (k - 1) / k = 0.75
    assert relative_error(own_mean, truth) > 0.15
    assert relative_error(own_mean, 0.75 * truth) < 0.03


def test_rloo_baseline_cuts_variance_not_the_mean(exact):
    world, theta = exact
    beta = 0.5
    # A constant added to every reward changes neither J's gradient nor RLOO's advantages (the baseline absorbs
    # it) but plain REINFORCE multiplies every score by it: far noisier, as unbiased.
    shifted = bandit.ExactWorld(world.reference_probs, world.rewards + 10.0, world.prompt_probs)
    truth = exact_rlhf_gradient(shifted, theta, beta)
    assert torch.allclose(truth, exact_rlhf_gradient(world, theta, beta))
    assert torch.allclose(rloo_gradient(shifted, theta, beta, groups=50), rloo_gradient(world, theta, beta, groups=50))
    loo = [rloo_gradient(shifted, theta, beta, groups=50, seed=s) for s in range(200)]
    plain = [rloo_gradient(shifted, theta, beta, groups=50, seed=s, baseline="none") for s in range(200)]
    spread = {name: float(torch.stack([(g - truth).norm() ** 2 for g in gs]).mean())
              for name, gs in (("loo", loo), ("none", plain))}
    assert spread["none"] > 20 * spread["loo"], spread
    assert relative_error(torch.stack(plain).mean(0), truth) < 0.2  # REINFORCE without a baseline: unbiased
    assert relative_error(torch.stack(loo).mean(0), truth) < 0.05


def test_rloo_gradient_vanishes_at_the_optimum(exact):
    world, _ = exact
    beta = 0.5
    optimum = torch.log(world.optimal_policy(beta))
    assert float(exact_rlhf_gradient(world, optimum, beta).norm()) < 1e-12
    at_optimum = rloo_gradient(world, optimum, beta).norm()
    away = rloo_gradient(world, torch.log(world.reference_probs), beta).norm()
    assert float(at_optimum) < 0.1 * float(away)


def exact_online_dpo_gradient(world, theta, beta, flip=False):
    """grad of E_x E_{y1, y2 ~ pi} E_label[DPO loss], with pi in the sampling weights held fixed (stop-gradient)."""
    t = theta.clone().requires_grad_(True)
    log_pi, log_ref = torch.log_softmax(t, -1), torch.log(world.reference_probs)
    h = (log_pi - log_ref)[:, :, None] - (log_pi - log_ref)[:, None, :]  # (P, K, K): y1 over y2
    p = bandit.bradley_terry_matrix(world.rewards)  # (P, K, K): P(y1 > y2)
    if flip:
        p = 1 - p
    weights = torch.softmax(theta, -1)[:, :, None] * torch.softmax(theta, -1)[:, None, :]  # pi(y1) pi(y2)
    expected = weights * (p * -torch.nn.functional.logsigmoid(beta * h)
                          + (1 - p) * -torch.nn.functional.logsigmoid(-beta * h))
    expected.sum((1, 2)).mean().backward()
    return t.grad


def online_dpo_gradient(world, theta, beta, groups=40000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = theta.clone().requires_grad_(True)
    log_pi, log_ref = torch.log_softmax(t, -1), torch.log(world.reference_probs)
    P = theta.shape[0]
    y = torch.multinomial(torch.softmax(theta, -1).repeat_interleave(groups, 0), 2, replacement=True,
                          generator=gen)  # (P * groups, 2)
    x = torch.arange(P).repeat_interleave(groups)[:, None].expand_as(y)
    r = world.rewards[x, y]
    p_first = torch.sigmoid(r[:, 0] - r[:, 1])
    loss, _ = online_dpo_loss(log_pi[x, y], log_ref[x, y], p_first, beta, generator=gen)
    loss.backward()
    return t.grad


def test_online_dpo_gradient_is_the_exact_expected_gradient(exact):
    world, theta = exact
    beta = 0.5
    truth = exact_online_dpo_gradient(world, theta, beta)
    estimate = online_dpo_gradient(world, theta, beta)
    assert relative_error(estimate, truth) < 0.05
    assert relative_error(estimate, exact_online_dpo_gradient(world, theta, beta, flip=True)) > 0.5  # control


def test_online_dpo_fixed_point_is_the_rlhf_optimum(exact):
    world, _ = exact
    beta = 0.5
    optimum = torch.log(world.optimal_policy(beta))
    assert float(exact_online_dpo_gradient(world, optimum, beta).norm()) < 1e-12
    assert float(exact_online_dpo_gradient(world, torch.log(world.reference_probs), beta).norm()) > 1e-2
    # and the stochastic loop gets there: tabular online DPO from pi_ref, 2 samples per prompt per step
    theta = torch.log(world.reference_probs).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for step in range(600):
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(theta, -1).repeat_interleave(64, 0), 2, replacement=True,
                                  generator=gen)
        x = torch.arange(3).repeat_interleave(64)[:, None].expand_as(y)
        r = world.rewards[x, y]
        log_pi = torch.log_softmax(theta, -1)
        loss, _ = online_dpo_loss(log_pi[x, y], torch.log(world.reference_probs)[x, y],
                                  torch.sigmoid(r[:, 0] - r[:, 1]), beta, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    start = bandit.kl_to_optimum(world, world.reference_probs, beta)
    end = bandit.kl_to_optimum(world, torch.softmax(theta.detach(), -1), beta)
    assert end < 0.05 * start


def test_losses_reject_bad_shapes():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="must all be"):
        rloo_loss(x, torch.zeros(4, 2), x, 0.1)
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_loss(torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(4, 1), 0.1)
    with pytest.raises(ValueError, match="baseline"):
        rloo_loss(x, x, x, 0.1, baseline="median")
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        online_dpo_loss(x, x, torch.zeros(4), 0.1)


def test_config_validation_and_budget():
    with pytest.raises(ValueError, match="unknown method"):
        OnlineConfig(method="ppo").validate()
    with pytest.raises(ValueError, match="k >= 2"):
        OnlineConfig(k=1).validate()
    with pytest.raises(ValueError, match="beta"):
        OnlineConfig(beta=0).validate()
    assert budget(OnlineConfig(k=4, prompts_per_step=8, steps=10)) == {
        "policy_samples": 320, "labelled_pairs": 0, "gradient_steps": 10}
    assert budget(OnlineConfig(method="online-dpo", prompts_per_step=8, steps=10))["labelled_pairs"] == 80


# ------------------------------------------------------------------------------------------- on a tiny GPT-2

@pytest.fixture(scope="module")
def tiny():
    cfg = w.WorldConfig(n_corpus=800, n_train_prompts=64, n_heldout_prompts=64)
    corpus = w.generate_corpus(cfg)
    tok = train_tokenizer(corpus, model_max_length=64, full_byte_alphabet=False)
    ref = fresh_model(tok)
    sft(ref, tok, corpus, SFTConfig(steps=150, batch_size=32, warmup_steps=10, show_progress=False, device="cpu"),
        log=lambda *a: None)
    train, heldout = w.make_prompts(cfg)
    return tok, ref.eval(), train, heldout


def mean_reward(model, tok, prompts, reward_fn=w.reward):
    texts = w.sample_completions(model, tok, prompts, k=4, seed=123)
    return sum(reward_fn(t) for per in texts for t in per) / (4 * len(prompts))


@pytest.mark.parametrize("method", ["rloo", "online-dpo"])
def test_online_run_raises_the_true_reward(tiny, method, tmp_path):
    tok, ref, train, heldout = tiny
    steps = 15 if method == "rloo" else 60  # two samples and one label per prompt: a weaker signal per step
    cfg = OnlineConfig(method=method, beta=0.1, steps=steps, prompts_per_step=16, lr=3e-3, device="cpu")
    result = train_online(copy.deepcopy(ref), ref, tok, train, cfg, output_dir=tmp_path, log=lambda *a: None)
    before, after = mean_reward(ref, tok, heldout), mean_reward(result.model, tok, heldout)
    assert after > before + (0.5 if method == "rloo" else 0.3), (before, after)  # SE of each mean ~0.07
    assert len(result.history) == steps and (tmp_path / "metrics.jsonl").read_text().count("\n") == steps
    # negative control: rewarding negative words instead drives the true reward down
    if method == "rloo":
        worse = train_online(copy.deepcopy(ref), ref, tok, train, cfg, reward_fn=lambda t: -w.reward(t),
                             log=lambda *a: None)
        assert mean_reward(worse.model, tok, heldout) < before - 0.5


def test_same_seed_same_run(tiny):
    tok, ref, train, _ = tiny
    cfg = OnlineConfig(steps=3, prompts_per_step=8, device="cpu")
    a = train_online(copy.deepcopy(ref), ref, tok, train, cfg, log=lambda *a: None).history
    b = train_online(copy.deepcopy(ref), ref, tok, train, cfg, log=lambda *a: None).history
    c = train_online(copy.deepcopy(ref), ref, tok, train, OnlineConfig(steps=3, prompts_per_step=8, seed=1,
                                                                       device="cpu"), log=lambda *a: None).history
    assert a == b and a != c


def test_gold_reward_penalises_what_the_labeller_cannot_see():
    assert w.gold_reward(" great . the cast is fun .") == w.reward(" great . the cast is fun .") == 2
    assert w.gold_reward(" great . the cast is great .") == 0  # a repeat costs 2, earns 1
    assert w.reward(" great great great good") == 4 and w.gold_reward(" great great great good") == -2
    corpus = w.generate_corpus(w.WorldConfig(n_corpus=300))
    for review in corpus:  # the completion grammar agrees with the full-review grammar on real completions
        prompt, completion = w.split_review(review)
        assert w.completion_is_grammatical(completion) == w.is_grammatical(prompt + completion, 2, 4)
        assert w.completion_is_grammatical(completion + " good") is False  # a control: one stray word


def test_best_of_n_selected_by_one_reward_scored_by_another():
    from minidpo.evaluate import best_of_n

    gen = torch.Generator().manual_seed(0)
    truth = torch.randint(-3, 4, (20, 64), generator=gen).double()
    proxy = truth + 0.5 * torch.randn(truth.shape, generator=gen, dtype=DT)  # a noisy reward model
    ns = [1, 4, 16]
    assert best_of_n(truth.tolist(), ns, truth.tolist()) == best_of_n(truth.tolist(), ns)
    by_proxy = best_of_n(proxy.tolist(), ns, truth.tolist())
    by_truth = best_of_n(truth.tolist(), ns)
    assert abs(by_proxy[0]["reward"] - float(truth.mean())) < 1e-9  # n = 1 is pi_ref
    assert by_proxy[0]["reward"] < by_proxy[1]["reward"] < by_proxy[2]["reward"] < by_truth[2]["reward"]
    backwards = best_of_n((-proxy).tolist(), ns, truth.tolist())  # control: selecting the worst
    assert backwards[2]["reward"] < backwards[0]["reward"] - 1.0


def test_resume_gives_the_uninterrupted_run(tiny, tmp_path):
    tok, ref, train, _ = tiny
    cfg = OnlineConfig(method="online-dpo", steps=6, prompts_per_step=8, save_every=2, device="cpu")
    full = train_online(copy.deepcopy(ref), ref, tok, train, cfg, output_dir=tmp_path / "full", log=lambda *a: None)
    cut = OnlineConfig(method="online-dpo", steps=6, prompts_per_step=8, save_every=2, device="cpu")

    def stop_at_4(step, model):
        if step == 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_online(copy.deepcopy(ref), ref, tok, train, cut, output_dir=tmp_path / "cut", log=lambda *a: None,
                     callback=stop_at_4, callback_every=1)
    resumed = train_online(copy.deepcopy(ref), ref, tok, train, cut, output_dir=tmp_path / "cut", resume=True,
                           log=lambda *a: None)
    assert [r["step"] for r in resumed.history] == [5, 6]
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert rows == full.history  # the same prompts, samples, labels and updates as the uninterrupted run
    with pytest.raises(ValueError, match="nothing to resume"):
        train_online(copy.deepcopy(ref), ref, tok, train, cut, output_dir=tmp_path / "empty", resume=True,
                     log=lambda *a: None)


def test_cli_online_run_folder_and_resume(tmp_path, capsys):
    from minidpo.cli import main

    out = tmp_path / "run"
    assert main(["online", "--output-dir", str(out), "--k", "1"]) == 2  # a bad value: one error line, exit 2
    assert "k >= 2" in capsys.readouterr().err and not out.exists()  # and nothing left behind
    args = ["online", "--output-dir", str(out), "--method", "online-dpo", "--steps", "3", "--prompts-per-step", "8"]
    assert main(args) == 0
    assert (out / "metrics.jsonl").read_text().count("\n") == 3 and (out / "eval.json").is_file()
    assert main(args) == 2  # a finished run is not overwritten without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["online", "--output-dir", str(out), "--resume"]) == 0  # nothing left to do, same settings
    assert (out / "metrics.jsonl").read_text().count("\n") == 3


@pytest.mark.parametrize("method", ["rloo", "online-dpo"])
def test_seeds_trained_together_are_the_runs_trained_alone(tiny, method):
    from types import SimpleNamespace

    from minidpo.online import train_online_seeds

    tok, ref, train, _ = tiny
    world = SimpleNamespace(tokenizer=tok, reference=ref, train_pairs={"prompt": train})
    cfg = OnlineConfig(method=method, steps=4, prompts_per_step=8, lr=3e-3, device="cpu")
    seen = []
    together = train_online_seeds(world, cfg, [0, 3], callback=lambda step, weights: seen.append(step) or [{}, {}],
                                  callback_every=2)
    assert seen == [2, 4] and [e["step"] for e in together[1].evaluations] == [2, 4]
    for seed, result in zip((0, 3), together):
        alone = train_online(copy.deepcopy(ref), ref, tok, train, replace(cfg, seed=seed), log=lambda *a: None)
        for a, b in zip(alone.history, result.history):  # the same prompts, samples, labels and updates
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-4)
            assert b["reward"] == a["reward"] and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
        gap = max((p - q).abs().max().item() for p, q in zip(alone.model.parameters(), result.model.parameters()))
        moved = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), result.model.parameters()))
        assert gap < 1e-3 < moved  # float32 rounding in Adam's first steps, against 4 steps of lr 3e-3
    # negative control: the copies are not one run: seed 3's history is not seed 0's
    assert [r["reward"] for r in together[0].history] != [r["reward"] for r in together[1].history]
