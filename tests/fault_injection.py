"""A Generate stage whose engine fails fatally on chosen calls, counted across actor restarts in a folder."""

from __future__ import annotations

import sys
from pathlib import Path

import ray.cloudpickle

from pipelines.stages import Generate

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import the tests folder

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total capacity)"


class FaultyEngine:
    def __init__(self, engine, folder: Path, fail_on_call: int | None) -> None:
        self.engine, self.folder, self.fail_on_call = engine, folder, fail_on_call

    def generate(self, requests, watches=None):
        calls = self.folder / "calls"
        with calls.open("a") as handle:
            handle.write(",".join(r.id for r in requests) + "\n")
        number = len(calls.read_text().splitlines())
        if self.fail_on_call is None or number == self.fail_on_call:
            import torch

            raise torch.OutOfMemoryError(OOM)
        return self.engine.generate(requests, watches)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def faulty_generate(folder: Path, fail_on_call: int | None):
    """A Generate subclass failing on call number `fail_on_call` of the whole job, or on every call when None."""

    class FaultyGenerate(Generate):
        def make_engine(self, model):
            return FaultyEngine(super().make_engine(model), folder, fail_on_call)

    return FaultyGenerate
