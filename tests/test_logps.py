"""Sequence log-probs: the shift, the gather, the -100 mask, the float32 upcast, the concatenated forward."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minidpo.logps import IGNORE_INDEX, concatenated_forward, sequence_logps


def loop_logps(logits, labels):
    """The definition, one token at a time: sum_t log softmax(logits[b, t])[labels[b, t+1]]."""
    out = []
    for b in range(labels.shape[0]):
        total = 0.0
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != IGNORE_INDEX:
                total += torch.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]].item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture
def example():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)  # (B, T, V)
    labels = torch.randint(0, 11, (3, 7), generator=g)  # (B, T)
    labels[:, :3] = IGNORE_INDEX  # a 3-token prompt
    labels[1, 5:] = IGNORE_INDEX  # row 1 is padded
    return logits, labels


def test_matches_token_loop(example):
    logits, labels = example
    torch.testing.assert_close(sequence_logps(logits, labels).double(), loop_logps(logits, labels), rtol=1e-5, atol=1e-5)


def test_average_divides_by_counted_tokens(example):
    logits, labels = example
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    assert counts.tolist() == [4, 2, 4]
    torch.testing.assert_close(sequence_logps(logits, labels, average=True), sequence_logps(logits, labels) / counts)


def test_masked_positions_do_not_count(example):
    logits, labels = example
    before = sequence_logps(logits, labels)
    perturbed = logits.clone()
    # logits[:, t] predicts labels[:, t+1]; where that label is -100 the logits must not matter
    predicts_masked = torch.nn.functional.pad(labels[:, 1:] == IGNORE_INDEX, (0, 1), value=True)  # (B, T)
    perturbed[predicts_masked] += 100 * torch.randn_like(perturbed[predicts_masked])
    torch.testing.assert_close(sequence_logps(perturbed, labels), before)
    # ... and a change where a label counts does change the result (the test can fail)
    perturbed[0, 3, labels[0, 4]] += 5.0  # one entry: a constant on all of them would cancel in the softmax
    assert not torch.allclose(sequence_logps(perturbed, labels)[0], before[0])


def test_padding_tokens_change_nothing_through_the_model():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 0, 0], [1, 2, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7])
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    with torch.no_grad():
        before = sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
        ids2 = ids.clone()
        ids2[0, 5:] = torch.tensor([17, 9])  # different pad ids
        after = sequence_logps(model(input_ids=ids2, attention_mask=mask).logits, labels)
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_upcast(dtype):
    g = torch.Generator().manual_seed(1)
    vocab = 50_000  # a GPT-2-sized vocabulary, where a half-precision logsumexp would be coarse
    logits = (8 * torch.randn(2, 5, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (2, 5), generator=g)
    out = sequence_logps(logits, labels)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, sequence_logps(logits.float(), labels))


def test_values_are_log_probabilities():
    logits = torch.zeros(1, 4, 8)  # uniform over 8 tokens
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3]])
    assert sequence_logps(logits, labels).item() == pytest.approx(3 * math.log(1 / 8))


def test_bad_inputs():
    logits, labels = torch.zeros(2, 4, 5), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits must have shape \(B, T, V\)"):
        sequence_logps(logits[0], labels)
    with pytest.raises(ValueError, match="disagree on"):
        sequence_logps(logits, labels[:, :3])
    with pytest.raises(ValueError, match="must be integer token ids"):
        sequence_logps(logits, labels.float())
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        sequence_logps(logits, labels + 7)
    empty = labels.clone()
    empty[1] = IGNORE_INDEX
    with pytest.raises(ValueError, match=r"rows \[1\] have none"):
        sequence_logps(logits, empty, average=True)
    assert sequence_logps(logits, empty)[1].item() == 0.0  # a sum over nothing is fine


def test_concatenated_forward_equals_two_forwards():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    chosen = torch.tensor([[1, 2, 3, 4, 0], [1, 5, 6, 7, 8]])
    rejected = torch.tensor([[1, 2, 9, 0, 0], [1, 5, 10, 11, 0]])
    cm, rm = (chosen != 0).long(), (rejected != 0).long()
    cl, rl = chosen.masked_fill(cm == 0, IGNORE_INDEX), rejected.masked_fill(rm == 0, IGNORE_INDEX)
    cl[:, :2] = IGNORE_INDEX
    rl[:, :2] = IGNORE_INDEX
    batch = dict(chosen_input_ids=chosen, chosen_attention_mask=cm, chosen_labels=cl,
                 rejected_input_ids=rejected, rejected_attention_mask=rm, rejected_labels=rl)
    with torch.no_grad():
        out = concatenated_forward(model, batch)
        c = sequence_logps(model(input_ids=chosen, attention_mask=cm).logits, cl)
        r = sequence_logps(model(input_ids=rejected, attention_mask=rm).logits, rl)
    torch.testing.assert_close(out["chosen_logps"], c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["rejected_logps"], r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["chosen_avg_logps"], c / torch.tensor([2.0, 3.0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["chosen_nll"], -c.sum() / 5, rtol=1e-5, atol=1e-5)
