"""Training records: loading (JSONL, JSON list, Parquet, HF datasets), validation with clear errors or a
quarantine sidecar, and THE one formatting + tokenisation function that SFT, JTWS, scoring and evaluation
prompts all use, so every stage sees byte-identical token sequences and loss masks.

Accepted record shapes (one per record):
  - `messages`: chat turns; an optional leading system turn, the first user turn, the first assistant turn.
  - `prompt` + `completion`: raw text, no chat template; the completion is followed by EOS.
  - `instruction` + `input` + `output` (+ optional `system`): a chat record whose user turn is
    instruction + "\\n\\n" + input (input left out when empty).
The id is the `id` field, else `idx`, else the 0-based record number; ids are strings everywhere.

Text inside a record is data, never markup: a special token's text typed in a prompt or completion
(`<|im_end|>`) is tokenised as ordinary text, so only the chat template's own markers are special tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wmss.io import atomic_path

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt tokens); PyTorch's cross-entropy default
ON_BAD_RECORD_POLICIES = ("error", "skip")
_SHAPES = {"messages": "messages", "prompt": "prompt+completion", "instruction": "instruction+input+output"}


@dataclass(frozen=True)
class Record:
    id: str  # ids are strings everywhere (int ids are str()-ed) so parquet columns are uniform
    prompt: str  # the user turn (chat records) or the raw prompt text
    completion: str | None  # None for evaluation prompts (no gold completion needed)
    system: str | None = None
    chat: bool = True  # False for prompt/completion records: no chat template


class BadRecordError(ValueError):
    """A record that cannot be used. The message names the file, the line (1-based, JSON/JSONL) or row
    (0-based, Parquet / HF datasets / in-memory rows), and the field."""


@dataclass
class LoadReport:
    source: str
    n_records: int
    n_rejected: int
    rejects_path: str | None  # the sidecar listing every reject with its reason; None when nothing was rejected


@dataclass
class FormattedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt positions; labels[t] == input_ids[t] on completion positions
    n_truncated: int  # tokens cut from the right by max_length (0 if none)


# ---------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Unreadable:
    """An item the reader could not turn into a mapping (bad bytes, bad JSON); `raw` goes to the sidecar."""

    reason: str
    raw: str


class _Reject(Exception):
    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def load_records(source: str | os.PathLike, *, on_bad_record: str = "error", rejects_path=None,
                 split: str = "train", require_completion: bool = True) -> tuple[list[Record], LoadReport]:
    """Load and validate every record of `source`.

    `source` is a `.jsonl`, `.json` (a JSON list of records) or `.parquet` file, a folder written by
    `datasets.save_to_disk`, or a Hugging Face hub dataset id (loaded with `split`).
    With `on_bad_record="error"` the first bad record raises BadRecordError (naming file, line/row and
    field) before anything is returned. With `"skip"` every bad record is written, with its reason, to a
    JSONL sidecar (`rejects_path`, default `<source>.rejects.jsonl`) and counted in the report.
    `require_completion=False` admits prompt-only records (completion None), e.g. evaluation prompts."""
    _check_policy(on_bad_record)
    return _collect(_read_source(source, split), str(source), on_bad_record=on_bad_record, rejects_path=rejects_path,
                    require_completion=require_completion)


def records_from_rows(rows: Iterable[dict], source: str, *, on_bad_record: str = "error", rejects_path=None,
                      require_completion: bool = True) -> tuple[list[Record], LoadReport]:
    """The validation of `load_records` for in-memory rows; `source` names them in errors (rows are
    numbered from 0) and places the default sidecar (`<source>.rejects.jsonl`)."""
    _check_policy(on_bad_record)
    return _collect(((f"row {i}", row) for i, row in enumerate(rows)), source, on_bad_record=on_bad_record,
                    rejects_path=rejects_path, require_completion=require_completion)


def _check_policy(on_bad_record: str) -> None:
    if on_bad_record not in ON_BAD_RECORD_POLICIES:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD_POLICIES}, got {on_bad_record!r}")


def _read_source(source: str | os.PathLike, split: str) -> Iterator[tuple[str, Any]]:
    """Yield (location, mapping or _Unreadable) for every record of a file, folder or hub dataset."""
    path = Path(source)
    if path.is_dir():
        return _read_hf_dataset(_load_hf_from_disk(path), split)
    if path.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json_list, ".parquet": _read_parquet}
        if path.suffix.lower() not in readers:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected one of "
                             f"{sorted(readers)} or a folder written by datasets.save_to_disk")
        return readers[path.suffix.lower()](path)
    if not isinstance(source, str) or path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        raise FileNotFoundError(f"{source}: no such file or folder")
    return _read_hf_dataset(_load_hf_from_hub(source, split), split)


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            yield from _parse_json_line(raw, line_no)


def _parse_json_line(raw: bytes, line_no: int) -> Iterator[tuple[str, Any]]:
    where = f"line {line_no}"
    try:
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as e:
        yield where, _Unreadable(f"bytes that are not valid UTF-8 at column {e.start + 1}",
                                 raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        return
    if not text.strip():  # a blank line holds no record (e.g. the file's trailing newline)
        return
    try:
        yield where, json.loads(text)
    except json.JSONDecodeError as e:
        yield where, _Unreadable(f"invalid JSON: {e.msg} (column {e.colno})", text.rstrip("\r\n"))


_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _read_json_list(path: Path) -> Iterator[tuple[str, Any]]:
    """Walk a top-level JSON list element by element so each record is reported by the line it starts on.
    A syntax error makes the rest of the file unreadable, so it raises whatever the policy."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BadRecordError(f"{path}, line {line}: bytes that are not valid UTF-8 (byte offset {e.start}); "
                             "the file cannot be read") from e
    decoder = json.JSONDecoder()

    def skip_space(pos: int) -> int:
        return _JSON_WHITESPACE.match(text, pos).end()

    def syntax_error(pos: int, what: str) -> BadRecordError:
        line = text.count("\n", 0, pos) + 1
        return BadRecordError(f"{path}, line {line}: invalid JSON: {what}; the file cannot be read")

    line, counted_to = 1, 0  # lines are counted incrementally: records come in file order

    def line_at(pos: int) -> int:
        nonlocal line, counted_to
        line, counted_to = line + text.count("\n", counted_to, pos), pos
        return line

    pos = skip_space(0)
    if text[pos:pos + 1] != "[":
        raise syntax_error(pos, "expected a JSON list of records ('[' ...)")
    pos = skip_space(pos + 1)
    if text[pos:pos + 1] == "]":
        pos = skip_space(pos + 1)
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise syntax_error(e.pos, e.msg) from e
            yield f"line {line_at(pos)}", value
            pos = skip_space(end)
            if text[pos:pos + 1] == ",":
                pos = skip_space(pos + 1)
            elif text[pos:pos + 1] == "]":
                pos = skip_space(pos + 1)
                break
            else:
                raise syntax_error(pos, "expected ',' or ']' after a record")
    if pos != len(text):
        raise syntax_error(pos, "extra data after the list")


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches()
    except Exception as e:  # pyarrow's messages do not name the file
        raise ValueError(f"{path}: not a readable Parquet file: {e}") from e
    row = 0
    for batch in batches:
        for value in batch.to_pylist():
            yield f"row {row}", value
            row += 1


