"""The config pieces shared by batch jobs and the endpoint: which model, which engine, what media limits.

`JobSpec` (jobs/) and `ServeSpec` (serving/) embed these same classes, so one YAML block means the same thing in
both places. Every field has a description and a bound; validation happens once, at the boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.errors import GemmaUnifiedError
from pipelines.media.image import DEFAULT_MAX_PIXELS, DEFAULT_SOFT_TOKENS, SUPPORTED_SOFT_TOKENS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PRESETS: dict[str, tuple[str, str | None]] = {
    "gemma-4-12b-it": ("google/gemma-4-12B-it", "google/gemma-4-12B-it-assistant"),
    "gemma-4-12b": ("google/gemma-4-12B", None),
    "gemma-4-12b-it-qat": ("google/gemma-4-12B-it-qat-w4a16-ct", "google/gemma-4-12B-it-assistant"),
}


# Quantization choices vLLM cannot load (vLLM 0.30-0.33 reject "bitsandbytes" as an unknown method for this model).
VLLM_REFUSED_QUANTIZATION = ("bnb-8bit", "bnb-4bit")


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
        description="MTP drafter for speculative decoding: `auto` (the preset's, or `assistant/` inside the model "
        "directory; none for tiny, whose random drafter is accepted only by chance), `none`, `tiny` (the tiny "
        "model's drafter), or a directory / id / URL like `name`.",
    )
    storage_options: dict[str, Any] = Field(
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
        "capability >= 8.9), bnb-8bit / bnb-4bit (transformers with bitsandbytes only: vLLM has no bitsandbytes "
        "route for this model), compressed-tensors (the QAT w4a16 checkpoint, vllm).",
    )
    speculative: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Speculative decoding with the MTP assistant, when the model has one: `on`, `off`, or `auto` "
        "(vLLM always speculates; the transformers engine speculates when a single request is waiting and batches "
        "otherwise, since its assisted generation runs one request at a time). `true` / `false` mean on / off.",
    )
    num_speculative_tokens: int = Field(
        3,
        ge=1,
        le=16,
        description="Draft length: the assistant drafts one token per forward pass, chained, and later drafts are "
        "accepted less often (see pipelines/engines/vllm_inputs.py).",
    )
    max_batch_size: int = Field(8, ge=1, le=1024, description="Requests per forward pass (transformers engine).")
    max_model_len: int = Field(8192, ge=256, le=262_144, description="Prompt plus output tokens per request.")
    gpu_memory_utilization: float = Field(0.90, gt=0.1, le=0.99, description="vLLM's share of GPU memory.")
    max_images_per_prompt: int = Field(8, ge=0, le=64, description="vLLM limit_mm_per_prompt for images.")

    @field_validator("speculative", mode="before")
    @classmethod
    def _speculative_aliases(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    @property
    def speculates(self) -> bool:
        """Whether the assistant is loaded at all (`auto` or `on`)."""
        return self.speculative != "off"

    @model_validator(mode="after")
    def _engine_supports_quantization(self) -> EngineSpec:
        if self.kind == "vllm" and self.quantization in VLLM_REFUSED_QUANTIZATION:
            raise ValueError(
                f"quantization={self.quantization} runs on the transformers engine only (vLLM has no bitsandbytes "
                "quantization for this model); with kind=vllm use fp8, or compressed-tensors with the QAT "
                "checkpoint (model gemma-4-12b-it-qat)"
            )
        if self.kind == "vllm" and self.quantization == "fp8" and self.dtype == "float32":
            raise ValueError(
                "quantization=fp8 computes in bfloat16 or float16 on vLLM: set dtype to one of them (or auto)"
            )
        return self


class MediaSpec(Strict):
    """Media limits and decoding settings: the job's `media` section, and what every decoder is given."""

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


