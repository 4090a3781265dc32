"""Training loops: SFT (which makes pi_ref) and DPO with every objective of ``losses.py``.

The DPO loop is plain PyTorch, readable top to bottom:
  tokenize once -> precompute the reference log-probs once (cached on disk) -> for each step:
  one concatenated forward of chosen+rejected -> loss -> backward -> clip -> AdamW -> log TRL-named metrics.
No reference model is held in memory while training when ``precompute_ref=True`` (TRL's
``precompute_ref_log_probs``): the reference's numbers never change, so they are computed once.
Launched by ``torchrun`` or ``accelerate launch`` (WORLD_SIZE > 1), the same loop runs data-parallel: the model
is wrapped in DistributedDataParallel and each process takes its share of every global batch.

With an ``output_dir`` a run never loses or mixes anything (the folder rules are in ``runs.py``): checkpoints
every ``save_every`` steps and on Ctrl-C / SIGTERM, taken at a step boundary with the RNG of that boundary, so
``resume=True`` ends exactly where the uninterrupted run ends, dropout included.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import SchedulerType, get_scheduler

from .data import PreferenceCollator, tokenize_preferences
from .logps import IGNORE_INDEX, completion_logps, concatenated_forward
from .losses import LOSS_TYPES, kto_loss, kto_reference_point, orpo_loss, preference_loss, simpo_loss
from .models import disable_dropout, max_positions, pick_device
from .runs import (CHECKPOINT, RUN_MARKER, DamagedFile,  # noqa: F401 (RUN_MARKER re-exported)
                    checkpoint_step, cut_metrics, default_cache_dir, find_checkpoint, load_verified,
                   locked, save_checkpoint, save_verified, update_marker)

TRAIN_LOSSES = (*LOSS_TYPES, "simpo", "orpo", "kto")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")  # these never look at pi_ref


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or update; the message names the step and the checkpoint that was kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, acted on at a step boundary (the checkpoint then holds that step)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class ConfigError(ValueError):
    """A config value out of range: ``field``, what it must be, and what it is (the CLI names the flag)."""

    def __init__(self, name: str, requirement: str, value):
        super().__init__(f"{name} must be {requirement}, got {value!r}")
        self.field, self.requirement, self.value = name, requirement, value


def _check(cfg, name: str, *, low=None, high=None, low_open=False, high_open=False, whole=False,
           optional=False) -> None:
    value = getattr(cfg, name)
    if optional and value is None:
        return
    if whole:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, "a whole number", value)
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, "a finite number", value)
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(name, f"{'>' if low_open else '>='} {low}" if high is None else
                          f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}", value)
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(name, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}", value)


@dataclass
class SFTConfig:
    steps: int = 300  # optimizer steps; ~300 make the tiny GPT-2 fluent in the synthetic world
    batch_size: int = 32  # sequences per step
    lr: float = 3e-3  # high, as small models from scratch tolerate it
    warmup_steps: int = 20  # linear warm-up, then linear decay to 0
    weight_decay: float = 0.0  # none: the corpus is the whole world, nothing to regularise towards
    max_length: int = 64  # tokens per sequence; longer rows are cut (and never more than the model's positions)
    seed: int = 0  # data order and initialisation of anything random
    device: str = "auto"  # auto = cuda -> mps -> cpu
    show_progress: bool = True  # tqdm bar

    def validate(self) -> None:
        """Every value checked before any work (``ConfigError`` names the field)."""
        for name in ("steps", "batch_size", "max_length"):
            _check(self, name, low=1, whole=True)
        _check(self, "warmup_steps", low=0, whole=True)
        _check(self, "seed", low=0, whole=True)
        _check(self, "lr", low=0, low_open=True)
        _check(self, "weight_decay", low=0)


@dataclass
class DPOConfig:
    loss_type: str = "sigmoid"  # one of TRAIN_LOSSES; "sigmoid" is DPO
    beta: float = 0.1  # KL strength; DPO paper: 0.1 for most tasks (SimPO uses 2.0-2.5, set it yourself)
    label_smoothing: float = 0.0  # cDPO / robust DPO: assumed label-flip rate, in [0, 0.5)
    rpo_alpha: float = 0.0  # weight of an NLL term on the chosen (RPO, Pang et al. 2024); TRL's rpo_alpha
    simpo_gamma: float = 0.5  # SimPO target margin
    orpo_alpha: float = 1.0  # ORPO: weight of the chosen NLL added to the odds-ratio term
    lr: float = 1e-3  # tiny models need a high rate; for GPT-2-sized models use ~5e-7 to 5e-6
    batch_size: int = 16  # pairs per step
    epochs: int = 1  # passes over the pairs (ignored when max_steps is set)
    max_steps: int | None = None  # stop after this many steps (default: epochs over the pairs)
    warmup_steps: int = 10  # linear warm-up from 0 (so the first step's rate is 0, as in TRL)
    scheduler: str = "linear"  # any transformers.get_scheduler name
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    max_length: int = 128  # prompt + completion tokens (never more than the model's positions)
    max_prompt_length: int | None = None  # default: max_length // 2
    precompute_ref: bool = True  # compute reference log-probs once, cache them, hold no reference model
    cache_dir: str | None = field(default_factory=default_cache_dir)  # reference log-probs cache; $MINIDPO_CACHE_DIR
    save_every: int = 100  # with an output_dir, checkpoint every N steps (0: only at the end and on interrupt)
    disable_dropout: bool = True  # dropout off, as TRL's DPOConfig.disable_dropout: pi and pi_ref then score alike
    seed: int = 0  # data order
    device: str = "auto"  # auto = cuda -> mps -> cpu
    precision: str = "auto"  # auto (bf16 autocast on cuda, fp32 elsewhere) | fp32 | bf16 | fp16
    show_progress: bool = True  # tqdm bar

    def validate(self) -> None:
        """Every value checked before any work: ``ConfigError`` (a ValueError) names the field and the range."""
        if self.loss_type not in TRAIN_LOSSES:
            raise ValueError(f"unknown loss {self.loss_type!r}; valid: {', '.join(TRAIN_LOSSES)}")
        for name in ("beta", "lr", "max_grad_norm"):
            _check(self, name, low=0, low_open=True)
        _check(self, "label_smoothing", low=0, high=0.5, high_open=True)
        for name in ("rpo_alpha", "orpo_alpha", "weight_decay"):
            _check(self, name, low=0)
        _check(self, "simpo_gamma")
        for name in ("batch_size", "epochs"):
            _check(self, name, low=1, whole=True)
        _check(self, "max_length", low=2, whole=True)
        _check(self, "max_steps", low=1, whole=True, optional=True)
        _check(self, "max_prompt_length", low=1, whole=True, optional=True)
        for name in ("warmup_steps", "save_every", "seed"):
            _check(self, name, low=0, whole=True)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.scheduler not in {s.value for s in SchedulerType}:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; valid: "
                             f"{', '.join(s.value for s in SchedulerType)}")


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[dict[str, float]] = field(default_factory=list)  # one row of metrics per step
    evaluations: list[dict] = field(default_factory=list)  # what ``callback`` returned, with its step
    seconds: float = 0.0
    output_dir: str | None = None


@dataclass
class TrainState:
    """Everything a step changes, and so everything a checkpoint holds."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object | None  # fp16's GradScaler, else None
    step: int = 0  # optimizer steps done
    rng: dict = field(default_factory=dict)  # the RNG as it was when ``step`` ended: the next dropout masks

    def capture_rng(self) -> None:
        self.rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.rng["cuda"] = torch.cuda.get_rng_state_all()

    def restore_rng(self) -> None:
        if isinstance(self.rng, torch.Tensor):  # checkpoints written before the RNG was a dict
            self.rng = {"cpu": self.rng}
        torch.set_rng_state(self.rng["cpu"])
        if "cuda" in self.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.rng["cuda"])


