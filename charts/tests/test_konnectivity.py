"""Tests of the konnectivity Helm chart (charts/konnectivity).

The chart is rendered in-process by helm-python-sdk (Helm's Go SDK as a shared library inside the
wheel: no helm binary, no cluster, no network). Every rendered manifest is validated against the
Kubernetes OpenAPI schemas shipped by kubernetes-validate (strict: unknown fields are errors),
including the kube-apiserver patch the sidecar mode renders (applied to a stand-in Deployment).
The properties the chart promises are asserted: the server's and the agent's arguments are flags
the binaries know (read from konnectivity/src/flags.rs) and agree with each other, with the
Services and with the EgressSelectorConfiguration; the projected token's audience is the one the
server checks; grace periods outlast the drain; bad values are refused naming the field.

Run: charts/tests/run.sh (makes the venv and installs requirements.txt).
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import chartkit
import helm_python as helm
import kubernetes_validate
import pytest
import yaml

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parents[1]
CHART = REPO / "charts" / "konnectivity"
FLAGS_RS = REPO / "konnectivity" / "src" / "flags.rs"
RELEASE = "konnectivity"
NAMESPACE = "kube-system"

# The chart's floor (kubeVersion >=1.25), then the versions the other charts are tested on.
KUBE_VERSIONS = ("1.25.0", "1.30.0", "1.31.0", "1.37.0")

# Values files rendered by the tests: None is the chart's defaults (deployment mode).
CASES = {
    "default": None,
    "sidecar": TESTS / "values-konnectivity-sidecar.yaml",
    "gardener": TESTS / "values-konnectivity-gardener.yaml",
}
KIT = chartkit.Chart(CHART, RELEASE, NAMESPACE, CASES)
render = KIT.render
objects_of = KIT.objects_of
values_of = KIT.values_of
render_objs = KIT.render_objs
render_error = KIT.render_error
one = chartkit.one
BAD_MODE = TESTS / "values-konnectivity-bad-mode.yaml"
SIDECAR_CASES = ("sidecar",)

SERVER = f"{RELEASE}-server"
AGENT = f"{RELEASE}-agent"
AGENT_SERVICE = f"{RELEASE}-server-agents"
EGRESS = f"{RELEASE}-egress-selector"
SIDECAR = f"{RELEASE}-server-sidecar"
AUDIENCE = "system:konnectivity-server"

AGENT_KINDS = [("DaemonSet", AGENT), ("ServiceAccount", AGENT)]
EXPECTED = {
    "deployment": sorted(
        [
            ("ConfigMap", EGRESS),
            ("Deployment", SERVER),
            ("Service", SERVER),
            ("Service", AGENT_SERVICE),
            ("PodDisruptionBudget", SERVER),
            ("ServiceAccount", SERVER),
            ("ClusterRole", SERVER),
            ("ClusterRoleBinding", SERVER),
        ]
        + AGENT_KINDS
    ),
    "sidecar": sorted(
        [
            ("ConfigMap", EGRESS),
            ("ConfigMap", SIDECAR),
            ("ClusterRole", SERVER),
            ("ClusterRoleBinding", SERVER),
        ]
        + AGENT_KINDS
    ),
}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}


# -- rendering ----------------------------------------------------------------------------------


def kube_apiserver_patch(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(objs, "ConfigMap", SIDECAR)["data"]["kube-apiserver-patch.yaml"])


def server_pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The pod spec the server runs in: its Deployment's, or the sidecar patch's."""
    if any(o["kind"] == "Deployment" for o in objs):
        return one(objs, "Deployment", SERVER)["spec"]["template"]["spec"]
    return kube_apiserver_patch(objs)["spec"]["template"]["spec"]


def server_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [c for c in server_pod(objs)["containers"] if c["name"] == "konnectivity-server"]
    assert len(found) == 1
    return found[0]


def agent_pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "DaemonSet", AGENT)["spec"]["template"]["spec"]


def agent_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = agent_pod(objs)["containers"]
    assert len(containers) == 1
    return containers[0]


def flags(container: dict[str, Any]) -> dict[str, str]:
    """--flag=value arguments as a map; every argument must have that form and appear once."""
    out: dict[str, str] = {}
    for arg in container["args"]:
        match = re.fullmatch(r"(--[a-z][a-z0-9-]*)=(.*)", arg)
        assert match, f"argument {arg!r} is not --flag=value"
        assert match.group(1) not in out, f"{match.group(1)} twice"
        out[match.group(1)] = match.group(2)
    return out


