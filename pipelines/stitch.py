"""Audio windows -> one row per clip, after the run.

A clip longer than one window is prepared and generated as one unit per window (`ITEM#wN`), so no stage ever holds
a whole long recording. Each window's row is staged under `_windows/`; once every window of a clip is there (the last
one carries the count), this step writes the clip's one result row, or one error row naming the failed windows, and
drops the staged rows. A clip whose windows are not all there yet (a killed run) stays staged: its finished windows
count as done, so the next run generates only the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from pipelines.output import ERRORS, RESULTS, WINDOWS, OutputDir

logger = logging.getLogger(__name__)


@dataclass
class StitchCounts:
    succeeded: int = 0
    failed: int = 0
    pending: int = 0  # clips still missing windows


def window_index(window_id: str) -> int:
    return int(window_id.rsplit("#w", 1)[1])


def stitch_windows(out: OutputDir) -> StitchCounts:
    import pyarrow as pa

    from pipelines.output import ERROR_COLUMNS, RESULT_COLUMNS

    counts = StitchCounts()
    old_parts = out.parts(WINDOWS)
    if not old_parts:
        return counts
    staged_table = out.read_table(WINDOWS)
    staged = staged_table.to_pylist()
    finished = set(out.read_column(RESULTS)) | set(out.read_column(ERRORS))
    clips: dict[str, dict[int, dict]] = {}
    for row in staged:
        if row["item_id"] in finished:
            continue  # stitched by an earlier run that stopped before dropping its staged rows, or failed whole
        windows = clips.setdefault(row["item_id"], {})
        index = window_index(row["id"])
        if index not in windows or windows[index]["error"] is not None:  # a retried window replaces its failure
            windows[index] = row

    results, errors, pending = [], [], []
    for windows in clips.values():
        total = max(row["window_total"] for row in windows.values())
        if not total or len(windows) < total:
            pending.extend(windows.values())
            continue
        ordered = [windows[i] for i in range(total)]
        failed = [row for row in ordered if row["error"] is not None]
        if failed:
            errors.append(_clip_error(ordered[0], failed, total))
        else:
            results.append(_clip_result(ordered))
    counts.succeeded, counts.failed = len(results), len(errors)
    counts.pending = len({row["item_id"] for row in pending})

    def table(rows: list[dict], columns: dict):
        return pa.table({k: pa.array([r[k] for r in rows], type=pa.type_for_alias(t)) for k, t in columns.items()})

    def name(rows: list[dict]) -> str:
        return hashlib.sha1("\n".join(sorted(r["id"] for r in rows)).encode()).hexdigest()[:24]

    # Results first, staged rows last: a run killed in between stitches nothing twice (finished clips are skipped).
    if results:
        out.write_part(table(results, RESULT_COLUMNS), f"{RESULTS}/part-clips-{name(results)}.parquet")
    if errors:
        out.write_part(table(errors, ERROR_COLUMNS), f"{ERRORS}/part-clips-{name(errors)}.parquet")
    kept = f"{WINDOWS}/part-pending-{name(pending)}.parquet" if pending else None
    if pending:
        out.write_part(pa.Table.from_pylist(pending, schema=staged_table.schema), kept)
    for part in old_parts:
        if kept is None or part != out.path(kept):
            out.fs.rm(part)
    if counts.succeeded or counts.failed:
        logger.info(
            "stitched %d audio clips from their windows (%d failed)", counts.succeeded + counts.failed, counts.failed
        )
    return counts


def _clip_result(windows: list[dict]) -> dict:
    first = windows[0]
    segments = [segment for row in windows for segment in json.loads(row["segments"] or "[]")]
    drafted = [row["spec_drafted"] for row in windows if row["spec_drafted"] is not None]

    def joined(column: str) -> str | None:
        if first[column] is None:
            return None
        return " ".join(row[column] for row in windows if row[column])

    def total(column: str) -> int:
        return sum(row[column] or 0 for row in windows)

    return {
        **first,
        "id": first["item_id"],
        "text": joined("text"),
        "transcript": joined("transcript"),
        "translation": joined("translation"),
        "segments": json.dumps(segments),
        "prompt_tokens": total("prompt_tokens"),
        "image_tokens": total("image_tokens"),
        "audio_tokens": total("audio_tokens"),
        "output_tokens": total("output_tokens"),
        "finish_reason": "length" if any(row["finish_reason"] == "length" for row in windows) else "stop",
        "latency_s": float(sum(row["latency_s"] or 0.0 for row in windows)),
        "spec_drafted": sum(drafted) if drafted else None,
        "spec_accepted": total("spec_accepted") if drafted else None,
    }


def _clip_error(first: dict, failed: list[dict], total: int) -> dict:
    message = "; ".join(f"audio window {window_index(row['id']) + 1} of {total}: {row['error']}" for row in failed)
    return {
        "id": first["item_id"],
        "item_id": first["item_id"],
        "source": first["source"],
        "task": first["task"],
        "stage": failed[0]["error_stage"],
        "error": message,
        "code": failed[0].get("error_code"),
    }
