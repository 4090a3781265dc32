"""Loading, validating, tokenizing and collating preference data.

The pipeline is ``load_preferences`` -> ``tokenize_preferences`` -> ``PreferenceCollator``:
a ``datasets.Dataset`` goes in, padded ``torch.LongTensor`` batches come out.

Formats (the ones TRL and the Hub use)
--------------------------------------
* **Explicit prompt**: string columns ``prompt``, ``chosen``, ``rejected``; ``chosen`` and ``rejected`` are
  the completions only.
* **Implicit prompt** (Anthropic HH): only ``chosen`` and ``rejected``, each a full dialogue; both share the
  prompt as a prefix. The prompt is cut at the last ``"\\n\\nAssistant:"`` inside the shared prefix (the
  marker stays in the prompt, so completions start with the space after it). Without the marker it is the
  longest common prefix, backed off to the start of its last whitespace so no word is split in two (the
  completions then start with that whitespace, which is how BPE tokenizers such as GPT-2's see a word).
* **Conversational**: the three columns hold lists of messages ``{"role": str, "content": str}``. After
  loading, ``prompt`` is the conversation up to the answer and ``chosen`` / ``rejected`` are the answer
  message(s), usually one ``assistant`` message each (TRL's representation). Implicit-prompt conversations
  (only ``chosen`` / ``rejected``) are split at their longest shared run of messages. The messages are kept
  as they are until ``tokenize_preferences`` renders them with ``tokenizer.apply_chat_template``; a
  tokenizer without a ``chat_template`` is then an error. A row's three columns must all be text or all be
  messages.

Extra columns (for example ``chosen_reward``) are kept.

Errors
------
Every problem raises ``ValueError`` with one sentence naming the source, the row and the column, e.g.
``data.jsonl, row 3, column 'chosen': value is null (expected a string)``. **Rows are numbered from 1**:
row 1 is the first record (in a ``.jsonl`` file without blank lines, row N is line N; in a ``.csv`` file
the header is not a row). Malformed JSON is reported by line number.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from datasets.utils import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_COLUMNS = ("prompt", "chosen", "rejected")
COMPLETION_COLUMNS = ("chosen", "rejected")
ASSISTANT_MARKER = "\n\nAssistant:"
IGNORE_INDEX = -100
TRUNCATION_MODES = ("keep_start", "keep_end")
_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_MISSING = object()  # a key absent from a JSON object, told apart from an explicit null
_CHUNK = 1024  # rows per tokenizer call: large enough for the Rust batch path, small enough for a progress bar

Row = dict[str, Any]
Source = str | os.PathLike | datasets.Dataset | datasets.DatasetDict | Sequence[Mapping[str, Any]]


# --------------------------------------------------------------------------------------------------- loading


def load_preferences(source: Source, split: str = "train") -> datasets.Dataset:
    """Load preference pairs as a ``datasets.Dataset`` with columns ``prompt``, ``chosen``, ``rejected``.

    ``source`` is a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a ``save_to_disk`` folder, a Hub
    id (loaded with ``split``), an in-memory ``datasets.Dataset`` / ``DatasetDict``, or a list of dicts.
    Implicit-prompt data is split into prompt and completions; everything is validated (see the module
    docstring). Raises ``ValueError`` naming the file, row and column of the first problem.
    """
    if isinstance(source, datasets.DatasetDict):
        return _finish(_pick_split(source, split, "dataset"), "dataset")
    if isinstance(source, datasets.Dataset):
        return _finish(source, "dataset")
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        return _finish(_load_path_or_hub(name, split), name)
    if isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        return _finish(_dataset_from_rows(list(source), "rows"), "rows")
    raise ValueError(
        f"cannot load preference data from an object of type {type(source).__name__}; pass a file path, a "
        "save_to_disk folder, a Hub id, a datasets.Dataset or a list of dicts"
    )


def _load_path_or_hub(name: str, split: str) -> datasets.Dataset:
    """Dispatch on what ``name`` is on disk; anything that is not there is tried as a Hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_folder(path, name, split)
    if path.is_file():
        return _load_file(path, name)
    if path.suffix.lower() in _SUFFIXES:
        raise ValueError(f"{name}: no such file")
    return _load_hub(name, split)