def _load_hf_from_disk(path: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: a folder, but not one written by datasets.save_to_disk ({e}); "
                                "pass a .jsonl/.json/.parquet file or a saved dataset folder") from e


def _load_hf_from_hub(dataset_id: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # the user may have meant a local path: say both readings failed
        raise FileNotFoundError(f"{dataset_id}: not a local file or folder, and loading it as a Hugging Face "
                                f"hub dataset (split {split!r}) failed: {type(e).__name__}: {e}") from e


def _read_hf_dataset(dataset, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"split {split!r} not in the dataset; it has {sorted(dataset)}")
        dataset = dataset[split]
    for row, value in enumerate(dataset):
        yield f"row {row}", value


def _collect(items: Iterable[tuple[str, Any]], source: str, *, on_bad_record: str, rejects_path,
             require_completion: bool) -> tuple[list[Record], LoadReport]:
    records: list[Record] = []
    rejects: list[dict] = []
    first_seen: dict[str, str] = {}  # id -> location of the record that holds it
    n_later_turns = 0
    for record_number, (where, value) in enumerate(items):
        try:
            if isinstance(value, _Unreadable):
                raise _Reject(None, value.reason)
            record, later_turns = _record_from_row(value, record_number, require_completion)
            if record.id in first_seen:
                field = "id" if value.get("id") is not None else "idx" if value.get("idx") is not None else None
                suffix = "" if field else " (the record number, used because it has no 'id' or 'idx')"
                raise _Reject(field or "id", f"duplicate id {record.id!r}{suffix}; first used at "
                                             f"{first_seen[record.id]}")
        except _Reject as reject:
            rejects.append({"source": source, "location": where, "field": reject.field, "reason": reject.reason,
                            "record": value.raw if isinstance(value, _Unreadable) else value})
            continue
        first_seen[record.id] = where
        n_later_turns += later_turns > 0
        records.append(record)

    if rejects and on_bad_record == "error":
        first = rejects[0]
        more = (f" ({len(rejects) - 1} more bad record(s) in this source; on_bad_record='skip' writes them all "
                "to a sidecar file with their reasons)") if len(rejects) > 1 else ""
        raise BadRecordError(_describe(first) + more)
    written = None
    if rejects:
        written = str(rejects_path or _default_rejects_path(source))
        with atomic_path(written) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejects),
                           encoding="utf-8")
        log.warning("%s: skipped %d bad record(s); reasons in %s", source, len(rejects), written)
    if n_later_turns:
        log.warning("%s: %d record(s) have turns after the first assistant turn; only the first exchange "
                    "(system?, user, assistant) is used", source, n_later_turns)
    if not records:
        raise BadRecordError(f"{source}: no usable records ({len(rejects)} rejected"
                             + (f", see {written})" if written else ")"))
    log.info("%s: loaded %d record(s)", source, len(records))
    return records, LoadReport(source=source, n_records=len(records), n_rejected=len(rejects),
                               rejects_path=written)


