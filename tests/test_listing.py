"""Listing a local folder: nested directories in a stable order, ids relative to the input."""

from __future__ import annotations

from pipelines.config import InputSpec
from pipelines.sources import iter_listing


def test_nested_folders_are_listed_in_a_stable_sorted_order(tmp_path):
    for name in ["b/2.jpg", "b/1.png", "a/z/9.wav", "a/3.pdf", "0.jpg", "b/c/4.flac"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    rows = list(iter_listing(InputSpec(url=str(tmp_path))))
    assert [row["id"] for row in rows] == ["0.jpg", "a/3.pdf", "a/z/9.wav", "b/1.png", "b/2.jpg", "b/c/4.flac"]
    assert all(row["uri"] == str(tmp_path / row["id"]) and row["container"] == "file" for row in rows)
    assert list(iter_listing(InputSpec(url=str(tmp_path) + "/"))) == rows
