"""Join a Ray cluster or start a local one: the one way every command gets Ray."""

from __future__ import annotations

import logging

from pipelines.environment import forwarded_env
from pipelines.errors import ClusterError
from pipelines.preflight import check_cluster, cluster_address

logger = logging.getLogger(__name__)


def connect(address: str | None = None, *, num_cpus: int | None = None, object_store_bytes: int | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) after checking it answers, else start a local instance; no-op if Ray is up.

    On a cluster, workers get the forwarded environment (storage credentials, hub settings) through the job's runtime
    env. A local instance's processes inherit this process's environment already, so it sets no runtime env: Ray
    starts a few idle workers with the instance, and a job with a runtime env of its own could not use them (each
    of its workers would be a new process, seconds of CPU on a small machine)."""
    import ray

    if ray.is_initialized():
        return
    # Ray's own start-up lines (token auth, "Started a local Ray instance") only when our loggers are verbose.
    ray_logging = logging.INFO if logger.isEnabledFor(logging.INFO) else logging.ERROR
    address = cluster_address(address)
    if address:
        check_cluster(address)
        logger.info("joining the Ray cluster at %s", address)
        runtime_env = {"env_vars": forwarded_env()}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level=ray_logging)
        return
    logger.info("starting a local Ray instance (%s CPUs)", num_cpus or "all")
    try:
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=object_store_bytes,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=ray_logging,
        )
    except (RuntimeError, OSError, ValueError, TimeoutError) as exc:  # ray.init's own failures, e.g. its start timeout
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(
            f"cannot start a local Ray instance: {first_line}. Try again on a less loaded machine, free memory for "
            f"the object store (resources.object_store_mb), or join a running cluster (--address or RAY_ADDRESS)"
        ) from exc