@dataclass
class PreparedData:
    """The tokenized pairs and how a run walks through them."""

    features: list[dict]
    collator: PreferenceCollator
    steps_per_epoch: int
    total_steps: int
    per_process: int  # pairs per process per step (batch_size / processes)


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
    h.update(b"verified-v2")  # the cache file format (runs.save_verified): older plain files are not read
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


def _usable_ref(ref, n: int) -> bool:
    return (isinstance(ref, dict) and all(isinstance(ref.get(k), torch.Tensor) and ref[k].shape == (n,)
                                          for k in ("chosen", "rejected")))


def cached_reference_logps(model, features, collator, cfg: DPOConfig, device, log=print) -> dict[str, torch.Tensor]:
    """Reference log-probs from the disk cache when the same model and data were seen before.

    Each entry carries a checksum: a truncated or altered one is recomputed and replaced, never trusted. A
    cache folder that cannot be written costs the cache, not the run (one note).
    """
    path = None
    if cfg.cache_dir:
        key = _fingerprint(model, features, cfg.max_length)
        path = Path(cfg.cache_dir) / f"ref-logps-{key}.pt"
        if path.exists():
            try:
                ref = load_verified(path)
                if _usable_ref(ref, len(features)):
                    log(f"reference log-probs: reused {path}")
                    return ref
            except (DamagedFile, OSError, RuntimeError, ValueError):
                pass
            log(f"reference log-probs: the cache entry {path} is damaged; recomputing it")
    t0 = time.perf_counter()
    ref = compute_reference_logps(model, features, collator, cfg.batch_size, device, cfg.show_progress)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_verified(ref, path)  # atomic: another process (a DDP rank, a second run) never reads half
            log(f"reference log-probs: computed for {len(features)} pairs in {time.perf_counter() - t0:.1f} s, "
                f"cached at {path}")
        except OSError as error:
            log(f"note: cannot write the reference cache in {cfg.cache_dir} ({error.strerror or error}); "
                "continuing without it (set --cache-dir or $MINIDPO_CACHE_DIR)")
    return ref


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _save(out: Path, state: TrainState, tokenizer, cfg: DPOConfig) -> None:
    """A checkpoint of ``state`` (see ``runs.save_checkpoint``: a kill at any instant leaves one complete)."""

    def write(folder: Path) -> None:
        state.model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        torch.save({"step": state.step, "optimizer": state.optimizer.state_dict(),
                    "scheduler": state.scheduler.state_dict(),
                    "scaler": state.scaler.state_dict() if state.scaler else None, "config": asdict(cfg),
                    "rng": state.rng}, folder / "trainer_state.pt")

    save_checkpoint(out, state.step, write)
    update_marker(out, checkpoint_step=state.step)


