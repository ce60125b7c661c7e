"""Random-weight Qwen3 checkpoints of named shapes, and random prompts.

Speed does not depend on the weights' values, so a random checkpoint with a real shape (and
the real Qwen3 tokenizer, for chat templates) measures what a real one would.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import mlx.core as mx

# One row per shape; a new shape (e.g. a MoE one) is one more row. Keys are config.json's.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32},
    "small": {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1536,
              "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64},
    # Qwen3-0.6B's attention on 4 thin layers: KV traffic, not the matmuls, decides.
    "kv": {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 768,
           "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128},
    "qwen3-0.6b": {"hidden_size": 1024, "num_hidden_layers": 28, "intermediate_size": 3072,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128},
}


def random_checkpoint(shape: str, dtype: str, folder: Path) -> Path:
    """A Qwen3 checkpoint with random weights and the real Qwen3 tokenizer files."""
    from mlx.utils import tree_flatten

    from ..config import PROJECT_ROOT
    from ..models.qwen3 import Model, ModelArgs

    config = {"model_type": "qwen3", "vocab_size": 151936, "rms_norm_eps": 1e-6,
              "rope_theta": 1e6, "max_position_embeddings": 40960, "tie_word_embeddings": True,
              "eos_token_id": 151645, "torch_dtype": dtype, **SHAPES[shape]}
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    weights = {k: (v * 0.5).astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_dir = PROJECT_ROOT / "weights" / "qwen3-tokenizer"
    if not tokenizer_dir.exists():
        raise SystemExit("run `just fetch` first (the benchmark uses the real Qwen3 tokenizer)")
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def make_prompts(n: int, length: int, vocab: int = 100000, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` random ordinary token ids (no special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab) for _ in range(length)] for _ in range(n)]
