"""Models: the tiny GPT-2 of the course, loading any causal LM by name or path, and device choice.

Precision: `load_causal_lm` passes `dtype` through (float16 / bfloat16 work); the log-softmax over the
vocabulary is done in float32 by `minidpo.logps`, so half-precision weights do not lose the log-probs.
"""

from __future__ import annotations

import os

import torch

_DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(preference: str | torch.device | None = "auto") -> torch.device:
    """The device to run on.

    `"auto"` (or None) picks CUDA if available, then Apple's MPS, then the CPU. `"cpu"`, `"cuda"` (or
    `"cuda:N"`) and `"mps"` force that device and raise ValueError when it is not available here, rather
    than silently running somewhere else.
    """
    if preference is None:
        preference = "auto"
    if isinstance(preference, torch.device):
        preference = str(preference)
    if not isinstance(preference, str):
        raise ValueError(f"device must be one of {', '.join(_DEVICE_KINDS)}, got {preference!r}")
    pref = preference.strip().lower()
    kind = pref.split(":", 1)[0]
    if kind not in _DEVICE_KINDS or (":" in pref and kind != "cuda"):
        raise ValueError(f"device must be one of {', '.join(_DEVICE_KINDS)} (or cuda:N), got {preference!r}")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} was asked for, but CUDA is not available on this machine")
        device = torch.device(pref)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {preference!r} was asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        return device
    if kind == "mps":
        if not _mps_available():
            raise ValueError(f"device {preference!r} was asked for, but MPS is not available on this machine")
        return torch.device("mps")
    return torch.device("cpu")


def tiny_gpt2(vocab_size: int, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_positions: int = 128,
              seed: int = 0, bos_token_id: int | None = 0, eos_token_id: int | None = 0,
              pad_token_id: int | None = 1, **overrides):
    """A small, randomly initialised `GPT2LMHeadModel` built from a `GPT2Config`.

    Dropout is 0 (residual, embedding and attention) so that training is deterministic for a seed; pass
    e.g. `resid_pdrop=0.1` in `overrides` to change that. Any other `GPT2Config` field can be overridden the
    same way. The initial weights depend only on `seed` (the global RNG is left as it was). The special
    token ids default to those of `minidpo.tokenizer.train_tokenizer` (EOS = BOS = 0, pad = 1); pass
    `tokenizer.eos_token_id` etc. for another tokenizer. The model is returned in eval mode, on the CPU.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    for name, value in (("vocab_size", vocab_size), ("n_embd", n_embd), ("n_layer", n_layer),
                        ("n_head", n_head), ("n_positions", n_positions)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"tiny_gpt2: {name} must be a positive int, got {value!r}")
    if n_embd % n_head:
        raise ValueError(f"tiny_gpt2: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    for name, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                        ("pad_token_id", pad_token_id)):
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(f"tiny_gpt2: {name}={value} is outside the vocabulary [0, {vocab_size})")

    kwargs = dict(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                  n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    kwargs.update(overrides)
    config = GPT2Config(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = bos_token_id, eos_token_id, pad_token_id
    return model.eval()


def load_causal_lm(name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                   dtype: str | torch.dtype | None = None):
    """Load any causal LM with `AutoModelForCausalLM.from_pretrained` (a local folder or a cached Hub id).

    `device`: None keeps the CPU; a string goes through `pick_device` ("auto", "cpu", "cuda", "mps").
    `dtype`: None (the float32 default), a torch dtype, or "float32" / "float16" / "bfloat16" / "auto".
    Raises ValueError with one sentence when nothing can be loaded (missing folder, an id not cached while
    offline, a folder without a model). The model is returned in eval mode.
    """
    from transformers import AutoModelForCausalLM

    from .tokenizer import _cannot_load

    torch_dtype = _parse_dtype(dtype)
    target = pick_device(device) if device is not None else None
    kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    try:
        model = AutoModelForCausalLM.from_pretrained(os.fspath(name_or_path), **kwargs)
    except Exception as e:  # OSError (missing), ValueError (unknown architecture), offline errors ...
        raise ValueError(_cannot_load("causal language model", name_or_path, e)) from e
    if target is not None:
        model = model.to(target)
    return model.eval()


def _parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": "auto"}
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    raise ValueError(f"dtype must be one of {', '.join(sorted(names))} or a torch.dtype, got {dtype!r}")


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every ``nn.Dropout``'s probability to 0 (in place), as TRL's ``DPOConfig(disable_dropout=True)``.

    DPO compares pi with pi_ref on the same tokens; with dropout on, pi is scored in train mode (random masks)
    and pi_ref in eval mode, so even at step 0, where pi = pi_ref, the loss is not ln 2 nor the margin 0.
    GPT-2 from the Hub has dropout 0.1; the course's tiny GPT-2 has 0 already.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def max_positions(model: torch.nn.Module) -> int | None:
    """How many positions the model has (GPT-2's ``n_positions``, else ``max_position_embeddings``), or None."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
