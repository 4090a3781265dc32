"""minidpo against TRL's DPOTrainer, side by side in one run, and against the machine's matmul peak.

    make bench                                  # installs the bench extra (trl, psutil), then runs this
    .venv/bin/python benchmarks/bench_dpo.py    # the same, once `pip install -e ".[bench]"` is done

1. The same job both ways: the tiny GPT-2 of DESIGN.md (n_embd 128, 4 layers, 4 heads, byte-level vocab 258,
   random weights) and 512 pairs written to disk (save_pretrained folder + jsonl, see _assets.py), batch 16,
   32 steps (one epoch), max_length 64, lr 1e-3, beta 0.1, CPU. Each job is a fresh subprocess, timed from
   start to exit (imports, loading, tokenizing, reference log-probs, training, saving):
     * `minidpo train ...` with a cold reference cache (a fresh working folder each time), and again with
       the cache warm (the second run on the same model and data: no reference pass at all);
     * benchmarks/_trl_job.py: DPOTrainer with its defaults (reference forward at every step), and with
       precompute_ref_log_probs=True. Fresh datasets cache each time, so its map() is not reused either.
   Jobs are interleaved, repeated (--repeats), and reported as medians.
2. fp32 matrix-multiply peak of this machine (torch.mm, n = 512..2048, best run), and the DPO loop's model
   FLOPs per second as a fraction of it for n_embd 128, 256 and 512 (4 layers, T = 64 with no padding, so
   the FLOPs are exact; see _assets.step_flops for the formula). Median step time over the run.
The machine may be shared: the load average is printed before and after, and timings are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
BIN = Path(sys.executable).parent
MINIDPO = str(BIN / "minidpo") if (BIN / "minidpo").exists() else None
JOB = dict(batch_size=16, steps=32, max_length=64, lr=1e-3, beta=0.1)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def matmul_peak(sizes=(512, 1024, 2048), seconds: float = 0.6) -> tuple[float, dict[int, float]]:
    """Best fp32 torch.mm rate (FLOP/s) over square sizes, each timed for about ``seconds``, 3 trials."""
    import torch

    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            torch.mm(a, b)
        once = time.perf_counter()
        torch.mm(a, b)
        reps = max(2, int(seconds / max(time.perf_counter() - once, 1e-4)))
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
        rates[n] = best
    return max(rates.values()), rates


def run(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float, str]:
    """Run a job to its end: (wall seconds, CPU seconds of the job, its output)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, proc.stdout + proc.stderr


def minidpo_job(model: Path, data: Path, work: Path, name: str, env: dict) -> dict:
    """`minidpo train` in ``work`` (its reference cache lives in work/.cache): whole time, loop, ref pass."""
    cmd = [MINIDPO, "train", "--model", str(model), "--data", str(data), "--output-dir", str(work / name),
           "--batch-size", str(JOB["batch_size"]), "--max-steps", str(JOB["steps"]), "--max-length",
           str(JOB["max_length"]), "--lr", str(JOB["lr"]), "--beta", str(JOB["beta"]), "--device", "cpu", "--quiet"]
    whole, cpu, out = run(cmd, work, env)
    m = re.search(r"trained (\d+) steps in ([\d.]+) s", out)
    r = re.search(r"computed for \d+ pairs in ([\d.]+) s", out)
    return {"whole": whole, "cpu": cpu, "steps": int(m.group(1)), "loop": float(m.group(2)),
            "ref": float(r.group(1)) if r else 0.0}


def trl_job(model: Path, data: Path, work: Path, name: str, env: dict, precompute: bool) -> dict:
    cmd = [sys.executable, str(HERE / "_trl_job.py"), "--model", str(model), "--data", str(data), "--output-dir",
           str(work / name), "--batch-size", str(JOB["batch_size"]), "--max-steps", str(JOB["steps"]),
           "--max-length", str(JOB["max_length"]), "--lr", str(JOB["lr"]), "--beta", str(JOB["beta"])]
    if precompute:
        cmd.append("--precompute-ref")
    env = {**env, "HF_DATASETS_CACHE": str(work / f"hf-datasets-{name}")}  # a cold cache, like minidpo's
    whole, cpu, out = run(cmd, work, env)
    line = [x for x in out.splitlines() if x.startswith('{"train_seconds"')][-1]
    info = json.loads(line)
    return {"whole": whole, "cpu": cpu, "steps": info["steps"], "train": info["train_seconds"]}


