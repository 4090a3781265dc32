"""Training loops: SFT (which makes pi_ref) and DPO with every objective of ``losses.py``.

The DPO loop is plain PyTorch, readable top to bottom:
  tokenize once -> precompute the reference log-probs once (cached on disk) -> for each step:
  one concatenated forward of chosen+rejected -> loss -> backward -> clip -> AdamW -> log TRL-named metrics.
No reference model is held in memory while training when ``precompute_ref=True`` (TRL's
``precompute_ref_log_probs``): the reference's numbers never change, so they are computed once.
Launched by ``torchrun`` or ``accelerate launch`` (WORLD_SIZE > 1), the same loop runs data-parallel: the model
is wrapped in DistributedDataParallel and each process takes its share of every global batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from .data import PreferenceCollator, tokenize_preferences
from .logps import IGNORE_INDEX, completion_logps, concatenated_forward
from .losses import LOSS_TYPES, kto_loss, orpo_loss, preference_loss, simpo_loss
from .models import pick_device

TRAIN_LOSSES = (*LOSS_TYPES, "simpo", "orpo", "kto")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")  # these never look at pi_ref
RUN_MARKER = "minidpo_run.json"  # marks a folder as ours, so we may write into it again
CHECKPOINT = "checkpoint"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the message names the step and the checkpoint that was kept."""


@dataclass
class SFTConfig:
    steps: int = 300  # optimizer steps; ~300 make the tiny GPT-2 fluent in the synthetic world
    batch_size: int = 32  # sequences per step
    lr: float = 3e-3  # high, as small models from scratch tolerate it
    warmup_steps: int = 20  # linear warm-up, then linear decay to 0
    weight_decay: float = 0.0  # none: the corpus is the whole world, nothing to regularise towards
    max_length: int = 64  # tokens per sequence; longer rows are cut
    seed: int = 0  # data order and initialisation of anything random
    device: str = "auto"  # auto = cuda -> mps -> cpu
    show_progress: bool = True  # tqdm bar


