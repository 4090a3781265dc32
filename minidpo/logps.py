"""Sequence log-probabilities from a causal LM: shift, gather, mask.

DPO needs log pi(y|x) = sum_t log pi(y_t | x, y_<t) over the completion's tokens only (DPO paper, Sec. 4;
the book chapter's "Implementation Considerations"). Prompt and padding positions carry the label -100 and
are left out of the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or, with ``average=True``, mean) of the log-probs of the counted tokens, per row.

    logits (B, T, V) are aligned with the input ids, so logits[:, t] predicts token t+1: we shift by one.
    labels (B, T) hold token ids, with -100 where a token does not count (prompt, padding).
    The log-softmax runs in float32 whatever the logits' dtype: in fp16 or bf16 the normaliser over a
    large vocabulary loses the precision that a difference of log-probs needs.
    Returns (B,) float32.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, T, V), got {tuple(logits.shape)}")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape (B, T), got {tuple(labels.shape)}")
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")

    logits = logits[:, :-1, :].float()  # (B, T-1, V)
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != IGNORE_INDEX  # (B, T-1)
    vocab = logits.shape[-1]
    if (mask & ((labels < 0) | (labels >= vocab))).any():  # one check, so one device sync per call
        counted = labels[mask]
        raise ValueError(f"labels hold ids outside [0, {vocab}) that are not -100; "
                         f"found {counted.min().item()} .. {counted.max().item()}")

    safe_labels = torch.where(mask, labels, 0)  # any valid id; masked out below
    token_logps = torch.gather(logits, 2, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    token_logps = token_logps - torch.logsumexp(logits, dim=-1)  # log-softmax, without a (B, T, V) copy
    summed = (token_logps * mask).sum(-1)  # (B,)
    if not average:
        return summed
    n_tokens = mask.sum(-1)  # (B,)
    if (n_tokens == 0).any():
        rows = (n_tokens == 0).nonzero().flatten().tolist()
        raise ValueError(f"average=True needs at least one counted token per row; rows {rows} have none")
    return summed / n_tokens


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    average: bool = False,
) -> torch.Tensor:
    """Run the model and return the completion log-probs per row, (B,)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    return sequence_logps(logits, labels, average=average)


def concatenated_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chosen and rejected in ONE forward pass of 2B rows, split after.

    One pass instead of two halves the number of kernel launches and keeps the two halves under the same
    dropout/batch-norm state; it is what the original DPO code and TRL do. ``batch`` is what
    ``data.PreferenceCollator`` returns (chosen_* and rejected_* padded to one length T).
    """
    n = batch["chosen_input_ids"].shape[0]
    input_ids = _cat_padded(batch["chosen_input_ids"], batch["rejected_input_ids"], 0)  # (2B, T)
    attention_mask = _cat_padded(batch["chosen_attention_mask"], batch["rejected_attention_mask"], 0)  # (2B, T)
    labels = _cat_padded(batch["chosen_labels"], batch["rejected_labels"], IGNORE_INDEX)  # (2B, T)

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (2B, T, V)
    logps = sequence_logps(logits, labels)  # (2B,)
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)  # (2B,)
    avg_logps = logps / n_tokens
    return {
        "chosen_logps": logps[:n],
        "rejected_logps": logps[n:],
        "chosen_avg_logps": avg_logps[:n],
        "rejected_avg_logps": avg_logps[n:],
        # token-mean NLL of the chosen completions: the SFT term of RPO / ORPO
        "chosen_nll": -logps[:n].sum() / n_tokens[:n].sum(),
    }


def _cat_padded(a: torch.Tensor, b: torch.Tensor, pad_value: int) -> torch.Tensor:
    """Stack two (B, T) tensors along the batch, right-padding the shorter one in time."""
    length = max(a.shape[1], b.shape[1])
    a = F.pad(a, (0, length - a.shape[1]), value=pad_value)
    b = F.pad(b, (0, length - b.shape[1]), value=pad_value)
    return torch.cat([a, b], dim=0)
