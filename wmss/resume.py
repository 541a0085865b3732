"""The resume guard of commands that continue from their own checkpoints (`wmss sft`, `wmss jtws`, `wmss tune`,
and a training stage inside `wmss run`): when a run starts, the settings and input fingerprints it was started
with are recorded in its checkpoint folder; a later run resumes those checkpoints only when its own settings and
inputs match the record, and otherwise refuses, naming every difference and how to start over. Checkpoints made
from other data or settings are never continued silently.

Inside `wmss run` the stage engine has already decided to resume by the stage's hash, which covers the same
settings and the same inputs' content, so the guard agrees with it and only the standalone commands can meet a
mismatch.
"""

from __future__ import annotations

import json
import os

from wmss.errors import ConfigError
from wmss.storage import filesystem, is_uri
from wmss.workflow import changed_keys

RECORD = "wmss-resume.json"  # in the checkpoint folder, so deleting that folder starts over cleanly


def _read(location: str) -> dict | None:
    if not is_uri(location):
        try:
            with open(location) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _write(location: str, record: dict) -> None:
    if not is_uri(location):
        from wmss.io import write_json

        write_json(location, record)
        return
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:  # an object is put whole: atomic as well
        f.write((json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two records ({"settings": ..., "inputs": {name: fingerprint}}), one phrase each:
    "training.lr: 0.0001 -> 0.0002", "input data changed"."""
    old_inputs, new_inputs = old.get("inputs", {}), new["inputs"]
    return changed_keys(old.get("settings", {}), new["settings"]) + [
        f"input {k} changed" for k in sorted(set(old_inputs) | set(new_inputs)) if old_inputs.get(k) != new_inputs.get(k)]


def guard_resume(folder: str | os.PathLike, settings: dict, inputs: dict[str, str], *, has_state: bool,
                 what: str, start_over: str) -> bool:
    """Before a run that continues from the state in `folder` (a local path or an object-store URI) when
    `has_state`: True when it may resume (the record there matches `settings` and `inputs`, JSON values and
    {name: fingerprint}); False when there is nothing to resume, after recording `settings` and `inputs` for
    the next run. Raises ConfigError naming the differences, `what` holds the checkpoints and `start_over`
    (e.g. "delete X or pass another --out") when they differ or were made without a record."""
    location = f"{str(folder).rstrip('/')}/{RECORD}"
    new = {"settings": json.loads(json.dumps(settings, default=str)), "inputs": dict(inputs)}
    if not has_state:
        _write(location, new)
        return False
    old = _read(location)
    if old is None:
        raise ConfigError(f"{what}: {folder} holds checkpoints but no record of the settings and inputs they were "
                          f"made with ({RECORD}), so resuming them could mix two runs; to start over, {start_over}")
    changed = differences(old, new)
    if changed:
        raise ConfigError(f"{what}: {folder} holds checkpoints made with other settings or inputs ("
                          + "; ".join(changed) + f"); resuming them would mix two runs. To start over, {start_over}")
    return True
