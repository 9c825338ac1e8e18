"""Model sources: the tiny model, local directories, Hugging Face ids offline, and object storage mirrored once."""

from __future__ import annotations

import threading

import pytest

from pipelines.config import ModelSpec
from pipelines.errors import ModelSourceError
from pipelines.model_sources import resolve


def test_tiny_speculates_only_when_asked(tiny_dir):
    model = resolve("tiny")
    assert model.path == tiny_dir and (model.path / "model.safetensors").exists()
    assert model.assistant_path is None  # its random drafter would be accepted only by chance
    assert resolve(ModelSpec(name="tiny", assistant="tiny")).assistant_path == tiny_dir / "assistant"
    assert resolve(ModelSpec(name="tiny", assistant="none")).assistant_path is None


@pytest.mark.parametrize("name", ["./models/gemma", "/nonexistent/gemma", "~/no-such-model", "a/b/c"])
def test_a_path_that_does_not_exist_is_not_taken_for_a_hub_id(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # a hub lookup would fail differently (and slowly)
    with pytest.raises(ModelSourceError, match="no model directory at"):
        resolve(name)


def test_a_mistyped_folder_under_an_existing_one_is_local(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelSourceError, match="no model directory at 'models/gemma-4-12b-itt'"):
        resolve("models/gemma-4-12b-itt")


def test_local_directory_and_its_assistant_folder(tiny_dir):
    model = resolve(str(tiny_dir))
    assert model.path == tiny_dir and model.assistant_path == tiny_dir / "assistant"


def test_missing_hugging_face_model_names_the_files_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelSourceError, match=r"google/gemma-4-12B-it.*config\.json.*safetensors"):
        resolve("gemma-4-12b-it")


def test_directory_without_a_config_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="lacks config.json"):
        resolve(str(tmp_path))


def test_object_storage_model_is_mirrored_once_per_node(tiny_dir, s3_server, monkeypatch, tmp_path):
    import s3fs

    storage = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(**storage)
    fs.put(str(tiny_dir), "models/tiny-copy", recursive=True)
    monkeypatch.setenv("GEMMA_UNIFIED_CACHE", str(tmp_path / "node-cache"))

    downloads = []
    original = s3fs.S3FileSystem._get_file

    async def counting(self, remote, *args, **kwargs):
        downloads.append(remote)
        return await original(self, remote, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", counting)
    s3fs.S3FileSystem.clear_instance_cache()  # instances bind their methods when created
    spec = ModelSpec(name="s3://models/tiny-copy/", storage_options=storage)
    results = []
    workers = [threading.Thread(target=lambda: results.append(resolve(spec))) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    paths = {r.path for r in results}
    assert len(paths) == 1 and len(results) == 4
    (path,) = paths
    assert (path / "config.json").exists() and (path / "assistant" / "model.safetensors").exists()
    files = sorted(p.relative_to(tiny_dir).as_posix() for p in tiny_dir.rglob("*") if p.is_file())
    assert len(downloads) == len(files)  # four resolvers, one download of each file
    assert resolve(spec).assistant_path == path / "assistant"


@pytest.mark.slow  # waits for a connection to a closed port to fail
def test_unreachable_model_storage_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMMA_UNIFIED_CACHE", str(tmp_path))
    spec = ModelSpec(
        name="s3://models/none/", storage_options={"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}
    )
    with pytest.raises(ModelSourceError, match="cannot list the model at s3://models/none/"):
        resolve(spec)


def test_tokenizer_from_object_storage_copies_no_weights(tiny_dir, s3_server, monkeypatch, tmp_path):
    import s3fs

    from pipelines.model_sources import load_tokenizer

    storage = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem(**storage).put(str(tiny_dir), "models/tiny-tok", recursive=True)
    monkeypatch.setenv("GEMMA_UNIFIED_CACHE", str(tmp_path))
    tokenizer = load_tokenizer(ModelSpec(name="s3://models/tiny-tok/", storage_options=storage))
    assert tokenizer.image_token == "<|image|>"
    copied = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert "tokenizer.json" in copied and not any(name.endswith(".safetensors") for name in copied)
