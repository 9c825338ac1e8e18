"""A job's listing as Parquet pages under the output: written by the driver one page at a time, read back by Ray
Data tasks one page each (a listing of one page goes to Ray Data from the driver).

The pages are read by plain tasks rather than `ray.data.read_parquet`: its reader starts a pool of footer-reading
actors, each a new worker process, and on a small machine those processes take seconds of CPU just when the model
replicas are starting. The pages need none of what the footers offer (pruning, statistics): their paths are known.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.output import OutputDir

LISTING_PAGE = 2_000  # rows per page: the driver holds one page at a time
LISTING_COLUMNS = {"id": "string", "uri": "string", "container": "string"}
# A batch file's listing row is one line: its byte range, read by the prepare task that takes it.
BATCH_LISTING_COLUMNS = {**LISTING_COLUMNS, "offset": "int64", "length": "int64", "line": "int64"}


def listing_folder(out: OutputDir, run_id: str) -> str:
    return out.path("_work", f"listing-{run_id}")


def write_listing(out: OutputDir, run_id: str, rows, schema: dict[str, str]) -> tuple[list[str], int]:
    """Stream listing rows to Parquet pages, holding one page in memory at a time. Returns the pages' paths and the
    number of rows (at least one page, so an empty listing is an empty dataset with the schema)."""
    folder = listing_folder(out, run_id)
    out.fs.makedirs(folder, exist_ok=True)
    columns: dict[str, list] = {name: [] for name in schema}  # one page, as columns: no dict per row
    pages: list[str] = []
    listed = 0

    def flush() -> None:
        nonlocal listed
        table = pa.table({name: pa.array(values, pa.type_for_alias(schema[name])) for name, values in columns.items()})
        path = f"{folder}/page-{len(pages):06d}.parquet"
        with out.fs.open(path, "wb") as handle:
            pq.write_table(table, handle)
        pages.append(path)
        listed += table.num_rows
        for values in columns.values():
            values.clear()

    for row in rows:
        for name, values in columns.items():
            values.append(row[name])
        if len(columns["id"]) >= LISTING_PAGE:
            flush()
    if columns["id"] or not pages:
        flush()
    return pages, listed


def read_listing(out: OutputDir, pages: list[str]):
    """The pages as a dataset of listing rows: one task per page, or for a listing of one page, the page itself
    (a few hundred KB at most), so a small job starts no read task before its prepare tasks."""
    import ray.data

    if len(pages) == 1:
        with out.fs.open(pages[0], "rb") as handle:
            return ray.data.from_arrow(pq.read_table(handle))
    url, options = out.url, out.storage_options

    def read_pages(batch: dict) -> pa.Table:
        fs = OutputDir(url, options).fs
        tables = []
        for path in batch["page"]:
            with fs.open(str(path), "rb") as handle:
                tables.append(pq.read_table(handle))
        return pa.concat_tables(tables)

    paths = ray.data.from_items([{"page": page} for page in pages], override_num_blocks=len(pages))
    return paths.map_batches(read_pages, batch_size=1, batch_format="numpy")


def remove_listing(out: OutputDir, run_id: str) -> None:
    folder = listing_folder(out, run_id)
    if out.fs.exists(folder):
        out.fs.rm(folder, recursive=True)
