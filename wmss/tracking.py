"""MLflow tracking for the workflow: one parent run per workflow run directory, a nested run per stage,
and the plots that explain a WMSS run.

Runs are addressed by id through `MlflowClient`, never through MLflow's global active-run stack, so the
driver and Ray Train workers (which get `StageRun.worker_info()`) can log to the same run side by side.
A tracking server that goes away does not stop a stage: `StageRun` keeps what it could not send and
sends it when the server is back, or drops it with a warning after a bounded time.

Tag conventions (the workflow sets them): parent `wmss.git_sha`, `wmss.data_hash`, `wmss.run_dir`; every
stage run `wmss.stage`; eval stage runs `wmss.method` (sft, wmss, neftune, ...) with metrics
`eval/<benchmark>/<metric>`. The parent carries the outcome (`Tracker.log_results`), which is what
`wmss compare` (wmss.compare) reads."""

from __future__ import annotations

import contextlib
import hashlib
import os
import logging
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from wmss.errors import ConfigError

STAGE_TAG = "wmss.stage"
# the experiment's kind for MLflow: model training, not GenAI. MLflow 3.17's UI opens on the view its own GenAI /
# Model training switch (or the address's workflowType) names, whatever this tag says; wmss.compare's links name it
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
SQLITE_PREFIX = "sqlite:///"
# a Ray Train worker's MLflow requests: no retries inside MLflow's client (its default, 7 with backoff, blocks a
# training step for minutes while the server is down; StageRun retries between steps instead) and a short timeout
WORKER_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ where to log


def resolve_tracking_uri(configured: str | None, run_dir: str | os.PathLike) -> str:
    """The tracking URI to use: `configured` (the config's mlflow.tracking_uri), else the
    MLFLOW_TRACKING_URI environment variable, else `sqlite:///<absolute run_dir>/mlflow.db`.

    A relative SQLite path is made absolute (against the current directory), so Ray workers, which run
    elsewhere, reach the same database. A file store (`./mlruns`, `file:...`) raises ConfigError naming
    where the URI came from: MLflow 3.17 refuses it."""
    for source, uri in (("mlflow.tracking_uri in the config", configured),
                        ("the MLFLOW_TRACKING_URI environment variable", os.environ.get("MLFLOW_TRACKING_URI"))):
        if not uri:
            continue
        scheme = urlparse(uri).scheme
        if scheme in ("", "file") or len(scheme) == 1:  # a bare path (one letter: a Windows drive) is a file store
            raise ConfigError(f"{source} is {uri!r}, an MLflow file store, which MLflow 3.17 refuses; use a "
                             f"database such as sqlite:///{Path(run_dir).resolve() / 'mlflow.db'} or a tracking "
                             "server such as http://127.0.0.1:5000")
        db = sqlite_path(uri)
        return f"{SQLITE_PREFIX}{db.resolve()}" if db is not None else uri
    return f"{SQLITE_PREFIX}{Path(run_dir).resolve() / 'mlflow.db'}"


def _redacted(uri: str) -> str:
    from wmss.config import redact_uri

    return redact_uri(uri)


def _short(err: MlflowException, limit: int = 200) -> str:
    return err.message if len(err.message) <= limit else err.message[:limit] + "..."


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative or absolute), None for other stores."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return Path(uri[len(SQLITE_PREFIX):])


# ------------------------------------------------------------------------------------------ runs


class StageRun:
    """One MLflow run addressed by its id: a workflow stage (or, inside `Tracker`, the parent run).

    Metrics and params survive a tracking server that goes away: what cannot be sent (the server is
    unreachable, or answers with a 5xx) is kept and sent with a later call, no sooner than `retry_s` after
    the last try (so a step does not pay for a dead server each time); once the server has been
    unreachable for `give_up_s`, what is kept is dropped with a warning saying how much. A refusal (4xx:
    a param logged before with another value, a deleted run) still raises at once."""

    def __init__(self, client: MlflowClient, tracking_uri: str, run_id: str, retry_s: float = 30.0,
                 give_up_s: float = 600.0):
        self.client, self.tracking_uri, self.run_id = client, tracking_uri, run_id
        self.retry_s, self.give_up_s = retry_s, give_up_s
        self._metrics: list[Metric] = []  # kept while the server is unreachable
        self._params: list[Param] = []
        self._down_since: float | None = None  # time.monotonic() of the first failed send of this outage
        self._next_try = 0.0

    @classmethod
    def in_worker(cls, info: Mapping[str, str]) -> StageRun:
        """The run `worker_info()` describes, for a Ray Train worker process: MLflow's own HTTP retries are
        turned off in this process (WORKER_HTTP_SETTINGS, unless its environment sets them), so a send to a
        dead server fails in milliseconds and the step goes on; this StageRun retries between steps."""
        for name, value in WORKER_HTTP_SETTINGS.items():
            os.environ.setdefault(name, value)
        return cls(MlflowClient(tracking_uri=info["tracking_uri"]), info["tracking_uri"], info["run_id"])

    def worker_info(self) -> dict:
        """What a Ray Train worker needs to log to this run with its own MlflowClient (plain data)."""
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log every metric at `step` (0 when None) in one batch (kept for later while the server is down)."""
        now = int(time.time() * 1000)
        self._metrics += [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        self._send()

    def log_params(self, params: Mapping[str, object]) -> None:
        """Log params in batches; each value is str()-ed and cut to MLflow's limit (6000 characters) — the
        full values belong in an artifact (the resolved config). Raises MlflowException when a param
        already logged to this run had another value. Kept for later while the server is down."""
        self._params += [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in params.items()]
        self._send()

    def flush(self, wait_s: float = 30.0) -> None:
        """Send what is kept, trying every second for up to `wait_s`; then drop it with a warning. For the end
        of a stage, when no later call would send it."""
        deadline = time.monotonic() + wait_s
        while self._metrics or self._params:
            self._next_try = 0.0
            self._send(final=time.monotonic() >= deadline)
            if self._metrics or self._params:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _send(self, final: bool = False) -> None:
        now = time.monotonic()
        if now >= self._next_try:
            try:
                self.client.log_batch(self.run_id, metrics=self._metrics, params=self._params)
            except MlflowException as e:
                if e.get_http_status_code() < 500:  # refused, not unreachable: nothing to wait for
                    self._metrics, self._params = [], []
                    raise
                if self._down_since is None:
                    self._down_since = now
                    log.warning("MLflow at %s is unreachable (%s); keeping run %s's metrics and params, retrying "
                                "every %.0f s for up to %.0f s", _redacted(self.tracking_uri), _short(e),
                                self.run_id, self.retry_s, self.give_up_s)
                self._next_try = now + self.retry_s
            else:
                if self._down_since is not None:
                    log.warning("MLflow at %s is reachable again: run %s's kept metrics and params were sent",
                                _redacted(self.tracking_uri), self.run_id)
                self._metrics, self._params, self._down_since = [], [], None
                return
        if final or now - self._down_since >= self.give_up_s:
            log.warning("MLflow at %s unreachable for %.0f s: dropped %d metric value(s) and %d param(s) of run %s",
                        _redacted(self.tracking_uri), now - self._down_since, len(self._metrics), len(self._params),
                        self.run_id)
            # what comes next is kept for another give_up_s (and dropped with another warning if still unsent)
            self._metrics, self._params, self._down_since = [], [], now

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy the file `path` into the run's artifacts (under `artifact_path`, when given)."""
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, fig: Figure, name: str) -> None:
        """Save `fig` as the PNG artifact `plots/<name>` (".png" added when `name` has no suffix)."""
        self.client.log_figure(self.run_id, fig, f"plots/{name}" if Path(name).suffix else f"plots/{name}.png")


class Tracker:
    """One workflow's MLflow parent run (resumable) and its nested stage runs."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None):
        """Open the parent run `run_name` in `experiment` (created when missing), or resume the run
        `parent_run_id` (a rerun of the same run directory: status back to RUNNING, `tags` updated).

        With a SQLite store, the database's folder is created and a new experiment keeps its artifacts in
        `mlartifacts/` beside the database (MLflow's default would be ./mlruns under the current
        directory). Resuming a run that does not exist, or belongs to another experiment, raises ValueError."""
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        db = sqlite_path(tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            artifacts = (db.parent.resolve() / "mlartifacts").as_uri() if db is not None else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts,
                                                               tags=EXPERIMENT_KIND)
        if parent_run_id is None:
            self.parent_run_id = self.client.create_run(self.experiment_id, run_name=run_name,
                                                        tags=tags or {}).info.run_id
        else:
            run = _existing_run(self.client, tracking_uri, parent_run_id)
            if run.info.experiment_id != self.experiment_id:
                raise ValueError(f"cannot resume MLflow run {parent_run_id} in experiment {experiment!r}: it "
                                 f"belongs to experiment id {run.info.experiment_id} at {tracking_uri}; keep the "
                                 "experiment name of the run directory's first run")
            self.parent_run_id = parent_run_id
            self.client.update_run(parent_run_id, status="RUNNING")
            self.client.log_batch(parent_run_id, tags=[RunTag(k, v) for k, v in (tags or {}).items()])
        self._parent = StageRun(self.client, tracking_uri, self.parent_run_id)

    def log_params(self, flat: Mapping[str, object]) -> None:
        """Log params to the parent run (see `StageRun.log_params`)."""
        self._parent.log_params(flat)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics to the parent run at `step` (0 when None)."""
        self._parent.log_metrics(metrics, step)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy the file `path` into the parent run's artifacts."""
        self._parent.log_artifact(path, artifact_path)

    def log_figure(self, fig: Figure, name: str) -> None:
        """Save `fig` as the PNG artifact `plots/<name>` of the parent run."""
        self._parent.log_figure(fig, name)

    @contextlib.contextmanager
    def stage(self, name: str, run_id: str | None = None, tags: dict[str, str] | None = None) -> Iterator[StageRun]:
        """A nested run `name` (tagged `wmss.stage`, plus `tags`, e.g. `wmss.method` on eval stages) under
        the parent, or the nested run `run_id` resumed (its `tags` updated). It ends FINISHED when the
        block completes (after StageRun.flush), KILLED on Ctrl-C and FAILED on any other exception (which
        propagates). Resuming a
        run that is not this parent's stage `name` raises ValueError."""
        if run_id is None:
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags={
                **(tags or {}), MLFLOW_PARENT_RUN_ID: self.parent_run_id, STAGE_TAG: name}).info.run_id
        else:
            found = _existing_run(self.client, self.tracking_uri, run_id).data.tags
            if found.get(MLFLOW_PARENT_RUN_ID) != self.parent_run_id or found.get(STAGE_TAG) != name:
                raise ValueError(f"cannot resume MLflow run {run_id} as stage {name!r} of run {self.parent_run_id}: "
                                 f"it is stage {found.get(STAGE_TAG)!r} of run {found.get(MLFLOW_PARENT_RUN_ID)}")
            self.client.update_run(run_id, status="RUNNING")
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in (tags or {}).items()])
        run = StageRun(self.client, self.tracking_uri, run_id)
        try:
            yield run
        except KeyboardInterrupt:
            self.client.set_terminated(run_id, "KILLED")
            raise
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        run.flush()
        self.client.set_terminated(run_id, "FINISHED")

    def log_results(self, results: Mapping[str, Mapping[str, float | None]], table: str,
                    wall_s: Mapping[str, float]) -> None:
        """The workflow's outcome on the parent run, where MLflow's chart and compare views show it without
        expanding a nested run: `<method>/<benchmark>/accuracy` and `.../delta_vs_sft` metrics, each stage's
        `wall_s/<stage>`, the results as an MLflow table (`results_table.json`) and the printed table as
        the run's description."""
        metrics = {f"wall_s/{stage}": float(s) for stage, s in wall_s.items()}
        rows = []
        for method, accuracies in results.items():
            for bench, accuracy in accuracies.items():
                if accuracy is None:
                    continue
                reference = results.get("sft", {}).get(bench)
                delta = accuracy - reference if reference is not None and method != "sft" else None
                metrics[f"{method}/{bench}/accuracy"] = float(accuracy)
                if delta is not None:
                    metrics[f"{method}/{bench}/delta_vs_sft"] = float(delta)
                rows.append({"method": method, "benchmark": bench, "accuracy": accuracy, "delta_vs_sft": delta})
        self.log_metrics(metrics)
        if rows:
            self.client.log_table(self.parent_run_id, data={k: [r[k] for r in rows] for k in rows[0]},
                                  artifact_file="results_table.json")
        self.client.set_tag(self.parent_run_id, "mlflow.note.content", f"```\n{table}\n```")

    def finish(self, status: str = "FINISHED") -> None:
        """Send what the parent run kept while the server was down (StageRun.flush), then end it with
        `status` (FINISHED, FAILED or KILLED)."""
        self._parent.flush()
        self.client.set_terminated(self.parent_run_id, status)


