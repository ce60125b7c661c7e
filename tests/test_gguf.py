"""GGUF loading: the real SmolLM2 file, tiny written GGUFs against mlx-lm, tokenizer, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tokenizers import Tokenizer as Backend
from tokenizers import pre_tokenizers

from nano_qwen3_mlx.models import llama
from nano_qwen3_mlx.models.base import DenseCache
from nano_qwen3_mlx.models.gguf import load_gguf, tokenizer_from_metadata

mlx_lm_llama = pytest.importorskip("mlx_lm.models.llama")
mlx_lm_qwen3 = pytest.importorskip("mlx_lm.models.qwen3")

# The test's own copy of llama.cpp's names (HF suffix -> GGUF stem), so the loader's table
# is checked rather than inverted.
GGUF_STEMS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_TOKENS = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "Ġth"]
TINY = {
    "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
    "vocab_size": len(TINY_TOKENS), "max_position_embeddings": 2048, "rope_theta": 10000.0,
}


def greedy(model, prompt: list[int], max_tokens: int, eos_ids: list[int]) -> list[int]:
    """Greedy decoding with the dense reference cache."""
    cache = DenseCache(len(model.layers))
    out: list[int] = []
    ids = prompt
    while len(out) < max_tokens and (not out or out[-1] not in eos_ids):
        logits = model(mx.array([ids]), cache)
        cache.advance(len(ids))
        out.append(mx.argmax(logits[0, -1]).item())
        ids = [out[-1]]
    return out


def llama_cpp_permute(w: mx.array, n_head: int) -> mx.array:
    """convert_hf_to_gguf's LlamaModel.permute: HF half-split RoPE rows -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, layer, rest = hf.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        return f"blk.{layer}.{GGUF_STEMS[module]}.{suffix}"
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    module, suffix = hf.rsplit(".", 1)
    return f"{top[module]}.{suffix}"


def u32(value: int) -> mx.array:
    return mx.array(value, dtype=mx.uint32)


def write_tiny_gguf(path: Path, arch: str, config: dict[str, Any], weights: dict[str, mx.array]) -> Path:
    """A GGUF as llama.cpp would write it from an HF checkpoint (unquantized, tiny vocab)."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors = {}
    for name, w in weights.items():
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = llama_cpp_permute(w, heads if "q_proj" in name else kv_heads)
        tensors[gguf_name(name)] = w
    meta = {
        "general.architecture": arch,
        f"{arch}.block_count": u32(config["num_hidden_layers"]),
        f"{arch}.embedding_length": u32(config["hidden_size"]),
        f"{arch}.feed_forward_length": u32(config["intermediate_size"]),
        f"{arch}.attention.head_count": u32(heads),
        f"{arch}.attention.head_count_kv": u32(kv_heads),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(config["rms_norm_eps"]),
        f"{arch}.rope.freq_base": mx.array(config["rope_theta"]),
        f"{arch}.context_length": u32(config["max_position_embeddings"]),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2" if arch == "qwen3" else "smollm",
        "tokenizer.ggml.tokens": TINY_TOKENS,
        "tokenizer.ggml.merges": ["Ġ t", "Ġt h"],
        "tokenizer.ggml.token_type": mx.array([3] * 3 + [1] * (len(TINY_TOKENS) - 3), dtype=mx.int32),
        "tokenizer.ggml.eos_token_id": u32(2),
    }
    if config.get("head_dim"):
        meta[f"{arch}.attention.key_length"] = u32(config["head_dim"])
    mx.save_gguf(str(path), tensors, meta)
    return path


def oracle(module, config: dict[str, Any], seed: int = 0):
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


PROMPT = [3, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 200, 210, 220, 230, 240, 250]


@pytest.mark.parametrize(
    "config",
    [
        {**TINY, "model_type": "llama", "tie_word_embeddings": False},
        {**TINY, "model_type": "llama", "tie_word_embeddings": True, "rope_theta": 100.0,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8}},
    ],
    ids=["untied", "llama3-rope"],
)
def test_llama_matches_mlx_lm(config):
    ref = oracle(mlx_lm_llama, config)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.load_weights(tree_flatten(ref.parameters()))
    ids = mx.array([PROMPT])
    expected = ref(ids)
    got = model(ids, DenseCache(len(model.layers)))
    assert np.allclose(np.array(got), np.array(expected), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "arch, module, config",
    [
        ("llama", mlx_lm_llama, {**TINY, "model_type": "llama", "tie_word_embeddings": False}),
        ("qwen3", mlx_lm_qwen3, {**TINY, "model_type": "qwen3", "head_dim": 32,
                                 "tie_word_embeddings": True, "rope_theta": 1e6}),
    ],
)
def test_tiny_gguf_matches_mlx_lm(tmp_path, arch, module, config):
    """Names, config, llama.cpp's Q/K permutation (llama) and tied embeddings round-trip."""
    ref = oracle(module, config)
    weights = dict(tree_flatten(ref.parameters()))
    path = write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", arch, config, weights)
    model, tokenizer, built = load_gguf(path, dtype=mx.float32)
    assert built["tie_word_embeddings"] == config["tie_word_embeddings"]
    assert built["head_dim"] == config.get("head_dim", 16)
    ids = mx.array([PROMPT])
    got = model(ids, DenseCache(len(model.layers)))
    assert np.allclose(np.array(got), np.array(ref(ids)), atol=1e-4, rtol=1e-4)
    assert tokenizer.eos_token_ids == [2]
    assert tokenizer.encode(" the<|im_end|>") == [TINY_TOKENS.index("Ġth"), TINY_TOKENS.index("e"), 2]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_gguf(smollm2_gguf)


