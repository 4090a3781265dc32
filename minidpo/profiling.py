"""What caching the reference log-probs saves, measured on one DPO step of a tiny GPT-2 (notebook 07).

The chapter "Direct Alignment Algorithms" of Nathan Lambert's RLHF book (section "Implementation Considerations")
says that running the reference model at every step "doubles the memory used" and that caching its log-probs
reduces "the peak memory usage by 50%". Three ways to run the reference are compared here, on the same model,
batch and optimiser:

    "cached"    reference log-probs computed once beforehand; no reference model held during training
    "no_grad"   a frozen copy run at every step under ``torch.no_grad()`` (the original DPO code, TRL)
    "autograd"  the same copy run with autograd on (what a loop that forgets ``no_grad`` does)

``dpo_step_memory`` counts bytes exactly rather than reading the process's resident size, so it does not depend
on the machine's load or the allocator: the resident tensors (policy weights, AdamW's two moments, the reference
weights when one is held) plus the peak of the tensors allocated and freed during one step (activations,
gradients, logits), taken from ``torch.profiler``'s memory events in time order. ``dpo_step_speed`` times the
three ways interleaved (so a busy machine slows them alike) and reports medians.
"""

from __future__ import annotations

import statistics
import time

import torch

from .logps import sequence_logps
from .losses import preference_loss

REFERENCE_MODES = ("cached", "no_grad", "autograd")


def _setup(n_embd: int, n_layer: int, batch: int, seq_len: int, vocab: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=seq_len,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    policy = GPT2LMHeadModel(cfg)
    reference = GPT2LMHeadModel(cfg)
    reference.load_state_dict(policy.state_dict())
    reference.requires_grad_(False)
    reference.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2 * batch, seq_len), generator=gen)  # chosen rows, then rejected rows
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100  # a prompt of a quarter of the tokens does not count
    with torch.no_grad():
        cached = sequence_logps(reference(ids).logits, labels)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)

    def step(mode: str) -> None:
        logps = sequence_logps(policy(ids).logits, labels)
        if mode == "cached":
            ref = cached
        elif mode == "no_grad":
            with torch.no_grad():
                ref = sequence_logps(reference(ids).logits, labels)
        else:  # "autograd": the reference's activations are kept for a backward pass that never uses them
            reference.requires_grad_(True)
            ref = sequence_logps(reference(ids).logits, labels)
        losses, _, _ = preference_loss(logps[:batch], logps[batch:], ref[:batch], ref[batch:], beta=0.1)
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        optimizer.step()
        reference.requires_grad_(False)
        reference.zero_grad(set_to_none=True)

    return policy, reference, optimizer, step


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _transient_peak(step, mode: str) -> int:
    """Peak bytes of the tensors allocated during one call of step(mode), above what was live before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(mode)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()  # allocations positive, frees negative
        peak = max(peak, current)
    return peak


def dpo_step_memory(n_embd: int = 128, n_layer: int = 4, batch: int = 16, seq_len: int = 64, vocab: int = 258,
                    seed: int = 0) -> dict:
    """Peak tensor memory (bytes) of one DPO step with the reference cached, run under no_grad, run with autograd.

    Returns {"cached", "no_grad", "autograd"}: the peak of each (resident + transient), and "params",
    "optimizer_state", "reference_weights": the resident parts, all in bytes. fp32 GPT-2, AdamW, CPU; ``batch``
    pairs (2 * batch sequences of ``seq_len`` tokens).
    """
    if min(n_embd, n_layer, batch, seq_len, vocab) < 1 or n_embd % 4:
        raise ValueError(f"need positive sizes and n_embd divisible by 4 (heads), got n_embd={n_embd}, "
                         f"n_layer={n_layer}, batch={batch}, seq_len={seq_len}, vocab={vocab}")
    policy, reference, optimizer, step = _setup(n_embd, n_layer, batch, seq_len, vocab, seed)
    step("cached")  # creates AdamW's state, so that it is resident in every measurement below
    params = _nbytes(policy.parameters())
    state = _nbytes([v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0])
    ref_weights = _nbytes(reference.parameters())
    out = {"params": params, "optimizer_state": state, "reference_weights": ref_weights}
    for mode in REFERENCE_MODES:
        resident = params + state + (0 if mode == "cached" else ref_weights)
        out[mode] = resident + _transient_peak(step, mode)
    return out


def dpo_step_speed(n_embd: int = 128, n_layer: int = 4, batch: int = 16, seq_len: int = 64, vocab: int = 258,
                   repeats: int = 5, steps: int = 4, modes=("cached", "no_grad"), seed: int = 0,
                   threads: int | None = 1) -> dict:
    """Steps per second of the same DPO step with each reference mode: median over ``repeats`` interleaved
    blocks of ``steps`` steps each (interleaving makes a busy machine slow every mode alike). Returns
    {mode: steps/s}. ``threads``: torch threads while timing (1 by default: on a shared 2-core machine a second
    thread waits for a busy core and makes every step several times slower; None keeps the current setting)."""
    bad = [m for m in modes if m not in REFERENCE_MODES]
    if bad or repeats < 1 or steps < 1:
        raise ValueError(f"modes must be among {REFERENCE_MODES} and repeats, steps >= 1; got {modes}, "
                         f"{repeats}, {steps}")
    _, _, _, step = _setup(n_embd, n_layer, batch, seq_len, vocab, seed)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for mode in modes:  # warm-up: AdamW state, allocator, kernels
            step(mode)
        rates: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(repeats):
            for mode in modes:
                t = time.perf_counter()
                for _ in range(steps):
                    step(mode)
                rates[mode].append(steps / (time.perf_counter() - t))
    finally:
        torch.set_num_threads(previous)
    return {m: statistics.median(v) for m, v in rates.items()}


def log_sigmoid_underflow(dtype: torch.dtype) -> float:
    """The largest x (to 0.01) at which log(sigmoid(x)) is -inf in ``dtype``: below it, the naive form of the DPO
    loss, -log(sigmoid(beta h)), is inf and its gradient NaN, while -logsigmoid(beta h) stays finite."""
    xs = torch.arange(-20000, 1, dtype=torch.float64) / 100  # -200.00 .. 0.00
    naive = torch.log(torch.sigmoid(xs.to(dtype)))
    bad = xs[torch.isinf(naive)]
    return float(bad.max()) if bad.numel() else float("-inf")


def measure_in_subprocess(name: str, **kwargs) -> dict:
    """Run ``dpo_step_memory`` or ``dpo_step_speed`` (``name``) in a fresh Python process and return its dict.

    A fresh process starts from a clean allocator, and the profiler's own console messages (printed by its C++
    side straight to the process's stderr) stay out of a notebook's outputs.
    """
    import json
    import subprocess
    import sys

    if name not in ("dpo_step_memory", "dpo_step_speed"):
        raise ValueError(f"name must be 'dpo_step_memory' or 'dpo_step_speed', got {name!r}")
    proc = subprocess.run([sys.executable, "-m", "minidpo.profiling", name, json.dumps(kwargs)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed in its subprocess:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


__all__ = ["REFERENCE_MODES", "dpo_step_memory", "dpo_step_speed", "log_sigmoid_underflow", "measure_in_subprocess"]


if __name__ == "__main__":  # python -m minidpo.profiling dpo_step_memory '{"n_embd": 128}'  -> one JSON line
    import json
    import sys

    fn = {"dpo_step_memory": dpo_step_memory, "dpo_step_speed": dpo_step_speed}[sys.argv[1]]
    print(json.dumps(fn(**json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}"))))
