"""`wmss submit` and `wmss jobs`: the driver workflow as a Ray job on a cluster.

A submission is the local command made remote. Its entrypoint is exactly the `wmss run ...` a user would
type on a laptop, plus `--run-dir` on shared storage; its runtime environment is the user's project folder
(uploaded as the working directory: `--project`, else the current directory), the wmss package itself as a
py_modules entry when it is not part of that folder, and wmss's pinned requirements (the cluster image
provides torch and Ray); the run name is the job's submission id and the run folder's name, so submitting
the same name again resumes that run's directory. Credentials come from the environment only and are never printed.

Everything that decides what is sent is a pure function, tested without a cluster; the two commands at
the bottom are thin wrappers around Ray's `JobSubmissionClient`.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import re
import shlex
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from wmss.config import ConfigError, add_config_source_arguments, config_file, load_yaml
from wmss.errors import WmssError

# Ray's token for the job API (the same variable Ray itself reads); sent as a bearer header.
RAY_TOKEN_ENV = "RAY_AUTH_TOKEN"
# Secrets the job needs from the submitting user's shell: forwarded only when set, never printed.
SECRET_ENV_VARS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
REDACTED = "<redacted>"
# The cluster image provides these: torch must be the CUDA build that vLLM pins, and Ray must be the
# cluster's own (a job cannot change it).
IMAGE_PROVIDED = frozenset({"torch", "ray"})
# Job metadata key that ties every attempt of a run together.
RUN_METADATA_KEY = "wmss_run"

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class SubmitError(ConfigError):
    """A submission that cannot be made as asked; the message says what to change."""


@dataclass(frozen=True)
class Submission:
    """What `wmss submit` sends: the run name, the shell entrypoint, the runtime env and job metadata."""

    run: str
    run_dir: str
    entrypoint: str
    runtime_env: dict
    metadata: dict


def project_root(project: str | os.PathLike | None, config: str | os.PathLike | None,
                 cwd: Path | None = None) -> Path:
    """The folder uploaded as the job's working directory: `project` (`--project`) when given, else the
    current directory when it has a pyproject.toml or holds the config file; SubmitError otherwise (the
    current directory could be a home folder, too big and too private to upload)."""
    if project is not None:
        root = Path(project).resolve()
        if not root.is_dir():
            raise SubmitError(f"--project {project}: no such folder")
        return root
    cwd = (cwd or Path.cwd()).resolve()
    if (cwd / "pyproject.toml").is_file() or (config is not None and Path(config).resolve().is_relative_to(cwd)
                                              and Path(config).is_file()):
        return cwd
    raise SubmitError(f"which project should the job get? the current directory {cwd} has no pyproject.toml "
                      "and does not hold the config: pass --project DIR (the folder uploaded as its working "
                      "directory)")


def pinned_requirements(pyproject: Path) -> list[str]:
    """The project's requirement strings from `pyproject`, in order, less those the cluster image provides."""
    dependencies = tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"]
    return [d for d in dependencies if canonicalize_name(Requirement(d).name) not in IMAGE_PROVIDED]


def wmss_packages() -> list[Path]:
    """The folders of the running wmss code: the `wmss` package and the `workflows` drivers beside it."""
    import workflows

    return [Path(__file__).resolve().parent, Path(workflows.__file__).resolve().parent]


def wmss_requirements() -> list[str]:
    """wmss's own pinned requirements less those the image provides: from the pyproject.toml of its source
    checkout (an editable install), else from the installed distribution's metadata (a wheel install)."""
    pyproject = wmss_packages()[0].parent / "pyproject.toml"
    if pyproject.is_file():
        return pinned_requirements(pyproject)
    from importlib.metadata import requires

    wanted = [Requirement(r) for r in requires("wmss") or [] if "extra ==" not in r]
    return [str(r) for r in wanted if canonicalize_name(r.name) not in IMAGE_PROVIDED]


def build_runtime_env(root: Path, environ: Mapping[str, str], *, pip: bool = True) -> dict:
    """The Ray runtime env of a submission: the project `root` as working_dir, the wmss packages as
    py_modules unless they are inside `root` (a wmss checkout), wmss's pinned requirements as pip (none
    when `pip` is False: the cluster's Python already has them), and env_vars holding only
    PYTHONUNBUFFERED (so streamed logs are live) and the secrets set in `environ`."""
    env_vars = {"PYTHONUNBUFFERED": "1"}
    env_vars.update({name: environ[name] for name in SECRET_ENV_VARS if environ.get(name)})
    # Ray skips .git, .venv and every .gitignore'd path (runs/, mlruns/) when it packs this folder.
    runtime_env = {"working_dir": str(root), "env_vars": env_vars}
    packages = wmss_packages()
    if not all(p.is_relative_to(Path(root).resolve()) for p in packages):
        runtime_env["py_modules"] = [str(p) for p in packages]  # ahead of the image's wmss on sys.path
    if pip:
        runtime_env["pip"] = wmss_requirements()
    return runtime_env


