"""Online baselines: the policy samples its own completions during training.

DPO learns from pairs sampled once from pi_ref. The two methods here sample from the policy being trained, at
every step, on the synthetic world's prompts:

    RLOO        REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics", Eq. 2-3;
                Kool et al. 2019). k completions per prompt; each one's per-sequence reward is
                    R(x, y) = r(x, y) - beta (log pi(y|x) - log pi_ref(y|x))        (the KL-penalised reward
                of Ziegler et al. 2019 and the DPO paper's Eq. 3), and its baseline is the mean R of the other
                k - 1 samples of the same prompt. The reward r is the true reward (the DPO paper's "PPO-GT")
                or a reward model learned from DPO's own pairs (``minidpo.reward_model``).
    online DPO  Guo et al. 2024 ("Direct language model alignment from online AI feedback"): two completions
                per prompt from the current policy, labelled by the same Bradley-Terry labeller that made the
                offline pairs, then one DPO step (``losses.preference_loss``) on them.

Both use the world's sampling (``world.generate_completion_ids``: many completions in one batched call) and
``logps.completion_logps``; ``train_online`` is the loop, one screen for the step. The estimators are tested
against exact gradients on ``minidpo.bandit``'s finite world (tests/test_online.py).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import get_scheduler

from . import runs
from . import world as w
from .evaluate import pack_completions
from .logps import completion_logps
from .losses import preference_loss
from .models import pick_device

METHODS = ("rloo", "online-dpo")


@dataclass
class OnlineConfig:
    method: str = "rloo"  # "rloo" or "online-dpo"
    beta: float = 0.1  # KL strength: RLOO's penalty per nat of log pi/pi_ref; online DPO's beta
    k: int = 4  # RLOO: completions per prompt (>= 2 for a leave-one-out baseline); online DPO always uses 2
    prompts_per_step: int = 16  # prompts per step: RLOO samples k x this, online DPO 2 x this
    steps: int = 60  # optimizer steps, one fresh batch of policy samples each
    lr: float = 1e-3  # the same as DPOConfig's: the tiny model needs a high rate
    warmup_steps: int = 5  # linear warm-up, then linear decay to 0
    max_grad_norm: float = 1.0  # gradient clipping
    max_new_tokens: int = 24  # generation budget per completion (the world's default)
    bt_scale: float = 1.0  # online DPO: the labeller's Bradley-Terry temperature (the world's default)
    seed: int = 0  # prompt order, sampling and the labeller's coins
    save_every: int = 0  # with an output_dir: checkpoint every N steps (0: at the end and on interrupt only)
    device: str = "auto"  # auto = cuda -> mps -> cpu

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        for name in ("beta", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.method == "rloo" and not (isinstance(self.k, int) and self.k >= 2):
            raise ValueError(f"RLOO needs k >= 2 samples per prompt (a leave-one-out baseline), got {self.k}")
        if not (isinstance(self.save_every, int) and self.save_every >= 0):
            raise ValueError(f"save_every must be a whole number >= 0, got {self.save_every}")
        for name in ("prompts_per_step", "steps", "max_new_tokens"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)}")
        if not self.bt_scale >= 0:
            raise ValueError(f"bt_scale must be >= 0, got {self.bt_scale}")

    @property
    def samples_per_prompt(self) -> int:
        return self.k if self.method == "rloo" else 2


@dataclass
class OnlineResult:
    model: torch.nn.Module
    history: list[dict[str, float]] = field(default_factory=list)  # one row per step
    evaluations: list[dict] = field(default_factory=list)  # what ``callback`` returned, with its step
    seconds: float = 0.0
    budget: dict = field(default_factory=dict)  # policy samples, labels (online DPO), gradient steps


# ---------------------------------------------------------------------------------------------------------
# the two losses, on (prompts, samples) tables of log-probs: the same code trains GPT-2 and the exact world
# ---------------------------------------------------------------------------------------------------------

def rloo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor, beta: float,
              baseline: str = "leave-one-out") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO's surrogate loss for k samples of each of B prompts; logps, ref_logps, rewards are (B, k).

        R_i = r_i - beta (log pi(y_i) - log pi_ref(y_i))          (detached: a reward, not a path for gradients)
        A_i = R_i - (1 / (k - 1)) sum_{j != i} R_j                (leave-one-out baseline, Ahmadian et al. Eq. 3)
        loss = -mean_{b, i} A_i log pi(y_i)

    Its gradient is an unbiased estimate of -grad E_{y~pi}[r - beta log pi/pi_ref] (the score-function identity;
    E[grad log pi] = 0 makes the missing d/dtheta of the penalty vanish in expectation, and the baseline does
    not depend on y_i). ``baseline`` "none" (plain REINFORCE: unbiased, noisier) or "mean" (the mean over all k,
    including y_i itself: biased by a factor (k - 1) / k) exist for the tests' negative controls.
    """
    if logps.shape != ref_logps.shape or logps.shape != rewards.shape or logps.dim() != 2:
        raise ValueError(f"logps, ref_logps and rewards must all be (B, k); got {tuple(logps.shape)}, "
                         f"{tuple(ref_logps.shape)}, {tuple(rewards.shape)}")
    k = logps.shape[1]
    log_ratio = (logps - ref_logps).detach()  # (B, k)
    total = rewards - beta * log_ratio  # (B, k): the KL-penalised per-sequence reward
    if baseline == "leave-one-out":
        if k < 2:
            raise ValueError("a leave-one-out baseline needs k >= 2 samples per prompt")
        advantage = total - (total.sum(1, keepdim=True) - total) / (k - 1)  # (B, k)
    elif baseline == "mean":
        advantage = total - total.mean(1, keepdim=True)
    elif baseline == "none":
        advantage = total
    else:
        raise ValueError(f"baseline must be 'leave-one-out', 'mean' or 'none', got {baseline!r}")
    loss = -(advantage * logps).mean()
    metrics = {"reward": rewards.mean(), "kl": log_ratio.mean(), "objective": total.mean(),
               "advantage_std": advantage.std()}
    return loss, metrics


