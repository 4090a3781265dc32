"""``minidpo``: the command line. ``minidpo --help`` lists the commands; each has ``--help``.

Heavy libraries are imported inside each command, so ``minidpo --help`` answers at once. A user's mistake
ends the command with exit status 2 and one line on stderr that begins ``error:``; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

LOSSES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down", "simpo", "orpo", "kto")
DEVICES = ("auto", "cpu", "cuda", "mps")


class UsageError(ValueError):
    """A mistake in how the command was called (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        sys.stderr.write(f"error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def _number(cast, ok, requirement: str):
    """An argparse type: parse with ``cast``, then check ``ok``, naming the requirement when it fails."""
    kind = "a whole number" if cast is int else "a number"

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not ok(value):  # also rejects NaN
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    return parse


_positive_float = _number(float, lambda v: v > 0, "> 0")
_positive_int = _number(int, lambda v: v >= 1, ">= 1")
_unit_interval = _number(float, lambda v: 0 <= v < 0.5, "in [0, 0.5)")


def prepare_output_dir(path: str | os.PathLike, resume: bool = False) -> Path:
    """Refuse a non-empty folder that is not a minidpo run: we never overwrite files we did not write."""
    from .train import RUN_MARKER

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not (out / RUN_MARKER).exists():
        raise UsageError(f"--output-dir {out} is not empty and is not a minidpo run folder; choose another")
    if resume and not (out / RUN_MARKER).exists():
        raise UsageError(f"--resume {out}: no minidpo run there to resume")
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).touch()
    return out


def _figure_dirs(out: Path) -> list[Path]:
    # Inside the repository, figures also land in figures/ (what the README shows); elsewhere, only in the run.
    return [out] + ([Path("figures")] if Path("figures").is_dir() else [])


# ---------------------------------------------------------------------------------------------------------
# minidpo demo
# ---------------------------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    t_start = time.perf_counter()
    out = prepare_output_dir(args.output_dir)
    from . import experiment, plots
    from .train import DPOConfig, SFTConfig
    from .world import WorldConfig

    world_cfg, sft_cfg = WorldConfig(seed=args.seed), SFTConfig(seed=args.seed)
    if args.quick:  # a smaller world: seconds, for smoke tests
        world_cfg = WorldConfig(seed=args.seed, n_corpus=1500, n_train_prompts=256, n_heldout_prompts=64)
        sft_cfg = SFTConfig(seed=args.seed, steps=120)
    cache = None if args.no_cache else args.cache_dir
    print(f"1/3 building the synthetic world (SFT of the tiny GPT-2 = pi_ref, pairs from pi_ref) ...")
    world = experiment.build_world(world_cfg, sft_cfg, cache_dir=cache, device=args.device,
                                   show_progress=not args.quiet)
    noise = world.label_noise
    print(f"    {len(world.train_pairs)} training pairs, {len(world.heldout_pairs)} held-out pairs; "
          f"label noise {noise['measured']:.1%} (expected {noise['expected']:.1%})")

    print(f"2/3 DPO (loss={args.loss}, beta={args.beta}) ...")
    cfg = DPOConfig(loss_type=args.loss, beta=args.beta, lr=args.lr, epochs=args.epochs, batch_size=16,
                    seed=args.seed, device=args.device, cache_dir=cache, show_progress=not args.quiet)
    result = experiment.run_dpo(world, cfg, output_dir=out / "policy", log=lambda m: print("    " + m))

    print("3/3 evaluating on held-out prompts ...")
    ref_eval = experiment.evaluate(world, world.reference, args.beta, seed=args.seed)
    pol_eval = experiment.evaluate(world, result.model, args.beta, seed=args.seed)
    seconds = time.perf_counter() - t_start

    metrics = {
        "reference": {"reward": ref_eval["reward"], "reward_se": ref_eval["reward_se"], "kl": 0.0},
        "policy": {"reward": pol_eval["reward"], "reward_se": pol_eval["reward_se"], "kl": pol_eval["kl"],
                   "kl_se": pol_eval["kl_se"]},
        "heldout_accuracy": pol_eval["accuracy"],
        "beta": args.beta, "loss": args.loss, "steps": len(result.history), "seconds": seconds,
        "train_seconds": result.seconds, "label_noise": noise["measured"], "seed": args.seed,
        "world": str(world.directory), "samples": {"reference": ref_eval["samples"][:4],
                                                    "policy": pol_eval["samples"][:4]},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    written = []
    figures = {
        "demo_training_curves.png": plots.plot_training_curves(result.history, title="DPO on the synthetic world"),
        "demo_displacement.png": plots.plot_displacement(result.history, args.beta),
        "demo_reward.png": plots.plot_reward_comparison(ref_eval["rewards"], pol_eval["rewards"]),
    }
    for name, fig in figures.items():
        written += plots.save(fig, *[d / name for d in _figure_dirs(out)])

    print()
    print(f"{'':18}{'true reward':>20}{'KL(pi||pi_ref)':>18}")
    print(f"{'reference (SFT)':18}{ref_eval['reward']:>+12.2f} ± {ref_eval['reward_se']:.2f}{0.0:>18.2f}")
    print(f"{'DPO policy':18}{pol_eval['reward']:>+12.2f} ± {pol_eval['reward_se']:.2f}"
          f"{pol_eval['kl']:>12.2f} ± {pol_eval['kl_se']:.2f}")
    print(f"implicit-reward accuracy on held-out pairs: {pol_eval['accuracy']:.3f}   "
          f"({len(result.history)} DPO steps, beta {args.beta}, {seconds:.1f} s in all)")
    print("samples after DPO:")
    for s in pol_eval["samples"][:3]:
        print(f"    {s}")
    print(f"wrote {out / 'metrics.json'}, the model in {out / 'policy'}, and figures:")
    for p in written:
        print(f"    {p}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# minidpo train / sft / world
# ---------------------------------------------------------------------------------------------------------

def _load_model_and_tokenizer(name_or_path: str, device: str):
    from transformers.utils import logging as hf_logging

    from .models import load_causal_lm, pick_device
    from .tokenizer import load_tokenizer

    hf_logging.disable_progress_bar()  # stderr is for errors: one line, nothing before it
    model = load_causal_lm(name_or_path, device=pick_device(device))
    tokenizer = load_tokenizer(name_or_path)
    if tokenizer.pad_token_id is None:  # GPT-2 has no pad token: padding is masked anyway, EOS serves
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def cmd_train(args) -> int:
    out = prepare_output_dir(args.output_dir, resume=args.resume is not None)
    if args.resume is not None and Path(args.resume).resolve() != out.resolve():
        raise UsageError("--resume must name the same folder as --output-dir")
    from .data import load_preferences
    from .train import DPOConfig, train_dpo

    cfg = DPOConfig(loss_type=args.loss, beta=args.beta, label_smoothing=args.label_smoothing, lr=args.lr,
                    batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
                    max_length=args.max_length, precompute_ref=args.precompute_ref, seed=args.seed,
                    device=args.device, save_every=args.save_every, show_progress=not args.quiet)
    cfg.validate()
    if args.loss == "simpo" and args.beta == 0.1:
        print("note: SimPO's paper uses beta around 2.0; pass --beta to change it")
    pairs = load_preferences(args.data, split=args.split)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun / accelerate launch: this process's number
    if "LOCAL_RANK" in os.environ:  # one GPU per process: "cuda" below then means this process's GPU
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    model, tokenizer = _load_model_and_tokenizer(args.model, args.device)
    ref_model = None
    if args.ref_model:
        ref_model, _ = _load_model_and_tokenizer(args.ref_model, args.device)
    result = train_dpo(model, tokenizer, pairs, cfg, ref_model=ref_model, output_dir=out,
                       resume=args.resume is not None)
    if rank != 0:  # the first process reports for all
        return 0
    last = result.history[-1] if result.history else {}
    print(f"trained {len(result.history)} steps in {result.seconds:.1f} s; last loss {last.get('loss', float('nan')):.4f}, "
          f"reward accuracy {last.get('rewards/accuracies', float('nan')):.2f}")
    print(f"wrote the model (save_pretrained) and metrics.jsonl to {out}")
    return 0


def cmd_sft(args) -> int:
    out = prepare_output_dir(args.output_dir)
    from .data import load_preferences
    from .train import SFTConfig, sft_on_pairs

    pairs = load_preferences(args.data, split=args.split)
    model, tokenizer = _load_model_and_tokenizer(args.model, args.device)
    cfg = SFTConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                    seed=args.seed, device=args.device, show_progress=not args.quiet)
    losses = sft_on_pairs(model, tokenizer, pairs, cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "sft_losses.json").write_text(json.dumps(losses))
    print(f"Preferred-FT: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; wrote the model to {out}")
    return 0


def cmd_world(args) -> int:
    out = prepare_output_dir(args.output_dir)
    from . import experiment
    from .world import WorldConfig, save_pairs_jsonl

    world = experiment.build_world(WorldConfig(seed=args.seed), cache_dir=None, device=args.device,
                                   show_progress=not args.quiet)
    world.reference.save_pretrained(out / "reference")
    world.tokenizer.save_pretrained(out / "reference")
    save_pairs_jsonl(world.train_pairs, out / "train.jsonl")
    save_pairs_jsonl(world.heldout_pairs, out / "heldout.jsonl")
    print(f"wrote pi_ref to {out / 'reference'} and {len(world.train_pairs)} + {len(world.heldout_pairs)} pairs "
          f"to {out / 'train.jsonl'} and {out / 'heldout.jsonl'}")
    print(f"next: minidpo train --model {out / 'reference'} --data {out / 'train.jsonl'} --output-dir runs/dpo")
    return 0


# ---------------------------------------------------------------------------------------------------------
# minidpo grade
# ---------------------------------------------------------------------------------------------------------

def cmd_grade(args) -> int:
    """Grade exercise notebooks (files, or folders of them): a table each; exit 0 only if every exercise passed."""
    from . import grading

    paths = []
    for name in args.notebooks:
        path = Path(name)
        paths += sorted(path.glob("*.ipynb")) if path.is_dir() else [path]
    if not paths:
        raise UsageError(f"no .ipynb files in {', '.join(args.notebooks)}")
    try:
        for path in paths:  # check them all first: a typo fails at once, before minutes of grading
            grading._read(path)
    except ImportError as e:
        raise UsageError(f"minidpo grade needs nbformat and nbclient ({e.name} is missing): "
                         f"pip install -e '.[dev]'") from None
    rows, all_passed = [], True
    for path in paths:
        print(f"== {path}")
        try:
            results = grading.run_in_process(path) if args.in_process else grading.grade_notebook(path, args.timeout)
        except Exception as e:  # noqa: BLE001  (a kernel crash or a cell timeout fails this notebook only)
            print(f"   could not grade it: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            all_passed = False
            continue
        print(grading.format_table(results))
        all_passed &= all(r.passed for r in results)
        rows += [(str(path), r.number, r.title, r.passed, r.message) for r in results]
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["notebook", "exercise", "title", "passed", "hint"])
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0 if all_passed else 1


# ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minidpo", description="Direct Preference Optimization, small enough to read.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def common(p, quiet=True):
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        p.add_argument("--device", choices=DEVICES, default="auto", help="auto picks cuda, then mps, then cpu")
        if quiet:
            p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("demo", help="the whole story in ~30 s: world, SFT, pairs, DPO, evaluation, figures")
    p.add_argument("--output-dir", default="runs/demo", help="where metrics.json, the model and figures go")
    p.add_argument("--beta", type=_positive_float, default=0.1, help="DPO beta (default 0.1)")
    p.add_argument("--loss", choices=LOSSES, default="sigmoid", help="objective (default sigmoid = DPO)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--epochs", type=_positive_int, default=2, help="passes over the pairs (default 2)")
    p.add_argument("--cache-dir", default=".cache/minidpo", help="where the world and reference log-probs are kept")
    p.add_argument("--no-cache", action="store_true", help="build everything afresh, keep nothing")
    p.add_argument("--quick", action="store_true", help="a smaller world, for a smoke test in seconds")
    common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="DPO (or a variant) on any causal LM and any preference data")
    p.add_argument("--model", required=True, help="a Hub id (e.g. gpt2) or a save_pretrained folder")
    p.add_argument("--data", required=True, help="a .jsonl/.json/.csv/.parquet file, a save_to_disk folder, or a Hub id")
    p.add_argument("--split", default="train", help="split to use for folders and Hub ids (default train)")
    p.add_argument("--output-dir", required=True, help="where the model, metrics.jsonl and checkpoints go")
    p.add_argument("--ref-model", default=None, help="pi_ref, if not the starting --model")
    p.add_argument("--loss", choices=LOSSES, default="sigmoid", help="objective (default sigmoid = DPO)")
    p.add_argument("--beta", type=_positive_float, default=0.1, help="beta (default 0.1)")
    p.add_argument("--label-smoothing", type=_unit_interval, default=0.0, help="cDPO/robust label noise in [0, 0.5)")
    p.add_argument("--lr", type=_positive_float, default=5e-6, help="learning rate (default 5e-6)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="pairs per step (default 16)")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="stop after N steps")
    p.add_argument("--epochs", type=_positive_int, default=1, help="passes over the data (default 1)")
    p.add_argument("--max-length", type=_positive_int, default=512, help="prompt + completion tokens (default 512)")
    p.add_argument("--precompute-ref", action=argparse.BooleanOptionalAction, default=True,
                   help="compute reference log-probs once and hold no reference model (default on)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR (same as --output-dir)")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="Preferred-FT: supervised fine-tuning on the chosen completions")
    p.add_argument("--model", required=True, help="a Hub id or a save_pretrained folder")
    p.add_argument("--data", required=True, help="preference data (the chosen completions are the targets)")
    p.add_argument("--split", default="train")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--steps", type=_positive_int, default=200)
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--lr", type=_positive_float, default=1e-4)
    p.add_argument("--max-length", type=_positive_int, default=512)
    common(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("world", help="write the synthetic world: pi_ref (save_pretrained) and pairs as jsonl")
    p.add_argument("--output-dir", required=True)
    common(p)
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("grade", help="grade filled-in exercise notebooks: a row per exercise, exit 0 iff all pass")
    p.add_argument("notebooks", nargs="+", metavar="NOTEBOOK", help="exercise notebooks, or folders of them")
    p.add_argument("--timeout", type=_positive_int, default=300, help="seconds per cell (default 300)")
    p.add_argument("--in-process", action="store_true",
                   help="run the cells in this process instead of a fresh kernel (faster for many notebooks)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write one row per notebook and exercise")
    p.set_defaults(func=cmd_grade)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # a user's mistake, said in one line
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except Exception as e:  # noqa: BLE001
        from .train import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            sys.stderr.write(f"error: {e}\n")
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