def egress_config(objs: list[dict[str, Any]]) -> dict[str, Any]:
    text = one(objs, "ConfigMap", EGRESS)["data"]["egress-selector-configuration.yaml"]
    return yaml.safe_load(text)


def cluster_selection(objs: list[dict[str, Any]]) -> dict[str, Any]:
    selections = egress_config(objs)["egressSelections"]
    found = [s for s in selections if s["name"] == "cluster"]
    assert len(found) == 1, selections
    return found[0]["connection"]


def duration_seconds(text: str) -> float:
    if str(text) == "0":
        return 0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)(ms|s|m|h)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


def mode_of(case: str) -> str:
    return "sidecar" if case in SIDECAR_CASES else "deployment"


def named_port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


# -- the binaries' flags, read from konnectivity/src/flags.rs ------------------------------------


@functools.lru_cache(maxsize=None)
def known_flags() -> dict[str, set[str]]:
    """struct name -> the long flags its fields declare (clap: field_name -> --field-name; an
    explicit `long = "x"` wins)."""
    text = FLAGS_RS.read_text()
    result = {}
    for struct in ("ServerFlags", "AgentFlags"):
        body = re.search(rf"pub struct {struct} \{{(.*?)\n\}}", text, re.S)
        assert body, f"{struct} not found in {FLAGS_RS}"
        names = set()
        for attrs, field in re.findall(r"((?:#\[arg\([^\n]*\)\]\s*)+)pub (\w+):", body.group(1)):
            explicit = re.search(r'long = "([^"]+)"', attrs)
            names.add("--" + (explicit.group(1) if explicit else field.replace("_", "-")))
        assert len(names) > 20, f"{struct}: only {names} found; did flags.rs change shape?"
        result[struct] = names
    return result


@pytest.mark.parametrize("case", CASES)
def test_args_are_flags_the_binaries_know(case: str) -> None:
    objs = objects_of(case)
    server = server_container(objs)
    agent = agent_container(objs)
    assert server["command"] == ["konnectivity-server"]
    assert agent["command"] == ["konnectivity-agent"]
    unknown = set(flags(server)) - known_flags()["ServerFlags"]
    assert not unknown, f"server flags the binary does not have: {unknown}"
    unknown = set(flags(agent)) - known_flags()["AgentFlags"]
    assert not unknown, f"agent flags the binary does not have: {unknown}"


# -- the chart renders and is valid Kubernetes ---------------------------------------------------


def test_lint_is_clean() -> None:
    chartkit.assert_lint_clean(CHART, CASES, NAMESPACE)


@pytest.mark.parametrize("case", CASES)
def test_renders_expected_resources(case: str) -> None:
    objs = objects_of(case)
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objs) == EXPECTED[mode_of(case)]
    for obj in objs:
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], obj
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/component"] in ("server", "agent")


def apiserver_with_patch(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """A stand-in kube-apiserver Deployment with the sidecar patch merged in the way a strategic
    merge patch does (containers by name, volumeMounts by mountPath, volumes by name)."""
    labels = {"app": "kubernetes", "role": "apiserver"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "kube-apiserver", "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "kube-apiserver",
                            "image": "registry.k8s.io/kube-apiserver:v1.31.0",
                            "command": ["kube-apiserver"],
                            "volumeMounts": [{"name": "tls", "mountPath": "/srv/tls"}],
                        }
                    ],
                    "volumes": [{"name": "tls", "secret": {"secretName": "kube-apiserver-tls"}}],
                },
            },
        },
    }
    pod = deployment["spec"]["template"]["spec"]
    patch = kube_apiserver_patch(objs)["spec"]["template"]["spec"]
    for key, value in patch.items():
        if key == "containers":
            for container in value:
                existing = [c for c in pod["containers"] if c["name"] == container["name"]]
                if existing:
                    for mount in container.get("volumeMounts", []):
                        existing[0]["volumeMounts"].append(mount)
                else:
                    pod["containers"].append(copy.deepcopy(container))
        elif key == "volumes":
            pod["volumes"].extend(copy.deepcopy(value))
        else:
            pod[key] = value
    return deployment


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_manifests_match_kubernetes_schemas(case: str, kube_version: str) -> None:
    objs = objects_of(case)
    chartkit.assert_valid(objs, kube_version, case)
    if mode_of(case) == "sidecar":
        patched = apiserver_with_patch(objs)
        patched[chartkit.MARKER] = "kube-apiserver-patch.yaml applied to a kube-apiserver Deployment"
        chartkit.assert_valid([patched], kube_version, case)


