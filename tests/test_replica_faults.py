"""Fatal engine errors replace the model actor instead of failing items; one that never stops fails the job clearly."""

from __future__ import annotations

import pytest
from fault_injection import OOM, faulty_generate
from test_batch import CAPTION, assert_no_duplicates, ids, job, read

from jobs.demo.samples import make_images
from pipelines.batch import run
from pipelines.errors import FatalEngineError, is_fatal

pytestmark = pytest.mark.slow


def test_a_fatal_error_on_one_call_replaces_the_actor_and_loses_nothing(ray_cluster, tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    make_images(source, 10)
    (source / "broken.png").write_bytes(b"not an image")
    stage = faulty_generate(tmp_path, fail_on_call=2)
    summary = run(job(source, out, CAPTION, resources={"batch_size": 2}), progress=False, generate_stage=stage)
    results, errors = read(out, "results"), read(out, "errors")
    assert_no_duplicates(results, errors)
    assert ids(results) == sorted(p.name for p in source.iterdir() if p.name != "broken.png")
    assert ids(errors) == ["broken.png"]  # the bad item is still its one error row; no spurious ones
    assert (summary.succeeded, summary.failed) == (10, 1)
    calls = (tmp_path / "calls").read_text().splitlines()
    # The units of the engine call that failed were generated again (the replacement's scheduler may group them
    # with other retried units differently).
    assert set(calls[1].split(",")) <= {unit for call in calls[2:] for unit in call.split(",")}


def test_a_fatal_error_that_never_stops_fails_the_job_with_its_cause(ray_cluster, tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    make_images(source, 3)
    stage = faulty_generate(tmp_path, fail_on_call=None)
    spec = job(source, out, CAPTION, resources={"batch_size": 2, "max_replica_restarts": 1})
    with pytest.raises(FatalEngineError) as failure:
        run(spec, progress=False, generate_stage=stage)
    message = str(failure.value)
    assert "failed 2 times" in message and "max_replica_restarts=1" in message and OOM in message
    assert read(out, "errors") == []  # no item is blamed for the engine's failure


def test_what_counts_as_fatal():
    import torch

    assert is_fatal(torch.OutOfMemoryError(OOM)) and is_fatal(MemoryError())
    assert is_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_fatal(ValueError("prompt of 9000 tokens is longer than max_model_len 8192"))
    assert not is_fatal(RuntimeError("shape mismatch"))

    class EngineDeadError(Exception):  # vLLM's, matched by name so vLLM need not be importable here
        pass

    assert is_fatal(EngineDeadError("EngineCore encountered an issue"))
