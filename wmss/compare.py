"""`wmss compare`: workflow runs side by side, read from MLflow. For each workflow run, one methods x
benchmarks table (accuracy %, and the difference to `sft` in points) from the metrics
`Tracker.log_results` puts on its parent run, under a line naming the settings in which the runs differ;
then the links to the same runs in MLflow's UI (the experiment's training view, the compare view).

A workflow run is an MLflow run tagged `wmss.run_dir` (the parent run `open_workflow` opens). Flags
select them: an experiment, run names, run directories (each one's manifest names its parent run, its
config.yaml the tracking URI), an MLflow filter. Every flag given narrows the selection; the values of
one flag add up."""

from __future__ import annotations

import argparse
import json
from urllib.parse import quote, urlparse

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from wmss.config import config_from_mapping, load_yaml, redact_uri
from wmss.errors import ConfigError, InputError, WmssError
from wmss.storage import filesystem, is_uri
from wmss.tracking import resolve_tracking_uri, sqlite_path

RUN_DIR_TAG = "wmss.run_dir"
FIRST_METHODS = ("base", "sft")  # then the rest by name
MAX_SETTINGS_SHOWN = 12


def workflow_runs(tracking_uri: str, experiment: str | None = None, names=(), run_ids=(),
                  filter_string: str | None = None) -> list[Run]:
    """The workflow runs at `tracking_uri` (every experiment, or `experiment`) whose name is one of `names`
    and whose id is one of `run_ids` (each when given) and that match the MLflow `filter_string` (e.g.
    "params.`jtws.lam` != ''"), oldest first. An unknown experiment or a filter MLflow refuses raises
    ConfigError."""
    client = MlflowClient(tracking_uri=tracking_uri)
    if experiment is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            known = sorted(e.name for e in client.search_experiments())
            raise ConfigError(f"--experiment {experiment!r}: no such MLflow experiment at {redact_uri(tracking_uri)}; "
                              f"it has {known}")
        experiment_ids = [found.experiment_id]
    query = " and ".join([f"tags.`{RUN_DIR_TAG}` != ''", *([filter_string] if filter_string else [])])
    runs, token = [], None
    while True:  # search_runs pages at 1000 runs
        try:
            page = client.search_runs(experiment_ids, query, order_by=["attributes.start_time ASC"],
                                      page_token=token)
        except MlflowException as e:
            if filter_string and e.get_http_status_code() == 400:
                raise ConfigError(f"--filter {filter_string!r}: MLflow cannot use it: {e.message}") from None
            raise
        runs += page
        token = page.token
        if not token:
            break
    return [r for r in runs if (not names or r.info.run_name in names) and (not run_ids or r.info.run_id in run_ids)]


def run_results(run: Run) -> dict[str, dict[str, float]]:
    """{method: {benchmark: accuracy}} from the run's `<method>/<benchmark>/accuracy` metrics, methods in
    FIRST_METHODS order, then by name. {} when the run has none (its evaluation has not finished)."""
    results: dict[str, dict[str, float]] = {}
    for key, value in sorted(run.data.metrics.items()):
        method, _, rest = key.partition("/")
        if rest.endswith("/accuracy") and rest != "/accuracy":
            results.setdefault(method, {})[rest.removesuffix("/accuracy")] = value
    rank = {m: i for i, m in enumerate(FIRST_METHODS)}
    return dict(sorted(results.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def differing_params(runs: list[Run]) -> dict[str, dict[str, str]]:
    """{run id: {param: value}} of the params whose value is not the same in every run ("-" where a run
    lacks one); empty dicts for a single run."""
    keys = sorted({k for r in runs for k in r.data.params})
    differ = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    return {r.info.run_id: {k: r.data.params.get(k, "-") for k in differ} for r in runs}


def mlflow_links(server: str, runs: list[Run], experiments: dict[str, str]) -> list[str]:
    """Where MLflow's UI at `server` (user info removed) shows `runs`: a line per experiment (its runs) and
    one for MLflow 3's compare view of the runs (`#/compare-runs?runs=[ids]&experiments=[ids]`), or for one
    run its page. Each asks for the training view (`workflowType=machine_learning`): MLflow 3.17's UI opens
    on its GenAI pages unless the address or the browser's last choice says otherwise, whatever the
    experiment's mlflow.experimentKind tag."""
    base, view = redact_uri(server).rstrip("/"), "workflowType=machine_learning"
    lines = [f"experiment {name}: {base}/#/experiments/{eid}?{view}" for eid, name in experiments.items()]
    if len(runs) == 1:
        return [*lines, f"run {runs[0].info.run_name}: {base}/#/experiments/{runs[0].info.experiment_id}/runs/"
                        f"{runs[0].info.run_id}?{view}"]

    def listed(ids):
        return quote(json.dumps(ids, separators=(",", ":")))
    return [*lines, f"compare view: {base}/#/compare-runs?runs={listed([r.info.run_id for r in runs])}"
                    f"&experiments={listed(sorted(experiments))}&{view}"]


def compare_report(tracking_uri: str, runs: list[Run]) -> str:
    """The text `wmss compare` prints for `runs` of one store: a table per run, then where to compare them in
    MLflow's UI (the address itself for an http(s) server, else the `mlflow server` command to start one)."""
    from wmss.tracking import format_results  # the table `wmss run` prints: one format for both

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = {e: client.get_experiment(e).name for e in sorted({r.info.experiment_id for r in runs})}
    differs = differing_params(runs)
    blocks = []
    for run in runs:
        head = (f"{run.info.run_name} · experiment {experiments[run.info.experiment_id]} · run {run.info.run_id} "
                f"· {run.info.status}")
        settings = [f"{k}={v}" for k, v in differs[run.info.run_id].items()]
        if len(settings) > MAX_SETTINGS_SHOWN:
            settings = settings[:MAX_SETTINGS_SHOWN] + [f"... {len(settings) - MAX_SETTINGS_SHOWN} more"]
        results = run_results(run)
        blocks.append("\n".join([head, *([f"differs: {'  '.join(settings)}"] if settings else []),
                                 format_results(results) if results else
                                 "no results yet: the parent run gets them when the workflow's evaluation finishes"]))
    if urlparse(tracking_uri).scheme in ("http", "https"):
        where, server = "MLflow:", tracking_uri
    else:
        where = f"MLflow: start `mlflow server --backend-store-uri {tracking_uri} --port 5000`, then open"
        server = "http://127.0.0.1:5000"
    links = [f"  {line}" for line in mlflow_links(server, runs, experiments)]
    return "\n\n".join([*blocks, "\n".join(["accuracy in %, (difference to sft in points)", where, *links])])


def run_dir_parent(run_dir: str, tracking_uri: str | None) -> tuple[str, str]:
    """(tracking URI, parent run id) of the workflow run directory `run_dir` (a folder or an object-store URI):
    the id from its manifest.json, the URI from `tracking_uri`, else its config.yaml's mlflow.tracking_uri
    (as `wmss run` resolves it). InputError when either file is missing or names no run."""
    try:
        manifest = json.loads(_read_run_file(run_dir, "manifest.json"))
    except json.JSONDecodeError as e:
        raise InputError(f"{run_dir}/manifest.json: not JSON ({e})") from None
    run_id = manifest.get("mlflow_parent_run_id") if isinstance(manifest, dict) else None
    if not run_id:
        raise InputError(f"{run_dir}/manifest.json: no mlflow_parent_run_id; was the run directory made by "
                         "`wmss run`?")
    if tracking_uri is None:
        config = config_from_mapping(load_yaml(_read_run_file(run_dir, "config.yaml")) or {},
                                     where=f"config {run_dir}/config.yaml")
        tracking_uri = config.mlflow.tracking_uri
    return resolve_tracking_uri(tracking_uri, run_dir), run_id


def _read_run_file(run_dir: str, name: str) -> str:
    path = f"{str(run_dir).rstrip('/')}/{name}"
    try:
        if is_uri(run_dir):
            fs, inside = filesystem(path)
            with fs.open_input_stream(inside) as f:
                return f.read().decode()
        with open(path.removeprefix("file://")) as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: not found; --run-dir takes a workflow run directory (one `wmss run` wrote)") from None
    except (OSError, ValueError) as e:  # unreadable, or a URI no filesystem opens
        raise InputError(f"{path}: cannot be read: {e}") from None


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Every flag given narrows the selection; the values of one flag add up. Without --run-dir, the "
                     "store is --tracking-uri, else MLFLOW_TRACKING_URI, else ./mlflow.db.")
    parser.add_argument("--experiment", help="MLflow experiment name (default: every experiment)")
    parser.add_argument("--runs", nargs="+", metavar="NAME", default=[], help="workflow runs by name")
    parser.add_argument("--run-dir", nargs="+", metavar="D", default=[],
                        help="workflow run directories (their manifest names the run, their config the store)")
    parser.add_argument("--filter", metavar="EXPR",
                        help="MLflow search filter on the workflow runs, e.g. \"params.`jtws.lam` != ''\"")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: see below)")


def run_compare(args: argparse.Namespace) -> int:
    """`wmss compare`: print each store's report (compare_report). Errors are WmssErrors: a missing run
    directory, database or experiment, a refused filter, no matching run, an unreachable server."""
    stores: dict[str, dict[str, str]] = {}  # tracking URI -> {parent run id: its --run-dir folder}
    for run_dir in args.run_dir:
        uri, run_id = run_dir_parent(run_dir, args.tracking_uri)
        stores.setdefault(uri, {})[run_id] = run_dir
    if not args.run_dir:
        stores[resolve_tracking_uri(args.tracking_uri, ".")] = {}
    reports = []
    for uri, run_dirs in stores.items():
        db = sqlite_path(uri)
        if db is not None and not db.is_file():  # MLflow would create an empty database there
            raise InputError(f"no MLflow database at {db}; pass --run-dir of a workflow run, --tracking-uri, or set "
                             "MLFLOW_TRACKING_URI")
        try:
            for run_id, run_dir in run_dirs.items():
                _check_exists(uri, run_id, run_dir)
            runs = workflow_runs(uri, args.experiment, args.runs, list(run_dirs), args.filter)
            if not runs:
                given = " ".join(f"--{flag.replace('_', '-')} {value if isinstance(value, str) else ' '.join(value)}"
                                 for flag, value in vars(args).items()
                                 if flag in ("experiment", "runs", "run_dir", "filter") and value)
                raise InputError(f"no workflow run (MLflow tag {RUN_DIR_TAG}) at {redact_uri(uri)} matches "
                                 f"{given or 'at all'}")
            reports.append(compare_report(uri, runs))
        except MlflowException as e:
            raise WmssError(f"MLflow at {redact_uri(uri)}: {e.message}") from None
    print("\n\n".join(reports))
    return 0


def _check_exists(tracking_uri: str, run_id: str, run_dir: str) -> None:
    try:
        MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException as e:
        if e.get_http_status_code() != 404:
            raise
        raise InputError(f"{run_dir}/manifest.json: its MLflow run {run_id} is not at {redact_uri(tracking_uri)}; pass "
                         "--tracking-uri of the store the run logged to") from None