@pytest.mark.parametrize("case", CASES)
def test_every_mount_has_its_volume(case: str) -> None:
    objs = objects_of(case)
    pods = [agent_pod(objs)]
    pods.append(apiserver_with_patch(objs)["spec"]["template"]["spec"] if mode_of(case) == "sidecar" else server_pod(objs))
    for pod in pods:
        volumes = [v["name"] for v in pod["volumes"]]
        assert len(volumes) == len(set(volumes)), volumes
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{container['name']}: {mount} has no volume"


# -- the server ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_server_count_is_the_replicas(case: str) -> None:
    objs = objects_of(case)
    replicas = values_of(case).get("server", {}).get("replicas", 2)
    assert flags(server_container(objs))["--server-count"] == str(replicas)
    if mode_of(case) == "deployment":
        assert one(objs, "Deployment", SERVER)["spec"]["replicas"] == replicas


@pytest.mark.parametrize("replicas", [1, 2, 5])
@pytest.mark.parametrize("mode", ["deployment", "sidecar"])
def test_server_count_follows_replicas(mode: str, replicas: int) -> None:
    values = {"server": {"mode": mode, "replicas": replicas}, "agent": {"proxyServerHost": "api.example.com"}}
    objs = render_objs(values)
    assert flags(server_container(objs))["--server-count"] == str(replicas)
    if mode == "deployment":
        assert one(objs, "Deployment", SERVER)["spec"]["replicas"] == replicas


def test_deployment_mode_server_args() -> None:
    objs = objects_of("default")
    f = flags(server_container(objs))
    assert f["--mode"] == "http-connect"
    assert f["--server-port"] == "9443"
    assert f["--agent-port"] == "8132"
    assert f["--health-port"] == "8134"
    assert f["--admin-port"] == "8133"
    assert "--uds-name" not in f
    # The frontend's mTLS material and the agent plane's certificate, from the mounted Secrets.
    pod = server_pod(objs)
    mounts = {m["mountPath"]: m["name"] for m in server_container(objs)["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    for flag, secret, key in [
        ("--server-cert", f"{SERVER}-frontend-tls", "tls.crt"),
        ("--server-key", f"{SERVER}-frontend-tls", "tls.key"),
        ("--server-ca-cert", f"{SERVER}-frontend-tls", "ca.crt"),
        ("--cluster-cert", f"{SERVER}-cluster-tls", "tls.crt"),
        ("--cluster-key", f"{SERVER}-cluster-tls", "tls.key"),
    ]:
        directory, _, file = f[flag].rpartition("/")
        assert file == key, flag
        assert secrets[mounts[directory]] == secret, flag
    # Token authentication, as Gardener ran it.
    assert f["--agent-namespace"] == NAMESPACE
    assert f["--agent-service-account"] == AGENT
    assert f["--authentication-audience"] == AUDIENCE
    assert "--kubeconfig" not in f
    assert pod["automountServiceAccountToken"] is True, "in-cluster TokenReviews need the token"


def test_gardener_secret_names() -> None:
    objs = objects_of("gardener")
    secrets = {v["secret"]["secretName"] for v in server_pod(objs)["volumes"] if "secret" in v}
    assert secrets == {"konnectivity-server-tls", "konnectivity-server-frontend"}
    assert server_container(objs)["image"] == "registry.example.com/gardener/konnectivity:0.1.0"
    assert flags(agent_container(objs))["--sync-forever"] == "true"


def test_sidecar_mode_server_args() -> None:
    objs = objects_of("sidecar")
    container = server_container(objs)
    f = flags(container)
    assert f["--mode"] == "grpc"
    assert f["--server-port"] == "0", "a UDS frontend needs --server-port=0"
    assert f["--delete-existing-uds-file"] == "true"
    assert not {"--server-cert", "--server-key", "--server-ca-cert"} & set(f)
    assert "frontend" not in [p["name"] for p in container["ports"]]
    # The socket's directory is the emptyDir shared with kube-apiserver.
    directory = f["--uds-name"].rpartition("/")[0]
    pod = apiserver_with_patch(objs)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in pod["containers"]:
        mount = [m for m in c["volumeMounts"] if m["mountPath"] == directory]
        assert len(mount) == 1, f"{c['name']} does not mount {directory}"
        assert "emptyDir" in volumes[mount[0]["name"]]
    # TokenReviews through the kubeconfig; its user is bound to the role.
    kubeconfig_dir = f["--kubeconfig"].rpartition("/")[0]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == kubeconfig_dir)
    assert volumes[mount["name"]]["secret"]["secretName"] == "konnectivity-server-kubeconfig"
    binding = one(objs, "ClusterRoleBinding", SERVER)
    assert binding["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:konnectivity-server"}
    ]
    # No readiness probe: it would keep kube-apiserver's pod unready until an agent connects.
    assert "readinessProbe" not in container
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_sidecar_patch_mounts_the_egress_selector_and_names_the_flag() -> None:
    objs = objects_of("sidecar")
    data = one(objs, "ConfigMap", SIDECAR)["data"]
    flag = data["kube-apiserver-flags"].strip()
    assert flag.startswith("--egress-selector-config-file=")
    path = flag.split("=", 1)[1]
    directory, _, file = path.rpartition("/")
    assert file in one(objs, "ConfigMap", EGRESS)["data"]
    pod = apiserver_with_patch(objs)["spec"]["template"]["spec"]
    apiserver = next(c for c in pod["containers"] if c["name"] == "kube-apiserver")
    mount = next(m for m in apiserver["volumeMounts"] if m["mountPath"] == directory)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == EGRESS


