"""Tests of the log-shipper Helm chart (charts/log-shipper).

The chart is rendered in-process by helm-python-sdk (Helm's Go SDK as a shared library inside the
wheel: no helm binary, no cluster, no network). Every rendered manifest is validated against the
Kubernetes OpenAPI schemas shipped by kubernetes-validate (strict: unknown fields are errors), the
properties the chart promises are asserted (the read-only log mount, the checkpoint directory on
the node, tolerations, the unprivileged root container, probes, RBAC only with the lifecycle),
the rendered config is compared with the values and with the binary's own field names and
defaults (log-shipper/src/config.rs), and fed to the real `log-shipper --config F --check`.

The binary is $LOG_SHIPPER_BIN. When it is not set, the binary tests are skipped with a loud
reason; when it is set but missing, they fail.

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
CHART = REPO / "charts" / "log-shipper"
CONFIG_RS = REPO / "log-shipper" / "src" / "config.rs"
RUN_RS = REPO / "log-shipper" / "src" / "run.rs"
EXAMPLE = REPO / "log-shipper" / "example.yaml"
RELEASE = "log-shipper"
NAMESPACE = "garden"

# Kubernetes versions whose schemas (bundled in kubernetes-validate) every manifest must pass: the
# chart's floor (kubeVersion >=1.25), then the versions the other charts are tested on.
KUBE_VERSIONS = ("1.25.0", "1.30.0", "1.31.0", "1.37.0")

# Values files rendered by the tests: None is the chart's defaults.
CASES = {
    "default": None,
    "gardener": TESTS / "values-log-shipper-gardener.yaml",
    "otlp": TESTS / "values-log-shipper-otlp.yaml",
}
KIT = chartkit.Chart(CHART, RELEASE, NAMESPACE, CASES)
render = KIT.render
objects_of = KIT.objects_of
values_of = KIT.values_of
render_objs = KIT.render_objs
render_error = KIT.render_error
one = chartkit.one
BAD_PROTOCOL = TESTS / "values-log-shipper-bad-protocol.yaml"
SHARED_SHOOT_STORE = TESTS / "values-log-shipper-shared-shoot-store.yaml"

CONFIG_PATH = "/etc/log-shipper/config.yaml"
CHECKPOINT_DIR = "/var/lib/log-shipper"

# How long `log-shipper --check` may take; a binary that ignored --check would run forever.
CHECK_TIMEOUT_SECONDS = 30


# -- rendering ----------------------------------------------------------------------------------


def daemonset(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "DaemonSet")


def pod_spec(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return daemonset(objs)["spec"]["template"]["spec"]


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(objs)["containers"]
    assert len(containers) == 1
    return containers[0]


def config_text(objs: list[dict[str, Any]]) -> str:
    return one(objs, "ConfigMap")["data"]["config.yaml"]


def config_of(case_or_objs: str | list[dict[str, Any]]) -> dict[str, Any]:
    objs = objects_of(case_or_objs) if isinstance(case_or_objs, str) else case_or_objs
    return yaml.safe_load(config_text(objs))


def lifecycle_on(case: str) -> bool:
    return values_of(case).get("lifecycle", {}).get("enabled", True)


def volume_of(objs: list[dict[str, Any]], mount_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the container's mount at mount_path, the pod's volume it names)."""
    mounts = [m for m in container(objs)["volumeMounts"] if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"expected one mount at {mount_path}, got {mounts}"
    volumes = [v for v in pod_spec(objs)["volumes"] if v["name"] == mounts[0]["name"]]
    assert len(volumes) == 1
    return mounts[0], volumes[0]


# -- the chart renders and is valid Kubernetes ---------------------------------------------------


def test_lint_is_clean() -> None:
    chartkit.assert_lint_clean(CHART, CASES, NAMESPACE)


@pytest.mark.parametrize("case", CASES)
def test_renders_expected_resources(case: str) -> None:
    objs = objects_of(case)
    names = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    expected = [("ConfigMap", RELEASE), ("DaemonSet", RELEASE), ("ServiceAccount", RELEASE)]
    if lifecycle_on(case):
        expected += [("ClusterRole", RELEASE), ("ClusterRoleBinding", RELEASE)]
    if values_of(case).get("metrics", {}).get("service", {}).get("enabled", True):
        expected.append(("Service", RELEASE))
    assert names == sorted(expected)
    for obj in objs:
        if obj["kind"].startswith("ClusterRole"):
            assert "namespace" not in obj["metadata"]
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_manifests_match_kubernetes_schemas(case: str, kube_version: str) -> None:
    chartkit.assert_valid(objects_of(case), kube_version, case)


# -- the config file -------------------------------------------------------------------------------


def test_default_config_is_the_example_reachable_from_the_kubelet() -> None:
    """The defaults render log-shipper/example.yaml with every knob written out at the binary's
    default, except the admin address: the example listens on 127.0.0.1, which the kubelet's
    probes (to the pod IP) could never reach."""
    example = yaml.safe_load(EXAMPLE.read_text())
    config = config_of("default")
    assert example["admin"]["address"] == "127.0.0.1:15093"
    assert config["admin"] == {"address": "0.0.0.0:15093"}
    assert config["stores"] == example["stores"]
    assert example["kubernetes"] == {}
    assert config["kubernetes"] == {"sync_timeout": "2m"}, "the default, written out"
    assert {k: config["input"][k] for k in example["input"]} == example["input"]


@pytest.mark.parametrize("case", CASES)
def test_config_follows_the_values(case: str) -> None:
    """Every value reaches its config field; the mounts and the config agree on the paths."""
    values = chartkit.load_values(CASES[case]) or {}
    merged = yaml.safe_load((CHART / "values.yaml").read_text())

    def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in top.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                out[key] = overlay(base[key], value)
            else:
                out[key] = value
        return out

    v = overlay(merged, values)
    config = config_of(case)
    host = v["admin"]["host"]
    address = f"[{host}]:{v['admin']['port']}" if ":" in host else f"{host}:{v['admin']['port']}"
    assert config["admin"]["address"] == address
    assert config["input"] == {
        "path": v["input"]["path"],
        "checkpoint_dir": CHECKPOINT_DIR,
        "max_entry_bytes": v["input"]["maxEntryBytes"],
        "partial_timeout": v["input"]["partialTimeout"],
        "rescan_interval": v["input"]["rescanInterval"],
        "max_open_files": v["input"]["maxOpenFiles"],
    }
    for name in ("seed", "shoot"):
        store = v["stores"][name]
        expected = {"url": store["url"], "protocol": store["protocol"]}
        if store.get("tenant"):
            expected["tenant"] = store["tenant"]
        assert config["stores"][name] == expected, name
    d = v["delivery"]
    assert config["delivery"] == {
        "batch_bytes": d["batchBytes"],
        "batch_wait": d["batchWait"],
        "request_timeout": d["requestTimeout"],
        "min_backoff": d["minBackoff"],
        "max_backoff": d["maxBackoff"],
        "max_outage": d["maxOutage"],
        "outage_policy": d["outagePolicy"],
    }
    if v["lifecycle"]["enabled"]:
        want = {"sync_timeout": v["lifecycle"]["syncTimeout"]}
        if v["lifecycle"]["routing"]:
            want["routing"] = v["lifecycle"]["routing"]
        assert config["kubernetes"] == want
    else:
        assert "kubernetes" not in config


def test_large_numbers_are_written_as_integers() -> None:
    """Helm reads numbers as float64; 1e+06 from 1000000 up would not parse as an integer."""
    text = config_text(
        render_objs({"input": {"maxEntryBytes": 4194304}, "delivery": {"batchBytes": 33554432}})
    )
    assert "max_entry_bytes: 4194304\n" in text
    assert "batch_bytes: 33554432\n" in text


@functools.lru_cache(maxsize=None)
def config_rs_fields() -> dict[str, set[str]]:
    """Raw struct name -> its field names, read from log-shipper/src/config.rs (every one is
    `deny_unknown_fields`, so these are all the names the binary accepts)."""
    text = CONFIG_RS.read_text()
    structs = {}
    for name, body in re.findall(r"struct (Raw\w+) \{(.*?)\n\}", text, re.S):
        structs[name] = set(re.findall(r"^\s+(\w+): ", body, re.M))
    assert {"RawConfig", "RawAdmin", "RawInput", "RawStores", "RawStore", "RawDelivery"} <= set(
        structs
    ), f"config.rs changed shape: found {sorted(structs)}"
    for name in structs:
        denies = rf"#\[serde\([^\]]*deny_unknown_fields[^\]]*\)\]\s*struct {name} "
        assert re.search(denies, text), f"{name} accepts unknown fields?"
    return structs


@pytest.mark.parametrize("case", CASES)
def test_config_fields_are_the_binarys(case: str) -> None:
    """Without the binary too: every key the chart writes is a field config.rs declares."""
    fields = config_rs_fields()
    config = config_of(case)
    assert set(config) <= fields["RawConfig"], set(config) - fields["RawConfig"]
    sections = {
        "admin": "RawAdmin",
        "input": "RawInput",
        "stores": "RawStores",
        "delivery": "RawDelivery",
        "kubernetes": "RawKubernetes",
    }
    for section, struct in sections.items():
        if section in config:
            assert set(config[section]) <= fields[struct], (section, set(config[section]))
    for name in ("seed", "shoot"):
        assert set(config["stores"][name]) <= fields["RawStore"]
    # node_name is left to the NODE_NAME variable, which the downward API fills per node.
    assert set(config["input"]) == fields["RawInput"] - {"node_name"}, "the chart writes every input knob"
    assert set(config["delivery"]) == fields["RawDelivery"], "the chart writes every delivery knob"


def rust_value(expr: str) -> int | str:
    """A DEFAULT_ constant of config.rs: `256 * 1024` -> 262144, `Duration::from_secs(5)` ->
    `5s` (in the config's duration syntax)."""
    expr = expr.strip()
    duration = re.fullmatch(r"Duration::from_(secs|millis)\((\d[\d_]*)\)", expr)
    if duration:
        unit = {"secs": "s", "millis": "ms"}[duration.group(1)]
        number = int(duration.group(2).replace("_", ""))
        if unit == "s" and number % 3600 == 0:
            return f"{number // 3600}h"
        if unit == "s" and number % 60 == 0 and number >= 60:
            return f"{number // 60}m"
        return f"{number}{unit}"
    assert re.fullmatch(r"[\d_]+(\s*\*\s*[\d_]+)*", expr), f"cannot read `{expr}`"
    product = 1
    for factor in expr.split("*"):
        product *= int(factor.strip().replace("_", ""))
    return product


def test_chart_defaults_are_the_binarys_defaults() -> None:
    """The defaults in values.yaml are the binary's (config.rs DEFAULT_*), so the chart writing
    every knob out changes nothing."""
    consts = {
        name: rust_value(expr)
        for name, expr in re.findall(
            r"pub const DEFAULT_(\w+): \w+ = ([^;]+);", CONFIG_RS.read_text()
        )
    }
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pairs = {
        "MAX_ENTRY_BYTES": values["input"]["maxEntryBytes"],
        "PARTIAL_TIMEOUT": values["input"]["partialTimeout"],
        "RESCAN_INTERVAL": values["input"]["rescanInterval"],
        "MAX_OPEN_FILES": values["input"]["maxOpenFiles"],
        "BATCH_BYTES": values["delivery"]["batchBytes"],
        "BATCH_WAIT": values["delivery"]["batchWait"],
        "REQUEST_TIMEOUT": values["delivery"]["requestTimeout"],
        "MIN_BACKOFF": values["delivery"]["minBackoff"],
        "MAX_BACKOFF": values["delivery"]["maxBackoff"],
        "MAX_OUTAGE": values["delivery"]["maxOutage"],
        "SYNC_TIMEOUT": values["lifecycle"]["syncTimeout"],
    }
    assert set(pairs) == set(consts), f"config.rs defaults: {sorted(consts)}"
    for name, chart_value in pairs.items():
        binary = consts[name]
        assert chart_value == binary, f"DEFAULT_{name}: chart {chart_value}, binary {binary}"
    assert values["delivery"]["outagePolicy"] == "wait", "OutagePolicy's #[default] is Wait"


# -- the DaemonSet ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_pod_logs_are_mounted_read_only(case: str) -> None:
    v = values_of(case).get("input", {})
    path = v.get("path", "/var/log/pods")
    mount, volume = volume_of(objects_of(case), path)
    assert mount["readOnly"] is True
    assert volume["hostPath"] == {"path": v.get("hostPath", "/var/log/pods"), "type": "Directory"}
    assert config_of(case)["input"]["path"] == path


@pytest.mark.parametrize("case", CASES)
def test_checkpoints_live_on_the_node(case: str) -> None:
    mount, volume = volume_of(objects_of(case), CHECKPOINT_DIR)
    assert not mount.get("readOnly"), "the agent writes its checkpoints"
    host_path = values_of(case).get("checkpoint", {}).get("hostPath", "/var/lib/log-shipper")
    assert volume["hostPath"] == {"path": host_path, "type": "DirectoryOrCreate"}
    assert config_of(case)["input"]["checkpoint_dir"] == CHECKPOINT_DIR


@pytest.mark.parametrize("case", CASES)
def test_only_these_volumes(case: str) -> None:
    """The node's log directory, the checkpoint directory and the config; nothing else of the
    node (no /var/log/containers, no /var/lib/docker), and no subPath (the kubelet updates a
    directory mount in place)."""
    objs = objects_of(case)
    host_paths = sorted(v["hostPath"]["path"] for v in pod_spec(objs)["volumes"] if "hostPath" in v)
    v = values_of(case)
    assert host_paths == sorted(
        [
            v.get("input", {}).get("hostPath", "/var/log/pods"),
            v.get("checkpoint", {}).get("hostPath", "/var/lib/log-shipper"),
        ]
    )
    mount, volume = volume_of(objs, "/etc/log-shipper")
    assert mount["readOnly"] is True
    assert volume["configMap"] == {"name": RELEASE}
    for mount in container(objs)["volumeMounts"]:
        assert "subPath" not in mount and "subPathExpr" not in mount
    assert len(pod_spec(objs)["volumes"]) == 3


@pytest.mark.parametrize("case", CASES)
def test_command_reads_the_mounted_config(case: str) -> None:
    c = container(objects_of(case))
    assert c["command"] == ["log-shipper"]
    assert c["args"] == ["--config", CONFIG_PATH]


def test_tolerates_every_taint_by_default() -> None:
    assert pod_spec(objects_of("default"))["tolerations"] == [{"operator": "Exists"}]
    assert pod_spec(objects_of("otlp"))["tolerations"] == [
        {
            "key": "node-role.kubernetes.io/control-plane",
            "operator": "Exists",
            "effect": "NoSchedule",
        }
    ]
    assert "tolerations" not in pod_spec(render_objs({"tolerations": []}))


@pytest.mark.parametrize("case", CASES)
def test_container_is_unprivileged_root(case: str) -> None:
    """uid 0 (the log files are root's, mode 0640) with every capability dropped, no privilege
    escalation, a read-only root filesystem and the runtime's seccomp profile."""
    objs = objects_of(case)
    security = container(objs)["securityContext"]
    assert security == {
        "runAsUser": 0,
        "runAsGroup": 0,
        "runAsNonRoot": False,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod = pod_spec(objs)
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod["enableServiceLinks"] is False


@pytest.mark.parametrize("case", CASES)
def test_probes_ask_the_admin_server(case: str) -> None:
    c = container(objects_of(case))
    port = values_of(case).get("admin", {}).get("port", 15093)
    assert c["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    address = config_of(case)["admin"]["address"]
    assert address.endswith(f":{port}")
    assert not address.startswith(("127.", "[::1]")), "the kubelet probes the pod IP"


@pytest.mark.parametrize("case", CASES)
def test_rolls_without_surge(case: str) -> None:
    strategy = daemonset(objects_of(case))["spec"]["updateStrategy"]
    want = values_of(case).get("updateStrategy", {}).get("maxUnavailable", 1)
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": want},
    }


def test_grace_outlasts_the_agents_shutdown() -> None:
    """SIGTERM: the agent flushes and persists within SHUTDOWN_GRACE (run.rs); the kubelet must
    not kill it before."""
    match = re.search(
        r"pub const SHUTDOWN_GRACE: Duration = Duration::from_secs\((\d+)\);", RUN_RS.read_text()
    )
    assert match, "SHUTDOWN_GRACE not found in log-shipper/src/run.rs"
    for case in CASES:
        grace = pod_spec(objects_of(case))["terminationGracePeriodSeconds"]
        assert grace > int(match.group(1)), (case, grace)


@pytest.mark.parametrize("case", CASES)
def test_checksum_of_the_config(case: str) -> None:
    objs = objects_of(case)
    annotations = daemonset(objs)["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])


def test_checksum_follows_only_the_config() -> None:
    """A config change changes the pod template (a rollout); other values leave the checksum."""
    def checksum(values: dict[str, Any]) -> str:
        return daemonset(render_objs(values))["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]

    base = checksum({})
    assert checksum({"delivery": {"outagePolicy": "skip"}}) != base
    assert checksum({"stores": {"seed": {"tenant": "garden"}}}) != base
    assert checksum({"lifecycle": {"enabled": False}}) != base
    assert checksum({"resources": {"limits": {"memory": "1Gi"}}, "podLabels": {"a": "b"}}) == base


@pytest.mark.parametrize("case", CASES)
def test_prometheus_annotations_and_metrics_service(case: str) -> None:
    objs = objects_of(case)
    port = values_of(case).get("admin", {}).get("port", 15093)
    annotations = daemonset(objs)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    services = [o for o in objs if o["kind"] == "Service"]
    if not values_of(case).get("metrics", {}).get("service", {}).get("enabled", True):
        assert not services
        return
    service = one(objs, "Service", RELEASE)["spec"]
    assert service["clusterIP"] == "None"
    assert service["selector"] == daemonset(objs)["spec"]["selector"]["matchLabels"]
    assert service["ports"] == [
        {"name": "metrics", "protocol": "TCP", "port": port, "targetPort": "metrics"}
    ]


@pytest.mark.parametrize("case", CASES)
def test_rbac_only_with_the_lifecycle(case: str) -> None:
    """With the lifecycle: get, list and watch on clusters.extensions.gardener.cloud, bound to
    the pods' ServiceAccount, whose token is mounted. Without: no RBAC and no token."""
    objs = objects_of(case)
    pod = pod_spec(objs)
    rbac_kinds = ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    roles = [o for o in objs if o["kind"] in rbac_kinds]
    if not lifecycle_on(case):
        assert roles == []
        assert pod["automountServiceAccountToken"] is False
        return
    assert pod["automountServiceAccountToken"] is True
    role = one(objs, "ClusterRole")
    assert role["rules"] == [
        {
            "apiGroups": ["extensions.gardener.cloud"],
            "resources": ["clusters"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}
    ]
    account = one(objs, "ServiceAccount")
    assert account["metadata"]["name"] == pod["serviceAccountName"]
    assert account["automountServiceAccountToken"] is False, "the pod spec decides"


def test_rbac_create_false_keeps_the_lifecycle() -> None:
    objs = render_objs({"rbac": {"create": False}})
    assert not [o for o in objs if o["kind"].startswith("ClusterRole")]
    assert config_of(objs)["kubernetes"] == {"sync_timeout": "2m"}
    assert pod_spec(objs)["automountServiceAccountToken"] is True
    notes = render({"rbac": {"create": False}})[f"{RELEASE}/templates/NOTES.txt"]
    assert "grant ServiceAccount log-shipper get, list and watch on clusters" in notes


def test_priority_class_and_labels() -> None:
    assert "priorityClassName" not in pod_spec(objects_of("default"))
    pod = pod_spec(objects_of("gardener"))
    assert pod["priorityClassName"] == "gardener-system-900"
    labels = daemonset(objects_of("gardener"))["spec"]["template"]["metadata"]["labels"]
    assert labels["networking.gardener.cloud/to-dns"] == "allowed"
    assert labels["networking.gardener.cloud/to-runtime-apiserver"] == "allowed"


def test_resources() -> None:
    assert container(objects_of("default"))["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"memory": "512Mi"},
    }
    # null removes a default map (Helm's rule); an empty map would merge with it.
    assert "resources" not in container(
        render_objs({"resources": {"requests": None, "limits": None}})
    )


def test_environment() -> None:
    node = {"valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    env = {e["name"]: e.get("value", e) for e in container(objects_of("default"))["env"]}
    assert env == {"NODE_NAME": {"name": "NODE_NAME", **node}, "LOG_FORMAT": "json", "RUST_LOG": "info",
                   "TOKIO_WORKER_THREADS": "2"}
    env = {e["name"]: e.get("value", e) for e in container(objects_of("otlp"))["env"]}
    assert env == {"NODE_NAME": {"name": "NODE_NAME", **node}, "LOG_FORMAT": "text",
                   "RUST_LOG": "log_shipper=debug,info"}


def test_image_defaults_to_app_version() -> None:
    with helm.Chart.load(CHART) as chart:
        app_version = chart.metadata["appVersion"]
    assert container(objects_of("default"))["image"] == f"log-shipper:{app_version}"
    assert container(objects_of("gardener"))["image"] == (
        "europe-docker.pkg.dev/gardener-project/releases/log-shipper:0.1.0"
    )
    assert container(objects_of("otlp"))["image"] == (
        "registry.example/log-shipper@sha256:" + "0123456789abcdef" * 4
    )


def test_options_off() -> None:
    values = {
        "serviceAccount": {"create": False},
        "lifecycle": {"enabled": False},
        "metrics": {"scrapeAnnotations": False, "service": {"enabled": False}},
    }
    objs = render_objs(values)
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "DaemonSet"]
    assert pod_spec(objs)["serviceAccountName"] == "default"
    annotations = daemonset(objs)["spec"]["template"]["metadata"]["annotations"]
    assert list(annotations) == ["checksum/config"]
    for obj in objs:
        kubernetes_validate.validate(chartkit.without_marker(obj), KUBE_VERSIONS[0], strict=True)


# -- bad values fail the render, naming the field --------------------------------------------------


def test_bad_protocol_file_is_refused() -> None:
    message = render_error(chartkit.load_values(BAD_PROTOCOL))
    assert "/stores/shoot/protocol" in message, message


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"stores": {"seed": {"protocol": "vali"}}}, "/stores/seed/protocol"),
        ({"stores": {"shoot": {"protocol": "otlp", "tenant": "x"}}}, "/stores/shoot/tenant"),
        ({"stores": {"seed": {"url": "logging.garden.svc:3100"}}}, "/stores/seed/url"),
        ({"stores": {"seed": {"url": "http://logging.{namespace}/push"}}}, "/stores/seed/url"),
        ({"stores": {"seed": {"tenant": "a|b"}}}, "/stores/seed/tenant"),
        ({"stores": {"shoot": {"colour": "blue"}}}, "colour"),
        ({"input": {"path": "var/log/pods"}}, "/input/path"),
        ({"input": {"maxEntryBytes": 10}}, "/input/maxEntryBytes"),
        ({"input": {"partialTimeout": "5"}}, "/input/partialTimeout"),
        ({"delivery": {"maxOutage": "0s"}}, "/delivery/maxOutage"),
        ({"delivery": {"outagePolicy": "drop"}}, "/delivery/outagePolicy"),
        ({"delivery": {"batchBytes": 134217728}}, "/delivery/batchBytes"),
        ({"admin": {"host": "localhost"}}, "/admin/host"),
        ({"admin": {"port": 70000}}, "/admin/port"),
        ({"updateStrategy": {"maxUnavailable": 0}}, "/updateStrategy/maxUnavailable"),
        ({"updateStrategy": {"maxSurge": 1}}, "maxSurge"),
        ({"lifecycle": {"enabled": "yes"}}, "/lifecycle/enabled"),
        ({"checkpoint": {"hostPath": "log-shipper"}}, "/checkpoint/hostPath"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], named: str) -> None:
    message = render_error(values)
    assert f"'{named}'" in message or named in message, message


def test_template_checks() -> None:
    message = render_error({"admin": {"host": "127.0.0.1"}})
    assert "admin.host: 127.0.0.1 is a loopback address" in message
    assert "admin.host: ::1 is a loopback address" in render_error({"admin": {"host": "::1"}})
    message = render_error({"input": {"maxEntryBytes": 2097152}})
    assert "delivery.batchBytes (1048576) must be at least input.maxEntryBytes (2097152)" in message
    message = render_error({"updateStrategy": {"maxUnavailable": "0%"}})
    assert "updateStrategy.maxUnavailable must not be 0%" in message
    for path, other in [
        ("/var/lib/log-shipper", "/var/lib/log-shipper"),
        ("/var/lib", "/var/lib/log-shipper"),
        ("/etc/log-shipper/pods/", "/etc/log-shipper"),
        ("/", "/var/lib/log-shipper"),
    ]:
        message = render_error({"input": {"path": path}})
        assert f"input.path ({path}) must not be {other}, inside it or above it" in message
    assert render_objs({"input": {"path": "/var/lib/log-shipper-pods"}})


# -- documentation -------------------------------------------------------------------------------


# Maps in values.yaml whose keys are free-form (documented as a whole).
FREE_FORM_MAPS: set[str] = set()


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


# -- the real binary: the rendered config passes `log-shipper --check` ----------------------------


def log_shipper_binary() -> Path:
    configured = os.environ.get("LOG_SHIPPER_BIN")
    if not configured:
        pytest.skip(
            "!!! SKIPPED: the rendered config was NOT checked by log-shipper --check: "
            "LOG_SHIPPER_BIN is not set (build log-shipper and point it at the binary)"
        )
    binary = Path(configured)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"LOG_SHIPPER_BIN={configured} is not an executable file", pytrace=False)
    return binary


def run_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """`log-shipper --config F --check` on the rendered config, written to tmp_path."""
    binary = log_shipper_binary()
    path = tmp_path / "config.yaml"
    path.write_text(text)
    try:
        return subprocess.run(
            [str(binary), "--config", str(path), "--check"],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_SECONDS,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LOG_FORMAT": "text"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{binary} --check did not exit within {CHECK_TIMEOUT_SECONDS}s", pytrace=False)


def describe(result: subprocess.CompletedProcess[str], text: str) -> str:
    return (
        f"exit: {result.returncode}\nstderr:\n{result.stderr}\nstdout:\n{result.stdout}\n"
        f"config:\n{text}"
    )


@pytest.mark.parametrize("case", CASES)
def test_rendered_config_passes_check(case: str, tmp_path: Path) -> None:
    text = config_text(objects_of(case))
    result = run_check(tmp_path, text)
    assert result.returncode == 0, f"{case}: --check rejected the chart's config\n" + describe(
        result, text
    )
    lifecycle = "from Cluster resources" if lifecycle_on(case) else "every shoot ready"
    assert f"lifecycle {lifecycle}" in result.stdout, describe(result, text)


HTTPS_STORES = {
    "stores": {
        "seed": {
            "url": "https://loki.logging.svc/loki/api/v1/push",
            "tls": {"secretName": "seed-store-mtls", "clientCertificate": True},
        },
        "shoot": {
            "url": "https://logging.{namespace}.svc:3100/vali/api/v1/push",
            "tls": {"secretName": "shoot-store-ca"},
        },
    }
}


def test_https_stores_get_their_secrets_mounted_and_named_in_the_config(tmp_path: Path) -> None:
    objs = render_objs(HTTPS_STORES)
    stores = config_of(objs)["stores"]
    seed, shoot = "/etc/log-shipper/tls/seed", "/etc/log-shipper/tls/shoot"
    assert (stores["seed"]["ca"], stores["seed"]["cert"], stores["seed"]["key"]) == (
        f"{seed}/ca.crt",
        f"{seed}/tls.crt",
        f"{seed}/tls.key",
    )
    assert stores["shoot"]["ca"] == f"{shoot}/ca.crt"
    assert "cert" not in stores["shoot"] and "key" not in stores["shoot"]
    for path, secret in ((seed, "seed-store-mtls"), (shoot, "shoot-store-ca")):
        mount, volume = volume_of(objs, path)
        assert mount["readOnly"] is True
        assert volume["secret"] == {"secretName": secret}
    for obj in objs:
        kubernetes_validate.validate(chartkit.without_marker(obj), KUBE_VERSIONS[0], strict=True)
    text = config_text(objs)
    result = run_check(tmp_path, text)
    assert result.returncode == 0, "--check rejected https stores\n" + describe(result, text)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"stores": {"seed": {"url": "https://loki/push"}}}, "stores.seed.tls.secretName"),
        (
            {"stores": {"shoot": {"tls": {"secretName": "x"}}}},
            "stores.shoot.tls.secretName: TLS settings are for an https URL only",
        ),
        ({"stores": {"seed": {"tls": {"secretName": "Not_A_Name"}}}}, "/stores/seed/tls/secretName"),
    ],
)
def test_tls_settings_fit_the_url(values: dict[str, Any], named: str) -> None:
    message = render_error(values)
    assert named in message, message


def test_shared_shoot_store_is_rejected_by_check(tmp_path: Path) -> None:
    text = config_text(chartkit.manifests_of(render(chartkit.load_values(SHARED_SHOOT_STORE))))
    assert "{namespace}" not in text
    result = run_check(tmp_path, text)
    assert result.returncode != 0, "--check accepted one store for every shoot\n" + describe(
        result, text
    )
    assert "stores.shoot.url" in result.stderr, "--check did not name the field\n" + describe(
        result, text
    )
