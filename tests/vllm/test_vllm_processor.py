"""vLLM's own multimodal processor (Gemma4MultiModalProcessor, on CPU) expands our collapsed prompts to exactly our
prompt_token_ids. Runs under `make test-vllm` (vLLM's Python code beside the GPU set's transformers); skipped where
vLLM is not importable, as in the default test venv."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("vllm.multimodal", reason="vLLM is not installed: `make test-vllm`")

from pipelines.config import MediaSpec
from pipelines.engines.vllm_inputs import is_fixed_point, to_vllm_prompt
from pipelines.media.image import SUPPORTED_SOFT_TOKENS, target_size
from pipelines.prepare import prepare_item
from pipelines.prompts import Task, TaskOptions

OPTIONS = TaskOptions(task=Task.prompt, prompt="Describe.", question="What?")


@pytest.fixture(scope="module")
def vllm_processor(tiny_dir):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    config = ModelConfig(
        model=str(tiny_dir),
        tokenizer=str(tiny_dir),
        dtype="float32",
        max_model_len=8192,
        limit_mm_per_prompt={"image": 8, "audio": 1, "video": 0},
    )
    return MULTIMODAL_REGISTRY.create_processor(config)


def _expand(processor, prompt: dict):
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    items = processor.info.parse_mm_data(prompt.get("multi_modal_data", {}))
    out = processor.apply(
        ProcessorInputs(
            prompt=prompt["prompt_token_ids"],
            mm_data_items=items,
            hf_processor_mm_kwargs=prompt.get("mm_processor_kwargs", {}),
        ),
        TimingContext(),
    )
    placeholders = {k: [(r.offset, r.length) for r in v] for k, v in out["mm_placeholders"].items()}
    return list(out["prompt_token_ids"]), placeholders


def _runs(ids: list[int], begin: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of each begin ... end run, markers included, as vLLM's placeholder ranges count them."""
    runs, start = [], None
    for index, token in enumerate(ids):
        if token == begin:
            start = index
        elif token == end and start is not None:
            runs.append((start, index - start + 1))
            start = None
    return runs


def _check(processor, tokenizer, request, budget=None):
    prompt = to_vllm_prompt(request, tokenizer, budget)
    ids, placeholders = _expand(processor, prompt)
    ours = request.prompt_token_ids.tolist()
    assert ids == ours
    if request.image_patches:
        runs = _runs(ours, tokenizer.convert_tokens_to_ids("<|image>"), tokenizer.convert_tokens_to_ids("<image|>"))
        assert [length for _, length in placeholders["image"]] == [length for _, length in runs]
        assert [offset for offset, _ in placeholders["image"]] == [offset for offset, _ in runs]
    if request.audio_frames:
        runs = _runs(ours, tokenizer.convert_tokens_to_ids("<|audio>"), tokenizer.convert_tokens_to_ids("<audio|>"))
        assert placeholders["audio"] == runs
    return placeholders


def _png(height: int, width: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


SIZES = [(480, 640), (353, 790), (805, 211), (37, 999), (1080, 1920)]


def test_the_sizes_include_grids_that_are_not_fixed_points():
    grids = [(target_size(h, w, b), b) for b in SUPPORTED_SOFT_TOKENS for h, w in SIZES]
    assert any(not is_fixed_point(*grid, b) for grid, b in grids)
    assert any(is_fixed_point(*grid, b) for grid, b in grids)


@pytest.mark.parametrize("budget", SUPPORTED_SOFT_TOKENS)
def test_images_at_every_budget(vllm_processor, tokenizer, budget):
    for index, (height, width) in enumerate(SIZES):
        (request,) = prepare_item(
            _png(height, width, index),
            item_id=f"i{index}",
            name="x.png",
            tokenizer=tokenizer,
            options=OPTIONS,
            limits=MediaSpec(max_soft_tokens=budget),
        ).requests
        _check(vllm_processor, tokenizer, request, budget)


def test_several_images_and_pdf_pages(vllm_processor, tokenizer):
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument.new()
    for size in ((612, 792), (792, 612), (300, 900)):
        document.new_page(*size)
    buffer = io.BytesIO()
    document.save(buffer)
    (request,) = prepare_item(
        buffer.getvalue(),
        item_id="doc",
        name="x.pdf",
        tokenizer=tokenizer,
        options=TaskOptions(task=Task.answer, question="What?"),
        limits=MediaSpec(max_pages=3),
    ).requests
    assert len(request.image_patches) == 3
    placeholders = _check(vllm_processor, tokenizer, request, 280)
    assert len(placeholders["image"]) == 3


@pytest.mark.parametrize("extra", [0, 1, 160, 161, 639])
def test_audio_of_whole_and_partial_frames(vllm_processor, tokenizer, extra):
    import soundfile as sf

    samples = 25 * 640 + extra
    buffer = io.BytesIO()
    rng = np.random.default_rng(extra)
    sf.write(buffer, (rng.standard_normal(samples) * 0.1).astype(np.float32), 16000, format="WAV")
    (request,) = prepare_item(
        buffer.getvalue(), item_id="a", name="x.wav", tokenizer=tokenizer, options=TaskOptions(task=Task.transcribe)
    ).requests
    placeholders = _check(vllm_processor, tokenizer, request)
    assert placeholders["audio"][0][1] == 25 + (extra > 0) + 2  # ceil(n / 640) soft tokens plus the two markers