def _describe(reject: dict) -> str:
    field = f", field {reject['field']!r}" if reject["field"] else ""
    return f"{reject['source']}, {reject['location']}{field}: {reject['reason']}"


def _default_rejects_path(source: str) -> Path:
    path = Path(source)
    if path.exists():
        return path.with_name(path.name + ".rejects.jsonl")
    # a hub id or an in-memory source has no folder of its own: write to the working directory
    return Path(re.sub(r"[^\w.-]+", "__", source) + ".rejects.jsonl")


def _record_from_row(row: Any, record_number: int, require_completion: bool) -> tuple[Record, int]:
    """Validate one row; returns the Record and how many turns after the first exchange it ignored."""
    if not isinstance(row, dict):
        raise _Reject(None, f"expected a JSON object (a mapping of fields), got {type(row).__name__}")
    shapes = [key for key in _SHAPES if row.get(key) is not None]
    if not shapes:
        raise _Reject(None, "no record shape found: expected 'messages', or 'prompt'+'completion', or "
                            f"'instruction'+'input'+'output'; the record has fields {sorted(row)}")
    if len(shapes) > 1:
        raise _Reject(shapes[1], f"fields of more than one record shape ({', '.join(_SHAPES[s] for s in shapes)}); "
                                 "keep exactly one")
    record_id = _record_id(row, record_number)
    if shapes[0] == "messages":
        system, user, assistant, later_turns = _first_exchange(row["messages"], require_completion)
        return Record(record_id, user, assistant, system, chat=True), later_turns
    if shapes[0] == "prompt":
        if row.get("system") is not None:
            raise _Reject("system", "prompt/completion records use no chat template, so a system prompt would "
                                    "be ignored; use the 'messages' shape to train with one")
        prompt = _text(row, "prompt", required=True)
        return Record(record_id, prompt, _completion(row, "completion", require_completion), chat=False), 0
    instruction = _text(row, "instruction", required=True)
    extra_input = _text(row, "input", required=False)  # Alpaca-style: empty when the instruction says it all
    user = f"{instruction}\n\n{extra_input}" if extra_input else instruction
    system = _optional_string(row, "system")
    return Record(record_id, user, _completion(row, "output", require_completion), system, chat=True), 0