@dataclass
class DPOConfig:
    loss_type: str = "sigmoid"  # one of TRAIN_LOSSES; "sigmoid" is DPO
    beta: float = 0.1  # KL strength; DPO paper: 0.1 for most tasks (SimPO uses 2.0-2.5, set it yourself)
    label_smoothing: float = 0.0  # cDPO / robust DPO: assumed label-flip rate
    rpo_alpha: float = 0.0  # weight of an NLL term on the chosen (RPO, Pang et al. 2024); TRL's rpo_alpha
    simpo_gamma: float = 0.5  # SimPO target margin
    orpo_alpha: float = 1.0  # ORPO: weight of the chosen NLL added to the odds-ratio term
    lr: float = 1e-3  # tiny models need a high rate; for GPT-2-sized models use ~5e-7 to 5e-6
    batch_size: int = 16  # pairs per step
    epochs: int = 1  # passes over the pairs (ignored when max_steps is set)
    max_steps: int | None = None  # stop after this many steps
    warmup_steps: int = 10  # linear warm-up
    scheduler: str = "linear"  # any transformers.get_scheduler name
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    max_length: int = 128  # prompt + completion tokens
    max_prompt_length: int | None = None  # default: max_length // 2
    precompute_ref: bool = True  # compute reference log-probs once, cache them, hold no reference model
    cache_dir: str | None = ".cache/minidpo"  # where precomputed reference log-probs are kept; None: no disk
    save_every: int = 0  # checkpoint every N steps (0: only at the end and on interrupt)
    seed: int = 0  # data order
    device: str = "auto"  # auto = cuda -> mps -> cpu
    precision: str = "auto"  # auto (bf16 autocast on cuda, fp32 elsewhere) | fp32 | bf16 | fp16
    show_progress: bool = True  # tqdm bar

    def validate(self) -> None:
        if self.loss_type not in TRAIN_LOSSES:
            raise ValueError(f"unknown loss {self.loss_type!r}; valid: {', '.join(TRAIN_LOSSES)}")
        for name in ("beta", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("batch_size", "epochs", "max_length"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[dict[str, float]] = field(default_factory=list)  # one row of metrics per step
    evaluations: list[dict] = field(default_factory=list)  # what ``callback`` returned, with its step
    seconds: float = 0.0
    output_dir: str | None = None


# ---------------------------------------------------------------------------------------------------------
# helpers: seeds, precision, the reference log-prob cache, checkpoints
# ---------------------------------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return torch.autocast(device_type=device.type, dtype=dtype), scaler


def _fingerprint(model: torch.nn.Module, features: list[dict], max_length: int) -> str:
    """A key for the reference cache: the weights and the tokenized data, so a change in either misses."""
    h = hashlib.blake2b(digest_size=12)
    seen = set()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        if tensor.data_ptr() in seen:  # tied weights (GPT-2's lm_head is wte): hashed once
            continue
        seen.add(tensor.data_ptr())
        # the raw bytes, read in place: no float32 copy of the model (any dtype, bf16 included)
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for row in features:
        h.update(np.asarray(row["chosen_input_ids"] + [-1] + row["rejected_input_ids"], dtype=np.int64).tobytes())
        h.update(np.asarray(row["chosen_labels"] + row["rejected_labels"], dtype=np.int64).tobytes())
    h.update(str(max_length).encode())
    return h.hexdigest()


@torch.inference_mode()  # like no_grad, and skips autograd's version counters too
def compute_reference_logps(
    model: torch.nn.Module, features: list[dict], collator: PreferenceCollator, batch_size: int,
    device: torch.device, show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """log pi_ref(y_w|x) and log pi_ref(y_l|x) for every pair, (N,) each, in the order of ``features``.

    Each number belongs to one pair, so the pairs may be visited in any order: shortest first, so that each
    batch holds rows of similar length and pads less (7% fewer tokens on the benchmark's data, far more on
    data whose lengths vary widely). The results are put back in the order of ``features``.
    """
    was_training = model.training
    model.eval()
    by_length = sorted(range(len(features)), key=lambda i: max(len(features[i]["chosen_input_ids"]),
                                                               len(features[i]["rejected_input_ids"])))
    chosen, rejected = torch.empty(len(features)), torch.empty(len(features))
    for start in tqdm(range(0, len(features), batch_size), desc="reference log-probs", disable=not show_progress,
                      leave=False):
        rows = by_length[start:start + batch_size]
        out = concatenated_forward(model, _to(collator([features[i] for i in rows]), device))
        chosen[rows] = out["chosen_logps"].float().cpu()
        rejected[rows] = out["rejected_logps"].float().cpu()
    model.train(was_training)
    return {"chosen": chosen, "rejected": rejected}


def cached_reference_logps(model, features, collator, cfg: DPOConfig, device, log=print) -> dict[str, torch.Tensor]:
    """Reference log-probs from the disk cache when the same model and data were seen before."""
    path = None
    if cfg.cache_dir:
        key = _fingerprint(model, features, cfg.max_length)
        path = Path(cfg.cache_dir) / f"ref-logps-{key}.pt"
        if path.exists():
            log(f"reference log-probs: reused {path}")
            return torch.load(path)
    t0 = time.perf_counter()
    ref = compute_reference_logps(model, features, collator, cfg.batch_size, device, cfg.show_progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(ref, tmp)
        os.replace(tmp, path)  # atomic: another process (a DDP rank, a second run) never reads half a file
        log(f"reference log-probs: computed for {len(features)} pairs in {time.perf_counter() - t0:.1f} s, "
            f"cached at {path}")
    return ref


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _save_checkpoint(out: Path, model, tokenizer, optimizer, scheduler, scaler, step: int, cfg: DPOConfig) -> None:
    ckpt = out / CHECKPOINT
    tmp = out / (CHECKPOINT + ".tmp")
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "config": asdict(cfg),
                "rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
    # write-then-rename, so an interrupt during the save never leaves a half checkpoint behind
    if ckpt.exists():
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    tmp.rename(ckpt)


def _silent(*_args, **_kwargs) -> None:
    pass


def _distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Under torchrun / accelerate launch (WORLD_SIZE > 1) the
    process group is started here if the launcher's script has not done it: NCCL on GPUs, gloo on the CPU;
    each GPU process takes the GPU of its LOCAL_RANK. A plain run is (0, 1, device)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0, 1, device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return dist.get_rank(), dist.get_world_size(), device


def _batch_order(n_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation drawn from (seed, epoch) alone, so a resumed run can jump
    straight to any step and see the same batches as an uninterrupted one. A short last batch is dropped."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_rows, generator=g).tolist()
    return [perm[i:i + batch_size] for i in range(0, n_rows - batch_size + 1, batch_size)]


# ---------------------------------------------------------------------------------------------------------
# the loss of one batch, for every objective
# ---------------------------------------------------------------------------------------------------------

def batch_loss(model, batch: dict[str, torch.Tensor], ref: dict[str, torch.Tensor] | None,
               cfg: DPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss of a batch and the TRL-named metrics. ``ref`` holds reference log-probs for this batch."""
    out = concatenated_forward(model, batch)
    pc, pr = out["chosen_logps"], out["rejected_logps"]  # (B,)
    if cfg.loss_type == "simpo":
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            out["chosen_avg_logps"], out["rejected_avg_logps"], beta=cfg.beta, gamma=cfg.simpo_gamma)
    elif cfg.loss_type == "orpo":
        losses, _ = orpo_loss(out["chosen_avg_logps"], out["rejected_avg_logps"], beta=cfg.beta)
        losses = losses + cfg.orpo_alpha * out["chosen_nll"]  # ORPO Eq. 6: SFT term + odds-ratio term
        chosen_rewards = cfg.beta * out["chosen_avg_logps"].detach()
        rejected_rewards = cfg.beta * out["rejected_avg_logps"].detach()
    elif cfg.loss_type == "kto":
        # Unpaired: each pair gives one desirable and one undesirable example. z0 is the batch's mean
        # log-ratio, detached and clamped at 0 (the paper estimates it on mismatched (x, y') pairs).
        policy, reference = torch.cat([pc, pr]), torch.cat([ref["chosen"], ref["rejected"]])  # (2B,)
        desirable = torch.arange(policy.shape[0], device=policy.device) < pc.shape[0]
        z0 = (policy - reference).detach().mean().clamp(min=0)
        losses, rewards = kto_loss(policy, reference, desirable, z0, beta=cfg.beta)
        chosen_rewards, rejected_rewards = rewards[: pc.shape[0]], rewards[pc.shape[0]:]
    else:
        losses, chosen_rewards, rejected_rewards = preference_loss(
            pc, pr, ref["chosen"], ref["rejected"], beta=cfg.beta, loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing)
    loss = losses.mean()
    if cfg.rpo_alpha > 0:
        loss = loss + cfg.rpo_alpha * out["chosen_nll"]
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------
# the DPO loop
# ---------------------------------------------------------------------------------------------------------

def train_dpo(
    model: torch.nn.Module,
    tokenizer,
    pairs,
    cfg: DPOConfig,
    ref_model: torch.nn.Module | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    log=print,
    callback=None,
    callback_every: int = 0,
) -> TrainResult:
    """Train ``model`` on preference ``pairs`` (a datasets.Dataset with prompt/chosen/rejected).

    pi_ref is ``ref_model`` if given, else ``model`` as it is now (the usual case: the SFT model).
    With ``output_dir`` it writes metrics.jsonl, checkpoints and the final model (save_pretrained);
    ``resume=True`` continues from ``output_dir/checkpoint`` and ends where an uninterrupted run ends.
    ``callback(step, model) -> dict`` runs at step 0 and every ``callback_every`` steps (and at the end), in
    eval mode under no_grad: how the notebooks trace a run's path on the reward-KL plane.

    Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) every process runs this same call: each
    takes ``batch_size / N`` pairs of every global batch, DDP averages the gradients, so the updates are
    those of one process on the whole batch; only the first process logs and writes files.
    """
    cfg.validate()
    device = pick_device(cfg.device)
    rank, world, device = _distributed(device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    local = cfg.batch_size // world  # pairs per process per step
    if rank != 0:
        log = _silent
    set_seed(cfg.seed)
    model.to(device)
    out = Path(output_dir) if output_dir is not None else None

    features, report = tokenize_preferences(pairs, tokenizer, max_length=cfg.max_length,
                                            max_prompt_length=cfg.max_prompt_length)
    log(f"data: {report}")
    if len(features) < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(features)} usable pairs")
    collator = PreferenceCollator(tokenizer.pad_token_id)
    steps_per_epoch = len(features) // cfg.batch_size
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs

    # Reference log-probs: computed before the first update, from the reference weights.
    needs_ref = cfg.loss_type not in REFERENCE_FREE_LOSSES
    ref_all, live_ref = None, None
    start_step = 0
    ckpt = out / CHECKPOINT if out else None
    if resume:
        if ckpt is None or not (ckpt / "trainer_state.pt").exists():
            raise ValueError(f"nothing to resume: no checkpoint in {out}")
    if needs_ref:
        reference = ref_model.to(device) if ref_model is not None else model
        if cfg.precompute_ref:
            if resume:  # the weights have moved since step 0: reuse the numbers saved then
                ref_all = torch.load(out / "ref_logps.pt")
            else:
                ref_all = cached_reference_logps(reference, features, collator, cfg, device, log)
        else:
            import copy
            live_ref = (ref_model if ref_model is not None else copy.deepcopy(model)).to(device).eval()
            live_ref.requires_grad_(False)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=min(cfg.warmup_steps, total_steps),
                              num_training_steps=total_steps)
    autocast, scaler = _autocast(device, cfg.precision)
    if resume:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        model.load_state_dict(type(model).from_pretrained(ckpt).state_dict())
        model.to(device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start_step = state["step"]
        log(f"resumed from {ckpt} at step {start_step}")

    if rank != 0:
        out = None  # from here on ``out`` is only written to, and only by the first process
    policy = model  # what the loop calls: the model, or its DDP wrapper that averages gradients
    if world > 1:
        ids = [device] if device.type == "cuda" else None
        policy = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_MARKER).write_text(json.dumps({"config": asdict(cfg)}, indent=2))
        if ref_all is not None:
            torch.save(ref_all, out / "ref_logps.pt")  # so a resume never recomputes from moved weights
        metrics_file = open(out / "metrics.jsonl", "a" if resume else "w")
    history: list[dict[str, float]] = []
    evaluations: list[dict] = []

    def run_callback(at_step: int) -> None:
        model.eval()
        with torch.no_grad():
            evaluations.append({"step": at_step, **(callback(at_step, model) or {})})
        model.train()

    if rank != 0:
        callback = None
    if callback is not None and start_step == 0:
        run_callback(0)
    model.train()
    t0 = time.perf_counter()
    step = start_step
    order, order_epoch = [], -1
    bar = tqdm(total=total_steps, initial=start_step, desc=f"DPO ({cfg.loss_type})",
               disable=not cfg.show_progress or rank != 0)
    try:
        while step < total_steps:
            epoch, index = divmod(step, steps_per_epoch)
            if epoch != order_epoch:  # the epoch's batches, drawn once per epoch
                order, order_epoch = _batch_order(len(features), cfg.batch_size, cfg.seed, epoch), epoch
            rows = order[index][rank * local:(rank + 1) * local]  # this process's share of the global batch
            batch = _to(collator([features[i] for i in rows]), device)
            ref = None
            if ref_all is not None:
                ref = {k: v[rows].to(device) for k, v in ref_all.items()}
            elif live_ref is not None:
                with torch.no_grad(), autocast:
                    r = concatenated_forward(live_ref, batch)
                ref = {"chosen": r["chosen_logps"], "rejected": r["rejected_logps"]}

            with autocast:
                loss, metrics = batch_loss(policy, batch, ref, cfg)
            optimizer.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            # Every logged number read in one device->host copy (one sync per step), averaged over processes.
            logged = torch.stack([t.detach().float() for t in (loss, grad_norm, *metrics.values())])
            if world > 1:
                torch.distributed.all_reduce(logged)
                logged /= world
            values = dict(zip(["loss", "grad_norm", *metrics], logged.tolist()))
            # Nothing is applied yet, so a stop here keeps the weights of the last good step.
            if not math.isfinite(values["loss"]):
                _stop_diverged(f"loss is {values['loss']} at step {step}", out, model, tokenizer, optimizer,
                               scheduler, scaler, step, cfg)
            if not math.isfinite(values["grad_norm"]) and scaler is None:  # fp16's scaler skips such steps
                _stop_diverged(f"gradient norm is {values['grad_norm']} at step {step}", out, model, tokenizer,
                               optimizer, scheduler, scaler, step, cfg)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1

            row = {"step": step, "epoch": step / steps_per_epoch, "loss": values.pop("loss"),
                   "grad_norm": values.pop("grad_norm"), "learning_rate": scheduler.get_last_lr()[0], **values}
            history.append(row)
            if out is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                    _save_checkpoint(out, model, tokenizer, optimizer, scheduler, scaler, step, cfg)
            if callback is not None and callback_every and step % callback_every == 0:
                run_callback(step)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}")
    except KeyboardInterrupt:
        if out is not None:
            _save_checkpoint(out, model, tokenizer, optimizer, scheduler, scaler, step, cfg)
            log(f"interrupted at step {step}: checkpoint saved in {out / CHECKPOINT}; continue with --resume")
        raise
    finally:
        bar.close()
        if out is not None:
            metrics_file.close()

    seconds = time.perf_counter() - t0
    if callback is not None and (not evaluations or evaluations[-1]["step"] != step):
        run_callback(step)
    if out is not None:
        _save_checkpoint(out, model, tokenizer, optimizer, scheduler, scaler, step, cfg)
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    model.eval()
    return TrainResult(model=model, history=history, evaluations=evaluations, seconds=seconds,
                       output_dir=str(out) if out else None)


def _stop_diverged(what: str, out, model, tokenizer, optimizer, scheduler, scaler, step, cfg) -> None:
    # Nothing of this step was applied, so finite weights are the last good state: keep them. Weights that
    # already hold NaN/inf are not saved; the checkpoint from the last save_every stays as it was.
    where = "no output_dir, nothing saved"
    if out is not None:
        if all(torch.isfinite(p).all() for p in model.parameters()):
            _save_checkpoint(out, model, tokenizer, optimizer, scheduler, scaler, step, cfg)
            where = f"the last good state (step {step}) is in {out / CHECKPOINT}"
        elif (out / CHECKPOINT / "trainer_state.pt").exists():
            saved = torch.load(out / CHECKPOINT / "trainer_state.pt", weights_only=False)["step"]
            where = f"the weights are not finite; the last good checkpoint (step {saved}) is in {out / CHECKPOINT}"
        else:
            where = "the weights are not finite and no earlier checkpoint exists (use save_every)"
    raise TrainingDiverged(f"training diverged: {what}; {where}. Try a lower --lr or --beta.")


# ---------------------------------------------------------------------------------------------------------
# SFT: next-token cross-entropy, which is how pi_ref is made
# ---------------------------------------------------------------------------------------------------------

def sft(model: torch.nn.Module, tokenizer, texts: list[str], cfg: SFTConfig, log=print) -> list[float]:
    """Supervised fine-tuning on whole texts (every token counts), EOS appended. Returns the loss per step.

    Preferred-FT, the DPO paper's baseline, is this on the chosen completions: see ``sft_on_pairs``.
    """
    if not texts:
        raise ValueError("sft needs at least one text")
    eos = tokenizer.eos_token_id
    rows = [ids[: cfg.max_length] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    rows = [r + [eos] if len(r) < cfg.max_length else r for r in rows]
    return _sft_loop(model, rows, [list(r) for r in rows], tokenizer.pad_token_id, cfg, "SFT")


def sft_on_pairs(model: torch.nn.Module, tokenizer, pairs, cfg: SFTConfig) -> list[float]:
    """Preferred-FT: maximise log pi(y_w|x) on the chosen completions only (prompt tokens masked)."""
    features, _ = tokenize_preferences(pairs, tokenizer, max_length=cfg.max_length)
    ids = [f["chosen_input_ids"] for f in features]
    labels = [f["chosen_labels"] for f in features]
    return _sft_loop(model, ids, labels, tokenizer.pad_token_id, cfg, "Preferred-FT")


def _sft_loop(model, ids: list[list[int]], labels: list[list[int]], pad_id: int, cfg: SFTConfig,
              name: str) -> list[float]:
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in tqdm(range(cfg.steps), desc=name, disable=not cfg.show_progress):
        rows = torch.randint(0, len(ids), (cfg.batch_size,), generator=g).tolist()
        length = max(len(ids[i]) for i in rows)
        input_ids = torch.tensor([ids[i] + [pad_id] * (length - len(ids[i])) for i in rows], device=device)  # (B, T)
        attention_mask = torch.tensor([[1] * len(ids[i]) + [0] * (length - len(ids[i])) for i in rows],
                                      device=device)  # (B, T)
        label_t = torch.tensor([labels[i] + [IGNORE_INDEX] * (length - len(labels[i])) for i in rows],
                               device=device)  # (B, T)
        logps = completion_logps(model, input_ids, attention_mask, label_t)  # (B,)
        loss = -logps.sum() / (label_t[:, 1:] != IGNORE_INDEX).sum()  # mean NLL per counted token
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


def summarize(history: list[dict[str, float]], last: int = 10) -> dict[str, float]:
    """Mean of each metric over the last ``last`` steps (a steadier read than the final step alone)."""
    tail = history[-last:]
    return {k: float(np.mean([r[k] for r in tail])) for k in tail[0]} if tail else {}


__all__ = ["SFTConfig", "DPOConfig", "TrainResult", "TrainingDiverged", "train_dpo", "sft", "sft_on_pairs",
           "batch_loss", "compute_reference_logps", "cached_reference_logps", "set_seed", "summarize",
           "TRAIN_LOSSES"]
