"""Deployment rendering: the project's own specs as cluster manifests, on Ray's public APIs only.

`cluster` holds the cluster's shape (`ClusterSpec`: images, pod sizes, node-local cache, VM types); `specs` turns the
serve and job specs into what a cluster runs (GPUs decided up front, credentials refused); `serve_config` is Ray
Serve's config file for the endpoint, checked against Serve's public schema; `sizing` maps replicas to worker groups;
`kuberay` and `vm` render the KubeRay objects and Ray's cluster-launcher config. Autoscaling numbers, per-replica
resources and model settings come from `ServeSpec`, `JobSpec` and the schedules file. Every function returns plain
dicts, so tests can hold each manifest against the spec it was rendered from.

The endpoint's spec (`serving.spec.ServeSpec`) reaches this package from the command line, the composition root:
rendering reads its fields and never imports `serving`.
"""
