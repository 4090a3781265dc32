"""Mixed precision: the DPO loop under bf16 (and fp16) autocast stays finite and close to fp32.

On a GPU, precision="auto" means bf16 autocast (and "fp16" adds a GradScaler); these tests run the same code
path on the CPU, where torch supports bf16 (and fp16) autocast, so it is exercised on every machine, GPU or
not. The log-softmax inside ``sequence_logps`` runs in float32 whatever the autocast dtype: that is what keeps
the log-prob differences (rewards of order 1e-2 at first) from drowning in bf16's 3 significant digits.
"""

import math

import pytest
import torch

from minidpo.logps import sequence_logps
from minidpo.tokenizer import train_tokenizer
from minidpo.train import DPOConfig, train_dpo

from _fixtures import fresh_model, make_pairs


def _cpu_autocast_ok(dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            return torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == dtype
    except Exception:  # noqa: BLE001  (old torch: no CPU autocast for this dtype)
        return False


@pytest.fixture(scope="module")
def setup():
    pairs, corpus = make_pairs()
    return pairs, train_tokenizer(corpus, model_max_length=64)


@pytest.mark.skipif(not _cpu_autocast_ok(torch.bfloat16), reason="this torch has no CPU bf16 autocast")
def test_bf16_autocast_dpo_steps_are_finite_and_close_to_fp32(setup):
    pairs, tok = setup
    kw = dict(batch_size=8, lr=5e-3, max_steps=6, warmup_steps=2, cache_dir=None, show_progress=False, device="cpu")
    bf16 = train_dpo(fresh_model(tok), tok, pairs, DPOConfig(precision="bf16", **kw), log=lambda *_: None).history
    fp32 = train_dpo(fresh_model(tok), tok, pairs, DPOConfig(precision="fp32", **kw), log=lambda *_: None).history
    assert len(bf16) == 6
    assert all(math.isfinite(r[k]) for r in bf16 for k in r)
    assert bf16[-1]["loss"] < bf16[0]["loss"]  # it learns
    # the first loss is log 2 in both: policy == reference up to rounding
    assert abs(bf16[0]["loss"] - math.log(2)) < 1e-2 and abs(fp32[0]["loss"] - math.log(2)) < 1e-6
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(bf16, fp32)) < 0.05


@pytest.mark.skipif(not _cpu_autocast_ok(torch.float16), reason="this torch has no CPU fp16 autocast")
def test_fp16_autocast_with_grad_scaler_is_finite(setup):
    """precision="fp16": autocast to float16 plus a GradScaler (the path for GPUs without bf16)."""
    pairs, tok = setup
    cfg = DPOConfig(precision="fp16", batch_size=8, lr=5e-3, max_steps=6, warmup_steps=2, cache_dir=None,
                    show_progress=False, device="cpu")
    hist = train_dpo(fresh_model(tok), tok, pairs, cfg, log=lambda *_: None).history
    assert len(hist) == 6 and all(math.isfinite(r["loss"]) for r in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]


@pytest.mark.skipif(not _cpu_autocast_ok(torch.bfloat16), reason="this torch has no CPU bf16 autocast")
def test_bf16_logits_give_float32_logps():
    logits = torch.randn(2, 5, 50).to(torch.bfloat16)
    labels = torch.tensor([[-100, 3, 4, 5, -100], [-100, -100, 7, 8, 9]])
    out = sequence_logps(logits, labels)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, sequence_logps(logits.float(), labels))
