"""Listing and reading inputs through fsspec: directories and globs of media, WebDataset tar shards, manifests.

Listing is a generator (per directory locally, per page of 1000 keys on S3), so a million objects never sit in the
driver's memory at once; the batch job streams it to small Parquet listing files that Ray Data then reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import fsspec

from pipelines.config import InputSpec
from pipelines.errors import StorageError
from pipelines.media.sniff import MEDIA_SUFFIXES

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
ROW_FIELDS = ("question", "prompt", "source_language", "target_language", "language")

LISTING_SCHEMA_FIELDS = ("id", "uri", "container", "data", *ROW_FIELDS, "max_soft_tokens")


@dataclass
class Item:
    """One input item with its bytes (or a way to open them) and any per-row task fields."""

    id: str
    source: str
    data: bytes | None  # None: the object is opened by `open()` and read on demand
    fields: dict = field(default_factory=dict)
    storage_options: dict = field(default_factory=dict)

    def open(self) -> BinaryIO:
        """A seekable binary file: a long recording is decoded from it without being read into memory whole."""
        if self.data is not None:
            return io.BytesIO(self.data)
        return fsspec.open(self.source, "rb", **self.storage_options).open()

    def read(self) -> bytes:
        if self.data is None:
            with self.open() as handle:
                self.data = handle.read()
        return self.data


def filesystem(url: str, storage_options: dict | None = None):
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, root


def detect_format(spec: InputSpec) -> str:
    if spec.format != "auto":
        return spec.format
    path = spec.url.split("?")[0].lower()
    if path.endswith(".jsonl") and _first_line_is_batch_request(spec):
        return "openai-batch"
    if path.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    if path.endswith(".tar") or path.endswith(".tar}"):
        return "tar"
    return "auto"  # a directory or glob: .tar members are shards, media files are items


def _first_line_is_batch_request(spec: InputSpec) -> bool:
    """Whether a JSON Lines file starts like an OpenAI batch file (custom_id and body) rather than a manifest."""
    try:
        with fsspec.open(spec.url, "rb", **spec.storage_options) as handle:
            first = next((line for line in handle if line.strip()), b"")
        data = json.loads(first)
    except Exception:  # unreadable or not JSON: read as a manifest, whose reader reports the problem
        return False
    return isinstance(data, dict) and "custom_id" in data and "body" in data


def _protocol_prefix(fs, url: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return "" if protocol in ("file", "local") and "://" not in url else f"{protocol}://"


def check_reachable(url: str, storage_options: dict | None = None) -> None:
    """Fail fast, with one clear message, on unreachable storage, refused credentials or an empty input."""
    try:
        fs, root = filesystem(url, storage_options)
        found = fs.glob(root) if any(c in root for c in "*?[") else fs.exists(root)
    except Exception as exc:  # each backend raises its own types: report them all the same way
        raise StorageError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    if not found:
        raise StorageError(f"nothing found at {url}")


def iter_listing(spec: InputSpec, skipped: list[str] | None = None) -> Iterator[dict]:
    """Listing rows (id, uri, container) for files and tar shards, in a stable order within each directory.

    Every file is listed (what it holds decides how it is read, and one that cannot be read is an error row),
    except, with `skip_unsupported`, files no extension or content check recognises: their ids go to `skipped`."""
    input_format = detect_format(spec)
    fs, root = filesystem(spec.url, spec.storage_options)
    prefix = _protocol_prefix(fs, spec.url)
    if any(c in root for c in "*?["):
        base = root.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
        paths = (p for p in sorted(fs.glob(root)) if not fs.isdir(p))
    elif fs.isfile(root):
        base, paths = posixpath.dirname(root), iter([root])
    else:
        base, paths = root.rstrip("/"), _walk_files(fs, root.rstrip("/"))
    for path in paths:
        suffix = posixpath.splitext(path)[1].lower()
        is_shard = suffix == ".tar" and input_format != "files"
        if not is_shard and input_format == "tar":
            continue
        relative = posixpath.relpath(path, base) if base else path
        if spec.skip_unsupported and not is_shard and suffix not in MEDIA_SUFFIXES and not _recognised(fs, path):
            if skipped is not None:
                skipped.append(relative)
            continue
        yield {"id": relative, "uri": prefix + path, "container": "tar" if is_shard else "file"}


def _recognised(fs, path: str) -> bool:
    """Whether a file's content is something this project reads (read only for files with an unknown extension)."""
    from pipelines.media.sniff import sniff

    try:
        with fs.open(path, "rb") as handle:
            return sniff(handle) is not None
    except Exception as exc:
        logger.debug("cannot sniff %s while listing (%s): listed for its read to report", path, exc)
        return True


def _walk_files(fs, root: str) -> Iterator[str]:
    iterdir = getattr(fs, "_iterdir", None)
    if iterdir is not None and "s3" in str(fs.protocol):
        yield from _s3_keys(fs, root)
        return
    if "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        # os.walk keeps names only; fsspec's walk holds a details dict (~0.7 KB) for every file of a directory.
        for directory, subdirectories, files in os.walk(root):
            subdirectories.sort()
            for name in sorted(files):
                yield posixpath.join(directory, name)
        return
    for directory, _, files in fs.walk(root):
        for name in sorted(files):
            yield posixpath.join(directory, name)


def _s3_keys(fs, root: str) -> Iterator[str]:
    """Page through ListObjectsV2 (1000 keys a page) instead of materialising the whole listing."""
    from fsspec.asyn import sync

    bucket, _, prefix = root.partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    pages = fs._iterdir(bucket, delimiter="", prefix=prefix).__aiter__()
    while True:
        try:
            entry = sync(fs.loop, pages.__anext__)
        except StopAsyncIteration:
            return
        if entry.get("type") == "file":
            yield entry["name"]


def stable_id(data: bytes) -> str:
    return "sha1:" + hashlib.sha1(data).hexdigest()[:20]


def read_items(row: dict, storage_options: dict | None = None) -> Iterator[Item]:
    """The items of a listing or manifest row: inline bytes, one object (opened when used), or one item per
    WebDataset key of a tar shard (read whole)."""
    fields = {k: row.get(k) for k in (*ROW_FIELDS, "max_soft_tokens") if row.get(k) is not None}
    if row.get("data") is not None:
        data = bytes(row["data"])
        yield Item(row.get("id") or stable_id(data), row.get("uri") or "inline", data, fields)
        return
    uri = row["uri"]
    if row.get("container") != "tar":
        yield Item(row["id"] or uri, uri, None, fields, storage_options or {})
        return
    with fsspec.open(uri, "rb", **(storage_options or {})) as handle:
        data = handle.read()
    yield from _tar_items(row["id"], uri, data)


def _tar_items(shard_id: str, uri: str, data: bytes) -> Iterator[Item]:
    """WebDataset grouping: members share a key (path up to the first dot of the basename)."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive:
            if not member.isfile():
                continue
            directory, name = posixpath.split(member.name)
            key, _, extension = name.partition(".")
            extracted = archive.extractfile(member)
            groups.setdefault(posixpath.join(directory, key), {})[extension.lower()] = extracted.read()
    for key, members in groups.items():
        fields = {}
        if "json" in members:
            try:
                fields = {
                    k: v for k, v in json.loads(members.pop("json")).items() if k in (*ROW_FIELDS, "max_soft_tokens")
                }
            except (ValueError, AttributeError):
                fields = {}
        media = next(((ext, b) for ext, b in members.items() if "." + ext.rsplit(".", 1)[-1] in MEDIA_SUFFIXES), None)
        item_id = f"{shard_id}/{key}"
        if media is None:
            yield Item(item_id, f"{uri}#{key}", b"", {"_missing": f"no media member for key {key!r}"})
            continue
        extension, payload = media
        yield Item(item_id, f"{uri}#{key}.{extension}", payload, fields)
