"""Prepared rows -> vLLM inputs: prompt dicts, sampling kwargs and engine kwargs. Pure functions, no vLLM import.

vLLM's Gemma 4 Unified support (`vllm/model_executor/models/gemma4_unified.py`, whose processor lives in
`gemma4_mm.py`) takes raw images and (waveform, rate) tuples and does its own resizing and patching; precomputed
patches are not accepted. The prompt must hold one unexpanded placeholder per item (`<|image|>`, `<|audio|>`): vLLM
replaces each with `begin + soft token x N + end`, N computed by its own arithmetic. So prepared rows are turned back
into images and waveforms here, chosen so that vLLM arrives at the same grid and token counts as the prepare stage.

Images: a prepared image is already resized to its 48-px grid, but only about two in three such grids are fixed
points of the resize rule (flooring both sides leaves budget unused, so a second pass grows the image). When the
rebuilt image is a fixed point it goes to vLLM unchanged and vLLM's patches are bit-identical to ours. Otherwise it
is resampled to a "pre-image" size whose aspect ratio makes the rule land on exactly the prepared grid, so vLLM's one
resize brings it back: same grid, positions and token count, at the cost of a resampling round trip (a slight
blur: mean error about 0.1/255 on smooth images, 1-3/255 on noisy ones). Exact would be shipping the decoded image.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipelines.config import EngineSpec
from pipelines.engines.base import PreparedRequest, SamplingParams
from pipelines.errors import InvalidRequest, LimitExceeded
from pipelines.media.image import PATCH, PATCH_DIM, SUPPORTED_SOFT_TOKENS, resize, target_size
from pipelines.prompts import media_markers, strip_thinking

SAMPLE_RATE = 16_000
SAMPLES_PER_TOKEN = 640
MAX_AUDIO_TOKENS = 750  # the processor's audio_seq_length: vLLM caps its placeholder count here
VLLM_EXTRA = "vLLM is not installed: pip install 'gemma-unified[vllm]' (GPU only)"

# ---- images ----


def unpatchify(patches: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rebuild the resized uint8 RGB image [H, W, 3] from patches [n, 6912] and (x, y) positions [n, 2]."""
    if patches.ndim != 2 or patches.shape[1] != PATCH_DIM or positions.shape != (patches.shape[0], 2):
        raise InvalidRequest(f"image patches must be [n, {PATCH_DIM}] with positions [n, 2]")
    if patches.shape[0] == 0:
        raise InvalidRequest("an image has no patches")
    xs, ys = positions[:, 0].astype(np.int64), positions[:, 1].astype(np.int64)
    if xs.min() < 0 or ys.min() < 0:
        raise InvalidRequest("image positions must be non-negative (padding rows are not part of the image)")
    cols, rows = int(xs.max()) + 1, int(ys.max()) + 1
    if rows * cols != patches.shape[0] or len(set(zip(xs.tolist(), ys.tolist()))) != rows * cols:
        raise InvalidRequest(f"image positions do not cover a full {rows}x{cols} grid exactly once")
    grid = np.empty((rows, cols, PATCH, PATCH, 3), dtype=np.uint8)
    grid[ys, xs] = patches.reshape(-1, PATCH, PATCH, 3)
    return np.ascontiguousarray(grid.swapaxes(1, 2).reshape(rows * PATCH, cols * PATCH, 3))


def vllm_image_size(height: int, width: int, max_soft_tokens: int) -> tuple[int, int]:
    """The resized size vLLM's placeholder count assumes (Gemma4ProcessingInfo._compute_num_soft_tokens).

    Same rule as `target_size` but computed with different float expressions and a plain max(48, ...) instead of
    the thin-image fallback; the two must agree on an image for vLLM's placeholders to match its patches.
    """
    unit = PATCH
    max_patches = max_soft_tokens * 9
    scale = math.sqrt(max_patches / ((height / 16) * (width / 16)))
    th = max(unit, int(math.floor(height * scale / unit)) * unit)
    tw = max(unit, int(math.floor(width * scale / unit)) * unit)
    return th, tw


def _lands_on(size: tuple[int, int], grid_size: tuple[int, int], max_soft_tokens: int) -> bool:
    try:
        resized = target_size(*size, max_soft_tokens)
    except InvalidRequest:  # a size too thin for any grid
        return False
    return resized == grid_size and vllm_image_size(*size, max_soft_tokens) == grid_size


def is_fixed_point(height: int, width: int, max_soft_tokens: int) -> bool:
    """True when neither transformers' resize rule nor vLLM's token arithmetic would change this size."""
    size = (height, width)
    return _lands_on(size, size, max_soft_tokens)