def _record_id(row: dict, record_number: int) -> str:
    for field in ("id", "idx"):
        value = row.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _Reject(field, f"must be a string or an integer, got {type(value).__name__} {value!r}")
        if isinstance(value, str) and not value.strip():
            raise _Reject(field, "is empty")
        return str(value)
    return str(record_number)


def _text(row: dict, field: str, *, required: bool) -> str:
    """A string field; `required` ones must be present and non-blank, optional ones default to ''."""
    value = row.get(field)
    if value is None:
        if required:
            raise _Reject(field, "missing")
        return ""
    if not isinstance(value, str):
        raise _Reject(field, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise _Reject(field, "is empty")
    return value


def _optional_string(row: dict, field: str) -> str | None:
    value = row.get(field)
    if value is not None and not isinstance(value, str):
        raise _Reject(field, f"must be a string, got {type(value).__name__}")
    return value


def _completion(row: dict, field: str, require_completion: bool) -> str | None:
    if require_completion:
        return _text(row, field, required=True)
    # prompt-only sources (evaluation prompts) may leave the completion out or empty
    return _text(row, field, required=False) or None


def _first_exchange(messages: Any, require_completion: bool) -> tuple[str | None, str, str | None, int]:
    """(system, user, assistant, number of later turns) from a chat; the system turn may only come first."""
    if not isinstance(messages, list):
        raise _Reject("messages", f"must be a list of {{'role', 'content'}} turns, got {type(messages).__name__}")
    if not messages:
        raise _Reject("messages", "is empty")

    def turn(i: int) -> tuple[str, str]:
        message = messages[i]
        if not isinstance(message, dict):
            raise _Reject(f"messages[{i}]", f"must be a mapping with 'role' and 'content', "
                                            f"got {type(message).__name__}")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise _Reject(f"messages[{i}].{key}", "missing")
            if not isinstance(message[key], str):
                raise _Reject(f"messages[{i}].{key}", f"must be a string, got {type(message[key]).__name__}")
        return message["role"], message["content"]

    i, system = 0, None
    role, content = turn(0)
    if role == "system":
        system, i = content, 1
        if len(messages) == 1:
            raise _Reject("messages[1]", "missing: the chat has a system turn but no user turn")
        role, content = turn(1)
    if role != "user":
        raise _Reject(f"messages[{i}].role", f"expected 'user' (after an optional leading 'system'), got {role!r}")
    if not content.strip():
        raise _Reject(f"messages[{i}].content", "is empty")
    user, i = content, i + 1
    if i == len(messages):
        if require_completion:
            raise _Reject(f"messages[{i}]", "missing: the chat has no assistant turn after the user turn")
        return system, user, None, 0
    role, content = turn(i)
    if role != "assistant":
        raise _Reject(f"messages[{i}].role", f"expected 'assistant' after the first user turn, got {role!r}")
    if not content.strip():
        if require_completion:
            raise _Reject(f"messages[{i}].content", "is empty")
        content = None
    return system, user, content, len(messages) - i - 1


# ---------------------------------------------------------------------------------- formatting + tokens

# Stands in for the assistant content when rendering the template, so the end-of-turn text can be read off
# whatever the template does to real content (e.g. Qwen3 moves <think> blocks); no whitespace, so trims keep it.
_CONTENT_PLACEHOLDER = "WMSS_ASSISTANT_CONTENT_PLACEHOLDER"


def format_example(record: Record, tokenizer, max_length: int | None = None, *,
                   enable_thinking: bool | None = None) -> FormattedExample:
    """Token ids and labels of one record; the one formatting used by every stage.

    Prompt/completion records: `input_ids = tok(prompt) + tok(completion) + [eos]` (no special tokens
    added), labels IGNORE_INDEX on the prompt tokens. Chat records: prompt = the chat template over
    [system?, user] with the generation prompt; completion = assistant content + the template's own
    end-of-turn text; the prompt tokens are an exact prefix of `input_ids`. A record without completion
    gives the prompt alone (labels all IGNORE_INDEX): the generation prompt evaluation uses.
    `enable_thinking` is passed to the chat template when not None. Sequences longer than `max_length`
    are cut from the right and the cut is reported in `n_truncated`. Special-token text inside the record's
    fields is tokenised as ordinary text (`_Literal`); only the template's markers and EOS are special."""
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
    if not record.chat and record.system is not None:
        raise ValueError(f"record id {record.id!r} has a system prompt but chat=False: without a chat template "
                         "it would be ignored")
    literal = _Literal(tokenizer)
    record = dataclasses.replace(record, prompt=literal.escape(record.prompt), system=literal.escape(record.system),
                                 completion=literal.escape(record.completion))
    if record.chat:
        prompt_text, completion_text = _chat_texts(record, tokenizer, enable_thinking)
    else:
        prompt_text, completion_text = record.prompt, record.completion
    # The completion is tokenised on its own, as generation produces it after the prompt tokens, so a
    # BPE merge can never straddle the prompt/completion boundary and the prompt stays an exact prefix.
    prompt_ids = literal.encode(prompt_text)
    completion_ids = [] if completion_text is None else literal.encode(completion_text)
    if completion_text is not None and not record.chat:
        completion_ids.append(_eos_id(tokenizer))
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    n_truncated = max(0, len(input_ids) - max_length) if max_length is not None else 0
    if n_truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return FormattedExample(input_ids=input_ids, labels=labels, n_truncated=n_truncated)


class _Literal:
    """Keeps the special-token text of records out of the special tokens. Record fields are escaped before the
    chat template renders them (each special token's text, and the escape character itself, becomes
    `\\ue000<n>\\ue001`), so every special token left in the rendered text is the template's own marker;
    `encode` cuts the text at those markers, gives each its id, and tokenises the text between them, escapes
    undone, with `split_special_tokens=True`. Text without escapes is encoded whole, as HF tokenizers cut it at
    special tokens themselves: ordinary records tokenise exactly as a plain `encode` would."""

    ESCAPE, END = "\ue000", "\ue001"  # Unicode private-use characters: no template trims or changes them

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        specials = {t.content for t in added if t.special} | set(tokenizer.all_special_tokens)
        self.texts = [*sorted(specials, key=len, reverse=True), self.ESCAPE]  # longest first: no prefix wins
        self.find = re.compile("|".join(map(re.escape, self.texts)))
        self.markers = re.compile(f"({'|'.join(map(re.escape, self.texts[:-1]))})") if specials else None
        self.undo = re.compile(f"{self.ESCAPE}(\\d+){self.END}")

    def escape(self, text: str | None) -> str | None:
        if text is None:
            return None
        return self.find.sub(lambda m: f"{self.ESCAPE}{self.texts.index(m[0])}{self.END}", text)

    def encode(self, text: str) -> list[int]:
        if self.ESCAPE not in text:
            return self.tokenizer.encode(text, add_special_tokens=False)
        ids: list[int] = []
        for i, piece in enumerate(self.markers.split(text) if self.markers else [text]):
            if i % 2:  # a marker the template wrote
                ids.append(self.tokenizer.convert_tokens_to_ids(piece))
            elif piece:
                ids += self.tokenizer.encode(self.undo.sub(lambda m: self.texts[int(m[1])], piece),
                                             add_special_tokens=False, split_special_tokens=True)
        return ids


def tokenize_records(records: Sequence[Record], tokenizer, max_length: int | None = None, *,
                     enable_thinking: bool | None = None) -> tuple[list[dict], int]:
    """`format_example` over records: `[{"id", "input_ids", "labels", "n_completion_tokens"}]` and the
    number of truncated samples (also logged). `n_completion_tokens` counts supervised tokens after
    truncation; a record whose completion is cut away entirely raises BadRecordError."""
    samples, n_truncated = [], 0
    for record in records:
        example = format_example(record, tokenizer, max_length, enable_thinking=enable_thinking)
        n_completion_tokens = sum(label != IGNORE_INDEX for label in example.labels)
        if record.completion is not None and n_completion_tokens == 0:
            raise BadRecordError(
                f"record id {record.id!r}: max_length={max_length} cuts away its whole completion (the formatted "
                f"sample is {len(example.input_ids) + example.n_truncated} tokens); raise max_length or shorten "
                "or remove this record")
        n_truncated += example.n_truncated > 0
        samples.append({"id": record.id, "input_ids": example.input_ids, "labels": example.labels,
                        "n_completion_tokens": n_completion_tokens})
    if n_truncated:
        log.warning("%d of %d sample(s) were longer than max_length=%s and were cut from the right",
                    n_truncated, len(samples), max_length)
    return samples, n_truncated


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token that ends an assistant turn in the tokenizer's chat template (`<|im_end|>` for
    ChatML/Qwen, `<|eot_id|>` for Llama 3): what training teaches a chat model to emit, so generation must
    stop there too. [] without a chat template, or when the turn does not end in a special token."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _CONTENT_PLACEHOLDER}]
    end_of_turn = tokenizer.apply_chat_template(messages, tokenize=False).split(_CONTENT_PLACEHOLDER)[-1]
    ids = tokenizer(end_of_turn.lstrip(), add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[:1] if ids and ids[0] in special else []


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {_tokenizer_name(tokenizer)!r} has no EOS token, which prompt/completion "
                         "records need to end their completion")
    return tokenizer.eos_token_id


