"""The stage engine: runs a driver's stages against the run directory's manifest, so a rerun skips, resumes or
re-runs each one by the hash chain of its settings and inputs. The drivers (`workflows/`) say which stages
run in which order; this module knows nothing of the method.

An `Artifact` is what stages pass each other: a path and the hash that identifies its content (the hash of
the stage that produced it, or an external input's fingerprint). `Workflow.stage(name, settings, inputs, fn)`
hashes the settings with its inputs' hashes and

- skips the stage when the manifest holds a finished run with that hash ("finished earlier, skipped"),
- resumes it when the manifest holds an unfinished one (its MLflow run continues; training resumes from
  its checkpoints, scoring from its finished parts),
- else runs it afresh in an emptied folder ("re-running because <the settings that changed>"),

so a changed stage re-runs with everything downstream of it (their input hashes changed too).

`<run_dir>/manifest.json` holds one entry per stage: status, hash, settings, input hashes, outputs (paths
inside the run directory relative to it), MLflow run id, wall time. The run directory may be an object-store
URI (see wmss.storage): stages work in its local mirror, a finished stage is uploaded before the manifest
says done, and a later stage's inputs are downloaded when it needs them.

The console gets one line per stage event (running, done in N s, skipped, resuming, re-running, failed);
what a stage prints besides its own `[wmss]` lines goes to `<run_dir>/logs/<stage>.log`, and Ray's logs to
`<run_dir>/logs/` (wmss.raycluster). A URI run directory keeps its logs in the local mirror.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from wmss.config import ConfigError, WMSSConfig, dump_config, public_config
from wmss.io import atomic_path, write_json
from wmss.storage import RunStore, is_uri

LOGS_DIR = "logs"  # the run's log files: one per stage, and Ray's


class Artifact(NamedTuple):
    """A stage's output, or an external input, as later stages take it: where it is and the hash that
    identifies it (the producing stage's hash, or the input's fingerprint)."""

    path: str
    hash: str

    @classmethod
    def external(cls, path: str | os.PathLike) -> Artifact:
        """An input the workflow did not make (a model folder, a data file, a hub id), by its fingerprint."""
        return cls(str(path), fingerprint(str(path)))


@dataclass(frozen=True)
class StageResult:
    """A finished (or skipped) stage: its outputs (paths absolute again) and its hash."""

    outputs: dict
    hash: str

    def artifact(self, key: str) -> Artifact:
        """The output `key` (a path) as an input for later stages."""
        return Artifact(self.outputs[key], self.hash)


@dataclass
class StageContext:
    """What a stage function gets: its folder, its MLflow run, and where its outputs live for good."""

    dir: Path  # where the stage writes (a URI run directory's local mirror)
    run: object  # its nested MLflow run (wmss.tracking.StageRun)
    storage: str  # where its training checkpoints go: this folder, or its URI in an object-store run dir
    localizer: object  # wmss.storage.Localizer for Ray workers reading earlier outputs (None: local run dir)


class Manifest:
    """`manifest.json` of a run directory, rewritten atomically on every change (remote: uploaded whole
    after each change; the remote copy is the truth, a local mirror's copy is read again at start)."""

    def __init__(self, store: RunStore):
        self.store, self.path = store, store.local / "manifest.json"
        if store.uri is not None:
            self.path.unlink(missing_ok=True)
            store.pull("manifest.json")
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def stage(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def update(self, name: str, **fields) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)
        self.store.push("manifest.json")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return keys


SMALL_FILE = 1 << 20  # bytes: files up to this size are hashed on every fingerprint (configs, tokenizers)


def fingerprint(path: str) -> str:
    """Content identity of an external input, the same for a copy (`cp -r`, `rsync`, another machine) and
    different after any byte of it changes: a file's SHA-256; a folder's digest of every file's (relative
    name, size, SHA-256); for anything else (a hub id) the string itself.

    Model folders are GBs, so a file over SMALL_FILE bytes has its SHA-256 cached in
    `$WMSS_CACHE/fingerprints/`, keyed by its path, size, inode, mtime and ctime: a rerun reads nothing, a copy
    or an edit is hashed once. Sampling blocks of weight files instead would be cheaper on a copy but could
    miss an edited byte between samples; the ctime in the key catches an edit whose mtime was set back."""
    p = Path(path)
    if p.is_file():
        return _content_sha256(p)
    if p.is_dir():
        files = sorted((f.relative_to(p).as_posix(), f) for f in p.rglob("*") if f.is_file())
        return _digest([(rel, f.stat().st_size, _content_sha256(f)) for rel, f in files])
    return f"id:{path}"


def _content_sha256(path: Path) -> str:
    from wmss.io import cache_root
    from wmss.tracking import file_sha256

    st = path.stat()
    if st.st_size <= SMALL_FILE:
        return file_sha256(path)
    identity = f"{path.resolve()}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    cached = cache_root() / "fingerprints" / hashlib.sha256(identity.encode()).hexdigest()
    if cached.is_file():
        return cached.read_text()
    digest = file_sha256(path)
    with atomic_path(cached) as tmp:
        tmp.write_text(digest)
    return digest


def train_options(cfg: WMSSConfig, section, **extra):
    """A training section (`cfg.sft`, `cfg.jtws.training`) as a stage trains with it: `max_length` falls back
    to the run's, and `extra` (e.g. a baseline's noise) overrides."""
    return section.model_copy(update={"max_length": section.max_length or cfg.max_length, **extra})


class _StageOutput(io.TextIOBase):
    """A stage's stdout: every line to its log file, its `[wmss]` lines to the console as well."""

    def __init__(self, log, console):
        self.log, self.console, self.partial = log, console, ""

    def write(self, text: str) -> int:
        self.log.write(text)
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if line.startswith("[wmss] "):
                self.console.write(line + "\n")
                self.console.flush()
        return len(text)

    def flush(self) -> None:
        self.log.flush()


class Workflow:
    """Runs stages against the manifest and the MLflow parent run."""

    def __init__(self, config: WMSSConfig, store: RunStore, tracker, manifest: Manifest):
        self.config, self.store, self.tracker, self.manifest = config, store, tracker, manifest
        self.run_dir = store.local  # where stages read and write (a URI run directory's local mirror)
        self.finished: dict[str, list[str]] = {}  # stage hash -> the finished stage folders it names

    def localizer(self):
        """What Ray workers on other nodes need to read this run's finished outputs (None: local run dir)."""
        from wmss.storage import Localizer

        if self.store.uri is None:
            return None
        stages = tuple((rel, key) for key, rels in self.finished.items() for rel in rels)
        return Localizer(self.store.uri, str(self.store.local), stages)

    def fetch(self, *hashes: str) -> None:
        """Make the finished stages with these hashes (other values: ignored) present in the local folder."""
        for key in hashes:
            for rel in self.finished.get(key, []):
                self.store.fetch(rel, key)

    def _record(self, outputs: dict) -> tuple[dict, list[str]]:
        """`outputs` as kept in the manifest: paths inside the run directory made relative to it."""
        paths = {k: self.store.relative(v) for k, v in outputs.items() if isinstance(v, str)}
        paths = {k: rel for k, rel in paths.items() if rel is not None}
        return {**outputs, **paths}, sorted(paths)

    def write_text(self, rel: str, text: str) -> None:
        """Write a run-level file (config.yaml, results.*) atomically, and upload it to a URI run directory."""
        with atomic_path(self.run_dir / rel) as tmp:
            tmp.write_text(text)
        self.store.push(rel)

    def _resolve(self, entry: dict) -> dict:
        return {k: str(self.run_dir / v) if k in entry.get("paths", []) else v for k, v in entry["outputs"].items()}

    @contextlib.contextmanager
    def log_output(self, name: str):
        """While the block runs (a stage, or a driver's own long step), what it prints goes to
        `logs/<name>.log`; its `[wmss]` lines to the console as well."""
        log_path = self.run_dir / LOGS_DIR / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log, contextlib.redirect_stdout(_StageOutput(log, sys.stdout)):
            yield

    def stage(self, name: str, settings: dict, inputs: dict[str, Artifact | None],
              fn: Callable[[StageContext], dict], tags: dict[str, str] | None = None) -> StageResult:
        """Run `fn(StageContext) -> outputs` (JSON values; paths as strings) unless an identical finished run
        exists. The stage's hash chains `settings` with its `inputs`' hashes (None: an absent input)."""
        settings = json.loads(json.dumps(settings, default=str))  # as the manifest keeps them (tuples: lists)
        hashes = {k: a.hash if a is not None else "" for k, a in inputs.items()}
        key = _digest({"stage": name, "settings": settings, "inputs": hashes})
        rel = f"stages/{name}"
        stage_dir = self.run_dir / rel
        old = self.manifest.stage(name)
        run_id = None
        if old and old.get("hash") == key:
            if old.get("status") == "done":
                print(f"[wmss] {name}: finished earlier, skipped", flush=True)
                self.finished.setdefault(key, []).append(rel)  # fetched only if a later stage reads it
                return StageResult(self._resolve(old), key)
            print(f"[wmss] {name}: unfinished earlier, resuming", flush=True)
            run_id = old.get("mlflow_run_id")
        elif old:
            why = _changed_keys(old.get("settings", {}), settings) + [
                f"input {k} changed" for k in sorted(set(hashes) | set(old.get("inputs", {})))
                if hashes.get(k) != old.get("inputs", {}).get(k)]
            print(f"[wmss] {name}: re-running because " + "; ".join(why or ["its inputs changed"]), flush=True)
            self.store.remove(rel)  # stale checkpoints must never be resumed
        else:
            print(f"[wmss] {name}: running", flush=True)
        self.fetch(*hashes.values())
        stage_dir.mkdir(parents=True, exist_ok=True)
        start = time.time()
        try:
            with (self.log_output(name),
                  self.tracker.stage(name, run_id=run_id, tags={"wmss.stage": name, **(tags or {})}) as run):
                self.manifest.update(name, status="running", hash=key, settings=settings, inputs=hashes,
                                     mlflow_run_id=run.run_id, outputs={})
                outputs = fn(StageContext(stage_dir, run, self.store.durable(rel), self.localizer()))
                run.log_metrics({"wall_s": time.time() - start})
        except BaseException:
            print(f"[wmss] {name}: failed after {time.time() - start:.0f} s (its log: "
                  f"{self.run_dir / LOGS_DIR / name}.log)", flush=True)
            raise
        earlier = old.get("wall_s", 0.0) if run_id else 0.0  # time spent before a resume counts too
        self.store.seal(rel, key)  # uploaded before the manifest says done
        self.finished.setdefault(key, []).append(rel)
        recorded, paths = self._record(outputs)
        self.manifest.update(name, status="done", outputs=recorded, paths=paths,
                             wall_s=round(earlier + time.time() - start, 3))
        print(f"[wmss] {name}: done in {time.time() - start:.0f} s", flush=True)
        return StageResult(outputs, key)


def run_location(cfg: WMSSConfig, run_dir: str | None) -> str:
    """The run directory: `--run-dir`, else the config's run_dir, else runs/<name>; local paths absolute."""
    target = run_dir or cfg.run_dir or str(Path("runs") / cfg.name)
    return target if is_uri(target) else str(Path(target).resolve())


def _quiet_libraries(log_dir: Path) -> None:
    """Keep the console to the stage lines: MLflow's own log lines go to `logs/mlflow.log`, and the Hugging
    Face libraries draw no progress bars (loading and saving a model is part of a stage, not a stage)."""
    import mlflow  # noqa: F401  (configures its loggers on import: they must exist to be redirected)
    from huggingface_hub.utils import disable_progress_bars

    from wmss.raycluster import log_to_file

    log_dir.mkdir(parents=True, exist_ok=True)
    log_to_file(log_dir / "mlflow.log", ("mlflow",))
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers imported later reads it; so do local Ray workers
    disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def open_workflow(cfg: WMSSConfig, run_dir: str | os.PathLike) -> Workflow:
    """Open (or resume) the run directory's MLflow parent run, log the config's params once, write
    `config.yaml` and join Ray (its logs to `<run_dir>/logs/`): what every driver (`wmss run`, `wmss tune`)
    does before its stages."""
    from wmss.raycluster import ensure_ray
    from wmss.tracking import Tracker, flatten, git_sha, resolve_tracking_uri

    if is_uri(run_dir) and not (cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError(f"mlflow.tracking_uri: not set, and the run directory {run_dir} is on object storage, "
                          "where the default SQLite store cannot live; set mlflow.tracking_uri (or "
                          "MLFLOW_TRACKING_URI) to a tracking server, e.g. http://mlflow:5000")
    store = RunStore(run_dir)
    _quiet_libraries(store.local / LOGS_DIR)
    manifest = Manifest(store)
    data_src = cfg.data.train
    tracker = Tracker(resolve_tracking_uri(cfg.mlflow.tracking_uri, store.local), cfg.mlflow.experiment, cfg.name,
                      parent_run_id=manifest.data.get("mlflow_parent_run_id"),
                      tags={"wmss.git_sha": git_sha() or "unknown", "wmss.run_dir": str(store),
                            "wmss.data_hash": data_src if data_src == "demo" else fingerprint(data_src)})
    manifest.data["mlflow_parent_run_id"] = tracker.parent_run_id
    manifest.save()
    if not manifest.data.get("params_logged"):
        tracker.log_params(flatten(public_config(cfg)))  # no credentials in MLflow params
        manifest.data["params_logged"] = True
        manifest.save()
    wf = Workflow(cfg, store, tracker, manifest)
    wf.write_text("config.yaml", dump_config(cfg))
    tracker.log_artifact(store.local / "config.yaml")
    ensure_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, log_dir=store.local / LOGS_DIR)
    return wf
