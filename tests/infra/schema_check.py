"""Strict structural checks of manifests: KubeRay kinds against CRD schemas kept as test data, core kinds against the
`kubernetes` client's models. Unlike an API server, which silently drops unknown fields, both report them."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import yaml

CRDS = Path(__file__).parent / "data" / "crds"
_INT32 = (-(2**31), 2**31 - 1)
_LIST = re.compile(r"^list\[(.+)\]$")
_DICT = re.compile(r"^dict\[([^,]+), (.+)\]$")
_PRIMITIVES = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
    "object": (object,),
}


@cache
def crd_schema(file_name: str, version: str = "v1") -> dict:
    crd = yaml.safe_load((CRDS / file_name).read_text())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(f"{file_name} has no version {version}")


def subschema(schema: dict, *names: str) -> dict:
    for name in names:
        schema = schema["properties"][name]
    return schema


def k8s_errors(value, type_name: str, path: str = "") -> list[str]:
    """`value` against a kubernetes-client model type (V1CronJob, list[V1Container], dict[str, str], ...)."""
    from kubernetes import client

    if match := _LIST.match(type_name):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(value) for e in k8s_errors(item, match.group(1), f"{path}[{i}]")]
    if match := _DICT.match(type_name):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        return [e for k, item in value.items() for e in k8s_errors(item, match.group(2), f"{path}.{k}")]
    if type_name in _PRIMITIVES:
        wrong_bool = isinstance(value, bool) and type_name in ("int", "float")
        ok = isinstance(value, _PRIMITIVES[type_name]) and not wrong_bool
        return [] if ok else [f"{path}: expected {type_name}, got {type(value).__name__}"]
    model = getattr(client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping"]
    attributes = {json_name: attr for attr, json_name in model.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in attributes:
            errors.append(f"{path}.{key}: not a field of {type_name}")
        else:
            errors.extend(k8s_errors(item, model.openapi_types[attributes[key]], f"{path}.{key}"))
    if not errors:
        try:  # the models' constructors enforce required fields and enumerations
            client.ApiClient()._ApiClient__deserialize(value, type_name)
        except ValueError as exc:
            errors.append(f"{path}: {type_name}: {exc}")
    return errors


def crd_errors(value, schema: dict, path: str = "") -> list[str]:
    """`value` against an openAPIV3Schema node; `x-trimmed` marks nodes whose fields were not all kept."""
    if "x-validate-as" in schema:
        return k8s_errors(value, schema["x-validate-as"], path)
    if "anyOf" in schema or schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected an integer or a string"]
    kind = schema.get("type")
    if kind == "object":
        return _object_errors(value, schema, path)
    if kind == "array":
        if not isinstance(value, list):
            return [f"{path}: expected an array"]
        items = schema.get("items", {})
        return [e for i, item in enumerate(value) for e in crd_errors(item, items, f"{path}[{i}]")]
    if kind == "string":
        if not isinstance(value, str):
            return [f"{path}: expected a string, got {type(value).__name__}"]
        if "enum" in schema and value not in schema["enum"]:
            return [f"{path}: {value!r} is not one of {schema['enum']}"]
        return []
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{path}: expected an integer, got {type(value).__name__}"]
        low, high = _INT32 if schema.get("format") == "int32" else (float("-inf"), float("inf"))
        low = max(low, schema.get("minimum", low))
        if not low <= value <= high:
            return [f"{path}: {value} is out of range"]
        return []
    if kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected a number"]
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{path}: expected a boolean"]
    return []


def _object_errors(value, schema: dict, path: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{path}: expected an object, got {type(value).__name__}"]
    properties = schema.get("properties")
    extra = schema.get("additionalProperties")
    open_ended = schema.get("x-trimmed") or schema.get("x-kubernetes-preserve-unknown-fields")
    errors = [f"{path}.{name}: required" for name in schema.get("required", []) if name not in value]
    for key, item in value.items():
        if properties and key in properties:
            errors.extend(crd_errors(item, properties[key], f"{path}.{key}"))
        elif isinstance(extra, dict):
            errors.extend(crd_errors(item, extra, f"{path}.{key}"))
        elif properties is not None and not open_ended:
            errors.append(f"{path}.{key}: not a field in this CRD version")
    return errors


# The manifest kinds this project renders, and how each is checked.
CORE_MODELS = {
    ("v1", "Secret"): "V1Secret",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("batch/v1", "CronJob"): "V1CronJob",
}
RAY_SPECS = {
    # kind -> [(CRD file, path to the spec's schema)], every one must accept the spec
    "RayJob": [("ray.io_raycronjobs.yaml", ("spec", "jobTemplate"))],
    "RayCluster": [("ray.io_raycronjobs.yaml", ("spec", "jobTemplate", "rayClusterSpec"))],
    "RayService": [("ray.io_rayservices.yaml", ("spec",))],
}


def manifest_errors(document: dict) -> list[str]:
    key = (document.get("apiVersion"), document.get("kind"))
    if key in CORE_MODELS:
        return k8s_errors(document, CORE_MODELS[key], document["kind"])
    if key[0] != "ray.io/v1" or key[1] not in RAY_SPECS:
        return [f"{key}: not a kind this project renders"]
    name = document["kind"]
    unknown = sorted(set(document) - {"apiVersion", "kind", "metadata", "spec"})
    errors = [f"{name}.{k}: unexpected top-level field" for k in unknown]
    errors += k8s_errors(document.get("metadata"), "V1ObjectMeta", f"{name}.metadata")
    for file_name, names in RAY_SPECS[name]:
        schema = subschema(crd_schema(file_name), *names)
        errors += [f"[{file_name}] {e}" for e in crd_errors(document.get("spec"), schema, f"{name}.spec")]
    if name == "RayService":
        cluster_schema = subschema(crd_schema("ray.io_raycronjobs.yaml"), "spec", "jobTemplate", "rayClusterSpec")
        cluster = document.get("spec", {}).get("rayClusterConfig")
        errors += [
            f"[ray.io_raycronjobs.yaml] {e}"
            for e in crd_errors(cluster, cluster_schema, f"{name}.spec.rayClusterConfig")
        ]
    return errors
