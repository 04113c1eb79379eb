"""Plain Hugging Face ``generate()`` for :class:`.molmo2.TransformersEngine`: the reference its fast
path's greedy answers must equal (tests, the benchmark's check), and ``MOLMO_DECODER=generate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessorList

from molmo_backend.engine.base import Answer, PointQuery
from molmo_backend.engine.inprocess import TokenLogprobs, cut_at_end


def plain_generate(engine, queries: Sequence[PointQuery]) -> list[Answer]:
    """Greedy ``generate()`` of ``engine``'s model on left-padded full prompts, one batch."""
    inputs = engine.processor(
        images=[[q.image] for q in queries],
        text=[engine.chat_text(q.prompt) for q in queries],
        padding=True,
        return_tensors="pt",
    ).to(engine.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(engine.dtype)
    recorder = TokenLogprobs()
    with torch.inference_mode():
        sequences = engine.model.generate(
            **inputs,
            max_new_tokens=engine.max_new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([*engine.logits_processors, recorder]),
        )
    ends = engine._eos_ids | ({engine._pad_id} if engine._pad_id is not None else set())
    tokens, logprobs = cut_at_end(sequences[:, inputs["input_ids"].shape[1] :].tolist(), recorder.steps, ends)
    return engine._answers(tokens, logprobs, [len(t) >= engine.max_new_tokens for t in tokens])
