"""Tests of the node-local-dns Helm chart (charts/node-local-dns).

The chart is rendered in-process by helm-python-sdk (Helm's Go SDK as a shared library inside the
wheel: no helm binary, no cluster, no network). Every rendered manifest is validated against the
Kubernetes OpenAPI schemas shipped by kubernetes-validate (strict: unknown fields are errors), the
properties the chart promises are asserted (node-cache's flags, the Corefile's blocks, the surge
rollout, the probes, the capabilities), and the rendered Corefile template is fed to the real
`node-local-dns -check`.

The binary is $NODE_LOCAL_DNS_BIN. When it is not set, the binary tests are skipped with a loud
reason; when it is set but missing, they fail.

Run: charts/tests/run.sh (makes the venv and installs requirements.txt).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chartkit
import helm_python as helm
import kubernetes_validate
import pytest
import yaml

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parents[1]
CHART = REPO / "charts" / "node-local-dns"
RELEASE = "node-local-dns"
NAMESPACE = "kube-system"

# Kubernetes versions whose schemas (bundled in kubernetes-validate) every manifest must pass: the
# chart's floor (kubeVersion >=1.25: DaemonSet maxSurge is GA), then the versions the sni-proxy
# chart is tested on.
KUBE_VERSIONS = ("1.25.0", "1.30.0", "1.31.0", "1.37.0")

# Values files rendered by the tests: None is the chart's defaults.
CASES = {
    "default": None,
    "gardener": TESTS / "values-node-local-dns-gardener.yaml",
    "no-surge": TESTS / "values-node-local-dns-no-surge.yaml",
}
KIT = chartkit.Chart(CHART, RELEASE, NAMESPACE, CASES)
render = KIT.render
objects_of = KIT.objects_of
values_of = KIT.values_of
render_objs = KIT.render_objs
render_error = KIT.render_error
one = chartkit.one
BAD_PLUGIN = TESTS / "values-node-local-dns-bad-plugin.yaml"

# Every flag of k8s-dns-node-cache (kubernetes/dns cmd/node-cache/main.go, plus the CoreDNS flags
# it reads back), and the fast-path flags that are ours. The chart must not pass anything else.
NODE_CACHE_FLAGS = {
    "-localip",
    "-setupinterface",
    "-interfacename",
    "-setupiptables",
    "-skipteardown",
    "-syncinterval",
    "-metrics-listen-address",
    "-basecorefile",
    "-corefile",
    "-kubednscm",
    "-upstreamsvc",
    "-health-port",
    "-reloadwithsignal",
    "-conf",
    "-dns.port",
    "-pidfile",
}
FAST_PATH_FLAGS = {"--fast-path-mode", "--fast-path-interfaces"}

# The placeholders the installer fills (the chart, from values) and the ones node-local-dns fills
# at run time.
INSTALL_TIME_PLACEHOLDERS = (
    "__PILLAR__LOCAL__DNS__",
    "__PILLAR__DNS__DOMAIN__",
    "__PILLAR__DNS__SERVER__",
)
RUN_TIME_PLACEHOLDERS = ("__PILLAR__CLUSTER__DNS__", "__PILLAR__UPSTREAM__SERVERS__")

EXPECTED_KINDS = ["ConfigMap", "DaemonSet", "Service", "Service", "ServiceAccount"]

# How long `node-local-dns -check` may take; a binary that ignores -check would serve forever.
CHECK_TIMEOUT_SECONDS = 30
# The kube-dns-upstream ClusterIP the check sees (KUBE_DNS_UPSTREAM_SERVICE_HOST).
UPSTREAM_SERVICE_HOST = "10.96.0.11"


# -- rendering ----------------------------------------------------------------------------------


def daemonset(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "DaemonSet")


def pod_spec(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return daemonset(objs)["spec"]["template"]["spec"]


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(objs)["containers"]
    assert len(containers) == 1
    return containers[0]


def corefile_text(objs: list[dict[str, Any]]) -> str:
    return one(objs, "ConfigMap")["data"]["Corefile"]


# -- a small Corefile reader (enough for the chart's output) -------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    line: int
    children: list["Directive"] = field(default_factory=list)

    def child(self, name: str) -> "Directive":
        found = [c for c in self.children if c.name == name]
        assert len(found) == 1, f"{self.name}: expected one {name}, got {len(found)}"
        return found[0]

    def all(self, name: str) -> list["Directive"]:
        return [c for c in self.children if c.name == name]


def parse_corefile(text: str) -> list[Directive]:
    """Top-level entries: server blocks (name = the keys) and bare lines such as `import x`.
    Each `{` opens a nesting level, each `}` on its own line closes one; every line is bounded."""
    root = Directive("<root>", [], 0)
    stack = [root]
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line == "}":
            assert len(stack) > 1, f"line {number}: unbalanced }}"
            stack.pop()
            continue
        opens = line.endswith("{")
        words = line.rstrip("{").split()
        entry = Directive(words[0], words[1:], number)
        stack[-1].children.append(entry)
        if opens:
            stack.append(entry)
    assert len(stack) == 1, "unclosed block in the Corefile"
    return root.children


def server_blocks(case_or_objs: str | list[dict[str, Any]]) -> dict[str, Directive]:
    objs = objects_of(case_or_objs) if isinstance(case_or_objs, str) else case_or_objs
    blocks = {}
    for entry in parse_corefile(corefile_text(objs)):
        if entry.name.endswith(":53"):
            zone = entry.name[: -len(":53")]
            assert zone not in blocks, f"zone {zone} twice"
            blocks[zone] = entry
    return blocks


def listen_ips(case: str) -> list[str]:
    values = values_of(case)
    ips = list(values.get("localIPs", ["169.254.20.10"]))
    cluster_ip = values.get("kubeDNS", {}).get("clusterIP", "")
    return ips + ([cluster_ip] if cluster_ip else [])


# -- the chart renders and is valid Kubernetes ---------------------------------------------------


def test_lint_is_clean() -> None:
    chartkit.assert_lint_clean(CHART, CASES, NAMESPACE)


@pytest.mark.parametrize("case", CASES)
def test_renders_expected_resources(case: str) -> None:
    objs = objects_of(case)
    assert sorted(o["kind"] for o in objs) == EXPECTED_KINDS
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert names == {
        ("ServiceAccount", RELEASE),
        ("ConfigMap", RELEASE),
        ("DaemonSet", RELEASE),
        ("Service", RELEASE),
        ("Service", "kube-dns-upstream"),
    }
    for obj in objs:
        assert obj["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_manifests_match_kubernetes_schemas(case: str, kube_version: str) -> None:
    chartkit.assert_valid(objects_of(case), kube_version, case)


# -- node-cache's command line -------------------------------------------------------------------


EXPECTED_ARGS = {
    "default": [
        "-localip", "169.254.20.10",
        "-conf", "/etc/Corefile",
        "-upstreamsvc", "kube-dns-upstream",
        "-health-port", "8080",
        "-skipteardown",
    ],
    "gardener": [
        "-localip", "169.254.20.10,fd30:1319:f1e:230b::1,100.104.0.10",
        "-conf", "/etc/Corefile",
        "-upstreamsvc", "kube-dns-upstream",
        "-health-port", "8099",
        "-skipteardown",
    ],
    "no-surge": [
        "-localip", "169.254.20.10,10.96.0.10",
        "-conf", "/etc/Corefile",
        "-upstreamsvc", "kube-dns-upstream",
        "-health-port", "8080",
        "-metrics-listen-address", "0.0.0.0:9354",
        "-setupiptables=false",
    ],
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_args_are_exactly_node_cache_flags(case: str) -> None:
    c = container(objects_of(case))
    assert "command" not in c, "the image's entrypoint runs node-local-dns"
    assert c["args"] == EXPECTED_ARGS[case]
    flags = {a.split("=", 1)[0] for a in c["args"] if a.startswith("-")}
    assert flags <= NODE_CACHE_FLAGS, flags - NODE_CACHE_FLAGS


def test_fast_path_flags() -> None:
    objs = render_objs(
        {"fastPath": {"enabled": True, "mode": "tc", "interfaces": ["eth0", "eth1"]}}
    )
    args = container(objs)["args"]
    assert args[-2:] == ["--fast-path-mode=tc", "--fast-path-interfaces=eth0,eth1"]
    assert {a.split("=", 1)[0] for a in args if a.startswith("--")} == FAST_PATH_FLAGS
    caps = container(objs)["securityContext"]["capabilities"]["add"]
    assert {"BPF", "PERFMON"} <= set(caps), "loading the program needs CAP_BPF and CAP_PERFMON"
    default_args = container(objects_of("default"))["args"]
    assert not [
        a for a in default_args if a.startswith("--fast-path")
    ], "fast path must default off"
    assert "--fast-path-mode=tc" in container(
        render_objs({"fastPath": {"enabled": True, "interfaces": ["eth0"]}})
    )["args"], "tc is the default mode"


def test_extra_args_come_last() -> None:
    args = container(render_objs({"extraArgs": ["-syncinterval", "30"]}))["args"]
    assert args[-2:] == ["-syncinterval", "30"]


# -- the Corefile ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_corefile_has_the_four_blocks(case: str) -> None:
    entries = parse_corefile(corefile_text(objects_of(case)))
    blocks = [e.name for e in entries if e.name.endswith(":53")]
    assert blocks == ["cluster.local:53", "in-addr.arpa:53", "ip6.arpa:53", ".:53"]
    ips = listen_ips(case)
    for zone, block in server_blocks(case).items():
        names = [d.name for d in block.children]
        for plugin in ("errors", "cache", "reload", "loop", "bind", "forward", "prometheus"):
            assert names.count(plugin) == 1, f"{zone}: {plugin} in {names}"
        assert block.child("bind").args == ips, zone
        assert block.child("prometheus").args == [":9253"], zone
        forward = block.child("forward")
        assert forward.args[0] == "."
        assert len(forward.children) == 1, f"{zone}: one transport option"


@pytest.mark.parametrize("case", CASES)
def test_corefile_cache_options(case: str) -> None:
    blocks = server_blocks(case)
    cluster_cache = blocks["cluster.local"].child("cache")
    assert cluster_cache.args == []
    assert [(d.name, d.args) for d in cluster_cache.children] == [
        ("success", ["9984", "30"]),
        ("denial", ["9984", "5"]),
    ]
    for zone in ("in-addr.arpa", "ip6.arpa", "."):
        cache = blocks[zone].child("cache")
        assert (cache.args, cache.children) == (["30"], []), zone


def forward_of(blocks: dict[str, Directive], zone: str) -> tuple[list[str], str]:
    forward = blocks[zone].child("forward")
    return forward.args[1:], forward.children[0].name


@pytest.mark.parametrize("case", CASES)
def test_corefile_forward_targets_and_transport(case: str) -> None:
    values = values_of(case)
    cluster_transport = "force_tcp" if values.get("forceTCPToClusterDNS", True) else "prefer_udp"
    upstream_transport = "force_tcp" if values.get("forceTCPToUpstreamDNS", False) else "prefer_udp"
    blocks = server_blocks(case)
    for zone in ("cluster.local", "in-addr.arpa", "ip6.arpa"):
        assert forward_of(blocks, zone) == (["__PILLAR__CLUSTER__DNS__"], cluster_transport), zone
    assert forward_of(blocks, ".") == (["__PILLAR__UPSTREAM__SERVERS__"], upstream_transport)


@pytest.mark.parametrize("to_cluster", [True, False])
@pytest.mark.parametrize("to_upstream", [True, False])
def test_force_tcp_follows_the_values(to_cluster: bool, to_upstream: bool) -> None:
    objs = render_objs({"forceTCPToClusterDNS": to_cluster, "forceTCPToUpstreamDNS": to_upstream})
    blocks = server_blocks(objs)
    want_cluster = "force_tcp" if to_cluster else "prefer_udp"
    want_upstream = "force_tcp" if to_upstream else "prefer_udp"
    for zone in ("cluster.local", "in-addr.arpa", "ip6.arpa"):
        assert forward_of(blocks, zone)[1] == want_cluster
    assert forward_of(blocks, ".")[1] == want_upstream


def test_forward_external_to_cluster_dns() -> None:
    objs = render_objs({"forwardExternalToClusterDNS": True, "forceTCPToUpstreamDNS": False})
    assert forward_of(server_blocks(objs), ".") == (["__PILLAR__CLUSTER__DNS__"], "force_tcp")
    assert "__PILLAR__UPSTREAM__SERVERS__" not in corefile_text(objs)


@pytest.mark.parametrize("case", CASES)
def test_health_only_in_the_cluster_block(case: str) -> None:
    blocks = server_blocks(case)
    port = values_of(case).get("healthPort", 8080)
    assert blocks["cluster.local"].child("health").args == [f"169.254.20.10:{port}"]
    for zone in ("in-addr.arpa", "ip6.arpa", "."):
        assert not blocks[zone].all("health"), zone


def test_ipv6_health_address_is_bracketed() -> None:
    objs = render_objs({"localIPs": ["fd30:1319:f1e:230b::1"]})
    assert server_blocks(objs)["cluster.local"].child("health").args == [
        "[fd30:1319:f1e:230b::1]:8080"
    ]
    probe = container(objs)["readinessProbe"]["httpGet"]
    assert probe["host"] == "fd30:1319:f1e:230b::1"


def test_cache_values_reach_the_corefile() -> None:
    cache = {
        "clusterZone": {
            "successCapacity": 20000,
            "successTTL": 60,
            "denialCapacity": 5000,
            "denialTTL": 2,
        },
        "otherZonesTTL": 120,
    }
    blocks = server_blocks(
        render_objs({"cache": cache, "metricsPort": 9999, "clusterDomain": "k8s.example"})
    )
    assert list(blocks) == ["k8s.example", "in-addr.arpa", "ip6.arpa", "."]
    c = blocks["k8s.example"].child("cache")
    assert [(d.name, d.args) for d in c.children] == [
        ("success", ["20000", "60"]),
        ("denial", ["5000", "2"]),
    ]
    assert blocks["."].child("cache").args == ["120"]
    assert blocks["."].child("prometheus").args == [":9999"]


@pytest.mark.parametrize("case", CASES)
def test_placeholders(case: str) -> None:
    text = corefile_text(objects_of(case))
    for placeholder in INSTALL_TIME_PLACEHOLDERS:
        assert placeholder not in text, f"{placeholder} must be filled by the chart"
    for placeholder in RUN_TIME_PLACEHOLDERS:
        assert placeholder in text, f"{placeholder} must be left for node-local-dns"
    assert not re.findall(
        r"__PILLAR__\w+__",
        text.replace("__PILLAR__CLUSTER__DNS__", "").replace("__PILLAR__UPSTREAM__SERVERS__", ""),
    )


def test_gardener_imports_and_extra_blocks() -> None:
    entries = parse_corefile(corefile_text(objects_of("gardener")))
    blocks = server_blocks("gardener")
    for zone in ("cluster.local", "."):
        assert [d.args for d in blocks[zone].all("import")] == [["custom/*.override"]], zone
    for zone in ("in-addr.arpa", "ip6.arpa"):
        assert not blocks[zone].all("import"), zone
    top_level = [(e.name, e.args) for e in entries if not e.name.endswith(":53")]
    assert top_level == [("import", ["generated-config/custom-server-block.server"])]
    assert entries[-1].name == "import", "extra server blocks come after the four blocks"
    assert not any(b.all("import") for b in server_blocks("default").values())


def test_custom_config_mount() -> None:
    c = container(objects_of("gardener"))
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["custom-config"] == {
        "name": "custom-config",
        "mountPath": "/etc/custom",
        "readOnly": True,
    }
    volumes = {v["name"]: v for v in pod_spec(objects_of("gardener"))["volumes"]}
    assert volumes["custom-config"]["configMap"] == {"name": "coredns-custom", "optional": True}
    # `import custom/*.override` in /etc/Corefile resolves to the mount.
    assert Path("/etc/Corefile").parent / "custom" == Path(mounts["custom-config"]["mountPath"])
    assert "custom-config" not in {
        m["name"] for m in container(objects_of("default"))["volumeMounts"]
    }


# -- the workload --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_update_strategy(case: str) -> None:
    ds = daemonset(objects_of(case))["spec"]
    strategy = ds["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    if case == "no-surge":
        assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": "10%"}
        assert "-skipteardown" not in container(objects_of(case))["args"]
    else:
        assert strategy["rollingUpdate"] == {"maxSurge": "10%", "maxUnavailable": 0}
        assert "-skipteardown" in container(objects_of(case))["args"]
    assert (
        ds["minReadySeconds"] >= 1
    ), "a surge pod must stay Ready a while before the old one stops"


def test_surge_as_a_count() -> None:
    objs = render_objs({"updateStrategy": {"maxSurge": 1, "maxUnavailable": 0}})
    assert daemonset(objs)["spec"]["updateStrategy"]["rollingUpdate"] == {
        "maxSurge": 1,
        "maxUnavailable": 0,
    }
    assert "-skipteardown" in container(objs)["args"]
    assert "ports" not in container(objs)


@pytest.mark.parametrize("surge", [0, "10%"])
@pytest.mark.parametrize("skip", [True, False])
def test_skip_teardown_override(surge: Any, skip: bool) -> None:
    values = {"skipTeardown": skip, "updateStrategy": {"maxSurge": surge, "maxUnavailable": 1}}
    assert ("-skipteardown" in container(render_objs(values))["args"]) is skip


@pytest.mark.parametrize("case", CASES)
def test_probes(case: str) -> None:
    c = container(objects_of(case))
    port = values_of(case).get("healthPort", 8080)
    assert c["readinessProbe"]["httpGet"] == {
        "host": "169.254.20.10",
        "path": "/ready",
        "port": port,
    }
    assert c["livenessProbe"]["httpGet"] == {
        "host": "169.254.20.10",
        "path": "/health",
        "port": port,
    }
    readiness = c["readinessProbe"]
    liveness = c["livenessProbe"]
    assert readiness["periodSeconds"] <= 5, "readiness gates the rollout: ask often"
    assert liveness["initialDelaySeconds"] < 60, "no upstream-style 60 s blind spot"
    assert liveness["failureThreshold"] * liveness["periodSeconds"] >= 30, "a restart costs DNS"
    assert c["args"][c["args"].index("-health-port") + 1] == str(port)


@pytest.mark.parametrize("case", CASES)
def test_capabilities(case: str) -> None:
    """Every capability dropped, then only what node-local-dns needs: NET_ADMIN (dummy interface,
    addresses, iptables), NET_BIND_SERVICE (port 53; root without it cannot bind below 1024 once
    ALL is dropped) and, when it manages iptables, NET_RAW (iptables-legacy opens a raw socket)."""
    ctx = container(objects_of(case))["securityContext"]
    expected = {"NET_ADMIN", "NET_BIND_SERVICE"}
    if values_of(case).get("iptables", {}).get("setup", True):
        expected.add("NET_RAW")
    if values_of(case).get("fastPath", {}).get("enabled", False):
        expected |= {"BPF", "PERFMON"}
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert sorted(ctx["capabilities"]["add"]) == sorted(expected)
    assert "SYS_ADMIN" not in ctx["capabilities"]["add"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["privileged"] is False
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_spec(objects_of(case))["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"
    }


@pytest.mark.parametrize("case", CASES)
def test_host_network_pod(case: str) -> None:
    pod = pod_spec(objects_of(case))
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "Default"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["automountServiceAccountToken"] is False
    assert (
        pod["enableServiceLinks"] is True
    ), "KUBE_DNS_UPSTREAM_SERVICE_HOST comes from service links"
    assert pod["tolerations"] == [
        {"key": "CriticalAddonsOnly", "operator": "Exists"},
        {"effect": "NoExecute", "operator": "Exists"},
        {"effect": "NoSchedule", "operator": "Exists"},
    ]


def test_gardener_pool_selection() -> None:
    pod = pod_spec(objects_of("gardener"))
    assert pod["nodeSelector"] == {
        "node.gardener.cloud/node-local-dns": "true",
        "worker.gardener.cloud/pool": "pool-a",
    }
    labels = daemonset(objects_of("gardener"))["spec"]["template"]["metadata"]["labels"]
    assert labels["networking.gardener.cloud/to-dns"] == "allowed"
    assert labels["k8s-app"] == "node-local-dns"


@pytest.mark.parametrize("case", CASES)
def test_xtables_lock_mount(case: str) -> None:
    c = container(objects_of(case))
    pod = pod_spec(objects_of(case))
    mounts = [m for m in c["volumeMounts"] if m["mountPath"] == "/run/xtables.lock"]
    assert len(mounts) == 1
    assert not mounts[0].get("readOnly"), "iptables takes the lock for writing"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
    assert volume["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}


@pytest.mark.parametrize("case", CASES)
def test_config_mounts(case: str) -> None:
    """The Corefile template as /etc/coredns/Corefile.base and the optional kube-dns ConfigMap at
    /etc/kube-dns, both directory mounts (no subPath: the kubelet updates them in place, and
    node-local-dns re-reads them), and no checksum annotation (no rollout on a Corefile edit)."""
    c = container(objects_of(case))
    pod = pod_spec(objects_of(case))
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for mount in c["volumeMounts"]:
        assert "subPath" not in mount and "subPathExpr" not in mount
    base = volumes[mounts["/etc/coredns"]["name"]]["configMap"]
    assert base == {"name": RELEASE, "items": [{"key": "Corefile", "path": "Corefile.base"}]}
    assert "Corefile" in one(objects_of(case), "ConfigMap")["data"]
    kube_dns = volumes[mounts["/etc/kube-dns"]["name"]]["configMap"]
    assert kube_dns == {"name": "kube-dns", "optional": True}
    annotations = daemonset(objects_of(case))["spec"]["template"]["metadata"].get("annotations", {})
    assert not [k for k in annotations if "checksum" in k.lower()], annotations


def test_ports_declared_only_without_surge() -> None:
    """A hostNetwork pod's container ports are defaulted to host ports, and the scheduler never puts
    two pods with one host port on a node, so a surge pod that declares them stays Pending
    (kubernetes/kubernetes#106417). Without a surge they are declared as upstream does."""
    assert "ports" not in container(objects_of("default"))
    assert "ports" not in container(objects_of("gardener"))
    ports = container(objects_of("no-surge"))["ports"]
    assert [(p["name"], p["containerPort"], p["protocol"]) for p in ports] == [
        ("dns", 53, "UDP"),
        ("dns-tcp", 53, "TCP"),
        ("metrics", 9253, "TCP"),
        ("errormetrics", 9354, "TCP"),
    ]
    for p in ports:
        assert "hostPort" not in p


@pytest.mark.parametrize("case", CASES)
def test_prometheus_annotations_and_metrics_service(case: str) -> None:
    objs = objects_of(case)
    annotations = daemonset(objs)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9253"
    service = one(objs, "Service", RELEASE)["spec"]
    assert service["clusterIP"] == "None"
    assert service["selector"] == daemonset(objs)["spec"]["selector"]["matchLabels"]
    error_port = values_of(case).get("errorMetricsPort", 9353)
    assert [(p["name"], p["port"], p["targetPort"], p["protocol"]) for p in service["ports"]] == [
        ("metrics", 9253, 9253, "TCP"),
        ("errormetrics", error_port, error_port, "TCP"),
    ]


@pytest.mark.parametrize("case", CASES)
def test_kube_dns_upstream_service(case: str) -> None:
    objs = objects_of(case)
    service = one(objs, "Service", "kube-dns-upstream")["spec"]
    target = values_of(case).get("kubeDNSUpstream", {}).get("targetPort", 53)
    assert service["selector"] == {"k8s-app": "kube-dns"}
    assert [(p["protocol"], p["port"], p["targetPort"]) for p in service["ports"]] == [
        ("UDP", 53, target),
        ("TCP", 53, target),
    ]
    args = container(objs)["args"]
    assert args[args.index("-upstreamsvc") + 1] == "kube-dns-upstream"


def test_upstream_service_name_is_the_flag() -> None:
    objs = render_objs({"kubeDNSUpstream": {"name": "coredns-upstream", "targetPort": 8053}})
    one(objs, "Service", "coredns-upstream")
    args = container(objs)["args"]
    assert args[args.index("-upstreamsvc") + 1] == "coredns-upstream"


def test_resources() -> None:
    assert container(objects_of("default"))["resources"] == {
        "requests": {"cpu": "25m", "memory": "25Mi"}
    }


def test_image_defaults_to_app_version() -> None:
    with helm.Chart.load(CHART) as chart:
        app_version = chart.metadata["appVersion"]
    assert container(objects_of("default"))["image"] == f"node-local-dns:{app_version}"
    assert container(objects_of("gardener"))["image"] == (
        "europe-docker.pkg.dev/gardener-project/releases/node-local-dns:0.1.0"
    )


def test_options_off() -> None:
    values = {
        "serviceAccount": {"create": False},
        "metrics": {"scrapeAnnotations": False, "service": {"enabled": False}},
    }
    objs = render_objs(values)
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "DaemonSet", "Service"]
    assert pod_spec(objs)["serviceAccountName"] == "default"
    assert "priorityClassName" not in pod_spec(render_objs({"priorityClassName": ""}))
    assert "annotations" not in daemonset(objs)["spec"]["template"]["metadata"]
    for obj in objs:
        kubernetes_validate.validate(chartkit.without_marker(obj), KUBE_VERSIONS[0], strict=True)


