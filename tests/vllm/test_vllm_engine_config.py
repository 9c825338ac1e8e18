"""vLLM's own engine-config construction for every EngineSpec combination we allow: each is accepted by vLLM, or
refused first by our spec with a clear message. Runs under `make test-vllm`; skipped where vLLM is not importable."""

from __future__ import annotations

import itertools
import typing

import pytest
from pydantic import ValidationError

vllm_platforms = pytest.importorskip("vllm.platforms", reason="vLLM is not installed: `make test-vllm`")
# vLLM needs some platform to build an engine config (the config itself does not depend on it), and modules bind
# `current_platform` when they are imported: CPU, the platform here, is set before any of them loads.
from vllm.platforms.cpu import CpuPlatform  # noqa: E402

vllm_platforms._current_platform = CpuPlatform()

from pipelines.config import EngineSpec, ModelSpec  # noqa: E402
from pipelines.engines.vllm_inputs import SPECULATIVE_METHOD, engine_kwargs  # noqa: E402
from pipelines.model_sources import resolve  # noqa: E402

QUANTIZATIONS = typing.get_args(EngineSpec.model_fields["quantization"].annotation)
DTYPES = typing.get_args(EngineSpec.model_fields["dtype"].annotation)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return resolve(ModelSpec(name="tiny", assistant="tiny"))


@pytest.mark.parametrize(
    ("quantization", "speculative", "dtype"), list(itertools.product(QUANTIZATIONS, (False, True), DTYPES))
)
def test_every_allowed_combination_builds_a_vllm_engine_config(tiny, quantization, speculative, dtype):
    from vllm.engine.arg_utils import EngineArgs

    try:
        spec = EngineSpec(
            kind="vllm", quantization=quantization, speculative=speculative, dtype=dtype, max_model_len=1024
        )
    except ValidationError as exc:  # the combinations vLLM would refuse at start-up are refused here, by name
        if quantization.startswith("bnb-"):
            assert "transformers engine only" in str(exc) and "fp8" in str(exc)
        else:
            assert (quantization, dtype) == ("fp8", "float32") and "bfloat16 or float16" in str(exc)
        return
    config = EngineArgs(**engine_kwargs(spec, tiny.path, tiny.assistant_path)).create_engine_config()
    if dtype != "auto":
        assert str(config.model_config.dtype) == f"torch.{dtype}"
    if speculative:
        assert config.speculative_config.method == SPECULATIVE_METHOD
        assert config.speculative_config.num_speculative_tokens == spec.num_speculative_tokens
    else:
        assert config.speculative_config is None
    if quantization == "fp8":
        assert config.model_config.quantization == "fp8_per_tensor"
    elif quantization in ("none", "compressed-tensors"):  # the tiny checkpoint carries no quantization_config
        assert config.model_config.quantization is None