def _load_file(path: Path, name: str) -> datasets.Dataset:
    """Read one data file; JSON and CSV are parsed here so errors can name the line and row."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _dataset_from_rows(_read_jsonl(path, name), name)
    if suffix == ".json":
        return _dataset_from_rows(_read_json(path, name), name)
    if suffix == ".csv":
        return _dataset_from_rows(_read_csv(path, name), name)
    if suffix == ".parquet":
        try:
            with _no_progress_bars():
                return datasets.Dataset.from_parquet(str(path))
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise ValueError(f"{name}: could not be read as Parquet ({_first_line(error)})") from None
    raise ValueError(f"{name}: unsupported file type {suffix!r} (expected one of {', '.join(_SUFFIXES)})")


def _not_utf8(name: str, data: bytes, error: UnicodeDecodeError, line_number: int | None = None) -> ValueError:
    """The one-line error for a byte that is not UTF-8: file, line and the byte (not Python's codec message)."""
    if line_number is None:
        line_number = data.count(b"\n", 0, error.start) + 1
    return ValueError(f"{name}, line {line_number}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the "
                      "file as UTF-8")


def _read_text(path: Path, name: str, encoding: str = "utf-8") -> str:
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise _not_utf8(name, data, error) from None


@contextlib.contextmanager
def _no_progress_bars():
    """datasets' "Generating train split" bars off while a local file is read: stderr is for errors."""
    was_on = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _read_jsonl(path: Path, name: str) -> list[Any]:
    """Parse a JSON-lines file line by line, so a bad line is reported by its number; blank lines skip."""
    rows = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(name, raw, error, line_number) from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{name}, line {line_number}: not valid JSON ({error.msg} at character {error.colno})"
                ) from None
    return rows


def _read_json(path: Path, name: str) -> list[Any]:
    """Parse a JSON file holding a list of records, a dict of equal-length columns, or {"key": [records]}."""
    try:
        data = json.loads(_read_text(path, name))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{name}, line {error.lineno}: not valid JSON ({error.msg} at character {error.colno})"
        ) from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        only = next(iter(data.values()))
        if all(isinstance(item, dict) for item in only):
            return only  # {"data": [{...}, ...]}
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise ValueError(f"{name}: columns have different lengths {sorted(lengths)}")
        return [dict(zip(data, values)) for values in zip(*data.values())]
    raise ValueError(f"{name}: expected a JSON list of objects or an object of equal-length lists")


def _read_csv(path: Path, name: str) -> list[Row]:
    """Read a CSV file with a header row; every value stays a string (no guessing that "42" is a number)."""
    rows = []
    with io.StringIO(_read_text(path, name, "utf-8-sig"), newline="") as handle:  # utf-8-sig drops a BOM
        reader = csv.reader(handle)
        try:
            header = next(reader, [])
            for fields in reader:
                if not fields:
                    continue  # a blank line
                if len(fields) != len(header):
                    raise ValueError(
                        f"{name}, row {len(rows) + 1} (line {reader.line_num}): has {len(fields)} fields but "
                        f"the header has {len(header)}"
                    )
                rows.append(dict(zip(header, fields)))
        except csv.Error as error:
            raise ValueError(f"{name}, line {reader.line_num}: not valid CSV ({error})") from None
    return rows