def _chat_texts(record: Record, tokenizer, enable_thinking: bool | None) -> tuple[str, str | None]:
    """(prompt text with the generation prompt, assistant content + end-of-turn text or None)."""
    name = _tokenizer_name(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"record id {record.id!r} is a chat record but tokenizer {name!r} has no chat template; "
                         "use a tokenizer with one or prompt/completion records")
    messages = [{"role": "system", "content": record.system}] if record.system is not None else []
    messages.append({"role": "user", "content": record.prompt})
    template_kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    if record.completion is None:
        return prompt, None
    rendered = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": _CONTENT_PLACEHOLDER}],
                                             tokenize=False, **template_kwargs)
    # Text the template puts between the generation prompt and the content (Qwen3's empty <think> block)
    # is not part of the contract full = prompt + content + end-of-turn, so only the prefix is checked.
    if not rendered.startswith(prompt) or rendered.count(_CONTENT_PLACEHOLDER) != 1:
        raise ValueError(f"chat template of tokenizer {name!r} breaks the prompt-prefix property: the "
                         f"conversation with the assistant turn does not start with the generation prompt "
                         f"{prompt!r}; full render: {rendered!r}")
    end_of_turn = rendered.split(_CONTENT_PLACEHOLDER)[1]
    if not end_of_turn:
        raise ValueError(f"chat template of tokenizer {name!r} puts nothing after the assistant content, so the "
                         "model could never learn to end its turn")
    return prompt, record.completion + end_of_turn
