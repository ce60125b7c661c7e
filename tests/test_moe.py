"""Qwen3-MoE: parity with mlx-lm (fp32 and 4-bit), the loader's layouts, the engine, the server."""

from __future__ import annotations

import asyncio
import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import cache as lm_cache
from mlx_lm.models import qwen3_moe as lm_moe
from mlx_lm.utils import load_model as mlx_lm_load_model

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.models import qwen3_moe, switch_layers
from nano_qwen3_mlx.models.base import DenseCache
from nano_qwen3_mlx.models.gguf import load_gguf
from nano_qwen3_mlx.models.loader import ModelLoadError, load, load_model_dir
from tests.checkpoints import copy_without, quantize_checkpoint
from tests.test_engine import PROMPTS
from tests.test_gguf import PROMPT as GGUF_PROMPT
from tests.test_gguf import TINY, TINY_TOKENS, gguf_name
from tests.test_gguf import oracle as gguf_oracle
from tests.test_model import PROMPT, decode_logits, greedy

CONFIG_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "mlp_only_layers")


def oracle(path):
    """mlx-lm's Qwen3-MoE on the same checkpoint (its own sanitize stacks the experts)."""
    config = json.loads((path / "config.json").read_text())
    model = lm_moe.Model(lm_moe.ModelArgs.from_dict(config))
    model.load_weights(list(model.sanitize(mx.load(str(path / "model.safetensors"))).items()))
    return model


def ours(path):
    return load_model_dir(path)[0]


def test_config_names_and_layer_kinds(tiny_moe_dir):
    model = ours(tiny_moe_dir)
    config = json.loads((tiny_moe_dir / "config.json").read_text())
    assert {f: getattr(model.args, f) for f in CONFIG_FIELDS} == {f: config[f] for f in CONFIG_FIELDS}
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["MLP", "SparseMoeBlock", "SparseMoeBlock"]  # mlp_only_layers = [0]
    assert model.layers[1].mlp.switch_mlp.gate_proj.weight.shape == (8, 64, 64)


def test_logits_match_mlx_lm_prompt_and_16_cached_steps(tiny_moe_dir):
    mine, ref = ours(tiny_moe_dir), oracle(tiny_moe_dir)
    a = decode_logits(mine, DenseCache(3), lambda c, n: c.advance(n), PROMPT * 6, 16, True)
    b = decode_logits(ref, lm_cache.make_prompt_cache(ref), lambda c, n: None, PROMPT * 6, 16, False)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)


def test_greedy_32_tokens_identical_to_mlx_lm(tiny_moe_dir):
    assert greedy(ours(tiny_moe_dir), PROMPT, 32) == greedy(oracle(tiny_moe_dir), PROMPT, 32, False)


def test_sorted_and_unsorted_expert_paths_agree(tiny_moe_dir, monkeypatch):
    """A 72-token prompt routes 144 (token, expert) pairs: sorted by expert above the
    threshold, gathered in token order below it; any leading shape gives the same rows."""
    block = ours(tiny_moe_dir).layers[1].mlp
    x = mx.random.normal((2, 36, 64), key=mx.random.key(1))
    sorted_out = block(x)
    monkeypatch.setattr(switch_layers, "SORT_THRESHOLD", 10**9)
    np.testing.assert_allclose(np.array(block(x)), np.array(sorted_out), atol=1e-5)
    packed = block(x.reshape(1, 72, 64)).reshape(2, 36, 64)  # packed (1, T, hidden) steps
    np.testing.assert_allclose(np.array(packed), np.array(sorted_out), atol=1e-5)