def _load(ckpt: Path, state: TrainState, device: torch.device) -> None:
    try:
        saved = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        weights = type(state.model).from_pretrained(ckpt).state_dict()
    except Exception as error:  # verified files that still do not load: a version mismatch, not a user slip
        raise DamagedFile(f"{ckpt} could not be loaded ({str(error).splitlines()[0][:200]}); start afresh "
                          "with --overwrite") from None
    state.model.load_state_dict(weights)
    state.model.to(device)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    if state.scaler and saved["scaler"]:
        state.scaler.load_state_dict(saved["scaler"])
    state.step, state.rng = saved["step"], saved["rng"]
    state.restore_rng()


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


def fit_max_length(model: torch.nn.Module, max_length: int, log=print) -> int:
    """``max_length`` capped at the model's positions (a longer row would index past its position table)."""
    positions = max_positions(model)
    if positions is not None and max_length > positions:
        log(f"note: max_length {max_length} is more than the model's {positions} positions; using {positions}")
        return positions
    return max_length


@contextlib.contextmanager
def _stop_requests():
    """SIGINT and SIGTERM only ask the loop to stop; it does so between steps, so a checkpoint never holds half
    an update. A second Ctrl-C stops at once. Outside the main thread signals cannot be caught: nothing changes."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def ask(signum, _frame):
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signum)

    previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


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
        # Unpaired: each pair gives one desirable and one undesirable example. z0 is estimated as in the KTO
        # paper (Ethayarajh et al. 2024, sec. 4.1) on MISMATCHED (x, y') pairs: batch["kl"] holds each row's
        # prompt with another row's completions (kto_mismatched_features), ref["kl_*"] their reference log-probs.
        # (The batch's own pairs would estimate -KL(pi_ref || pi) <= 0, clamped to 0 almost always.)
        policy, reference = torch.cat([pc, pr]), torch.cat([ref["chosen"], ref["rejected"]])  # (2B,)
        desirable = torch.arange(policy.shape[0], device=policy.device) < pc.shape[0]
        with torch.no_grad():
            mismatched = concatenated_forward(model, batch["kl"])
        z0 = kto_reference_point(torch.cat([mismatched["chosen_logps"], mismatched["rejected_logps"]]),
                                 torch.cat([ref["kl_chosen"], ref["kl_rejected"]]))
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
    if cfg.loss_type == "kto":
        metrics["kl"] = z0  # TRL's name for KTO's logged reference point
    return loss, metrics


def kto_mismatched_features(features: list[dict]) -> list[dict]:
    """KTO's mismatched pairs: row i keeps its prompt and takes the completions of row i + 1 (the last row takes
    row 0's), tokenized like ``features`` (prompt labels -100). KTO's reference point z0 is the mean log-ratio on
    these (x, y') pairs (Ethayarajh et al. 2024, sec. 4.1; TRL's KTOTrainer shifts completions the same way)."""
    if len(features) < 2:
        raise ValueError("KTO needs at least 2 rows to mismatch prompts and completions")

    def split(ids, labels):
        n_prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        return ids[:n_prompt], ids[n_prompt:]

    rows = []
    for i, row in enumerate(features):
        other = features[(i + 1) % len(features)]
        new = {}
        for side in ("chosen", "rejected"):
            prompt, _ = split(row[f"{side}_input_ids"], row[f"{side}_labels"])
            _, completion = split(other[f"{side}_input_ids"], other[f"{side}_labels"])
            new[f"{side}_input_ids"] = list(prompt) + list(completion)
            new[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + list(completion)
        rows.append(new)
    return rows


# ---------------------------------------------------------------------------------------------------------
# the DPO loop: set-up helpers, then the loop
# ---------------------------------------------------------------------------------------------------------

def prepare_data(model, tokenizer, pairs, cfg: DPOConfig, processes: int = 1, log=print) -> PreparedData:
    """Tokenize the pairs and lay out the steps. Rows longer than the model's positions (which would index past
    its position table) are cut to fit, with a note; when every row fits, ``cfg.max_length`` is used as given."""
    if cfg.batch_size % processes:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {processes} processes")
    features, report = tokenize_preferences(pairs, tokenizer, max_length=cfg.max_length,
                                            max_prompt_length=cfg.max_prompt_length)
    positions = max_positions(model)
    longest = max((max(len(f["chosen_input_ids"]), len(f["rejected_input_ids"])) for f in features), default=0)
    if positions is not None and longest > positions:
        max_length = fit_max_length(model, cfg.max_length, log)
        max_prompt = None if cfg.max_prompt_length is None else min(cfg.max_prompt_length, max_length)
        features, report = tokenize_preferences(pairs, tokenizer, max_length=max_length, max_prompt_length=max_prompt)
    log(f"data: {report}")
    if len(features) < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(features)} usable pairs")
    steps_per_epoch = len(features) // cfg.batch_size
    return PreparedData(features, PreferenceCollator(tokenizer.pad_token_id), steps_per_epoch,
                        cfg.max_steps or steps_per_epoch * cfg.epochs, cfg.batch_size // processes)


def prepare_reference(model, ref_model, data: PreparedData, cfg: DPOConfig, device, run_dir: Path | None,
                      resume: bool, log=print):
    """(reference log-probs of every pair, or None; a frozen reference model run each step, or None).

    pi_ref is ``ref_model`` if given, else ``model`` as it is before the first update. A resumed run reads the
    numbers saved at step 0 (the weights have moved since), verified by their checksum.
    """
    if cfg.loss_type in REFERENCE_FREE_LOSSES:
        return None, None
    if not cfg.precompute_ref:
        live = (ref_model if ref_model is not None else copy.deepcopy(model)).to(device).eval()
        return None, live.requires_grad_(False)
    if resume:
        path = run_dir / "ref_logps.pt"
        try:
            ref = load_verified(path)
        except FileNotFoundError:
            raise DamagedFile(f"{path} is missing; the run cannot resume: start afresh with --overwrite") from None
        except DamagedFile as error:
            raise DamagedFile(f"{error}; the run cannot resume: start afresh with --overwrite") from None
        if not _usable_ref(ref, len(data.features)):
            raise ValueError(f"{path} holds log-probs for other data than these {len(data.features)} pairs; "
                             "resume with the run's own --data, or start afresh with --overwrite")
        return ref, None
    reference = ref_model.to(device) if ref_model is not None else model
    ref = cached_reference_logps(reference, data.features, data.collator, cfg, device, log)
    if cfg.loss_type == "kto":  # and of KTO's mismatched pairs, for its reference point z0
        mismatched = cached_reference_logps(reference, kto_mismatched_features(data.features), data.collator,
                                            cfg, device, log)
        ref.update({f"kl_{k}": v for k, v in mismatched.items()})
    return ref, None


def new_state(model, cfg: DPOConfig, total_steps: int, device: torch.device) -> TrainState:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=min(cfg.warmup_steps, total_steps),
                              num_training_steps=total_steps)
    state = TrainState(model, optimizer, scheduler, _autocast(device, cfg.precision)[1])
    state.capture_rng()
    return state


def _checkpoint_to_resume(run_dir: Path | None, rank: int, processes: int) -> Path:
    """The checkpoint to resume from; the first process repairs a swap cut short by a kill, the others wait."""
    if run_dir is None:
        raise ValueError("nothing to resume: no output_dir given")
    ckpt = find_checkpoint(run_dir) if rank == 0 else None
    if processes > 1:
        torch.distributed.barrier()
        ckpt = run_dir / CHECKPOINT if checkpoint_step(run_dir) is not None else None
    if ckpt is None:
        raise ValueError(f"nothing to resume: no checkpoint in {run_dir}")
    return ckpt


def _open_metrics(out: Path, state: TrainState, cfg: DPOConfig, total_steps: int, ref_all, resume: bool):
    """Mark the run as running, keep pi_ref's numbers for a resume, and cut metrics.jsonl back to the
    checkpoint (a kill after it left rows of steps that will now be redone)."""
    update_marker(out, state="running", step=state.step, total_steps=total_steps, config=asdict(cfg))
    if not resume:  # a fresh run: nothing of an earlier run in this folder may be resumed or read
        for stale in (CHECKPOINT, CHECKPOINT + ".tmp", CHECKPOINT + ".old", "ref_logps.pt"):
            if (out / stale).is_dir():
                shutil.rmtree(out / stale)
            elif (out / stale).exists():
                (out / stale).unlink()
        if ref_all is not None:
            save_verified(ref_all, out / "ref_logps.pt")
    if resume:
        cut_metrics(out / "metrics.jsonl", state.step)
    return open(out / "metrics.jsonl", "a" if resume else "w")


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

    pi_ref is ``ref_model`` if given, else ``model`` as it is now (the usual case: the SFT model). Dropout is
    switched off in both unless ``cfg.disable_dropout`` is False (as TRL does).
    With ``output_dir`` it writes metrics.jsonl, checkpoints (every ``cfg.save_every`` steps, and on Ctrl-C or
    SIGTERM) and the final model (save_pretrained), holding the folder's lock meanwhile;
    ``resume=True`` continues from ``output_dir/checkpoint`` and ends where an uninterrupted run ends.
    ``callback(step, model) -> dict`` runs at step 0 and every ``callback_every`` steps (and at the end), in
    eval mode under no_grad: how the notebooks trace a run's path on the reward-KL plane.

    Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) every process runs this same call: each
    takes ``batch_size / N`` pairs of every global batch, DDP averages the gradients, so the updates are
    those of one process on the whole batch; only the first process logs and writes files.
    """
    cfg.validate()
    rank, processes, device = _distributed(pick_device(cfg.device))
    if rank != 0:
        log, callback = _silent, None
    set_seed(cfg.seed)
    if cfg.disable_dropout:
        disable_dropout(model)
        if ref_model is not None:
            disable_dropout(ref_model)
    model.to(device)
    data = prepare_data(model, tokenizer, pairs, cfg, processes, log)
    run_dir = Path(output_dir) if output_dir is not None else None
    out = run_dir if rank == 0 else None  # only the first process writes
    with locked(out) if out is not None else contextlib.nullcontext():
        ckpt = _checkpoint_to_resume(run_dir, rank, processes) if resume else None
        ref_all, live_ref = prepare_reference(model, ref_model, data, cfg, device, run_dir, resume, log)
        state = new_state(model, cfg, data.total_steps, device)
        if ckpt is not None:
            _load(ckpt, state, device)
            log(f"resumed from {ckpt} at step {state.step}")
        metrics_file = _open_metrics(out, state, cfg, data.total_steps, ref_all, resume) if out else None
        try:
            history, evaluations, seconds = _loop(state, data, ref_all, live_ref, cfg, device, rank, processes,
                                                  out, metrics_file, tokenizer, log, callback, callback_every)
            if out is not None:
                _save(out, state, tokenizer, cfg)
                model.save_pretrained(out)
                if tokenizer is not None:
                    tokenizer.save_pretrained(out)
                update_marker(out, state="finished", step=state.step)
        except KeyboardInterrupt:
            if out is not None:
                update_marker(out, state="interrupted", step=state.step)
            raise
        except BaseException:
            if out is not None:
                update_marker(out, state="failed", step=state.step)
            raise
        finally:
            if metrics_file is not None:
                metrics_file.close()
    model.eval()
    return TrainResult(model=model, history=history, evaluations=evaluations, seconds=seconds,
                       output_dir=str(out) if out else None)