def _load_folder(path: Path, name: str, split: str) -> datasets.Dataset:
    """Load a ``save_to_disk`` folder; any other folder is handed to ``load_dataset`` (a folder of files)."""
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    try:
        with _no_progress_bars():
            loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
    except Exception as error:  # datasets raises many types for an unreadable folder
        kind = "save_to_disk folder" if saved else "folder of data files"
        raise ValueError(f"{name}: could not be read as a {kind} ({_first_line(error)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, split, name)
    return loaded


def _load_hub(name: str, split: str) -> datasets.Dataset:
    """Load ``name`` from the Hugging Face Hub; offline or unknown ids become one clear sentence."""
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # ConnectionError offline, DatasetNotFoundError, a bad split name, ...
        raise ValueError(
            f"{name}: not a local file or folder, and loading it from the Hugging Face Hub with "
            f"split={split!r} failed ({_first_line(error)})"
        ) from None
    if not isinstance(loaded, datasets.Dataset):
        raise ValueError(f"{name}: the Hub returned a {type(loaded).__name__}, not one split")
    return loaded


def _pick_split(loaded: datasets.DatasetDict, split: str, name: str) -> datasets.Dataset:
    if split not in loaded:
        raise ValueError(f"{name}: has no split {split!r} (it has {', '.join(map(repr, loaded))})")
    return loaded[split]


def _dataset_from_rows(rows: list[Any], name: str) -> datasets.Dataset:
    """Check Python rows before Arrow sees them, since Arrow's own type errors name no row."""
    if not rows:
        raise ValueError(f"{name}: contains no rows")
    _check_mappings(rows, name)
    present = list(dict.fromkeys(key for row in rows for key in row))
    columns = {key: [row.get(key, _MISSING) for row in rows] for key in present}
    _check_columns(present, name, implicit_ok=True)
    _check_cells(columns, name, [c for c in PROMPT_COLUMNS if c in columns])
    try:
        return datasets.Dataset.from_list([dict(row) for row in rows])
    except Exception as error:  # pyarrow: ArrowInvalid / ArrowTypeError on mixed types in an extra column
        raise ValueError(
            f"{name}: could not build a table ({_first_line(error)}); give each column one type"
        ) from None


def _check_mappings(rows: Sequence[Any], name: str) -> None:
    for row_number, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise ValueError(f"{name}, row {row_number}: expected an object with named columns, got {_show(row)}")


def _finish(dataset: datasets.Dataset, name: str) -> datasets.Dataset:
    """Split implicit prompts if needed, then validate the result."""
    _check_columns(dataset.column_names, name, implicit_ok=True)
    if "prompt" not in dataset.column_names:
        _check_cells(_columns(dataset, COMPLETION_COLUMNS), name, COMPLETION_COLUMNS)
        dataset = split_implicit_prompt(dataset)
    validate_preferences(dataset, name)
    return dataset


# ------------------------------------------------------------------------------------------ implicit prompt


def split_implicit_prompt(dataset: datasets.Dataset) -> datasets.Dataset:
    """Turn ``chosen`` / ``rejected`` full dialogues into ``prompt`` + completions (see module docstring)."""
    columns = _columns(dataset, COMPLETION_COLUMNS)
    split = [_split_pair(c, r) for c, r in zip(columns["chosen"], columns["rejected"])]
    head = datasets.Dataset.from_dict(
        {"prompt": [s[0] for s in split], "chosen": [s[1] for s in split], "rejected": [s[2] for s in split]}
    )
    extras = [name for name in dataset.column_names if name not in PROMPT_COLUMNS]
    if not extras:
        return head
    # rebuild in one table (no index flattening pass) and keep the extra columns' own feature types
    features = datasets.Features({**head.features, **{name: dataset.features[name] for name in extras}})
    values = {**head.to_dict(), **_columns(dataset, extras)}
    return datasets.Dataset.from_dict(values, features=features)


def _split_pair(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    if isinstance(chosen, str):
        cut = implicit_prompt_length(chosen, rejected)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    cut = 0  # conversational: the longest run of identical leading messages is the prompt
    while cut < min(len(chosen), len(rejected)) and _clean_message(chosen[cut]) == _clean_message(rejected[cut]):
        cut += 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def implicit_prompt_length(chosen: str, rejected: str) -> int:
    """Length of the prompt shared by two full dialogues.

    The end of the last ``"\\n\\nAssistant:"`` inside their common prefix when there is one (HH format);
    else the common prefix backed off to the start of its last whitespace run, so that the split falls
    between words and each completion begins with whitespace (``"The movie was" | " great"``), the way
    BPE tokenizers see a word. With no whitespace to back off to, the whole common prefix.
    """
    common = os.path.commonprefix([chosen, rejected])
    marker = common.rfind(ASSISTANT_MARKER)
    if marker >= 0:
        return marker + len(ASSISTANT_MARKER)
    cut = len(common)
    while cut > 0 and not common[cut - 1].isspace():  # back over a partly shared word ("gr" of great/grim)
        cut -= 1
    while cut > 0 and common[cut - 1].isspace():  # and over the whitespace, which goes to the completion
        cut -= 1
    return cut if cut > 0 else len(common)


# ----------------------------------------------------------------------------------------------- validation


def validate_preferences(
    dataset: datasets.Dataset | Sequence[Mapping[str, Any]], source_name: str = "data"
) -> None:
    """Raise ``ValueError`` on the first problem, naming ``source_name``, the row (from 1) and the column.

    Checks: the columns ``prompt``, ``chosen``, ``rejected`` exist; no value is null or of the wrong type;
    messages are ``{"role": str, "content": str}``; a row uses one format; completions are not empty;
    ``chosen`` differs from ``rejected``; there is at least one row.
    """
    if not isinstance(dataset, datasets.Dataset):
        _check_mappings(dataset, source_name)
    names = dataset.column_names if isinstance(dataset, datasets.Dataset) else _row_keys(dataset)
    _check_columns(names, source_name, implicit_ok=False)
    columns = _columns(dataset, PROMPT_COLUMNS)
    if not columns["chosen"]:
        raise ValueError(f"{source_name}: contains no rows")
    _check_cells(columns, source_name, PROMPT_COLUMNS)
    _check_pairs(columns, source_name)


def _check_columns(names: Sequence[str], source_name: str, implicit_ok: bool) -> None:
    needed = COMPLETION_COLUMNS if implicit_ok else PROMPT_COLUMNS
    missing = [c for c in needed if c not in names]
    if missing:
        shown = ", ".join(map(repr, names)) if names else "none"
        expected = "'prompt' (optional), 'chosen', 'rejected'" if implicit_ok else "'prompt', 'chosen', 'rejected'"
        hint = "; load_preferences splits implicit-prompt data" if missing == ["prompt"] else ""
        raise ValueError(
            f"{source_name}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
            f"(found {shown}; expected {expected}{hint})"
        )


def _check_cells(columns: Mapping[str, Sequence[Any]], source_name: str, names: Sequence[str]) -> None:
    """Type checks row by row, so the first bad row is the one reported; one format for every cell."""
    first_kind = None
    for row, values in enumerate(zip(*(columns[name] for name in names)), start=1):
        for name, value in zip(names, values):
            problem = _cell_problem(value)
            if problem:
                raise ValueError(f"{source_name}, row {row}, column '{name}': {problem}")
            first_kind = first_kind or _kind(value)
            if _kind(value) != first_kind:
                raise ValueError(
                    f"{source_name}, row {row}, column '{name}': is {_kind(value)} but row 1, column "
                    f"'{names[0]}' is {first_kind}; use one format (all text or all message lists)"
                )


def _kind(value: Any) -> str:
    return "text" if isinstance(value, str) else "a list of messages"


def _cell_problem(value: Any) -> str | None:
    if value is _MISSING:
        return "value is missing (expected a string)"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "value is null (expected a string)"
    if isinstance(value, str):
        return None
    if isinstance(value, list):
        return _messages_problem(value)
    return f"value is {_show(value)} of type {type(value).__name__} (expected a string)"


def _messages_problem(messages: list[Any]) -> str | None:
    for index, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping):
            return f"message {index} is {_show(message)} (expected a dict with 'role' and 'content')"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"message {index} has {key!r} = {_show(message.get(key))} (expected a string)"
    return None


def _check_pairs(columns: Mapping[str, Sequence[Any]], source_name: str) -> None:
    for row, (chosen, rejected) in enumerate(zip(columns["chosen"], columns["rejected"]), start=1):
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if _is_empty(value):
                raise ValueError(f"{source_name}, row {row}, column '{name}': completion is empty")
        if _same(chosen, rejected):
            raise ValueError(
                f"{source_name}, row {row}, column 'rejected': identical to 'chosen' (a pair must differ)"
            )


def _is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not any(m["content"].strip() for m in value)


def _same(chosen: Any, rejected: Any) -> bool:
    if isinstance(chosen, str):
        return chosen == rejected
    return [_clean_message(m) for m in chosen] == [_clean_message(m) for m in rejected]


# ------------------------------------------------------------------------------------------- tokenization


@dataclass
class TokenizeReport:
    """What ``tokenize_preferences`` did: counts of rows kept, truncated and dropped."""

    n_rows: int
    n_kept: int
    n_truncated: int
    n_dropped: int
    boundary_fixes: int
    max_length: int
    max_prompt_length: int

    def __str__(self) -> str:
        return (
            f"tokenized {self.n_rows} rows: {self.n_kept} kept, {self.n_truncated} truncated, "
            f"{self.n_dropped} dropped (prompt too long), {self.boundary_fixes} with a token merge across "
            f"the prompt/completion boundary avoided (max_length={self.max_length}, "
            f"max_prompt_length={self.max_prompt_length})"
        )


def tokenize_preferences(
    dataset: datasets.Dataset | Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 128,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    show_progress: bool = False,
) -> tuple[list[dict[str, list[int]]], TokenizeReport]:
    """Tokenize validated preference rows into ids and labels ready for ``PreferenceCollator``.

    Each returned dict has ``prompt_input_ids``, ``chosen_input_ids``, ``chosen_labels``,
    ``rejected_input_ids``, ``rejected_labels`` (lists of ints). ``*_input_ids`` is prompt + completion;
    ``*_labels`` is the same with -100 on the prompt tokens.

    Prefix property: the prompt and each completion are tokenized separately and their ids concatenated,
    so the prompt's ids are always a prefix of the full ids and the label mask is exact. The price: a BPE
    merge across the boundary (e.g. a prompt ending in a space) is never formed; rows where tokenizing
    prompt + completion jointly would have given other ids are counted in ``report.boundary_fixes``.
    No special tokens are added (``add_special_tokens=False``) except what a chat template writes, a
    lone BOS as the prompt when the prompt is empty (so the first completion token still has a context
    to be predicted from), and BOS before the prompt when the tokenizer puts one there at inference
    (``tokenizer(prompt)`` starts with BOS, as Llama's does; GPT-2's does not): training then scores the
    sequences that generation sees, as TRL does. EOS is appended to each completion unless it already ends with EOS, or (for
    conversational data) the chat template already closed the turn with it.

    Truncation policy, applied when prompt + the longer completion exceeds ``max_length``:
    1. the prompt is cut to ``max_prompt_length`` tokens (default ``max_length // 2``), keeping its END,
       the part nearest the answer;
    2. each completion is cut to the room left, keeping its start (``truncation_mode="keep_start"``) or
       its end (``"keep_end"``); a completion cut at its start loses its EOS, as it should: it did not end;
    3. a row whose prompt leaves no room for one completion token (possible only when
       ``max_prompt_length >= max_length``) is dropped.
    Raises ``ValueError`` on bad data, a tokenizer without EOS, conversational data without a chat
    template, bad lengths, or when every row is dropped.
    """
    policy = _Policy.build(tokenizer, max_length, max_prompt_length, truncation_mode)
    validate_preferences(dataset, "dataset")
    columns = _columns(dataset, PROMPT_COLUMNS)
    conversational = not isinstance(columns["chosen"][0], str)  # validation made every cell the same kind
    if conversational:
        _check_chat_template(tokenizer)
    n_rows = len(columns["chosen"])
    report = TokenizeReport(n_rows, 0, 0, 0, 0, policy.max_length, policy.max_prompt_length)
    features: list[dict[str, list[int]]] = []
    with tqdm(total=n_rows, desc="tokenizing", disable=not show_progress) as bar:
        for start in range(0, n_rows, _CHUNK):
            rows = range(start, min(start + _CHUNK, n_rows))
            texts = [_row_texts(columns, i, tokenizer, conversational) for i in rows]
            for ids, boundary_fix in _tokenize_chunk(texts, tokenizer):
                feature, truncated = policy.assemble(*ids, conversational)
                report.boundary_fixes += boundary_fix
                if feature is None:
                    report.n_dropped += 1
                else:
                    report.n_truncated += truncated
                    features.append(feature)
            bar.update(len(rows))
    report.n_kept = len(features)
    if not features:
        raise ValueError(
            f"all {n_rows} rows were dropped: no prompt leaves room for a completion token within "
            f"max_length={policy.max_length} (max_prompt_length={policy.max_prompt_length}); raise "
            "max_length or lower max_prompt_length"
        )
    return features, report


@dataclass(frozen=True)
class _Policy:
    """The EOS and truncation rules of ``tokenize_preferences``, applied to one row at a time."""

    max_length: int
    max_prompt_length: int
    truncation_mode: str
    eos_id: int
    bos_id: int | None

    @classmethod
    def build(cls, tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int | None,
              truncation_mode: str) -> _Policy:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token (tokenizer.eos_token is None); set one first")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        if max_prompt_length is None:
            max_prompt_length = max_length // 2
        if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be an integer >= 1, got {max_prompt_length!r}")
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
        bos = tokenizer.bos_token_id
        return cls(max_length, max_prompt_length, truncation_mode, int(tokenizer.eos_token_id),
                   None if bos is None else int(bos))

    def assemble(self, prompt: list[int], chosen: list[int], rejected: list[int],
                 conversational: bool) -> tuple[dict[str, list[int]] | None, bool]:
        """One row's feature dict and whether it was truncated; None when the row must be dropped."""
        if not prompt and self.bos_id is not None:
            prompt = [self.bos_id]
        chosen, rejected = self.with_eos(chosen, conversational), self.with_eos(rejected, conversational)
        truncated = False
        too_long = len(prompt) + max(len(chosen), len(rejected)) > self.max_length
        if too_long and len(prompt) > self.max_prompt_length:
            prompt = prompt[-self.max_prompt_length:]  # keep the end: the words nearest the answer matter most
            truncated = True
        room = self.max_length - len(prompt)
        if room < 1:
            return None, truncated
        if max(len(chosen), len(rejected)) > room:
            truncated = True
            keep = slice(None, room) if self.truncation_mode == "keep_start" else slice(-room, None)
            chosen, rejected = chosen[keep], rejected[keep]
        feature = {"prompt_input_ids": list(prompt)}
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            feature[f"{name}_input_ids"] = prompt + completion
            feature[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt) + completion
        return feature, truncated

    def with_eos(self, completion: list[int], conversational: bool) -> list[int]:
        # a chat template that closes the turn with EOS (then perhaps "\n") needs no second one
        if (completion and completion[-1] == self.eos_id) or (conversational and self.eos_id in completion):
            return list(completion)
        return completion + [self.eos_id]


def _check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the data is conversational (lists of messages) but the tokenizer has no chat_template; "
            "set tokenizer.chat_template or give the data as prompt/chosen/rejected strings"
        )