def test_parameter_counts(tiny_moe_dir):
    model, args = ours(tiny_moe_dir), qwen3_moe.ModelArgs.from_dict(
        json.loads((tiny_moe_dir / "config.json").read_text()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    per_expert = 3 * args.hidden_size * args.moe_intermediate_size
    idle = 2 * (args.num_experts - args.num_experts_per_tok) * per_expert  # two sparse layers
    assert model.num_parameters() == {"total": total, "active": total - idle}
    quantized = load(str(tiny_moe_dir), quantize=4).model
    assert quantized.num_parameters() == model.num_parameters()  # counted unpacked


@pytest.fixture(scope="module")
def moe_q4_dir(tiny_moe_dir, tmp_path_factory):
    """The mlx-community layout: experts stacked under switch_mlp, 4-bit, 8-bit router."""
    return quantize_checkpoint(tiny_moe_dir, tmp_path_factory.mktemp("moe-q4"), 4, group_size=64)


def test_4bit_checkpoint_greedy_identical_to_mlx_lm(moe_q4_dir):
    saved = mx.load(str(moe_q4_dir / "model.safetensors"))
    assert "model.layers.1.mlp.switch_mlp.up_proj.scales" in saved
    mine = ours(moe_q4_dir)
    experts, router = mine.layers[1].mlp.switch_mlp.up_proj, mine.layers[1].mlp.gate
    assert type(experts).__name__ == "QuantizedSwitchLinear" and experts.bits == 4
    assert router.bits == 8
    ref, _ = mlx_lm_load_model(moe_q4_dir)
    assert greedy(mine, PROMPT, 32) == greedy(ref, PROMPT, 32, False)


def test_quantize_on_load_matches_mlx_lm_on_the_same_weights(tiny_moe_dir, tmp_path):
    """``--quantize 4`` on the HF layout == mlx-lm's own quantization (router kept 8-bit)."""
    loaded = load(str(tiny_moe_dir), quantize=4)
    block = loaded.model.layers[2].mlp
    assert (block.switch_mlp.down_proj.bits, block.gate.bits) == (4, 8)
    ref = oracle(tiny_moe_dir)
    nn.quantize(ref, group_size=64, bits=4, class_predicate=lambda p, m: (
        ref.quant_predicate(p, m) if hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0 else False))
    assert greedy(loaded.model, PROMPT, 32) == greedy(ref, PROMPT, 32, False)


def test_stacked_float_layout_loads(tiny_moe_dir, tmp_path):
    path = tmp_path / "stacked"
    shutil.copytree(tiny_moe_dir, path)
    model = ours(tiny_moe_dir)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    np.testing.assert_array_equal(
        np.array(ours(path)(mx.array([PROMPT]), DenseCache(3))),
        np.array(model(mx.array([PROMPT]), DenseCache(3))))


def test_impossible_top_k_is_a_config_error(tiny_moe_dir, tmp_path):
    path = tmp_path / "bad-k"
    shutil.copytree(tiny_moe_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 9}))
    with pytest.raises(ModelLoadError, match=r"config\.json: bad model config \(num_experts_per_tok=9"):
        load_model_dir(path)


def test_missing_expert_is_named(tiny_moe_dir, tmp_path):
    path = tmp_path / "broken"
    weights = copy_without(tiny_moe_dir, path, "model.layers.2.mlp.experts.5.down_proj.weight")
    with pytest.raises(ModelLoadError, match=r"missing tensor model\.layers\.2\.mlp\.experts\.5\."
                                             r"down_proj\.weight \(1 of 8 experts missing\)"):
        load_model_dir(path)
    for e in range(8):  # a whole projection gone: strict loading names the stacked tensor
        weights.pop(f"model.layers.2.mlp.experts.{e}.down_proj.weight", None)
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(ModelLoadError, match=r"missing tensor model\.layers\.2\.mlp\.switch_mlp\.down_proj"):
        load_model_dir(path)


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_llm(tiny_moe_dir):
    with LLM(str(tiny_moe_dir), num_kv_blocks=256, block_size=16) as llm:
        yield llm


def test_engine_batched_equals_one_at_a_time_equals_mlx_lm(moe_llm, tiny_moe_dir):
    batched = [r["token_ids"] for r in moe_llm.generate(PROMPTS, GREEDY)]
    singles = [moe_llm.generate_single(p, GREEDY)["token_ids"] for p in PROMPTS]
    assert batched == singles
    ref = oracle(tiny_moe_dir)
    for prompt, tokens in zip(PROMPTS[:3], batched):
        assert tokens == greedy(ref, moe_llm.tokenizer.encode(prompt), 12, False)
    stats = moe_llm.get_stats()
    assert stats["kv_cache"]["num_used_blocks"] == 0
    assert stats["parameters"] == moe_llm.engine.model.num_parameters()


def test_engine_preemption_and_prefix_cache_keep_output(moe_llm, tiny_moe_dir):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = ["You are a helpful assistant. " * 8 + p for p in PROMPTS[:4]]
    expected = [moe_llm.generate_single(p, params)["token_ids"] for p in prompts]
    with LLM(str(tiny_moe_dir), num_kv_blocks=12, block_size=8, max_num_batched_tokens=32) as small:
        got = [r["token_ids"] for r in small.generate(prompts, params)]
        stats = small.get_stats()
    assert got == expected
    assert stats["requests"]["preemptions"] > 0 and stats["kv_cache"]["prefix_cache_hits"] > 0
    assert stats["kv_cache"]["num_used_blocks"] == 0


# ---- GGUF (llama.cpp's qwen3moe) ----------------------------------------------------------
GGUF_EXPERT_STEMS = {"mlp.gate": "ffn_gate_inp", "mlp.switch_mlp.gate_proj": "ffn_gate_exps",
                     "mlp.switch_mlp.up_proj": "ffn_up_exps", "mlp.switch_mlp.down_proj": "ffn_down_exps"}
TINY_GGUF_MOE = {**TINY, "model_type": "qwen3_moe", "head_dim": 32, "tie_word_embeddings": True,
                 "rope_theta": 1e6, "num_experts": 4, "num_experts_per_tok": 2,
                 "moe_intermediate_size": 64, "decoder_sparse_step": 1, "mlp_only_layers": [0],
                 "norm_topk_prob": True}


