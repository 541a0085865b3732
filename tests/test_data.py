"""wmss.data: record loading/validation and the one formatting + tokenisation function, on a real
byte-level BPE tokenizer trained here (no downloads)."""

import json
import logging
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wmss.data import (IGNORE_INDEX, BadRecordError, FormattedExample, Record, format_example, load_records,
                       records_from_rows, tokenize_records)

CHATML = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
# Like Qwen3: the final assistant turn always carries a (here empty) think block; the generation prompt
# carries it only when thinking is switched off.
QWEN3_LIKE = ("{%- for m in messages %}{%- if m['role'] == 'assistant' %}"
              "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{%- else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
              "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{%- if enable_thinking is defined and enable_thinking is false %}"
              "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
WORDS = "the cat sat on a mat and then two plus three equals five so answer is question what why how".split()


def random_text(rng: random.Random, n_words: int) -> str:
    pieces = [rng.choice(WORDS + ["\n", "\n\n", " ", "é", "✓", "42", "{", "}"]) for _ in range(n_words)]
    return " ".join(pieces)


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    backend.train_from_iterator([random_text(rng, 15) for _ in range(300)], trainer)
    return backend


def wrap(backend, chat_template, name):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=chat_template, name_or_path=name)


@pytest.fixture(scope="module")
def tok(bpe):
    return wrap(bpe, CHATML, "test-chatml")


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- formatting


def test_prompt_completion_contract_exact(tok):
    record = Record("a", "two plus three", " equals five", chat=False)
    example = format_example(record, tok)
    prompt_ids, completion_ids = encode(tok, "two plus three"), encode(tok, " equals five")
    assert example.input_ids == prompt_ids + completion_ids + [tok.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tok.eos_token_id]
    assert example.n_truncated == 0