@pytest.mark.parametrize("case", CASES)
def test_egress_selector_configuration(case: str) -> None:
    objs = objects_of(case)
    config = egress_config(objs)
    assert config["apiVersion"] == "apiserver.k8s.io/v1beta1"
    assert config["kind"] == "EgressSelectorConfiguration"
    names = [s["name"] for s in config["egressSelections"]]
    assert names == ["cluster", "controlplane", "etcd"]
    for selection in config["egressSelections"][1:]:
        assert selection["connection"] == {"proxyProtocol": "Direct"}
    connection = cluster_selection(objs)
    f = flags(server_container(objs))
    if mode_of(case) == "sidecar":
        assert connection["proxyProtocol"] == "GRPC"
        assert connection["transport"] == {"uds": {"udsName": f["--uds-name"]}}
    else:
        assert connection["proxyProtocol"] == "HTTPConnect"
        assert f["--mode"] == "http-connect"
        tcp = connection["transport"]["tcp"]
        assert list(connection["transport"]) == ["tcp"]
        host = values_of(case).get("egressSelector", {}).get("serverHost") or f"{SERVER}.{NAMESPACE}.svc"
        service = one(objs, "Service", SERVER)
        port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "frontend")
        assert tcp["url"] == f"https://{host}:{port}"
        assert str(port) == f["--server-port"]
        assert set(tcp["tlsConfig"]) == {"caBundle", "clientCert", "clientKey"}
        for path in tcp["tlsConfig"].values():
            assert path.startswith("/"), path


def test_http_connect_sidecar() -> None:
    objs = render_objs({"server": {"mode": "sidecar"}, "agent": {"proxyServerHost": "api.example.com"}})
    assert flags(server_container(objs))["--mode"] == "http-connect"
    connection = cluster_selection(objs)
    assert connection["proxyProtocol"] == "HTTPConnect"
    assert list(connection["transport"]) == ["uds"]


