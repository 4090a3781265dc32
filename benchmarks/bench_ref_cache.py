"""What the reference-log-prob cache saves: peak memory (RSS) and time, with and without it.

    .venv/bin/python benchmarks/bench_ref_cache.py            # tiny GPT-2 and a GPT-2-small-sized one (124M)
    .venv/bin/python benchmarks/bench_ref_cache.py --quick    # tiny only

Each configuration runs in its own subprocess, so each peak resident set size (ru_maxrss) is its own:
train_dpo for a few steps with ``precompute_ref=True`` (the reference log-probs computed once, before
training, and no reference model held) and with ``precompute_ref=False`` (a frozen copy of the model
kept as pi_ref and run at every step, as TRL does by default). Random weights, byte-level data of fixed
length, CPU, fp32, AdamW.

Why it does not halve the peak: training holds the weights (4 bytes per parameter in fp32), their gradients
(4) and AdamW's two moments (8): 16 bytes per parameter, plus activations and the libraries. The reference
model adds 4 bytes per parameter, so dropping it saves at most 4 / (16 + 4) = 20% of what training
itself needs; less of the whole process. Half is what it saves of the *weights* held (two models -> one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONFIGS = {
    # name: (n_embd, n_layer, n_head, vocab, n_positions)
    "tiny": (128, 4, 4, 258, 128),
    "gpt2-124M": (768, 12, 12, 50257, 1024),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(name: str, precompute: bool, steps: int, batch: int, seq: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import _assets
    from minidpo.data import load_preferences
    from minidpo.train import DPOConfig, train_dpo

    after_imports = rss_mb()
    n_embd, n_layer, n_head, vocab, n_pos = CONFIGS[name]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                       n_positions=n_pos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=1))
    params = sum(p.numel() for p in model.parameters())
    tokenizer = _assets.byte_tokenizer()  # ids < 258 only; the model's full vocabulary is still computed
    pairs = load_preferences(_assets.make_fixed_pairs(batch * steps, seq))
    before_training = rss_mb()
    peak_before_training = peak_mb()
    cfg = DPOConfig(lr=1e-5, batch_size=batch, max_steps=steps, max_length=seq, warmup_steps=0,
                    precompute_ref=precompute, cache_dir=None, show_progress=False, device="cpu")
    stamps = []
    t = time.perf_counter()
    result = train_dpo(model, tokenizer, pairs, cfg, log=lambda *_: None,
                       callback=lambda step, m: stamps.append(time.perf_counter()) and None, callback_every=1)
    total = time.perf_counter() - t
    steps_t = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    return {"config": name, "precompute_ref": precompute, "params": params, "after_imports_mb": after_imports,
            "model_built_mb": before_training, "peak_before_training_mb": peak_before_training,
            "peak_mb": peak_mb(), "seconds": total, "loop_seconds": result.seconds,
            "ref_seconds": total - result.seconds, "median_step_s": statistics.median(steps_t) if steps_t else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny model only")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2, help="pairs per step (2 rows each)")
    p.add_argument("--seq", type=int, default=128, help="tokens per row")
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "PRECOMPUTE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1", args.steps, args.batch, args.seq)))
        return

    names = ["tiny"] if args.quick else list(CONFIGS)
    rows = []
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for name in names:
        for precompute in (True, False):
            cmd = [sys.executable, __file__, "--child", name, "1" if precompute else "0", "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {name:10} precompute_ref={precompute!s:5}  peak RSS {r['peak_mb']:7.0f} MB  "
                  f"{r['seconds']:6.1f} s", flush=True)

    print(f"\n### Reference log-prob cache: peak memory and time ({args.steps} steps, {args.batch} pairs x "
          f"{args.seq} tokens, CPU, fp32, AdamW)\n")
    print("| model | parameters | reference | peak RSS (MB) | model built (MB) | added by training (MB) | "
          "reference pass (s) | step (s) | total (s) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = "precomputed, no model held" if r["precompute_ref"] else "live copy, forward every step"
        print(f"| {r['config']} | {r['params'] / 1e6:.1f} M | {ref} | {r['peak_mb']:.0f} | {r['model_built_mb']:.0f} | "
              f"{r['peak_mb'] - r['model_built_mb']:.0f} | {r['ref_seconds']:.2f} | {r['median_step_s']:.2f} | "
              f"{r['seconds']:.1f} |")
    print()
    for name in names:
        on, off = [r for r in rows if r["config"] == name and r["precompute_ref"]][0], \
                  [r for r in rows if r["config"] == name and not r["precompute_ref"]][0]
        saved = off["peak_mb"] - on["peak_mb"]
        weights = on["params"] * 4 / 2 ** 20
        print(f"{name}: the cache saves {saved:.0f} MB of peak RSS ({saved / off['peak_mb']:.0%} of the process, "
              f"{saved / (off['peak_mb'] - off['after_imports_mb']):.0%} of what is above the imported libraries); "
              f"one fp32 copy of the weights is {weights:.0f} MB, training state (weights, grads, AdamW) "
              f"{4 * weights:.0f} MB. Step time {off['median_step_s']:.2f} s with the live reference, "
              f"{on['median_step_s']:.2f} s with the cache.")


if __name__ == "__main__":
    main()
