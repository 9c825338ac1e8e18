"""What every stage declares, and the one place that turns it into Ray Data's map_batches arguments.

A stage is a small spec plus a runtime (the pattern of Ray's batch stages): class attributes say which columns it
needs and produces, `resources(job)` says what it runs on, heavy state loads once per worker in `__init__`, and
`__call__(batch)` stays cheap. A bad unit never raises out of a stage: it becomes a row with `error` set.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class StageResources:
    """What one stage asks of Ray. `actors` set: an actor pool of that size; otherwise stateless CPU tasks."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_bytes: int | None = None
    custom: dict = field(default_factory=dict)  # extra Ray resources, e.g. {"accelerator_type:H100": 0.01}
    batch_size: int | None = None  # None: whole blocks
    batch_format: str = "default"
    tasks: int | None = None  # at most this many CPU tasks at once (None: Ray Data decides)
    actors: int | None = None
    concurrent_batches: int = 1  # batches in flight per actor (its __call__ is async)
    max_restarts: int | None = None  # an actor that dies is replaced this many times, its batches retried


class Stage:
    name: str = "stage"
    needs: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()

    @classmethod
    def resources(cls, job) -> StageResources:
        return StageResources()


def require_columns(batch, needs: tuple[str, ...], stage: str) -> None:
    """Fail with the stage's name and the missing columns (a wiring error, never an item error)."""
    missing = [k for k in needs if k not in batch]
    if missing:
        raise KeyError(f"stage {stage} needs columns {missing}; got {sorted(batch)}")


def map_batches(dataset, fn, resources: StageResources, **kwargs):
    """`dataset.map_batches` for a stage: its declared resources become Ray Data's arguments, here only."""
    import ray.data

    args = {
        "batch_size": resources.batch_size,
        "batch_format": resources.batch_format,
        "num_cpus": resources.num_cpus,
        **kwargs,
    }
    if resources.num_gpus:
        args["num_gpus"] = resources.num_gpus
    if resources.memory_bytes:
        args["memory"] = resources.memory_bytes
    if resources.custom:
        args["resources"] = dict(resources.custom)
    if resources.actors:
        args["compute"] = ray.data.ActorPoolStrategy(
            size=resources.actors, max_tasks_in_flight_per_actor=resources.concurrent_batches
        )
        args["max_concurrency"] = resources.concurrent_batches
        if resources.max_restarts is not None:
            args["max_restarts"] = resources.max_restarts
    elif resources.tasks:
        args["compute"] = ray.data.TaskPoolStrategy(size=resources.tasks)
    with warnings.catch_warnings():
        # Ray 2.60 sets an actor's max_restarts and max_concurrency only through map_batches' extra remote args,
        # which it reports as deprecated (removed in 2.64: pyproject.toml bounds Ray below it).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        return dataset.map_batches(fn, **args)


def scalar(value):
    """A numpy batch cell as a plain Python value; all-null Arrow columns arrive as NaN, which means None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def window_total(row: dict) -> int | None:
    value = row.get("window_total")
    return None if value is None else int(value)
