"""Several copies of one small GPT-2 (the seeds of an experiment, and pi_ref beside them) run as one model.

Evaluating a policy on the synthetic world means sampling a few hundred short completions and scoring them.
For the course's 2-layer model nearly all of that time is per-step overhead (``generate`` runs 24 small steps),
so evaluating five seeds one after another costs five times the overhead for little arithmetic. Here the
copies' weights are stacked along a first axis S and one forward pass runs all of them, each on its own rows:

    stack(models)                        {name: (S, ...)} from GPT2LMHeadModel copies of one architecture
    forward(params, config, ids, ...)    GPT-2's forward (Radford et al. 2019) written out on stacked weights,
                                         with a key/value cache: logits (S, R, T, V); with an attention bias
                                         instead, on packed rows: how experiment.run_dpo_seeds trains
    sample(params, config, ...)          k completions per prompt from every copy, at temperature 1, and the
                                         log-probs of the sampled tokens under every copy and under pi_ref

The forward is the same function as ``GPT2LMHeadModel`` (checked to float32 rounding in tests/test_multiseed.py);
only the order of the floating-point sums differs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


def stack(models: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The copies' parameters stacked along a new first axis, {name: (S, *shape)}, detached."""
    if not models:
        raise ValueError("stack: need at least one model")
    config = models[0].config
    if config.model_type != "gpt2" or config.activation_function not in _ACTIVATIONS:
        raise ValueError(f"stack: only GPT-2 with {sorted(_ACTIVATIONS)} is supported, got {config.model_type} "
                         f"with {config.activation_function}")
    if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn or not config.scale_attn_weights:
        raise ValueError("stack: GPT-2's attention options other than the default are not supported")
    names = [n for n, _ in models[0].named_parameters()]
    return {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}


def _layer_norm(x, weight, bias, eps):  # x (S, R, T, C), weight (S, C)
    x = F.layer_norm(x, x.shape[-1:], eps=eps)
    return x * weight[:, None, None, :] + bias[:, None, None, :]


def _linear(x, weight, bias):  # Conv1D: x (S, R, T, I) @ weight (S, I, O) + bias (S, O)
    S, R, T, _ = x.shape
    out = torch.baddbmm(bias[:, None, :], x.reshape(S, R * T, -1), weight)  # (S, R*T, O)
    return out.reshape(S, R, T, -1)


