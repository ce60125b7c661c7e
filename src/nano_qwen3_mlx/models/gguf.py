"""Load a GGUF file: config, weights (kept quantized) and tokenizer, all from the one file.

``mx.load`` reads GGUF natively. Q4_0/Q4_1/Q8_0 tensors come back already in MLX's affine
quantized layout (``name`` packed uint32, ``name.scales``, ``name.biases``, groups of 32
along the input dimension); other GGML types are dequantized to float16 by ``mx.load``.
The GGUF tensor names are the one renaming table of the project (``TENSOR_NAMES``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from ..tokenizer import Tokenizer
from . import MODEL_TYPES

# GGUF tensor name stem -> Hugging Face module path (per block: under model.layers.N).
TENSOR_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # Qwen3-MoE: the router and the experts, already stacked (E, out, in) by llama.cpp.
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
}

# llama.cpp's convert_hf_to_gguf permutes the rows of Q and K of each head from HF's
# "two halves" RoPE layout to interleaved pairs, and then runs RoPE in the traditional
# (adjacent-pairs) mode. Running our model with rope_traditional=True on the permuted
# weights is exactly equivalent: the same permutation hits q and k inside every head, so
# q·k is unchanged and v/o are untouched. It costs nothing at load time, which matters
# because the weights are quantized. Qwen2/Qwen3 GGUFs are not permuted (NEOX RoPE).
PERMUTED_QK_ARCHITECTURES = frozenset({"llama"})
# The GGUF architectures whose tensor layout this loader knows (modules from MODEL_TYPES).
GGUF_ARCHITECTURES = ("llama", "qwen3", "qwen3moe")

# tokenizer.ggml.pre -> the split regex its merges were learned with (llama.cpp's
# llama-vocab.cpp). Unlisted names get GPT-2's regex (ByteLevel's own).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# GPT-2 regex after splitting every digit apart (StarCoder-style vocabularies, SmolLM).
DIGIT_SPLIT_PRE_TOKENIZERS = frozenset({"smollm", "starcoder", "refact", "codeshell"})
# Llama 3 vocabularies take a whole pre-token from the vocab before trying merges.
IGNORE_MERGES_PRE_TOKENIZERS = frozenset({"llama-bpe", "llama3", "smaug-bpe"})
# NFC-normalizing vocabularies (Qwen's tokenizer.json); llama.cpp skips this, HF does not.
NFC_PRE_TOKENIZERS = frozenset({"qwen2", "deepseek-r1-qwen"})

_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
_MISSING = object()


def load_gguf(
    path: str | Path, dtype: mx.Dtype | None = None
) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """Load a GGUF model: (model with evaluated weights, tokenizer, HF-style config dict).

    Quantized tensors stay quantized; every other float tensor (norms, fp16 weights,
    quantization scales/biases) is cast to ``dtype`` (default: ``default_dtype()``).
    Raises ``ValueError`` with one line naming the file for a truncated, corrupt or
    unsupported file.
    """
    path = Path(path)
    weights, metadata = read_gguf(path)
    try:
        config = config_from_metadata(metadata, weights.keys())
        model = build_model(config, weights, dtype or default_dtype())
        tokenizer = tokenizer_from_metadata(metadata)
    except ValueError as e:
        raise ValueError(f"{path}: cannot load this GGUF model: {_one_line(e)}") from None
    return model, tokenizer, config


def default_dtype() -> mx.Dtype:
    """float32 on CPU, bfloat16 on a GPU; never float16.

    SmolLM2's residual stream reaches ~25k from layer 11 on (massive activations): in
    float16 on the CPU backend it answers nonsense, and CPU half-precision matmuls are
    10-40x slower than float32 there. bfloat16 keeps float32's range.
    """
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """``mx.load`` the file, turning its RuntimeError (truncated/corrupt) into a ValueError."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return mx.load(str(path), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({_one_line(e)})") from None