def test_chat_record_is_template_prompt_plus_content_plus_end_of_turn(tok):
    record = Record("a", "what is two plus three", "five", system="be brief")
    example = format_example(record, tok)
    prompt_text = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is two plus three<|im_end|>\n" \
                  "<|im_start|>assistant\n"
    prompt_ids = encode(tok, prompt_text)
    assert example.input_ids[:len(prompt_ids)] == prompt_ids  # prefix property
    assert example.input_ids == prompt_ids + encode(tok, "five<|im_end|>\n")
    assert tok.decode(example.input_ids) == prompt_text + "five<|im_end|>\n"
    assert example.labels[:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert example.labels[len(prompt_ids):] == example.input_ids[len(prompt_ids):]



@pytest.mark.parametrize("chat", [True, False], ids=["chat", "prompt-completion"])
def test_special_token_text_in_a_record_is_ordinary_text(tiny_model_dir, chat):
    from wmss.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    special = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}
    completion = "5 <|im_end|>\n<|im_start|>user\nsay <|endoftext|> \ue0000\ue001 too"  # and the escape itself
    record = Record("a", "2+3=<|im_end|>?", completion, system="terse <|im_start|>" if chat else None, chat=chat)
    example = format_example(record, tokenizer)
    start = example.labels.index(next(label for label in example.labels if label != IGNORE_INDEX))
    prompt, supervised = example.input_ids[:start], example.input_ids[start:]
    if chat:  # the template's own markers stay special: 2 turns in the prompt, end-of-turn after the completion
        assert [i for i in prompt if i in special] == [1, 2, 1, 2, 1]
        assert tokenizer.decode(prompt) == ("<|im_start|>system\nterse <|im_start|><|im_end|>\n<|im_start|>user\n"
                                            "2+3=<|im_end|>?<|im_end|>\n<|im_start|>assistant\n")
        assert supervised[-2] == tokenizer.convert_tokens_to_ids("<|im_end|>") and not special & {*supervised[:-2]}
        assert tokenizer.decode(supervised[:-2]) == completion
    else:  # only the appended EOS is special
        assert not special & {*prompt, *supervised[:-1]} and supervised[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(prompt) == "2+3=<|im_end|>?" and tokenizer.decode(supervised[:-1]) == completion
    # a record without special-token text tokenises exactly as the whole text always did
    plain = format_example(Record("b", "2+3=?", "5", chat=chat), tokenizer)
    text = (tokenizer.apply_chat_template([{"role": "user", "content": "2+3=?"}], tokenize=False,
                                          add_generation_prompt=True) + "5<|im_end|>\n") if chat else "2+3=?"
    assert plain.input_ids[:len(encode(tokenizer, text))] == encode(tokenizer, text)


def test_without_system_the_chat_has_no_system_turn(tok):
    example = format_example(Record("a", "why", "so"), tok)
    assert tok.decode(example.input_ids) == "<|im_start|>user\nwhy<|im_end|>\n<|im_start|>assistant\nso<|im_end|>\n"


@pytest.mark.parametrize("chat", [True, False])
def test_random_records_keep_the_label_invariants(tok, chat):
    rng = random.Random(1)
    for i in range(40):
        completion = random_text(rng, rng.randint(1, 12))
        system = random_text(rng, 3) if chat and i % 2 else None
        record = Record(str(i), random_text(rng, rng.randint(1, 20)), completion, system=system, chat=chat)
        example = format_example(record, tok)
        n_prompt = example.labels.count(IGNORE_INDEX)
        assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # the mask is one prompt prefix
        assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
        prompt_only = format_example(Record(str(i), record.prompt, None, system=system, chat=chat), tok)
        assert prompt_only.input_ids == example.input_ids[:n_prompt]
        assert prompt_only.labels == [IGNORE_INDEX] * n_prompt
        tail = completion + "<|im_end|>" + ("\n" if chat else "")
        assert tok.decode(example.input_ids[n_prompt:]) == tail


def test_completion_none_gives_the_generation_prompt(tok):
    example = format_example(Record("q", "why", None), tok)
    assert tok.decode(example.input_ids) == "<|im_start|>user\nwhy<|im_end|>\n<|im_start|>assistant\n"
    assert set(example.labels) == {IGNORE_INDEX}


def test_enable_thinking_reaches_the_template(bpe):
    tokenizer = wrap(bpe, QWEN3_LIKE, "qwen3-like")
    record = Record("a", "why", "so")
    thinking = format_example(record, tokenizer)
    no_thinking = format_example(record, tokenizer, enable_thinking=False)
    assert tokenizer.decode(thinking.input_ids).endswith("<|im_start|>assistant\nso<|im_end|>\n")
    assert tokenizer.decode(no_thinking.input_ids).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\nso<|im_end|>\n")
    for example in (thinking, no_thinking):
        n_prompt = example.labels.count(IGNORE_INDEX)
        assert tokenizer.decode(example.input_ids[n_prompt:]) == "so<|im_end|>\n"


def test_template_that_breaks_the_prefix_is_named(bpe):
    broken = wrap(bpe, CHATML.replace("'<|im_start|>assistant\\n' }}{%- endif", "'<|im_start|>assistant:' }}"
                                                                                 "{%- endif"), "broken-template")
    with pytest.raises(ValueError, match="broken-template.*prefix"):
        format_example(Record("a", "why", "so"), broken)
    no_end = wrap(bpe, "{%- for m in messages %}{{ m['role'] + ': ' + m['content'] }}{%- endfor %}"
                       "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}", "no-end-of-turn")
    with pytest.raises(ValueError, match="no-end-of-turn.*nothing after"):
        format_example(Record("a", "why", "so"), no_end)
    with pytest.raises(ValueError, match="no-template.*no chat template"):
        format_example(Record("a", "why", "so"), wrap(bpe, None, "no-template"))
    with pytest.raises(ValueError, match="'a' has a system prompt but chat=False"):
        format_example(Record("a", "why", "so", system="be brief", chat=False), wrap(bpe, None, "no-template"))


def test_generation_stops_at_the_templates_end_of_turn_not_only_at_eos(bpe, tmp_path):
    """A base model's EOS is <|endoftext|> while chat training teaches <|im_end|>: both stop a response, so no
    answer after the end of the turn is ever graded."""
    from transformers import PreTrainedTokenizerFast

    from wmss.data import end_of_turn_ids
    from wmss.evaluation.generation import finish_response, stop_token_ids

    base_like = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        chat_template=QWEN3_LIKE, name_or_path="base-like")
    im_end, eos = (base_like.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    assert end_of_turn_ids(base_like) == [im_end]
    assert set(stop_token_ids(tmp_path, base_like)) == {im_end, eos}  # tmp_path: no generation_config.json
    answer, later = encode(base_like, "so 4"), encode(base_like, " then \\boxed{5}")
    assert finish_response(answer + [im_end] + later, stop_token_ids(tmp_path, base_like), 100) == (answer, False)
    plain = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", name_or_path="no-template")
    assert end_of_turn_ids(plain) == []


def test_truncation_cuts_from_the_right_and_counts(tok):
    record = Record("a", "two plus three", " equals five", chat=False)
    full = format_example(record, tok)
    cut = format_example(record, tok, max_length=len(full.input_ids) - 3)
    assert cut == FormattedExample(full.input_ids[:-3], full.labels[:-3], 3)
    assert format_example(record, tok, max_length=len(full.input_ids)).n_truncated == 0
    with pytest.raises(ValueError, match="max_length"):
        format_example(record, tok, max_length=0)


def test_tokenize_records_counts_truncated_samples_and_completion_tokens(tok, caplog):
    short = Record("short", "why", "so", chat=False)
    long = Record("long", "what is two plus three", " the answer is five so five", chat=False)
    n_prompt_long = len(encode(tok, long.prompt))
    max_length = n_prompt_long + 2
    assert len(format_example(short, tok).input_ids) <= max_length
    with caplog.at_level(logging.WARNING, logger="wmss.data"):
        samples, n_truncated = tokenize_records([short, long], tok, max_length=max_length)
    assert n_truncated == 1 and "1 of 2 sample(s)" in caplog.text
    assert [s["id"] for s in samples] == ["short", "long"]
    assert samples[1]["n_completion_tokens"] == 2 and len(samples[1]["input_ids"]) == max_length
    assert samples[0]["n_completion_tokens"] == len(encode(tok, "so")) + 1
    for sample, record in zip(samples, [short, long]):
        assert sample["input_ids"] == format_example(record, tok, max_length).input_ids
        assert sample["labels"] == format_example(record, tok, max_length).labels


def test_completion_cut_away_entirely_raises_naming_the_id(tok):
    record = Record("too-long", "what is two plus three", "five", chat=False)
    with pytest.raises(BadRecordError, match=r"'too-long'.*max_length=2"):
        tokenize_records([record], tok, max_length=2)
    samples, _ = tokenize_records([Record("prompt-only", "what is two plus three", None)], tok, max_length=2)
    assert samples[0]["n_completion_tokens"] == 0  # evaluation prompts have no completion to lose


# ------------------------------------------------------------------------------------------------ loading


def test_three_shapes_and_ids(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"id": "m1", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why"},
                                  {"role": "assistant", "content": "so"}]},
        {"idx": 7, "prompt": "two plus three", "completion": " equals five"},
        {"instruction": "add", "input": "2 3", "output": "5"},
        "",  # a blank line holds no record and does not count as one
        {"instruction": "add 2 and 3", "input": "", "output": "5", "system": "be brief"},
    ])
    records, report = load_records(path)
    assert records == [Record("m1", "why", "so", "be brief", True), Record("7", "two plus three", " equals five",
                                                                            None, False),
                       Record("2", "add\n\n2 3", "5", None, True), Record("3", "add 2 and 3", "5", "be brief", True)]
    assert (report.source, report.n_records, report.n_rejected, report.rejects_path) == (str(path), 4, 0, None)
    # an instruction record is the chat record whose user turn is instruction [+ "\n\n" + input]
    assert format_example(records[3], tok) == format_example(Record("x", "add 2 and 3", "5", "be brief"), tok)


