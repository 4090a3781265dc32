"""A byte-level BPE tokenizer trained locally with `tokenizers`, wrapped for `transformers`.

Why byte-level BPE: it is what GPT-2 uses, every string can be encoded (the 256 byte symbols are always in
the vocabulary, so there is no unknown token), and `decode(encode(text)) == text` exactly, spaces included.

Why it ends up word-level here: the synthetic world (`minidpo.world`) has a vocabulary of a few dozen words.
The BPE trainer merges until every word seen is a single token and then stops, well below `vocab_size`, so
the sequences are short (one token per word, with its leading space: `" great"`), which makes the tiny
model fast to train.

The spacing convention (see `minidpo.world`): a word carries the space before it, so a prompt such as
`"review : the film was"` and a completion such as `" great ."` tokenize separately exactly as they do
together. Completions start with a space; prompts do not end with one.

Special tokens:

- `<|endoftext|>`: id 0; the end-of-sequence token, and also the beginning-of-sequence token as in GPT-2.
  Nothing is added automatically when encoding (like GPT-2): the data code appends EOS to completions.
- `<|pad|>`: id 1; padding only, distinct from EOS so that an EOS at the end of a completion is never
  mistaken for padding (and is learned).
"""

from __future__ import annotations

import os
from typing import Iterable

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1, in this order


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 1,
                    model_max_length: int = 128, full_byte_alphabet: bool = True):
    """Train a byte-level BPE tokenizer on `texts` and return a `PreTrainedTokenizerFast`.

    `vocab_size` is an upper bound: 256 byte symbols + 2 special tokens + the merges. Training stops
    earlier when every pre-token (a word with its leading space) is a single token, which for the synthetic
    world happens at a few hundred. Training is deterministic for the same `texts` (in the same order).
    `model_max_length` is recorded in the tokenizer (the tiny GPT-2 has 128 positions).

    The result has `eos_token = bos_token = "<|endoftext|>"` (id 0), `pad_token = "<|pad|>"` (id 1),
    right padding (what training collators expect; generation pads on the left by itself, see
    `minidpo.world.sample_completions`), and round-trips `save_pretrained` /
    `AutoTokenizer.from_pretrained(dir)` offline.

    `full_byte_alphabet=True` (the default) keeps all 256 byte symbols, so any text at all encodes and
    decodes back exactly. With False only the bytes seen in `texts` are kept: a much smaller vocabulary
    (about 60 tokens for the synthetic world instead of about 380), but characters never seen in training
    are dropped when encoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer: got no texts to train on")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("train_tokenizer: every text must be a str")
    n_base = (256 if full_byte_alphabet else 0) + len(SPECIAL_TOKENS)
    if vocab_size < n_base:
        raise ValueError(f"train_tokenizer: vocab_size must be at least {n_base} "
                         f"(byte symbols and {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"train_tokenizer: min_frequency must be >= 1, got {min_frequency}")

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a text is encoded as it is written, so "a" + " b" tokenizes like "a b".
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # every byte encodable, so there is no unknown token
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_byte_alphabet else [],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # keep " ." as written, so decode(encode(t)) == t
    )


def load_tokenizer(name_or_path: str | os.PathLike):
    """Load any tokenizer with `AutoTokenizer.from_pretrained`, offline-friendly, with a clear error.

    If the tokenizer has no pad token (GPT-2 on the Hub has none) the EOS token is used for padding; the data
    code masks padding by the attention mask and labels, so that is safe. Raises ValueError with one
    sentence when nothing can be loaded from `name_or_path`.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as e:  # OSError (missing), ValueError (bad config), HF offline errors ...
        raise ValueError(_cannot_load("tokenizer", name_or_path, e)) from e
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _cannot_load(what: str, name_or_path, err: Exception) -> str:
    where = os.fspath(name_or_path)
    if os.path.isdir(where):
        why = "the folder exists but does not hold a loadable one"
    elif os.path.exists(where):
        why = "it is a file, not a folder or a Hub id"
    else:
        why = ("no such folder, and not found as a Hub id in the local cache (the Hub is not reachable "
               "when HF_HUB_OFFLINE=1)")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"cannot load a {what} from {where!r}: {why} ({type(err).__name__}: {first})"