def _row_texts(columns: Mapping[str, Sequence[Any]], i: int, tokenizer: PreTrainedTokenizerBase,
               conversational: bool) -> tuple[str, str, str]:
    """The prompt and the two completions of row ``i`` as strings (rendering messages if needed)."""
    prompt, chosen, rejected = (columns[c][i] for c in PROMPT_COLUMNS)
    if not conversational:
        return prompt, chosen, rejected
    return _render(prompt, chosen, rejected, tokenizer, i + 1)


def _render(prompt: list[Any], chosen: list[Any], rejected: list[Any], tokenizer: PreTrainedTokenizerBase,
            row: int) -> tuple[str, str, str]:
    """Render one conversational row with the chat template and cut it into prompt and completions."""
    prompt_msgs = [_clean_message(m) for m in prompt]
    try:
        fulls = [tokenizer.apply_chat_template(prompt_msgs + [_clean_message(m) for m in answer], tokenize=False)
                 for answer in (chosen, rejected)]
        # the generation prompt (e.g. "<|assistant|>") belongs to the prompt, so it is never a label;
        # templates whose generation prompt is not what a finished turn renders fall back to the bare prompt
        candidates = [tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True),
                      tokenizer.apply_chat_template(prompt_msgs, tokenize=False)] if prompt_msgs else [""]
    except Exception as error:  # jinja2 errors from a template that rejects these messages
        raise ValueError(f"dataset, row {row}: the chat template failed ({_first_line(error)})") from None
    for text in candidates:
        if all(full.startswith(text) for full in fulls):
            return text, fulls[0][len(text):], fulls[1][len(text):]
    raise ValueError(
        f"dataset, row {row}: the chat template does not render the prompt as a prefix of the whole "
        "conversation, so the completions cannot be separated from it"
    )