@pytest.mark.parametrize("case", ["default", "gardener"])
def test_services(case: str) -> None:
    objs = objects_of(case)
    selector = one(objs, "Deployment", SERVER)["spec"]["selector"]["matchLabels"]
    container = server_container(objs)
    f = flags(container)
    frontend = one(objs, "Service", SERVER)["spec"]
    assert frontend["selector"] == selector
    assert "publishNotReadyAddresses" not in frontend, "kube-apiserver must reach Ready servers only"
    ports = {p["name"]: (p["port"], named_port(container, p["targetPort"])) for p in frontend["ports"]}
    assert ports["frontend"] == (int(f["--server-port"]),) * 2
    assert ports["health"] == (int(f["--health-port"]),) * 2
    admin_public = f["--admin-bind-address"] not in ("127.0.0.1", "::1")
    assert ("admin" in ports) == admin_public
    if admin_public:
        assert ports["admin"] == (int(f["--admin-port"]),) * 2
    agents = one(objs, "Service", AGENT_SERVICE)["spec"]
    assert agents["selector"] == selector
    assert agents["publishNotReadyAddresses"] is True, "a server is Ready only once agents reached it"
    assert [(p["name"], p["port"], named_port(container, p["targetPort"])) for p in agents["ports"]] == [
        ("agent", int(f["--agent-port"]), int(f["--agent-port"]))
    ]
    if case == "gardener":
        assert agents["type"] == "LoadBalancer" and agents["externalTrafficPolicy"] == "Local"


def test_quic_opens_the_udp_port_on_both_sides() -> None:
    objs = render_objs({"quic": {"enabled": True, "port": 8443}})
    container = server_container(objs)
    f = flags(container)
    assert f["--agent-quic-port"] == "8443"
    assert {"name": "agent-quic", "containerPort": 8443, "protocol": "UDP"} in container["ports"]
    agents = one(objs, "Service", AGENT_SERVICE)["spec"]["ports"]
    assert {"name": "agent-quic", "protocol": "UDP", "port": 8443, "targetPort": "agent-quic"} in agents
    a = flags(agent_container(objs))
    assert a["--transport"] == "auto" and a["--proxy-server-quic-port"] == "8443"
    # Off by default: no UDP anywhere, agents on gRPC.
    objs = objects_of("default")
    assert "--agent-quic-port" not in flags(server_container(objs))
    assert "--transport" not in flags(agent_container(objs))
    assert all(p["protocol"] == "TCP" for p in one(objs, "Service", AGENT_SERVICE)["spec"]["ports"])


