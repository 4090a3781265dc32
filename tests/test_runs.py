"""Runs that are never lost or mixed: kill -9, SIGTERM, a kill at any instant of a checkpoint save, two runs on
one folder, the run marker. The kills are real signals sent by the training process to itself at a chosen step,
so each test is deterministic."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minidpo.tokenizer import train_tokenizer
from minidpo.train import DPOConfig, train_dpo
from _fixtures import fresh_model, make_pairs

TESTS = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
       "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}

# A training process that signals itself at step AT (after that step's metrics row, before any later save).
WORKER = """
import os, sys
from minidpo.tokenizer import train_tokenizer
from minidpo.train import DPOConfig, train_dpo
from _fixtures import make_pairs
from test_runs import CONFIG, dropout_model
out, sig, at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pairs, corpus = make_pairs()
tok = train_tokenizer(corpus, model_max_length=64)
def signal_at(step, model):
    if step == at:
        os.kill(os.getpid(), sig)
    return {}
try:
    train_dpo(dropout_model(tok), tok, pairs, DPOConfig(**CONFIG), output_dir=out, log=lambda *_: None,
              callback=signal_at, callback_every=1)
except KeyboardInterrupt:
    sys.exit(130)
"""
CONFIG = dict(batch_size=8, lr=5e-3, max_steps=10, warmup_steps=2, cache_dir=None, show_progress=False,
              save_every=2, disable_dropout=False, device="cpu")


def dropout_model(tok, seed: int = 0):
    from minidpo.models import tiny_gpt2

    return tiny_gpt2(len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, seed=seed,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.1)


@pytest.fixture(scope="module")
def setup():
    pairs, corpus = make_pairs()
    return pairs, train_tokenizer(corpus, model_max_length=64)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    pairs, tok = setup
    return train_dpo(dropout_model(tok), tok, pairs, DPOConfig(**CONFIG), log=lambda *_: None)


def worker(out: Path, sig: int, at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WORKER, str(out), str(sig), str(at)], capture_output=True,
                          text=True, env=ENV, timeout=120, cwd=TESTS)


def steps_of(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_kill_9_then_resume_keeps_each_metrics_row_once_and_is_exact(setup, uninterrupted, tmp_path):
    pairs, tok = setup
    res = worker(tmp_path, signal.SIGKILL, 5)  # the checkpoint is at step 4; row 5 was written before the kill
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert steps_of(tmp_path) == [1, 2, 3, 4, 5]
    resumed = train_dpo(dropout_model(tok, seed=3), tok, pairs, DPOConfig(**CONFIG), output_dir=tmp_path,
                        resume=True, log=lambda *_: None)
    assert steps_of(tmp_path) == list(range(1, 11))  # step 5 is redone, and logged once
    assert_same_weights(uninterrupted.model, resumed.model)


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    res = worker(tmp_path, signal.SIGTERM, 5)
    assert res.returncode == 130, (res.returncode, res.stderr[-400:])  # our handler, not death by signal
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 5  # saved at the boundary after step 5
    assert json.loads((tmp_path / "minidpo_run.json").read_text())["state"] == "interrupted"


class _Killed(BaseException):
    """What a kill -9 does to the code after it: nothing runs (not an Exception, so no handler saves)."""


def test_a_kill_at_any_instant_of_a_checkpoint_save_leaves_a_run_that_resumes(setup, tmp_path, monkeypatch):
    pairs, tok = setup
    config = dict(CONFIG, max_steps=4, disable_dropout=True)
    full = train_dpo(fresh_model(tok), tok, pairs, DPOConfig(**config), log=lambda *_: None)
    names = ("replace", "rename", "unlink", "remove", "rmdir")
    originals = {name: getattr(os, name) for name in names}
    calls = {"n": 0, "kill_at": None}

    def counting(name):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["kill_at"]:
                raise _Killed(f"killed at {name} #{calls['n']}")
            return originals[name](*args, **kwargs)
        return call

    def arm(step, model):  # count the file operations from the end of step 3: the final save of step 4
        if step == 3:
            calls["n"] = 0
            for name in names:
                monkeypatch.setattr(os, name, counting(name))
        return {}

    def run(out, kill_at):
        calls.update(n=0, kill_at=kill_at)
        try:
            train_dpo(fresh_model(tok), tok, pairs, DPOConfig(**config), output_dir=out, log=lambda *_: None,
                      callback=arm, callback_every=1)
            return False
        except _Killed:
            return True
        finally:
            monkeypatch.undo()

    run(tmp_path / "count", None)
    n_ops = calls["n"]
    assert n_ops >= 4  # the save's renames and deletions were seen
    for kill_at in range(1, n_ops + 1):
        out = tmp_path / f"kill-{kill_at}"
        assert run(out, kill_at)
        resumed = train_dpo(fresh_model(tok, seed=9), tok, pairs, DPOConfig(**config), output_dir=out, resume=True,
                            log=lambda *_: None)
        assert steps_of(out) == [1, 2, 3, 4], kill_at
        assert_same_weights(full.model, resumed.model)


def test_the_marker_records_command_config_and_state(setup, tmp_path):
    pairs, tok = setup
    train_dpo(fresh_model(tok), tok, pairs, DPOConfig(**dict(CONFIG, max_steps=2)), output_dir=tmp_path,
              log=lambda *_: None)
    marker = json.loads((tmp_path / "minidpo_run.json").read_text())
    assert marker["state"] == "finished" and marker["step"] == 2 and marker["config"]["lr"] == CONFIG["lr"]


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(tmp_path, capsys):
    from test_cli import make_local

    local = make_local(tmp_path / "local")
    out = tmp_path / "run"
    args = ["train", "--model", local / "model", "--data", local / "pairs.jsonl", "--output-dir", out, "--lr",
            "5e-3", "--batch-size", "8", "--max-steps", "100000", "--quiet", "--device", "cpu"]
    first = subprocess.Popen([Path(sys.executable).parent / "minidpo", *map(str, args)], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0):
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()[-500:]
            time.sleep(0.2)
        from minidpo.cli import main

        capsys.readouterr()  # what building the local model printed
        second = [str(a) for a in args[:args.index("--max-steps")]] + ["--max-steps", "2", "--overwrite"]
        code = main(second)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and "in use by another minidpo run" in err, err
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