def online_dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, p_first: torch.Tensor, beta: float,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Online DPO on two fresh samples per prompt; logps, ref_logps are (B, 2), p_first (B,) the labeller's
    P(y_1 > y_2) (``world.preference_probability``: Bradley-Terry on the labeller's utility).

    The label is drawn now, y_1 wins with probability p_first, and the loss is DPO's (Rafailov et al. Eq. 7,
    ``losses.preference_loss``) on (chosen, rejected). Guo et al. 2024, Algorithm 1, with the AI annotator
    replaced by the world's labeller. A pair of identical samples has zero gradient, as it should.
    """
    if logps.shape != ref_logps.shape or logps.dim() != 2 or logps.shape[1] != 2 or p_first.shape != logps.shape[:1]:
        raise ValueError(f"logps and ref_logps must be (B, 2) and p_first (B,); got {tuple(logps.shape)}, "
                         f"{tuple(ref_logps.shape)}, {tuple(p_first.shape)}")
    u = torch.rand(p_first.shape, generator=generator, dtype=torch.float64)
    first_wins = (u < p_first.double().cpu()).to(logps.device)  # (B,)
    chosen = torch.where(first_wins, 0, 1).unsqueeze(1)  # (B, 1): column of the winner
    rejected = 1 - chosen
    losses, chosen_r, rejected_r = preference_loss(
        logps.gather(1, chosen).squeeze(1), logps.gather(1, rejected).squeeze(1),
        ref_logps.gather(1, chosen).squeeze(1), ref_logps.gather(1, rejected).squeeze(1), beta=beta)
    metrics = {"kl": (logps - ref_logps).detach().mean(), "rewards/margins": (chosen_r - rejected_r).mean(),
               "rewards/accuracies": (chosen_r > rejected_r).float().mean()}
    return losses.mean(), metrics


# ---------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------

def _prompt_batches(n_prompts: int, size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of prompt batches: a permutation drawn from (seed, epoch) alone, so a resumed run sees the
    same prompts at the same step."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_prompts, generator=g).tolist()
    return [perm[i:i + size] for i in range(0, n_prompts - size + 1, size)]


def online_step(policy, reference, tokenizer, prompts: list[str], cfg: OnlineConfig, reward_fn,
                step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Sample from the current policy, score, return (loss, metrics) for one step of ``cfg.method``."""
    k, device = cfg.samples_per_prompt, next(policy.parameters()).device
    sample_seed = cfg.seed * 1_000_003 + step  # a function of the step: a resumed run draws the same samples
    prompt_ids, completion_ids = w.generate_completion_ids(policy, tokenizer, prompts, k=k,
                                                           max_new_tokens=cfg.max_new_tokens, seed=sample_seed)
    texts = [[w.decode_completion(tokenizer, ids) for ids in per] for per in completion_ids]
    flat_prompts = [p for p, per in zip(prompt_ids, completion_ids) for _ in per]
    flat_completions = [c for per in completion_ids for c in per]
    batch = [t.to(device) for t in pack_completions(flat_prompts, flat_completions, tokenizer.pad_token_id)]
    logps = completion_logps(policy, *batch).view(len(prompts), k)  # (B, k), with gradients
    with torch.no_grad():
        ref_logps = completion_logps(reference, *batch).view(len(prompts), k)  # (B, k)
    if cfg.method == "rloo":
        rewards = torch.tensor([[float(reward_fn(t)) for t in per] for per in texts], device=device)  # (B, k)
        loss, metrics = rloo_loss(logps, ref_logps, rewards, cfg.beta)
    else:
        p_first = torch.tensor([w.preference_probability(a, b, cfg.bt_scale, reward_fn=reward_fn)
                                for a, b in texts], dtype=torch.float64)  # (B,)
        labels = torch.Generator().manual_seed(sample_seed)
        loss, metrics = online_dpo_loss(logps, ref_logps, p_first, cfg.beta, generator=labels)
        metrics["reward"] = torch.tensor([[float(reward_fn(t)) for t in per] for per in texts]).mean()
    return loss, {name: float(v) for name, v in metrics.items()}