def _loop(state: TrainState, data: PreparedData, ref_all, live_ref, cfg: DPOConfig, device, rank: int,
          processes: int, out: Path | None, metrics_file, tokenizer, log, callback, callback_every: int):
    """Steps from ``state.step`` to the end; returns (history, evaluations, seconds)."""
    model = state.model
    policy = model  # what the loop calls: the model, or its DDP wrapper that averages gradients
    if processes > 1:
        policy = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                           else None)
    autocast = _autocast(device, cfg.precision)[0]
    history: list[dict[str, float]] = []
    evaluations: list[dict] = []

    def run_callback(at_step: int) -> None:
        model.eval()
        rng = state.rng  # a callback that samples must not move the training's RNG
        with torch.no_grad():
            evaluations.append({"step": at_step, **(callback(at_step, model) or {})})
        state.rng = rng
        state.restore_rng()
        model.train()

    if callback is not None and state.step == 0:
        run_callback(0)
    model.train()
    t0 = time.perf_counter()
    order, order_epoch = [], -1
    kl_features = None  # KTO only: the mismatched pairs, built on first use
    bar = tqdm(total=data.total_steps, initial=state.step, desc=f"DPO ({cfg.loss_type})",
               disable=not cfg.show_progress or rank != 0)
    try:
        with _stop_requests() as stop:
            while state.step < data.total_steps:
                if stop:
                    raise Interrupted(stop[0])
                epoch, index = divmod(state.step, data.steps_per_epoch)
                if epoch != order_epoch:  # the epoch's batches, drawn once per epoch
                    order, order_epoch = _batch_order(len(data.features), cfg.batch_size, cfg.seed, epoch), epoch
                rows = order[index][rank * data.per_process:(rank + 1) * data.per_process]  # this process's share
                batch = _to(data.collator([data.features[i] for i in rows]), device)
                if cfg.loss_type == "kto":  # KTO's mismatched (x, y') pairs of these rows, for z0
                    kl_features = kl_features or kto_mismatched_features(data.features)
                    batch["kl"] = _to(data.collator([kl_features[i] for i in rows]), device)
                ref = None
                if ref_all is not None:
                    ref = {k: v[rows].to(device) for k, v in ref_all.items()}
                elif live_ref is not None:
                    with torch.no_grad(), autocast:
                        r = concatenated_forward(live_ref, batch)
                    ref = {"chosen": r["chosen_logps"], "rejected": r["rejected_logps"]}
                    if cfg.loss_type == "kto":
                        with torch.no_grad(), autocast:
                            r = concatenated_forward(live_ref, batch["kl"])
                        ref.update({"kl_chosen": r["chosen_logps"], "kl_rejected": r["rejected_logps"]})

                row = _update(state, policy, batch, ref, cfg, autocast, processes, data, out, tokenizer)
                history.append(row)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    if cfg.save_every and state.step % cfg.save_every == 0 and state.step < data.total_steps:
                        _check_update(state, out, tokenizer, cfg)
                        _save(out, state, tokenizer, cfg)
                if callback is not None and callback_every and state.step % callback_every == 0:
                    run_callback(state.step)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}")
    except KeyboardInterrupt:
        if out is not None and _finite(model):
            _save(out, state, tokenizer, cfg)  # the state at the last step boundary, with that boundary's RNG
            log(f"interrupted at step {state.step}: checkpoint saved in {out / CHECKPOINT}; continue with "
                f"`minidpo train --resume {out}` (or train_dpo(..., resume=True))")
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    _check_update(state, out, tokenizer, cfg)  # the last update is checked too
    if callback is not None and (not evaluations or evaluations[-1]["step"] != state.step):
        run_callback(state.step)
    return history, evaluations, seconds


