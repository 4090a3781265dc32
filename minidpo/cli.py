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
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--bet 0.5` is a typo, not --beta
        super().__init__(*args, **kwargs)

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
        if not ok(value):  # also rejects NaN and inf
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    return parse


_positive_float = _number(float, lambda v: 0 < v < float("inf"), "> 0 and finite")
_positive_int = _number(int, lambda v: v >= 1, ">= 1")
_unit_interval = _number(float, lambda v: 0 <= v < 0.5, "in [0, 0.5)")
_whole = _number(int, lambda v: True, "")  # ranges are DPOConfig.validate's to check: one home for them
_real = _number(float, lambda v: True, "")


# ---------------------------------------------------------------------------------------------------------
# flags generated from the configs in train.py, so the CLI and the dataclasses cannot drift
# ---------------------------------------------------------------------------------------------------------

def config_fields(class_name: str) -> list[tuple[str, str, object, str]]:
    """(name, annotation, default, comment) of each field of ``train.<class_name>``, in order.

    Read from train.py's source with ``ast`` rather than imported: importing train.py loads torch (2 s before
    ``--help`` could answer). A default written ``field(default_factory=f)`` is ``runs.f()``.
    """
    import ast

    source = Path(__file__).with_name("train.py").read_text()
    lines = source.splitlines()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == class_name)
    fields = []
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            if isinstance(node.value, ast.Call):
                from . import runs

                factory = next(k.value.id for k in node.value.keywords if k.arg == "default_factory")
                default = getattr(runs, factory)()
            else:
                default = ast.literal_eval(node.value)
            comment = lines[node.lineno - 1].partition("  # ")[2].strip()
            fields.append((node.target.id, ast.unparse(node.annotation), default, comment))
    return fields


def add_config_flags(p, class_name: str, defaults: dict | None = None, names: dict | None = None,
                     choices: dict | None = None, skip=("show_progress",), suppress: bool = False) -> dict:
    """A flag per field of ``train.<class_name>``: ``--field-name``, its help the field's comment and its default.

    ``defaults`` / ``names`` / ``choices`` override per field; ``suppress``: no default is stored, so a command
    can tell the flags given from the defaults (``train --resume DIR`` keeps the saved ones). Returns the
    defaults, by field name.
    """
    resolved = {}
    for name, annotation, default, comment in config_fields(class_name):
        if name in skip:
            continue
        default = (defaults or {}).get(name, default)
        resolved[name] = default
        flag = "--" + (names or {}).get(name, name).replace("_", "-")
        shown = comment if default is None and "default" in comment else f"{comment} (default {default})"
        kwargs = {"dest": name, "help": shown.replace("%", "%%")}
        if not suppress:
            kwargs["default"] = default
        if annotation == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kind = {"int": _whole, "float": _real}.get(annotation.split("|")[0].strip(), str)
        metavar = "N" if kind is _whole else "F" if kind is _real else None
        p.add_argument(flag, type=kind, choices=(choices or {}).get(name), metavar=metavar, **kwargs)
    return resolved


def _config_flag(class_name: str, field_name: str, names: dict | None = None) -> str:
    return "--" + (names or {}).get(field_name, field_name).replace("_", "-")


def _build_config(cls, settings: dict, names: dict | None = None):
    """``cls(**settings)`` validated; a value out of range becomes the flag's one-line error."""
    from .train import ConfigError

    cfg = cls(**{f: settings[f] for f in cls.__dataclass_fields__ if f in settings})
    try:
        cfg.validate()
    except ConfigError as e:
        raise UsageError(f"argument {_config_flag(cls.__name__, e.field, names)}: must be {e.requirement}, "
                         f"got {e.value}") from None
    return cfg


def _figure(fig, out: Path, name: str) -> list[str]:
    """A figure into the run folder, and also into ``$MINIDPO_FIGURES`` when set (``make figures``): the tracked
    figures/ change only when asked."""
    from . import plots

    written = plots.save(fig, out / f"{name}.png")
    if os.environ.get(plots.FIGURES_ENV):
        written += plots.save_figure(fig, name)
    plots.plt.close(fig)  # a command may draw several; none is shown
    return written


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))  # under torchrun / accelerate launch: this process's number


# ---------------------------------------------------------------------------------------------------------
# minidpo demo
# ---------------------------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    t_start = time.perf_counter()
    from . import runs

    with runs.run_folder(args.output_dir, "demo", overwrite=args.overwrite,
                         info={"args": {k: v for k, v in vars(args).items() if k not in ("func", "overwrite")}}) as out:
        return _demo(args, out, t_start)


def _demo(args, out: Path, t_start: float) -> int:
    from . import experiment, plots
    from .train import DPOConfig, SFTConfig
    from .world import WorldConfig

    world_cfg, sft_cfg = WorldConfig(seed=args.seed), SFTConfig(seed=args.seed)
    if args.quick:  # a smaller world: seconds, for smoke tests
        world_cfg = WorldConfig(seed=args.seed, n_corpus=1500, n_train_prompts=256, n_heldout_prompts=64)
        sft_cfg = SFTConfig(seed=args.seed, steps=120)
    from .runs import default_cache_dir

    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    print(f"1/3 building the synthetic world (SFT of the tiny GPT-2 = pi_ref, pairs from pi_ref) ...")
    world = experiment.build_world(world_cfg, sft_cfg, cache_dir=cache, device=args.device,
                                   show_progress=not args.quiet)
    noise = world.label_noise
    print(f"    {len(world.train_pairs)} training pairs, {len(world.heldout_pairs)} held-out pairs; "
          f"label noise {noise['measured']:.1%} (expected {noise['expected']:.1%})")

    loss = LOSS_ALIASES.get(args.loss, args.loss)
    print(f"2/3 DPO (loss={loss}, beta={args.beta}) ...")
    cfg = DPOConfig(loss_type=loss, beta=args.beta, lr=args.lr, epochs=args.epochs, batch_size=16,
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
        "beta": args.beta, "loss": loss, "steps": len(result.history), "seconds": seconds,
        "train_seconds": result.seconds, "label_noise": noise["measured"], "seed": args.seed,
        "world": str(world.directory), "samples": {"reference": ref_eval["samples"][:4],
                                                    "policy": pol_eval["samples"][:4]},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    written = []
    figures = {
        "demo_training_curves": plots.plot_training_curves(result.history, title="DPO on the synthetic world"),
        "demo_displacement": plots.plot_displacement(result.history, args.beta),
        "demo_reward": plots.plot_reward_comparison(ref_eval["rewards"], pol_eval["rewards"]),
    }
    for name, fig in figures.items():
        written += _figure(fig, out, name)

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


# `minidpo train`'s defaults where they differ from DPOConfig's (which suit the course's tiny models): models
# from the Hub want GPT-2-sized learning rates and room for real texts.
TRAIN_DEFAULTS = {"lr": 5e-6, "max_length": 512}
TRAIN_NAMES = {"loss_type": "loss"}  # DPOConfig.loss_type is --loss
LOSS_ALIASES = {"dpo": "sigmoid"}  # the common name of DPO's sigmoid loss
TRAIN_RUN_FLAGS = {"split": "train", "ref_model": None, "eval_data": None}  # defaults of the non-config flags
SUMMARY_STEPS = 10  # the end summary averages the last N steps (one batch alone is noisy)


def _train_settings(args) -> tuple[dict, bool, bool]:
    """(every setting of the run, resume?, overwrite?): the defaults, then a resumed run's saved command line,
    then the flags given now (a resume may, e.g., raise --max-steps)."""
    from . import runs

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    resume_dir, overwrite, quiet = given.pop("resume", None), given.pop("overwrite", False), given.pop("quiet", False)
    saved = {}
    if resume_dir is not None:
        if "output_dir" in given and Path(given["output_dir"]).resolve() != Path(resume_dir).resolve():
            raise UsageError("--resume must name the same folder as --output-dir (or give --resume DIR alone)")
        if overwrite:
            raise UsageError("--resume continues a run and --overwrite replaces it: give one of them")
        saved = runs.check_output_dir(resume_dir, "train", resume=True).get("args") or {}
        given["output_dir"] = str(resume_dir)
    defaults = {name: TRAIN_DEFAULTS.get(name, default) for name, _, default, _ in config_fields("DPOConfig")}
    settings = {**defaults, **TRAIN_RUN_FLAGS, **saved, **given, "show_progress": not quiet}
    missing = [f"--{f.replace('_', '-')}" for f in ("model", "data", "output_dir") if not settings.get(f)]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)} "
                         "(or --resume DIR alone, to continue a run)")
    settings["loss_type"] = LOSS_ALIASES.get(settings["loss_type"], settings["loss_type"])
    if settings.get("cache_dir") == "":
        settings["cache_dir"] = None
    return settings, resume_dir is not None, overwrite


def cmd_train(args) -> int:
    import contextlib

    from . import runs

    settings, resume, overwrite = _train_settings(args)
    from .train import DPOConfig

    cfg = _build_config(DPOConfig, settings, TRAIN_NAMES)  # every number checked before any work
    out = Path(settings["output_dir"])
    saved = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items() if k != "show_progress"}
    inputs = {"--model": settings["model"], "--ref-model": settings["ref_model"], "--data": settings["data"],
              "--eval-data": settings["eval_data"]}
    folder = (runs.run_folder(out, "train", resume=resume, overwrite=overwrite, inputs=inputs,
                              info=None if resume else {"args": saved})
              if _rank() == 0 else contextlib.nullcontext(out))
    with folder:
        return _train(settings, cfg, out, resume)


def _train(settings: dict, cfg, out: Path, resume: bool) -> int:
    from . import runs
    from .data import load_preferences
    from .train import summarize, train_dpo

    if cfg.loss_type == "simpo" and cfg.beta == 0.1:
        print("note: SimPO's paper uses beta around 2.0; pass --beta to change it")
    pairs = load_preferences(settings["data"], split=settings["split"])
    eval_pairs = load_preferences(settings["eval_data"], split=settings["split"]) if settings["eval_data"] else None
    if "LOCAL_RANK" in os.environ:  # one GPU per process: "cuda" below then means this process's GPU
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    model, tokenizer = _load_model_and_tokenizer(settings["model"], cfg.device)
    ref_model = _load_model_and_tokenizer(settings["ref_model"], cfg.device)[0] if settings["ref_model"] else None
    held_out = _heldout_reference(ref_model or model, tokenizer, eval_pairs, cfg) if eval_pairs else None
    result = train_dpo(model, tokenizer, pairs, cfg, ref_model=ref_model, output_dir=out, resume=resume)
    if _rank() != 0:  # the first process reports for all
        return 0

    rows = runs.read_metrics(out / "metrics.jsonl")  # the whole run, from before a resume too
    if not result.history:
        print(f"the run in {out} had already finished at step {rows[-1]['step'] if rows else 0}; nothing to "
              "train (raise --max-steps to go further)")
    else:
        print(f"trained {len(result.history)} steps (to step {result.history[-1]['step']}) in {result.seconds:.1f} s")
    if rows:
        tail = summarize(rows, last=SUMMARY_STEPS)
        print(f"over the last {min(SUMMARY_STEPS, len(rows))} steps: loss {tail['loss']:.4f}, reward accuracy "
              f"{tail['rewards/accuracies']:.2f}, reward margin {tail['rewards/margins']:+.3f}")
        from . import plots

        _figure(plots.plot_training_curves(rows, title=f"{cfg.loss_type} on {Path(settings['data']).name}"),
                out, "training_curves")
    if held_out is not None:
        report = _heldout_accuracy(result.model, tokenizer, held_out, cfg)
        (out / "eval.json").write_text(json.dumps(report, indent=2))
        print(f"held-out implicit-reward accuracy: {report['heldout_accuracy']:.3f} ± "
              f"{report['heldout_accuracy_se']:.3f} on {report['n_pairs']} pairs (0.5 = the reference)")
    print(f"wrote the model (save_pretrained), metrics.jsonl and training_curves.png to {out}")
    return 0


def _heldout_reference(reference, tokenizer, pairs, cfg) -> tuple[list[dict], dict]:
    """The held-out pairs tokenized as in training, and pi_ref's log-probs on them (before any update)."""
    from .data import tokenize_preferences
    from .evaluate import pair_logps
    from .train import fit_max_length

    max_length = fit_max_length(reference, cfg.max_length, log=lambda *_: None)
    features, _ = tokenize_preferences(pairs, tokenizer, max_length=max_length)
    return features, pair_logps(reference, features, batch_size=cfg.batch_size, pad_token_id=tokenizer.pad_token_id)


def _heldout_accuracy(policy, tokenizer, held_out, cfg) -> dict:
    from .evaluate import implicit_reward_accuracy

    features, ref_logps = held_out
    accuracy = implicit_reward_accuracy(policy, ref_logps, features, beta=cfg.beta, batch_size=cfg.batch_size,
                                        pad_token_id=tokenizer.pad_token_id)
    se = (accuracy * (1 - accuracy) / len(features)) ** 0.5  # binomial standard error
    return {"heldout_accuracy": accuracy, "heldout_accuracy_se": se, "n_pairs": len(features)}


SFT_DEFAULTS = {"steps": 200, "batch_size": 16, "lr": 1e-4, "max_length": 512}  # for models from the Hub


def cmd_sft(args) -> int:
    from . import runs

    from .train import SFTConfig

    settings = {**vars(args), "show_progress": not args.quiet}
    cfg = _build_config(SFTConfig, settings)
    with runs.run_folder(args.output_dir, "sft", overwrite=args.overwrite,
                         inputs={"--model": args.model, "--data": args.data},
                         info={"args": {k: v for k, v in settings.items() if k not in ("func", "overwrite")}}) as out:
        from .data import load_preferences
        from .train import sft_on_pairs

        pairs = load_preferences(args.data, split=args.split)
        model, tokenizer = _load_model_and_tokenizer(args.model, args.device)
        losses = sft_on_pairs(model, tokenizer, pairs, cfg)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "sft_losses.json").write_text(json.dumps(losses))
    print(f"Preferred-FT: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; wrote the model to {out}")
    return 0


def cmd_world(args) -> int:
    from . import runs

    with runs.run_folder(args.output_dir, "world", overwrite=args.overwrite,
                         info={"args": {k: v for k, v in vars(args).items() if k not in ("func", "overwrite")}}) as out:
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
    # the world's tiny GPT-2 needs the demo's rate (1e-3): at train's default (5e-6, for Hub models) it learns nothing
    print(f"next: minidpo train --model {out / 'reference'} --data {out / 'train.jsonl'} "
          f"--eval-data {out / 'heldout.jsonl'} --lr 1e-3 --epochs 2 --output-dir runs/dpo")
    print(f"then: minidpo eval --model runs/dpo --world {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# minidpo eval / sample: a policy on the synthetic world, without code
# ---------------------------------------------------------------------------------------------------------

def _world_for_eval(args):
    """(pi_ref, held-out prompts, held-out pairs): from a `minidpo world` folder, or the demo's world."""
    if args.world:
        from .data import load_preferences

        world_dir = Path(args.world)
        if not (world_dir / "reference").is_dir() or not (world_dir / "heldout.jsonl").is_file():
            raise UsageError(f"--world {world_dir}: not a folder written by `minidpo world` (no reference/ and "
                             "heldout.jsonl)")
        reference, _ = _load_model_and_tokenizer(str(world_dir / "reference"), args.device)
        pairs = load_preferences(str(world_dir / "heldout.jsonl"))
        return reference, list(dict.fromkeys(pairs["prompt"])), pairs
    from . import experiment
    from .runs import default_cache_dir
    from .world import WorldConfig

    world = experiment.build_world(WorldConfig(seed=args.world_seed), cache_dir=default_cache_dir(),
                                   device=args.device, show_progress=False, log=lambda *_: None)
    return world.reference, world.heldout_prompts, world.heldout_pairs


def cmd_eval(args) -> int:
    from .evaluate import evaluate_policy

    policy, tokenizer = _load_model_and_tokenizer(args.model, args.device)
    reference, prompts, pairs = _world_for_eval(args)
    if reference.config.vocab_size != policy.config.vocab_size:
        raise UsageError(f"--model {args.model} has a vocabulary of {policy.config.vocab_size}, the world's pi_ref "
                         f"{reference.config.vocab_size}: it was not trained from this world's pi_ref")
    res = evaluate_policy(policy, reference, tokenizer, prompts, pairs, beta=args.beta, n_samples=args.samples,
                          seed=args.seed)
    acc_se = (res["accuracy"] * (1 - res["accuracy"]) / len(pairs)) ** 0.5
    report = {"reward": res["reward"], "reward_se": res["reward_se"], "kl": res["kl"], "kl_se": res["kl_se"],
              "accuracy": res["accuracy"], "accuracy_se": acc_se, "n_samples": res["n"], "n_pairs": len(pairs),
              "samples": res["samples"]}
    print(f"{args.model} on {len(prompts)} held-out prompts ({args.samples} samples each, seed {args.seed}):")
    print(f"  true reward        {res['reward']:+.3f} ± {res['reward_se']:.3f}")
    print(f"  KL(pi || pi_ref)   {res['kl']:.3f} ± {res['kl_se']:.3f} nats")
    print(f"  implicit accuracy  {res['accuracy']:.3f} ± {acc_se:.3f} on {len(pairs)} held-out pairs")
    for s in res["samples"][:3]:
        print(f"    {s}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_sample(args) -> int:
    from .world import WorldConfig, make_prompts, sample_completions

    model, tokenizer = _load_model_and_tokenizer(args.model, args.device)
    prompts = args.prompts or make_prompts(WorldConfig(seed=args.seed))[1][:args.n_prompts]
    completions = sample_completions(model, tokenizer, list(prompts), k=args.n, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, seed=args.seed)
    for prompt, samples in zip(prompts, completions):
        print(prompt)
        for text in samples:
            print(f"    -> {text}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# minidpo online: RLOO or online DPO on the synthetic world (notebook 08)
# ---------------------------------------------------------------------------------------------------------

ONLINE_FLAGS = ("method", "reward", "beta", "k", "prompts_per_step", "steps", "lr", "save_every", "seed", "device")


def cmd_online(args) -> int:
    from . import runs

    settings = {k: getattr(args, k) for k in ONLINE_FLAGS}
    if args.resume:  # continue with the settings the run was started with
        settings.update((runs.check_output_dir(args.output_dir, "online", resume=True) or {}).get("args") or {})
    with runs.run_folder(args.output_dir, "online", resume=args.resume, overwrite=args.overwrite,
                         info=None if args.resume else {"args": settings}) as out:
        from . import evaluate as ev
        from . import experiment
        from .online import OnlineConfig, run_online
        from .world import gold_reward

        cfg = OnlineConfig(**{k: v for k, v in settings.items() if k != "reward"})
        cfg.validate()  # a bad value is one error: line before any work
        world = experiment.build_world(cache_dir=runs.default_cache_dir(), device=cfg.device, show_progress=False,
                                       log=lambda *_: None)
        reward_fn = None
        if settings["reward"] == "learned":  # a bag-of-words Bradley-Terry model fit on the world's pairs
            from .reward_model import fit_reward_model

            reward_fn = fit_reward_model(world.train_pairs)
        result = run_online(world, cfg, reward_fn=reward_fn, output_dir=out, resume=args.resume)
        e = experiment.evaluate(world, result.model, beta=cfg.beta, n_samples=1)
        report = {k: e[k] for k in ("reward", "reward_se", "kl", "kl_se", "grammatical", "length")}
        report["gold"] = ev.mean_reward(e["completions"], gold_reward)[0]
        report["budget"] = result.budget
        (out / "eval.json").write_text(json.dumps(report, indent=2))
    print(f"{cfg.method} ({settings['reward']} reward), {len(result.history)} steps in {result.seconds:.1f} s; "
          f"held-out: reward {report['reward']:+.2f} ± {report['reward_se']:.2f}, KL {report['kl']:.2f}, "
          f"{report['grammatical']:.0%} grammatical, gold reward {report['gold']:+.2f}")
    print(f"wrote the model, metrics.jsonl, a checkpoint and eval.json to {out}")
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
    rows, all_passed, complete = [], True, 0
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
        complete += all(r.passed for r in results)
        rows += [(str(path), r.number, r.title, r.passed, r.message) for r in results]
    if len(paths) > 1:
        print(f"== {complete}/{len(paths)} notebooks with every exercise passed")
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
        p.add_argument("--seed", type=_whole, default=0, help="random seed (default 0)")
        p.add_argument("--device", choices=DEVICES, default="auto",
                       help="auto picks cuda, then mps, then cpu (default auto)")
        if quiet:
            p.add_argument("--quiet", action="store_true", help="no progress bars (default off)")

    def overwrite(p):
        p.add_argument("--overwrite", action="store_true",
                       help="clear --output-dir first when it holds an earlier minidpo run (default: refuse)")

    p = sub.add_parser("demo", help="the whole story in ~30 s: world, SFT, pairs, DPO, evaluation, figures")
    p.add_argument("--output-dir", default="runs/demo",
                   help="where metrics.json, the model and the figures go (default runs/demo)")
    p.add_argument("--beta", type=_positive_float, default=0.1, help="DPO beta (default 0.1)")
    p.add_argument("--loss", choices=LOSSES + tuple(LOSS_ALIASES), default="sigmoid",
                   help="objective; dpo = sigmoid (default sigmoid)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--epochs", type=_positive_int, default=2, help="passes over the pairs (default 2)")
    p.add_argument("--cache-dir", default=None,
                   help="where the world and reference log-probs are kept (default $MINIDPO_CACHE_DIR or "
                        ".cache/minidpo)")
    p.add_argument("--no-cache", action="store_true", help="build everything afresh, keep nothing (default off)")
    p.add_argument("--quick", action="store_true", help="a smaller world, for a smoke test in seconds (default off)")
    overwrite(p)
    common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", argument_default=argparse.SUPPRESS,
                       help="DPO (or a variant) on any causal LM and any preference data",
                       description="DPO (or a variant). `minidpo train --resume DIR` alone continues a run with its "
                                   "saved settings; flags given with it override them (e.g. a larger --max-steps).")
    p.add_argument("--model", help="a Hub id (e.g. gpt2) or a save_pretrained folder (required)")
    p.add_argument("--data", help="a .jsonl/.json/.csv/.parquet file, a save_to_disk folder, or a Hub id (required)")
    p.add_argument("--output-dir", help="where the model, metrics.jsonl, checkpoints and the curves go (required)")
    p.add_argument("--split", help="split to use for folders and Hub ids (default train)")
    p.add_argument("--ref-model", help="pi_ref, if not the starting --model (default: the starting --model)")
    p.add_argument("--eval-data", help="held-out pairs: implicit-reward accuracy after training, in eval.json "
                                       "(default none)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint (default: a new run)")
    overwrite(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars (default off)")
    add_config_flags(p, "DPOConfig", defaults=TRAIN_DEFAULTS, names=TRAIN_NAMES, suppress=True,
                     choices={"loss_type": LOSSES + tuple(LOSS_ALIASES), "device": DEVICES,
                              "precision": ("auto", "fp32", "bf16", "fp16")})
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="Preferred-FT: supervised fine-tuning on the chosen completions")
    p.add_argument("--model", required=True, help="a Hub id or a save_pretrained folder (required)")
    p.add_argument("--data", required=True, help="preference data; the chosen completions are the targets (required)")
    p.add_argument("--split", default="train", help="split to use for folders and Hub ids (default train)")
    p.add_argument("--output-dir", required=True, help="where the model and sft_losses.json go (required)")
    overwrite(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars (default off)")
    add_config_flags(p, "SFTConfig", defaults=SFT_DEFAULTS, choices={"device": DEVICES})
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("world", help="write the synthetic world: pi_ref (save_pretrained) and pairs as jsonl")
    p.add_argument("--output-dir", required=True, help="where reference/, train.jsonl and heldout.jsonl go (required)")
    overwrite(p)
    common(p)
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("eval", help="true reward, KL(pi||pi_ref) and implicit accuracy of a policy on the world")
    p.add_argument("--model", required=True, help="the policy: a save_pretrained folder (required)")
    p.add_argument("--world", default=None,
                   help="a `minidpo world` folder (default: the demo's world, built or read from the cache)")
    p.add_argument("--world-seed", type=_whole, default=0, help="seed of the default world (default 0)")
    p.add_argument("--beta", type=_positive_float, default=0.1,
                   help="beta of the implicit reward; the accuracy does not depend on it (default 0.1)")
    p.add_argument("--samples", type=_positive_int, default=2, help="samples per held-out prompt (default 2)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers to FILE (default none)")
    common(p, quiet=False)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="completions from a policy")
    p.add_argument("--model", required=True, help="a save_pretrained folder or a Hub id (required)")
    p.add_argument("--prompts", nargs="+", default=None, help="prompts (default: held-out prompts of the world)")
    p.add_argument("--n-prompts", type=_positive_int, default=5, help="how many default prompts (default 5)")
    p.add_argument("--n", type=_positive_int, default=2, help="completions per prompt (default 2)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=24, help="tokens per completion (default 24)")
    p.add_argument("--temperature", type=_number(float, lambda v: 0 <= v < float("inf"), ">= 0 and finite"),
                   default=1.0, help="sampling temperature; 0 is greedy (default 1.0)")
    common(p, quiet=False)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("online", help="RLOO or online DPO on the synthetic world: the policy samples as it trains")
    p.add_argument("--method", choices=("rloo", "online-dpo"), default="rloo", help="the method (default rloo)")
    p.add_argument("--reward", choices=("true", "learned"), default="true",
                   help="RLOO's reward / online DPO's labeller: the world's reward, or a reward model fit on its "
                        "pairs (default true)")
    p.add_argument("--output-dir", required=True, help="where the model, metrics.jsonl, checkpoint and eval.json go")
    p.add_argument("--beta", type=_positive_float, default=0.1, help="KL strength (default 0.1)")
    p.add_argument("--k", type=_positive_int, default=4, help="RLOO: samples per prompt, >= 2 (default 4)")
    p.add_argument("--prompts-per-step", type=_positive_int, default=16, help="prompts per step (default 16)")
    p.add_argument("--steps", type=_positive_int, default=60, help="optimizer steps (default 60)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--save-every", type=_whole, default=0, help="checkpoint every N steps (default 0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir with its saved settings")
    overwrite(p)
    common(p, quiet=False)
    p.set_defaults(func=cmd_online)

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
    if getattr(args, "quiet", False):  # --quiet: no bars from datasets either ("Creating json from Arrow format")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
    try:
        return args.func(args)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the checkpoint was saved at a step boundary
        import signal

        signum = getattr(e, "signum", signal.SIGINT)
        sys.stderr.write(f"error: interrupted ({signal.Signals(signum).name})\n")
        return 128 + signum
    except (ValueError, FileNotFoundError) as e:  # a user's mistake, said in one line
        sys.stderr.write(f"error: {e}\n")
        return 2
    except OSError as e:  # a folder that cannot be written, a disk that is full: one line, no traceback
        where = f"{e.filename}: " if e.filename else ""
        sys.stderr.write(f"error: {where}{e.strerror or e}\n")
        return 2
    except Exception as e:  # noqa: BLE001
        from .train import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            sys.stderr.write(f"error: {e}\n")
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
