"""What both chart test files need: render a chart in-process (helm-python-sdk: Helm's Go SDK as
a shared library inside the wheel, no helm binary), read its objects, lint it, and check every
object against the Kubernetes OpenAPI schemas of kubernetes-validate (strict: unknown fields are
errors).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

# The key under which each object remembers the template it came from (not sent to Kubernetes).
MARKER = "__template__"


def load_values(path: Path | None) -> dict[str, Any] | None:
    """Values as `helm -f FILE` reads them (Helm's own YAML 1.1 parser, not PyYAML)."""
    if path is None:
        return None
    return helm.values_from_yaml(path.read_text())


def render(chart_dir: Path, values: dict[str, Any] | None, release: str, namespace: str) -> dict[str, str]:
    """Template path -> rendered text, like `helm template`."""
    with helm.Chart.load(chart_dir) as chart:
        return chart.render(values, name=release, namespace=namespace, is_install=True)


def manifests_of(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects of a render (NOTES.txt and empty templates left out), each with
    its template's path under MARKER."""
    objects = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault(MARKER, path)
                objects.append(doc)
    return objects


def without_marker(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != MARKER}


def assert_lint_clean(chart_dir: Path, cases: dict[str, Path | None], namespace: str) -> None:
    """`helm lint --strict` finds no warning or error for any values file of `cases`."""
    for case, path in cases.items():
        report = helm.lint(chart_dir, load_values(path), strict=True, namespace=namespace)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, f"{case}: helm lint --strict: {problems}"


def assert_valid(objects: list[dict[str, Any]], kube_version: str, case: str) -> None:
    """Every object passes Kubernetes `kube_version`'s schema, strictly; fails naming the
    template, the kind and the field."""
    for obj in objects:
        where = f"{obj[MARKER]} ({obj['kind']}) against Kubernetes {kube_version}"
        try:
            kubernetes_validate.validate(without_marker(obj), kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{case}: {where}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(f"{case}: {where}: {error.message}")


def leaf_value_paths(chart_dir: Path, free_form_maps: set[str]) -> list[str]:
    """Dotted paths of every leaf in a chart's values.yaml (lists, empty maps and the free-form
    maps named count as leaves)."""
    paths = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node and prefix not in free_form_maps:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            paths.append(prefix)

    walk("", yaml.safe_load((chart_dir / "values.yaml").read_text()))
    return paths


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of `kind` (and `name`) among `objs`."""
    found = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


class Chart:
    """One chart as its tests use it: rendered like `helm template` in a release and namespace,
    each values case rendered once per session (tests only read the objects)."""

    def __init__(self, chart_dir: Path, release: str, namespace: str, cases: dict[str, Path | None]):
        self.chart_dir = chart_dir
        self.release = release
        self.namespace = namespace
        self.cases = cases
        self._rendered: dict[str, tuple[dict[str, Any], ...]] = {}

    def render(self, values: dict[str, Any] | None, namespace: str | None = None) -> dict[str, str]:
        """Template path -> rendered text."""
        return render(self.chart_dir, values, self.release, namespace or self.namespace)

    def objects_of(self, case: str) -> list[dict[str, Any]]:
        """The objects of a values case."""
        if case not in self._rendered:
            self._rendered[case] = tuple(manifests_of(self.render(load_values(self.cases[case]))))
        return list(self._rendered[case])

    def values_of(self, case: str) -> dict[str, Any]:
        return load_values(self.cases[case]) or {}

    def render_objs(self, values: dict[str, Any]) -> list[dict[str, Any]]:
        return manifests_of(self.render(values))

    def render_error(self, values: dict[str, Any] | None) -> str:
        """The error of a render that must fail."""
        with pytest.raises(helm.HelmError) as caught:
            self.render(values)
        return str(caught.value)


def values_missing_from_readme(chart_dir: Path, free_form_maps: set[str]) -> list[str]:
    """Leaf value paths (see leaf_value_paths) that README.md does not name in backquotes."""
    readme = (chart_dir / "README.md").read_text()
    return [p for p in leaf_value_paths(chart_dir, free_form_maps) if f"`{p}`" not in readme]


def values_unknown_to_schema(chart_dir: Path) -> list[str]:
    """Keys of values.yaml that values.schema.json does not declare where it declares the
    keys of their map: values the chart's own schema would refuse."""
    schema = json.loads((chart_dir / "values.schema.json").read_text())
    unknown: list[str] = []

    def walk(path: str, node: Any, sch: dict[str, Any]) -> None:
        if not isinstance(node, dict) or "properties" not in sch:
            return
        for key, value in node.items():
            if key not in sch["properties"]:
                unknown.append(f"{path}{key}")
            else:
                walk(f"{path}{key}.", value, sch["properties"][key])

    walk("", yaml.safe_load((chart_dir / "values.yaml").read_text()), schema)
    return unknown


def undocumented_values(chart_dir: Path) -> list[str]:
    """Keys with a value in values.yaml without their own comment line right above them (keys
    inside list items are documented by the comment above the list)."""
    undocumented = []
    previous = ""
    in_list_item_indent = None
    for number, line in enumerate((chart_dir / "values.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("- "):
            in_list_item_indent = indent
        elif (
            stripped
            and not stripped.startswith("#")
            and (in_list_item_indent is not None and indent <= in_list_item_indent)
        ):
            in_list_item_indent = None
        match = re.match(r"^\s*([A-Za-z][\w.-]*):(\s+\S.*)?$", line)
        is_leaf = match and match.group(2) and not match.group(2).strip().startswith("#")
        if is_leaf and in_list_item_indent is None and not previous.startswith("#"):
            undocumented.append(f"values.yaml:{number}: {stripped}")
        if stripped:
            previous = stripped
    return undocumented