# -- bad values fail the render, naming the field --------------------------------------------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"localIPs": ["169.254.20"]}, "/localIPs/0"),
        ({"localIPs": []}, "/localIPs"),
        ({"kubeDNS": {"clusterIP": "kube-dns"}}, "/kubeDNS/clusterIP"),
        ({"healthPort": 70000}, "/healthPort"),
        ({"forceTCPtoClusterDNS": True}, "forceTCPtoClusterDNS"),
        ({"forceTCPToClusterDNS": "yes"}, "/forceTCPToClusterDNS"),
        ({"cache": {"clusterZone": {"denialTTL": "5s"}}}, "/cache/clusterZone/denialTTL"),
        ({"updateStrategy": {"maxSurge": "ten"}}, "/updateStrategy/maxSurge"),
        ({"fastPath": {"mode": "ebpf"}}, "/fastPath/mode"),
        ({"skipTeardown": "sometimes"}, "/skipTeardown"),
        ({"imports": ["custom/a.override { }"]}, "/imports/0"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], named: str) -> None:
    message = render_error(values)
    assert f"'{named}'" in message or named in message, message


def test_template_checks() -> None:
    assert "maxSurge and maxUnavailable cannot both be 0" in render_error(
        {"updateStrategy": {"maxSurge": 0, "maxUnavailable": 0}}
    )
    assert "fastPath.interfaces" in render_error({"fastPath": {"enabled": True}})
    message = render_error({"kubeDNS": {"clusterIP": "169.254.20.10"}})
    assert "kubeDNS.clusterIP (169.254.20.10) must not also be one of localIPs" in message


