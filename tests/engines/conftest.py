from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from pipelines.config import ModelSpec
    from pipelines.model_sources import resolve

    return resolve(ModelSpec(name="tiny", assistant="tiny"))


@pytest.fixture(scope="session")
def plain_engine(tiny_model):
    from pipelines.config import EngineSpec
    from pipelines.engines.transformers import TransformersEngine

    return TransformersEngine(tiny_model, EngineSpec(speculative=False, max_batch_size=8))


@pytest.fixture(scope="session")
def speculative_engine(tiny_model):
    from pipelines.config import EngineSpec
    from pipelines.engines.transformers import TransformersEngine

    return TransformersEngine(tiny_model, EngineSpec(speculative=True, num_speculative_tokens=4))


@pytest.fixture(scope="session")
def png_bytes():
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def wav_bytes():
    rate = 16_000
    t = np.arange(int(rate * 1.3)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()
