"""Tiny random checkpoints for tests, written in the Hugging Face layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from nano_qwen3_mlx.models.qwen3 import Model, ModelArgs

TINY_QWEN3: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "float32",
}


def build_tiny_model(config: dict[str, Any], seed: int = 0) -> Model:
    """A random model whose logits are peaked enough that greedy decoding is stable
    (a scaled-up lm_head keeps near-ties between the top tokens rare)."""
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    params = tree_flatten(model.parameters())
    scaled = [(k, v * 4.0 if "lm_head" in k else v) for k, v in params]
    model.load_weights(scaled)
    mx.eval(model.parameters())
    return model


def write_checkpoint(
    path: Path, tokenizer_dir: Path, config_overrides: dict[str, Any] | None = None, seed: int = 0
) -> Path:
    """Write config.json, model.safetensors and the tokenizer files into ``path``."""
    config = {**TINY_QWEN3, **(config_overrides or {})}
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(config, seed)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [151645, 151643], "bos_token_id": 151643})
    )
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def quantize_checkpoint(src: Path, dst: Path, bits: int, group_size: int = 32) -> Path:
    """Quantize a checkpoint and save it in the mlx-community layout."""
    config = json.loads((src / "config.json").read_text())
    model = Model(ModelArgs.from_dict(config))
    model.load_weights(str(src / "model.safetensors"))
    nn.quantize(model, group_size=group_size, bits=bits)
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config["quantization"] = {"group_size": group_size, "bits": bits}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, dst / f.name)
    return dst
