"""Where the time of a `minidpo train` job goes: its phases, then one DPO step under torch.profiler.

    .venv/bin/python benchmarks/profile_dpo.py                 # the benchmark's tiny GPT-2, 512 pairs
    .venv/bin/python benchmarks/profile_dpo.py --n-embd 256    # a wider model

The phases are those of `minidpo train` (cli.cmd_train -> train.train_dpo), timed one by one in this
process: imports, loading the pairs and the model, tokenizing, the reference cache key, the reference
log-probs, the DPO steps, saving. The step profile groups the operators into matrix multiplies,
attention, element-wise work, the optimizer and the rest, and lists the most expensive operators.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _assets  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")
OPTIMIZER = ("aten::_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt", "Optimizer.step")


def group(name: str) -> str:
    if name.startswith(MATMUL):
        return "matrix multiplies"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention (sdpa)"
    if name.startswith(OPTIMIZER):
        return "optimizer (AdamW)"
    if name.startswith(("aten::copy_", "aten::cat", "aten::index", "aten::gather", "aten::pad", "aten::constant_pad",
                        "aten::fill_", "aten::zero_", "aten::empty", "aten::clone", "aten::contiguous")):
        return "copies, gathers, fills"
    return "element-wise and the rest"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--top", type=int, default=12, help="operators listed")
    args = p.parse_args()

    phases: dict[str, float] = {}
    t = time.perf_counter()
    from minidpo import train as tr
    from minidpo.cli import _load_model_and_tokenizer
    from minidpo.data import PreferenceCollator, load_preferences, tokenize_preferences
    phases["imports (torch before: %.2f s)" % (t - T0)] = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, data = _assets.write_assets(tmp / "assets", args.pairs, args.n_embd, args.n_layer)
        t = time.perf_counter()
        pairs = load_preferences(str(data))
        phases["load pairs (jsonl -> Dataset)"] = time.perf_counter() - t
        t = time.perf_counter()
        model, tokenizer = _load_model_and_tokenizer(str(model_dir), "cpu")
        phases["load model + tokenizer"] = time.perf_counter() - t
        t = time.perf_counter()
        features, _ = tokenize_preferences(pairs, tokenizer, max_length=_assets.MAX_LENGTH)
        phases["tokenize"] = time.perf_counter() - t
        t = time.perf_counter()
        tr._fingerprint(model, features, _assets.MAX_LENGTH)
        phases["reference cache key (fingerprint)"] = time.perf_counter() - t
        collator = PreferenceCollator(tokenizer.pad_token_id)
        t = time.perf_counter()
        ref = tr.compute_reference_logps(model, features, collator, args.batch_size, torch.device("cpu"))
        phases["reference log-probs (%d forwards)" % -(-len(features) // args.batch_size)] = time.perf_counter() - t
        t = time.perf_counter()
        for start in range(0, len(features), args.batch_size):
            collator(features[start:start + args.batch_size])
        phases["  of which collating"] = time.perf_counter() - t

        cfg = tr.DPOConfig(lr=1e-3, batch_size=args.batch_size, max_steps=args.steps, max_length=_assets.MAX_LENGTH,
                           cache_dir=str(tmp / "cache"), show_progress=False, device="cpu")
        tr.cached_reference_logps(model, features, collator, cfg, torch.device("cpu"), log=lambda *_: None)
        t = time.perf_counter()
        result = tr.train_dpo(model, tokenizer, pairs, cfg, output_dir=tmp / "run", log=lambda *_: None)
        total = time.perf_counter() - t
        phases["train_dpo: %d DPO steps (loop only)" % args.steps] = result.seconds
        phases["train_dpo: the rest (tokenize, cached ref, saves)"] = total - result.seconds

        print(f"phases of a `minidpo train` job (n_embd {args.n_embd}, {args.n_layer} layers, {len(features)} pairs, "
              f"batch {args.batch_size}, {torch.get_num_threads()} threads):")
        for name, seconds in phases.items():
            print(f"  {name:<52}{seconds:8.3f} s")
        print(f"  {'DPO steps per second':<52}{args.steps / result.seconds:8.2f}")

        # one step under the profiler, after the loop above warmed everything up
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batch = collator(features[:args.batch_size])
        ref_b = {k: v[:args.batch_size] for k, v in ref.items()}

        def step():
            loss, metrics = tr.batch_loss(model, batch, ref_b, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            return [loss.item(), *(v.item() for v in metrics.values())]

        for _ in range(3):
            step()
        from torch.profiler import ProfilerActivity, profile

        n = 5
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(n):
                step()
            wall = (time.perf_counter() - t) / n
        events = [e for e in prof.key_averages()]
        ops = sum(e.self_cpu_time_total for e in events) / 1e6 / n
        groups: dict[str, float] = {}
        for e in events:
            groups[group(e.key)] = groups.get(group(e.key), 0.0) + e.self_cpu_time_total / 1e6 / n
        print(f"\none DPO step, profiled ({n} steps averaged; wall {wall * 1e3:.1f} ms, operators {ops * 1e3:.1f} ms, "
              f"T = {batch['chosen_input_ids'].shape[1]}):")
        for name, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<28}{seconds * 1e3:8.1f} ms  {seconds / ops:6.1%}")
        print(f"\ntop {args.top} operators by self time per step:")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"  {e.key[:48]:<48}{e.self_cpu_time_total / 1e3 / n:8.2f} ms  {e.count // n:5d} calls")


if __name__ == "__main__":
    main()