def redact_runtime_env(runtime_env: Mapping) -> dict:
    """A deep copy of `runtime_env` whose secret env_vars values are replaced by REDACTED."""
    shown = copy.deepcopy(dict(runtime_env))
    env_vars = shown.get("env_vars", {})
    for name in SECRET_ENV_VARS:
        if name in env_vars:
            env_vars[name] = REDACTED
    return shown


def auth_headers(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The job API's bearer header from RAY_AUTH_TOKEN, or None to let Ray find its own token file."""
    token = environ.get(RAY_TOKEN_ENV, "").strip()
    return {"Authorization": f"Bearer {token}"} if token else None


def check_run_name(name: str) -> str:
    """`name` if it can be a submission id and a folder name; SubmitError otherwise."""
    if not _RUN_NAME.fullmatch(name):
        raise SubmitError(f"run name {name!r} must be 1-100 letters, digits, '.', '_' or '-' starting with "
                          "a letter or digit: it names the Ray job and the run folder")
    return name


def default_run_name(config: Path | None, now: float | None = None) -> str:
    """`<config stem>-<UTC yyyymmdd-hhmmss>` ("demo" without a config), made a valid run name."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", config.stem if config else "demo").lstrip("._-") or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}"


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """`--set` items as (key, value) pairs; SubmitError names the first item that is not KEY=VALUE."""
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SubmitError(f"--set expects KEY=VALUE, got {item!r}")
        pairs.append((key.strip(), value))
    return pairs


def run_root(config: str | os.PathLike | None, overrides: Sequence[str]) -> str:
    """Where runs live on shared storage: the last `--set run_dir=...`, else the config's `run_dir`.

    It must be an absolute path (a volume every node mounts) or a URI (s3://, gs://, ...): a relative path
    would land in the job's temporary working directory on one node and be lost."""
    root = next((value for key, value in reversed(parse_overrides(overrides)) if key == "run_dir"), None)
    source = "--set run_dir"
    if root is None and config is not None:
        root = _read_config(config).get("run_dir")
        source = f"{config}: run_dir"
    if root in (None, ""):
        raise SubmitError("no run_dir: a cluster run needs shared storage; pass --set run_dir=s3://BUCKET/wmss "
                          "(or an absolute path on a volume every node mounts, e.g. /mnt/wmss/runs)")
    root = str(root)
    if not (_URI.match(root) or PurePosixPath(root).is_absolute()):
        raise SubmitError(f"{source} is {root!r}, a relative path; on a cluster it must be shared storage: "
                          "an absolute path every node mounts or a URI such as s3://BUCKET/wmss")
    return root


def run_dir_for(root: str, run: str) -> str:
    """The run's own folder `<root>/<run>`, for paths and URIs alike."""
    return f"{root.rstrip('/')}/{run}"


def config_argument(config: str | os.PathLike, root: Path) -> str:
    """`config` as the job sees it: a POSIX path relative to the uploaded project `root`, or the name of a
    shipped config as given."""
    path = Path(config).resolve()
    if not path.is_file():
        try:
            config_file(config)
        except ConfigError:
            raise SubmitError(f"config {config} does not exist (nor is it a shipped config's name)") from None
        return str(config)
    try:
        return path.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        raise SubmitError(f"config {config} is outside {root}, the project that is uploaded to the cluster; "
                          "move it under the project or pass --project") from None


def build_entrypoint(config_arg: str | None, overrides: Sequence[str], run_dir: str, force: bool = False) -> str:
    """The shell command the job runs: exactly the local `wmss run [CONFIG] [--set K=V ...] [--force]`, plus
    `--run-dir RUN_DIR` (which also ends the `--set` list)."""
    argv = ["wmss", "run"]
    if config_arg is not None:
        argv.append(config_arg)
    if overrides:
        argv += ["--set", *overrides]
    if force:
        argv.append("--force")
    argv += ["--run-dir", run_dir]
    return shlex.join(argv)


def check_no_uri_credentials(config: str | os.PathLike | None, overrides: Sequence[str]) -> None:
    """A tracking URI with user info would travel in the job's entrypoint or uploaded config and be shown
    by Ray's job API: credentials go as environment variables only."""
    from wmss.config import uri_has_credentials

    uris = [("--set mlflow.tracking_uri", str(v)) for k, v in parse_overrides(overrides) if k == "mlflow.tracking_uri"]
    if config is not None:
        uris.append((f"{config}: mlflow.tracking_uri", str((_read_config(config).get("mlflow") or {}).get("tracking_uri"))))
    for source, uri in uris:
        if uri_has_credentials(uri):
            raise SubmitError(f"{source} holds credentials (user:password@); they would be readable in the Ray job. "
                              "Give the URI without them and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                              "(or MLFLOW_TRACKING_TOKEN): `wmss submit` forwards those as secrets")


def build_submission(config: str | os.PathLike | None, overrides: Sequence[str], run: str, *, root: Path,
                     environ: Mapping[str, str], pip: bool = True, force: bool = False) -> Submission:
    """Everything `wmss submit` sends for run `run`, built and checked without contacting a cluster;
    `pip=False` sends no pip requirements (see build_runtime_env); `force` passes `--force` to the job's
    `wmss run`."""
    check_run_name(run)
    config_arg = config_argument(config, root) if config is not None else None
    check_no_uri_credentials(config, overrides)
    run_dir = run_dir_for(run_root(config, overrides), run)
    return Submission(run=run, run_dir=run_dir,
                      entrypoint=build_entrypoint(config_arg, list(overrides), run_dir, force),
                      runtime_env=build_runtime_env(root, environ, pip=pip),
                      metadata={RUN_METADATA_KEY: run})


def format_submission(submission: Submission, address: str) -> str:
    """A human summary of `submission` with every secret redacted."""
    runtime_env = json.dumps(redact_runtime_env(submission.runtime_env), indent=2, sort_keys=True)
    return (f"run:        {submission.run}\ncluster:    {address}\nrun dir:    {submission.run_dir}\n"
            f"entrypoint: {submission.entrypoint}\nruntime env: {runtime_env}")


def run_attempts(run: str, jobs: Sequence) -> list:
    """The jobs (Ray `JobDetails`) submitted for `run`, oldest first."""
    mine = [j for j in jobs if (j.metadata or {}).get(RUN_METADATA_KEY) == run]
    return sorted(mine, key=lambda j: j.start_time or 0)


def next_submission_id(run: str, jobs: Sequence) -> str:
    """The submission id for a new attempt of `run`: the run name itself the first time, then
    `<run>-attempt-<n>` (Ray keeps finished jobs' ids, and reusing one is unsupported). Raises SubmitError
    while an earlier attempt is still pending or running."""
    attempts = run_attempts(run, jobs)
    for job in attempts:
        if not job.status.is_terminal():
            raise SubmitError(f"run {run} is already {job.status} as job {job.submission_id}: follow it with "
                              f"`wmss jobs logs {run} --follow` or stop it with `wmss jobs stop {run}`")
    taken = {j.submission_id for j in jobs}
    n = len(attempts) + 1
    while (candidate := run if n == 1 else f"{run}-attempt-{n}") in taken:
        n += 1
    return candidate


def resolve_job(run: str, jobs: Sequence):
    """The latest attempt of run `run`, else the job whose submission id is `run`, else None."""
    attempts = run_attempts(run, jobs)
    if attempts:
        return attempts[-1]
    return next((j for j in jobs if j.submission_id == run), None)


# --- the commands -------------------------------------------------------------------------------------

_ADDRESS_HELP = ("Ray job API of the cluster, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                 "then $RAY_ADDRESS); a token in $RAY_AUTH_TOKEN is sent as a bearer header")


def add_submit_arguments(parser) -> None:
    add_config_source_arguments(parser, "the demo; a file must be inside the project")
    parser.add_argument("--project", metavar="DIR",
                        help="the folder uploaded as the job's working directory (default: the current "
                             "directory, when it has a pyproject.toml or holds the config)")
    parser.add_argument("--address", help=_ADDRESS_HELP)
    parser.add_argument("--name", help="run name: the job's submission id and the run folder <run_dir>/<name>; "
                                       "submitting a name again resumes that run (default: <config>-<UTC time>)")
    parser.add_argument("--wait", action="store_true",
                        help="stream the job's logs, print its final status, exit non-zero unless it SUCCEEDED")
    parser.add_argument("--force", action="store_true",
                        help="submit even when `wmss plan` predicts a stage will not fit 80 GiB per GPU (the job "
                             "runs with --force too)")
    parser.add_argument("--runtime-env-pip", action=argparse.BooleanOptionalAction, default=True,
                        help="send the pinned requirements as the job's pip runtime env (default); with "
                             "--no-runtime-env-pip the job uses the cluster's Python as is, which saves Ray "
                             "building a virtualenv per node when the cluster image already has every pin")


def add_jobs_arguments(parser) -> None:
    parser.add_argument("action", choices=("status", "logs", "stop"))
    parser.add_argument("run", metavar="RUN", help="run name (its latest attempt) or a submission id")
    parser.add_argument("--address", help=_ADDRESS_HELP)
    parser.add_argument("--follow", action="store_true", help="with logs: stream until the job ends, then "
                                                              "exit non-zero unless it SUCCEEDED")


class _ClusterError(WmssError):
    """The job API could not be reached or refused a request."""


def _cluster_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    return address


def _connect(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers(os.environ))
    except AuthenticationError:
        raise _ClusterError(f"the Ray job API at {address} refused the request: set {RAY_TOKEN_ENV} to the "
                            "cluster's token (or RAY_AUTH_MODE=token to use ~/.ray/auth_token)") from None
    except (OSError, RuntimeError, ValueError) as e:
        raise _ClusterError(f"cannot reach the Ray job API at {address}: {e}") from None


def _follow(client, submission_id: str, run: str) -> int:
    """Stream a job's logs until it ends; print and return its final status (0 only for SUCCEEDED)."""
    from ray.job_submission import JobStatus

    async def print_logs():
        async for chunk in client.tail_job_logs(submission_id):
            print(chunk, end="", flush=True)

    try:
        try:
            asyncio.run(print_logs())
        except RuntimeError as e:  # the log stream dropped; the job itself may still be fine
            print(f"wmss: log stream of {submission_id} ended early ({e}); waiting for the job to end",
                  file=sys.stderr)
        while not (status := client.get_job_status(submission_id)).is_terminal():
            time.sleep(2)  # the log stream closes a moment before the status turns final
    except KeyboardInterrupt:
        print(f"\ndetached: {submission_id} keeps running (`wmss jobs logs {run} --follow` to re-attach, "
              f"`wmss jobs stop {run}` to stop it)", file=sys.stderr)
        return 130
    reason = _reason(client.get_job_info(submission_id).message) if status != JobStatus.SUCCEEDED else ""
    print(f"{run}: {status}" + (f" ({reason})" if reason else ""), flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def run_submit(args) -> int:
    config = None if args.config is None else Path(args.config)
    run = check_run_name(args.name) if args.name else default_run_name(config)
    submission = build_submission(args.config, args.overrides, run, root=project_root(args.project, args.config),
                                  environ=os.environ, pip=args.runtime_env_pip, force=args.force)
    if not args.force:  # before the cluster is contacted, as `wmss run` checks before any Ray resources
        from wmss.capacity import check_fits
        from wmss.config import load_config

        check_fits(load_config(args.config, args.overrides))
    address = _cluster_address(args.address)
    print(format_submission(submission, address), flush=True)
    try:
        client = _connect(address)
        submission_id = next_submission_id(run, client.list_jobs())
        client.submit_job(entrypoint=submission.entrypoint, runtime_env=submission.runtime_env,
                          submission_id=submission_id, metadata=submission.metadata)
        print(f"submitted {submission_id}", flush=True)
        return _follow(client, submission_id, run) if args.wait else 0
    except (OSError, RuntimeError, ValueError) as e:
        raise _ClusterError(str(e)) from e


def run_jobs(args) -> int:
    if args.follow and args.action != "logs":
        raise ConfigError("--follow only applies to `logs`")
    address = _cluster_address(args.address)
    try:
        client = _connect(address)
        job = resolve_job(args.run, client.list_jobs())
        if job is None:
            raise _ClusterError(f"no job for run {args.run!r} on {address}")
        submission_id = job.submission_id
        if args.action == "status":
            reason = _reason(job.message)
            print(f"{args.run}: {job.status} (job {submission_id})" + (f": {reason}" if reason else ""))
        elif args.action == "logs" and args.follow:
            return _follow(client, submission_id, args.run)
        elif args.action == "logs":
            print(client.get_job_logs(submission_id), end="", flush=True)
        elif client.stop_job(submission_id):
            print(f"{args.run}: stop requested (job {submission_id})")
        else:
            print(f"{args.run}: already {job.status} (job {submission_id})")
    except (OSError, RuntimeError, ValueError) as e:
        raise _ClusterError(str(e)) from e
    return 0


def _reason(message: str | None) -> str:
    """The first line of a job's status message, without the copy of its last logs Ray appends."""
    return (message or "").strip().split("\n")[0].split(", last available logs")[0]


def _read_config(config: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML config (a file or a shipped config's name); SubmitError names the
    file (and line) otherwise."""
    try:
        data = load_yaml(config_file(config).read_text())
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    except OSError as e:
        raise SubmitError(f"cannot read config {config}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise SubmitError(f"config {config}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SubmitError(f"config {config}: expected a mapping of settings at the top level, "
                          f"got {type(data).__name__}")
    return data
