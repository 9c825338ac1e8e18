"""The stages of a batch job, one module each: Prepare (CPU tasks), Generate (an actor pool, one model replica per
actor) and Write (Parquet parts through the output directory, called by each Generate actor for its own batches: the
Ray Data graph has two operators). `base` holds what each declares and the one function that maps it to
map_batches."""

from pipelines.stages.base import Stage, StageResources, map_batches, require_columns
from pipelines.stages.generate import Generate
from pipelines.stages.prepare import Prepare
from pipelines.stages.write import Write

__all__ = ["Generate", "Prepare", "Stage", "StageResources", "Write", "map_batches", "require_columns"]
