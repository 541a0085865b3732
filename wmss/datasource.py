"""The `data.select` stage: picks training records out of files, dataset folders and hub datasets as
`data.train` specifies them (wmss.config.SourceSpec: subset, split, row filters, a cap, a weighted mix) and
writes them, unchanged but for their `id`, as one Parquet file that the later stages read like any other.

Every source is streamed (hub ids and folders laid out like a hub dataset with `datasets`' `streaming=True`;
files and `save_to_disk` folders with wmss.data's readers) and what passes is written in batches of `BATCH`
records, so no source is ever held in memory whole. A source is read only until its cap is reached.

- Filters (all of a source's must hold) test a dotted field path of the original record, lists indexed
  by integers (`messages.-1.content`); a record without the field (absent or null) stops the stage with an
  error naming the source, the record (its line or row) and the field, unless the filter says
  `on_missing: drop`.
- `max_samples` keeps the first N records that pass the filters, in source order (deterministic, and a
  hub source is not read past them).
- A list of sources is a mix. Without weights it is every source's selection, one after the other. With
  weights (then on every source), source i gives the first k_i = floor(N w_i / W) of its n_i selected
  records, W the sum of the weights and N = min_j n_j W / w_j: the largest mix in which every source gives
  its share without repeating a record (the scarcest source gives all of its records). Records keep their
  source order; training shuffles.
- Ids: a record's `id` becomes its own id (`id`, else `idx`, else its 0-based record number in the source,
  as wmss.data numbers records), a string; in a mix of two or more sources prefixed with the source's index
  (`1:42`), so ids stay unique across sources and stable whatever the filters and caps keep. A record whose
  own id is invalid keeps it, for the `on_bad_record` policy of the stages that read the file.
- A record that cannot be read at all (bad JSON, not a mapping) follows `on_bad_record` here: `error`
  stops, `skip` lists it in `rejects.jsonl` beside the output. Every other check of a record's shape is
  left to the stages that read the output, as for any training file.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from wmss.config import FilterSpec, SourceSpec
from wmss.data import BadRecordError, _read_hf_dataset, _read_source, _record_id, _Reject, _Unreadable
from wmss.io import atomic_path

log = logging.getLogger(__name__)

BATCH = 1000  # records per Parquet part: what the stage holds in memory at a time
_MISSING = object()
_SAVED_TO_DISK = ("dataset_dict.json", "state.json")  # the marks of a datasets.save_to_disk folder


def select_records(sources: list[SourceSpec], out: str | Path, *, on_bad_record: str = "error") -> dict:
    """Select every source's records, mix them and write them to the Parquet file `out` (atomically).
    Returns the stage's outputs: {"train": out, "records": total, "sources": [{"path", "kept", "used"}]}
    (kept: records that passed the filters and the cap; used: those the mix took)."""
    out = Path(out)
    parts_dir, rejects = out.parent / f".{out.name}.parts", []
    shutil.rmtree(parts_dir, ignore_errors=True)
    prefix = len(sources) > 1
    try:
        selected = [_select(spec, parts_dir / str(i), f"{i}:" if prefix else "", on_bad_record, rejects)
                    for i, spec in enumerate(sources)]
        used = mix_sizes([kept for kept, _ in selected], [spec.weight for spec in sources])
        if not sum(used):
            raise BadRecordError("data.train: no records selected (" + ", ".join(
                f"{_name(s)}: {kept}" for s, (kept, _) in zip(sources, selected)) + " passed the filters)")
        _write(out, [parts for _, parts in selected], used)
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    if rejects:
        with atomic_path(out.parent / "rejects.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects), encoding="utf-8")
        log.warning("data.select: skipped %d unreadable record(s); listed in %s", len(rejects),
                    out.parent / "rejects.jsonl")
    summary = [{"path": s.path, "kept": kept, "used": n} for s, (kept, _), n in zip(sources, selected, used)]
    print(f"[wmss] data.select: {sum(used)} records from " + "; ".join(
        f"{_name(s)}: {n} of {kept} selected" for s, (kept, _), n in zip(sources, selected, used)), flush=True)
    return {"train": str(out), "records": sum(used), "sources": summary}


def mix_sizes(kept: list[int], weights: list[float | None]) -> list[int]:
    """How many of its `kept` records each source gives the mix: all of them without weights, else
    floor(N w_i / W) with N = min_j kept_j W / w_j (exact fractions: the scarcest source gives all)."""
    if not weights or weights[0] is None:
        return list(kept)
    shares = [Fraction(w) for w in weights]
    total = sum(shares)
    size = min(Fraction(n) * total / share for n, share in zip(kept, shares))
    return [math.floor(size * share / total) for share in shares]


def source_inputs(sources: list[SourceSpec]) -> dict:
    """The stage's inputs, one Artifact per source: a local path by its content (wmss.workflow.fingerprint),
    a hub id by its name and `revision` (an unpinned hub source is taken as unchanged while its id is)."""
    from wmss.workflow import Artifact, fingerprint

    return {f"source{i}": Artifact(s.path, fingerprint(s.path) + (f"@{s.revision}" if s.revision else ""))
            for i, s in enumerate(sources)}


# ------------------------------------------------------------------------------------------- reading


def _name(spec: SourceSpec) -> str:
    """The source as errors and logs name it: its path, with the subset and split of a dataset."""
    path = Path(spec.path)
    if path.is_file():
        return spec.path
    subset = f"subset {spec.subset!r}, " if spec.subset else ""
    return f"{spec.path} ({subset}split {spec.split!r})"


def _records(spec: SourceSpec) -> Iterator[tuple[str, Any]]:
    """(location, mapping or _Unreadable) for every record of the source, streamed."""
    path = Path(spec.path)
    if spec.revision is not None and path.exists():
        raise ValueError(f"{spec.path}: `revision` applies to hub datasets; this is a local path")
    if path.is_file() or any((path / mark).is_file() for mark in _SAVED_TO_DISK):
        if spec.subset is not None:
            raise ValueError(f"{spec.path}: subset {spec.subset!r} given, but a file or a save_to_disk folder has "
                             "no subsets")
        return _read_source(path, spec.split)
    if not path.exists() and path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        return _read_source(path, spec.split)  # a missing file: its error
    return _read_hf_dataset(_stream(spec), spec.split)


def _stream(spec: SourceSpec):
    """The source as a streaming `datasets.IterableDataset` (a hub id, or a folder laid out like one)."""
    import datasets

    try:
        return datasets.load_dataset(spec.path, name=spec.subset, split=spec.split, streaming=True,
                                     revision=spec.revision)
    except Exception as e:  # datasets' messages name neither what was asked nor that a local path was tried
        where = "a folder that datasets.load_dataset cannot read" if Path(spec.path).is_dir() else (
            "not a local file or folder, and loading it as a Hugging Face hub dataset failed")
        raise FileNotFoundError(f"{_name(spec)}: {where}: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------- selecting


def _select(spec: SourceSpec, parts_dir: Path, prefix: str, on_bad_record: str,
            rejects: list[dict]) -> tuple[int, list[Path]]:
    """Stream one source through its filters and cap into Parquet parts of BATCH records; returns how many
    records it kept and the parts, in source order."""
    kept, batch, parts = 0, [], []
    for number, (where, row) in enumerate(_records(spec)):
        if isinstance(row, _Unreadable) or not isinstance(row, dict):
            reason = row.reason if isinstance(row, _Unreadable) else f"not a mapping of fields: {type(row).__name__}"
            if on_bad_record == "error":
                raise BadRecordError(f"{_name(spec)}, {where}: {reason}")
            rejects.append({"source": _name(spec), "location": where, "reason": reason,
                            "record": row.raw if isinstance(row, _Unreadable) else row})
            continue
        if not all(_passes(f, row, spec, where) for f in spec.filter):
            continue
        batch.append(_with_id(row, number, prefix))
        kept += 1
        if len(batch) == BATCH:
            parts.append(_write_part(batch, parts_dir / f"{len(parts):06d}.parquet", spec))
            batch = []
        if kept == spec.max_samples:
            break
    if batch:
        parts.append(_write_part(batch, parts_dir / f"{len(parts):06d}.parquet", spec))
    return kept, parts


def _with_id(row: dict, number: int, prefix: str) -> dict:
    try:
        own = _record_id(row, number)
    except _Reject:  # an invalid id: left as it is, for on_bad_record where the file is read
        return row
    return {**row, "id": prefix + own}


def _lookup(row: dict, path: str) -> Any:
    """The value at a dotted path (integers index lists, negative from the end); _MISSING when a step is
    absent or null."""
    value = row
    for step in path.split("."):
        if isinstance(value, dict):
            value = value.get(step)
        elif isinstance(value, list) and re.fullmatch(r"-?\d+", step) and -len(value) <= int(step) < len(value):
            value = value[int(step)]
        else:
            return _MISSING
        if value is None:
            return _MISSING
    return value


def _passes(f: FilterSpec, row: dict, spec: SourceSpec, where: str) -> bool:
    """Whether the record meets the filter; a missing field raises or drops it (`on_missing`)."""
    def missing(field: str) -> bool:
        if f.on_missing == "drop":
            return False
        raise BadRecordError(f"{_name(spec)}, {where}, field {field!r}: missing, and a filter needs it (give the "
                             "filter `on_missing: drop` to drop such records)")

    def typed(kind: type | tuple, what: str):
        if isinstance(value, bool) or not isinstance(value, kind):
            raise BadRecordError(f"{_name(spec)}, {where}, field {f.field!r}: the filter needs {what}, got "
                                 f"{type(value).__name__} {value!r:.80}")
        return value

    value = _lookup(row, f.field)
    if value is _MISSING:
        return missing(f.field)
    if f.equals is not None:
        return value == f.equals
    if f.one_of is not None:
        return value in f.one_of
    if f.regex is not None:
        return re.search(f.regex, typed(str, "a string")) is not None
    if f.boxed_equals is not None:
        from wmss.evaluation.grading import extract_boxed, math_equal

        gold = _lookup(row, f.boxed_equals)
        if gold is _MISSING:
            return missing(f.boxed_equals)
        boxed = extract_boxed(typed(str, "a string"))
        return bool(boxed and boxed.strip()) and math_equal(boxed, str(gold))
    number = typed((int, float), "a number")
    return (f.min is None or number >= f.min) and (f.max is None or number <= f.max)


# ------------------------------------------------------------------------------------------- writing


def _write_part(rows: list[dict], path: Path, spec: SourceSpec) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = dict.fromkeys(key for row in rows for key in row)  # every row's (from_pylist reads the first's)
    try:
        table = pa.Table.from_pydict({key: [row.get(key) for row in rows] for key in fields})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise BadRecordError(f"{_name(spec)}: records of one batch give a field values of different types, which "
                             f"one Parquet column cannot hold: {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _write(out: Path, parts: list[list[Path]], used: list[int]) -> None:
    """The first `used[i]` records of source i's parts, every source in order, as one Parquet file whose
    schema unites the parts' (a field one record lacks is null there)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pa.unify_schemas([pq.read_schema(p) for files in parts for p in files], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise BadRecordError(f"data.train: the selected records give a field values of different types, which one "
                             f"Parquet column cannot hold: {e}") from e
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for files, left in zip(parts, used):
            for part in files:
                if left <= 0:
                    break
                table = pq.read_table(part).slice(0, left)
                left -= table.num_rows
                writer.write_table(_conform(table, schema))


def _conform(table, schema):
    """`table` with `schema`'s columns, in its order and types; the columns it lacks all null."""
    import pyarrow as pa

    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)