def write_moe_gguf(path, config, weights, expert_type):
    """What llama.cpp writes for Qwen3-MoE: stacked ``ffn_*_exps`` experts (quantized with
    ``expert_type``), everything else F32, ``qwen3moe.*`` metadata."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    writer = GGUFWriter(str(path), "qwen3moe")
    for name, value in config_metadata(config).items():
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(f"qwen3moe.{name}", value)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "qwen2")
    writer.add_array("tokenizer.ggml.tokens", TINY_TOKENS)
    writer.add_array("tokenizer.ggml.merges", ["Ġ t", "Ġt h"])
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    qtype = getattr(GGMLQuantizationType, expert_type)
    for name, w in weights.items():
        w = np.array(w)
        if "switch_mlp" in name:
            writer.add_tensor(moe_gguf_name(name), quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(moe_gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def config_metadata(config):
    return {"block_count": config["num_hidden_layers"], "embedding_length": config["hidden_size"],
            "feed_forward_length": config["intermediate_size"],
            "attention.head_count": config["num_attention_heads"],
            "attention.head_count_kv": config["num_key_value_heads"],
            "attention.key_length": config["head_dim"], "context_length": 2048,
            "attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
            "rope.freq_base": config["rope_theta"], "expert_count": config["num_experts"],
            "expert_used_count": config["num_experts_per_tok"],
            "expert_feed_forward_length": config["moe_intermediate_size"]}


def moe_gguf_name(hf: str) -> str:
    module, suffix = hf.rsplit(".", 1)
    for stem_hf, stem in GGUF_EXPERT_STEMS.items():
        if module.endswith(stem_hf):
            return f"blk.{module.split('.')[2]}.{stem}.{suffix}"
    return gguf_name(hf)


@pytest.mark.parametrize("expert_type", ["Q4_0", "Q4_1", "Q8_0"])
def test_qwen3moe_gguf_keeps_experts_quantized_and_matches_mlx_lm(tmp_path, expert_type):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    ref = gguf_oracle(lm_moe, TINY_GGUF_MOE)
    weights = dict(tree_flatten(ref.parameters()))
    path = write_moe_gguf(tmp_path / "moe.gguf", TINY_GGUF_MOE, weights, expert_type)
    model, _, config = load_gguf(path, dtype=mx.float32)
    assert config["mlp_only_layers"] == [0] and config["num_experts"] == 4
    experts = model.layers[1].mlp.switch_mlp.down_proj
    assert type(experts).__name__ == "QuantizedSwitchLinear" and experts.group_size == 32
    # The oracle gets the same experts, dequantized with gguf's own reference code.
    qtype = getattr(GGMLQuantizationType, expert_type)
    ref.load_weights([(k, mx.array(dequantize(quantize(np.array(v), qtype), qtype)))
                      for k, v in weights.items() if "switch_mlp" in k], strict=False)
    ids = mx.array([GGUF_PROMPT])
    got, expected = model(ids, DenseCache(2)), ref(ids)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=2e-3, rtol=2e-3)


# ---- the server ----------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_server_serves_the_moe_checkpoint(tiny_moe_dir, moe_llm):
    from aiohttp.test_utils import TestClient, TestServer

    from nano_qwen3_mlx.async_llm import AsyncLLM
    from nano_qwen3_mlx.config import EngineConfig, ServerConfig
    from nano_qwen3_mlx.server import create_app

    config = EngineConfig(model=str(tiny_moe_dir), num_kv_blocks=64, max_num_seqs=4, max_model_len=256)
    body = {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 8}
    expected = moe_llm.engine.model.num_parameters()
    async with AsyncLLM(config=config) as llm:
        app = create_app(server_config=ServerConfig(served_model_name="moe"), engine=llm)
        async with TestClient(TestServer(app)) as client:
            card = (await (await client.get("/v1/models")).json())["data"][0]
            assert card["parameters"] == expected and expected["active"] < expected["total"]
            replies = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(3)))
            texts = [(await r.json())["choices"][0]["text"] for r in replies]
            stats = await (await client.get("/stats")).json()
    assert all(r.status == 200 for r in replies) and len(set(texts)) == 1  # batched, same greedy text
    single = moe_llm.generate_single(body["prompt"], SamplingParams(temperature=0, max_tokens=8))
    assert texts[0] == single["generated_text"] and len(single["token_ids"]) == 8
    assert stats["parameters"] == expected


def test_bfloat16_experts_run_where_gather_mm_is_float32_only(tiny_moe_dir):
    """The CPU ``gather_mm`` takes float32 only: bf16 experts take the gathered-weights path."""
    model, _ = load_model_dir(tiny_moe_dir, dtype="bfloat16")
    assert model.layers[1].mlp.switch_mlp.up_proj.weight.dtype == mx.bfloat16
    half = model(mx.array([PROMPT * 6]), DenseCache(3))[0].astype(mx.float32)
    full = ours(tiny_moe_dir)(mx.array([PROMPT * 6]), DenseCache(3))[0]
    rel = (mx.abs(half - full).mean() / mx.abs(full).mean()).item()
    assert rel < 0.05, rel
