"""The stage engine: runs a driver's stages against the run directory's manifest, so a rerun skips, resumes or
re-runs each one by the hash chain of its settings and inputs. The drivers (`workflows/`) say which stages
run in which order; this module knows nothing of the method.

An `Artifact` is what stages pass each other: a path and the hash that identifies its content (the hash of
the stage that produced it, or an external input's content fingerprint, which a copy keeps). `Workflow.stage(name,
settings, inputs, fn)` hashes the settings with its inputs' hashes and

- skips the stage when the manifest holds a finished run with that hash ("finished earlier, skipped"),
- resumes it when the manifest holds an unfinished one (its MLflow run continues; training resumes from
  its checkpoints, scoring from its finished parts),
- else runs it afresh in an empty folder ("re-running because <the settings that changed>"),

so a changed stage re-runs with everything downstream of it (their input hashes changed too). A re-run of a
finished stage works in a folder of its own (`stages/<name>` or `stages/<name>.<hash>`, recorded as the
entry's `attempt` beside the finished entry): the finished outputs stay, and stay in the manifest, until the
new ones are sealed, and a re-run never finds an earlier run's checkpoints. An unfinished run whose settings
no longer match is deleted. `wmss stage reset RUN_DIR STAGE` forgets a stage and every stage downstream.

`<run_dir>/manifest.json` holds one entry per stage: status, hash, settings, input hashes, its folder (`dir`),
outputs (paths inside the run directory relative to it), MLflow run id, wall time. The run directory may be an
object-store URI (see wmss.storage): stages work in its local mirror, a finished stage is uploaded before the
manifest says done, and a later stage's inputs are downloaded when it needs them.

One driver at a time: `open_workflow` takes the run directory's lock (wmss.runlock) and every manifest write
checks it; an object-store manifest is only replaced by a conditional write.

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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from wmss.config import ConfigError, WMSSConfig, dump_config, public_config
from wmss.errors import InputError, WmssError
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
    """`manifest.json` of a run directory, rewritten atomically on every change (remote: replaced whole by a
    conditional write after each change, refused when another driver wrote it since this one read it; the
    remote copy is the truth, the local mirror's copy follows it). `lock` (the driver's DriverLock, when a
    driver holds one) is checked before each write; `mutex` serialises the writes of the lock's heartbeat."""

    def __init__(self, store: RunStore):
        self.store, self.path = store, store.local / "manifest.json"
        self.mutex, self.lock, self.version = threading.RLock(), None, None
        if store.uri is not None:
            raw, self.version = store.read_tagged("manifest.json")
            self.data = json.loads(raw) if raw is not None else {"stages": {}}
            write_json(self.path, self.data)
        else:
            self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def stage(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def update(self, name: str, **fields) -> None:
        with self.mutex:
            self.data["stages"].setdefault(name, {}).update(fields)
            self.save()

    def save(self) -> None:
        from wmss.runlock import Holder, locked_error
        from wmss.storage import StaleWrite

        with self.mutex:
            if self.lock is not None:
                self.lock.check()
            write_json(self.path, self.data)
            if self.store.uri is None:
                return
            try:
                self.version = self.store.write_if("manifest.json", self.path.read_bytes(), self.version)
            except StaleWrite:
                raw, _ = self.store.read_tagged("manifest.json")
                holder = Holder.parse(json.loads(raw).get("driver") or {}) if raw is not None else None
                raise locked_error(self.store, holder) from None


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every (nested, dotted) key whose value differs between two settings dicts."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
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
    to the run's, the seed is offset by the run's `seed`, and `extra` (e.g. a baseline's noise) overrides."""
    return section.model_copy(update={"max_length": section.max_length or cfg.max_length,
                                      "seed": section.seed + cfg.seed, **extra})


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
        old = self.manifest.stage(name)
        done = old if old and old.get("status") == "done" else None  # its finished outputs, kept until replaced
        unfinished = done.get("attempt") if done else old  # a run that started and did not finish
        if done and done.get("hash") == key:
            print(f"[wmss] {name}: finished earlier, skipped", flush=True)
            if unfinished:  # a re-run with other settings, abandoned: its checkpoints must never be resumed
                self.store.remove(_folder(name, unfinished))
                with self.manifest.mutex:
                    del done["attempt"]
                    self.manifest.save()
            self.finished.setdefault(key, []).append(_folder(name, done))  # fetched only if a later stage reads it
            return StageResult(self._resolve(done), key)
        run_id, earlier = None, 0.0
        if unfinished and unfinished.get("hash") == key:
            print(f"[wmss] {name}: unfinished earlier, resuming", flush=True)
            rel, run_id = _folder(name, unfinished), unfinished.get("mlflow_run_id")
            earlier = unfinished.get("wall_s", 0.0)
        else:
            if old:
                why = changed_keys(old.get("settings", {}), settings) + [
                    f"input {k} changed" for k in sorted(set(hashes) | set(old.get("inputs", {})))
                    if hashes.get(k) != old.get("inputs", {}).get(k)]
                print(f"[wmss] {name}: re-running because " + "; ".join(why or ["its inputs changed"]), flush=True)
            else:
                print(f"[wmss] {name}: running", flush=True)
            if unfinished:
                self.store.remove(_folder(name, unfinished))  # stale checkpoints must never be resumed
            # a re-run works beside the finished outputs, which stay until its own are sealed
            rel = f"stages/{name}"
            if done and _folder(name, done) == rel:
                rel = f"stages/{name}.{key}"
            self.store.remove(rel)  # whatever an earlier crash left under that name
        stage_dir = self.run_dir / rel
        self.fetch(*hashes.values())
        stage_dir.mkdir(parents=True, exist_ok=True)
        start = time.time()
        record = {"status": "running", "hash": key, "settings": settings, "inputs": hashes, "dir": rel}
        try:
            with (self.log_output(name),
                  self.tracker.stage(name, run_id=run_id, tags={"wmss.stage": name, **(tags or {})}) as run):
                record["mlflow_run_id"] = run.run_id
                self._record_attempt(name, done, record)
                outputs = fn(StageContext(stage_dir, run, self.store.durable(rel), self.localizer()))
                run.log_metrics({"wall_s": time.time() - start})
        except BaseException:
            print(f"[wmss] {name}: failed after {time.time() - start:.0f} s (its log: "
                  f"{self.run_dir / LOGS_DIR / name}.log)", flush=True)
            if "mlflow_run_id" in record:  # time spent before a resume counts too
                with contextlib.suppress(WmssError):  # a manifest this driver may no longer write
                    self._record_attempt(name, done, {**record, "wall_s": round(earlier + time.time() - start, 3)})
            raise
        self.store.seal(rel, key)  # uploaded before the manifest says done
        self.finished.setdefault(key, []).append(rel)
        recorded, paths = self._record(outputs)
        with self.manifest.mutex:
            self.manifest.data["stages"][name] = {**record, "status": "done", "outputs": recorded, "paths": paths,
                                                  "wall_s": round(earlier + time.time() - start, 3)}
            self.manifest.save()
        if done and _folder(name, done) != rel:
            self.store.remove(_folder(name, done))  # replaced: the manifest names the new outputs now
        print(f"[wmss] {name}: done in {time.time() - start:.0f} s", flush=True)
        return StageResult(outputs, key)

    def _record_attempt(self, name: str, done: dict | None, record: dict) -> None:
        """Record the running `record` of stage `name`: beside its finished entry `done` when there is one."""
        if done:
            self.manifest.update(name, attempt=record)
        else:
            with self.manifest.mutex:
                self.manifest.data["stages"][name] = {**record, "outputs": {}}
                self.manifest.save()


def _folder(name: str, entry: dict) -> str:
    """The stage folder of a manifest entry (or attempt), relative to the run directory; entries written
    before stages had re-run folders name none: theirs is stages/<name>."""
    return entry.get("dir", f"stages/{name}")


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
    """Take the run directory's lock (one driver per run directory: wmss.runlock), open (or resume) its
    MLflow parent run, log the config's params once, write `config.yaml` and join Ray (its logs to
    `<run_dir>/logs/`): what every driver (`wmss run`, `wmss tune`) does before its stages. The lock is held
    until `wf.manifest.lock.release()` or the end of the process (an error, Ctrl-C and SIGTERM included)."""
    if is_uri(run_dir) and not (cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError(f"mlflow.tracking_uri: not set, and the run directory {run_dir} is on object storage, "
                          "where the default SQLite store cannot live; set mlflow.tracking_uri (or "
                          "MLFLOW_TRACKING_URI) to a tracking server, e.g. http://mlflow:5000")
    store = RunStore(run_dir)
    _quiet_libraries(store.local / LOGS_DIR)
    manifest = hold_run_dir(store)
    try:
        return _open(cfg, store, manifest)
    except BaseException:
        manifest.lock.release()
        raise


def hold_run_dir(store: RunStore) -> Manifest:
    """The run directory's manifest, read with this process holding the directory's lock (`manifest.lock`,
    wmss.runlock; RunDirLocked naming the holder when another driver has it). The lock is given up by
    `manifest.lock.release()`, or when the process ends."""
    from wmss.runlock import lock_run_dir

    if store.uri is None:  # the lock file first, then the manifest it guards
        lock = lock_run_dir(store, None)
        manifest = Manifest(store)
    else:  # the lock is the manifest's `driver` entry
        manifest = Manifest(store)
        lock = lock_run_dir(store, manifest)
    manifest.lock = lock
    return manifest


def _open(cfg: WMSSConfig, store: RunStore, manifest: Manifest) -> Workflow:
    from wmss.raycluster import ensure_ray
    from wmss.tracking import Tracker, flatten, git_sha, resolve_tracking_uri

    data_src = cfg.data.train
    tracker = Tracker(resolve_tracking_uri(cfg.mlflow.tracking_uri, store.local), cfg.mlflow.experiment, cfg.name,
                      parent_run_id=manifest.data.get("mlflow_parent_run_id"),
                      tags={"wmss.git_sha": git_sha() or "unknown", "wmss.run_dir": str(store),
                            "wmss.data_hash": data_src if data_src == "demo" else fingerprint(data_src)
                            if isinstance(data_src, str) else _digest(public_config(cfg)["data"]["train"])})
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


def reset_stage(manifest: Manifest, name: str) -> list[str]:
    """Forget stage `name` and every stage downstream of it (each stage whose recorded inputs reach it through
    the hash chain): their manifest entries, then their folders, so the next run re-runs them. Returns the
    reset stages in the order they ran."""
    stages = manifest.data["stages"]
    if name not in stages:
        raise InputError(f"{manifest.store}: no stage {name!r} in its manifest; it has "
                         f"{', '.join(stages) or 'none'}")

    def runs(entry: dict) -> list[dict]:  # an entry and its unfinished re-run, if any
        return [entry, *([entry["attempt"]] if "attempt" in entry else [])]

    reached = {run.get("hash") for run in runs(stages[name])}
    chosen, grew = {name}, True
    while grew:
        grew = False
        for other, entry in stages.items():
            if other not in chosen and reached & {h for run in runs(entry) for h in run.get("inputs", {}).values()}:
                chosen.add(other)
                reached |= {run.get("hash") for run in runs(entry)}
                grew = True
    reset = [other for other in stages if other in chosen]
    with manifest.mutex:
        removed = {other: stages.pop(other) for other in reset}
        manifest.save()  # first: a folder is never gone while the manifest still names it
    for other, entry in removed.items():
        for run in runs(entry):
            manifest.store.remove(_folder(other, run))
    return reset


def add_stage_arguments(parser) -> None:
    parser.add_argument("action", choices=["reset"],
                        help="reset: forget STAGE and every stage downstream of it, so the next run re-runs them")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (a folder or an object-store URI)")
    parser.add_argument("stage", metavar="STAGE", help="a stage as the run directory's manifest names it, e.g. sft")


def run_stage_cli(args) -> int:
    """`wmss stage reset RUN_DIR STAGE`: under the run directory's lock (refused while a driver holds it),
    reset STAGE and everything downstream of it, printing each reset stage."""
    if not is_uri(args.run_dir) and not (Path(args.run_dir) / "manifest.json").is_file():
        raise InputError(f"{args.run_dir}: not a run directory (no manifest.json)")
    manifest = hold_run_dir(RunStore(args.run_dir))
    try:
        reset = reset_stage(manifest, args.stage)
    finally:
        manifest.lock.release()
    print("".join(f"reset {name}\n" for name in reset), end="")
    print(f"the next run of {args.run_dir} re-runs {'it' if len(reset) == 1 else 'them'}")
    return 0
