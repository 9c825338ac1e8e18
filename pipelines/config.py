"""The config pieces shared by batch jobs and the endpoint: which model, which engine, what media limits.

`JobSpec` (jobs/) and `ServeSpec` (serving/) embed these same classes, so one YAML block means the same thing in
both places. Every field has a description and a bound; validation happens once, at the boundary.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.media.image import DEFAULT_MAX_PIXELS, DEFAULT_SOFT_TOKENS, SUPPORTED_SOFT_TOKENS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PRESETS: dict[str, tuple[str, str | None]] = {
    "gemma-4-12b-it": ("google/gemma-4-12B-it", "google/gemma-4-12B-it-assistant"),
    "gemma-4-12b": ("google/gemma-4-12B", None),
    "gemma-4-12b-it-qat": ("google/gemma-4-12B-it-qat-w4a16-ct", "google/gemma-4-12B-it-assistant"),
}


class ModelSpec(Strict):
    name: str = Field(
        "tiny",
        min_length=1,
        max_length=1024,
        description="`tiny` (built-in random model), a preset (gemma-4-12b-it), a local directory, a Hugging Face "
        "id, or an fsspec URL such as s3://bucket/models/gemma-4-12B-it/ (mirrored once per node).",
    )
    assistant: str | None = Field(
        "auto",
        max_length=1024,
        description="MTP drafter for speculative decoding: `auto` (the preset's or tiny's own), `none`, or a "
        "directory / id / URL like `name`.",
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="fsspec options for a model held in object storage (endpoint_url, ...)."
    )


class EngineSpec(Strict):
    kind: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers (CPU or GPU, the reference) or vllm (GPU, the `vllm` extra)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when a GPU is visible.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU."
    )
    quantization: Literal["none", "fp8", "bnb-8bit", "bnb-4bit", "compressed-tensors"] = Field(
        "none",
        description="Weight quantization so the 12B fits a 16 GB card: fp8 (vllm, or transformers on compute "
        "capability >= 8.9), bnb-8bit / bnb-4bit (transformers with bitsandbytes), compressed-tensors (the QAT "
        "w4a16 checkpoint, vllm).",
    )
    speculative: bool = Field(True, description="Use the MTP assistant when the model has one.")
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="Draft length for speculative decoding.")
    max_batch_size: int = Field(8, ge=1, le=1024, description="Requests per forward pass (transformers engine).")
    max_model_len: int = Field(8192, ge=256, le=262_144, description="Prompt plus output tokens per request.")
    gpu_memory_utilization: float = Field(0.90, gt=0.1, le=0.99, description="vLLM's share of GPU memory.")
    max_images_per_prompt: int = Field(8, ge=0, le=64, description="vLLM limit_mm_per_prompt for images.")


class MediaSpec(Strict):
    max_soft_tokens: int = Field(DEFAULT_SOFT_TOKENS, description="Image token budget: 70, 140, 280, 560 or 1120.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, le=2_000_000_000, description="Decoded image pixel limit.")
    max_audio_s: float = Field(4 * 3600.0, gt=0, le=48 * 3600.0, description="Audio duration limit in seconds.")
    window_s: float = Field(30.0, gt=0, le=30.0, description="Audio window length (the model takes 30 s at most).")
    overlap_s: float = Field(0.0, ge=0, lt=30.0, description="Overlap between consecutive audio windows.")
    max_pages: int = Field(8, ge=1, le=64, description="Document pages per request; longer documents are split.")
    max_document_pages: int = Field(500, ge=1, le=100_000, description="Documents over this are refused.")
    dpi: float = Field(144.0, ge=36, le=600, description="PDF rendering resolution.")

    @field_validator("max_soft_tokens")
    @classmethod
    def _supported_budget(cls, value: int) -> int:
        if value not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"must be one of {SUPPORTED_SOFT_TOKENS}")
        return value

    def limits(self):
        from pipelines.prepare import MediaLimits

        return MediaLimits(**self.model_dump())
