"""The multi-node deployment files agree with the code and with each other.

Static checks (no network, no servers, no Docker): deployments/prefect.yaml, docker-compose.yml,
deployments/Dockerfile, deployments/.env.example, deployments/postgres-init.sql, configs/cluster.yaml
(the deployments' default run config, for a stack started by hand), configs/compose.yaml (the compose
stack's) and configs/convnextv2-weekly.yaml (the weekly schedule's) (docs/cluster.md). The deployments
registered for real and run by a real worker: tests/test_cluster_setup.py.
"""
from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest
import yaml
from prefect import Flow

from dwk.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deployments" / "Dockerfile"
ENV_EXAMPLE = ROOT / "deployments" / ".env.example"
PG_INIT = ROOT / "deployments" / "postgres-init.sql"
CLUSTER_CONFIG = ROOT / "configs" / "cluster.yaml"
COMPOSE_CONFIG = ROOT / "configs" / "compose.yaml"

# flow name / deployment name -> work pool: what flows/analyze.py and docs/cluster.md rely on.
EXPECTED = {
    "dwk-pipeline/cpu": "dwk-cpu",
    "dwk-pipeline/weekly-convnextv2": "dwk-cpu",
    "dwk-extract/cpu": "dwk-cpu",
    "dwk-analyze/cpu": "dwk-cpu",
    "dwk-train/gpu": "dwk-gpu",
    "dwk-train-classifier/gpu": "dwk-gpu",
}
# Services that run dwk code against the store (Prefect flow runs, Dask tasks).
STORE_SERVICES = ("prefect-worker-cpu", "prefect-worker-gpu", "dask-worker")
VAR_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?[?-][^}]*)?\}$")
REQUIRED_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?")


@pytest.fixture(scope="module")
def project() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _load_entrypoint(entrypoint: str):
    """Import ``path:function`` by file path, relative to the repository root, as a worker does."""
    path, _, func = entrypoint.partition(":")
    file = ROOT / path
    assert file.is_file(), f"entrypoint file {path} does not exist"
    name = "_dwk_entrypoint_" + re.sub(r"\W", "_", path)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    assert hasattr(module, func), f"{path} has no {func!r}"
    return getattr(module, func)


def _deployments(project: dict) -> list[dict]:
    deps = project.get("deployments") or []
    assert deps, "deployments/prefect.yaml lists no deployments"
    return deps


def _flows(project: dict) -> dict[str, tuple[dict, Flow]]:
    """'flow-name/deployment-name' -> (deployment entry, flow object)."""
    out = {}
    for dep in _deployments(project):
        obj = _load_entrypoint(dep["entrypoint"])
        assert isinstance(obj, Flow), f"{dep['entrypoint']} is a {type(obj).__name__}, not a Prefect flow"
        full = f"{obj.name}/{dep['name']}"
        assert full not in out, f"deployment {full} is defined twice"
        out[full] = (dep, obj)
    return out


@pytest.fixture(scope="module")
def flows(project) -> dict[str, tuple[dict, Flow]]:
    return _flows(project)


def _services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def _command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif node is not None:
        yield str(node)


# ----------------------------------------------------------------------------- prefect.yaml
def test_prefect_yaml_passes_prefects_own_schema(project):
    # What `prefect deploy` validates the file with; on an error it skips the whole file.
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(project)
    assert len(model.deployments) == len(project["deployments"])


def test_expected_deployments_and_pools(flows):
    assert {full: dep["work_pool"]["name"] for full, (dep, _) in flows.items()} == EXPECTED


@pytest.mark.parametrize("full", sorted(EXPECTED))
def test_entrypoint_is_a_flow(project, flows, full):
    dep, flow = flows[full]
    assert dep["entrypoint"].split(":")[0].startswith("flows/")
    assert callable(flow.fn)


def test_parameters_exist_in_flow_signatures(flows):
    for full, (dep, flow) in flows.items():
        params = inspect.signature(flow.fn).parameters
        unknown = set(dep.get("parameters") or {}) - set(params)
        assert not unknown, f"{full}: parameters {sorted(unknown)} are not arguments of {flow.fn.__name__}"


# Deployments run with their parameters as they stand; dwk-train/gpu only ever through run_deployment,
# which gives all of its arguments.
RUN_BY_OTHERS = {"dwk-train/gpu"}


@pytest.mark.parametrize("full", sorted(EXPECTED))
def test_parameters_validate_against_the_flows_parameter_schema(flows, full):
    """What the server checks (enforce_parameter_schema) and what the flow binds when a run starts."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    dep, flow = flows[full]
    params = dep.get("parameters") or {}
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    validate(params, schema, raise_on_error=True, ignore_required=full in RUN_BY_OTHERS)
    if full not in RUN_BY_OTHERS:
        inspect.signature(flow.fn).bind(**params)  # every argument without a default is given
        flow.validate_parameters(params)


def test_run_config_is_a_path_or_the_object_not_both(flows):
    """Every dwk flow that takes a run config takes it as config_path or config: the defaults give a path."""
    for full, (dep, flow) in flows.items():
        params = inspect.signature(flow.fn).parameters
        if "config" not in params or full in RUN_BY_OTHERS:
            continue
        assert "config_path" in params, f"{full}: {flow.fn.__name__} takes no config_path"
        assert params["config"].default is None and params["config_path"].default is None, full
        given = dep.get("parameters") or {}
        assert "config" not in given and "config_path" in given, f"{full}: the default must be a config_path"


def test_default_config_paths_load(flows):
    """A relative config_path is read on the worker from its checkout (the pull step's DWK_HOME)."""
    for full, (dep, _) in flows.items():
        path = (dep.get("parameters") or {}).get("config_path")
        if path is None:
            continue
        assert not Path(path).is_absolute(), f"{full}: config_path {path} must be relative to the checkout"
        assert (ROOT / path).is_file(), f"{full}: {path} does not exist"
        if full.startswith("dwk-train-classifier/"):
            from dwk.classifier import load_experiment

            load_experiment(ROOT / path)
        else:
            load_config(ROOT / path)


def test_cpu_deployments_default_to_configs_cluster_yaml(flows):
    for full in ("dwk-pipeline/cpu", "dwk-extract/cpu", "dwk-analyze/cpu"):
        assert flows[full][0]["parameters"] == {"config_path": "configs/cluster.yaml"} | (
            {"track": True} if full == "dwk-pipeline/cpu" else {}), full


def test_flows_refuse_both_or_neither_config(tmp_path):
    from flows.cluster import resolve_run_config
    from dwk.errors import ConfigError

    cfg = load_config(CLUSTER_CONFIG)
    for bad in (dict(config=None, config_path=None), dict(config=cfg, config_path="configs/cluster.yaml")):
        with pytest.raises(ConfigError, match="exactly one of the two") as err:
            resolve_run_config(**bad)
        assert isinstance(err.value, ValueError)
    with pytest.raises(ConfigError, match="is not a file"):
        resolve_run_config(None, str(tmp_path / "nothing.yaml"))
    assert resolve_run_config(cfg, None) is cfg
    assert resolve_run_config(cfg.model_dump(mode="json"), None) == cfg  # as a deployment parameter (JSON)
    assert resolve_run_config(None, CLUSTER_CONFIG) == cfg


def test_concurrency_limits_per_deployment(flows):
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    limits = {}
    for full, (dep, _) in flows.items():
        spec = dep.get("concurrency_limit")
        if spec is None:
            continue
        # The server's own model: a typo in a key or a strategy fails here (prefect.yaml's model ignores it).
        assert set(spec) <= {"limit", "collision_strategy", "grace_period_seconds"}, f"{full}: {spec}"
        limits[full] = ConcurrencyLimitConfig.model_validate(spec)
    assert limits["dwk-pipeline/cpu"].limit == 1
    assert limits["dwk-pipeline/cpu"].collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert limits["dwk-pipeline/weekly-convnextv2"].collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    assert limits["dwk-train/gpu"].limit >= 1
    assert limits["dwk-train/gpu"].collision_strategy == ConcurrencyLimitStrategy.ENQUEUE


def test_train_flow_retries():
    from flows.train import train_flow

    assert train_flow.retries == 2 and train_flow.retry_delay_seconds == 30


def test_weekly_schedule_is_there_and_inactive(flows):
    from prefect.cli.deploy._models import RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule

    dep, flow = flows["dwk-pipeline/weekly-convnextv2"]
    assert flow.name == "dwk-pipeline"
    (schedule,) = dep["schedules"]
    RawScheduleConfig.model_validate(schedule)  # extra keys forbidden: what `prefect deploy` accepts
    assert schedule["active"] is False, "the weekly re-scan needs the Hub: inactive until turned on"
    CronSchedule(cron=schedule["cron"])  # a valid cron expression
    assert schedule["cron"].split()[2:] == ["*", "*", "1"], "weekly, on Mondays"
    path = ROOT / dep["parameters"]["config_path"]
    raw = yaml.safe_load(path.read_text())
    assert any("pattern" in c for c in raw["checkpoints"]), "the re-scan selects a timm family by pattern"
    cfg = load_config(path)  # the pattern expands through timm's registry, offline
    ids = [c.id for c in cfg.checkpoints]
    assert sum(i.startswith("convnextv2_") for i in ids) >= 5
    assert any(c.pretrained is False for c in cfg.checkpoints), "null controls"
    assert any(c.planted is not None for c in cfg.checkpoints), "a planted check"
    assert cfg.train_deployment in flows


def test_pull_steps_need_no_network(project):
    # Workers run from a checkout or image with dwk installed: no git clone, no pip install.
    steps = list(project.get("pull") or [])
    for dep in project["deployments"]:
        steps += list(dep.get("pull") or [])
        assert not dep.get("build") and not dep.get("push"), f"{dep['name']}: build/push steps"
    assert not project.get("build") and not project.get("push")
    assert steps, "a pull step must move into the checkout (entrypoints are relative to it)"
    for step in steps:
        (fqn, inputs), = step.items()
        assert fqn == "prefect.deployments.steps.set_working_directory", fqn
        assert "{{ $DWK_HOME }}" in inputs["directory"]


# ----------------------------------------------------------------------------- compose
def test_compose_has_the_stack(compose):
    assert set(_services(compose)) >= {"postgres", "prefect-server", "prefect-worker-cpu", "prefect-worker-gpu",
                                       "dask-scheduler", "dask-worker", "mlflow"}


def test_work_pools_match_compose_workers(project, compose):
    pools_yaml = {dep["work_pool"]["name"] for dep in _deployments(project)}
    pools_compose = set()
    for name, svc in _services(compose).items():
        cmd = _command(svc)
        if cmd[:3] == ["prefect", "worker", "start"]:
            assert "--pool" in cmd, f"{name}: worker without --pool"
            pools_compose.add(cmd[cmd.index("--pool") + 1])
            assert cmd[cmd.index("--type") + 1] == "process", f"{name}: not a process worker"
    assert pools_yaml == pools_compose


def test_gpu_worker_reserves_a_gpu(compose):
    devices = _services(compose)["prefect-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_published_ports_are_bound_to_loopback(compose):
    for name, svc in _services(compose).items():
        for port in svc.get("ports") or []:
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:") and str(port).count(":") == 2, f"{name}: {port!r}"


def test_no_literal_passwords_in_compose(compose):
    secret_key = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$", re.I)
    for name, svc in _services(compose).items():
        for key, value in _environment(svc).items():
            if secret_key.search(key):
                assert VAR_REF.match(value), f"{name}: {key} must be a ${{VAR}} reference, not a literal"
    # Credentials inside URLs (scheme://user:password@host) anywhere in the file.
    for s in _strings(compose):
        for m in re.finditer(r"://[^/\s:@]+:([^@\s]+)@", s):
            assert VAR_REF.match(m.group(1)), f"literal password in {s!r}"
    assert "${POSTGRES_PASSWORD:?" in COMPOSE.read_text()


def test_env_example_lists_required_variables_without_values():
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    required = set(REQUIRED_VAR.findall(COMPOSE.read_text()))
    assert required <= set(env), f"missing from .env.example: {sorted(required - set(env))}"
    for key in required:
        if re.search(r"PASSWORD|SECRET|TOKEN", key):
            assert env[key] == "", f".env.example ships a value for {key}"


def test_services_build_the_dwk_image(compose):
    for name, svc in _services(compose).items():
        if name == "postgres":
            assert str(svc["image"]).startswith("postgres:16")
            continue
        assert svc["build"]["dockerfile"] == "deployments/Dockerfile", name
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"pip install -e \.[^\n]*psycopg2-binary", text)
    assert "psycopg2" not in (ROOT / "pyproject.toml").read_text()


def test_databases(compose):
    svcs = _services(compose)
    server_url = _environment(svcs["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert server_url.startswith("postgresql+asyncpg://") and server_url.endswith("@postgres:5432/prefect")
    assert _environment(svcs["postgres"])["POSTGRES_DB"] == "prefect"
    cmd = _command(svcs["mlflow"])
    backend = cmd[cmd.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql://") and backend.endswith("@postgres:5432/mlflow")
    assert re.search(r"CREATE DATABASE mlflow\b", PG_INIT.read_text(), re.I)
    mounts = [str(v) for v in svcs["postgres"]["volumes"]]
    assert any(m.startswith("./deployments/postgres-init.sql:/docker-entrypoint-initdb.d/") for m in mounts)
    hosts = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert "mlflow:5000" in hosts


def test_clients_point_at_the_services(compose):
    svcs = _services(compose)
    for name in STORE_SERVICES:
        env = _environment(svcs[name])
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert env.get("DWK_HOME"), name
    assert "prefect-server" in svcs and "mlflow" in svcs
    assert _command(svcs["prefect-server"])[:3] == ["prefect", "server", "start"]
    assert _command(svcs["dask-scheduler"])[:2] == ["dask", "scheduler"]
    assert _command(svcs["dask-worker"])[:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert "container_name" not in svcs["dask-worker"] and not svcs["dask-worker"].get("ports"), \
        "dask-worker must stay scalable (--scale dask-worker=N)"


def test_store_volume_is_shared_at_one_path(compose):
    mounts = {}
    for name in STORE_SERVICES:
        vols = [str(v) for v in _services(compose)[name].get("volumes") or []]
        mounts[name] = {v.split(":")[1]: v.split(":")[0] for v in vols if v.count(":") >= 1}
    data = {m["/data"] for m in mounts.values() if "/data" in m}
    assert len(data) == 1 and all("/data" in m for m in mounts.values()), mounts
    assert data.pop() in (compose.get("volumes") or {}), "/data must be a named volume"


# ----------------------------------------------------------------------------- configs/cluster.yaml, compose.yaml
def test_compose_config_fits_the_stack(compose, flows):
    cfg = load_config(COMPOSE_CONFIG)
    assert cfg.store.is_absolute() and cfg.out.is_absolute()
    assert cfg.store.parts[:2] == ("/", "data") and cfg.out.parts[:2] == ("/", "data")
    host, _, port = cfg.dask.address.removeprefix("tcp://").partition(":")
    assert host in _services(compose) and port == "8786"
    assert cfg.train_deployment in flows
    assert flows[cfg.train_deployment][0]["work_pool"]["name"] == "dwk-gpu"
    assert "configs/compose.yaml" in COMPOSE.read_text()


def test_cluster_config_fits_a_stack_started_by_hand(compose, flows):
    """No compose service names, no /data: the worker resolves store and out in its own checkout."""
    raw = yaml.safe_load(CLUSTER_CONFIG.read_text())
    text = CLUSTER_CONFIG.read_text()
    for name in _services(compose):
        assert f"{name}:" not in "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")), name
    assert not Path(raw.get("store", "runs/store.zarr")).is_absolute()
    assert not Path(raw.get("out", "runs")).is_absolute()
    assert (raw.get("dask") or {}).get("address") is None, "a hand-started stack has no scheduler at a known address"
    cfg = load_config(CLUSTER_CONFIG)
    assert cfg.train_deployment in flows
    assert flows[cfg.train_deployment][0]["work_pool"]["name"] == "dwk-gpu"


@pytest.mark.parametrize("path", [CLUSTER_CONFIG, COMPOSE_CONFIG], ids=["cluster", "compose"])
def test_stack_configs_analyse_the_embedded_demo(path):
    cfg = load_config(path)
    # The same analysis as the embedded demo (dwk/default.yaml), only placed on a stack.
    demo = load_config()
    assert cfg.checkpoints == demo.checkpoints, f"{path.name}: checkpoints differ from dwk/default.yaml"
    assert cfg.fingerprint() == demo.model_copy(update=dict(train_deployment=cfg.train_deployment)).fingerprint(), \
        f"{path.name}: analysis settings differ from dwk/default.yaml"
