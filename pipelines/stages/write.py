"""Write: generated rows -> Parquet parts through the output directory, and the small stats row the driver reads.

Runs inside the model actor (`Generate` calls it in a thread, off the replica's event loop) rather than as a Ray
Data operator of its own: the generated rows never travel as blocks to another task, and the driver tracks one
operator fewer. Each Ray Data task and block costs the driver memory (block metadata, schemas, allocator arenas),
so a job of millions of objects keeps its driver small by handing it one stats row per model batch.
"""

from __future__ import annotations

import numpy as np

from pipelines.output import OutputDir
from pipelines.replica import REPLICA_STATS
from pipelines.stages.base import Stage, require_columns

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
    """result/error rows -> Parquet part files under results/ and errors/; returns one stats row.

    Rows of one audio window go to the staging folder instead, to be stitched into their clip's row after the run.
    A part's name is a hash of its rows' ids (`OutputDir.write_generated`): a batch retried on a replacement actor
    replaces its own parts instead of adding duplicates.
    """

    name = "write"
    needs = ("id", "error", "window_total")
    produces = STATS_COLUMNS[:-1]

    def __init__(self, output_url: str, storage_options: dict) -> None:
        self.out = OutputDir(output_url, storage_options)

    def __call__(self, table) -> dict:
        import pyarrow.compute as pc

        require_columns(table.column_names, self.needs, self.name)
        succeeded, failed = self.out.write_generated(table)
        generated = table.filter(pc.is_null(table.column("error")))  # windows included: their tokens were made now

        def total(column: str) -> int:
            return int(pc.sum(generated.column(column)).as_py() or 0)

        return {
            "succeeded": np.array([succeeded]),
            "failed": np.array([failed]),
            "output_tokens": np.array([total("output_tokens")]),
            "prompt_tokens": np.array([total("prompt_tokens")]),
            "spec_drafted": np.array([total("spec_drafted")]),
            "spec_accepted": np.array([total("spec_accepted")]),
        }
