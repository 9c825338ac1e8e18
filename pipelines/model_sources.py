"""Where a model's files come from: the built-in tiny model, a preset, a local directory, a Hugging Face id,
or object storage (mirrored once per node to local disk, under a lock, so N actors on a node download once)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipelines.config import PRESETS, ModelSpec
from pipelines.errors import ModelSourceError

logger = logging.getLogger(__name__)

TINY = "tiny"
REQUIRED_FILES = ("config.json", "tokenizer_config.json")
_MODEL_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.model", "*.txt")


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    assistant_path: Path | None


def cache_root() -> Path:
    return Path(os.environ.get("GEMMA_UNIFIED_CACHE", Path.home() / ".cache" / "gemma-unified"))


def _build_once(directory: Path, build) -> Path:
    """Build into a staging folder and move it into place, under a lock: a crash never leaves a half model."""
    import shutil

    from filelock import FileLock

    marker = directory / ".complete"
    if marker.exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        if not marker.exists():
            staging = directory.with_name(directory.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(directory, ignore_errors=True)
            build(staging)
            staging.rename(directory)
            marker.touch()
    return directory


def tiny_dir(seed: int = 0) -> Path:
    """The tiny model's directory (processor, weights, assistant/), built on first use."""
    from pipelines.engines.tiny_checkpoint import TINY_REVISION, build_tiny_model

    # The revision is in the name so that a cache built by an older release is not reused.
    directory = cache_root() / f"tiny-r{TINY_REVISION}-seed{seed}"
    return _build_once(directory, lambda d: build_tiny_model(d, seed=seed))


TOKENIZER_FILES = ("tokenizer*", "*.jinja", "processor_config.json", "special_tokens_map.json", "config.json")


def _mirror(url: str, storage_options: dict, only: tuple[str, ...] | None = None) -> Path:
    """Copy a model directory from object storage to node-local disk once; later calls reuse the copy.
    `only` keeps the files whose names match those patterns (the tokenizer's, for CPU workers)."""
    import fnmatch

    import fsspec

    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    local = cache_root() / "mirror" / (f"{key}-tokenizer" if only else key)

    def download(directory: Path) -> None:
        try:
            fs, root = fsspec.core.url_to_fs(url, **storage_options)
            files = [f for f in fs.find(root) if not f.rstrip("/").endswith("/")]
        except Exception as exc:  # any backend error: unreachable endpoint, bad credentials
            raise ModelSourceError(f"cannot list the model at {url}: {exc}") from None
        if only:
            files = [f for f in files if any(fnmatch.fnmatch(f.rsplit("/", 1)[-1], p) for p in only)]
        if not files:
            raise ModelSourceError(f"no model files at {url}")
        directory.mkdir(parents=True, exist_ok=True)
        logger.info("copying %d model files from %s to %s", len(files), url, directory)
        for remote in files:
            target = directory / os.path.relpath(remote, root.rstrip("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))

    return _build_once(local, download)


def _hub(repo_id: str) -> Path:
    """A Hugging Face id through the local cache; downloads only when the hub is reachable and allowed."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=list(_MODEL_PATTERNS)))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        raise ModelSourceError(
            f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: missing "
            f"{', '.join(REQUIRED_FILES)} and the *.safetensors weights. Download it on a connected machine "
            f"(hf download {repo_id}, the Hugging Face CLI) or point the model at a local directory or s3:// URL."
        )
    logger.info("%s is not in the local Hugging Face cache: downloading it", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(_MODEL_PATTERNS)))
    except Exception as exc:
        raise ModelSourceError(
            f"cannot resolve {repo_id!r}: not in the local Hugging Face cache and the download failed ({exc}). "
            f"Needed files: {', '.join(REQUIRED_FILES)} and *.safetensors."
        ) from None


def _looks_local(name: str) -> bool:
    """A path rather than a Hugging Face id ("org/name"): explicit path syntax, more than one slash, or a first
    component that exists here. Such a name is never sent to the hub, so a typo fails as a missing directory."""
    if name.startswith(("file://", "/", "./", "../", "~", ".")) or name.count("/") > 1 or "\\" in name:
        return True
    return Path(name).exists() or ("/" in name and Path(name.split("/", 1)[0]).is_dir())


def _locate(name: str, storage_options: dict) -> Path:
    if "://" in name and not name.startswith("file://"):
        path = _mirror(name, storage_options)
    elif Path(name.removeprefix("file://")).expanduser().is_dir():
        path = Path(name.removeprefix("file://")).expanduser()
    elif _looks_local(name):
        raise ModelSourceError(
            f"no model directory at {name!r} (resolved to {Path(name.removeprefix('file://')).expanduser().resolve()}): "
            f"check the path, or use a preset ({', '.join(PRESETS)}), tiny, a Hugging Face id or an s3:// URL"
        )
    else:
        path = _hub(name)
    missing = [f for f in REQUIRED_FILES if not (path / f).exists()]
    if missing:
        raise ModelSourceError(f"{name}: the model directory {path} lacks {', '.join(missing)}")
    return path


def resolve(spec: ModelSpec | str) -> ResolvedModel:
    """A ModelSpec (or bare name) -> local paths of the model and of its MTP assistant (if any)."""
    spec = ModelSpec(name=spec) if isinstance(spec, str) else spec
    name, default_assistant = spec.name, None
    if name == TINY:
        # The tiny drafter is as untrained as the tiny model: its drafts are accepted only by chance, so `auto`
        # leaves it out (speculation would only slow runs down); `assistant: tiny` opts in to exercise that path.
        path = tiny_dir()
    else:
        if name in PRESETS:
            name, default_assistant = PRESETS[name]
        path = _locate(name, spec.storage_options)
    if spec.assistant in (None, "none") or (spec.assistant == "auto" and name == TINY):
        assistant = None
    elif spec.assistant == TINY:
        assistant = tiny_dir() / "assistant"
    elif spec.assistant == "auto":
        if isinstance(default_assistant, Path):
            assistant = default_assistant
        elif default_assistant:
            assistant = _locate(default_assistant, spec.storage_options)
        elif (path / "assistant" / "config.json").exists():
            assistant = path / "assistant"
        else:
            assistant = None
    else:
        assistant = _locate(spec.assistant, spec.storage_options)
    return ResolvedModel(name=spec.name, path=path, assistant_path=assistant)


def load_tokenizer(model: ModelSpec | str = TINY):
    """The model's own tokenizer (with its chat template), loaded once per process."""
    spec = ModelSpec(name=model) if isinstance(model, str) else model
    return _tokenizer(spec.name, json.dumps(spec.storage_options, sort_keys=True))


@lru_cache(maxsize=4)
def _tokenizer(name: str, storage_options: str):
    from transformers import AutoTokenizer

    spec = ModelSpec(name=name, storage_options=json.loads(storage_options))
    url = PRESETS.get(name, (name,))[0]
    if "://" in url and not url.startswith("file://"):
        path = _mirror(url, spec.storage_options, only=TOKENIZER_FILES)  # CPU workers need no weights
    else:
        path = resolve(spec).path
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot load the tokenizer of {name!r}: {exc}") from None