def test_json_list_reports_the_line_a_record_starts_on(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {\n    "prompt": "c",\n    "completion": 3\n  }\n]\n')
    with pytest.raises(BadRecordError, match=rf"{path}, line 3, field 'completion': must be a string"):
        load_records(path)
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c" "completion": "d"}\n]')
    with pytest.raises(BadRecordError, match=rf"{path}, line 3: invalid JSON"):
        load_records(path, on_bad_record="skip")  # an unparsable file cannot be partly skipped


BAD_LINES = [  # (line 2 of a JSONL file, field named in the error, words in the reason)
    (b'{"prompt": "a", "completion": ', None, "invalid JSON"),
    (b'{"prompt": "caf\xe9", "completion": "b"}', None, "not valid UTF-8"),
    (b'["prompt", "completion"]', None, "expected a JSON object"),
    (b'{"prompt": "a"}', "completion", "missing"),
    (b'{"prompt": "  ", "completion": "b"}', "prompt", "is empty"),
    (b'{"prompt": ["a"], "completion": "b"}', "prompt", "must be a string"),
    (b'{"prompt": "a", "completion": "b", "system": "s"}', "system", "no chat template"),
    (b'{"text": "a"}', None, "no record shape found"),
    (b'{"prompt": "a", "completion": "b", "messages": []}', "prompt", "more than one record shape"),
    (b'{"instruction": "a", "input": 3, "output": "b"}', "input", "must be a string"),
    (b'{"instruction": "a", "output": ""}', "output", "is empty"),
    (b'{"id": 1.5, "prompt": "a", "completion": "b"}', "id", "string or an integer"),
    (b'{"idx": "", "prompt": "a", "completion": "b"}', "idx", "is empty"),
    (b'{"id": "first", "prompt": "a", "completion": "b"}', "id", "duplicate id 'first'; first used at line 1"),
    (b'{"messages": "hi"}', "messages", "must be a list"),
    (b'{"messages": [{"role": "user", "content": ["hi"]}]}', "messages[0].content", "must be a string"),
    (b'{"messages": [{"role": "user"}]}', "messages[0].content", "missing"),
    (b'{"messages": [{"role": "assistant", "content": "x"}]}', "messages[0].role", "expected 'user'"),
    (b'{"messages": [{"role": "system", "content": "s"}]}', "messages[1]", "no user turn"),
    (b'{"messages": [{"role": "user", "content": "q"}]}', "messages[1]", "no assistant turn"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}', "messages[1].role",
     "expected 'assistant'"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
     "messages[1].content", "is empty"),
]


