"""Prepared requests survive the trip through a plain row, sampling options included."""

from __future__ import annotations

import numpy as np

from pipelines.engines.base import PreparedRequest, SamplingParams
from pipelines.units import pack, unpack


def test_sampling_options_round_trip():
    sampling = SamplingParams(
        max_new_tokens=9,
        temperature=0.7,
        seed=3,
        stop=("\n",),
        frequency_penalty=0.5,
        presence_penalty=-0.25,
        logit_bias=((5, -100.0), (9, 2.5)),
    )
    request = PreparedRequest(
        id="a", prompt_token_ids=np.arange(4, dtype=np.int32), mm_token_type_ids=np.zeros(4, np.int8), sampling=sampling
    )
    (back,) = unpack(pack([request]))
    assert back.sampling == sampling and hash(back.sampling) == hash(sampling)
    assert back.prompt_token_ids.tolist() == [0, 1, 2, 3]
