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


# ---- hybrid families (Gated DeltaNet + attention): Qwen3.5, Qwen3.5-MoE, Qwen3-Next -----------

# Tiny Qwen3.5 text model: 8 layers, every 4th full attention (layers 3 and 7, the last one
# attention as in the published models); widths multiples of 64 so --quantize applies.
_HYBRID_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 8,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

TINY_QWEN3_5: dict[str, Any] = {
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "model_type": "qwen3_5",
    "text_config": {
        **_HYBRID_TEXT,
        "model_type": "qwen3_5_text",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                            "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                            "mrope_interleaved": True},
    },
    "vision_config": {"model_type": "qwen3_5_vision", "depth": 1, "hidden_size": 32},
    "image_token_id": 151655,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

# Tiny Qwen3.5-MoE: 8 routed experts, top-2, plus a gated shared expert in every layer.
TINY_QWEN3_5_MOE: dict[str, Any] = {
    **TINY_QWEN3_5,
    "architectures": ["Qwen3_5MoeForConditionalGeneration"],
    "model_type": "qwen3_5_moe",
    "text_config": {
        **TINY_QWEN3_5["text_config"],
        "model_type": "qwen3_5_moe_text",
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": True,
    },
}

# Tiny Qwen3-Next: flat config, fused projections; layer 0 dense (``mlp_only_layers``).
TINY_QWEN3_NEXT: dict[str, Any] = {
    **_HYBRID_TEXT,
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "rope_theta": 1000000.0,
    "partial_rotary_factor": 0.25,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [0],
    "norm_topk_prob": True,
    "torch_dtype": "float32",
}

HYBRID_CONFIGS = {"qwen3_5": TINY_QWEN3_5, "qwen3_5_moe": TINY_QWEN3_5_MOE, "qwen3_next": TINY_QWEN3_NEXT}
ZERO_CENTRED = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                ".q_norm.weight", ".k_norm.weight", "mtp.norm.weight",
                "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight")


def build_tiny_hybrid(config: dict[str, Any], seed: int = 0) -> nn.Module:
    """``build_tiny_model`` with every norm weight and ``dt_bias`` perturbed, so a loader that
    forgets Hugging Face's zero-centred norms (or mixes up tensors) gives other logits."""
    model = build_tiny_model(config, seed)
    params = tree_flatten(model.parameters())
    noisy = [(k, v + 0.2 * mx.random.normal(v.shape)) for k, v in params
             if k.endswith(("norm.weight", "dt_bias"))]
    model.load_weights(noisy, strict=False)
    mx.eval(model.parameters())
    return model


def write_hybrid_checkpoint(
    path: Path, tokenizer_dir: Path, family: str = "qwen3_5", layout: str = "hf",
    config_overrides: dict[str, Any] | None = None, seed: int = 0, bits: int | None = None,
    group_size: int = 64, dtype: str = "float32",
) -> Path:
    """A tiny random hybrid checkpoint (``family``: qwen3_5, qwen3_5_moe, qwen3_next) with the
    real Qwen3 tokenizer, in the Hugging Face layout (``layout="hf"``: Qwen3.5 under
    ``model.language_model.``, conv1d ``(C, 1, K)``, zero-centred norms, experts fused
    (Qwen3.5) or one by one (Qwen3-Next), plus ``mtp.*`` and vision tensors) or as mlx-lm
    saves it (``layout="mlx"``; ``bits`` 4/8 quantizes it, router and shared-expert gate at
    8 bits recorded per layer). ``config_overrides`` go into the text config; ``dtype``
    (float32, bfloat16, float16) is the weights' (``A_log`` stays float32, as published)."""
    config = json.loads(json.dumps(HYBRID_CONFIGS[family]))
    text = config.get("text_config", config)
    text.update(config_overrides or {})
    config["torch_dtype"] = dtype
    model = build_tiny_hybrid(config, seed)
    if layout == "hf":  # the published checkpoints carry an MTP head; mlx-lm drops it
        _add_random_mtp(model, seed)
    model.load_weights([(k, v if k.endswith("A_log") else v.astype(getattr(mx, dtype)))
                        for k, v in tree_flatten(model.parameters())])
    if layout == "hf":
        assert bits is None, "Hugging Face checkpoints are not MLX-quantized"
        weights = _hf_layout(dict(tree_flatten(model.parameters())), family)
    elif layout == "mlx":
        if bits:
            config["quantization"] = _quantize_like_mlx_lm(model, family, bits, group_size)
            config["quantization_config"] = config["quantization"]
        weights = {_mlx_name(k, family): v for k, v in tree_flatten(model.parameters())}
    else:
        raise ValueError(f"layout must be 'hf' or 'mlx', got {layout!r}")
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [151645, 151643], "bos_token_id": 151643}))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def _add_random_mtp(model: nn.Module, seed: int) -> None:
    """A random ``mtp.*`` head as the hub's (``mtp.fc`` (H, 2H), the pre-fc norms, one
    decoder layer, ``mtp.norm``), norms perturbed; drawn after the model's own weights."""
    mx.random.seed(seed + 1000)
    model.add_mtp()
    noisy = [(k, v + 0.2 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.mtp.parameters())
             if k.endswith("norm.weight")]
    model.mtp.load_weights(noisy, strict=False)


def _mlx_name(key: str, family: str) -> str:
    """Our module path -> mlx-lm's (Qwen3.5 wraps the text model in ``language_model``)."""
    return f"language_model.{key}" if family.startswith("qwen3_5") else key


def _hf_layout(weights: dict[str, mx.array], family: str) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for key, w in weights.items():
        if key.endswith("conv1d.weight"):
            w = w.moveaxis(2, 1)  # MLX (C, K, 1) -> PyTorch (C, 1, K)
        elif key.endswith(ZERO_CENTRED):
            w = w - 1.0
        if family.startswith("qwen3_5") and key.startswith("model."):
            key = "model.language_model." + key.removeprefix("model.")
        out[key] = w
    if family == "qwen3_5_moe":  # fused: experts.gate_up_proj (E, 2I, H), experts.down_proj
        for key in [k for k in out if k.endswith("switch_mlp.gate_proj.weight")]:
            prefix = key.removesuffix(".switch_mlp.gate_proj.weight")
            up = out.pop(f"{prefix}.switch_mlp.up_proj.weight")
            out[f"{prefix}.experts.gate_up_proj"] = mx.concatenate([out.pop(key), up], axis=1)
            out[f"{prefix}.experts.down_proj"] = out.pop(f"{prefix}.switch_mlp.down_proj.weight")
    else:
        out = unstack_experts(out)
    if family.startswith("qwen3_5"):
        out["model.visual.patch_embed.proj.weight"] = mx.zeros((32, 3, 2, 16, 16))
    return out


def _quantize_like_mlx_lm(model: nn.Module, family: str, bits: int, group_size: int) -> dict[str, Any]:
    """``nn.quantize`` as mlx-lm's convert does; returns the config's ``quantization``."""
    overrides = {}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        if path.endswith(("mlp.gate", "shared_expert_gate")):
            overrides[_mlx_name(path, family)] = {"group_size": 64, "bits": 8}
            return {"group_size": 64, "bits": 8}
        return True

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return {"group_size": group_size, "bits": bits, "mode": "affine", **overrides}
