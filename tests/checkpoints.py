"""Tiny random checkpoints for tests, written in the Hugging Face layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from nano_qwen3_mlx.models import MODEL_TYPES

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

# Tiny Qwen3-MoE: 8 experts, top-2, layer 0 dense (``mlp_only_layers``), layers 1-2 sparse.
TINY_QWEN3_MOE: dict[str, Any] = {
    **TINY_QWEN3,
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "num_hidden_layers": 3,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [0],
    "norm_topk_prob": True,
}


def model_class(config: dict[str, Any]):
    module = MODEL_TYPES[config["model_type"]]
    return module.Model, module.ModelArgs


def build_tiny_model(config: dict[str, Any], seed: int = 0) -> nn.Module:
    """A random model whose logits are peaked enough that greedy decoding is stable
    (a scaled-up lm_head keeps near-ties between the top tokens rare)."""
    mx.random.seed(seed)
    Model, ModelArgs = model_class(config)
    model = Model(ModelArgs.from_dict(config))
    params = tree_flatten(model.parameters())
    scaled = [(k, v * 4.0 if "lm_head" in k else v) for k, v in params]
    model.load_weights(scaled)
    mx.eval(model.parameters())
    return model


def write_checkpoint(
    path: Path, tokenizer_dir: Path, config_overrides: dict[str, Any] | None = None, seed: int = 0,
    base: dict[str, Any] = TINY_QWEN3,
) -> Path:
    """Write config.json, model.safetensors (Hugging Face layout: one tensor per expert)
    and the tokenizer files into ``path``."""
    config = {**base, **(config_overrides or {})}
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(config, seed)
    weights = unstack_experts(dict(tree_flatten(model.parameters())))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [151645, 151643], "bos_token_id": 151643})
    )
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def unstack_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """``mlp.switch_mlp.P.weight`` (E, out, in) -> Hugging Face's ``mlp.experts.e.P.weight``."""
    out = {}
    for name, w in weights.items():
        if ".switch_mlp." in name:
            prefix, rest = name.split(".switch_mlp.")
            out.update({f"{prefix}.experts.{e}.{rest}": w[e] for e in range(w.shape[0])})
        else:
            out[name] = w
    return out


def quantize_checkpoint(src: Path, dst: Path, bits: int, group_size: int = 32) -> Path:
    """Quantize a checkpoint and save it in the mlx-community layout (experts stacked; an
    MoE router at 8 bits, recorded per layer in the config as mlx-lm's convert does)."""
    config = json.loads((src / "config.json").read_text())
    Model, ModelArgs = model_class(config)
    model = Model(ModelArgs.from_dict(config))
    model.load_weights(list(model.sanitize(mx.load(str(src / "model.safetensors"))).items()))
    overrides = {}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path.endswith("mlp.gate"):
            overrides[path] = {"group_size": 64, "bits": 8}
            return overrides[path]
        return hasattr(module, "to_quantized")

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config["quantization"] = {"group_size": group_size, "bits": bits, **overrides}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, dst / f.name)
    return dst


def copy_without(src: Path, dst: Path, *names: str) -> dict[str, mx.array]:
    """Copy a checkpoint, leaving the named tensors out; returns the weights written."""
    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    for name in names:
        weights.pop(name)
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    return weights