def test_notes_warn_outside_kube_system() -> None:
    notes = render(None, namespace="dns")[f"{RELEASE}/templates/NOTES.txt"]
    assert "WARNING: installed into dns, not kube-system" in notes
    assert "WARNING" not in render(None)[f"{RELEASE}/templates/NOTES.txt"]


# -- documentation -------------------------------------------------------------------------------


# Maps in values.yaml whose keys are free-form (documented as a whole).
FREE_FORM_MAPS = {"kubeDNSUpstream.selector"}


def test_every_value_is_documented_in_values_yaml() -> None:
    undocumented = chartkit.undocumented_values(CHART)
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)


def test_readme_lists_every_value() -> None:
    missing = chartkit.values_missing_from_readme(CHART, FREE_FORM_MAPS)
    assert not missing, f"README.md values table lacks: {missing}"


# -- the real binary: the rendered Corefile passes `node-local-dns -check` -------------------------


def node_local_dns_binary() -> Path:
    configured = os.environ.get("NODE_LOCAL_DNS_BIN")
    if not configured:
        pytest.skip(
            "!!! SKIPPED: the rendered Corefile was NOT checked by node-local-dns -check: "
            "NODE_LOCAL_DNS_BIN is not set (build node-local-dns and point it at the binary)"
        )
    binary = Path(configured)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"NODE_LOCAL_DNS_BIN={configured} is not an executable file", pytrace=False)
    return binary