def stable_size_for_vllm(height: int, width: int, max_soft_tokens: int) -> tuple[int, int] | None:
    """The size to hand vLLM for a prepared image of (height, width) so that its resize lands on that same size.

    (height, width) itself when it is a fixed point; otherwise a pre-image size; None when the grid cannot come
    from this budget at all. The rule floors f*H/48 and f*W/48 with f = sqrt(budget / area), so only the aspect
    ratio rho = H/W matters: rows r and cols c come out when r^2 <= budget*rho < (r+1)^2 and
    c^2 <= budget/rho < (c+1)^2. Any rho in that interval works; its geometric middle keeps both float variants
    of the rule well away from the floor boundaries.
    """
    if height % PATCH or width % PATCH or height <= 0 or width <= 0:
        return None
    rows, cols = height // PATCH, width // PATCH
    if rows * cols > max_soft_tokens:
        return None
    if is_fixed_point(height, width, max_soft_tokens):
        return height, width
    low = max(rows * rows / max_soft_tokens, max_soft_tokens / (cols + 1) ** 2)
    high = min((rows + 1) ** 2 / max_soft_tokens, max_soft_tokens / (cols * cols))
    if low > high:
        return None
    area = height * width  # keep about the same pixel count: the smallest resample
    offsets = (0, 1, -1, 2, -2, 3, -3)
    # The middle of the interval first; its ends too, for grids that only floating-point rounding at the exact
    # boundary produced (an aspect ratio of exactly 4/70 at budget 70, say).
    for rho in (math.sqrt(low * high), low, high):
        for scale in (1, 2, 4, 8, 16):
            h0 = round(math.sqrt(area * rho) * scale)
            w0 = round(math.sqrt(area / rho) * scale)
            for dh in offsets:
                for dw in offsets:
                    size = (h0 + dh, w0 + dw)
                    if min(size) > 0 and _lands_on(size, (height, width), max_soft_tokens):
                        return size
        # At an exact boundary only an exact ratio p/q will do: try multiples of it near the same area.
        ratio = Fraction(rho).limit_denominator(4096)
        p, q = ratio.numerator, ratio.denominator
        k0 = max(1, round(math.sqrt(area / (p * q))))
        for k in sorted(range(1, 2 * k0 + 2), key=lambda k: abs(k - k0)):  # nearest to the same area first
            size = (p * k, q * k)
            if _lands_on(size, (height, width), max_soft_tokens):
                return size
    return None


def infer_soft_tokens(sizes: list[tuple[int, int]]) -> int:
    """The smallest supported budget every prepared image size is consistent with."""
    for budget in SUPPORTED_SOFT_TOKENS:
        if all(stable_size_for_vllm(h, w, budget) is not None for h, w in sizes):
            return budget
    raise InvalidRequest(f"no image token budget in {SUPPORTED_SOFT_TOKENS} produces these image sizes: {sizes}")


def image_for_vllm(rebuilt: np.ndarray, max_soft_tokens: int) -> np.ndarray:
    """The uint8 RGB image to give vLLM so that its own resize and patching reproduce this rebuilt grid image."""
    height, width = rebuilt.shape[:2]
    size = stable_size_for_vllm(height, width, max_soft_tokens)
    if size is None:
        raise InvalidRequest(
            f"a {height}x{width} image grid cannot come from max_soft_tokens={max_soft_tokens}; "
            "prepare and generate must use the same image budget"
        )
    return rebuilt if size == (height, width) else resize(rebuilt, size)


# ---- audio ----