class InputSpec(Strict):
    url: str = Field(..., min_length=1, max_length=4096, description="Directory, glob, tar shard(s) or manifest URL.")
    format: Literal["auto", "files", "tar", "manifest", "openai-batch"] = Field(
        "auto",
        description="auto: a .jsonl file whose first line is an OpenAI batch request (custom_id, method, url, body) "
        "is an OpenAI batch file; another .parquet/.jsonl/.csv file is a manifest; in a directory or glob, .tar "
        "files are WebDataset shards and media files are items. files / tar / manifest / openai-batch force one "
        "reading.",
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (endpoint_url, ...).")
    skip_unsupported: bool = Field(
        False,
        description="In a directory or glob, leave out files that are neither a known media extension nor "
        "recognised by their content, counting them as skipped in _job.json and the summary. Off: each such file "
        "is an error row.",
    )


class SamplingDefaults(Strict):
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="When a request sets none (Gemma's suggestion).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="When a request sets none (Gemma's suggestion).")
    top_k: int = Field(64, ge=0, le=1000, description="When a request sets none; 0 disables top-k.")


class ChatLimits(Strict):
    """Limits on one chat request, online (per request) and in OpenAI batch files (per line)."""

    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, le=2 * 1024**3, description="Request body size; larger bodies get 413."
    )
    max_output_tokens: int = Field(
        2048, ge=1, le=32_768, description="Upper bound on max_tokens; a request asking for more gets 400."
    )
    default_output_tokens: int | None = Field(
        None,
        ge=1,
        le=32_768,
        description="max_tokens when a request sets none; unset: what the context leaves after the prompt. Either "
        "way capped at max_output_tokens and at what the context leaves.",
    )
    max_images_per_request: int = Field(8, ge=0, le=64, description="Image parts in one chat request.")
    max_audio_per_request: int = Field(1, ge=0, le=8, description="Audio parts in one chat request.")
    max_messages: int = Field(64, ge=1, le=4096, description="Messages in one chat request.")


class RemoteMediaSpec(Strict):
    allow_object_storage: bool = Field(False, description="Fetch s3://, gs://, az:// image URLs through fsspec.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for those URLs.")
    http_allow_list: list[str] = Field(
        default_factory=list,
        max_length=1024,
        description="Hosts whose http(s) URLs may be fetched: exact names or IPs, or `*.example.com`. Empty: no "
        "http(s) fetching at all.",
    )
    allow_private_networks: bool = Field(
        False,
        description="Let allow-listed hosts resolve to private, loopback or link-local addresses. Only for trusted "
        "internal media servers: it turns the server-side request forgery guard off.",
    )
    fetch_timeout_s: float = Field(10.0, gt=0, le=300, description="Whole-fetch timeout for one URL.")
    max_fetch_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, le=2 * 1024**3, description="Largest media file fetched from a URL."
    )
    max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed (each target is checked again).")


class ChatSpec(Strict):
    """How OpenAI chat requests are read: by the endpoint, and line by line in OpenAI batch files."""

    served_model_name: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="The `model` a request must name, and the one answers carry; model.name when unset.",
    )
    sampling: SamplingDefaults = Field(
        default_factory=SamplingDefaults, description="Sampling for requests that leave a setting unset."
    )
    limits: ChatLimits = Field(default_factory=ChatLimits, description="Limits on each request.")


class TaskSpec(Strict):
    task: Literal["caption", "transcribe", "translate", "answer", "prompt"] = Field(
        "caption", description="What to do with each item."
    )
    language: str | None = Field(None, max_length=64, description="transcribe: the spoken language, if known.")
    source_language: str | None = Field(None, max_length=64, description="translate: the spoken language.")
    target_language: str | None = Field(None, max_length=64, description="translate: the language to translate into.")
    question: str | None = Field(
        None, max_length=20_000, description="answer: the question (a manifest row may set its own)."
    )
    prompt: str | None = Field(
        None, max_length=20_000, description="prompt: the instruction; caption: replaces the default."
    )
    system: str | None = Field(None, max_length=20_000, description="An optional system turn.")
    thinking: bool = Field(False, description="Let the model think first (thoughts are stripped from the output).")
    max_new_tokens: int = Field(256, ge=1, le=32_768, description="Output tokens per request.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 is greedy (the batch default, reproducible).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, le=1000, description="Top-k sampling; 0 disables it.")
    seed: int | None = Field(None, ge=0, description="Sampling seed.")
    stop: list[str] = Field(default_factory=list, max_length=16, description="Stop strings.")


class ResourcesSpec(Strict):
    address: str | None = Field(None, description="Ray cluster address; RAY_ADDRESS or a new local instance if unset.")
    replicas: int = Field(1, ge=1, le=1024, description="Model actors (one model replica each).")
    batch_size: int = Field(8, ge=1, le=4096, description="Units handed to a model actor per call.")
    max_concurrent_batches: int = Field(
        4,
        ge=1,
        le=256,
        description="Ray Data batches in flight per model actor: the replica runtime re-batches their requests so "
        "the engine always has a full batch waiting (like ray.data.llm's max_concurrent_batches).",
    )
    gpus_per_replica: float | None = Field(
        None, ge=0, le=8, description="GPUs per model actor; default 1 when the cluster has GPUs, else 0."
    )
    cpus_per_replica: float = Field(1.0, ge=0.1, le=256, description="CPUs reserved per model actor.")
    replica_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per model actor (e.g. a node label)."
    )
    prepare_concurrency: int | None = Field(None, ge=1, le=100_000, description="Parallel CPU prepare tasks.")
    items_per_prepare_task: int = Field(
        16, ge=1, le=10_000, description="Items per CPU prepare task: small keeps results streaming to the model."
    )
    num_cpus: int | None = Field(None, ge=1, le=100_000, description="CPUs for a local Ray instance.")
    object_store_mb: int = Field(1024, ge=64, le=1_000_000, description="Object store size of a local Ray instance.")
    max_replica_restarts: int = Field(
        3,
        ge=0,
        le=1000,
        description="Times a model actor is replaced after a fatal engine error (out of memory, dead engine) before "
        "the job fails; its in-flight units are retried on the replacement.",
    )