@dataclass
class CheckRun:
    result: subprocess.CompletedProcess[str]
    base: Path
    out: Path
    command: list[str]

    def describe(self) -> str:
        return (
            f"command: {' '.join(self.command)}\nexit: {self.result.returncode}\n"
            f"stderr:\n{self.result.stderr}\nstdout:\n{self.result.stdout}\n"
            f"Corefile.base:\n{self.base.read_text()}"
        )


def run_check(tmp_path: Path, objs: list[dict[str, Any]]) -> CheckRun:
    """`node-local-dns -check` on the rendered Corefile template, laid out as in the pod: the
    template at coredns/Corefile.base, the output at Corefile (relative imports resolve beside
    it: custom/, generated-config/), a fake kube-dns ConfigMap directory, and the DaemonSet's own
    arguments with -conf pointing into tmp_path."""
    binary = node_local_dns_binary()
    base = tmp_path / "coredns" / "Corefile.base"
    base.parent.mkdir()
    base.write_text(corefile_text(objs))
    out = tmp_path / "Corefile"
    kube_dns = tmp_path / "kube-dns"
    kube_dns.mkdir()
    (kube_dns / "upstreamNameservers").write_text('["192.0.2.53"]')
    (kube_dns / "stubDomains").write_text('{"corp.example": ["192.0.2.54"]}')
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "log.override").write_text("log\n")
    (tmp_path / "generated-config").mkdir()
    (tmp_path / "generated-config" / "custom-server-block.server").write_text(
        "svc.example:53 {\n    errors\n    bind 169.254.20.10\n    forward . 192.0.2.55\n}\n"
    )
    args = list(container(objs)["args"])
    args[args.index("-conf") + 1] = str(out)
    command = [
        str(binary),
        "-check",
        "-basecorefile",
        str(base),
        "-kubednscm",
        str(kube_dns),
        *args,
    ]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "KUBE_DNS_UPSTREAM_SERVICE_HOST": UPSTREAM_SERVICE_HOST,
        "LOG_FORMAT": "text",
        "RUST_LOG": "info",
    }
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_SECONDS,
            env=env,
            cwd=tmp_path,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{binary} -check did not exit within {CHECK_TIMEOUT_SECONDS}s", pytrace=False)
    return CheckRun(result, base, out, command)


ALARMING = re.compile(r"\b(error|warn|warning|panic|panicked|fatal|failed)\b", re.IGNORECASE)


@pytest.mark.parametrize("case", CASES)
def test_rendered_corefile_passes_check(case: str, tmp_path: Path) -> None:
    run = run_check(tmp_path, objects_of(case))
    assert (
        run.result.returncode == 0
    ), f"{case}: -check rejected the chart's Corefile\n{run.describe()}"
    alarming = [
        l for l in (run.result.stderr + run.result.stdout).splitlines() if ALARMING.search(l)
    ]
    assert not alarming, f"{case}: -check passed but said:\n" + "\n".join(alarming)
    if run.out.exists():
        rendered = run.out.read_text()
        assert UPSTREAM_SERVICE_HOST in rendered, "__PILLAR__CLUSTER__DNS__ was not filled"
        assert "__PILLAR__" not in rendered, rendered


def test_unknown_plugin_is_rejected_by_check(tmp_path: Path) -> None:
    objs = chartkit.manifests_of(render(chartkit.load_values(BAD_PLUGIN)))
    text = corefile_text(objs)
    line = next(n for n, l in enumerate(text.splitlines(), 1) if "no_such_plugin" in l)
    run = run_check(tmp_path, objs)
    assert run.result.returncode != 0, f"-check accepted an unknown plugin\n{run.describe()}"
    output = run.result.stderr + run.result.stdout
    assert "no_such_plugin" in output, f"-check did not name the directive\n{run.describe()}"
    where = re.compile(rf"({re.escape(str(run.base))}|{re.escape(str(run.out))}):{line}\b")
    assert where.search(output), f"-check did not name the file and line {line}\n{run.describe()}"
