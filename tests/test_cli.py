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
    monkeypatch.chdir(tmp_path)  # no figures/ folder here: the repository's figures stay untouched
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
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "policy") is not None
