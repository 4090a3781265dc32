"""Tests for minidpo.data: loading every source type, validation errors, tokenization, collation."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minidpo.data import (
    PreferenceCollator,
    TokenizeReport,
    implicit_prompt_length,
    load_preferences,
    tokenize_preferences,
    validate_preferences,
)

ROWS = [
    {"prompt": "The movie was", "chosen": " great and fun", "rejected": " long"},
    {"prompt": "I thought the plot", "chosen": " was clever", "rejected": " was dull and slow"},
    {"prompt": "Overall", "chosen": " a good film", "rejected": " a bad film"},
]
WORDS = "the movie was great and fun long i thought plot clever dull slow overall a good bad film hi hello no".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per lower-cased word, so lengths in the tests can be counted by eye."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    return wrapped


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE like GPT-2's, trained on a few sentences, with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    sentences = ["The movie was great and fun.", "The movie was terrible and long.", "hi hello no"] * 5
    tok.train_from_iterator(sentences, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- sources


def test_load_jsonl_json_and_columnar_json(tmp_path: Path) -> None:
    from_jsonl = load_preferences(write_jsonl(tmp_path / "data.jsonl", ROWS))
    assert from_jsonl.column_names == ["prompt", "chosen", "rejected"]
    assert from_jsonl[1] == ROWS[1]
    (tmp_path / "records.json").write_text(json.dumps(ROWS))
    assert load_preferences(str(tmp_path / "records.json"))["chosen"][:] == [r["chosen"] for r in ROWS]
    columnar = {key: [r[key] for r in ROWS] for key in ROWS[0]}
    (tmp_path / "columns.json").write_text(json.dumps(columnar))
    assert load_preferences(tmp_path / "columns.json")[2] == ROWS[2]


def test_load_csv_keeps_every_value_a_string(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('prompt,chosen,rejected\nWhat is 6*7?,42,41\n"two\nlines",yes,no\n', encoding="utf-8")
    loaded = load_preferences(path)
    assert loaded["chosen"][:] == ["42", "yes"]  # not guessed to be integers
    assert loaded[1]["prompt"] == "two\nlines"


def test_load_parquet_and_save_to_disk_folders(tmp_path: Path) -> None:
    table = datasets.Dataset.from_list(ROWS)
    table.to_parquet(str(tmp_path / "data.parquet"))
    assert load_preferences(tmp_path / "data.parquet")[0] == ROWS[0]
    table.save_to_disk(str(tmp_path / "single"))
    assert len(load_preferences(tmp_path / "single")) == 3
    datasets.DatasetDict({"train": table, "test": table.select([2])}).save_to_disk(str(tmp_path / "dict"))
    test_split = load_preferences(tmp_path / "dict", split="test")
    assert test_split[:] == {key: [ROWS[2][key]] for key in ROWS[0]}
    with pytest.raises(ValueError, match=r"dict: has no split 'validation' \(it has 'train', 'test'\)"):
        load_preferences(tmp_path / "dict", split="validation")


def test_load_in_memory_keeps_extra_columns() -> None:
    rows = [dict(row, score=i) for i, row in enumerate(ROWS)]
    assert load_preferences(rows)["score"][:] == [0, 1, 2]
    assert load_preferences(datasets.Dataset.from_list(rows))[1]["chosen"] == " was clever"


def test_hub_id_offline_and_missing_file_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "load_dataset", _offline)
    with pytest.raises(ValueError, match=r"nobody/nothing: not a local file or folder, and loading it from the "
                                         r"Hugging Face Hub with split='train' failed \(ConnectionError"):
        load_preferences("nobody/nothing")
    with pytest.raises(ValueError, match=r"missing\.jsonl: no such file"):
        load_preferences(tmp_path / "missing.jsonl")


def _offline(*args: object, **kwargs: object) -> None:
    raise ConnectionError("Couldn't reach the Hub (offline)")


# ------------------------------------------------------------------------------------------ implicit prompt


def test_implicit_prompt_splits_at_last_assistant_marker_of_shared_prefix() -> None:
    history = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Can you help?\n\nAssistant:"
    rows = [{"chosen": history + " I can help.", "rejected": history + " I cannot.", "id": 7}]
    loaded = load_preferences(rows)
    assert loaded[0] == {"prompt": history, "chosen": " I can help.", "rejected": " I cannot.", "id": 7}


def test_implicit_prompt_without_marker_backs_off_to_a_word_boundary() -> None:
    assert implicit_prompt_length("The movie was great", "The movie was grim") == len("The movie was")
    assert implicit_prompt_length("The movie was great", "The movie was terrible") == len("The movie was")
    assert implicit_prompt_length("abc", "abd") == 2  # no whitespace: the whole common prefix
    loaded = load_preferences([{"chosen": "I like it", "rejected": "I like it a lot"}])
    assert loaded[0] == {"prompt": "I like", "chosen": " it", "rejected": " it a lot"}


def test_implicit_conversational_splits_at_shared_messages() -> None:
    user = {"role": "user", "content": "hi"}
    rows = [{"chosen": [user, {"role": "assistant", "content": "hello"}],
             "rejected": [user, {"role": "assistant", "content": "no"}]}]
    loaded = load_preferences(rows)
    assert loaded[0]["prompt"] == [user]
    assert loaded[0]["chosen"] == [{"role": "assistant", "content": "hello"}]
    assert loaded[0]["rejected"] == [{"role": "assistant", "content": "no"}]


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": None, "rejected": "b"},
         r"row 3, column 'chosen': value is null \(expected a string\)$"),
        ({"prompt": "p", "chosen": "a", "rejected": 5}, r"row 3, column 'rejected': value is 5 of type int"),
        ({"prompt": "p", "chosen": "  ", "rejected": "b"}, r"row 3, column 'chosen': completion is empty"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, r"row 3, column 'rejected': identical to 'chosen'"),
        ({"prompt": "p", "chosen": "a"}, r"row 3, column 'rejected': value is missing"),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, r"row 3, column 'prompt': value is null"),
    ],
)
def test_bad_rows_name_file_row_and_column(tmp_path: Path, row: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [ROWS[0], ROWS[1], row])
    with pytest.raises(ValueError, match=r"data\.jsonl, " + message):
        load_preferences(path)


def test_missing_columns_list_what_is_there_and_what_is_needed(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"data\.jsonl: missing columns 'chosen', 'rejected' \(found 'question', "
                                         r"'answer'; expected 'prompt' \(optional\), 'chosen', 'rejected'\)"):
        load_preferences(path)
    with pytest.raises(ValueError, match=r"pairs: missing column 'prompt' \(found 'chosen', 'rejected'.*splits"):
        validate_preferences(datasets.Dataset.from_list([{"chosen": "a", "rejected": "b"}]), "pairs")


def test_malformed_json_line_is_reported_by_line_number(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + '\n{"prompt": "p", "chosen": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.jsonl, line 2: not valid JSON"):
        load_preferences(path)


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\nd,e\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.csv, row 2 \(line 3\): has 2 fields but the header has 3"):
        load_preferences(path)


def test_parquet_non_string_cell(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"prompt": ["p", "q"], "chosen": [1, 2], "rejected": [3, 4]}).to_parquet(
        str(tmp_path / "data.parquet"))
    with pytest.raises(ValueError, match=r"data\.parquet, row 1, column 'chosen': value is 1 of type int"):
        load_preferences(tmp_path / "data.parquet")


def test_messages_and_format_mixing_errors() -> None:
    bad_message = [{"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "assistant", "content": "b"}]}]
    with pytest.raises(ValueError, match=r"rows, row 1, column 'prompt': message 1 has 'content' = None"):
        load_preferences(bad_message)
    mixed = [ROWS[0], {"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}]
    with pytest.raises(ValueError, match=r"rows, row 2, column 'chosen': is a list of messages but row 1"):
        load_preferences(mixed)
    with pytest.raises(ValueError, match=r"rows: contains no rows"):
        load_preferences([])


# ---------------------------------------------------------------------------------------------- tokenizing


def test_prompt_is_prefix_labels_mask_prompt_and_eos_is_appended(word_tokenizer: PreTrainedTokenizerFast) -> None:
    features, report = tokenize_preferences(load_preferences(ROWS), word_tokenizer, max_length=32)
    eos = word_tokenizer.eos_token_id
    first = features[0]
    prompt = ids(word_tokenizer, "the movie was")
    assert first["prompt_input_ids"] == prompt and len(prompt) == 3
    assert first["chosen_input_ids"] == prompt + ids(word_tokenizer, "great and fun") + [eos]
    assert first["rejected_input_ids"] == prompt + ids(word_tokenizer, "long") + [eos]
    for feature in features:
        n = len(feature["prompt_input_ids"])
        for side in ("chosen", "rejected"):
            full, labels = feature[f"{side}_input_ids"], feature[f"{side}_labels"]
            assert full[:n] == feature["prompt_input_ids"]
            assert labels == [-100] * n + full[n:]
            assert full[-1] == eos and full.count(eos) == 1
    assert (report.n_rows, report.n_kept, report.n_truncated, report.n_dropped) == (3, 3, 0, 0)


def test_boundary_fixes_counts_merges_across_the_prompt_boundary(bpe_tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [{"prompt": "The movie was ", "chosen": "great", "rejected": "terrible"},  # space ends the prompt
            {"prompt": "The movie was", "chosen": " great", "rejected": " terrible"}]
    features, report = tokenize_preferences(rows, bpe_tokenizer, max_length=64)
    assert report.boundary_fixes == 1
    joint = ids(bpe_tokenizer, "The movie was great")
    assert features[1]["chosen_input_ids"][:-1] == joint  # no space at the boundary: identical to joint
    assert features[0]["chosen_input_ids"][:-1] != joint  # prompt tokenized alone keeps its trailing space
    assert features[0]["prompt_input_ids"] == ids(bpe_tokenizer, "The movie was ")


def test_truncation_keeps_prompt_end_and_completion_start(word_tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [{"prompt": "i thought the plot was", "chosen": "clever and fun", "rejected": "dull"},  # 5 + 4 tokens
            {"prompt": "overall", "chosen": "a good film", "rejected": "a bad film"}]  # 1 + 4 tokens: fits
    features, report = tokenize_preferences(rows, word_tokenizer, max_length=6, max_prompt_length=3)
    eos = word_tokenizer.eos_token_id
    assert features[0]["prompt_input_ids"] == ids(word_tokenizer, "the plot was")  # the end is kept
    assert features[0]["chosen_input_ids"] == ids(word_tokenizer, "the plot was clever and fun")  # EOS cut off
    assert features[0]["rejected_input_ids"] == ids(word_tokenizer, "the plot was dull") + [eos]
    assert features[1]["chosen_input_ids"] == ids(word_tokenizer, "overall a good film") + [eos]
    assert (report.n_kept, report.n_truncated, report.n_dropped) == (2, 1, 0)
    keep_end, _ = tokenize_preferences(rows, word_tokenizer, max_length=6, max_prompt_length=3,
                                       truncation_mode="keep_end")
    assert keep_end[0]["chosen_input_ids"] == ids(word_tokenizer, "the plot was and fun") + [eos]


def test_rows_whose_prompt_leaves_no_room_are_dropped_and_counted(word_tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [{"prompt": "i thought the plot was", "chosen": "clever", "rejected": "dull"},  # 5-token prompt
            {"prompt": "overall", "chosen": "good", "rejected": "bad"}]
    features, report = tokenize_preferences(rows, word_tokenizer, max_length=5, max_prompt_length=5)
    assert len(features) == 1 and features[0]["prompt_input_ids"] == ids(word_tokenizer, "overall")
    assert (report.n_rows, report.n_kept, report.n_dropped, report.n_truncated) == (2, 1, 1, 0)
    assert str(report).startswith("tokenized 2 rows: 1 kept, 0 truncated, 1 dropped")
    with pytest.raises(ValueError, match=r"all 1 rows were dropped"):
        tokenize_preferences(rows[:1], word_tokenizer, max_length=5, max_prompt_length=5)


def test_tokenizer_and_argument_errors(word_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=r"truncation_mode must be one of"):
        tokenize_preferences(ROWS, word_tokenizer, truncation_mode="middle")
    with pytest.raises(ValueError, match=r"max_length must be an integer >= 2, got 1"):
        tokenize_preferences(ROWS, word_tokenizer, max_length=1)
    with pytest.raises(ValueError, match=r"dataset, row 3, column 'rejected': identical to 'chosen'"):
        tokenize_preferences([*ROWS[:2], {"prompt": "p", "chosen": "x", "rejected": "x"}], word_tokenizer)
    no_eos = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer.backend_tokenizer, pad_token="<pad>")
    with pytest.raises(ValueError, match=r"the tokenizer has no EOS token"):
        tokenize_preferences(ROWS, no_eos)


def test_empty_prompt_gets_a_bos_context(bpe_tokenizer: PreTrainedTokenizerFast) -> None:
    features, _ = tokenize_preferences([{"prompt": "", "chosen": "hi", "rejected": "no"}], bpe_tokenizer)
    assert features[0]["prompt_input_ids"] == [bpe_tokenizer.bos_token_id]
    assert features[0]["chosen_labels"][0] == -100 and features[0]["chosen_labels"][1:] == \
        ids(bpe_tokenizer, "hi") + [bpe_tokenizer.eos_token_id]


def test_conversational_rows_use_the_chat_template(bpe_tokenizer: PreTrainedTokenizerFast) -> None:
    user = {"role": "user", "content": "hi"}
    rows = [{"prompt": [user], "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "no"}]}]
    features, report = tokenize_preferences(load_preferences(rows), bpe_tokenizer, max_length=64)
    prompt = ids(bpe_tokenizer, "<user>hi<eos><assistant>")  # the generation prompt belongs to the prompt
    assert features[0]["prompt_input_ids"] == prompt
    # the template closes the turn with <eos>: no second EOS is appended
    assert features[0]["chosen_input_ids"] == prompt + ids(bpe_tokenizer, "hello<eos>")
    assert features[0]["rejected_labels"] == [-100] * len(prompt) + ids(bpe_tokenizer, "no<eos>")
    assert report.n_kept == 1


def test_conversational_rows_need_a_chat_template(word_tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "no"}]}]
    with pytest.raises(ValueError, match=r"conversational .* the tokenizer has no chat_template"):
        tokenize_preferences(rows, word_tokenizer)


# ----------------------------------------------------------------------------------------------- collating


def test_collator_pads_chosen_and_rejected_to_one_length(word_tokenizer: PreTrainedTokenizerFast) -> None:
    features, _ = tokenize_preferences(ROWS, word_tokenizer, max_length=32)
    for i, feature in enumerate(features):
        feature["reference_chosen_logps"] = -1.5 * i
    batch = PreferenceCollator(word_tokenizer.pad_token_id)(features)
    longest = max(len(f[f"{s}_input_ids"]) for f in features for s in ("chosen", "rejected"))
    assert longest == 9  # "i thought the plot" + "was dull and slow" + EOS
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_input_ids"].shape == (3, longest)
        assert batch[f"{side}_input_ids"].dtype == torch.long
    row = features[0]["rejected_input_ids"]  # "the movie was long <eos>": 5 tokens, then 4 of padding
    assert batch["rejected_input_ids"][0].tolist() == row + [word_tokenizer.pad_token_id] * 4
    assert batch["rejected_attention_mask"][0].tolist() == [1] * 5 + [0] * 4
    assert batch["rejected_labels"][0].tolist() == [-100] * 3 + row[3:] + [-100] * 4
    assert batch["chosen_attention_mask"].sum().item() == sum(len(f["chosen_input_ids"]) for f in features)
    assert batch["reference_chosen_logps"].tolist() == [0.0, -1.5, -3.0]
    assert torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).shape == (6, longest)


def test_collator_needs_a_pad_token() -> None:
    with pytest.raises(ValueError, match=r"pad_token_id is None"):
        PreferenceCollator(None)


def test_report_is_one_line() -> None:
    report = TokenizeReport(10, 8, 3, 2, 1, 128, 64)
    assert str(report) == (
        "tokenized 10 rows: 8 kept, 3 truncated, 2 dropped (prompt too long), 1 with a token merge across "
        "the prompt/completion boundary avoided (max_length=128, max_prompt_length=64)"
    )


# ------------------------------------------------------------------------- issue 12: bytes, bars, BOS


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_non_utf8_byte_is_named_by_file_and_line(tmp_path, suffix):
    good = {"prompt": "a", "chosen": " b", "rejected": " c"}
    if suffix == ".jsonl":
        body = (json.dumps(good) + "\n").encode() + b'{"prompt": "caf\xe9", "chosen": " b", "rejected": " c"}\n'
    elif suffix == ".json":
        body = b'[\n' + json.dumps(good).encode() + b',\n{"prompt": "caf\xe9", "chosen": " b", "rejected": " c"}\n]'
    else:
        body = b"prompt,chosen,rejected\na, b, c\ncaf\xe9, b, c\n"
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(body)
    line = {".jsonl": 2, ".json": 3, ".csv": 3}[suffix]
    with pytest.raises(ValueError, match=rf"latin1\{suffix}, line {line}: not UTF-8 text \(byte 0xe9\)"):
        load_preferences(str(path))


def test_reading_parquet_prints_no_progress_bar(tmp_path, capsys):
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "pairs.parquet"))
    capsys.readouterr()
    loaded = load_preferences(str(tmp_path / "pairs.parquet"))
    out, err = capsys.readouterr()
    assert len(loaded) == 3 and "Generating" not in err + out and err == ""


def _with_inference_bos(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The same tokenizer, but tokenizer(text) puts <bos> first, as Llama's does at inference."""
    from tokenizers.processors import TemplateProcessing

    copy = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()),
                                   eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")
    copy.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", copy.convert_tokens_to_ids("<bos>"))])
    return copy


