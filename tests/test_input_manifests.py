"""Manifests in the three documented formats, side by side, on local disk and on a real S3-compatible server."""

from __future__ import annotations

import base64
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.demo.samples import make_images
from pipelines.batch import run
from pipelines.config import InputSpec, JobSpec, OutputSpec, ResourcesSpec, TaskSpec

pytestmark = pytest.mark.slow


def _write(path, rows: list[dict], fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in rows[0]}), path)
        return
    text_rows = [{**r, "data": base64.b64encode(r["data"]).decode() if r.get("data") else None} for r in rows]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in text_rows))
    else:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(text_rows)


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_formats(ray_cluster, s3_env, tmp_path, fmt, where):
    import fsspec

    images = make_images(tmp_path / "media", 2)
    uris = [str(p) for p in images]
    root = str(tmp_path)
    if where == "s3":
        fs = fsspec.filesystem("s3")
        bucket = f"manifest-{fmt}"
        fs.mkdir(bucket)
        for image in images:
            fs.put_file(str(image), f"{bucket}/media/{image.name}")
        uris = [f"s3://{bucket}/media/{p.name}" for p in images]
        root = f"s3://{bucket}"
    rows = [
        {"id": "first", "uri": uris[0], "data": None, "question": "What colour?", "max_soft_tokens": 70},
        {"id": "second", "uri": uris[1], "data": None, "question": "How many shapes?", "max_soft_tokens": 140},
        {
            "id": "inline",
            "uri": None,
            "data": images[0].read_bytes(),
            "question": "Is it round?",
            "max_soft_tokens": None,
        },
    ]
    local_manifest = tmp_path / f"manifest.{fmt}"
    _write(local_manifest, rows, fmt)
    manifest = str(local_manifest)
    if where == "s3":
        manifest = f"{root}/manifest.{fmt}"
        fs.put_file(str(local_manifest), manifest)
    out = f"{root}/out"
    spec = JobSpec(
        input=InputSpec(url=manifest),
        task=TaskSpec(task="answer", max_new_tokens=2),
        output=OutputSpec(url=out),
        resources=ResourcesSpec(batch_size=4),
    )
    summary = run(spec, progress=False)
    assert (summary.succeeded, summary.failed) == (3, 0)

    ofs, opath = fsspec.core.url_to_fs(out)
    results = {}
    for part in ofs.glob(f"{opath}/results/*.parquet"):
        with ofs.open(part, "rb") as handle:
            results.update({r["id"]: r for r in pq.read_table(handle).to_pylist()})
    assert set(results) == {"first", "second", "inline"}
    assert results["first"]["image_tokens"] <= 70 < results["second"]["image_tokens"] <= 140
    assert results["inline"]["image_tokens"] > 140 and results["inline"]["source"] == "inline"
    assert results["first"]["source"] == uris[0]