def _update(state: TrainState, policy, batch, ref, cfg: DPOConfig, autocast, processes: int, data: PreparedData,
            out, tokenizer) -> dict[str, float]:
    """One optimizer step; returns its row of metrics. A non-finite loss or gradient stops the run before the
    update is applied; the learning rate logged is the one this update used (TRL logs the same)."""
    with autocast:
        loss, metrics = batch_loss(policy, batch, ref, cfg)
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler:
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.max_grad_norm)
    # Every logged number read in one device->host copy (one sync per step), averaged over processes.
    logged = torch.stack([t.detach().float() for t in (loss, grad_norm, *metrics.values())])
    if processes > 1:
        torch.distributed.all_reduce(logged)
        logged /= processes
    values = dict(zip(["loss", "grad_norm", *metrics], logged.tolist()))
    lr = state.optimizer.param_groups[0]["lr"]  # what optimizer.step() below applies
    # Nothing is applied yet, so a stop here keeps the weights of the last good step.
    if not math.isfinite(values["loss"]):
        _stop_diverged(f"loss is {values['loss']} at step {state.step}", out, state, tokenizer, cfg)
    if not math.isfinite(values["grad_norm"]) and state.scaler is None:  # fp16's scaler skips such steps
        _stop_diverged(f"gradient norm is {values['grad_norm']} at step {state.step}", out, state, tokenizer, cfg)
    if not math.isfinite(lr):
        _stop_diverged(f"learning rate is {lr} at step {state.step}", out, state, tokenizer, cfg)
    if state.scaler:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    state.capture_rng()  # a step boundary: what a checkpoint taken now must hold
    return {"step": state.step, "epoch": state.step / data.steps_per_epoch, "loss": values.pop("loss"),
            "grad_norm": values.pop("grad_norm"), "learning_rate": lr, **values}


