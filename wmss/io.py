"""Atomic file output shared by every stage: write beside the target, then rename, so a crash never
leaves a half-written file that a resumed run would trust."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto `target`.

    Works for files and folders (a folder target replaces any existing folder). On error the
    temporary is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    inner = tmp / target.name
    try:
        yield inner
        if inner.is_dir() and target.is_dir():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(inner, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(inner, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_root() -> Path:
    """wmss's local cache: $WMSS_CACHE, else ~/.cache/wmss (converted models, mirrors of remote run dirs)."""
    return Path(os.environ.get("WMSS_CACHE") or Path.home() / ".cache" / "wmss")


def write_json(target: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(target: str | os.PathLike, table, **options) -> None:
    """Write a pyarrow Table (or anything `pyarrow.table` accepts) as Parquet, atomically (`options`: those
    of `pyarrow.parquet.write_table`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(target) as tmp:
        pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), tmp, **options)