def config_from_metadata(metadata: dict[str, Any], tensor_names: Any) -> dict[str, Any]:
    """The Hugging Face ``config.json`` equivalent of the GGUF metadata."""
    arch = str(_require(metadata, "general.architecture"))
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} (supported: {sorted(GGUF_ARCHITECTURES)})")

    def get(key: str, default: Any = _MISSING) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is _MISSING:
            raise ValueError(f"metadata key {arch}.{key} is missing")
        return value.item() if isinstance(value, mx.array) else value

    hidden, heads = get("embedding_length"), get("attention.head_count")
    moe = _moe_config(get, tensor_names) if arch == "qwen3moe" else {}
    return moe | {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length", moe.get("intermediate_size", _MISSING)),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(get),
        "rope_traditional": arch in PERMUTED_QK_ARCHITECTURES,
        "max_position_embeddings": get("context_length"),
        "vocab_size": len(metadata.get("tokenizer.ggml.tokens", [])) or get("vocab_size"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _meta_int(metadata, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta_int(metadata, "tokenizer.ggml.eos_token_id"),
    }


def _moe_config(get: Any, tensor_names: Any) -> dict[str, Any]:
    """Qwen3-MoE keys; a block without a router (``ffn_gate_inp``) has a dense MLP."""
    blocks = range(get("block_count"))
    return {
        "num_experts": get("expert_count"),
        "num_experts_per_tok": get("expert_used_count"),
        "moe_intermediate_size": get("expert_feed_forward_length"),
        "intermediate_size": 0,  # unused unless some block is dense, and then it is in the file
        "mlp_only_layers": [i for i in blocks if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names],
        "norm_topk_prob": True,  # llama.cpp's qwen3moe graph always renormalises the top-k
    }


def _rope_scaling(get: Any) -> dict[str, Any] | None:
    kind = get("rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": get("rope.scaling.factor"),
            "original_max_position_embeddings": get("rope.scaling.original_context_length"),
        }
    if kind != "none":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return None


def build_model(config: dict[str, Any], weights: dict[str, mx.array], dtype: mx.Dtype) -> nn.Module:
    """Instantiate the architecture, quantize the modules the file has quantized, load."""
    arch = MODEL_TYPES[config["model_type"]]
    model = arch.Model(arch.ModelArgs.from_dict(config))
    weights = model.sanitize({hf_name(k): v for k, v in weights.items()})
    nn.quantize(model, class_predicate=lambda p, m: _quantization_of(p, m, weights))
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()))  # strict: a missing or extra tensor raises
    mx.eval(model.parameters())
    return model


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.scales`` -> ``model.layers.3.self_attn.q_proj.scales``."""
    if gguf_name.startswith("blk."):
        _, layer, stem, suffix = gguf_name.split(".", 3)
        return f"model.layers.{layer}.{_renamed(stem, gguf_name)}.{suffix}"
    stem, suffix = gguf_name.split(".", 1)
    return f"{_renamed(stem, gguf_name)}.{suffix}"


def _renamed(stem: str, gguf_name: str) -> str:
    if stem not in TENSOR_NAMES:
        # e.g. rope_freqs (Llama 3.1 RoPE factors): better refuse than answer subtly wrong.
        raise ValueError(f"unsupported tensor {gguf_name!r}")
    return TENSOR_NAMES[stem]


def _quantization_of(path: str, module: nn.Module, weights: dict[str, mx.array]) -> bool | dict:
    """``to_quantized`` parameters for a module whose weight the file stores quantized."""
    scales = weights.get(f"{path}.scales")
    if scales is None or not hasattr(module, "to_quantized"):
        return False
    in_features = module.weight.shape[-1]  # still the float module: its true input size
    packed = weights[f"{path}.weight"].shape[-1]  # uint32 words per row
    return {"group_size": in_features // scales.shape[-1], "bits": 32 * packed // in_features}


def tokenizer_from_metadata(metadata: dict[str, Any]) -> Tokenizer:
    """A byte-level BPE ``Tokenizer`` from ``tokenizer.ggml.*`` and ``tokenizer.chat_template``."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported tokenizer model {kind!r} (only byte-level BPE, 'gpt2')")
    tokens: list[str] = _require(metadata, "tokenizer.ggml.tokens")
    types = _token_types(metadata, len(tokens))
    backend = byte_level_bpe(tokens, _require(metadata, "tokenizer.ggml.merges"), _pre(metadata))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    )

    def token(key: str) -> str | None:
        token_id = _meta_int(metadata, f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    eot = _meta_int(metadata, "tokenizer.ggml.eot_token_id")  # e.g. <|eot_id|> beside the EOS
    return Tokenizer(
        backend,
        chat_template=metadata.get("tokenizer.chat_template"),  # None: ChatML default
        eos_token_ids=[eot] if eot is not None else None,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"),
        add_bos_token=bool(_meta_int(metadata, "tokenizer.ggml.add_bos_token") or False),
    )


def byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> Backend:
    """A `tokenizers` BPE over GGUF tokens (already in GPT-2's byte-to-unicode spelling)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # keep the first id of a duplicated token, like llama.cpp
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab, pairs, ignore_merges=pre in IGNORE_MERGES_PRE_TOKENIZERS)
    backend = Backend(bpe)
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    if pre in NFC_PRE_TOKENIZERS:
        backend.normalizer = normalizers.NFC()
    return backend


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in PRE_TOKENIZER_SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGIT_SPLIT_PRE_TOKENIZERS:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _pre(metadata: dict[str, Any]) -> str:
    return str(metadata.get("tokenizer.ggml.pre", "default"))


def _token_types(metadata: dict[str, Any], num_tokens: int) -> list[int]:
    types = metadata.get("tokenizer.ggml.token_type")
    return types.tolist() if isinstance(types, mx.array) else [1] * num_tokens


def _require(metadata: dict[str, Any], key: str) -> Any:
    if key not in metadata:
        raise ValueError(f"metadata key {key} is missing")
    return metadata[key]


def _meta_int(metadata: dict[str, Any], key: str) -> int | None:
    value = metadata.get(key)
    return None if value is None else int(value.item() if isinstance(value, mx.array) else value)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
