"""Tests of the sni-proxy Helm chart (charts/sni-proxy).

The chart is rendered in-process by helm-python-sdk, which binds (ctypes) to a shared library
built from Helm's Go SDK and shipped inside the wheel: no helm binary, no cluster, no network.
Every rendered manifest is validated against the Kubernetes OpenAPI schemas shipped by
kubernetes-validate (strict: unknown fields are errors), the properties the chart promises are
asserted, and the rendered config file is fed to the real `sni-proxy --check`.

The binary is $SNI_PROXY_BIN, or <repo>/target/debug/sni-proxy. When it is missing the binary
tests fail, except on a developer machine (neither SNI_PROXY_BIN nor CI set), where they are
skipped with a loud reason.

Run: charts/tests/run.sh (makes the venv and installs requirements.txt).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import chartkit
import helm_python as helm
import kubernetes_validate
import pytest
import yaml

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parents[1]
CHART = REPO / "charts" / "sni-proxy"
RELEASE = "sni-proxy"
NAMESPACE = "istio-ingress"

# Kubernetes versions whose schemas (bundled in kubernetes-validate) every manifest must pass:
# the chart's floor (kubeVersion >=1.30: the preStop sleep action), 1.31, and the newest the
# pinned kubernetes-validate ships.
KUBE_VERSIONS = ("1.30.0", "1.31.0", "1.37.0")

# Values files rendered by the tests: None is the chart's defaults.
CASES = {
    "default": None,
    "seed": TESTS / "values-seed.yaml",
    "kubernetes": TESTS / "values-kubernetes.yaml",
    "gateway-api": TESTS / "values-gateway-api.yaml",
}

EXPECTED_KINDS = {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"}
# With kubernetes.enabled: read-only access to what the proxy follows.
RBAC_KINDS = {"ClusterRole", "ClusterRoleBinding"}
# With kubernetes.gatewayApi.enabled as well: the GatewayClass, and the Lease's Role.
GATEWAY_API_KINDS = {"GatewayClass", "Role", "RoleBinding"}
CLUSTER_SCOPED = RBAC_KINDS | {"GatewayClass"}
# The cases that follow the API server.
KUBERNETES_CASES = ("kubernetes", "gateway-api")

# How long `sni-proxy --check` may take; a binary that ignores --check would run forever.
CHECK_TIMEOUT_SECONDS = 30


# -- rendering ----------------------------------------------------------------------------------


def render(values: dict[str, Any] | None) -> dict[str, str]:
    """Template path -> rendered text, like `helm template`."""
    return chartkit.render(CHART, values, RELEASE, NAMESPACE)


@functools.lru_cache(maxsize=None)
def rendered_case(case: str) -> tuple[dict[str, Any], ...]:
    return tuple(chartkit.manifests_of(render(chartkit.load_values(CASES[case]))))


def objects(case: str) -> list[dict[str, Any]]:
    """The objects of a case, rendered once per session (tests only read them)."""
    return list(rendered_case(case))


def one(case: str, kind: str) -> dict[str, Any]:
    found = [o for o in objects(case) if o["kind"] == kind]
    assert len(found) == 1, f"{case}: expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(case: str) -> dict[str, Any]:
    return one(case, "Deployment")["spec"]["template"]["spec"]


def container(case: str) -> dict[str, Any]:
    containers = pod_spec(case)["containers"]
    assert len(containers) == 1
    return containers[0]


def config_text(case: str) -> str:
    return one(case, "ConfigMap")["data"]["config.yaml"]


def config(case: str) -> dict[str, Any]:
    return yaml.safe_load(config_text(case))


def duration_seconds(text: str) -> float:
    """The proxy's duration syntax: 250ms, 30s, 5m, 24h, sequences of those, or 0."""
    if str(text) == "0":
        return 0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)(ms|s|m|h)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


# -- the chart renders and is valid Kubernetes ---------------------------------------------------


def test_lint_is_clean() -> None:
    chartkit.assert_lint_clean(CHART, CASES, NAMESPACE)


@pytest.mark.parametrize("case", CASES)
def test_renders_expected_resources(case: str) -> None:
    kinds = sorted(o["kind"] for o in objects(case))
    expected = EXPECTED_KINDS | (RBAC_KINDS if case in KUBERNETES_CASES else set())
    expected |= GATEWAY_API_KINDS if case == "gateway-api" else set()
    assert set(kinds) == expected and len(kinds) == len(expected), kinds
    for obj in objects(case):
        if obj["kind"] == "GatewayClass":
            assert obj["metadata"]["name"] == "sni-proxy-seed"
        else:
            assert obj["metadata"]["name"] == RELEASE
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], obj
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE


def test_kubernetes_source_has_exactly_the_rules_the_proxy_is_tested_with() -> None:
    rules = yaml.safe_load((CHART / "files" / "kubernetes-rules.yaml").read_text())
    role = one("kubernetes", "ClusterRole")
    assert role["rules"] == rules
    for rule in role["rules"]:
        assert set(rule["verbs"]) == {"get", "list", "watch"}, rule
    binding = one("kubernetes", "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": RELEASE}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]
    assert pod_spec("kubernetes")["automountServiceAccountToken"] is True
    assert one("kubernetes", "ServiceAccount")["automountServiceAccountToken"] is True
    # In-cluster: no kubeconfig; the release namespace for exportTo; the selector as given.
    assert config("kubernetes")["kubernetes"] == {
        "namespace": NAMESPACE,
        "istio": {"selector": {"app": "istio-ingressgateway", "istio": "ingressgateway", "istio-role": "seed"}},
    }


def rules_file(name: str) -> list[dict[str, Any]]:
    return yaml.safe_load((CHART / "files" / name).read_text())


def test_gateway_api_adds_its_rules_the_lease_role_and_the_class() -> None:
    role = one("gateway-api", "ClusterRole")
    assert role["rules"] == rules_file("kubernetes-rules.yaml") + rules_file("gateway-api-rules.yaml")
    gateway_rules = rules_file("gateway-api-rules.yaml")
    assert {v for r in gateway_rules for v in r["verbs"]} == {"get", "list", "watch", "patch"}
    for rule in gateway_rules:
        assert rule["apiGroups"] == ["gateway.networking.k8s.io"], rule
        # Writes only to status subresources.
        if "patch" in rule["verbs"]:
            assert rule["verbs"] == ["patch"] and all(r.endswith("/status") for r in rule["resources"]), rule
    lease_role = one("gateway-api", "Role")
    assert lease_role["metadata"]["namespace"] == NAMESPACE
    assert lease_role["rules"] == rules_file("lease-rules.yaml")
    assert lease_role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}]
    binding = one("gateway-api", "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": RELEASE}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]
    gateway_class = one("gateway-api", "GatewayClass")
    assert gateway_class["spec"]["controllerName"] == "gardener.cloud/sni-proxy"
    assert config("gateway-api")["kubernetes"] == {
        "namespace": NAMESPACE,
        "gateway_api": {"gateway_class": "sni-proxy-seed", "controller_name": "gardener.cloud/sni-proxy"},
    }
    # Without it: none of that.
    assert "gateway_api" not in config("kubernetes")["kubernetes"]
    assert not [o for o in objects("kubernetes") if o["kind"] in GATEWAY_API_KINDS]


def test_gateway_api_needs_the_kubernetes_source() -> None:
    message = render_error({"kubernetes": {"gatewayApi": {"enabled": True}}})
    assert "kubernetes.gatewayApi.enabled needs kubernetes.enabled" in message


