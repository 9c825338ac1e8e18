"""The built-in tiny Gemma 4 Unified: the real classes and file layout at a size that runs anywhere.

Nothing can be fetched from a model hub in tests or the demo, so the tokenizer, chat template, processor config
(and, in `build_tiny_model`, random weights) are made locally. A real checkpoint loads through the same code.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pipelines.media.image import DEFAULT_SOFT_TOKENS

# Gemma 4's special tokens. Ids are whatever the tiny vocabulary gives them; code reads ids from the tokenizer.
NAMED_SPECIAL_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
}
OTHER_SPECIAL_TOKENS = ["<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|video|>"]
BASE_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]

_CORPUS = """
Transcribe the following speech segment in English into English text.
Transcribe the following speech segment in French, then translate it into German.
Describe this image in one sentence. Write a short caption for this picture.
Answer the question about the document. What is written on the first page?
Only output the transcription, with no newlines. When transcribing numbers, write the digits.
The quick brown fox jumps over the lazy dog. A cat sits on a red mat near the window.
A photo of a mountain lake at sunrise, with pine trees and a small wooden boat.
The report shows revenue growth of twelve percent in the third quarter of the year.
model user system assistant thought the a an of in on and to is it with for this that
"""


def chat_template() -> str:
    return resources.files("pipelines").joinpath("chat_template.jinja").read_text()


def build_tiny_tokenizer(vocab_size: int = 1024):
    """A Gemma-style tokenizer (BPE with byte fallback, spaces as '▁') over a small built-in corpus."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    specials = BASE_SPECIAL_TOKENS + list(NAMED_SPECIAL_TOKENS.values()) + OTHER_SPECIAL_TOKENS
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]

    trainer_model = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_model.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials) - len(byte_tokens), show_progress=False, special_tokens=[]
    )
    lines = [line for line in _CORPUS.strip().splitlines() if line]
    trainer_model.train_from_iterator(lines * 4, trainer=trainer)
    trained = trainer_model.get_vocab()
    merges = [tuple(pair) for pair in _merges_of(trainer_model)]

    vocab: dict[str, int] = {}
    for token in specials + byte_tokens + sorted(trained, key=trained.__getitem__):
        vocab.setdefault(token, len(vocab))

    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=dict(NAMED_SPECIAL_TOKENS),
    )
    tokenizer.add_special_tokens({"additional_special_tokens": OTHER_SPECIAL_TOKENS})
    tokenizer.chat_template = chat_template()
    return tokenizer


def _merges_of(tokenizer) -> list[list[str]]:
    import json

    return json.loads(tokenizer.to_str())["model"]["merges"]


def write_tiny_processor(directory: str | Path) -> Path:
    """Write tokenizer, chat template and processor config that `AutoProcessor.from_pretrained` loads."""
    from transformers import Gemma4UnifiedProcessor
    from transformers.models.gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
        Gemma4UnifiedImageProcessor,
        Gemma4UnifiedVideoProcessor,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    processor = Gemma4UnifiedProcessor(
        feature_extractor=Gemma4UnifiedAudioFeatureExtractor(),
        image_processor=Gemma4UnifiedImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Gemma4UnifiedVideoProcessor(),
        chat_template=chat_template(),
    )
    processor.save_pretrained(directory)
    return directory


# Small but structurally faithful: 5 sliding + 1 global layer (the real model's 5:1 pattern, last layer global),
# mixed head sizes (local 16 / global 32, as 256 / 512 in the real one), full-width patch and frame embedders.
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    global_head_dim=32,
    sliding_window=64,
    max_position_embeddings=8192,
)
TINY_ASSISTANT_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    global_head_dim=32,
    sliding_window=64,
    max_position_embeddings=8192,
    layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
)
NUM_ASSISTANT_TOKENS = 4
# Bumped whenever the files written here change (2: vision_config.num_soft_tokens).
TINY_REVISION = 2


def media_token_ids(tokenizer) -> dict:
    """The config's media token ids, taken from the tokenizer a checkpoint ships (so prompts and model agree)."""
    return dict(
        image_token_id=tokenizer.image_token_id,
        boi_token_id=tokenizer.boi_token_id,
        eoi_token_id=tokenizer.eoi_token_id,
        audio_token_id=tokenizer.audio_token_id,
        boa_token_id=tokenizer.boa_token_id,
        eoa_token_index=tokenizer.eoa_token_id,
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
    )


def text_token_ids(tokenizer) -> dict:
    """The text config's pad, end and start ids from the same tokenizer."""
    return dict(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id
    )


def build_tiny_model(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a complete tiny checkpoint: processor files, target model and its MTP assistant in `assistant/`."""
    import torch
    from transformers import (
        AutoTokenizer,
        Gemma4UnifiedAssistantConfig,
        Gemma4UnifiedAssistantForCausalLM,
        Gemma4UnifiedAudioConfig,
        Gemma4UnifiedConfig,
        Gemma4UnifiedForConditionalGeneration,
        Gemma4UnifiedTextConfig,
        Gemma4UnifiedVisionConfig,
    )

    from pipelines.engines import mtp_fix

    mtp_fix.apply()
    directory = Path(directory)
    write_tiny_processor(directory)

    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = dict(vocab_size=len(tokenizer), **text_token_ids(tokenizer))
    end_of_turn = tokenizer.convert_tokens_to_ids("<turn|>")
    text = Gemma4UnifiedTextConfig(**TINY_TEXT, **ids)
    config = Gemma4UnifiedConfig(
        text_config=text,
        # num_soft_tokens: the default image budget, as in the released config; vLLM's Gemma 4 processing reads it
        # to size its multimodal budget (transformers itself does not).
        vision_config=Gemma4UnifiedVisionConfig(
            mm_embed_dim=64, output_proj_dims=64, num_soft_tokens=DEFAULT_SOFT_TOKENS
        ),
        audio_config=Gemma4UnifiedAudioConfig(),
        **media_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Gemma4UnifiedForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(directory)

    assistant_config = Gemma4UnifiedAssistantConfig(
        text_config=Gemma4UnifiedTextConfig(**TINY_ASSISTANT_TEXT, **ids),
        backbone_hidden_size=TINY_TEXT["hidden_size"],
    )
    torch.manual_seed(seed + 1)
    assistant = Gemma4UnifiedAssistantForCausalLM(assistant_config).eval()
    assistant.generation_config.num_assistant_tokens = NUM_ASSISTANT_TOKENS
    assistant.generation_config.eos_token_id = model.generation_config.eos_token_id
    assistant.generation_config.pad_token_id = tokenizer.pad_token_id
    assistant.save_pretrained(directory / "assistant")
    return directory