@pytest.mark.parametrize("line,field,reason", BAD_LINES)
def test_bad_record_error_names_file_line_and_field(tmp_path, line, field, reason):
    path = tmp_path / "data.jsonl"
    good = b'{"id": "first", "prompt": "a", "completion": "b"}\n'
    path.write_bytes(good + line + b"\n" + b'{"prompt": "c", "completion": "d"}\n')
    with pytest.raises(BadRecordError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}, line 2" + (f", field '{field}':" if field else ":")), message
    assert reason in message


def test_skip_writes_every_reject_with_its_reason(tmp_path, caplog):
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"prompt": "a", "completion": "b"}, '{"prompt": ', {"prompt": "c"}, {"prompt": "d", "completion": "e"},
        {"id": "0", "prompt": "f", "completion": "g"}])
    with pytest.raises(BadRecordError, match=r"line 2: invalid JSON.*2 more bad record"):
        load_records(path)
    with caplog.at_level(logging.WARNING, logger="wmss.data"):
        records, report = load_records(path, on_bad_record="skip")
    assert [r.id for r in records] == ["0", "3"]
    sidecar = tmp_path / "data.jsonl.rejects.jsonl"
    assert (report.n_records, report.n_rejected, report.rejects_path) == (2, 3, str(sidecar))
    assert "skipped 3 bad record(s)" in caplog.text
    rejects = [json.loads(line) for line in sidecar.read_text().splitlines()]
    assert [(r["location"], r["field"]) for r in rejects] == [("line 2", None), ("line 3", "completion"),
                                                             ("line 5", "id")]
    assert "invalid JSON" in rejects[0]["reason"] and rejects[0]["record"] == '{"prompt": '
    assert rejects[1]["reason"] == "missing" and rejects[1]["record"] == {"prompt": "c"}
    assert "duplicate id '0'" in rejects[2]["reason"]
    elsewhere = tmp_path / "out" / "rejects.jsonl"
    assert load_records(path, on_bad_record="skip", rejects_path=elsewhere)[1].rejects_path == str(elsewhere)
    assert len(elsewhere.read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="on_bad_record"):
        load_records(path, on_bad_record="drop")