def _check_update(state: TrainState, out, tokenizer, cfg: DPOConfig) -> None:
    """Stop when the update just applied left weights that are not finite (checked before every save and at
    the end; a later step's loss would show it too, but not after the last step)."""
    if not _finite(state.model):
        _stop_diverged(f"the update of step {state.step} made the weights non-finite", out, state, tokenizer, cfg)


def _stop_diverged(what: str, out, state: TrainState, tokenizer, cfg: DPOConfig) -> None:
    # Finite weights are the last good state: keep them. Weights that already hold NaN/inf are not saved;
    # the checkpoint from the last save_every stays as it was.
    where = "no output_dir, nothing saved"
    if out is not None:
        if _finite(state.model):
            _save(out, state, tokenizer, cfg)
            where = f"the last good state (step {state.step}) is in {out / CHECKPOINT}"
        elif (saved := checkpoint_step(out)) is not None:
            where = f"the weights are not finite; the last good checkpoint (step {saved}) is in {out / CHECKPOINT}"
        else:
            where = "the weights are not finite and no earlier checkpoint exists (lower save_every)"
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
    cfg.validate()
    cfg = replace(cfg, max_length=fit_max_length(model, cfg.max_length, log))
    eos = tokenizer.eos_token_id
    rows = [ids[: cfg.max_length] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    rows = [r + [eos] if len(r) < cfg.max_length else r for r in rows]
    return _sft_loop(model, rows, [list(r) for r in rows], tokenizer.pad_token_id, cfg, "SFT")


def sft_on_pairs(model: torch.nn.Module, tokenizer, pairs, cfg: SFTConfig, log=print) -> list[float]:
    """Preferred-FT: maximise log pi(y_w|x) on the chosen completions only (prompt tokens masked)."""
    cfg.validate()
    features, _ = tokenize_preferences(pairs, tokenizer, max_length=fit_max_length(model, cfg.max_length, log))
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


__all__ = ["SFTConfig", "DPOConfig", "TrainResult", "TrainState", "TrainingDiverged", "Interrupted", "ConfigError",
           "train_dpo", "sft", "sft_on_pairs", "batch_loss", "compute_reference_logps", "cached_reference_logps",
           "set_seed", "summarize", "default_cache_dir", "fit_max_length", "TRAIN_LOSSES"]
