"""Random-weight Qwen3 (dense, MoE, hybrid) checkpoints of named shapes, and random prompts.

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
    # Qwen3-30B-A3B's layout scaled down: every layer sparse, 1/8 of the experts active.
    "moe-small": {"model_type": "qwen3_moe", "hidden_size": 512, "num_hidden_layers": 8,
                  "intermediate_size": 1536, "num_attention_heads": 8, "num_key_value_heads": 4,
                  "head_dim": 64, "num_experts": 32, "num_experts_per_tok": 4,
                  "moe_intermediate_size": 256, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "norm_topk_prob": True},
    # Qwen3.5's hybrid layout scaled down (6 Gated DeltaNet layers, full attention every 4th:
    # 2) with Qwen3-0.6B's attention geometry. A flat config and our module paths, which
    # mlx-lm's qwen3_5 loads too (it prefixes ``language_model.``).
    "hybrid": {"model_type": "qwen3_5", "hidden_size": 1024, "num_hidden_layers": 8,
               "intermediate_size": 3072, "num_attention_heads": 16, "num_key_value_heads": 8,
               "head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 16,
               "linear_key_head_dim": 128, "linear_value_head_dim": 128,
               "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
               "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                   "partial_rotary_factor": 0.25}},
}


def random_checkpoint(shape: str | dict[str, Any], dtype: str, folder: Path) -> Path:
    """A checkpoint (Qwen3, Qwen3-MoE or Qwen3.5) with random weights and the real Qwen3
    tokenizer files; ``shape``: a name of ``SHAPES`` or such a row itself."""
    from mlx.utils import tree_flatten

    from ..models.fetch import fetch
    from ..paths import download_dir, find_weights

    config = {"model_type": "qwen3", "vocab_size": 151936, "rms_norm_eps": 1e-6,
              "rope_theta": 1e6, "max_position_embeddings": 40960, "tie_word_embeddings": True,
              "eos_token_id": 151645, "torch_dtype": dtype,
              **(SHAPES[shape] if isinstance(shape, str) else shape)}
    mx.random.seed(0)
    model = _build(config)
    weights = {k: (v * 0.5).astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    # The benchmark uses the real Qwen3 tokenizer (hash-pinned, fetched once).
    tokenizer_dir = find_weights("qwen3-tokenizer") or fetch("tokenizer", download_dir())[0]
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def kept_checkpoint(shape: str | dict[str, Any], dtype: str, folder: Path) -> Path:
    """``random_checkpoint`` in ``folder``, built only where none is there yet, so runs that
    must load the same weights again (a restart, a second server) find them."""
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        random_checkpoint(shape, dtype, folder)
    return folder


def _build(config: dict[str, Any]):
    from ..models import MODEL_TYPES

    arch = MODEL_TYPES[config["model_type"]]
    return arch.Model(arch.ModelArgs.from_dict(config))


def parameter_counts(path: Path) -> dict[str, int]:
    """``{"total", "active"}`` parameters of the checkpoint at ``path`` (MoE: active < total).
    Counted from the config's shapes; no weights are read."""
    return _build(json.loads((path / "config.json").read_text())).num_parameters()


def make_prompts(n: int, length: int, vocab: int = 100000, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` random ordinary token ids (no special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab) for _ in range(length)] for _ in range(n)]
