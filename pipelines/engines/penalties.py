"""OpenAI's frequency and presence penalties as a transformers logits processor.

transformers' own `repetition_penalty` divides logits (CTRL's rule) and counts the prompt too; OpenAI's (and vLLM's)
penalties subtract `count * frequency + (count > 0) * presence` for each token already generated.
"""

from __future__ import annotations

from transformers import LogitsProcessor


class CountPenalties(LogitsProcessor):
    def __init__(self, prompt_length: int, frequency: float, presence: float) -> None:
        self.prompt_length = prompt_length
        self.frequency = frequency
        self.presence = presence

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence
