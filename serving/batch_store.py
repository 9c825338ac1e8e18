"""Files and batch records as objects under `batch.storage_url` (fsspec): no state in the endpoint's memory, so
every ingress replica, and an endpoint restarted mid-batch, sees the same records.

    files/<file_id>.json        a file's record (owner = the API key's digest)
    files/<file_id>.jsonl       an uploaded file's content
    batches/<batch_id>.json     a batch's record
    batches/<batch_id>/output/  the batch job's output directory (output.jsonl, errors.jsonl, _job.json, parts)
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from typing import IO

from serving.batch_protocol import Batch, FileObject

logger = logging.getLogger(__name__)

FILES, BATCHES = "files", "batches"
_IDS = {"file": re.compile(r"^file-[A-Za-z0-9_-]{1,96}$"), "batch": re.compile(r"^batch_[A-Za-z0-9_-]{1,96}$")}


class StoredFile(FileObject):
    owner: str
    path: str  # the content, relative to the storage root
    lines: int | None = None  # requests in a batch input file

    def public(self) -> FileObject:
        return FileObject.model_validate(self.model_dump(include=set(FileObject.model_fields)))


class StoredBatch(Batch):
    owner: str
    job_id: str  # the Ray job's submission id

    def public(self) -> Batch:
        return Batch.model_validate(self.model_dump(include=set(Batch.model_fields)))


def valid_id(kind: str, ident: str) -> bool:
    """Ids become object names: anything else (`..`, `/`) names no record."""
    return bool(_IDS[kind].match(ident))


class BatchStore:
    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/")

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def url_of(self, relative: str) -> str:
        """The URL a batch job is given for an object of this store."""
        return f"{self.url}/{relative}"

    def output_path(self, batch_id: str) -> str:
        return f"{BATCHES}/{batch_id}/output"

    # ---- files ----

    def put_file(self, record: StoredFile, content: IO[bytes]) -> None:
        """The content first, then the record: a record always names content that is there."""
        self._write(record.path, lambda handle: shutil.copyfileobj(content, handle, 1024 * 1024))
        self.save_file(record)
        logger.info("stored %s (%d bytes) for owner %s", record.id, record.bytes, record.owner[:8])

    def save_file(self, record: StoredFile) -> None:
        self._write_json(f"{FILES}/{record.id}.json", record)

    def file(self, file_id: str) -> StoredFile | None:
        data = self._read_json(f"{FILES}/{file_id}.json") if valid_id("file", file_id) else None
        return None if data is None else StoredFile.model_validate(data)

    def files(self) -> list[StoredFile]:
        return [StoredFile.model_validate(data) for data in self._read_all(FILES)]

    def delete_file(self, record: StoredFile) -> None:
        for relative in (f"{FILES}/{record.id}.json", record.path):
            try:
                self.fs.rm(self.path(relative))
            except FileNotFoundError:
                pass
        logger.info("deleted %s", record.id)

    def open(self, relative: str) -> IO[bytes]:
        self.fs.invalidate_cache(self.path(relative))
        return self.fs.open(self.path(relative), "rb")

    def size(self, relative: str) -> int | None:
        """Bytes of an object, None when there is none."""
        self.fs.invalidate_cache(self.path(relative))
        try:
            return int(self.fs.size(self.path(relative)))
        except FileNotFoundError:
            return None

    # ---- batches ----

    def save_batch(self, record: StoredBatch) -> None:
        self._write_json(f"{BATCHES}/{record.id}.json", record)

    def batch(self, batch_id: str) -> StoredBatch | None:
        data = self._read_json(f"{BATCHES}/{batch_id}.json") if valid_id("batch", batch_id) else None
        return None if data is None else StoredBatch.model_validate(data)

    def batches(self) -> list[StoredBatch]:
        return [StoredBatch.model_validate(data) for data in self._read_all(BATCHES)]

    # ---- objects ----

    def _write(self, relative: str, write) -> None:
        """Publish an object whole: local disks write aside and rename; object stores publish on close."""
        path = self.path(relative)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (list, tuple)) else [self.fs.protocol]
        if "file" in protocols:
            temporary = f"{path}.{uuid.uuid4().hex}.tmp"
            with self.fs.open(temporary, "wb") as handle:
                write(handle)
            self.fs.mv(temporary, path)
        else:
            with self.fs.open(path, "wb") as handle:
                write(handle)

    def _write_json(self, relative: str, record) -> None:
        body = record.model_dump_json().encode()
        self._write(relative, lambda handle: handle.write(body))

    def _read_json(self, relative: str) -> dict | None:
        # Records are rewritten in place: a cached listing's size and ETag would refuse (or cut) the new version.
        self.fs.invalidate_cache(self.path(relative))
        try:
            with self.fs.open(self.path(relative), "rb") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

    def _read_all(self, folder: str) -> list[dict]:
        path = self.path(folder)
        self.fs.invalidate_cache(path)  # another replica may have written since this one listed
        try:
            names = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        records = []
        for name in sorted(names):
            if name.endswith(".json"):
                data = self._read_json(f"{folder}/{name.rsplit('/', 1)[-1]}")
                if data is not None:  # deleted between the listing and the read
                    records.append(data)
        return records