def test_smollm2_config(smollm2):
    model, tokenizer, config = smollm2
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] and config["rope_traditional"]
    assert type(model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert model.layers[0].self_attn.q_proj.bits == 4 and model.layers[0].self_attn.q_proj.group_size == 32
    assert type(model.model.embed_tokens).__name__ == "QuantizedEmbedding"
    assert tokenizer.eos_token_ids == [2] and tokenizer.has_chat_template


def test_smollm2_answers_paris(smollm2):
    model, tokenizer, _ = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=True)
    out = greedy(model, prompt, 32, tokenizer.eos_token_ids)
    assert "Paris" in tokenizer.decode(out, skip_special_tokens=True)


def test_smollm2_tokenizer(smollm2):
    _, tokenizer, _ = smollm2
    texts = ["Hello, world!", "  two  spaces\n\ttab", "café 中文 🤖", "x = 3.14159 * 2"]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # SmolLM's pre-tokenizer splits every digit apart; control tokens stay whole.
    digits = tokenizer.encode("12345")
    assert [tokenizer.decode([i]) for i in digits] == list("12345")
    assert tokenizer.encode("<|im_start|>user\nHi<|im_end|>")[0] == 1
    assert tokenizer.encode("<|im_start|>user\nHi<|im_end|>")[-1] == 2
    assert tokenizer.decode([1, *tokenizer.encode("Hi"), 2], skip_special_tokens=True) == "Hi"


def qwen3_metadata(tokenizer_json: Path) -> dict[str, Any]:
    """GGUF tokenizer metadata as llama.cpp writes it for Qwen3, from tokenizer.json."""
    spec = json.loads(tokenizer_json.read_text())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    types = [1] * len(tokens)
    for t in spec["added_tokens"]:
        types[t["id"]] = 3 if t["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.eos_token_id": u32(vocab["<|im_end|>"]),
    }


def test_qwen2_pre_tokenizer_matches_tokenizer_json(qwen_tokenizer_dir):
    """Our GGUF tokenizer, fed Qwen3's vocab as llama.cpp stores it, equals tokenizer.json."""
    ref = Backend.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    ours = tokenizer_from_metadata(qwen3_metadata(qwen_tokenizer_dir / "tokenizer.json"))
    texts = [
        "Hello world", "  multiple   spaces\n\n\ttabs ", "12345 digits 3.14159", "中文字符和日本語",
        "emoji 🤖👍🏽", "<|im_start|>user\nHi<|im_end|>\n", "<think>\nx\n</think>", "don't I'LL",
        "cafe\u0301 naïve", "def f(x):\n    return x**2\r\n",
    ]
    for text in texts:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text).ids, skip_special_tokens=False)


def assert_one_line_error(path: Path) -> None:
    with pytest.raises(ValueError) as info:
        load_gguf(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_truncated_gguf(tmp_path, smollm2_gguf):
    path = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    assert_one_line_error(path)


@pytest.mark.parametrize("name", ["garbage.gguf", "garbage.bin"])
def test_garbage_gguf(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_one_line_error(path)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # unsupported; supported but no metadata
def test_unloadable_metadata(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((4, 4))}, {"general.architecture": arch})
    assert_one_line_error(path)
