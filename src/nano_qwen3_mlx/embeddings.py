"""Embedding helpers shared by ``LLM.embed`` and ``/v1/embeddings``.

Pooling is Qwen3-Embedding's: the last token's final-norm hidden state, L2-normalised (the
engine computes it, see ``LLMEngine.add_request(pooling=True)``). Text goes through the
tokenizer's own post-processor, so a Qwen3-Embedding checkpoint gets the ``<|endoftext|>``
its ``tokenizer.json`` appends and a chat checkpoint gets its text as is. Queries follow
Qwen3-Embedding's instruction convention, which the caller writes into the text:
``"Instruct: {task description}\\nQuery:{query}"``; documents carry no prefix.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any


def embedding_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as the checkpoint's tokenizer post-processes them for encoding."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return list(tokenizer.encode(text))
    return list(backend.encode(text, add_special_tokens=True).ids)


def truncate(vector: list[float], dimensions: int | None) -> list[float]:
    """Matryoshka truncation: the first ``dimensions`` values, renormalised to unit length."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]


def to_base64(vector: list[float]) -> str:
    """Little-endian float32 bytes, base64 (what OpenAI's ``encoding_format=base64`` is)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
