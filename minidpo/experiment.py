"""The synthetic-world experiment, end to end: the pieces that ``minidpo demo`` and notebooks 04-07 share.

    build_world   corpus -> tokenizer -> tiny GPT-2 SFT (this is pi_ref) -> sample pairs from pi_ref -> label
                  them by Bradley-Terry on the true reward. Cached on disk under a key made of every config,
                  so later notebooks reuse it and a fresh clone rebuilds it.
    run_dpo       a copy of pi_ref trained with any objective on the world's pairs.
    run_dpo_seeds several copies of pi_ref, one per seed, trained together: one batched model call per step.
    relabel       the world's pairs with the Bradley-Terry labeller's coins drawn again from another seed.
    evaluate      true reward, KL(pi || pi_ref) and implicit-reward accuracy on held-out prompts.
    train_and_evaluate_seeds   one objective over seeds, each seed's end point (and path) measured: how
                  notebooks 06, 06b and 06c compare objectives.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
import types
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import get_scheduler
from transformers.utils import logging as hf_logging

from . import evaluate as ev
from . import world as w
from .models import load_causal_lm, pick_device, tiny_gpt2
from .tokenizer import load_tokenizer, train_tokenizer
from . import train
from .logps import _cat_padded
from .runs import default_cache_dir
from .train import (REFERENCE_FREE_LOSSES, DPOConfig, SFTConfig, TrainingDiverged, TrainResult, _autocast,
                    _batch_order, _to, batch_loss, cached_reference_logps, prepare_data, sft, train_dpo)

DEFAULT_CACHE = default_cache_dir()  # $MINIDPO_CACHE_DIR, else .cache/minidpo (read when minidpo is imported)
WORLD_CODE_VERSION = 3  # v2: the world's own alphabet; v3: no pairs with an empty completion
# One-shard "Loading weights" / "Writing model shards" bars are noise in a course's outputs.
hf_logging.disable_progress_bar()


@dataclass
class ModelConfig:
    n_embd: int = 64  # the prototype's size: fluent in the world after ~300 SFT steps on 2 cores
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 64  # the world's longest review is well under 64 tokens
    activation_function: str = "gelu_pytorch_tanh"  # the same tanh GELU as GPT-2's "gelu_new" in one kernel:
                                                    # 11-21% faster steps (notes/performance.md)


@dataclass
class World:
    """Everything DPO needs, made once: the tokenizer, pi_ref, and labelled pairs."""

    tokenizer: object
    reference: torch.nn.Module  # pi_ref: the SFT model, in eval mode
    train_pairs: datasets.Dataset  # prompt, chosen, rejected (+ true rewards, p_chosen)
    heldout_pairs: datasets.Dataset  # the same, on held-out prompts: for implicit-reward accuracy
    heldout_prompts: list[str]
    config: w.WorldConfig
    directory: Path  # where it is cached (tokenizer/, reference/, *.jsonl)
    seconds: dict[str, float] = field(default_factory=dict)  # time per stage; empty when loaded from cache
    label_noise: dict = field(default_factory=dict)


@contextlib.contextmanager
def small_model_threads(model: torch.nn.Module, max_params: int = 5_000_000):
    """One intra-op thread while a small model runs. Its matmuls are too small to share: measured on a
    2-core CPU, 100 SFT steps of the world's GPT-2 took 2.4 s on one thread and 47-109 s on two as soon as
    anything else ran beside them (the idle thread spin-waits). Larger models keep torch's setting."""
    before = torch.get_num_threads()
    small = sum(p.numel() for p in model.parameters()) <= max_params
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


