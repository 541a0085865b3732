"""Run directories on object storage: `--run-dir s3://bucket/wmss/run-1` (or gs://, hdfs://, and any
other fsspec protocol such as az:// when its fsspec package is installed).

HF models, DeepSpeed and the scoring parts need local files, so a URI run directory is mirrored by a
local working folder ($WMSS_CACHE/runs/<digest of the URI>). Stages read and write there; a finished
stage's folder is uploaded BEFORE the manifest (one object, replaced whole) marks it done, so a crash
mid-upload leaves a stage that the next run re-runs, never one it trusts half-written. A stage skipped
on a fresh machine downloads only the outputs a later stage actually reads. Ray Train writes its
checkpoints straight to the URI (its storage_path), so an unfinished training resumes on any node.

pyarrow.fs opens s3/gs/hdfs natively (credentials and endpoints from the usual environment: AWS_*,
including AWS_ENDPOINT_URL for S3-compatible stores, GOOGLE_APPLICATION_CREDENTIALS); other protocols
go through fsspec wrapped as a pyarrow filesystem, which is also what Ray Train accepts.

The manifest object is replaced only by a conditional write (`RunStore.write_if`): a driver writes it only
if it is still the version that driver last read or wrote, so a second driver on the same URI is refused
instead of overwriting the first one's entries. On S3 the check is the store's own (a PUT with If-Match /
If-None-Match, atomic; needs boto3); elsewhere the version is compared just before the write.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

SEAL = ".wmss-finished"  # in a finished stage folder: the stage's hash


class StaleWrite(Exception):
    """A conditional write found the remote object changed since its version was read."""


def is_uri(location: str | os.PathLike) -> bool:
    """True for `scheme://...` locations other than file://, which are plain local paths."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for `uri`: pyarrow's own filesystems first, else fsspec's."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as arrow_err:
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as fsspec_err:
            raise ValueError(f"run directory {uri!r}: neither pyarrow ({arrow_err}) nor fsspec ({fsspec_err}) "
                             "can open it") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


