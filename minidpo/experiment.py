"""The synthetic-world experiment, end to end: the pieces that ``minidpo demo`` and notebooks 04-07 share.

    build_world   corpus -> tokenizer -> tiny GPT-2 SFT (this is pi_ref) -> sample pairs from pi_ref -> label
                  them by Bradley-Terry on the true reward. Cached on disk under a key made of every config,
                  so later notebooks reuse it and a fresh clone rebuilds it.
    run_dpo       a copy of pi_ref trained with any objective on the world's pairs.
    evaluate      true reward, KL(pi || pi_ref) and implicit-reward accuracy on held-out prompts.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import datasets
import torch
from transformers.utils import logging as hf_logging

from . import evaluate as ev
from . import world as w
from .models import load_causal_lm, pick_device, tiny_gpt2
from .tokenizer import load_tokenizer, train_tokenizer
from .runs import default_cache_dir
from .train import DPOConfig, SFTConfig, TrainResult, sft, train_dpo

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
    if cache_dir is not None and (directory / "done").exists():
        log(f"world: reused {directory}")
        return _load_world(directory, world_cfg, device)

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
                      temperature=world_cfg.temperature)
        train_completions = w.sample_completions(reference, tokenizer, train_prompts, seed=world_cfg.seed, **sample)
        heldout_completions = w.sample_completions(reference, tokenizer, heldout_prompts,
                                                   seed=world_cfg.seed + 1, **sample)
        seconds["sampling"] = time.perf_counter() - t
    train_pairs = w.label_pairs(train_prompts, train_completions, world_cfg)
    heldout_pairs = w.label_pairs(heldout_prompts, heldout_completions, world_cfg, seed=world_cfg.seed + 1)

    world = World(tokenizer, reference, train_pairs, heldout_pairs, heldout_prompts, world_cfg, directory,
                  seconds, w.label_noise(train_pairs))
    if cache_dir is not None:
        _save_world(world)
        log(f"world: built in {sum(seconds.values()):.1f} s, cached at {directory}")
    return world


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
