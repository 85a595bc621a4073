"""The deployment files (Dockerfile, docker-compose.yml, deploy/) checked without Docker or
a cluster: real validators wherever one exists (hadolint, the Compose specification's
schema, Kubernetes' schemas, promtool, nginx -t, yamllint), then the rules of this
project that no schema knows (probe paths, drain deadline against grace periods, setting
names, the image's user). Offline and in seconds.

promtool and nginx come from Debian (scripts/ensure_services.sh installs them); without
them those checks skip and say so. Everything else is pinned in requirements.txt.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from django.urls import Resolver404, resolve
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from yamllint import linter
from yamllint.config import YamlLintConfig

from common.conf import push_options, push_settings
from devtools.cluster import Cluster
from devtools.processes import free_port
from monitoring import views as monitoring_views
from push.management.commands.runnode import Command as RunNode
from tests.servers import ServerNode, create_token

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PUSH_CONF = DEPLOY / "nginx" / "push.conf"
UPSTREAM_COMPOSE = DEPLOY / "nginx" / "upstream-compose.conf"
VENV_BIN = Path(sys.executable).parent

# The oldest Kubernetes these manifests are meant for, and the newest the schemas know.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
YAMLLINT = YamlLintConfig(
    "{extends: default, rules: {line-length: {max: 100}, document-start: disable}}"
)
APP_PACKAGES = ("accounts", "monitoring", "push", "realtime_project")


def run_tool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def debian_tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/bin")
    if found is None:
        pytest.skip(f"{name} is not installed (scripts/ensure_services.sh installs it)")
    return found


def runnode_options(args: list[str]) -> dict[str, Any]:
    """``args`` after ``manage.py``, parsed by runnode's own parser (a typo fails here)."""
    assert args[0] == "runnode", args
    return vars(RunNode().create_parser("manage.py", "runnode").parse_args(args[1:]))


def drain_deadline_secs(environment: dict[str, str]) -> float:
    value = environment.get("PUSH_DRAIN_DEADLINE_SECS")
    return float(value) if value is not None else push_settings.DRAIN_DEADLINE_SECS


def duration_secs(text: str) -> float:
    """A Compose duration such as ``30s`` or ``1m30s``."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text}"
    return sum(float(n) * units[u] for n, u in parts)


def assert_yamllint_clean(path: Path) -> None:
    problems = list(linter.run(path.read_text(), YAMLLINT, str(path)))
    assert not problems, "\n".join(f"{path}:{p.line}:{p.column} {p.message}" for p in problems)


def assert_resolves_to(path: str, view: Any) -> None:
    try:
        match = resolve(path)
    except Resolver404:
        pytest.fail(f"{path} is not a URL of this project")
    assert match.func is view, f"{path} resolves to {match.func}, not {view}"


# --- What the image ships -----------------------------------------------------------


def dockerignore_patterns() -> list[tuple[re.Pattern[str], bool]]:
    """Each pattern of .dockerignore, and whether it is an exception (``!``)."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        regex = ""
        for token in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", line.lstrip("!").strip("/")):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        patterns.append((re.compile(regex + r"\Z"), exception))
    return patterns


def in_build_context(relative: Path) -> bool:
    """Docker's rule: the last pattern that matches the path, or a folder above it,
    decides; an exception (``!``) lets it in, any other pattern leaves it out."""
    parts = relative.parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    left_out = False
    for pattern, exception in dockerignore_patterns():
        if exception == left_out and any(pattern.match(prefix) for prefix in prefixes):
            left_out = not exception
    return not left_out


@cache
def shipped_python_files() -> list[Path]:
    files = [ROOT / "manage.py"]
    for package in APP_PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return [f for f in files if in_build_context(f.relative_to(ROOT))]


@cache
def setting_names() -> frozenset[str]:
    """Every environment variable the application reads (through realtime_project.env):
    the push server's options' and those of settings.py's env_* calls."""
    call = re.compile(r"\benv_[a-z_]+\(\s*\"([A-Z][A-Z0-9_]*)\"")
    read = {name for f in shipped_python_files() for name in call.findall(f.read_text())}
    return frozenset(read | {option.variable for option in push_options()})


def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(ROOT / "Dockerfile"))


def stages() -> list[list[dict[str, Any]]]:
    result: list[list[dict[str, Any]]] = []
    for instruction in dockerfile().structure:
        if instruction["instruction"] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def final_stage(name: str) -> list[str]:
    return [i["value"] for i in stages()[-1] if i["instruction"] == name]