def train_online(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer, prompts: list[str],
                 cfg: OnlineConfig, reward_fn=None, output_dir: str | Path | None = None, resume: bool = False,
                 log=print, callback=None, callback_every: int = 0) -> OnlineResult:
    """Train ``policy`` with RLOO or online DPO on ``prompts``; ``reference`` (pi_ref) is only read.

    ``reward_fn(completion) -> float``: RLOO's reward, online DPO's labeller utility (default: the world's
    true reward). ``callback(step, policy) -> dict`` at step 0, every ``callback_every`` steps and at the end
    (as ``train.train_dpo``). With ``output_dir``: metrics.jsonl (one row per step), checkpoints
    (``runs.save_checkpoint``: every ``cfg.save_every`` steps, at the end and on Ctrl-C) and the final model;
    ``resume=True`` continues from the checkpoint there. Prompts, samples and labels are functions of
    (seed, step), so a resumed run ends where an uninterrupted one ends.
    """
    cfg.validate()
    reward_fn = reward_fn or w.reward
    if len(prompts) < cfg.prompts_per_step:
        raise ValueError(f"prompts_per_step {cfg.prompts_per_step} is more than the {len(prompts)} prompts")
    device = pick_device(cfg.device)
    policy.to(device).train().requires_grad_(True)
    reference.to(device).eval()  # read under no_grad only
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=min(cfg.warmup_steps, cfg.steps),
                              num_training_steps=cfg.steps)
    out = Path(output_dir) if output_dir is not None else None
    start = 0
    if resume:
        ckpt = runs.find_checkpoint(out) if out is not None else None
        if ckpt is None:
            raise ValueError(f"nothing to resume: no checkpoint in {out}")
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        policy.load_state_dict(type(policy).from_pretrained(ckpt).state_dict())
        policy.to(device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        runs.cut_metrics(out / "metrics.jsonl", start)
        log(f"resumed from {ckpt} at step {start}")
    metrics_file = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        metrics_file = open(out / "metrics.jsonl", "a" if resume else "w")
    result = OnlineResult(policy)

    def checkpoint(at_step: int) -> None:
        def write(folder: Path) -> None:
            policy.save_pretrained(folder)
            torch.save({"step": at_step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "config": asdict(cfg)}, folder / "trainer_state.pt")
        runs.save_checkpoint(out, at_step, write)

    def run_callback(at_step: int) -> None:
        policy.eval()
        with torch.no_grad():
            result.evaluations.append({"step": at_step, **(callback(at_step, policy) or {})})
        policy.train()

    if callback is not None and start == 0:
        run_callback(0)
    per_epoch = len(prompts) // cfg.prompts_per_step
    t0 = time.perf_counter()
    step = start
    try:
        while step < cfg.steps:
            epoch, index = divmod(step, per_epoch)
            rows = _prompt_batches(len(prompts), cfg.prompts_per_step, cfg.seed, epoch)[index]
            loss, metrics = online_step(policy, reference, tokenizer, [prompts[i] for i in rows], cfg, reward_fn,
                                        step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            if not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):
                raise FloatingPointError(f"{cfg.method}: non-finite loss or gradient at step {step}; try a lower lr")
            optimizer.step()
            scheduler.step()
            step += 1
            row = {"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(), **metrics}
            result.history.append(row)
            if metrics_file is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    checkpoint(step)
            if callback is not None and callback_every and step % callback_every == 0:
                run_callback(step)
    except KeyboardInterrupt:
        if out is not None:
            checkpoint(step)  # the last finished step: a resume starts the next one
            log(f"interrupted at step {step}: checkpoint saved in {out}; continue with resume")
        raise
    finally:
        if metrics_file is not None:
            metrics_file.close()
    result.seconds = time.perf_counter() - t0
    if callback is not None and result.evaluations and result.evaluations[-1]["step"] != cfg.steps:
        run_callback(cfg.steps)
    if out is not None:
        checkpoint(step)
        policy.save_pretrained(out)
        tokenizer.save_pretrained(out)
    policy.eval()
    result.budget = budget(cfg)
    return result


def budget(cfg: OnlineConfig) -> dict:
    """What a run spends: completions sampled from the policy, labels asked of the labeller, gradient steps."""
    samples = cfg.steps * cfg.prompts_per_step * cfg.samples_per_prompt
    labels = cfg.steps * cfg.prompts_per_step if cfg.method == "online-dpo" else 0
    return {"policy_samples": samples, "labelled_pairs": labels, "gradient_steps": cfg.steps}


def run_online(world, cfg: OnlineConfig | None = None, reward_fn=None, output_dir=None, resume: bool = False,
               log=print, callback=None, callback_every: int = 0) -> OnlineResult:
    """Train a copy of the world's pi_ref online on its training prompts (the prompts of its pairs)."""
    from .experiment import small_model_threads

    cfg = cfg or OnlineConfig()
    prompts = list(dict.fromkeys(world.train_pairs["prompt"]))  # the prompts DPO's pairs were sampled on
    policy = copy.deepcopy(world.reference)
    with small_model_threads(policy):
        return train_online(policy, world.reference, world.tokenizer, prompts, cfg, reward_fn=reward_fn,
                            output_dir=output_dir, resume=resume, log=log, callback=callback,
                            callback_every=callback_every)


def _stacked_completion_logps(weights, config, prompts, completions, pad_token_id: int) -> torch.Tensor:
    """log pi(y|x) summed over each completion's tokens, (S, B, k), for copy s's ``completions[s][i]`` (k each)
    of its ``prompts[s][i]``, under the stacked ``weights`` (``multiseed``; with gradients where they have)."""
    from . import multiseed

    S, B, k = len(completions), len(completions[0]), len(completions[0][0])
    # prompt + completion, right-padded: causal attention never reads the padding at the end
    rows = [[p + c for p, per in zip(prompts[s], completions[s]) for c in per] for s in range(S)]
    T = max(len(r) for per in rows for r in per)
    ids = torch.full((S, B * k, T), pad_token_id, dtype=torch.long)
    counted = torch.zeros(S, B * k, T, dtype=torch.bool)  # the completion's tokens
    for s in range(S):
        for j, r in enumerate(rows[s]):
            ids[s, j, :len(r)] = torch.tensor(r)
            counted[s, j, len(prompts[s][j // k]):len(r)] = True
    logits = multiseed.forward(weights, config, ids, torch.arange(T).expand(B * k, T),
                               torch.ones(B * k, T, dtype=torch.bool))  # (S, B*k, T, V)
    token_logps = torch.log_softmax(logits[:, :, :-1], -1).gather(-1, ids[:, :, 1:, None])[..., 0]  # (S, B*k, T-1)
    return (token_logps * counted[:, :, 1:]).sum(-1).view(S, B, k)


def train_online_seeds(world, cfg: OnlineConfig, seeds, reward_fns=None, callback=None,
                       callback_every: int = 0) -> list[OnlineResult]:
    """``len(seeds)`` copies of pi_ref trained as ``run_online(world, replace(cfg, seed=s))`` trains each, but
    together: one sampling loop (``multiseed.sample``) and one forward and backward of all copies per step.

    Seed s has its own prompt order, samples and labeller coins, drawn from s as in ``online_step``; the
    losses are the same functions (``rloo_loss``, ``online_dpo_loss``), summed over the copies so that each
    copy's gradient is its own, clipped per copy, and one AdamW over the stacked weights is S AdamWs (as
    ``experiment.run_dpo_seeds``). ``reward_fns[i]``: seed i's reward (default: the world's true reward).
    ``callback(step, params) -> list[dict]`` (``params``: the copies' stacked weights, detached, for
    ``multiseed``) runs at every ``callback_every`` steps and at the end. For checkpoints and resume, use
    ``run_online`` one seed at a time. The tiny model's step is mostly per-call overhead, which this shares.
    """
    from torch.func import stack_module_state

    from . import multiseed
    from .experiment import small_model_threads

    cfg.validate()
    seeds = [int(s) for s in seeds]
    S, k, B = len(seeds), cfg.samples_per_prompt, cfg.prompts_per_step
    reward_fns = list(reward_fns) if reward_fns is not None else [w.reward] * S
    if len(reward_fns) != S:
        raise ValueError(f"train_online_seeds: {len(reward_fns)} reward functions for {S} seeds")
    tok, reference, config = world.tokenizer, world.reference, world.reference.config
    prompts = list(dict.fromkeys(world.train_pairs["prompt"]))
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    params, _ = stack_module_state([reference] * S)  # {name: (S, ...)}, leaves that require grad
    ref = multiseed.stack([reference])
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=min(cfg.warmup_steps, cfg.steps),
                              num_training_steps=cfg.steps)
    results = [OnlineResult(reference, budget=budget(cfg)) for _ in seeds]
    per_epoch, t0 = len(prompts) // B, time.perf_counter()

    def run_callback(at_step: int) -> None:
        rows = callback(at_step, {n: v.detach() for n, v in params.items()})
        for result, row in zip(results, rows):
            result.evaluations.append({"step": at_step, **(row or {})})

    with small_model_threads(reference):
        for step in range(cfg.steps):
            epoch, index = divmod(step, per_epoch)
            batch = [[prompt_ids[i] for i in _prompt_batches(len(prompts), B, s, epoch)[index]] for s in seeds]
            sample_seeds = [s * 1_000_003 + step for s in seeds]  # as online_step: a function of (seed, step)
            completions, _, _ = multiseed.sample({n: v.detach() for n, v in params.items()}, config, batch, k,
                                                 sample_seeds, tok.eos_token_id, tok.pad_token_id,
                                                 max_new_tokens=cfg.max_new_tokens)
            logps = _stacked_completion_logps(params, config, batch, completions, tok.pad_token_id)  # (S, B, k)
            with torch.no_grad():
                ref_weights = {n: v.expand(S, *v.shape[1:]) for n, v in ref.items()}  # pi_ref for every copy
                ref_logps = _stacked_completion_logps(ref_weights, config, batch, completions, tok.pad_token_id)
            losses, metrics = [], []
            for s in range(S):
                texts = [[w.decode_completion(tok, c) for c in per] for per in completions[s]]
                rewards = torch.tensor([[float(reward_fns[s](t)) for t in per] for per in texts])  # (B, k)
                if cfg.method == "rloo":
                    loss, m = rloo_loss(logps[s], ref_logps[s], rewards, cfg.beta)
                else:
                    p_first = torch.tensor([w.preference_probability(a, b, cfg.bt_scale, reward_fn=reward_fns[s])
                                            for a, b in texts], dtype=torch.float64)  # (B,)
                    loss, m = online_dpo_loss(logps[s], ref_logps[s], p_first, cfg.beta,
                                              generator=torch.Generator().manual_seed(sample_seeds[s]))
                    m["reward"] = rewards.mean()
                losses.append(loss)
                metrics.append(m)
            optimizer.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()  # copy s's weights get the gradient of loss s alone
            grads = [p.grad for p in params.values()]
            norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (S,)
            if not (torch.isfinite(norms).all() and torch.isfinite(torch.stack(losses)).all()):
                raise FloatingPointError(f"{cfg.method}: non-finite loss or gradient at step {step}; try a lower lr")
            for g in grads:  # as clip_grad_norm_, per copy
                g.mul_((cfg.max_grad_norm / (norms + 1e-6)).clamp(max=1.0).view(-1, *([1] * (g.dim() - 1))))
            optimizer.step()
            scheduler.step()
            for s, result in enumerate(results):
                result.history.append({"step": step + 1, "loss": losses[s].item(), "grad_norm": norms[s].item(),
                                       **{name: float(v) for name, v in metrics[s].items()}})
            if callback is not None and callback_every and (step + 1) % callback_every == 0:
                run_callback(step + 1)
        if callback is not None and (not results[0].evaluations or results[0].evaluations[-1]["step"] != cfg.steps):
            run_callback(cfg.steps)
    seconds = time.perf_counter() - t0
    for s, result in enumerate(results):
        result.model = copy.deepcopy(reference).eval()
        with torch.no_grad():
            for name, p in result.model.named_parameters():
                p.copy_(params[name][s])
        result.seconds = seconds
    return results


__all__ = ["OnlineConfig", "OnlineResult", "METHODS", "rloo_loss", "online_dpo_loss", "online_step",
           "train_online", "train_online_seeds", "run_online", "budget"]