def test_bos_is_added_as_the_tokenizer_adds_it_at_inference(bpe_tokenizer):
    llama_like = _with_inference_bos(bpe_tokenizer)
    bos = llama_like.convert_tokens_to_ids("<bos>")
    assert llama_like("The movie")["input_ids"][0] == bos  # the premise: inference starts with BOS
    rows = [{"prompt": "The movie was", "chosen": " great and fun.", "rejected": " terrible and long."}]
    features, _ = tokenize_preferences(rows, llama_like, max_length=64)
    # independent of minidpo: what tokenizer(prompt) gives at inference, then the completion, then EOS
    prompt = llama_like("The movie was")["input_ids"]
    assert features[0]["prompt_input_ids"] == prompt
    assert features[0]["chosen_input_ids"] == prompt + ids(llama_like, " great and fun.") + [llama_like.eos_token_id]
    assert features[0]["chosen_labels"][:len(prompt)] == [-100] * len(prompt)
    # negative control: a tokenizer that adds nothing at inference (GPT-2-like) gets no BOS
    plain, _ = tokenize_preferences(rows, bpe_tokenizer, max_length=64)
    assert bpe_tokenizer("The movie")["input_ids"][0] != bpe_tokenizer.bos_token_id
    assert plain[0]["prompt_input_ids"] == ids(bpe_tokenizer, "The movie was")