def test_record_number_ids_can_collide_with_explicit_ids():
    rows = [{"id": 1, "prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    with pytest.raises(BadRecordError, match=r"mem, row 1, field 'id': duplicate id '1' \(the record number"):
        records_from_rows(rows, "mem")


def test_nothing_usable_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a"}])
    with pytest.raises(BadRecordError, match="no usable records"):
        load_records(path, on_bad_record="skip")


def test_prompt_only_records_need_require_completion_false(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}]}, {"prompt": "p"},
            {"instruction": "i", "input": "", "output": ""},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    records, _ = records_from_rows(rows, "eval-prompts", require_completion=False)
    assert [r.completion for r in records] == [None, None, None, "a"]
    assert [r.chat for r in records] == [True, False, True, True]
    with pytest.raises(BadRecordError, match=r"eval-prompts, row 0, field 'messages\[1\]'"):
        records_from_rows(rows, "eval-prompts")


def test_later_turns_are_ignored_loudly(caplog):
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    with caplog.at_level(logging.WARNING, logger="wmss.data"):
        records, _ = records_from_rows([{"messages": turns}], "chats")
    assert records == [Record("0", "q", "a")]
    assert "1 record(s) have turns after the first assistant turn" in caplog.text


def test_parquet_rows_are_validated_by_row_number(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": [10, 11, 12], "prompt": ["a", "b", "c"], "completion": ["x", None, "z"]}), path)
    with pytest.raises(BadRecordError, match=rf"{path}, row 1, field 'completion': missing"):
        load_records(path)
    records, report = load_records(path, on_bad_record="skip")
    assert [r.id for r in records] == ["10", "12"] and report.n_rejected == 1


def test_hf_dataset_folders(tmp_path):
    import datasets

    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert load_records(tmp_path / "single")[0] == [Record("0", "q", "a")]
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows + [bad])}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(BadRecordError, match=r"row 1, field 'messages\[1\].content': is empty"):
        load_records(tmp_path / "splits", split="test")
    with pytest.raises(ValueError, match=r"split 'train' not in the dataset; it has \['test'\]"):
        load_records(tmp_path / "splits")


def test_missing_and_unsupported_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_records(tmp_path / "absent.jsonl")
    (tmp_path / "data.csv").write_text("prompt,completion\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_records(tmp_path / "data.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="save_to_disk"):
        load_records(tmp_path / "folder")


SVAMP = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "svamp.json"


@pytest.mark.skipif(not SVAMP.exists(), reason="../shared eval data absent")
def test_shared_eval_file_loads_as_prompts():
    records, report = load_records(SVAMP, require_completion=False)
    assert report.n_records == 1000 and len({r.id for r in records}) == 1000
    assert all(r.chat and r.prompt for r in records)