@pytest.mark.parametrize("case", ["default", "gardener"])
def test_pod_disruption_budget_and_rollout(case: str) -> None:
    objs = objects_of(case)
    deployment = one(objs, "Deployment", SERVER)["spec"]
    pdb = one(objs, "PodDisruptionBudget", SERVER)["spec"]
    assert pdb["selector"] == deployment["selector"]
    assert pdb["maxUnavailable"] == 1
    assert deployment["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert "unhealthyPodEvictionPolicy" not in pdb


def test_unhealthy_pod_eviction_policy() -> None:
    # The field needs Kubernetes 1.26 or newer (the chart's floor is 1.25): only when asked for.
    objs = render_objs({"server": {"podDisruptionBudget": {"unhealthyPodEvictionPolicy": "AlwaysAllow"}}})
    pdb = one(objs, "PodDisruptionBudget", SERVER)
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    kubernetes_validate.validate(chartkit.without_marker(pdb), "1.30.0", strict=True)


@pytest.mark.parametrize("case", CASES)
def test_server_probes(case: str) -> None:
    container = server_container(objects_of(case))
    f = flags(container)
    assert named_port(container, "health") == int(f["--health-port"])
    assert named_port(container, "agent") == int(f["--agent-port"])
    assert named_port(container, "admin") == int(f["--admin-port"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    if mode_of(case) == "deployment":
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


@pytest.mark.parametrize("case", CASES)
def test_server_grace_outlasts_graceful_shutdown(case: str) -> None:
    objs = objects_of(case)
    f = flags(server_container(objs))
    grace = server_pod(objs)["terminationGracePeriodSeconds"]
    assert grace > duration_seconds(f["--graceful-shutdown-timeout"])


@pytest.mark.parametrize("case", ["default", "gardener"])
def test_tokenreview_rbac(case: str) -> None:
    objs = objects_of(case)
    role = one(objs, "ClusterRole", SERVER)
    assert role["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
    ]
    binding = one(objs, "ClusterRoleBinding", SERVER)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": SERVER}
    sa = server_pod(objs)["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    one(objs, "ServiceAccount", sa)


# -- the agent ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_agent_dials_the_server(case: str) -> None:
    objs = objects_of(case)
    server = flags(server_container(objs))
    agent = flags(agent_container(objs))
    assert agent["--proxy-server-port"] == server["--agent-port"] == "8132"
    host = values_of(case).get("agent", {}).get("proxyServerHost")
    if host:
        assert agent["--proxy-server-host"] == host
        assert agent_pod(objs)["dnsPolicy"] == "Default"
    else:
        assert agent["--proxy-server-host"] == f"{AGENT_SERVICE}.{NAMESPACE}.svc"
        port = one(objs, "Service", AGENT_SERVICE)["spec"]["ports"][0]["port"]
        assert str(port) == agent["--proxy-server-port"]
        assert agent_pod(objs)["dnsPolicy"] == "ClusterFirstWithHostNet", "the Service name needs cluster DNS"


@pytest.mark.parametrize("case", CASES)
def test_agent_token_and_ca(case: str) -> None:
    """The projected token is bound to the audience the server checks, belongs to the
    ServiceAccount the server accepts, and is the file --service-account-token-path reads; the
    CA is the cluster's (kube-root-ca.crt, the service-account CA)."""
    objs = objects_of(case)
    pod = agent_pod(objs)
    container = agent_container(objs)
    server = flags(server_container(objs))
    agent = flags(container)
    assert pod["automountServiceAccountToken"] is False
    assert server["--authentication-audience"] == AUDIENCE
    assert server["--agent-service-account"] == pod["serviceAccountName"]
    assert server["--agent-namespace"] == NAMESPACE
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    def source_of(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        directory, _, file = path.rpartition("/")
        mount = mounts[directory]
        assert mount["readOnly"] is True
        sources = volumes[mount["name"]]["projected"]["sources"]
        for source in sources:
            if source.get("serviceAccountToken", {}).get("path") == file:
                return source, {}
            for item in source.get("configMap", {}).get("items", []):
                if item["path"] == file:
                    return source, item
        pytest.fail(f"{path} is in no projected source")

    token, _ = source_of(agent["--service-account-token-path"])
    assert token["serviceAccountToken"]["audience"] == server["--authentication-audience"]
    assert token["serviceAccountToken"]["expirationSeconds"] >= 600
    ca, item = source_of(agent["--ca-cert"])
    assert ca["configMap"]["name"] == "kube-root-ca.crt" and item["key"] == "ca.crt"


@pytest.mark.parametrize("case", CASES)
def test_agent_identifiers_from_the_downward_api(case: str) -> None:
    container = agent_container(objects_of(case))
    assert flags(container)["--agent-identifiers"] == "host=$(NODE_NAME)&ipv4=$(HOST_IP)"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["HOST_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    names = [e["name"] for e in container["env"]]
    assert names.index("NODE_NAME") < names.index("LOG_FORMAT"), "defined before use"


@pytest.mark.parametrize("case", CASES)
def test_agent_daemonset(case: str) -> None:
    objs = objects_of(case)
    daemonset = one(objs, "DaemonSet", AGENT)["spec"]
    pod = agent_pod(objs)
    container = agent_container(objs)
    f = flags(container)
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}], "every taint"
    assert daemonset["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}}
    assert named_port(container, "health") == int(f["--health-server-port"]) == 8134
    assert named_port(container, "admin") == int(f["--admin-server-port"]) == 8133
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    # SIGTERM: DRAIN, then open tunnels get --drain-timeout; the kill must come later.
    assert pod["terminationGracePeriodSeconds"] > duration_seconds(f["--drain-timeout"])
    assert daemonset["selector"]["matchLabels"] != one(objs, "ClusterRole", SERVER)["metadata"]["labels"]


@pytest.mark.parametrize("case", CASES)
def test_containers_are_unprivileged(case: str) -> None:
    objs = objects_of(case)
    pods = [agent_pod(objs)] + ([server_pod(objs)] if mode_of(case) == "deployment" else [])
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in (agent_container(objs), server_container(objs)):
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert "privileged" not in ctx
        assert set(container["resources"]) == {"requests", "limits"}
        assert container["resources"]["limits"]["memory"]


def test_image_defaults_to_app_version() -> None:
    with helm.Chart.load(CHART) as chart:
        app_version = chart.metadata["appVersion"]
    objs = objects_of("default")
    assert server_container(objs)["image"] == f"konnectivity:{app_version}"
    assert agent_container(objs)["image"] == f"konnectivity:{app_version}"


# -- switches ---------------------------------------------------------------------------------------


def test_without_auth() -> None:
    objs = render_objs({"auth": {"enabled": False}})
    assert not [o for o in objs if o["kind"] in CLUSTER_SCOPED]
    server = flags(server_container(objs))
    assert not {"--agent-namespace", "--agent-service-account", "--authentication-audience"} & set(server)
    assert "--service-account-token-path" not in flags(agent_container(objs))
    sources = agent_pod(objs)["volumes"][0]["projected"]["sources"]
    assert [list(s) for s in sources] == [["configMap"]]
    assert server_pod(objs)["automountServiceAccountToken"] is False
    for obj in objs:
        kubernetes_validate.validate(chartkit.without_marker(obj), KUBE_VERSIONS[0], strict=True)


def test_agents_only_and_server_only() -> None:
    agents = render_objs({"server": {"enabled": False}, "agent": {"proxyServerHost": "api.example.com"}})
    assert sorted(o["kind"] for o in agents) == ["DaemonSet", "ServiceAccount"]
    servers = render_objs({"agent": {"enabled": False}})
    assert not [o for o in servers if o["metadata"]["name"] == AGENT]
    # The server still accepts the agents' ServiceAccount by name.
    assert flags(server_container(servers))["--agent-service-account"] == AGENT


# -- bad values fail the render, naming the field --------------------------------------------------


def test_bad_values_file_is_refused() -> None:
    message = render_error(chartkit.load_values(BAD_MODE))
    assert "/server/mode" in message, message
    assert "'sidecar', 'deployment'" in message, message


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"server": {"mode": "statefulset"}}, "/server/mode"),
        ({"server": {"replicas": -1}}, "/server/replicas"),
        ({"server": {"replicas": 0}}, "/server/replicas"),
        ({"server": {"proxyProtocol": "Direct"}}, "/server/proxyProtocol"),
        ({"server": {"ports": {"agent": 70000}}}, "/server/ports/agent"),
        ({"server": {"gracefulShutdownTimeout": "soon"}}, "/server/gracefulShutdownTimeout"),
        ({"server": {"proxyStrategies": ["nearest"]}}, "/server/proxyStrategies/0"),
        ({"server": {"sidecar": {"udsDir": "relative"}}}, "/server/sidecar/udsDir"),
        ({"agent": {"drainTimeout": "30"}}, "/agent/drainTimeout"),
        ({"agent": {"updateStrategy": {"maxUnavailable": "ten"}}}, "/agent/updateStrategy/maxUnavailable"),
        ({"agent": {"extraArgs": ["sync-forever"]}}, "/agent/extraArgs/0"),
        ({"auth": {"audience": ""}}, "/auth/audience"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"sever": {"mode": "sidecar"}}, "sever"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], named: str) -> None:
    message = render_error(values)
    assert named in message, message


def test_template_checks() -> None:
    message = render_error({"server": {"proxyProtocol": "GRPC"}})
    assert "server.proxyProtocol GRPC needs server.mode sidecar" in message
    message = render_error({"server": {"terminationGracePeriodSeconds": 20}})
    assert "server.terminationGracePeriodSeconds (20) must be larger than server.gracefulShutdownTimeout (20s)" in message
    render({"server": {"terminationGracePeriodSeconds": 21}})
    message = render_error({"agent": {"drainTimeout": "1m", "terminationGracePeriodSeconds": 45}})
    assert "agent.terminationGracePeriodSeconds (45) must be larger than agent.drainTimeout (60s)" in message
    message = render_error({"server": {"mode": "sidecar"}})
    assert "agent.proxyServerHost is required" in message
    assert "agent.proxyServerHost is required" in render_error({"server": {"enabled": False}})


# -- documentation -------------------------------------------------------------------------------


# Maps in values.yaml whose keys are free-form (documented as a whole).
FREE_FORM_MAPS = {"podSecurityContext", "containerSecurityContext"}


def test_every_value_is_documented_in_values_yaml() -> None:
    undocumented = chartkit.undocumented_values(CHART)
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)


def test_readme_lists_every_value() -> None:
    missing = chartkit.values_missing_from_readme(CHART, FREE_FORM_MAPS)
    assert not missing, f"README.md values table lacks: {missing}"


def test_schema_knows_every_value() -> None:
    """values.yaml passes its own schema's key sets: no value the schema would not accept."""
    unknown = chartkit.values_unknown_to_schema(CHART)
    assert not unknown, f"not in values.schema.json: {unknown}"