def gateway_api_crd(plural: str) -> dict[str, Any]:
    """The served v1 schema of a Gateway API CRD, from the module test/kube pins (Go's module
    cache); skipped loudly when the module is not downloaded."""
    go_mod = (REPO / "test" / "kube" / "go.mod").read_text()
    version = re.search(r"sigs\.k8s\.io/gateway-api (v\S+)", go_mod)
    assert version, "test/kube/go.mod does not pin sigs.k8s.io/gateway-api"
    cache = os.environ.get("GOMODCACHE") or str(Path(os.environ.get("GOPATH", Path.home() / "go")) / "pkg" / "mod")
    path = Path(cache) / f"sigs.k8s.io/gateway-api@{version.group(1)}/config/crd/standard/gateway.networking.k8s.io_{plural}.yaml"
    if not path.is_file():
        pytest.skip(f"!!! SKIPPED: {path} is missing (run scripts/kube-bin once to download the modules)")
    crd = yaml.safe_load(path.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def test_gateway_class_matches_its_crd() -> None:
    import jsonschema

    schema = gateway_api_crd("gatewayclasses")
    gateway_class = chartkit.without_marker(one("gateway-api", "GatewayClass"))
    jsonschema.validate(gateway_class, schema)
    # Strict, like kubernetes-validate: no field the schema does not know.
    assert set(gateway_class["spec"]) <= set(schema["properties"]["spec"]["properties"])


def test_without_kubernetes_no_token_and_no_role() -> None:
    for case in ("default", "seed"):
        assert pod_spec(case)["automountServiceAccountToken"] is False
        assert "kubernetes" not in config(case)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_manifests_match_kubernetes_schemas(case: str, kube_version: str) -> None:
    # The GatewayClass is a custom resource: test_gateway_class_matches_its_crd.
    chartkit.assert_valid([o for o in objects(case) if o["kind"] != "GatewayClass"], kube_version, case)


# -- the workload --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_replicas_and_rollout_never_lose_capacity(case: str) -> None:
    spec = one(case, "Deployment")["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] == 1


def test_default_replicas_is_three() -> None:
    assert one("default", "Deployment")["spec"]["replicas"] == 3


@pytest.mark.parametrize("case", CASES)
def test_pod_disruption_budget_selects_the_pods(case: str) -> None:
    pdb = one(case, "PodDisruptionBudget")["spec"]
    deployment = one(case, "Deployment")["spec"]
    assert pdb["selector"] == deployment["selector"]
    assert ("minAvailable" in pdb) != ("maxUnavailable" in pdb)
    if case != "seed":
        assert pdb == {"maxUnavailable": 1, "selector": deployment["selector"]}
    else:
        assert pdb["minAvailable"] == 3
        assert pdb["minAvailable"] < deployment["replicas"]
        assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize("case", CASES)
def test_container_is_unprivileged(case: str) -> None:
    pod = pod_spec(case)
    ctx = container(case)["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == 65532 and ctx["runAsUser"] != 0
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in ctx or ctx["privileged"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # The API token only where the proxy reads the API server.
    assert pod["automountServiceAccountToken"] is (case in KUBERNETES_CASES)
    assert not pod.get("hostNetwork")


@pytest.mark.parametrize("case", CASES)
def test_command_reads_the_mounted_config(case: str) -> None:
    c = container(case)
    assert c["command"] == ["sni-proxy", "--config", "/etc/sni-proxy/config.yaml"]
    assert "args" not in c


@pytest.mark.parametrize("case", CASES)
def test_config_is_a_directory_mount_without_checksum(case: str) -> None:
    """No subPath (the kubelet updates the file in place, the proxy reloads it) and no checksum
    annotation (a route change must not roll the pods)."""
    c = container(case)
    pod = pod_spec(case)
    config_path = Path(c["command"][2])
    mounts = [m for m in c["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    assert len(mounts) == 1, c["volumeMounts"]
    mount = mounts[0]
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert mount.get("readOnly") is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mount["name"]]["configMap"]["name"] == one(case, "ConfigMap")["metadata"]["name"]
    assert "items" not in volumes[mount["name"]]["configMap"]
    assert config_path.name in one(case, "ConfigMap")["data"]
    annotations = one(case, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    assert not [k for k in annotations if "checksum" in k.lower()], annotations


@pytest.mark.parametrize("case", CASES)
def test_probes_use_the_admin_port(case: str) -> None:
    c = container(case)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["admin"] == 15090
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert config(case)["admin"]["address"] == f"0.0.0.0:{ports['admin']}"


@pytest.mark.parametrize("case", CASES)
def test_prometheus_scrape_annotations(case: str) -> None:
    annotations = one(case, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    admin = {p["name"]: p["containerPort"] for p in container(case)["ports"]}["admin"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(admin)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("case", CASES)
def test_grace_period_outlasts_the_proxy_drain(case: str) -> None:
    pod = pod_spec(case)
    pre_stop = container(case).get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    grace = duration_seconds(config(case)["timeouts"]["shutdown_grace"])
    assert pod["terminationGracePeriodSeconds"] > grace + pre_stop.get("seconds", 0)


@pytest.mark.parametrize("case", CASES)
def test_environment(case: str) -> None:
    env = {e["name"]: e.get("value") for e in container(case)["env"]}
    assert env["LOG_FORMAT"] == "json"
    assert env["RUST_LOG"] == ("sni_proxy=debug,info" if case == "seed" else "info")


def test_resources() -> None:
    assert container("default")["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"}}
    assert container("seed")["resources"]["limits"] == {"memory": "4Gi"}


def test_image_defaults_to_app_version() -> None:
    with helm.Chart.load(CHART) as chart:
        app_version = chart.metadata["appVersion"]
    assert container("default")["image"] == f"sni-proxy:{app_version}"
    assert container("seed")["image"] == "registry.example.com/gardener/sni-proxy:0.1.0"
    assert container("seed")["imagePullPolicy"] == "Always"


def test_anti_affinity() -> None:
    selector = one("default", "Deployment")["spec"]["selector"]
    preferred = pod_spec("default")["affinity"]["podAntiAffinity"]
    assert list(preferred) == ["preferredDuringSchedulingIgnoredDuringExecution"]
    term = preferred["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"] == selector
    assert "topologySpreadConstraints" not in pod_spec("default")

    required = pod_spec("seed")["affinity"]["podAntiAffinity"]
    assert list(required) == ["requiredDuringSchedulingIgnoredDuringExecution"]
    term = required["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"] == selector
    spread = pod_spec("seed")["topologySpreadConstraints"]
    assert spread[0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread[0]["labelSelector"] == selector


# -- the Service ---------------------------------------------------------------------------------


def service_port_map(case: str) -> dict[str, tuple[int, int]]:
    """Service port name -> (service port, container port the targetPort names)."""
    container_ports = {p["name"]: p["containerPort"] for p in container(case)["ports"]}
    result = {}
    for port in one(case, "Service")["spec"]["ports"]:
        target = port["targetPort"]
        target = container_ports[target] if isinstance(target, str) else target
        assert port["protocol"] == "TCP"
        result[port["name"]] = (port["port"], target)
    return result


def test_service_default_ports() -> None:
    service = one("default", "Service")["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["externalTrafficPolicy"] == "Local"
    assert service["selector"] == one("default", "Deployment")["spec"]["selector"]["matchLabels"]
    assert service_port_map("default") == {"tls": (443, 9443), "http-proxy": (8443, 8443)}
    assert "loadBalancerSourceRanges" not in service
    assert "annotations" not in one("default", "Service")["metadata"]


def test_service_seed() -> None:
    service = one("seed", "Service")
    assert service_port_map("seed") == {
        "tls": (443, 9443),
        "http-proxy": (8443, 8443),
        "tls-tunnel": (8132, 8132),
    }
    annotations = service["metadata"]["annotations"]
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"] == "*"
    assert service["spec"]["loadBalancerSourceRanges"] == ["0.0.0.0/0"]


@pytest.mark.parametrize("case", CASES)
def test_every_listener_is_exposed(case: str) -> None:
    exposed = {target for _, target in service_port_map(case).values()}
    for listener in config(case)["listeners"]:
        host, _, port = listener["address"].rpartition(":")
        assert host == "0.0.0.0", listener
        assert int(port) in exposed, listener
    assert 15090 not in exposed, "the admin port must not be on the load balancer"


# -- the config file -----------------------------------------------------------------------------


def test_default_config() -> None:
    cfg = config("default")
    assert cfg["routes"] == []
    assert cfg["unknown_sni"] == "reject"
    assert [(l["name"], l["address"], l["mode"], l["proxy_protocol"]) for l in cfg["listeners"]] == [
        ("tls", "0.0.0.0:9443", "tls", "off"),
        ("http-proxy", "0.0.0.0:8443", "http-connect", "off"),
    ]


def test_seed_config_passes_values_through() -> None:
    values = chartkit.load_values(CASES["seed"])
    cfg = config("seed")
    assert cfg["routes"] == values["routes"]
    for key in ("limits", "timeouts", "keepalive", "health"):
        assert cfg[key] == values[key], key
    assert cfg["access_log"] is True
    assert cfg["reload_interval"] == "1s"
    listeners = {l["name"]: l for l in cfg["listeners"]}
    assert listeners["tls"]["proxy_protocol"] == "optional"
    assert listeners["tls"]["trusted_proxies"] == ["10.250.0.0/16", "10.251.0.0/16"]
    assert listeners["tls"]["max_client_hello_bytes"] == 16384
    # values-seed.yaml writes `proxyProtocol: off` unquoted (YAML 1.1: false): still "off".
    assert listeners["http-proxy"]["proxy_protocol"] == "off"
    assert "trusted_proxies" not in listeners["http-proxy"]
    # The wildcard host survives as a string (an unquoted * would be a YAML alias).
    assert "*.alpha.dev.external.example.com" in cfg["routes"][0]["hosts"]


def test_config_numbers_are_plain_integers() -> None:
    """Helm reads numbers as float64; the config must still say 750000, not 7.5e+05."""
    text = config_text("seed")
    assert "max_connections: 750000" in text
    assert "e+" not in text


# -- render-time checks of the chart ----------------------------------------------------------


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    return str(caught.value)


def test_grace_period_shorter_than_drain_fails_the_render() -> None:
    # 5s preStop + 30s shutdown_grace: 35 is too short by one second.
    message = render_error({"terminationGracePeriodSeconds": 35})
    assert "terminationGracePeriodSeconds (35)" in message
    render({"terminationGracePeriodSeconds": 36})
    message = render_error({"timeouts": {"shutdown_grace": "1m30s"}})
    assert "shutdown_grace (90s)" in message
    message = render_error({"timeouts": {"shutdown_grace": "soon"}})
    assert 'cannot read the duration "soon"' in message


def test_long_listener_name_fails_the_render() -> None:
    values = {"listeners": [{"name": "a-very-long-listener-name", "port": 9443, "mode": "tls"}]}
    assert "longer than 15 characters" in render_error(values)


def test_no_listener_fails_the_render() -> None:
    assert "at least one listener" in render_error({"listeners": []})


def test_options_off() -> None:
    values = {
        "podDisruptionBudget": {"enabled": False},
        "serviceAccount": {"create": False},
        "podAntiAffinity": {"type": "none"},
        "metrics": {"scrapeAnnotations": False},
        "preStopSleepSeconds": 0,
        "service": {"type": "ClusterIP"},
    }
    objs = chartkit.manifests_of(render(values))
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "Deployment", "Service"]
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "default"
    assert "affinity" not in pod
    assert "lifecycle" not in pod["containers"][0]
    assert "annotations" not in deployment["spec"]["template"]["metadata"]
    service = next(o for o in objs if o["kind"] == "Service")["spec"]
    assert "externalTrafficPolicy" not in service
    for obj in objs:
        kubernetes_validate.validate(chartkit.without_marker(obj), KUBE_VERSIONS[0], strict=True)


def test_every_value_is_documented() -> None:
    undocumented = chartkit.undocumented_values(CHART)
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)


# -- the real binary: the rendered config passes `sni-proxy --check` ------------------------------


def sni_proxy_binary() -> Path:
    configured = os.environ.get("SNI_PROXY_BIN")
    binary = Path(configured) if configured else REPO / "target" / "debug" / "sni-proxy"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    problem = (
        f"sni-proxy binary not found at {binary} "
        f"({'from SNI_PROXY_BIN' if configured else 'default; set SNI_PROXY_BIN to override'}); "
        "build it first: cargo build -p sni-proxy"
    )
    if not configured and not os.environ.get("CI"):
        pytest.skip(
            "!!! SKIPPED: the rendered config was NOT checked by sni-proxy --check: " + problem
        )
    pytest.fail(problem, pytrace=False)


def run_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    binary = sni_proxy_binary()
    path = tmp_path / "config.yaml"
    path.write_text(text)
    try:
        return subprocess.run(
            [str(binary), "--config", str(path), "--check"],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_SECONDS,
            env={**os.environ, "LOG_FORMAT": "text"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{binary} --check did not exit within {CHECK_TIMEOUT_SECONDS}s", pytrace=False)


@pytest.mark.parametrize("case", CASES)
def test_rendered_config_passes_check(case: str, tmp_path: Path) -> None:
    result = run_check(tmp_path, config_text(case))
    assert result.returncode == 0, (
        f"{case}: sni-proxy --check exited {result.returncode}\n"
        f"stderr:\n{result.stderr}\nstdout:\n{result.stdout}\nconfig:\n{config_text(case)}"
    )


def test_bad_route_is_rejected_by_check(tmp_path: Path) -> None:
    rendered = chartkit.manifests_of(render(chartkit.load_values(TESTS / "values-bad-route.yaml")))
    configmap = next(o for o in rendered if o["kind"] == "ConfigMap")
    text = configmap["data"]["config.yaml"]
    assert yaml.safe_load(text)["routes"][0]["backends"] == ["kube-apiserver.shoot--dev--broken"]
    result = run_check(tmp_path, text)
    assert result.returncode != 0, f"--check accepted a backend that is not an address:\n{text}"
    assert "routes[0].backends" in result.stderr, (
        f"--check exited {result.returncode} without naming routes[0].backends on stderr\n"
        f"stderr:\n{result.stderr}\nstdout:\n{result.stdout}"
    )