def inference_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """BOS's id when ``tokenizer(text)`` (special tokens on, as at inference) puts BOS before the text, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return int(bos) if with_special[:1] == [bos] and plain[:1] != [bos] else None


def _tokenize_chunk(texts: list[tuple[str, str, str]],
                    tokenizer: PreTrainedTokenizerBase) -> Iterable[tuple[tuple[list[int], ...], bool]]:
    """Yield each row's (prompt, chosen, rejected) ids, and whether joint tokenization would differ."""
    prompts, chosens, rejecteds = (list(column) for column in zip(*texts))
    bos = inference_bos(tokenizer)

    def encode(strings: list[str], with_bos: bool = False) -> list[list[int]]:
        ids = tokenizer(strings, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if with_bos and bos is not None:  # as tokenizer(prompt) at inference; a chat template may have written it
            ids = [row if row[:1] == [bos] else [bos] + row for row in ids]
        return ids

    prompt_ids, chosen_ids, rejected_ids = encode(prompts, True), encode(chosens), encode(rejecteds)
    joint_chosen = encode([p + c for p, c in zip(prompts, chosens)], True)
    joint_rejected = encode([p + r for p, r in zip(prompts, rejecteds)], True)
    for i, prompt in enumerate(prompt_ids):
        differs = joint_chosen[i] != prompt + chosen_ids[i] or joint_rejected[i] != prompt + rejected_ids[i]
        yield (prompt, chosen_ids[i], rejected_ids[i]), differs


# ---------------------------------------------------------------------------------------------- collation


class PreferenceCollator:
    """Pad tokenized pairs into a batch for one concatenated (2B, T) forward.

    ``__call__(features)`` returns LongTensors ``chosen_input_ids``, ``chosen_attention_mask``,
    ``chosen_labels``, ``rejected_input_ids``, ``rejected_attention_mask``, ``rejected_labels``, each
    (B, T), right-padded: ids with ``pad_token_id``, attention with 0, labels with -100. Chosen and
    rejected share T (the longest row of either) so they can be stacked with ``torch.cat``. Extra scalar
    features (e.g. precomputed ``reference_chosen_logps``) are passed through as (B,) tensors.
    """

    _SEQUENCES = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")

    def __init__(self, pad_token_id: int | None) -> None:
        if pad_token_id is None:
            raise ValueError(
                "pad_token_id is None: the tokenizer has no pad token; set tokenizer.pad_token "
                "(for example to tokenizer.eos_token; padding is masked out, so any id works)"
            )
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        self._check(features)
        length = max(len(f[f"{side}_input_ids"]) for f in features for side in COMPLETION_COLUMNS)
        batch: dict[str, torch.Tensor] = {}
        for side in COMPLETION_COLUMNS:
            ids = [f[f"{side}_input_ids"] for f in features]
            batch[f"{side}_input_ids"] = _pad(ids, length, self.pad_token_id)
            batch[f"{side}_attention_mask"] = _pad([[1] * len(x) for x in ids], length, 0)
            batch[f"{side}_labels"] = _pad([f[f"{side}_labels"] for f in features], length, IGNORE_INDEX)
        for key, value in features[0].items():  # e.g. precomputed reference log-probs, KTO flags
            if key not in batch and isinstance(value, (bool, int, float, torch.Tensor)):
                batch[key] = torch.stack([torch.as_tensor(f[key]) for f in features])
        return batch

    def _check(self, features: Sequence[Mapping[str, Any]]) -> None:
        for index, feature in enumerate(features):
            missing = [k for k in self._SEQUENCES if k not in feature]
            if missing:
                raise ValueError(f"feature {index} lacks {', '.join(missing)} (use tokenize_preferences)")
            for side in COMPLETION_COLUMNS:
                if len(feature[f"{side}_input_ids"]) != len(feature[f"{side}_labels"]):
                    raise ValueError(f"feature {index}: {side}_input_ids and {side}_labels differ in length")


def _pad(rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
    # padded in Python, then one tensor: a single call instead of one small copy per row (2x faster)
    return torch.tensor([list(row) + [value] * (length - len(row)) for row in rows], dtype=torch.long)


# ------------------------------------------------------------------------------------------------ helpers


def _columns(dataset: datasets.Dataset | Sequence[Mapping[str, Any]],
             names: Sequence[str]) -> dict[str, list[Any]]:
    """Plain Python lists per column (``ds[col][:]`` is the fast Arrow path and honours select/shuffle)."""
    if isinstance(dataset, datasets.Dataset):
        plain = dataset.with_format(None)
        return {name: plain[name][:] for name in names}
    return {name: [row.get(name, _MISSING) for row in dataset] for name in names}


def _row_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def _clean_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """Drop keys that are None: Arrow gives every message every key seen in the column."""
    return {key: value for key, value in message.items() if value is not None}


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