def vllm_audio_tokens(num_samples: int) -> int:
    """vLLM's placeholder count for a waveform (Gemma4ProcessingInfo._compute_audio_num_tokens, mel framing and
    two stride-2 convolutions). It is one short of transformers' ceil(n / 640) when n % 640 is in [1, 160]."""
    frame, hop = 320, 160
    mel_frames = (num_samples + frame // 2 - (frame + 1)) // hop + 1
    if mel_frames <= 0:
        return 0
    tokens = mel_frames
    for _ in range(2):
        tokens = (tokens + 2 - 3) // 2 + 1
    return min(tokens, MAX_AUDIO_TOKENS)


def audio_for_vllm(frames: np.ndarray) -> tuple[np.ndarray, int]:
    """[t, 640] frames -> (waveform of t*640 samples, 16000). The tail is already zero-padded to a whole frame, so
    vLLM's count and transformers' count agree (both give t)."""
    if frames.ndim != 2 or frames.shape[1] != SAMPLES_PER_TOKEN or frames.shape[0] == 0:
        raise InvalidRequest(f"audio frames must be a non-empty [t, {SAMPLES_PER_TOKEN}] array")
    if frames.shape[0] > MAX_AUDIO_TOKENS:
        raise LimitExceeded(
            f"an audio clip of {frames.shape[0]} frames is over the model's {MAX_AUDIO_TOKENS} (30 s); "
            "cut it into windows first"
        )
    return np.ascontiguousarray(frames, dtype=np.float32).reshape(-1), SAMPLE_RATE


# ---- prompts ----


def collapse_placeholders(ids: list[int], tokenizer, image_tokens: list[int], audio_tokens: list[int]) -> list[int]:
    """Undo the placeholder expansion: each `begin + soft x N + end` run becomes the single soft token vLLM's
    processor looks for. Run lengths are checked against the media, in prompt order."""
    m = media_markers(tokenizer)
    runs = {m.boi: (m.image, m.eoi, iter(image_tokens), "image"), m.boa: (m.audio, m.eoa, iter(audio_tokens), "audio")}
    out: list[int] = []
    index, n = 0, len(ids)
    while index < n:
        token = ids[index]
        if token in runs:
            body, end, counts, kind = runs[token]
            stop = index + 1
            while stop < n and ids[stop] == body:
                stop += 1
            if stop >= n or ids[stop] != end:
                raise InvalidRequest(f"an {kind} placeholder run in the prompt is not closed")
            expected = next(counts, None)
            if expected is None:
                raise InvalidRequest(f"the prompt has more {kind} placeholders than {kind} items")
            if stop - index - 1 != expected:
                raise InvalidRequest(
                    f"an {kind} placeholder run has {stop - index - 1} tokens but its {kind} has {expected}"
                )
            out.append(body)
            index = stop + 1
        elif token in (m.image, m.audio):
            raise InvalidRequest("the prompt has a soft media token outside a begin/end run")
        else:
            out.append(int(token))
            index += 1
    for _, _, counts, kind in runs.values():
        if next(counts, None) is not None:
            raise InvalidRequest(f"more {kind} items than {kind} placeholders in the prompt")
    return out


def to_vllm_prompt(request: PreparedRequest, tokenizer, max_soft_tokens: int | None = None) -> dict:
    """A vLLM TokensPrompt dict: unexpanded prompt ids plus images and audio for vLLM's own processor.

    `max_soft_tokens` is the image budget the request was prepared with; None infers the smallest consistent one.
    """
    if len(request.audio_frames) > 1:
        raise InvalidRequest(
            f"the vllm engine takes at most one audio clip per request, this one has {len(request.audio_frames)} "
            "(vLLM fails on several clips of different lengths); split the audio into separate requests",
            item=request.id,
            stage="generate",
        )
    try:
        ids = collapse_placeholders(
            request.prompt_token_ids.tolist(),
            tokenizer,
            [int(p.shape[0]) for p in request.image_patches],
            [int(f.shape[0]) for f in request.audio_frames],
        )
        prompt: dict = {"prompt_token_ids": ids}
        data: dict = {}
        if request.image_patches:
            from PIL import Image

            if len(request.image_positions) != len(request.image_patches):
                raise InvalidRequest("every image needs its positions")
            rebuilt = [unpatchify(p, pos) for p, pos in zip(request.image_patches, request.image_positions)]
            budget = max_soft_tokens or infer_soft_tokens([image.shape[:2] for image in rebuilt])
            data["image"] = [Image.fromarray(image_for_vllm(image, budget)) for image in rebuilt]
            prompt["mm_processor_kwargs"] = {"max_soft_tokens": budget}
        if request.audio_frames:
            data["audio"] = [audio_for_vllm(request.audio_frames[0])]
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, item=request.id, stage="generate") from None
    except LimitExceeded as exc:
        raise LimitExceeded(exc.message, item=request.id, stage="generate") from None
    if data:
        prompt["multi_modal_data"] = data
    return prompt


# ---- sampling ----


def stop_token_ids(tokenizer) -> list[int]:
    """End of sequence and end of turn: generation stops at either."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


def to_vllm_sampling_kwargs(sampling: SamplingParams, stop_ids: list[int] | None = None) -> dict:
    """Keyword arguments for vllm.SamplingParams. top_k 0 means 'all tokens' in vLLM too; temperature 0 is greedy."""
    kwargs = {
        "max_tokens": sampling.max_new_tokens,
        "temperature": max(sampling.temperature, 0.0),
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else 0,
        "seed": sampling.seed,
        "stop": list(sampling.stop),
    }
    if sampling.penalized:  # vLLM's penalties follow OpenAI's rule, as the transformers engine's do
        kwargs.update(frequency_penalty=sampling.frequency_penalty, presence_penalty=sampling.presence_penalty)
    if sampling.logit_bias:
        kwargs["logit_bias"] = dict(sampling.logit_bias)
    if stop_ids:
        kwargs["stop_token_ids"] = list(stop_ids)
    return kwargs


# ---- engine ----

# EngineSpec.quantization -> vLLM's `quantization` argument (names of vLLM 0.33, vllm/config/quantization.py).
# bnb-* never reach here: EngineSpec refuses them with kind=vllm.
_QUANTIZATION = {
    "none": None,
    # Online FP8 of a bf16 checkpoint. Plain "fp8" now means an FP8-serialized checkpoint only: vLLM 0.33's
    # Fp8Config raises for online use and names fp8_per_tensor as the replacement.
    "fp8": "fp8_per_tensor",
    "compressed-tensors": None,  # vLLM reads the method from the checkpoint's quantization_config
}

# The Gemma 4 assistant is a one-step drafter (vLLM sets n_predict=1 for gemma4_mtp). Both vLLM
# (v1/spec_decode/gemma4.py, Gemma4Proposer) and transformers (Gemma4AssistantCandidateGenerator.get_candidates)
# draft k tokens by running the whole assistant k times, feeding back its own hidden state and argmax token at the
# same position, with no KV of the drafts: draft i sees drafts < i only through that hidden state, so acceptance
# falls with position. EngineSpec.num_speculative_tokens' default (3) follows from that, see the field.
SPECULATIVE_METHOD = "mtp"


def vllm_quantization(quantization: str) -> str | None:
    if quantization not in _QUANTIZATION:
        raise ValueError(f"quantization={quantization} has no vLLM equivalent; use the transformers engine")
    return _QUANTIZATION[quantization]


def engine_kwargs(
    engine: EngineSpec,
    model_dir: str | Path,
    assistant_dir: str | Path | None,
    *,
    max_soft_tokens: int | None = None,
) -> dict:
    """Keyword arguments for vllm.LLM(...) and AsyncEngineArgs(...)."""
    kwargs: dict = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "dtype": engine.dtype,
        "quantization": vllm_quantization(engine.quantization),
        "max_model_len": engine.max_model_len,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        # One audio per request (see audio_for_vllm); no video: its 32-frame profiling reserves memory for nothing.
        "limit_mm_per_prompt": {"image": engine.max_images_per_prompt, "audio": 1, "video": 0},
        "trust_remote_code": False,
    }
    if max_soft_tokens is not None:
        # Also sizes vLLM's encoder-cache profiling for this budget.
        kwargs["mm_processor_kwargs"] = {"max_soft_tokens": max_soft_tokens}
    if engine.speculates and assistant_dir is not None:
        kwargs["speculative_config"] = {
            "method": SPECULATIVE_METHOD,  # named, not guessed by vLLM from the drafter's path
            "model": str(assistant_dir),
            "num_speculative_tokens": engine.num_speculative_tokens,
        }
        kwargs["disable_log_stats"] = False  # the draft/accept counters live in the engine's stats
    return kwargs


# ---- output text ----


def _hidden_ids(tokenizer) -> tuple[int | None, int | None, set[int]]:
    return (
        tokenizer.convert_tokens_to_ids("<|channel>"),
        tokenizer.convert_tokens_to_ids("<channel|>"),
        set(tokenizer.all_special_ids),
    )


def visible_ids(tokenizer, ids: list[int]) -> list[int]:
    """Generated ids without thinking blocks and without special tokens (as the transformers engine decodes)."""
    opening, closing, special = _hidden_ids(tokenizer)
    kept, thinking = [], False
    for token in ids:
        if token == opening:
            thinking = True
        elif token == closing:
            thinking = False
        elif not thinking and token not in special:
            kept.append(token)
    return kept


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> tuple[str, bool]:
    cut = min((text.index(s) for s in stop if s and s in text), default=None)
    return (text, False) if cut is None else (text[:cut], True)


def output_text(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[str, bool]:
    """(final text, whether a stop string cut it)."""
    text = tokenizer.decode(visible_ids(tokenizer, ids), skip_special_tokens=True)
    text, stopped = cut_at_stop(text, stop)
    return strip_thinking(text), stopped


class TextStream:
    """Token ids in, text deltas out: thinking blocks and special tokens hidden, stop strings honoured.

    The visible prefix is decoded whole each time (robust for byte-fallback pieces); text that might be the start
    of a stop string, or an incomplete UTF-8 sequence, is held back until it is resolved.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] | list[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._opening, self._closing, self._special = _hidden_ids(tokenizer)
        self._ids: list[int] = []
        self._thinking = False
        self._sent = 0
        self.stopped = False

    def push(self, new_ids, final: bool = False) -> str:
        if self.stopped:
            return ""
        for token in new_ids:
            if token == self._opening:
                self._thinking = True
            elif token == self._closing:
                self._thinking = False
            elif not self._thinking and token not in self._special:
                self._ids.append(int(token))
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        text, self.stopped = cut_at_stop(text, self.stop)
        end = len(text)
        if not (final or self.stopped):
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            hold = max((len(s) - 1 for s in self.stop), default=0)
            end = max(self._sent, min(end, len(text) - hold))
        delta = text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta
