"""The cluster-launcher config passes Ray's own checks (what `ray up` runs before it touches a cloud) and has the
same node types and bounds as the KubeRay manifests."""

from __future__ import annotations

import copy

import yaml


def test_ray_accepts_the_launcher_config(rendered):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(rendered["vm/cluster.yaml"])
    validate_config(prepare_config(copy.deepcopy(config)))  # jsonschema against ray-schema.json, plus Ray's rules


def test_vm_node_types_mirror_the_kuberay_groups(rendered, manifests, cluster):
    config = yaml.safe_load(rendered["vm/cluster.yaml"])
    nodes = config["available_node_types"]
    assert config["head_node_type"] == "head" and nodes["head"]["resources"] == {"CPU": 0}
    service = manifests["RayService"]["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in service["workerGroupSpecs"]}
    assert set(nodes) == {"head", *groups}
    for name, group in groups.items():
        assert nodes[name]["resources"]["CPU"] == int(group["rayStartParams"]["num-cpus"])
        assert nodes[name]["min_workers"] == group["minReplicas"]  # the endpoint's floor
        assert nodes[name]["max_workers"] >= group["maxReplicas"]  # room for batch jobs too
    job_groups = manifests["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    job_gpu = next(g for g in job_groups if g["groupName"] == "gpu")
    assert nodes["gpu"]["max_workers"] >= job_gpu["maxReplicas"]
    assert nodes["gpu"]["docker"]["worker_image"] == cluster.gpu_image
    assert config["docker"]["image"] == cluster.image
    assert config["max_workers"] == sum(n.get("max_workers", 0) for n in nodes.values())


def test_vm_processes_get_credentials_from_a_file_outside_the_repository(rendered):
    from jobs.deploy.vm import LOCAL_ENV_FILE, VM_ENV_FILE

    config = yaml.safe_load(rendered["vm/cluster.yaml"])
    assert config["file_mounts"][VM_ENV_FILE] == LOCAL_ENV_FILE and LOCAL_ENV_FILE.startswith("~/")
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert command.startswith(f"set -a && . {VM_ENV_FILE} && set +a")
    assert "REPLACE_ME" in rendered["vm/storage.env.example"]