def loop_efficiency(n_embd: int, steps: int, activation: str = "gelu_new") -> dict:
    """The minidpo DPO loop (train_dpo, reference precomputed) on rows of exactly T = 64 tokens, against the
    matmul peak measured right after it (so that both see the same load on a shared machine)."""
    import torch

    import _assets
    from minidpo.data import load_preferences
    from minidpo.train import DPOConfig, train_dpo

    length, bs = _assets.MAX_LENGTH, JOB["batch_size"]
    tokenizer = _assets.byte_tokenizer()
    model = _assets.gpt2(n_embd=n_embd, activation_function=activation)
    pairs = load_preferences(_assets.make_fixed_pairs(bs * steps, length))
    stamps = []
    cfg = DPOConfig(lr=JOB["lr"], batch_size=bs, max_steps=steps, max_length=length, warmup_steps=2,
                    cache_dir=None, show_progress=False, device="cpu")
    train_dpo(model, tokenizer, pairs, cfg, log=lambda *_: None,
              callback=lambda step, m: stamps.append(time.perf_counter()) and None, callback_every=1)
    step_times = [b - a for a, b in zip(stamps[1:-1], stamps[2:])]  # the first step (warm-up) left out
    step = statistics.median(step_times)
    peak, _ = matmul_peak(sizes=(1024, 2048), seconds=0.3)
    flops = _assets.step_flops(model, rows=2 * bs, length=length)
    return {"n_embd": n_embd, "params": sum(p.numel() for p in model.parameters()), "gflop_step": flops / 1e9,
            "steps_s": 1 / step, "gflops": flops / step / 1e9, "fraction": flops / step / peak, "peak": peak,
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description="minidpo vs TRL DPOTrainer, and the DPO loop vs the matmul peak")
    p.add_argument("--repeats", type=int, default=3, help="runs of each whole job (median reported)")
    p.add_argument("--skip-trl", action="store_true", help="minidpo only (no trl installed)")
    p.add_argument("--skip-jobs", action="store_true", help="only the matmul peak and the loop's fraction of it")
    p.add_argument("--sizes", default="128,256,512", help="n_embd values for the fraction of peak")
    p.add_argument("--no-fused-gelu", action="store_true",
                   help="skip the second fraction-of-peak run with GPT-2's GELU as one fused kernel")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/OpenMP threads for every job and measurement (default: torch's, one per core). "
                        "On a machine shared with other jobs use 1: with more threads than free cores, OpenMP's "
                        "spin-waiting makes timings swing 5-40x")
    args = p.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}; load average {load()}")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    peak, rates = matmul_peak()
    print("fp32 matmul: " + ", ".join(f"n={n}: {r / 1e9:.0f}" for n, r in rates.items())
          + f" GFLOP/s; peak {peak / 1e9:.0f} GFLOP/s")

    jobs: dict[str, list[dict]] = {}
    if not args.skip_jobs:
        if MINIDPO is None:
            raise SystemExit(f"no minidpo script next to {sys.executable}: pip install -e . first")
        trl = not args.skip_trl
        if trl:
            try:
                import trl as _trl  # noqa: F401
            except ImportError:
                raise SystemExit('TRL is not installed: pip install -e ".[bench]" (or pass --skip-trl)') from None
        with tempfile.TemporaryDirectory(prefix="minidpo-bench-") as tmp:
            tmp = Path(tmp)
            import _assets

            model, data = _assets.write_assets(tmp / "assets")
            print(f"\njob: {data.name} (512 pairs), {model.name}/ (n_embd 128, 4 layers, 4 heads, vocab 258), "
                  f"batch {JOB['batch_size']}, {JOB['steps']} steps, max_length {JOB['max_length']}; "
                  f"{args.repeats} repeats, interleaved")
            for rep in range(args.repeats):
                work = tmp / f"rep{rep}"
                work.mkdir()
                jobs.setdefault("minidpo", []).append(minidpo_job(model, data, work, "cold", env))
                if trl:
                    jobs.setdefault("trl", []).append(trl_job(model, data, work, "trl", env, precompute=False))
                # same folder: the reference log-probs of the cold run are found in work/.cache
                jobs.setdefault("minidpo_warm", []).append(minidpo_job(model, data, work, "warm", env))
                if trl:
                    jobs.setdefault("trl_pre", []).append(trl_job(model, data, work, "trlpre", env, precompute=True))
                print(f"  repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]['whole']:.1f} s" for k, v in jobs.items()),
                      flush=True)

    fractions, fused = [], []
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for n_embd in sizes:
        steps = {128: 32, 256: 16}.get(n_embd, 8)
        fractions.append(loop_efficiency(n_embd, steps))
        if not args.no_fused_gelu:
            fused.append(loop_efficiency(n_embd, steps, activation="gelu_pytorch_tanh"))

    def stat(rows, key, how):
        values = [r["loop"] + r["ref"] if key == "loop+ref" else r[key] for r in rows]
        return statistics.median(values) if how == "median" else min(values)

    if jobs:
        steps = JOB["steps"]
        print(f"\n### minidpo vs TRL {_version('trl')} DPOTrainer (CPU, {torch.get_num_threads()} threads; "
              f"median of {args.repeats} runs, best run in brackets)\n")
        print("| job | whole job (s) | whole job, CPU (s) | in training (s) | steps/s in training | "
              "whole job: TRL / this |")
        print("|---|---:|---:|---:|---:|---:|")

        def line(name, rows, train_key):
            cell = lambda key, fmt: f"{stat(rows, key, 'median'):{fmt}} ({stat(rows, key, 'best'):{fmt}})"  # noqa: E731
            rate = f"{steps / stat(rows, train_key, 'median'):.1f} ({steps / stat(rows, train_key, 'best'):.1f})"
            ratio = "n/a"
            if "trl" in jobs:
                ratio = " ".join(f"{stat(jobs['trl'], 'whole', how) / stat(rows, 'whole', how):.2f}x"
                                 for how in ("median", "best"))
                ratio = ratio.replace(" ", " (", 1) + ")"
            print(f"| {name} | {cell('whole', '.1f')} | {cell('cpu', '.1f')} | {cell(train_key, '.2f')} | {rate} | "
                  f"{ratio} |")

        line("`minidpo train`, cold reference cache (ref pass + loop)", jobs["minidpo"], "loop+ref")
        line("`minidpo train`, warm reference cache (loop only)", jobs["minidpo_warm"], "loop")
        if "trl" in jobs:
            line("TRL `DPOTrainer`, defaults (reference forward every step)", jobs["trl"], "train")
            line("TRL `DPOTrainer`, `precompute_ref_log_probs=True`", jobs["trl_pre"], "train")
        loop, ref = stat(jobs["minidpo"], "loop", "median"), stat(jobs["minidpo"], "ref", "median")
        print(f"\nminidpo cold (medians): reference pass {ref:.2f} s + {steps} steps {loop:.2f} s "
              f"({steps / loop:.1f} steps/s in the loop alone). 'in training' is TRL's train() and minidpo's "
              f"reference pass + loop; the rest of a whole job is start-up (imports), loading, tokenizing, saving.")

    print(f"\n### The DPO loop against the fp32 matmul peak (peak measured right after each run)\n")
    head = "| n_embd | parameters | GFLOP per step | steps/s | GFLOP/s | peak GFLOP/s | fraction of peak |"
    print(head + (" fused GELU: steps/s | fused GELU: fraction |" if fused else ""))
    print("|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if fused else ""))
    for i, f in enumerate(fractions):
        extra = f" {fused[i]['steps_s']:.2f} | {fused[i]['fraction']:.0%} |" if fused else ""
        print(f"| {f['n_embd']} | {f['params'] / 1e6:.2f} M | {f['gflop_step']:.1f} | {f['steps_s']:.2f} | "
              f"{f['gflops']:.0f} | {f['peak'] / 1e9:.0f} | {f['fraction']:.0%} |" + extra)
    print("\n4 layers, 4 heads, vocab 258, batch 16 pairs = 32 rows of exactly 64 tokens, reference precomputed; "
          "FLOPs per step = 6 x N x tokens + 12 x layers x T x n_embd x tokens (N = weights that multiply every "
          "token, lm_head included); median step time, first step left out. 'fused GELU': the same model with "
          "activation_function='gelu_pytorch_tanh' (the same tanh-approximate GELU as GPT-2's 'gelu_new', "
          "one kernel instead of eight).")
    print(f"load average at the end: {load()}")


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
