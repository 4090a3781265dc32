"""Data-parallel training: two CPU processes under torchrun (gloo) give the numbers of one process.

The worker (tests/_ddp_worker.py) calls train_dpo as a one-process script would; torchrun's WORLD_SIZE makes
train_dpo start the process group, wrap the model in DDP and give each process half of every global batch.
DDP averages the gradients, so every update, and so every logged number, is that of one process on the whole
batch, up to float rounding (each half is padded to its own longest row).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker  # noqa: E402

WORKER = Path(__file__).parent / "_ddp_worker.py"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path / "ddp.json"), str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["world_size"] == 2

    one = _ddp_worker.run()  # this process: no WORLD_SIZE, a plain run on the whole batch
    assert [r["step"] for r in ddp["history"]] == [r["step"] for r in one.history] == list(range(1, 7))
    for key in one.history[0]:
        # accuracy compares chosen and rejected rewards, which are 0 up to rounding until the weights move
        # (the learning rate warms up from 0): compare it where the margins are real
        rows = [i for i, r in enumerate(one.history) if key != "rewards/accuracies" or abs(r["rewards/margins"]) > 1e-3]
        torch.testing.assert_close([ddp["history"][i][key] for i in rows], [one.history[i][key] for i in rows],
                                   rtol=1e-5, atol=1e-5, msg=key)
    assert one.history[-1]["loss"] < one.history[0]["loss"]  # it did train

    # the first process saved the model; its weights are those of the one-process run
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    for (name, p), q in zip(one.model.named_parameters(), saved.parameters()):
        torch.testing.assert_close(q, p.detach().cpu(), rtol=1e-5, atol=1e-5, msg=name)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6  # written once, by the first process only