def forward(params: dict[str, torch.Tensor], config, input_ids: torch.Tensor, positions: torch.Tensor,
            key_mask: torch.Tensor | None, cache: list | None = None, cache_len: int = 0,
            attention_bias: torch.Tensor | None = None) -> torch.Tensor:
    """GPT-2 on stacked weights: logits (S, R, T, V) for input_ids (S, R, T) at ``positions`` (R, T).

    ``key_mask`` (R, cache_len + T) is True where a key may be attended to (not padding); attention is causal
    within the new tokens. ``positions`` (S, R, T) and ``key_mask`` (S, R, cache_len + T) give each copy its
    own layout (copies fed different prompts). ``cache``: per layer a (keys, values) pair of
    (S, R, H, T_max, D) buffers, filled at [cache_len, cache_len + T) and read up to there (None: no cache,
    T is the whole sequence).

    ``attention_bias`` (S, R, 1, T, T), instead of ``key_mask`` and without a cache: the additive mask of rows
    whose tokens see only some earlier tokens (``experiment._packed_inputs``: several sequences in one row).
    Attention then runs in ``scaled_dot_product_attention`` over all copies' rows at once (attention has no
    weights, so the copies need not be told apart); this is how ``run_dpo_seeds`` trains its copies.
    """
    S, R, T = input_ids.shape
    H, eps = config.n_head, config.layer_norm_epsilon
    act = _ACTIVATIONS[config.activation_function]
    p = params
    wte = p["transformer.wte.weight"]  # (S, V, C)
    C = wte.shape[-1]
    D = C // H
    h = torch.gather(wte, 1, input_ids.reshape(S, R * T, 1).expand(-1, -1, C)).reshape(S, R, T, C)
    positions = positions.expand(S, R, T)  # per copy
    h = h + torch.gather(p["transformer.wpe.weight"], 1, positions.reshape(S, R * T, 1).expand(-1, -1, C)
                         ).reshape(S, R, T, C)  # (S, R, T, C)
    if attention_bias is not None:
        if cache is not None:
            raise ValueError("multiseed.forward: attention_bias is for whole rows, without a cache")
        flat_bias = attention_bias.expand(S, R, 1, T, T).reshape(S * R, 1, T, T).to(h.dtype)
    else:
        key_mask = key_mask.expand(S, R, key_mask.shape[-1])
        total = cache_len + T
        causal = torch.ones(T, total, dtype=torch.bool, device=h.device).tril(cache_len)  # (T, total)
        allowed = causal & key_mask[:, :, None, :total]  # (S, R, T, total)
        # a large negative number, not -inf: a left-padding query sees no key at all, and -inf would give NaN
        # there, which 0-weighted keys would still carry into later rows (0 * NaN); GPT-2's own code does the same
        bias = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill_(~allowed,
                                                                                       torch.finfo(h.dtype).min)
    for i in range(config.n_layer):
        pre = f"transformer.h.{i}."
        a = _layer_norm(h, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], eps)
        qkv = _linear(a, p[pre + "attn.c_attn.weight"], p[pre + "attn.c_attn.bias"])  # (S, R, T, 3C)
        q, k, v = (t.reshape(S, R, T, H, D).transpose(2, 3) for t in qkv.split(C, dim=-1))  # (S, R, H, T, D)
        if cache is not None:
            cache[i][0][:, :, :, cache_len:total] = k
            cache[i][1][:, :, :, cache_len:total] = v
            k, v = cache[i][0][:, :, :, :total], cache[i][1][:, :, :, :total]  # (S, R, H, total, D)
        if attention_bias is not None:
            out = F.scaled_dot_product_attention(q.reshape(S * R, H, T, D), k.reshape(S * R, H, T, D),
                                                 v.reshape(S * R, H, T, D), attn_mask=flat_bias)  # (S*R, H, T, D)
            out = out.reshape(S, R, H, T, D)
        elif T == 1:  # one new token: products and sums beat a batch of (1 x D) @ (D x total) matmuls
            scores = (q * k).sum(-1, keepdim=True).transpose(-1, -2) / math.sqrt(D) + bias[:, :, None]
            out = (torch.softmax(scores, dim=-1).transpose(-1, -2) * v).sum(-2, keepdim=True)  # (S, R, H, 1, D)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(D) + bias[:, :, None]  # (S, R, H, T, total)
            out = torch.softmax(scores, dim=-1) @ v  # (S, R, H, T, D)
        out = out.transpose(2, 3).reshape(S, R, T, C)
        h = h + _linear(out, p[pre + "attn.c_proj.weight"], p[pre + "attn.c_proj.bias"])
        m = _layer_norm(h, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], eps)
        m = act(_linear(m, p[pre + "mlp.c_fc.weight"], p[pre + "mlp.c_fc.bias"]))
        h = h + _linear(m, p[pre + "mlp.c_proj.weight"], p[pre + "mlp.c_proj.bias"])
    h = _layer_norm(h, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    return (h.reshape(S, R * T, C) @ wte.transpose(1, 2)).reshape(S, R, T, -1)  # tied lm_head: (S, R, T, V)


@torch.no_grad()
def sample(params: dict[str, torch.Tensor], config, prompt_ids: Sequence[Sequence[int]], k: int, seeds: Sequence[int],
           eos_token_id: int, pad_token_id: int, max_new_tokens: int = 24, reference: dict | None = None,
           batch_size: int = 1024) -> tuple[list[list[list[list[int]]]], torch.Tensor, torch.Tensor | None]:
    """``k`` completions per prompt from each of the S stacked copies, at temperature 1 (the full distribution).

    ``prompt_ids``: token-id lists shared by every copy, or S such lists of equal length, copy s's own prompts
    (the seeds of an online run, each with its own prompt order).

    Copy s draws its tokens with a generator seeded by ``seeds[s]`` (Gumbel-max, as ``torch.multinomial``),
    so its samples depend on its seed and the batch layout only; with one batch of rows they are the tokens
    ``world.generate_completion_ids`` draws with the same seed.
    A completion ends at EOS (kept) or after ``max_new_tokens``. Returns ``(completions, logp, ref_logp)``:
    completions[s][i][j] the token ids of copy s's j-th sample for prompt i; logp (S, n_prompts * k) the
    summed log-prob of each sample under the copy that drew it; with ``reference`` (a one-copy stack, e.g.
    pi_ref) ref_logp (S, n_prompts * k) the same samples' log-prob under it, scored in the same pass.
    """
    S = next(iter(params.values())).shape[0]
    if len(seeds) != S:
        raise ValueError(f"sample: {len(seeds)} seeds for {S} stacked copies")
    if k < 1 or max_new_tokens < 1:
        raise ValueError(f"sample: k and max_new_tokens must be >= 1, got {k} and {max_new_tokens}")
    per_copy = bool(prompt_ids) and bool(prompt_ids[0]) and not isinstance(prompt_ids[0][0], int)
    prompts_of = list(prompt_ids) if per_copy else [prompt_ids] * S  # copy s's prompts
    if len(prompts_of) != S or len({len(ps) for ps in prompts_of}) != 1:
        raise ValueError(f"sample: per-copy prompts need {S} lists of equal length")
    prompt_ids = prompts_of[0]
    if any(len(p) == 0 for ps in prompts_of for p in ps):
        raise ValueError("sample: every prompt needs at least one token")
    if max(len(p) for ps in prompts_of for p in ps) + max_new_tokens > config.n_positions:
        raise ValueError(f"sample: prompt + {max_new_tokens} new tokens exceed the model's {config.n_positions} "
                         "positions")
    device = next(iter(params.values())).device
    if reference is not None:  # pi_ref once per copy, fed the tokens that copy drew: one pass scores both
        params = {n: torch.cat([v, reference[n].expand(S, *reference[n].shape[1:])]) for n, v in params.items()}
    rows = [i for i in range(len(prompt_ids)) for _ in range(k)]
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    completions = [[[None] * k for _ in prompt_ids] for _ in range(S)]
    logp = torch.zeros(S, len(rows))
    ref_logp = torch.zeros(S, len(rows)) if reference is not None else None
    H, D = config.n_head, config.n_embd // config.n_head
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        R, P = len(chunk), max(len(ps[i]) for ps in prompts_of for i in chunk)
        ids = torch.full((S, R, P), pad_token_id, dtype=torch.long)
        key_mask = torch.zeros(S, R, P + max_new_tokens, dtype=torch.bool)
        for s, ps in enumerate(prompts_of):  # left-padded: every row's last prompt token is at column P - 1
            for r, i in enumerate(chunk):
                ids[s, r, P - len(ps[i]):] = torch.tensor(ps[i])
                key_mask[s, r, P - len(ps[i]):] = True
        if reference is not None:  # pi_ref's copies read the same rows as the policies'
            ids, key_mask = torch.cat([ids, ids]), torch.cat([key_mask, key_mask])
        ids, key_mask = ids.to(device), key_mask.to(device)
        positions = (key_mask[..., :P].long().cumsum(-1) - 1).clamp(min=0)  # (n_copies, R, P): as generate()
        n_copies = next(iter(params.values())).shape[0]
        cache = [(torch.empty(n_copies, R, H, P + max_new_tokens, D, device=device),
                  torch.empty(n_copies, R, H, P + max_new_tokens, D, device=device)) for _ in range(config.n_layer)]
        logits = forward(params, config, ids, positions, key_mask, cache, 0)[:, :, -1]
        position = positions[..., -1]  # (n_copies, R)
        done = torch.zeros(S, R, dtype=torch.bool, device=device)
        new = torch.full((S, R, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        running = torch.arange(R, device=device)  # the chunk's rows still computed (a row that ended is dropped)
        for t in range(max_new_tokens):
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (n_copies, R', V)
            # argmax of p / E with E ~ Exp(1) is an exact sample of p (the Gumbel-max trick); it is also what
            # torch.multinomial does, so a copy's samples are those generate() draws from the same seed. The noise
            # is drawn for every row of the chunk, running or not, so a row's draws do not depend on the others.
            noise = torch.stack([torch.empty(R, logits.shape[-1], device=device).exponential_(generator=g)
                                 for g in generators])[:, running]  # (S, R', V)
            was_done = done[:, running]  # (S, R')
            token = (logprobs[:S].exp() / noise).argmax(-1)  # (S, R')
            token = torch.where(was_done, torch.full_like(token, pad_token_id), token)
            new[:, running, t] = token
            live = (~was_done).float().cpu()
            columns = start + running.cpu()
            logp[:, columns] += live * logprobs[:S].gather(-1, token[..., None])[..., 0].cpu()
            if reference is not None:
                ref_logp[:, columns] += live * logprobs[S:].gather(-1, token[..., None])[..., 0].cpu()
            done[:, running] = was_done | (token == eos_token_id)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            keep = ~done[:, running].all(0)  # (R',): rows some copy is still writing
            if int(keep.sum()) < 0.8 * len(running):  # drop ended rows from the batch and the cache
                running, token, position, key_mask = running[keep], token[:, keep], position[:, keep], key_mask[:, keep]
                cache = [(keys[:, keep], values[:, keep]) for keys, values in cache]
            position = position + 1
            feed = token if reference is None else torch.cat([token, token])  # (n_copies, R')
            logits = forward(params, config, feed[..., None], position[..., None], key_mask, cache, P + t)[:, :, -1]
        steps = t + 1
        new = new[:, :, :steps].tolist()
        for s in range(S):
            for r, i in enumerate(chunk):
                ids_ = new[s][r]
                ids_ = ids_[:ids_.index(eos_token_id) + 1] if eos_token_id in ids_ else ids_
                completions[s][i][(start + r) % k] = ids_
    return completions, logp, ref_logp


@torch.no_grad()
def pair_logps(params: dict[str, torch.Tensor], config, features: Sequence[dict], pad_token_id: int,
               batch_size: int = 256) -> dict[str, torch.Tensor]:
    """log pi(y_w|x) and log pi(y_l|x) of tokenized pairs (``data.tokenize_preferences``) under every copy:
    {"chosen_logps", "rejected_logps"}, each (S, N), summed over the completion's tokens."""
    from .logps import IGNORE_INDEX

    S = next(iter(params.values())).shape[0]
    device = next(iter(params.values())).device
    out = {"chosen_logps": [], "rejected_logps": []}
    for side in ("chosen", "rejected"):
        rows = [(f[f"{side}_input_ids"], f[f"{side}_labels"]) for f in features]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            T = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), T), pad_token_id, dtype=torch.long)
            labels = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.bool)
            for r, (x, y) in enumerate(chunk):  # right-padded: positions 0..n-1 as in training
                ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), True
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            positions = torch.arange(T, device=device).expand(len(chunk), T)
            logits = forward(params, config, ids.expand(S, -1, -1), positions, mask)  # (S, R, T, V)
            logprobs = torch.log_softmax(logits[:, :, :-1].float(), dim=-1)  # (S, R, T-1, V)
            target = labels[:, 1:]  # (R, T-1)
            counted = target != IGNORE_INDEX
            picked = logprobs.gather(-1, target.clamp(min=0).expand(S, -1, -1)[..., None])[..., 0]  # (S, R, T-1)
            out[f"{side}_logps"].append((picked * counted).sum(-1).cpu())
    return {k: torch.cat(v, dim=1) for k, v in out.items()}