def _existing_run(client: MlflowClient, tracking_uri: str, run_id: str):
    """The run `run_id` to resume; ValueError when the store has no such live run."""
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"cannot resume MLflow run {run_id}: not found at {tracking_uri} ({e.message}); was the "
                         "tracking URI changed since the run directory's first run?") from e
    if run.info.lifecycle_stage == "deleted":
        raise ValueError(f"cannot resume MLflow run {run_id} at {tracking_uri}: it was deleted; restore it "
                         f"(`mlflow runs restore --run-id {run_id}`) or start a new run directory")
    return run


# ------------------------------------------------------------------------------------------ provenance


def flatten(config: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested mappings to dotted keys: {"a": {"b": 1}} -> {"a.b": 1}. Non-mapping values (lists, None)
    are kept as they are, and an empty mapping stays a value, so no key disappears."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_sha(repo_dir: str | os.PathLike | None = None) -> str | None:
    """The commit checked out in `repo_dir` (default: the checkout this package runs from); None when it is
    not inside a git work tree or git is not installed. A missing `repo_dir` raises NotADirectoryError."""
    where = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent
    if not where.is_dir():
        raise NotADirectoryError(f"git_sha: {where} is not a directory")
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:  # no git on this machine
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in chunks. For a directory: the SHA-256 of its files' sorted
    (relative POSIX path, file digest) pairs, so it changes when any file's content or name changes."""
    path = Path(path)
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()
    if not path.is_dir():
        raise FileNotFoundError(f"file_sha256: {path} does not exist")
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for rel in files:
        digest.update(f"{rel}\0{file_sha256(path / rel)}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ plots


def entropy_scatter(entropy_weak, entropy_strong, selected_mask) -> Figure:
    """Per-sample entropy of the weak (x) vs the strong model (y), the samples in the active set marked,
    with the line y = x (above it the strong model got less sure: "regression repair"; below it
    "consolidation")."""
    weak, strong = np.asarray(entropy_weak, dtype=float), np.asarray(entropy_strong, dtype=float)
    selected = np.asarray(selected_mask, dtype=bool)
    if not (weak.ndim == strong.ndim == selected.ndim == 1 and len(weak) == len(strong) == len(selected)):
        raise ValueError(f"entropy_scatter needs three 1-D arrays of one length, got shapes {weak.shape}, "
                         f"{strong.shape}, {selected.shape}")
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(weak[~selected], strong[~selected], s=6, c="0.7", label=f"not drawn ({int((~selected).sum())})")
    ax.scatter(weak[selected], strong[selected], s=8, c="tab:red", label=f"in the active set ({int(selected.sum())})")
    ends = [min(weak.min(), strong.min()), max(weak.max(), strong.max())] if len(weak) else [0, 1]
    ax.plot(ends, ends, ls="--", c="k", lw=1, label="y = x")
    ax.set(xlabel="entropy, weak model (nats/token)", ylabel="entropy, strong model (nats/token)",
           title="per-sample entropy: weak vs strong")
    ax.legend(loc="upper left", fontsize="small")
    return fig


def weight_histogram(weights) -> Figure:
    """Histogram of the CEDA sampling weights, with the uniform weight 1/|D| marked."""
    weights = np.asarray(weights, dtype=float)
    if weights.ndim != 1 or not len(weights):
        raise ValueError(f"weight_histogram needs a non-empty 1-D array, got shape {weights.shape}")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ax.hist(weights, bins=min(50, max(10, len(weights) // 20)), color="tab:blue")
    ax.axvline(1 / len(weights), ls="--", c="k", lw=1, label="uniform 1/|D|")
    ax.set(xlabel="sampling weight p_i", ylabel="samples", title=f"CEDA sampling weights (|D| = {len(weights)})")
    ax.legend(fontsize="small")
    return fig


def format_results(results: dict, nll: dict | None = None) -> str:
    """methods x benchmarks accuracy table, with the delta of each method vs SFT where SFT was run; with
    `nll` ({method: {benchmark: nats/token}}, the gold solutions' per-token NLL), a column of it per
    benchmark that has one, with its delta vs SFT too."""
    benches = sorted({b for r in results.values() for b in r})
    columns = [(b, b, results, max(14, len(b) + 2), lambda v: f"{100 * v:.1f}", lambda d: f"{100 * d:+.1f}")
               for b in benches]
    nll = nll or {}
    columns += [(f"{b} nll", b, nll, max(16, len(b) + 6), lambda v: f"{v:.3f}", lambda d: f"{d:+.3f}")
                for b in sorted({b for r in nll.values() for b in r})]
    width = max([10, *(len(m) + 2 for m in results)])
    head = f"{'method':<{width}}" + "".join(f"{title:>{w}}" for title, _, _, w, *_ in columns)
    lines = [head, "-" * len(head)]
    for method in results:
        cells = []
        for _, bench, table, w, show, show_delta in columns:
            value, ref = table.get(method, {}).get(bench), table.get("sft", {}).get(bench)
            delta = f" ({show_delta(value - ref)})" if value is not None and ref is not None and method != "sft" else ""
            cells.append(f"{'-' if value is None else show(value)}{delta}".rjust(w))
        lines.append(f"{method:<{width}}" + "".join(cells))
    return "\n".join(lines)


def results_figure(results: Mapping[str, Mapping[str, float | None]]) -> Figure:
    """Grouped bars of accuracy (%) per benchmark, one bar per method ({method: {benchmark: accuracy}})."""
    benches = sorted({b for accs in results.values() for b in accs})
    if not benches:
        raise ValueError("results_figure: no benchmark results")
    fig = Figure(figsize=(max(5, 1.6 * len(benches) * max(1, len(results)) / 3), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(results))
    for i, (method, accs) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(benches))]
        ax.bar(xs, [100 * (accs.get(b) or 0.0) for b in benches], width, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(benches))], benches)
    ax.set(ylabel="accuracy (%)", title="accuracy by method and benchmark")
    ax.legend(fontsize="small")
    return fig


# panel title -> the history keys drawn in it; the non-target masses share a panel because their gap is the
# point of mixing (the mix keeps more mass on the negatives than the strong model alone)
TRAINING_PANELS = {"loss": ("loss",), "learning rate": ("lr",), "strong margin z[y] - mean z[k]": ("margin_strong",),
                   "non-target mass 1 - p(y)": ("nontarget_mass_strong", "nontarget_mass_mix")}


def training_curves(history: Mapping[str, list[tuple[int, float]]]) -> Figure:
    """One panel per quantity of TRAINING_PANELS present in `history` ({key: [(step, value), ...]}, keys
    without the "train/" prefix, as `metric_history` returns them), stacked over a shared step axis.
    ValueError when none is present."""
    panels = {title: [k for k in keys if history.get(k)] for title, keys in TRAINING_PANELS.items()}
    panels = {title: keys for title, keys in panels.items() if keys}
    if not panels:
        raise ValueError(f"training_curves: none of {[k for keys in TRAINING_PANELS.values() for k in keys]} in "
                         f"the history (it has {sorted(history)})")
    fig = Figure(figsize=(7, 2.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, keys) in zip(axes, panels.items()):
        for key in keys:
            steps, values = zip(*history[key])
            ax.plot(steps, values, label=key)
        ax.set_title(title, fontsize="medium")
        if len(keys) > 1:
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    return fig


def metric_history(tracking_uri: str, run_id: str, prefix: str = "train/") -> dict[str, list[tuple[int, float]]]:
    """Every metric of the run whose name starts with `prefix`, as {name without prefix: [(step, value)]}
    sorted by step. A step logged more than once (a resumed stage repeats the steps after its last
    checkpoint) keeps its newest value."""
    client = MlflowClient(tracking_uri=tracking_uri)
    history = {}
    for key in sorted(k for k in client.get_run(run_id).data.metrics if k.startswith(prefix)):
        newest = {}
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
            newest[m.step] = m.value
        history[key[len(prefix):]] = sorted(newest.items())
    return history