class OutputSpec(Strict):
    url: str = Field(..., min_length=1, max_length=4096, description="Where results/, errors/ and _job.json go.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the output.")
    retry_failed: bool = Field(True, description="On rerun, retry items recorded in errors/.")


class JobSpec(Strict):
    input: InputSpec
    task: TaskSpec = Field(default_factory=TaskSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    media: MediaSpec = Field(default_factory=MediaSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    output: OutputSpec
    chat: ChatSpec = Field(default_factory=ChatSpec, description="OpenAI batch input: how each request is read.")
    remote_media: RemoteMediaSpec = Field(
        default_factory=lambda: RemoteMediaSpec(allow_object_storage=True),
        description="OpenAI batch input: which image URLs may be fetched (object storage through the input's "
        "storage options; http(s) only for allow-listed hosts, through the same guard as the endpoint).",
    )

    def fingerprint(self) -> str:
        """What decides the output's content: a rerun with another fingerprint on the same output is refused."""
        import hashlib
        import json

        relevant = {
            "input": self.input.model_dump(exclude={"storage_options"}),
            "task": self.task.model_dump(),
            "model": self.model.model_dump(exclude={"storage_options"}),
            "engine": self.engine.model_dump(include={"kind", "dtype", "quantization"}),
            "media": self.media.model_dump(),
        }
        if self.chat != ChatSpec():  # only where set, so outputs written before this field existed still resume
            relevant["chat"] = self.chat.model_dump()
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def merge_overrides(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` laid over it: nested mappings merge, and None leaves a field as it is."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict):
            inner = merge_overrides(merged[key] if isinstance(merged.get(key), dict) else {}, value)
            if inner or key in merged:
                merged[key] = inner
        elif value is not None:
            merged[key] = value
    return merged


def describe_validation(error, source: str) -> str:
    """A pydantic ValidationError as one line naming the source and each field with its problem."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
    return f"{source}: {problems}"


class SpecError(GemmaUnifiedError):
    """A spec file or its overrides do not make a valid spec; the message names the file and the fields."""


SpecT = TypeVar("SpecT", bound=BaseModel)


def build_spec(model: type[SpecT], data: dict, overrides: dict | None = None, source: str = "spec") -> SpecT:
    """A spec (JobSpec, ServeSpec) from a mapping plus overrides (nested dicts; None leaves a field alone)."""
    try:
        return model.model_validate(merge_overrides(data, overrides or {}))
    except ValidationError as exc:
        raise SpecError(describe_validation(exc, source)) from None


def read_spec_file(path: str | Path, what: str, sections: str) -> dict:
    """The mapping in a YAML spec file; `what` ("job", "serve") and `sections` name what a valid file holds."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: cannot read the {what} file: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a {what} file is a mapping with {sections}")
    return data


def load_spec_file(
    model: type[SpecT], path: str | Path | None, overrides: dict | None, what: str, sections: str
) -> SpecT:
    data = read_spec_file(path, what, sections) if path else {}
    return build_spec(model, data, overrides, str(path) if path else "command line")