def image_uid() -> int:
    (user,) = final_stage("USER")[-1:]
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER {user}: numeric, so runAsNonRoot can verify it"
    return int(uid)


def uninstalled_packages() -> list[str]:
    for value in (i["value"] for i in stages()[0] if i["instruction"] == "RUN"):
        if "pip uninstall" in value:
            return value.split("pip uninstall -y", 1)[1].split()
    return []


def pinned_requirements() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_dockerfile_passes_hadolint() -> None:
    result = run_tool(VENV_BIN / "hadolint", "--no-color", "-t", "style", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_multi_stage_with_compilers_left_behind() -> None:
    parser = dockerfile()
    assert parser.is_multistage
    assert parser.baseimage.startswith("python:3.11-slim")
    runtime_runs = " ".join(final_stage("RUN"))
    assert "build-essential" not in runtime_runs and "apt-get install" not in runtime_runs
    assert any("collectstatic" in run for run in final_stage("RUN"))


def test_image_runs_as_a_non_root_user() -> None:
    assert image_uid() != 0


def test_image_entry_point_is_a_node_under_uvicorn() -> None:
    assert json.loads(final_stage("ENTRYPOINT")[-1]) == ["python", "manage.py"]
    options = runnode_options(json.loads(final_stage("CMD")[-1]))
    assert options["server"] == "uvicorn" and not options["proxy_headers"]
    # In a container the node must listen beyond loopback.
    assert options["host"] == "0.0.0.0" and options["port"] == 8000  # noqa: S104
    assert final_stage("EXPOSE") == [str(options["port"])]
    assert final_stage("STOPSIGNAL") == ["SIGTERM"]
    assert not any("migrate" in run for run in final_stage("CMD") + final_stage("ENTRYPOINT"))


@pytest.mark.e2e
async def test_the_image_run_alone_believes_no_written_x_forwarded_for(
    e2e_env: dict[str, str],
) -> None:
    """``docker run -p 8000:8000 realtime-push`` puts the node on the internet with the
    image's own command: a client that writes ``X-Forwarded-For`` must not become a new
    address for each value (each address has its own connection limit and budgets)."""
    options = runnode_options(json.loads(final_stage("CMD")[-1]))
    env = {**e2e_env, "PUSH_MAX_CONNECTIONS_PER_IP": "1"}
    node = ServerNode(
        env,
        server=options["server"],
        args=("--proxy-headers",) if options["proxy_headers"] else (),
    ).start()
    try:
        first = await connect(node.ws_url, additional_headers={"X-Forwarded-For": "192.0.2.1"})
        second = await connect(node.ws_url, additional_headers={"X-Forwarded-For": "192.0.2.2"})
        with contextlib.suppress(ConnectionClosed):
            greeting = await asyncio.wait_for(second.recv(), 10)
            pytest.fail(f"a written X-Forwarded-For was a new address: {greeting!r}")
        assert second.close_code == 1013, "one peer, one address, whatever it wrote"
        await first.close()
    finally:
        node.stop()


def test_image_health_check_asks_for_health() -> None:
    (check,) = final_stage("HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in check
    assert_resolves_to("/health", monitoring_views.health)


def test_build_context_holds_the_application_and_no_tests() -> None:
    for needed in ("manage.py", "requirements.txt", "common/errors.py", *APP_PACKAGES):
        assert in_build_context(Path(needed)), needed
    for left_out in ("tests/test_deploy_files.py", "push/tests/__init__.py", ".venv/x", "bench"):
        assert not in_build_context(Path(left_out)), left_out


@pytest.mark.parametrize(
    "secret",
    [
        ".env",  # where Compose users keep SECRET_KEY: Compose reads it by itself
        ".cluster/secret_key",  # the local cluster's SECRET_KEY (make cluster)
        "deploy/k8s/secret.yaml",  # secret.example.yaml, filled in
        "tls/push.example.com.key",
        "db.sqlite3",
    ],
)
def test_secrets_in_the_checkout_stay_out_of_the_image(secret: str) -> None:
    """``COPY . .`` ships whatever the build context holds: a file that the checkout
    gains beside the code must not reach the image unless it is the application."""
    assert not in_build_context(Path(secret)), f"{secret} would be baked into the image"


def test_removed_test_tools_are_pinned_and_not_needed_at_run_time() -> None:
    removed = {canonicalize_name(name) for name in uninstalled_packages()}
    assert removed, "the image keeps every test tool"
    pins = pinned_requirements()
    assert removed <= set(pins), f"not in requirements.txt: {removed - set(pins)}"
    # Nothing that stays needs one of them (what `pip check` would say in the image).
    for name in set(pins) - removed:
        for spec in metadata.requires(name) or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                assert canonicalize_name(requirement.name) not in removed, (name, spec)
    # And no module of the application imports them.
    modules = {
        module
        for module, dists in metadata.packages_distributions().items()
        if any(canonicalize_name(d) in removed for d in dists)
    }
    for path in shipped_python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in modules, f"{path} imports {name}"


# --- docker-compose.yml -------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def app_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items() if s.get("image") == "realtime-push:local"}


def node_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in app_services().items() if s.get("command", [""])[0] == "runnode"}


def compose_default(value: str) -> str:
    """``${NAME:-default}`` as Compose reads it when NAME is not set."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path, for the bind mounts (``./...``)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = ROOT / source
    return mounts


def test_compose_matches_the_compose_specification() -> None:
    result = run_tool(
        VENV_BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE_FILE
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_passes_yamllint() -> None:
    assert_yamllint_clean(COMPOSE_FILE)


def test_every_compose_service_has_a_healthcheck() -> None:
    for name, service in services().items():
        assert "healthcheck" in service, name
        check = service["healthcheck"]
        if check.get("disable"):
            # Only for processes without an HTTP server; a node must be checked.
            assert name not in node_services(), name
        else:
            assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_compose_runs_two_nodes_that_wait_for_the_migration() -> None:
    nodes = node_services()
    assert len(nodes) >= 2
    assert app_services()["migrate"]["command"] == ["migrate", "--no-input"]
    assert app_services()["migrate"]["restart"] == "no"
    for name, node in nodes.items():
        options = runnode_options(node["command"])
        assert options["server"] == "uvicorn" and options["proxy_headers"], name
        assert node["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "/health" in " ".join(node["healthcheck"]["test"]), name
        assert node.get("stop_signal", "SIGTERM") == "SIGTERM"
        grace = duration_secs(node["stop_grace_period"])
        assert grace > drain_deadline_secs(node["environment"]) + 5, name


def test_compose_settings_are_settings_the_application_reads() -> None:
    for name, service in app_services().items():
        unknown = set(service["environment"]) - setting_names()
        assert not unknown, f"{name}: no such setting in realtime_project/settings.py: {unknown}"
        assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL"} <= set(service["environment"])


def test_compose_allowed_hosts_admit_probes_and_prometheus() -> None:
    for name, service in node_services().items():
        allowed = compose_default(service["environment"]["ALLOWED_HOSTS"]).split(",")
        # The health check asks 127.0.0.1; Prometheus asks each node by its service name.
        assert "127.0.0.1" in allowed, name
        assert set(node_services()) <= set(allowed), name


def test_compose_bind_mounts_exist() -> None:
    for name, service in services().items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (for {target}) is missing"


def test_compose_nginx_fronts_every_node() -> None:
    nginx = services()["nginx"]
    assert nginx["image"].startswith("nginx:")
    mounts = bind_mounts(nginx)
    assert mounts["/etc/nginx/conf.d/push.conf"] == PUSH_CONF
    assert mounts["/etc/nginx/conf.d/upstream.conf"] == UPSTREAM_COMPOSE
    assert "8080:8080" in nginx["ports"]
    for node in node_services():
        assert nginx["depends_on"][node]["condition"] == "service_healthy"
    upstream = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", UPSTREAM_COMPOSE.read_text(), re.M)
    expected = {(n, str(runnode_options(s["command"])["port"])) for n, s in node_services().items()}
    assert set(upstream) == expected
    if PUSH_CONF.exists():
        assert re.search(r"^\s*listen 8080;", PUSH_CONF.read_text(), re.M)


def test_compose_prometheus_scrapes_every_node() -> None:
    mounts = bind_mounts(services()["prometheus"])
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "push"]
    assert job["metrics_path"] == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {
        f"{name}:{runnode_options(s['command'])['port']}" for name, s in node_services().items()
    }


def test_compose_prometheus_scrapes_the_event_workers() -> None:
    mounts = bind_mounts(services()["prometheus"])
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "push-event-worker"]
    environment = services()["event-worker"]["environment"]
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["event-worker"]
    assert discovery["port"] == int(environment["PUSH_EVENT_WORKER_METRICS_PORT"])
    # Reachable from Prometheus in its own container, not only on the loopback.
    assert environment["PUSH_EVENT_WORKER_METRICS_HOST"] == "0.0.0.0"  # noqa: S104


def test_compose_grafana_is_provisioned_with_the_dashboard() -> None:
    mounts = bind_mounts(services()["grafana"])
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert datasource["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services()["prometheus"]["ports"]
    providers = yaml.safe_load((provisioning / "dashboards" / "push.yml").read_text())
    (provider,) = providers["providers"]
    dashboards = {Path(t).parent: s for t, s in mounts.items() if t.endswith(".json")}
    assert dashboards == {Path(provider["options"]["path"]): DEPLOY / "grafana/push-dashboard.json"}
    dashboard = json.loads((DEPLOY / "grafana" / "push-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == datasource["type"]


@pytest.mark.parametrize(
    "path", sorted((DEPLOY / "grafana" / "provisioning").rglob("*.yml")), ids=str
)
def test_grafana_provisioning_passes_yamllint(path: Path) -> None:
    assert_yamllint_clean(path)
    assert yaml.safe_load(path.read_text())["apiVersion"] == 1


# --- Prometheus and nginx -----------------------------------------------------------


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-compose.yml"])
def test_prometheus_config_passes_promtool(name: str) -> None:
    promtool = debian_tool("promtool")
    result = run_tool(promtool, "check", "config", DEPLOY / name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_yamllint_clean(DEPLOY / name)


def test_nginx_accepts_push_conf_with_the_compose_upstream(tmp_path: Path) -> None:
    if not PUSH_CONF.exists():
        pytest.skip("deploy/nginx/push.conf is not written yet")
    nginx = debian_tool("nginx")
    # nginx -t resolves upstream host names, and node1/node2 exist only in Compose's
    # network: the same file with loopback addresses, one port per node.
    ports = iter(range(18001, 18100))
    upstream = re.sub(
        r"(^\s*server\s+)[\w.-]+:\d+",
        lambda m: f"{m.group(1)}127.0.0.1:{next(ports)}",
        UPSTREAM_COMPOSE.read_text(),
        flags=re.M,
    )
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    (conf_d / "push.conf").write_text(PUSH_CONF.read_text())
    (conf_d / "upstream.conf").write_text(upstream)
    temp_paths = "\n".join(
        f"    {kind}_temp_path temp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # The official image's nginx.conf, reduced to what matters: conf.d at http level.
    (tmp_path / "nginx.conf").write_text(
        "pid nginx.pid;\nerror_log stderr;\nevents {}\n"
        f"http {{\n{temp_paths}\n    include conf.d/*.conf;\n}}\n"
    )
    (tmp_path / "temp").mkdir()
    result = run_tool(nginx, "-t", "-q", "-e", "stderr", "-p", tmp_path, "-c", "nginx.conf")
    assert result.returncode == 0, result.stdout + result.stderr


async def _admitted(url: str, written_address: str) -> bool:
    """Whether a WebSocket through nginx whose request carries ``X-Forwarded-For:
    written_address`` (and ``X-Forwarded-Proto: https``) is greeted; its connection is
    left open, so that the address holds its one connection."""
    headers = {"X-Forwarded-For": written_address, "X-Forwarded-Proto": "https"}
    ws = await connect(url, additional_headers=headers)
    try:
        return json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "connection_established"
    except ConnectionClosed:
        assert ws.close_code == 1013, ws.close_code
        return False


@pytest.mark.e2e
@pytest.mark.parametrize("trusted_proxies", [1, 2])
async def test_nginx_passes_the_address_and_scheme_a_front_proxy_saw(
    trusted_proxies: int, e2e_env: dict[str, str], tmp_path: Path
) -> None:
    """The shipped nginx at the edge (one trusted proxy): what a client writes in
    X-Forwarded-For is not its address. With a TLS terminator in front of nginx, as
    deployment.md has it for Compose, counted in ``PUSH_TRUSTED_PROXIES=2``: the clients
    behind it are their own addresses (not all the terminator's one), and the
    history's ``next`` link keeps their https."""
    env = {
        **e2e_env,
        "PUSH_TRUSTED_PROXIES": str(trusted_proxies),
        "PUSH_MAX_CONNECTIONS_PER_IP": "1",
    }
    cluster = Cluster(tmp_path / "cluster", env, tie_to_parent=True)
    cluster.start(nodes=1, proxy_port=free_port())
    try:
        url = cluster.proxy_ws_url
        admitted = [await _admitted(url, a) for a in ("203.0.113.7", "203.0.113.8")]
        if trusted_proxies == 1:
            assert admitted == [True, False], "a written X-Forwarded-For is no address"
            return
        assert admitted == [True, True], "two clients behind the front proxy, one address"
        assert not await _admitted(url, "203.0.113.7"), "203.0.113.7 twice is one address"
        token = create_token(env, "front-proxied")
        headers = {
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Proto": "https",
            "Authorization": f"Token {token}",
        }
        async with httpx.AsyncClient(base_url=cluster.proxy_url, timeout=10) as http:
            for value in (1, 2):
                published = await http.post(
                    "/api/v1/channels/behind-tls/messages", json={"data": value}, headers=headers
                )
                assert published.status_code == 201, published.text
            page = await http.get("/api/v1/channels/behind-tls/messages?limit=1", headers=headers)
        assert page.json()["next"].startswith("https://"), page.json()
    finally:
        cluster.stop()


# --- Kubernetes ---------------------------------------------------------------------


def k8s_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


@cache
def k8s_resources() -> dict[tuple[str, str], dict[str, Any]]:
    resources = {}
    for path in k8s_files():
        for document in yaml.safe_load_all(path.read_text()):
            if document and document["kind"] != "Kustomization":
                resources[(document["kind"], document["metadata"]["name"])] = document
    return resources


def resource(kind: str, name: str) -> dict[str, Any]:
    return k8s_resources()[(kind, name)]


def pod_specs() -> dict[str, dict[str, Any]]:
    specs = {}
    for (kind, name), document in k8s_resources().items():
        if kind in ("Deployment", "Job"):
            specs[name] = document["spec"]["template"]["spec"]
        elif kind == "CronJob":
            specs[name] = document["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return specs


def node_container() -> dict[str, Any]:
    (container,) = resource("Deployment", "push-node")["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_file_passes_yamllint(path: Path) -> None:
    assert_yamllint_clean(path)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("key", sorted(k8s_resources()), ids="/".join)
def test_k8s_resource_matches_the_kubernetes_schema(key: tuple[str, str], version: str) -> None:
    # Strict: an unknown field (a typo) fails too; a kind without a schema fails as well.
    try:
        kubernetes_validate.validate(k8s_resources()[key], version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{'/'.join(key)}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_kustomization_lists_every_manifest_and_no_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = {K8S / name for name in kustomization["resources"]}
    assert listed == set((K8S / "manifests").glob("*.yaml"))
    for path in listed:
        assert all(d["kind"] != "Secret" for d in yaml.safe_load_all(path.read_text())), path
    (image,) = kustomization["images"]
    for name, spec in pod_specs().items():
        for container in spec.get("initContainers", []) + spec["containers"]:
            assert container["image"].split(":")[0] == image["name"], name


def test_k8s_resources_share_one_namespace() -> None:
    for key, document in k8s_resources().items():
        if key[0] != "Namespace":
            assert document["metadata"]["namespace"] == "push", key


def test_k8s_node_probes_ask_the_monitoring_views() -> None:
    container = node_container()
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert_resolves_to("/ready", monitoring_views.ready)
    assert_resolves_to("/health", monitoring_views.health)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ports, probe
    options = runnode_options(container["args"])
    assert options["server"] == "uvicorn" and options["proxy_headers"]
    assert ports["http"] == options["port"]


# Each path the ingress routes, and a page under it the node serves (None: served by
# the ASGI application itself, not the URLconf: WebSocket, SSE, Pusher's WebSocket).
INGRESS_SAMPLES = {
    "/ws": None,
    "/sse": None,
    "/app/": None,
    "/api": "/api/v1/channels/",
    "/apps/": "/apps/1/events",
    "/users/": "/users/1/terminate_connections",
    "/pusher/": "/pusher/auth",
    "/admin": "/admin/",
    "/": "/",
    "/static/": None,
}


def test_k8s_ingress_routes_what_the_node_serves_to_clients() -> None:
    from django.conf import settings

    rules = resource("Ingress", "push")["spec"]["rules"]
    paths = {p["path"] for rule in rules for p in rule["http"]["paths"]}
    assert paths == set(INGRESS_SAMPLES)
    # The demo page loads the JavaScript client from the static files.
    assert settings.STATIC_URL in paths
    for path, sample in INGRESS_SAMPLES.items():
        if sample is not None:
            assert sample.startswith(path)
            resolve(sample)  # Resolver404: the ingress routes a path nobody serves


def test_k8s_node_drains_within_its_grace_period() -> None:
    pod = resource("Deployment", "push-node")["spec"]["template"]["spec"]
    pre_stop = node_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    config = resource("ConfigMap", "push-config")["data"]
    # preStop runs first and counts against the grace period; then SIGTERM starts the drain.
    drain = drain_deadline_secs(config)
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + 10


def test_k8s_pods_run_as_the_image_user_on_a_read_only_root() -> None:
    for name, spec in pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == image_uid(), name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert "memory" in container["resources"]["limits"], (name, container["name"])


def test_k8s_one_shot_commands_are_manage_py_commands() -> None:
    migrate = pod_specs()["push-migrate"]["containers"][0]
    assert migrate["args"] == ["migrate", "--no-input"]
    assert pod_specs()["push-retention"]["containers"][0]["args"] == ["trim_history"]
    assert pod_specs()["push-event-worker"]["containers"][0]["args"][0] == "run_event_worker"
    (wait,) = pod_specs()["push-node"]["initContainers"]
    assert "migrate --check" in " ".join(wait["command"])


def test_k8s_settings_are_settings_the_application_reads() -> None:
    config = resource("ConfigMap", "push-config")["data"]
    secret = resource("Secret", "push-secrets")["stringData"]
    assert not set(config) - setting_names(), set(config) - setting_names()
    assert not set(secret) - setting_names(), set(secret) - setting_names()
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL"} <= set(secret)
    assert not {"SECRET_KEY", "DATABASE_URL", "REDIS_URL"} & set(config), "secrets in a ConfigMap"
    if config.get("ALLOWED_HOSTS") == "*":
        # Origins default to ALLOWED_HOSTS: with every host allowed they must be named.
        assert config.get("ALLOWED_ORIGINS") not in (None, "", "*")


def test_k8s_service_hpa_and_pdb_select_the_node_pods() -> None:
    deployment = resource("Deployment", "push-node")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"
    service = resource("Service", "push-node")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = resource("PodDisruptionBudget", "push-node")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = resource("HorizontalPodAutoscaler", "push-node")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "push-node")
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in node_container()["resources"]["requests"], "Utilization needs a request"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(node_container()["ports"][0]["containerPort"])
    assert resolve(annotations["prometheus.io/path"]).url_name == "prometheus-django-metrics"


def test_k8s_event_worker_serves_its_metrics_where_its_annotations_say() -> None:
    deployment = resource("Deployment", "push-event-worker")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    environment = {variable["name"]: variable["value"] for variable in container["env"]}
    port = int(environment["PUSH_EVENT_WORKER_METRICS_PORT"])
    assert environment["PUSH_EVENT_WORKER_METRICS_HOST"] == "0.0.0.0"  # noqa: S104
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert container["ports"][0]["containerPort"] == port


def ingress_routes(path: str) -> bool:
    (rule,) = resource("Ingress", "push")["spec"]["rules"]
    for entry in rule["http"]["paths"]:
        prefix = entry["path"].rstrip("/")
        if entry["pathType"] == "Exact" and path == entry["path"]:
            return True
        if entry["pathType"] == "Prefix" and (path == prefix or path.startswith(prefix + "/")):
            return True
    return False


def test_k8s_ingress_serves_streams_and_hides_operations() -> None:
    ingress = resource("Ingress", "push")
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert int(annotations[prefix + "proxy-read-timeout"]) >= 3600
    assert int(annotations[prefix + "proxy-send-timeout"]) >= 3600
    assert annotations[prefix + "proxy-buffering"] == "off"
    body_mib = int(annotations[prefix + "proxy-body-size"].removesuffix("m"))
    assert body_mib * 1_048_576 > push_settings.MAX_FRAME_BYTES
    for public in ("/ws", "/ws/", "/sse/", "/api/v1/channels/news/messages", "/admin/", "/"):
        assert ingress_routes(public), public
    for internal in ("/metrics", "/health", "/ready"):
        assert not ingress_routes(internal), internal
    for entry in ingress["spec"]["rules"][0]["http"]["paths"]:
        assert entry["backend"]["service"]["name"] == "push-node"
        assert entry["backend"]["service"]["port"]["name"] == "http"