def world_key(world_cfg: w.WorldConfig, sft_cfg: SFTConfig, model_cfg: ModelConfig) -> str:
    """A short hash of every setting that changes the world (device and progress bars do not)."""
    sft_part = {k: v for k, v in asdict(sft_cfg).items() if k not in ("device", "show_progress")}
    # WORLD_CODE_VERSION: bump it whenever the code that builds a world changes what it builds.
    blob = json.dumps([asdict(world_cfg), sft_part, asdict(model_cfg), WORLD_CODE_VERSION], sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()


def build_world(
    world_cfg: w.WorldConfig | None = None,
    sft_cfg: SFTConfig | None = None,
    model_cfg: ModelConfig | None = None,
    cache_dir: str | Path | None = DEFAULT_CACHE,
    device: str = "auto",
    show_progress: bool = True,
    log=print,
) -> World:
    """Build the synthetic world, or load it from ``cache_dir`` when the same configs were built before."""
    world_cfg = world_cfg or w.WorldConfig()
    sft_cfg = sft_cfg or SFTConfig()
    model_cfg = model_cfg or ModelConfig()
    sft_cfg = replace(sft_cfg, device=device, show_progress=show_progress)
    directory = Path(cache_dir or ".") / f"world-{world_key(world_cfg, sft_cfg, model_cfg)}"
    if cache_dir is None:
        return _make_world(world_cfg, sft_cfg, model_cfg, directory, log)
    # `make test` runs notebooks and tests two at a time: the first to get here builds, the others wait and load.
    with _waiting_lock(directory.with_name(directory.name + ".lock")):
        if (directory / "done").exists():
            log(f"world: reused {directory}")
            return _load_world(directory, world_cfg, device)
        world = _make_world(world_cfg, sft_cfg, model_cfg, directory, log)
        _save_world(world)
    log(f"world: built in {sum(world.seconds.values()):.1f} s, cached at {directory}")
    return world


@contextlib.contextmanager
def _waiting_lock(path: Path):
    """Hold an exclusive ``flock`` on ``path``, waiting for another process that holds it (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # Windows: one process at a time is the user's job
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _make_world(world_cfg: w.WorldConfig, sft_cfg: SFTConfig, model_cfg: ModelConfig, directory: Path, log) -> World:
    """Corpus -> tokenizer -> SFT (pi_ref) -> completions sampled from pi_ref -> Bradley-Terry labels."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    corpus = w.generate_corpus(world_cfg)
    # Only the world's own characters: with all 256 byte symbols, DPO pushes mass onto bytes that SFT never
    # saw and samples dissolve into mojibake (notebook 04 shows where displaced mass goes).
    tokenizer = train_tokenizer(corpus, model_max_length=model_cfg.n_positions, full_byte_alphabet=False)
    seconds["corpus_and_tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    reference = tiny_gpt2(len(tokenizer), seed=world_cfg.seed, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          **asdict(model_cfg))
    with small_model_threads(reference):
        sft(reference, tokenizer, corpus, sft_cfg, log=log)
        reference.eval()
        seconds["sft"] = time.perf_counter() - t

        t = time.perf_counter()
        train_prompts, heldout_prompts = w.make_prompts(world_cfg)
        sample = dict(k=world_cfg.samples_per_prompt, max_new_tokens=world_cfg.max_new_tokens,
                      temperature=world_cfg.temperature, top_k=world_cfg.pair_top_k)
        train_completions = w.sample_completions(reference, tokenizer, train_prompts, seed=world_cfg.seed, **sample)
        heldout_completions = w.sample_completions(reference, tokenizer, heldout_prompts,
                                                   seed=world_cfg.seed + 1, **sample)
        seconds["sampling"] = time.perf_counter() - t
    train_pairs = w.label_pairs(train_prompts, train_completions, world_cfg)
    heldout_pairs = w.label_pairs(heldout_prompts, heldout_completions, world_cfg, seed=world_cfg.seed + 1)

    return World(tokenizer, reference, train_pairs, heldout_pairs, heldout_prompts, world_cfg, directory,
                 seconds, w.label_noise(train_pairs))


def _save_world(world: World) -> None:
    d = world.directory
    d.mkdir(parents=True, exist_ok=True)
    world.tokenizer.save_pretrained(d / "reference")
    world.reference.save_pretrained(d / "reference")
    w.save_pairs_jsonl(world.train_pairs, d / "train_pairs.jsonl")
    w.save_pairs_jsonl(world.heldout_pairs, d / "heldout_pairs.jsonl")
    (d / "heldout_prompts.json").write_text(json.dumps(world.heldout_prompts))
    (d / "info.json").write_text(json.dumps({"config": asdict(world.config), "seconds": world.seconds,
                                             "label_noise": world.label_noise}, indent=2))
    (d / "done").touch()  # written last: a half-written folder is never taken for a finished one


def _load_world(d: Path, world_cfg: w.WorldConfig, device: str) -> World:
    info = json.loads((d / "info.json").read_text())
    tokenizer = load_tokenizer(d / "reference")
    reference = load_causal_lm(d / "reference", device=pick_device(device)).eval()
    pairs = {name: _read_pairs(d / f"{name}.jsonl") for name in ("train_pairs", "heldout_pairs")}
    heldout_prompts = json.loads((d / "heldout_prompts.json").read_text())
    return World(tokenizer, reference, pairs["train_pairs"], pairs["heldout_pairs"], heldout_prompts, world_cfg, d,
                 {}, info["label_noise"])


def _read_pairs(path: Path) -> datasets.Dataset:
    # from_list, not from_json: no "Generating train split" bar on stderr and no Arrow cache beside the file
    return datasets.Dataset.from_list([json.loads(line) for line in path.read_text().splitlines() if line])


def run_dpo(world: World, cfg: DPOConfig | None = None, pairs: datasets.Dataset | None = None,
            output_dir: str | Path | None = None, log=print, callback=None, callback_every: int = 0) -> TrainResult:
    """Train a copy of pi_ref on the world's pairs (or on ``pairs``); pi_ref itself is left untouched.

    ``callback(step, policy) -> dict`` every ``callback_every`` steps: see ``train.train_dpo``.
    """
    cfg = cfg or DPOConfig()
    policy = copy.deepcopy(world.reference)
    with small_model_threads(policy):
        return train_dpo(policy, world.tokenizer, pairs if pairs is not None else world.train_pairs, cfg,
                         output_dir=output_dir, log=log, callback=callback, callback_every=callback_every)


def evaluate(world: World, policy: torch.nn.Module, beta: float, n_samples: int = 2, seed: int = 0) -> dict:
    """Held-out evaluation of ``policy`` against the world's pi_ref (see ``evaluate.evaluate_policy``)."""
    with small_model_threads(policy):
        return ev.evaluate_policy(policy, world.reference, world.tokenizer, world.heldout_prompts,
                                  world.heldout_pairs, beta=beta, n_samples=n_samples, seed=seed)


# ---------------------------------------------------------------------------------------------------------
# seeds as an axis: several runs trained together
# ---------------------------------------------------------------------------------------------------------

def relabel(world: World, seed: int) -> datasets.Dataset:
    """The world's training pairs, the same two completions each, labelled again by the Bradley-Terry
    labeller with coins drawn from ``seed``. pi_ref and the completions stay fixed; only the labels move.

    Each pair's two completions are put in a fixed (sorted) order before the coin is tossed, so the new
    label does not depend on the old one: ``relabel(world, s)`` is a fresh draw of the labels for every seed.
    """
    pairs = world.train_pairs
    completions = [sorted((c, r)) for c, r in zip(pairs["chosen"], pairs["rejected"])]
    return w.label_pairs(list(pairs["prompt"]), completions, world.config, seed=int(seed))


class _Logits:
    """Stands in for a model inside ``train.batch_loss``: answers a call with logits the batched call computed
    before, for the batch whose input ids these are (rows were right-padded to the longest seed's length)."""

    def __init__(self, computed: list[tuple[torch.Tensor, torch.Tensor]]):
        self.computed = computed  # [(input_ids (2B, T), logits (2B, T_max, V))]: one per forward batch_loss makes

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        for ids, logits in self.computed:
            if ids.shape == input_ids.shape and torch.equal(ids, input_ids):
                return types.SimpleNamespace(logits=logits[:, : input_ids.shape[1]])  # (2B, T, V)
        raise RuntimeError("run_dpo_seeds: batch_loss ran a forward pass that was not batched ahead")


PACKED_ROW = 64  # tokens per packed row of run_dpo_seeds (rows grow to the longest pair if that is longer): on
                 # the course's world 16 pairs fill ~8 such rows, against 32 padded rows of ~28 tokens


def _packed_inputs(batches: list[dict], device) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Every seed's batch packed for one batched forward, and where ``concatenated_forward``'s logits lie in it.

    ``concatenated_forward`` runs 2B right-padded rows per seed: chosen then rejected, each prompt + completion.
    About a third of those tokens are padding, and every prompt is run twice. Here a pair becomes one segment,
    its two rows' common prefix (the prompt, at least) once, then the rest of the chosen row, then the rest of
    the rejected row, with the positions each token has in its own row. Segments are packed first-fit into rows
    of ``PACKED_ROW`` tokens. The attention mask lets a token see the tokens before it in its own row only
    (its segment's prefix and its own side), so each token's logits are those of the unpacked forward, and
    ``index`` gathers them back into the unpacked layout. On the course's world this runs 0.57x the positions
    (5 seeds, 124 steps: 318k against 554k, of which 370k are real tokens).

    Returns: ``ids``, per seed the (2B, T_i) input ids ``concatenated_forward`` builds (``_Logits`` matches on
    them); ``packed``, {"input_ids": (S, R, L), "position_ids": (S, R, L), "attention_mask": (S, R, 1, L, L)},
    the mask additive (0 where a query may look, a large negative number elsewhere); ``index`` (S, 2B, T) into
    the flattened (R * L) packed positions, T = max T_i.
    """
    ids = [_cat_padded(b["chosen_input_ids"], b["rejected_input_ids"], 0) for b in batches]  # (2B, T_i)
    masks = [_cat_padded(b["chosen_attention_mask"], b["rejected_attention_mask"], 0) for b in batches]
    T = max(x.shape[1] for x in ids)
    pairs = []  # per seed: per pair (chosen ids, rejected ids, length of their common prefix)
    for x, m in zip(ids, masks):
        x, lengths, n = x.cpu().numpy(), m.sum(1).tolist(), x.shape[0] // 2
        per_seed = []
        for j in range(n):
            chosen, rejected = x[j, :lengths[j]], x[n + j, :lengths[n + j]]
            k = min(len(chosen), len(rejected))
            differ = np.flatnonzero(chosen[:k] != rejected[:k])
            per_seed.append((chosen, rejected, int(differ[0]) if len(differ) else k))
        pairs.append(per_seed)
    size = lambda pair: len(pair[0]) + len(pair[1]) - pair[2]  # noqa: E731  tokens of a pair's segment
    L = max(PACKED_ROW, max(size(p) for per_seed in pairs for p in per_seed))
    placed = []  # per seed: per pair (row, offset); first-fit, longest first
    for per_seed in pairs:
        fill, at = [], [None] * len(per_seed)
        for j in sorted(range(len(per_seed)), key=lambda j: -size(per_seed[j])):
            r = next((r for r, used in enumerate(fill) if used + size(per_seed[j]) <= L), len(fill))
            if r == len(fill):
                fill.append(0)
            at[j], fill[r] = (r, fill[r]), fill[r] + size(per_seed[j])
        placed.append(at)
    S, R, B2 = len(batches), max(r for at in placed for r, _ in at) + 1, ids[0].shape[0]
    packed_ids, position_ids = np.zeros((S, R, L), dtype=np.int64), np.zeros((S, R, L), dtype=np.int64)
    segment = np.zeros((S, R, L), dtype=np.int64)  # 1 + the pair's index; 0: padding
    side = np.zeros((S, R, L), dtype=np.int64)  # 0: the common prefix, 1: chosen's rest, 2: rejected's rest
    index = np.zeros((S, B2, T), dtype=np.int64)  # padding positions read index 0: they are never counted
    for s, (per_seed, at) in enumerate(zip(pairs, placed)):
        n = len(per_seed)
        for j, ((chosen, rejected, common), (r, o)) in enumerate(zip(per_seed, at)):
            c, end = len(chosen), o + size(per_seed[j])
            packed_ids[s, r, o:o + c], packed_ids[s, r, o + c:end] = chosen, rejected[common:]
            position_ids[s, r, o:o + c], position_ids[s, r, o + c:end] = np.arange(c), np.arange(common, len(rejected))
            segment[s, r, o:end], side[s, r, o + common:o + c], side[s, r, o + c:end] = j + 1, 1, 2
            base = r * L + o
            index[s, j, :c] = base + np.arange(c)
            index[s, n + j, :len(rejected)] = np.concatenate([base + np.arange(common),
                                                              base + c + np.arange(len(rejected) - common)])
    segment, side = torch.from_numpy(segment), torch.from_numpy(side)
    causal = torch.ones(L, L, dtype=torch.bool).tril()  # (L, L): earlier in the packed row
    same_pair = (segment[..., :, None] == segment[..., None, :]) & (segment[..., None, :] > 0)  # (S, R, L, L)
    same_row = (side[..., None, :] == 0) | (side[..., None, :] == side[..., :, None])  # key shared or on q's side
    allowed = (causal & same_pair & same_row)[:, :, None]  # (S, R, 1, L, L)
    additive = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    packed = {"input_ids": torch.from_numpy(packed_ids), "position_ids": torch.from_numpy(position_ids),
              "attention_mask": additive}
    return ids, {k: v.to(device) for k, v in packed.items()}, torch.from_numpy(index).to(device)


def _unpack(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Packed logits (S, R, L, V) gathered into the unpacked layout (S, 2B, T, V) that ``index`` describes."""
    S, R, L, V = logits.shape
    flat = logits.reshape(S, R * L, V)
    picked = torch.gather(flat, 1, index.reshape(S, -1, 1).expand(-1, -1, V))  # (S, 2B * T, V)
    return picked.reshape(*index.shape, V)


def run_dpo_seeds(world: World, cfg: DPOConfig | None, seeds, pairs_per_seed=None, callback=None,
                  callback_every: int = 0, log=print, threads: int | None = None) -> list[TrainResult]:
    """``len(seeds)`` copies of pi_ref trained with ``cfg``, each as ``run_dpo(world, replace(cfg, seed=s))``
    would train it, but together: one batched forward and backward of all copies per step.

    Seed i draws its data order from ``seeds[i]`` (``train._batch_order``) and trains on ``pairs_per_seed[i]``
    (default: the world's pairs; ``relabel(world, s)`` gives each seed its own labels). The copies' weights are
    stacked along a new first axis (``torch.func.stack_module_state``) and the model runs once on all of them
    (``multiseed.forward``), each copy on its own batch, packed (``_packed_inputs``). The loss is the sum of the
    copies' losses, so each copy's gradient is its own. AdamW is element-wise, so one AdamW over the stacked
    weights is S independent AdamWs; gradient clipping is per copy (its own norm), as in ``train_dpo``.

    ``callback(step, policies) -> list[dict]`` (one dict per seed; ``policies[i]`` is seed i's model, in eval
    mode under no_grad) runs at step 0, every ``callback_every`` steps and at the end; a list of callables
    instead is called as ``callback[i](step, policies[i]) -> dict``. Returns one ``TrainResult`` per seed
    (``seconds`` is the time of the whole batched run). Reference log-probs are always precomputed (pi_ref
    is fixed); no output_dir, resume or DDP: for those, ``run_dpo`` one seed at a time.

    ``threads``: intra-op threads for the run (default: one, as ``small_model_threads`` gives every small
    model; on a 2-core CPU with nothing else running, 2 make the batched step 1.2-1.4x faster, and far slower as
    soon as anything else runs). On the CPU a step of the course's model is compute-bound, so S copies cost
    about S times one in arithmetic; what batching saves is the per-step overhead, which on a GPU is most of
    a step (benchmarks/bench_seeds.py measures it).
    """
    from torch.func import stack_module_state

    from . import multiseed

    cfg = cfg or DPOConfig()
    cfg.validate()
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("run_dpo_seeds: need at least one seed")
    if pairs_per_seed is not None and len(pairs_per_seed) != len(seeds):
        raise ValueError(f"run_dpo_seeds: {len(pairs_per_seed)} datasets in pairs_per_seed for {len(seeds)} seeds")
    if cfg.precision == "fp16":
        raise ValueError("run_dpo_seeds: fp16 needs a loss scaler per seed; use bf16 or fp32")
    if isinstance(callback, (list, tuple)) and len(callback) != len(seeds):
        raise ValueError(f"run_dpo_seeds: {len(callback)} callbacks for {len(seeds)} seeds")
    keeps_dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in world.reference.modules())
    if keeps_dropout and not cfg.disable_dropout:
        raise ValueError("run_dpo_seeds trains with dropout off (DPOConfig.disable_dropout=True); "
                         "with dropout, train the seeds one at a time with run_dpo")
    multiseed.stack([world.reference])  # a clear error for a model multiseed cannot run (only GPT-2)
    device = pick_device(cfg.device)
    S, B = len(seeds), cfg.batch_size
    tokenizer = world.tokenizer
    reference = world.reference.to(device)

    # Each distinct dataset is tokenized, and its reference log-probs computed (or read from the cache), once.
    datasets_ = [pairs_per_seed[i] if pairs_per_seed is not None else world.train_pairs for i in range(S)]
    prepared: dict[int, tuple] = {}
    for pairs in datasets_:
        if id(pairs) not in prepared:
            d = prepare_data(reference, tokenizer, pairs, cfg, log=log)
            ref, kl_features = None, None
            if cfg.loss_type not in REFERENCE_FREE_LOSSES:
                ref = cached_reference_logps(reference, d.features, d.collator, cfg, device, log)
            mismatch = getattr(train, "kto_mismatched_features", None)
            if cfg.loss_type == "kto" and mismatch is not None:  # KTO's z0, read on mismatched (x, y') pairs
                kl_features = mismatch(d.features)
                kl_ref = cached_reference_logps(reference, kl_features, d.collator, cfg, device, log)
                ref = {**ref, **{f"kl_{k}": v for k, v in kl_ref.items()}}
            prepared[id(pairs)] = (d, ref, kl_features)
    data = [prepared[id(d)][0] for d in datasets_]
    ref_all = [prepared[id(d)][1] for d in datasets_]
    kl_features = [prepared[id(d)][2] for d in datasets_]
    collator = data[0].collator
    if len({d.total_steps for d in data}) != 1:
        raise ValueError(f"run_dpo_seeds: the seeds' datasets give different step counts "
                         f"{sorted({d.total_steps for d in data})}; set max_steps or give them equally many pairs")
    total_steps = data[0].total_steps

    # The copies' weights live in ``params`` only, stacked (S, ...); multiseed.forward runs all of them at once
    # (GPT-2 written out on stacked weights: one batched matmul per layer for all copies, attention over every
    # copy's packed rows in one scaled_dot_product_attention; measured 13-16% faster than vmap over transformers'
    # module). It has no dropout (a model that keeps dropout is refused above: run_dpo trains it one seed at a time).
    config = reference.config
    params, _ = stack_module_state([reference] * S)  # {name: (S, *shape)}, fresh leaves that require grad

    def batched(packed, index):  # each copy on its own packed rows; logits put back where concatenated_forward has them
        logits = multiseed.forward(params, config, packed["input_ids"], packed["position_ids"], None,
                                   attention_bias=packed["attention_mask"])  # (S, R, L, V)
        return _unpack(logits, index)  # (S, 2B, T, V)

    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=min(cfg.warmup_steps, total_steps),
                              num_training_steps=total_steps)
    autocast, _ = _autocast(device, cfg.precision)

    policies = [copy.deepcopy(reference).eval() for _ in range(S)]  # what callbacks and the results see
    histories: list[list[dict]] = [[] for _ in range(S)]
    evaluations: list[list[dict]] = [[] for _ in range(S)]

    def load_policies() -> None:
        with torch.no_grad():
            for i, model in enumerate(policies):
                for name, p in model.named_parameters():
                    p.copy_(params[name][i])

    def run_callback(at_step: int) -> None:
        load_policies()
        with torch.no_grad():
            if isinstance(callback, (list, tuple)):
                rows = [cb(at_step, model) for cb, model in zip(callback, policies)]
            else:
                rows = callback(at_step, policies)
        if len(rows) != S:
            raise ValueError(f"run_dpo_seeds: the callback returned {len(rows)} rows for {S} seeds")
        for i, row in enumerate(rows):
            evaluations[i].append({"step": at_step, **(row or {})})

    threads_before = torch.get_num_threads()
    with small_model_threads(reference) if threads is None else contextlib.nullcontext():
        if threads is not None:
            torch.set_num_threads(int(threads))
        if callback is not None:
            run_callback(0)
        t0 = time.perf_counter()
        orders: list = [None] * S
        order_epochs = [-1] * S
        for step in range(total_steps):
            batches, rows_per_seed = [], []
            for i in range(S):
                epoch, index = divmod(step, data[i].steps_per_epoch)
                if epoch != order_epochs[i]:
                    orders[i], order_epochs[i] = _batch_order(len(data[i].features), B, seeds[i], epoch), epoch
                rows_per_seed.append(orders[i][index])
                batches.append(_to(collator([data[i].features[r] for r in orders[i][index]]), device))
            if kl_features[0] is not None:  # KTO's mismatched (x, y') pairs of these rows, for its z0
                for i in range(S):
                    batches[i]["kl"] = _to(collator([kl_features[i][r] for r in rows_per_seed[i]]), device)
            ids, packed, index = _packed_inputs(batches, device)
            with autocast:
                logits = batched(packed, index)  # (S, 2B, T, V)
                computed = [[(ids[i], logits[i])] for i in range(S)]
                if kl_features[0] is not None:  # z0 is read without gradient, as batch_loss does
                    with torch.no_grad():
                        kl_ids, kl_packed, kl_index = _packed_inputs([b["kl"] for b in batches], device)
                        kl_logits = batched(kl_packed, kl_index)  # (S, 2B, T', V)
                    for i in range(S):
                        computed[i].append((kl_ids[i], kl_logits[i]))
                losses, metrics = [], []
                for i in range(S):
                    ref = None
                    if ref_all[i] is not None:
                        ref = {k: v[rows_per_seed[i]].to(device) for k, v in ref_all[i].items()}
                    loss_i, metrics_i = batch_loss(_Logits(computed[i]), batches[i], ref, cfg)
                    losses.append(loss_i)
                    metrics.append(metrics_i)
            optimizer.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()  # copy i's weights get the gradient of loss i alone
            grads = [p.grad for p in params.values()]
            norms = torch.stack([g.flatten(1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (S,)
            coef = (cfg.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_, per copy
            for g in grads:
                g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
            keys = list(metrics[0])
            logged = torch.stack([torch.stack([losses[i].detach().float(), norms[i],
                                               *[metrics[i][k].detach().float() for k in keys]])
                                  for i in range(S)]).tolist()  # (S, 2 + K): one device->host copy per step
            for i, values in enumerate(logged):
                if not all(math.isfinite(v) for v in values[:2]):
                    raise TrainingDiverged(f"training diverged: loss {values[0]}, gradient norm {values[1]} at "
                                           f"step {step} for seed {seeds[i]}. Try a lower lr or beta.")
            lr = optimizer.param_groups[0]["lr"]  # what this update applies (train_dpo logs the same)
            optimizer.step()
            scheduler.step()
            for i, values in enumerate(logged):
                histories[i].append({"step": step + 1, "epoch": (step + 1) / data[i].steps_per_epoch,
                                     "loss": values[0], "grad_norm": values[1], "learning_rate": lr,
                                     **dict(zip(keys, values[2:]))})
            if callback is not None and callback_every and (step + 1) % callback_every == 0:
                run_callback(step + 1)
        seconds = time.perf_counter() - t0
        if callback is not None and evaluations[0][-1]["step"] != total_steps:
            run_callback(total_steps)
    torch.set_num_threads(threads_before)
    load_policies()
    log(f"{S} seeds x {total_steps} steps of {cfg.loss_type} in {seconds:.1f} s")
    return [TrainResult(model=policies[i], history=histories[i], evaluations=evaluations[i], seconds=seconds)
            for i in range(S)]


def evaluate_seeds(world: World, policies, beta: float, seeds, n_samples: int = 1, reward_fn=None,
                   max_new_tokens: int = 24, n_show: int = 4, heldout_pairs=None) -> list[dict]:
    """``evaluate`` for several policies at once (the seeds of one experiment): one sampling loop and one
    scoring pass run all of them together (``multiseed``). On the CPU that costs about what evaluating them one
    by one costs (the arithmetic is the same); on a GPU it is one loop instead of S.

    Policy s samples ``n_samples`` completions per held-out prompt with its own ``seeds[s]`` (the seed axis
    varies evaluation sampling too). Per policy, as ``evaluate.evaluate_policy`` defines them: reward,
    reward_se, kl, kl_se (Monte-Carlo sequence KL on the same samples, their exact tokens scored by the
    policy and by pi_ref in the sampling pass itself), accuracy (implicit-reward accuracy on the held-out
    pairs, ties 1/2), length, grammatical, n, rewards, samples, completions; and margin, the mean implicit
    reward margin beta * (Delta_w - Delta_l) on the held-out pairs (``evaluate.logprob_shift`` times beta).
    """
    from . import multiseed

    policies = list(policies)
    if len(policies) != len(seeds):
        raise ValueError(f"evaluate_seeds: {len(policies)} policies for {len(seeds)} seeds")
    reward_fn = reward_fn or w.reward
    tok, config = world.tokenizer, world.reference.config
    prompts = list(world.heldout_prompts)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    params, ref = multiseed.stack(policies), multiseed.stack([world.reference])
    with small_model_threads(world.reference):
        completions, logp, ref_logp = multiseed.sample(
            params, config, prompt_ids, n_samples, seeds, tok.eos_token_id, tok.pad_token_id,
            max_new_tokens=max_new_tokens, reference=ref)
        pairs = heldout_pairs if heldout_pairs is not None else world.heldout_pairs
        features = ev._tokenize_if_needed(pairs, tok)
        both = multiseed.pair_logps({n: torch.cat([v, ref[n]]) for n, v in params.items()}, config, features,
                                    tok.pad_token_id)  # the policies and pi_ref: (S + 1, N) each
    ref_pairs = {k: v[-1] for k, v in both.items()}
    out = []
    for s in range(len(policies)):
        texts = [[w.decode_completion(tok, ids) for ids in per] for per in completions[s]]
        flat = [(p, c) for p, per in zip(prompts, texts) for c in per]
        rewards = [float(reward_fn(c)) for _, c in flat]
        reward, reward_se = ev.mean_and_se(rewards)
        kl, kl_se = ev.mean_and_se((logp[s] - ref_logp[s]).tolist())
        pol_pairs = {k: v[s] for k, v in both.items()}
        out.append({
            "reward": reward, "reward_se": reward_se, "kl": kl, "kl_se": kl_se,
            "accuracy": ev.implicit_reward_accuracy(pol_pairs, ref_pairs, features, beta=beta),
            "margin": beta * ev.logprob_shift(pol_pairs, ref_pairs, features)["margin"],
            "length": sum(w.n_words(c) for _, c in flat) / len(flat),
            "grammatical": sum(w.is_grammatical(p + c, 2, 4) for p, c in flat) / len(flat),
            "n": len(flat), "rewards": rewards, "samples": [f"{p} →{c}" for p, c in flat[:n_show]],
            "completions": texts,
        })
    return out


def train_and_evaluate_seeds(world: World, cfg: DPOConfig, seeds, pairs_per_seed=None, path_prompts=None,
                             path_every: int = 0, reference_result: dict | None = None, n_samples: int = 2,
                             log=print) -> list[dict]:
    """One objective over ``seeds`` (``run_dpo_seeds``), each seed's policy measured as notebook 06 and its
    companions compare objectives. One row per seed: seed; reward, kl, grammatical, length (``evaluate_policy``
    on all held-out prompts, ``n_samples`` each, sampling seed 0, so seeds differ in training only); accuracy
    (implicit reward on the held-out pairs); chosen, rejected, margin (``evaluate.logprob_shift``, nats);
    history (the training log); path (None, or with ``path_every``: reward, kl, grammatical and length at step 0
    (pi_ref: ``reference_result``, KL 0), every ``path_every`` steps on ``path_prompts``, and at the end the end
    point itself, measured once). Paths need ``cfg.max_steps``, so the last step is known in advance."""
    keys = ("reward", "kl", "grammatical", "length")
    features = ev._tokenize_if_needed(world.heldout_pairs, world.tokenizer)
    pad = world.tokenizer.pad_token_id
    with small_model_threads(world.reference):
        reference_logps = ev.pair_logps(world.reference, features, pad_token_id=pad)

    def sampled(policy, prompts):
        return ev.evaluate_policy(policy, world.reference, world.tokenizer, prompts, None, beta=cfg.beta,
                                  n_samples=n_samples, seed=0)

    def end_point(policy) -> dict:
        e, logps = sampled(policy, world.heldout_prompts), ev.pair_logps(policy, features, pad_token_id=pad)
        shift = ev.logprob_shift(logps, reference_logps, features)
        return {**{k: e[k] for k in keys}, "accuracy": ev.implicit_reward_accuracy(logps, reference_logps, features,
                                                                                   beta=cfg.beta),
                **{k: shift[k] for k in ("chosen", "rejected", "margin")}}

    ends: dict[int, dict] = {}
    callback = None
    if path_every:
        if not cfg.max_steps:
            raise ValueError("train_and_evaluate_seeds: a path needs cfg.max_steps (the step of the end point)")
        if reference_result is None:
            reference_result = sampled(world.reference, world.heldout_prompts)

        def callback(step, policies):
            if step == 0:  # every policy is pi_ref
                return [{**{k: reference_result[k] for k in keys}, "kl": 0.0} for _ in policies]
            if step == cfg.max_steps:
                ends.update({i: end_point(p) for i, p in enumerate(policies)})
                return [{k: ends[i][k] for k in keys} for i in range(len(policies))]
            return [{k: v for k, v in sampled(p, path_prompts).items() if k in keys} for p in policies]

    runs = run_dpo_seeds(world, cfg, seeds, pairs_per_seed=pairs_per_seed, callback=callback,
                         callback_every=path_every, log=log)
    with small_model_threads(world.reference):
        return [{"seed": int(seed), **(ends.get(i) or end_point(run.model)), "history": run.history,
                 "path": run.evaluations if path_every else None} for i, (seed, run) in enumerate(zip(seeds, runs))]


def reference_samples(world: World, k: int, seed: int = 1, max_new_tokens: int = 24) -> list[list[str]]:
    """``k`` completions of pi_ref per held-out prompt (the pool best-of-n picks from), sampled in batches with
    ``multiseed.sample`` and cached in the world's folder: pi_ref and the prompts are fixed, so the pool is
    part of the world (51,200 samples for k = 256 take ~1 min on one CPU core; a second call reads the file)."""
    from . import multiseed

    if k < 1:
        raise ValueError(f"reference_samples: k must be >= 1, got {k}")
    path = Path(world.directory) / f"reference-samples-k{k}-seed{seed}-t{max_new_tokens}.json"
    if path.exists():
        return json.loads(path.read_text())
    tok = world.tokenizer
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in world.heldout_prompts]
    with small_model_threads(world.reference):
        completions, _, _ = multiseed.sample(multiseed.stack([world.reference]), world.reference.config, prompt_ids,
                                             k, [seed], tok.eos_token_id, tok.pad_token_id,
                                             max_new_tokens=max_new_tokens, batch_size=2048)
    texts = [[w.decode_completion(tok, ids) for ids in per] for per in completions[0]]
    if Path(world.directory).exists():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(texts))
        tmp.replace(path)
    return texts