class RunStore:
    """A run directory: a local folder (which is its own durable copy), or a URI mirrored by a local
    working folder. Paths given to its methods are relative to the run directory."""

    def __init__(self, location: str | os.PathLike, mirror: Path | None = None):
        if is_uri(location):
            from wmss.io import cache_root

            self.uri = str(location).rstrip("/")
            self.fs, self.root = filesystem(self.uri)
            self.local = Path(mirror or cache_root() / "runs" / hashlib.sha256(self.uri.encode()).hexdigest()[:16])
            self.local = self.local.resolve()
        else:
            self.uri, self.fs, self.root = None, None, None
            self.local = Path(str(location).removeprefix("file://")).resolve()
        self.local.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return self.uri or str(self.local)

    def durable(self, rel: str = "") -> str:
        """Where `rel` lives for good: the URI (for Ray Train's storage_path) or the local path."""
        if self.uri is None:
            return str(self.local / rel)
        return f"{self.uri}/{rel}" if rel else self.uri

    def relative(self, path: str | os.PathLike) -> str | None:
        """`path` relative to the local folder, None when it lies outside it."""
        try:
            return Path(path).resolve().relative_to(self.local).as_posix()
        except ValueError:
            return None

    def _info(self, rel: str):
        return self.fs.get_file_info(f"{self.root}/{rel}")

    def push(self, rel: str) -> None:
        """Upload the local file or folder `rel` over its remote copy (each object is put whole)."""
        if self.uri is None:
            return
        import pyarrow.fs as pafs

        source = self.local / rel
        if source.is_dir():
            self.fs.create_dir(f"{self.root}/{rel}", recursive=True)
        pafs.copy_files(str(source), f"{self.root}/{rel}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def pull(self, rel: str) -> bool:
        """Download the remote file or folder `rel` unless a local copy exists; False when there is none."""
        import pyarrow.fs as pafs

        target = self.local / rel
        if target.exists():
            return True
        kind = self._info(rel).type if self.uri is not None else pafs.FileType.NotFound
        if kind == pafs.FileType.NotFound:
            return False
        from wmss.io import atomic_path

        with atomic_path(target) as tmp:  # a killed download leaves nothing a later run would trust
            if kind == pafs.FileType.Directory:
                tmp.mkdir()
            pafs.copy_files(f"{self.root}/{rel}", str(tmp), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        return True

    def _s3(self):
        """(boto3 S3 client, bucket, key prefix) for an s3:// run directory with boto3 installed, else None."""
        if not self.uri.startswith("s3://"):
            return None
        try:
            import boto3
        except ImportError:
            return None
        bucket, _, prefix = self.uri.removeprefix("s3://").partition("/")
        return boto3.client("s3"), bucket, f"{prefix}/" if prefix else ""

    def read_tagged(self, rel: str) -> tuple[bytes | None, str | None]:
        """The remote file `rel` and a tag of that version (S3: its ETag; elsewhere: its SHA-256); (None,
        None) when there is none."""
        s3 = self._s3()
        if s3 is not None:
            client, bucket, prefix = s3
            try:
                reply = client.get_object(Bucket=bucket, Key=prefix + rel)
            except client.exceptions.NoSuchKey:
                return None, None
            return reply["Body"].read(), reply["ETag"]
        import pyarrow.fs as pafs

        if self._info(rel).type != pafs.FileType.File:
            return None, None
        with self.fs.open_input_stream(f"{self.root}/{rel}") as f:
            data = f.read()
        return data, hashlib.sha256(data).hexdigest()

    def write_if(self, rel: str, data: bytes, tag: str | None) -> str:
        """Replace the remote file `rel` with `data` if it is still the version `tag` (None: if there is
        none); returns the new version's tag, or raises StaleWrite."""
        s3 = self._s3()
        if s3 is not None:
            client, bucket, prefix = s3
            condition = {"IfMatch": tag} if tag is not None else {"IfNoneMatch": "*"}
            try:
                return client.put_object(Bucket=bucket, Key=prefix + rel, Body=data, **condition)["ETag"]
            except client.exceptions.ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise StaleWrite(self.durable(rel)) from None
                raise
        if self.read_tagged(rel)[1] != tag:
            raise StaleWrite(self.durable(rel))
        self.fs.create_dir(self.root, recursive=True)
        with self.fs.open_output_stream(f"{self.root}/{rel}") as f:
            f.write(data)
        return hashlib.sha256(data).hexdigest()

    def seal(self, rel: str, key: str) -> None:
        """Mark the local folder `rel` as the finished output with hash `key`, then upload it."""
        (self.local / rel).mkdir(parents=True, exist_ok=True)
        (self.local / rel / SEAL).write_text(key)
        self.push(rel)

    def fetch(self, rel: str, key: str) -> None:
        """Make the local folder `rel` the sealed output with hash `key`, downloading it when the local
        copy is missing or another run's. A local run directory is its own copy: nothing to do."""
        if self.uri is None:
            return
        seal = self.local / rel / SEAL
        if seal.is_file() and seal.read_text() == key:
            return
        shutil.rmtree(self.local / rel, ignore_errors=True)
        if not self.pull(rel) or not seal.is_file() or seal.read_text() != key:
            shutil.rmtree(self.local / rel, ignore_errors=True)
            raise RuntimeError(f"{self.durable(rel)}: not the finished output {key} the manifest names "
                               "(removed or overwritten by another run); remove its manifest entry to re-run it")
        print(f"[wmss] fetched {self.durable(rel)}", flush=True)

    def remove(self, rel: str) -> None:
        """Delete `rel` locally and remotely (a stage that re-runs must never resume stale checkpoints)."""
        target = self.local / rel
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if self.uri is None:
            return
        import pyarrow.fs as pafs

        kind = self._info(rel).type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(f"{self.root}/{rel}")
        elif kind == pafs.FileType.File:
            self.fs.delete_file(f"{self.root}/{rel}")


@dataclass(frozen=True)
class Localizer:
    """Turns a path in the driver's mirror of a URI run directory into the same path in this node's mirror,
    downloading the finished stage folder it lies in first (once per node: a file lock serialises the
    workers). Ray workers get one with their job, since on another node the driver's folder does not exist."""

    uri: str
    driver_root: str
    stages: tuple[tuple[str, str], ...]  # (stage folder, hash) of every finished stage

    def _relative(self, path) -> str | None:
        try:
            return Path(path).relative_to(self.driver_root).as_posix()
        except ValueError:
            return None

    def __call__(self, path):
        """The local path to read `path` from on this node (paths outside the run directory: unchanged)."""
        rel = self._relative(path) if path is not None else None
        if rel is None:
            return path
        from filelock import FileLock

        store = RunStore(self.uri)
        with FileLock(f"{store.local}.lock"):
            for stage, key in self.stages:
                if rel == stage or rel.startswith(f"{stage}/"):
                    store.fetch(stage, key)
        return str(store.local / rel)

    def remote(self, path) -> str:
        """The object-store URI of `path` (for readers that download by themselves, e.g. Ray Data LLM)."""
        rel = self._relative(path)
        return path if rel is None else f"{self.uri}/{rel}"


def localize(localizer: Localizer | None, path):
    """`localizer(path)`, or `path` itself where there is no localizer (a local or shared run directory)."""
    return localizer(path) if localizer is not None else path


def list_names(location: str | os.PathLike) -> list[str]:
    """Names of the entries of a local or remote folder; [] when it does not exist."""
    if not is_uri(location):
        folder = Path(str(location).removeprefix("file://"))
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    import pyarrow.fs as pafs

    fs, path = filesystem(str(location))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(Path(info.path).name for info in fs.get_file_info(pafs.FileSelector(path)))
