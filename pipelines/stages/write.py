"""Write: generated rows -> Parquet parts through the output directory; small stats rows for the driver."""

from __future__ import annotations

import json

import numpy as np

from pipelines.output import OutputDir
from pipelines.replica import REPLICA_STATS
from pipelines.stages.base import Stage, StageResources, require_columns

STATS_COLUMNS = (
    "succeeded",
    "failed",
    "output_tokens",
    "prompt_tokens",
    "spec_drafted",
    "spec_accepted",
    REPLICA_STATS,
)


class Write(Stage):
    """result/error rows -> Parquet part files under results/ and errors/; returns small stats rows.

    Rows of one audio window go to the staging folder instead, to be stitched into their clip's row after the run.
    """

    name = "write"
    needs = ("id", "error", "window_total")
    produces = STATS_COLUMNS

    @classmethod
    def resources(cls, job=None) -> StageResources:
        return StageResources(num_cpus=0.25, batch_format="pyarrow")

    def __init__(self, output_url: str, storage_options: dict) -> None:
        self.output_url = output_url
        self.storage_options = storage_options

    def __call__(self, table):
        import pyarrow.compute as pc

        require_columns(table.column_names, self.needs, self.name)
        succeeded, failed = OutputDir(self.output_url, self.storage_options).write_generated(table)
        generated = table.filter(pc.is_null(table.column("error")))  # windows included: their tokens were made now

        def total(column: str) -> int:
            return int(pc.sum(generated.column(column)).as_py() or 0)

        replica_stats = []
        if REPLICA_STATS in table.column_names:
            replica_stats = [json.loads(v) for v in pc.unique(table.column(REPLICA_STATS)).to_pylist() if v]

        return {
            "succeeded": np.array([succeeded]),
            "failed": np.array([failed]),
            "output_tokens": np.array([total("output_tokens")]),
            "prompt_tokens": np.array([total("prompt_tokens")]),
            "spec_drafted": np.array([total("spec_drafted")]),
            "spec_accepted": np.array([total("spec_accepted")]),
            REPLICA_STATS: np.array([json.dumps(replica_stats)]),
        }
