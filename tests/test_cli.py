"""The command line: the demo, `train` on a local model folder and a local jsonl, and every user mistake."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from minidpo.cli import main
from minidpo.models import tiny_gpt2
from minidpo.tokenizer import train_tokenizer

from _fixtures import make_pairs

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A save_pretrained model folder and a jsonl of pairs: the real `--model`/`--data` path, small."""
    return make_local(tmp_path_factory.mktemp("local"))


def make_local(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pairs, corpus = make_pairs(n=48)
    tok = train_tokenizer(corpus, model_max_length=64)
    model = tiny_gpt2(len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    pairs.to_json(root / "pairs.jsonl")
    return root


def run(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def train_args(local, out, *extra):
    return ["train", "--model", local / "model", "--data", local / "pairs.jsonl", "--output-dir", out,
            "--lr", "5e-3", "--batch-size", "8", "--max-steps", "4", "--quiet", *extra]


def test_train_writes_a_loadable_model_and_metrics(local, tmp_path, capsys):
    code, out, err = run(train_args(local, tmp_path / "run"), capsys)
    assert code == 0, err
    assert "wrote the model" in out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "rewards/margins" in rows[0]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    start = AutoModelForCausalLM.from_pretrained(local / "model")
    moved = sum((a - b).abs().sum().item() for a, b in zip(trained.parameters(), start.parameters()))
    assert moved > 0  # the saved weights are the trained ones, not the start


def test_train_resume_continues_the_run(local, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(local, out), capsys)[0] == 0
    code, _, err = run(train_args(local, out, "--resume", out, "--max-steps", "6"), capsys)
    assert code == 0, err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a, l, t: a + ["--beta", "0"], "argument --beta: must be > 0, got 0"),
        (lambda a, l, t: a + ["--label-smoothing", "0.7"], r"must be in \[0, 0.5\), got 0.7"),
        (lambda a, l, t: a + ["--loss", "dpoo"], "argument --loss: invalid choice: 'dpoo'"),
        (lambda a, l, t: [x if x != l / "model" else t / "missing" for x in a], "missing"),
        (lambda a, l, t: [x if x != l / "pairs.jsonl" else t / "nope.jsonl" for x in a], "nope.jsonl"),
        (lambda a, l, t: a + ["--batch-size", "500"], "batch_size 500 is larger than the 48 usable pairs"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(local, tmp_path, capsys, mutate, message):
    args = mutate(train_args(local, tmp_path / "run"), local, tmp_path)
    code, _, err = run(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert __import__("re").search(message, lines[0]), lines[0]


def test_bad_data_row_is_named(local, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "a", "chosen": null, "rejected": " c"}\n')
    args = train_args(local, tmp_path / "run")
    args[args.index("--data") + 1] = bad
    code, _, err = run(args, capsys)
    assert code == 2 and err.startswith("error:") and "bad.jsonl, row 2, column 'chosen'" in err


def test_refuses_a_foreign_non_empty_output_dir(local, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    code, _, err = run(train_args(local, foreign), capsys)
    assert code == 2 and "is not empty and is not a minidpo run folder" in err
    assert (foreign / "thesis.tex").read_text() == "precious" and len(list(foreign.iterdir())) == 1


def test_entry_point_has_help_for_every_command_and_no_traceback():
    exe = Path(sys.executable).parent / "minidpo"
    for cmd in ([], ["demo"], ["train"], ["sft"], ["world"]):
        res = subprocess.run([exe, *cmd, "--help"], capture_output=True, text=True, env=ENV, timeout=60)
        assert res.returncode == 0 and "--seed" in res.stdout or cmd == [], (cmd, res.stderr)
    res = subprocess.run([exe, "train", "--model", "nowhere", "--data", "x.jsonl", "--output-dir", "/tmp/minidpo-x"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error:") and "Traceback" not in res.stderr


def test_quick_demo_writes_metrics_and_figures(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "figures").mkdir()  # like the repository's tracked figures/: the demo must leave it alone
    monkeypatch.setenv("MINIDPO_FIGURES", str(tmp_path / "make-figures"))  # what `make figures` sets
    code, out, err = run(["demo", "--quick", "--quiet", "--output-dir", tmp_path / "demo",
                          "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    for key in ["reference", "policy", "heldout_accuracy", "beta", "steps", "seconds"]:
        assert key in m
    assert m["reference"]["kl"] == 0.0 and m["policy"]["kl"] > 0
    # DPO moved the policy towards the known reward, by more than two standard errors
    gap = m["policy"]["reward"] - m["reference"]["reward"]
    assert gap > 2 * (m["policy"]["reward_se"] ** 2 + m["reference"]["reward_se"] ** 2) ** 0.5, m
    assert m["heldout_accuracy"] > 0.55
    for name in ["demo_training_curves.png", "demo_displacement.png", "demo_reward.png"]:
        assert (tmp_path / "demo" / name).stat().st_size > 10_000
        assert (tmp_path / "make-figures" / name).stat().st_size > 10_000
    assert list((tmp_path / "figures").iterdir()) == []
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "policy") is not None


# ------------------------------------------------------------------------------ issue 12: never lose a run

def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "inf", "argument --lr: must be a finite number, got inf"),
    ("--lr", "nan", "argument --lr: must be a finite number, got nan"),
    ("--beta", "inf", "argument --beta: must be a finite number, got inf"),
    ("--save-every", "-1", "argument --save-every: must be >= 0, got -1"),
    ("--warmup-steps", "-3", "argument --warmup-steps: must be >= 0, got -3"),
])
def test_every_number_is_checked_before_any_work(local, tmp_path, capsys, flag, value, message):
    code, _, err = run(train_args(local, tmp_path / "run", flag, value), capsys)
    assert code == 2 and message in one_error_line(err)
    assert not (tmp_path / "run").exists()  # nothing was started, so nothing is left behind


def test_a_failed_command_leaves_no_folder_behind(local, tmp_path, capsys):
    args = train_args(local, tmp_path / "run")
    args[args.index("--data") + 1] = tmp_path / "missing.jsonl"
    code, _, err = run(args, capsys)
    assert code == 2 and "missing.jsonl" in one_error_line(err) and not (tmp_path / "run").exists()


def test_a_finished_run_is_refused_unless_overwrite(local, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(local, out), capsys)[0] == 0
    marker = json.loads((out / "minidpo_run.json").read_text())
    assert marker["state"] == "finished" and marker["command"] == "train" and marker["config"]["lr"] == 5e-3
    code, _, err = run(train_args(local, out, "--lr", "1e-2"), capsys)
    assert code == 2 and "holds a finished `train` run" in one_error_line(err) and "--overwrite" in err
    code, _, err = run(train_args(local, out, "--lr", "1e-2", "--max-steps", "2", "--overwrite"), capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # the new run only, nothing of the old one
    saved = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert saved["step"] == 2 and saved["config"]["lr"] == 1e-2


def test_output_dir_that_is_the_model_folder_is_refused(local, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(local / "model", model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    args = train_args(local, model)
    args[args.index("--model") + 1] = model
    code, _, err = run(args, capsys)
    assert code == 2 and "is, or holds, the --model folder" in one_error_line(err)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_sft_into_a_dpo_run_folder_is_refused_and_overwrite_clears_it(local, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(local, out), capsys)[0] == 0
    sft = ["sft", "--model", local / "model", "--data", local / "pairs.jsonl", "--output-dir", out, "--steps", "2",
           "--batch-size", "4", "--quiet"]
    code, _, err = run(sft, capsys)
    assert code == 2 and "holds a finished `train` run" in one_error_line(err)
    code, _, err = run(sft + ["--overwrite"], capsys)
    assert code == 0, err
    left = {p.name for p in out.iterdir()}
    assert not left & {"checkpoint", "metrics.jsonl", "ref_logps.pt"} and "sft_losses.json" in left


@pytest.mark.parametrize("damaged", ["checkpoint/trainer_state.pt", "checkpoint/model.safetensors", "ref_logps.pt"])
def test_a_damaged_checkpoint_file_is_one_error_line(local, tmp_path, capsys, damaged):
    out = tmp_path / "run"
    assert run(train_args(local, out), capsys)[0] == 0
    path = out / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated: a full disk, a killed copy
    code, _, err = run(["train", "--resume", out, "--max-steps", "6", "--quiet"], capsys)
    assert code == 2 and Path(damaged).name in one_error_line(err), err


def test_unwritable_places_are_one_line_or_a_note(local, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run(train_args(local, blocker / "run"), capsys)
    assert code == 2 and "a-file" in one_error_line(err)
    # the reference cache is optional: a working folder where .cache cannot be made costs the cache, not the run
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".cache").write_text("in the way")
    monkeypatch.delenv("MINIDPO_CACHE_DIR", raising=False)
    code, out, err = run(train_args(local, tmp_path / "run"), capsys)
    assert code == 0 and "cannot write the reference cache" in out, err


def test_cache_dir_flag_and_environment_variable(local, tmp_path, capsys, monkeypatch):
    assert run(train_args(local, tmp_path / "a", "--cache-dir", tmp_path / "flag"), capsys)[0] == 0
    assert len(list((tmp_path / "flag").glob("ref-logps-*.pt"))) == 1
    monkeypatch.setenv("MINIDPO_CACHE_DIR", str(tmp_path / "env"))
    assert run(train_args(local, tmp_path / "b"), capsys)[0] == 0
    assert len(list((tmp_path / "env").glob("ref-logps-*.pt"))) == 1


def test_max_length_is_capped_at_the_models_positions(local, tmp_path, capsys):
    long = " ".join(["the movie was great and the plot was fun"] * 12)  # far more than the model's 64 positions
    rows = [{"prompt": "the film", "chosen": " " + long, "rejected": " it was bad"}] * 16
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = train_args(local, tmp_path / "run", "--max-steps", "2")
    args[args.index("--data") + 1] = data
    code, out, err = run(args, capsys)  # --max-length is 512 by default
    assert code == 0, err
    assert "max_length 512 is more than the model's 64 positions; using 64" in out


def test_resume_dir_alone_continues_with_the_saved_settings(local, tmp_path, capsys):
    out = tmp_path / "run"
    code, text, err = run(train_args(local, out, "--eval-data", local / "pairs.jsonl"), capsys)
    assert code == 0, err
    assert "over the last 4 steps: loss" in text and "held-out implicit-reward accuracy" in text
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert 0 <= json.loads((out / "eval.json").read_text())["heldout_accuracy"] <= 1
    code, text, err = run(["train", "--resume", out, "--max-steps", "6"], capsys)  # no --model, --data, --lr
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and "over the last 6 steps" in text
    saved = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert saved["config"]["lr"] == 5e-3 and saved["config"]["batch_size"] == 8  # the saved settings were used
    code, text, err = run(["train", "--resume", out], capsys)
    assert code == 0 and "had already finished at step 6" in text and "nan" not in text, text + err


def test_every_flag_has_help_and_train_flags_come_from_dpoconfig():
    import dataclasses

    from minidpo.cli import TRAIN_DEFAULTS, build_parser
    from minidpo.train import DPOConfig

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("demo", "train", "sft", "world", "eval", "sample"):
        for action in commands[name]._actions:
            if action.dest != "help" and action.option_strings:
                assert action.help and ("default" in action.help or "(required)" in action.help), (name, action.dest)
    train = {a.dest: a for a in commands["train"]._actions}
    for f in dataclasses.fields(DPOConfig):
        if f.name == "show_progress":
            continue  # --quiet
        assert f.name in train, f.name
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"(default {TRAIN_DEFAULTS.get(f.name, default)})" in train[f.name].help or default is None, f.name
    assert {"--simpo-gamma", "--rpo-alpha", "--warmup-steps", "--disable-dropout"} <= set(
        s for a in commands["train"]._actions for s in a.option_strings)


def test_abbreviations_are_refused_and_dpo_is_the_sigmoid_loss(local, tmp_path, capsys):
    code, _, err = run(train_args(local, tmp_path / "a", "--bet", "0.5"), capsys)
    assert code == 2 and "--bet" in one_error_line(err)
    code, _, err = run(train_args(local, tmp_path / "b", "--loss", "dpo"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "minidpo_run.json").read_text())["config"]["loss_type"] == "sigmoid"


def test_make_lab_runs_as_root():
    res = subprocess.run(["make", "-n", "lab"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    line = [x for x in res.stdout.splitlines() if "jupyter lab" in x][-1]
    assert "--allow-root" in line  # the recipe adds it when `id -u` is 0 (Jupyter refuses root otherwise)


def test_world_hint_then_eval_and_sample_without_code(local, tmp_path, capsys, monkeypatch):
    """`minidpo world` (a tiny stand-in world), the `next:` command it prints, then `eval` and `sample`."""
    import shlex

    from minidpo import experiment
    from minidpo.data import load_preferences
    from minidpo.models import load_causal_lm
    from minidpo.tokenizer import load_tokenizer
    from minidpo.world import WorldConfig

    pairs = load_preferences(str(local / "pairs.jsonl"))
    tiny = experiment.World(load_tokenizer(local / "model"), load_causal_lm(local / "model"), pairs,
                            pairs.select(range(16)), list(pairs["prompt"][:8]), WorldConfig(), tmp_path)
    monkeypatch.setattr(experiment, "build_world", lambda *a, **k: tiny)
    code, text, err = run(["world", "--output-dir", tmp_path / "world", "--quiet"], capsys)
    assert code == 0, err
    hint = shlex.split(next(x for x in text.splitlines() if x.startswith("next: ")).removeprefix("next: "))
    assert float(hint[hint.index("--lr") + 1]) >= 1e-3  # at train's default 5e-6 the world's GPT-2 learns nothing
    hint[hint.index("--output-dir") + 1] = str(tmp_path / "dpo")
    code, _, err = run(hint[1:] + ["--max-steps", "3", "--batch-size", "8", "--quiet"], capsys)
    assert code == 0, err
    code, text, err = run(["eval", "--model", tmp_path / "dpo", "--world", tmp_path / "world", "--json",
                           tmp_path / "eval.json"], capsys)
    assert code == 0, err
    assert "true reward" in text and "KL(pi || pi_ref)" in text and "implicit accuracy" in text and "±" in text
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["kl_se"] >= 0 and report["accuracy_se"] > 0 and report["n_pairs"] == 16
    code, text, err = run(["sample", "--model", tmp_path / "dpo", "--prompts", "the movie was", "--n", "2"], capsys)
    assert code == 0 and text.count("    -> ") == 2, err
