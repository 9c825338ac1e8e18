"""OpenAI batch files as batch-job input: lines in, output.jsonl / errors.jsonl out, by the endpoint's rules."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from pipelines.chat.batch_file import BatchFileError, duplicate_custom_ids, iter_batch_lines
from pipelines.config import InputSpec
from pipelines.sources import detect_format


def png(color=(200, 30, 30), size=(64, 48)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def line(custom_id: str, content, model: str = "tiny", **body) -> str:
    request = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 5, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": request})


def image_content(url: str, text: str = "What is this?") -> list:
    return [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]


# ---- the file reader (no Ray) ----


def test_lines_carry_their_byte_ranges_and_problems():
    text = "\n".join(
        [
            line("a", "hello"),
            "",  # blank lines are skipped, never an item
            "{not json",
            json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
            line("d", "hi").replace('"POST"', '"GET"'),
            line("e", "hi", max_tokens=0),
            line("a", "again"),
        ]
    ).encode()
    lines = list(iter_batch_lines(io.BytesIO(text)))

    assert [x.number for x in lines] == [1, 3, 4, 5, 6, 7]
    for x in lines:  # each range is exactly that line
        assert text[x.offset : x.offset + x.length] == text.split(b"\n")[x.number - 1]
    problems = {x.number: x.problem for x in lines}
    assert problems[1] is None and problems[7] is None
    assert problems[3].startswith("line 3: not valid JSON")
    assert "custom_id" in problems[4]
    assert problems[5].startswith("line 5: method")
    assert problems[6].startswith("line 6: body.max_tokens")
    assert duplicate_custom_ids(lines) == {"a": [1, 7]}


def test_a_jsonl_file_of_batch_lines_is_detected_as_one(tmp_path):
    batch = tmp_path / "requests.jsonl"
    batch.write_text("\n" + line("a", "hello") + "\n")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"uri": "a.png", "question": "?"}) + "\n")

    assert detect_format(InputSpec(url=str(batch))) == "openai-batch"
    assert detect_format(InputSpec(url=str(manifest))) == "manifest"
    assert detect_format(InputSpec(url=str(manifest), format="openai-batch")) == "openai-batch"


# ---- jobs on the local Ray cluster ----


def _job(input_url, output_url, **sections):
    from pipelines.config import JobSpec, OutputSpec, ResourcesSpec

    return JobSpec(
        input=InputSpec(url=str(input_url), **sections.pop("input", {})),
        output=OutputSpec(url=str(output_url), **sections.pop("output", {})),
        resources=ResourcesSpec(batch_size=4),
        **sections,
    )


def _jsonl(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_batch_file_runs_to_openai_output_and_error_files(ray_cluster, tmp_path):
    from pipelines.batch import run

    broken_png = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode()
    lines = [
        line("text", "Say hello.", temperature=0),
        line("image", image_content(png()), temperature=0),
        "{this line is cut",
        line("bad-image", image_content(broken_png)),
        line("other-model", "hi", model="gpt-4o"),
        line("long", "Tell me more.", max_completion_tokens=7, temperature=0, stop=["zzz"]),
    ]
    source = tmp_path / "requests.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"

    summary = run(_job(source, out), progress=False)

    assert (summary.succeeded, summary.failed) == (3, 3)
    answers = {x["custom_id"]: x for x in _jsonl(out / "output.jsonl")}
    assert set(answers) == {"text", "image", "long"}
    for custom_id, answer in answers.items():
        assert answer["error"] is None and answer["id"].startswith("batch_req_")
        response = answer["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 0 < usage["completion_tokens"] <= (7 if custom_id == "long" else 5)
    # the image is in the prompt: its tokens count
    assert (
        answers["image"]["response"]["body"]["usage"]["prompt_tokens"]
        > answers["text"]["response"]["body"]["usage"]["prompt_tokens"] + 50
    )

    errors = {x["custom_id"]: x for x in _jsonl(out / "errors.jsonl")}
    assert set(errors) == {None, "bad-image", "other-model"}
    assert errors[None]["error"]["message"].startswith("line 3: not valid JSON")
    assert errors["bad-image"]["error"]["code"] == "invalid_media"
    assert errors["bad-image"]["error"]["message"].startswith("messages.0.content.1")
    assert errors["other-model"]["error"]["code"] == "model_not_found"
    assert errors["other-model"]["response"]["status_code"] == 404
    manifest = json.loads((out / "_job.json").read_text())
    assert manifest["counts"] == {"total": 6, "succeeded": 3, "failed": 3}

    # A rerun skips what is done and retries only the failures; the files are rewritten with the same ids.
    again = run(_job(source, out), progress=False)
    assert again.skipped == 3 and (again.run_succeeded, again.run_failed) == (0, 3)
    assert {x["custom_id"]: x["id"] for x in _jsonl(out / "output.jsonl")} == {k: v["id"] for k, v in answers.items()}
    assert len(_jsonl(out / "errors.jsonl")) == 3


@pytest.mark.slow
def test_repeated_custom_ids_refuse_the_job_naming_the_lines(ray_cluster, tmp_path):
    from pipelines.batch import run

    source = tmp_path / "requests.jsonl"
    source.write_text("\n".join([line("a", "x"), line("b", "y"), line("a", "z"), line("b", "w")]) + "\n")

    with pytest.raises(BatchFileError, match=r"'a' on lines 1, 3; 'b' on lines 2, 4"):
        run(_job(source, tmp_path / "out"), progress=False)
    manifest = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert manifest["status"] == "failed" and "lines 1, 3" in manifest["reason"]
    assert not (tmp_path / "out" / "output.jsonl").exists()


def _wav_base64(seconds: float = 1.0) -> str:
    import numpy as np
    import soundfile as sf

    buffer = io.BytesIO()
    t = np.arange(int(16_000 * seconds)) / 16_000
    sf.write(buffer, 0.3 * np.sin(2 * np.pi * 440 * t), 16_000, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.slow
def test_a_batch_line_gets_the_answer_the_endpoint_gives_the_same_request(ray_cluster, tmp_path, tokenizer):
    """Same prompt (media and template by the shared reader), same greedy answer, same chat.completion shape."""
    import asyncio

    from pipelines.batch import run
    from pipelines.chat.protocol import ChatCompletionRequest
    from pipelines.config import EngineSpec, ModelSpec
    from pipelines.engines.transformers import TransformersEngine
    from pipelines.model_sources import resolve
    from serving.router import chat_preparer
    from serving.spec import ServeSpec

    audio = [
        {"type": "text", "text": "Transcribe."},
        {"type": "input_audio", "input_audio": {"data": _wav_base64(), "format": "wav"}},
    ]
    requests = {
        "system-and-image": {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": image_content(png((10, 120, 240)), "Describe.")},
            ],
            "max_tokens": 6,
            "temperature": 0,
        },
        "audio": {"messages": [{"role": "user", "content": audio}], "max_tokens": 6, "temperature": 0},
        "metadata-url": {  # http(s) only through the allow-list and the SSRF guard, as online
            "messages": [{"role": "user", "content": image_content("http://169.254.169.254/latest/meta-data/")}]
        },
    }
    source = tmp_path / "requests.jsonl"
    source.write_text(
        "".join(
            json.dumps(
                {"custom_id": k, "method": "POST", "url": "/v1/chat/completions", "body": {"model": "tiny", **v}}
            )
            + "\n"
            for k, v in requests.items()
        )
    )
    out = tmp_path / "out"
    run(_job(source, out), progress=False)
    answers = {x["custom_id"]: x["response"]["body"] for x in _jsonl(out / "output.jsonl")}
    (refused,) = _jsonl(out / "errors.jsonl")
    assert refused["custom_id"] == "metadata-url" and refused["error"]["code"] == "url_not_allowed"

    spec = ServeSpec()
    endpoint = chat_preparer(spec, tokenizer)
    engine = TransformersEngine(resolve(ModelSpec(name="tiny", assistant="none")), EngineSpec(speculative="off"))
    for custom_id in ("system-and-image", "audio"):
        body = ChatCompletionRequest.model_validate_json(json.dumps({"model": "tiny", **requests[custom_id]}))
        prepared = asyncio.run(endpoint.prepare(body))
        (result,) = engine.generate([prepared])
        expected = endpoint.completion(result).model_dump()
        got = answers[custom_id]
        assert got["choices"] == expected["choices"], custom_id
        assert got["usage"] == expected["usage"], custom_id
        assert {k for k in got} == {k for k in expected} and got["model"] == expected["model"] == "tiny"


@pytest.mark.slow
def test_a_batch_file_in_object_storage_fetches_s3_images_with_the_job_storage_options(ray_cluster, s3_server):
    import fsspec

    from pipelines.batch import run

    storage = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    fs = fsspec.filesystem("s3", **storage)
    fs.mkdir("batch-in")
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (0, 200, 0)).save(buffer, format="PNG")
    fs.pipe("batch-in/images/green.png", buffer.getvalue())
    fs.pipe(
        "batch-in/requests.jsonl",
        "\n".join(
            [
                line("s3-image", image_content("s3://batch-in/images/green.png")),
                line("missing", image_content("s3://batch-in/images/absent.png")),
            ]
        ).encode(),
    )
    spec = {"storage_options": storage}
    summary = run(_job("s3://batch-in/requests.jsonl", "s3://batch-out/job", input=spec, output=spec), progress=False)

    assert (summary.succeeded, summary.failed) == (1, 1)
    with fs.open("batch-out/job/output.jsonl") as handle:
        (answer,) = [json.loads(x) for x in handle.read().decode().splitlines()]
    assert answer["custom_id"] == "s3-image" and answer["response"]["body"]["usage"]["prompt_tokens"] > 60
    with fs.open("batch-out/job/errors.jsonl") as handle:
        (error,) = [json.loads(x) for x in handle.read().decode().splitlines()]
    assert error["custom_id"] == "missing" and "absent.png" in error["error"]["message"]
