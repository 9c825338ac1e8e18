"""A job's listing pages: written one page at a time, read back by one plain task per page (no footer-reading
actors) or, for one page, from the driver; locally and in object storage."""

from __future__ import annotations

import pytest

from pipelines.listing_pages import (
    BATCH_LISTING_COLUMNS,
    LISTING_COLUMNS,
    LISTING_PAGE,
    listing_folder,
    read_listing,
    remove_listing,
    write_listing,
)
from pipelines.output import OutputDir


def _rows(count: int):
    for index in range(count):
        yield {"id": f"item-{index}", "uri": f"/data/{index}.jpg", "container": "file"}


def _actors() -> dict[str, str]:
    """Every actor the session's cluster has had: id -> class name."""
    from ray._private.state import actors

    return {actor_id: entry.get("ActorClassName", "") for actor_id, entry in actors().items()}


def test_pages_hold_every_row_once_and_read_back_without_footer_actors(ray_cluster, tmp_path):
    out = OutputDir(str(tmp_path / "out"), {})
    count = 2 * LISTING_PAGE + 17
    pages, listed = write_listing(out, "run1", _rows(count), LISTING_COLUMNS)
    assert listed == count
    assert len(pages) == 3 and all(page.startswith(listing_folder(out, "run1")) for page in pages)

    before = _actors()
    rows = read_listing(out, pages).take_all()
    started = {name for actor_id, name in _actors().items() if actor_id not in before}
    assert sorted(row["id"] for row in rows) == sorted(f"item-{index}" for index in range(count))
    assert set(rows[0]) == set(LISTING_COLUMNS)
    assert not any("FooterReader" in name for name in started), started

    remove_listing(out, "run1")
    assert not out.fs.exists(listing_folder(out, "run1"))


def test_a_one_page_listing_is_read_in_full(ray_cluster, tmp_path):
    out = OutputDir(str(tmp_path / "out"), {})
    pages, listed = write_listing(out, "run4", _rows(LISTING_PAGE - 1), LISTING_COLUMNS)
    assert (len(pages), listed) == (1, LISTING_PAGE - 1)
    rows = read_listing(out, pages).take_all()
    assert sorted(row["id"] for row in rows) == sorted(f"item-{index}" for index in range(LISTING_PAGE - 1))


def test_an_empty_listing_is_an_empty_dataset_with_its_columns(ray_cluster, tmp_path):
    out = OutputDir(str(tmp_path / "out"), {})
    pages, listed = write_listing(out, "run2", iter(()), BATCH_LISTING_COLUMNS)
    assert (len(pages), listed) == (1, 0)
    dataset = read_listing(out, pages)
    assert dataset.count() == 0
    assert set(dataset.schema().names) == set(BATCH_LISTING_COLUMNS)


@pytest.mark.usefixtures("ray_cluster")
def test_pages_in_object_storage_are_read_through_the_outputs_storage_options(s3_env):
    import s3fs

    options = {"client_kwargs": {"endpoint_url": s3_env["AWS_ENDPOINT_URL"]}}
    s3fs.S3FileSystem(**options).mkdir("listing-pages")
    out = OutputDir("s3://listing-pages/job", options)
    count = LISTING_PAGE + 3  # two pages: read by tasks in the workers, through the output's storage options
    pages, listed = write_listing(out, "run3", _rows(count), LISTING_COLUMNS)
    assert len(pages) == 2 and all(page.startswith("listing-pages/job/_work/listing-run3/") for page in pages)
    rows = read_listing(out, pages).take_all()
    assert sorted(row["id"] for row in rows) == sorted(f"item-{index}" for index in range(count))
