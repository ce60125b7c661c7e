"""Hybrid Qwen models (Qwen3.5, Qwen3.5-MoE, Qwen3-Next): parity with mlx-lm on the same random
weights (fp32 and 4-bit, Hugging Face and mlx-community layouts, loaded through ``load()``),
recurrent state carried across calls, batching, pruning, loading quirks."""

from __future__ import annotations

import json
import logging

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as lm_cache
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import quantize_model as mlx_lm_quantize

from nano_qwen3_mlx.bench.shapes import SHAPES, parameter_counts, random_checkpoint
from nano_qwen3_mlx.models import MODEL_TYPES
from nano_qwen3_mlx.models import gated_delta as gd
from nano_qwen3_mlx.models.base import DenseCache, count_parameters
from nano_qwen3_mlx.models.contract import CausalLM, LayerKV
from nano_qwen3_mlx.models.hybrid_layers import SharedExpertMoeBlock
from nano_qwen3_mlx.models.loader import ModelLoadError, load
from tests.checkpoints import HYBRID_CONFIGS, write_hybrid_checkpoint

FAMILIES = tuple(HYBRID_CONFIGS)
PROMPT = [9707, 11, 847, 829, 374, 1207, 16948, 13, 358, 1075, 311, 3270] * 6  # 72 tokens
# Three calls: a chunked run (>= 32 tokens), a step-by-step run, a chunked run across a
# 64-token block boundary of its own: the state must carry between all three.
PIECES = (PROMPT[:40], PROMPT[40:47], PROMPT[47:])


@pytest.fixture(scope="session")
def hybrid_dirs(tmp_path_factory, qwen_tokenizer_dir):
    """``(family, layout, bits) -> checkpoint dir``, each written once per session."""
    made = {}

    def get(family: str, layout: str = "hf", bits: int | None = None):
        key = (family, layout, bits)
        if key not in made:
            path = tmp_path_factory.mktemp(f"{family}-{layout}-{bits}")
            made[key] = write_hybrid_checkpoint(path, qwen_tokenizer_dir, family, layout, bits=bits)
        return made[key]

    return get


def ours(path, **kwargs):
    return load(str(path), **kwargs).model


def oracle(path):
    return mlx_lm_load_model(path)[0]


def dense_cache(model) -> DenseCache:
    return DenseCache(len(model.kv_layers), model.state_layers)


def trace(model, calls, is_ours=True):
    """Run ``calls`` (lists of token ids) one forward pass each; each pass's logits."""
    cache = dense_cache(model) if is_ours else lm_cache.make_prompt_cache(model)
    out = []
    for ids in calls:
        x = mx.array([ids])
        logits = model(x, cache) if is_ours else model(x, cache=cache)
        if is_ours:
            cache.advance(len(ids))
        out.append(np.array(logits[0].astype(mx.float32)))
    return out


def greedy(model, prompt_calls, n, is_ours=True):
    cache = dense_cache(model) if is_ours else lm_cache.make_prompt_cache(model)
    calls, tokens = list(prompt_calls), []
    while len(tokens) < n:
        x = mx.array([calls.pop(0) if calls else tokens[-1:]])
        logits = model(x, cache) if is_ours else model(x, cache=cache)
        if is_ours:
            cache.advance(x.shape[1])
        if not calls:
            tokens.append(mx.argmax(logits[0, -1]).item())
    return tokens


def assert_parity(mine, ref, atol=2e-4):
    """Logits of the prompt in three calls, then 8 one-token decode steps (teacher-forced
    with mlx-lm's greedy tokens), all rows of every call."""
    steps = greedy(ref, PIECES, 8, is_ours=False)
    calls = [*PIECES, *([t] for t in steps)]
    for i, (a, b) in enumerate(zip(trace(mine, calls), trace(ref, calls, False), strict=True)):
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-4, err_msg=f"call {i}")


@pytest.mark.parametrize("layout", ["hf", "mlx"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_and_greedy_match_mlx_lm(hybrid_dirs, family, layout):
    path = hybrid_dirs(family, layout)
    mine, ref = ours(path), oracle(path)
    assert_parity(mine, ref)
    assert greedy(mine, [PROMPT], 16) == greedy(ref, [PROMPT], 16, False)


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_mlx_community_checkpoint_matches_mlx_lm(hybrid_dirs, family):
    path = hybrid_dirs(family, "mlx", 4)
    mine, ref = ours(path), oracle(path)
    assert_parity(mine, ref, atol=5e-4)
    assert greedy(mine, PIECES, 12) == greedy(ref, PIECES, 12, False)
    if family != "qwen3_5":  # router and shared-expert gate stayed at 8 bits (config overrides)
        mlp = mine.layers[1].mlp
        assert (mlp.gate.bits, mlp.shared_expert_gate.bits, mlp.switch_mlp.up_proj.bits) == (8, 8, 4)


def test_8bit_mlx_community_checkpoint_matches_mlx_lm(hybrid_dirs):
    path = hybrid_dirs("qwen3_5_moe", "mlx", 8)
    mine, ref = ours(path), oracle(path)
    assert_parity(mine, ref, atol=5e-4)
    assert mine.layers[0].linear_attn.in_proj_qkv.bits == 8


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_is_as_accurate_as_mlx_lm(tmp_path, qwen_tokenizer_dir, dtype):
    """Half-precision logits differ from float32 ones by rounding (much amplified by random
    weights); ours stay as close to the float32 logits of the same weights as mlx-lm's."""
    path = write_hybrid_checkpoint(tmp_path / "m", qwen_tokenizer_dir, "qwen3_5", dtype=dtype)
    model = ours(path)
    assert (model.dtype, model.layers[0].linear_attn.A_log.dtype) == (getattr(mx, dtype), mx.float32)
    truth = trace(ours(path, dtype="float32"), PIECES)
    mine, ref = trace(model, PIECES), trace(oracle(path), PIECES, False)
    error = lambda logits: np.mean([np.abs(x - t).max() for x, t in zip(logits, truth)])  # noqa: E731
    assert error(mine) <= 1.5 * error(ref)


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next"])
def test_quantize_on_load_matches_mlx_lm_quantizing_the_same_weights(hybrid_dirs, family):
    path = hybrid_dirs(family, "hf")
    mine = ours(path, quantize=4)
    ref, config = mlx_lm_load_model(path)
    mlx_lm_quantize(ref, config, 64, 4)
    assert_parity(mine, ref, atol=5e-4)
    attn = mine.layers[0].linear_attn
    assert attn.out_proj.bits == 4 and attn.A_log.dtype == mx.float32
    if family == "qwen3_next":
        assert (mine.layers[1].mlp.gate.bits, mine.layers[1].mlp.shared_expert_gate.bits) == (8, 8)


@pytest.mark.parametrize("family", FAMILIES)
def test_contract_layer_kinds_and_state_layout(hybrid_dirs, family):
    model = ours(hybrid_dirs(family))
    assert isinstance(model, CausalLM) and model.model_type == family
    assert [layer.is_linear for layer in model.layers] == [True, True, True, False] * 2
    assert model.kv_layers == [LayerKV(2, 32)] * 2
    assert len(model.state_layers) == 6
    conv_dim = 2 * 2 * 32 + 4 * 16  # q and k (2 heads x 32), v (4 heads x 16)
    assert model.state_layers[0].shapes == ((3, conv_dim), (4, 16, 32))
    assert model.state_layers[0].dtypes == (mx.float32, mx.float32)
    assert model.state_layers[0].nbytes == (3 * conv_dim + 4 * 16 * 32) * 4
    assert [layer.prunes for layer in model.layers] == [False] * 7 + [True]


def test_batch_of_two_equals_each_alone(hybrid_dirs):
    model = ours(hybrid_dirs("qwen3_5_moe"))
    prompts = (PROMPT, [t + 7 for t in PROMPT])
    cuts = [(0, 33), (33, 34), (34, len(PROMPT))]  # chunked, one token, chunked
    cache, batched = dense_cache(model), []
    for start, end in cuts:
        batched.append(np.array(model(mx.array([p[start:end] for p in prompts]), cache)))
        cache.advance(end - start)
    for row, prompt in enumerate(prompts):
        alone = trace(model, [prompt[start:end] for start, end in cuts])
        for b, a in zip(batched, alone, strict=True):
            np.testing.assert_allclose(b[row], a, atol=1e-4, rtol=1e-4)


def test_chunked_rule_equals_step_by_step_and_conv_carries_its_state():
    """The chunkwise form against the recurrence on slow decays (g near 1, where errors
    would accumulate), 3 blocks plus a remainder, value heads sharing key heads; the
    convolution run in two calls equals one call."""
    key = mx.random.key(3)
    kq, kk, kv, ka, kb, ks, kx = mx.random.split(key, 7)
    b, length, hk, hv, dk, dv = 2, 200, 2, 4, 32, 16
    q, k = gd.l2_normalize_qk(mx.random.normal((b, length, hk, dk), key=kq),
                              mx.random.normal((b, length, hk, dk), key=kk))
    v = mx.random.normal((b, length, hv, dv), key=kv)
    log_g = -0.01 * mx.random.uniform(shape=(b, length, hv), key=ka)
    beta = mx.random.uniform(shape=(b, length, hv), key=kb)
    state = 0.1 * mx.random.normal((b, hv, dv, dk), key=ks)
    rep = lambda x: mx.repeat(x, hv // hk, axis=2)  # noqa: E731
    y1, s1 = gd._chunked(rep(q), rep(k), v, log_g, beta, state)
    y2, s2 = gd._recurrent(rep(q), rep(k), v, log_g, beta, state)
    np.testing.assert_allclose(np.array(y1), np.array(y2), atol=2e-5)
    np.testing.assert_allclose(np.array(s1), np.array(s2), atol=2e-5)
    x, weight = mx.random.normal((b, 9, 8), key=kx), mx.random.normal((8, 4, 1), key=key)
    whole, end = gd.causal_conv1d(x, mx.zeros((b, 3, 8)), weight)
    first, mid = gd.causal_conv1d(x[:, :5], mx.zeros((b, 3, 8)), weight)
    second, end2 = gd.causal_conv1d(x[:, 5:], mid, weight)
    np.testing.assert_allclose(np.array(mx.concatenate([first, second], 1)), np.array(whole), atol=1e-6)
    np.testing.assert_allclose(np.array(end2), np.array(end))
    reference = mx.conv1d(mx.pad(x, [(0, 0), (3, 0), (0, 0)]), weight, groups=8)
    np.testing.assert_allclose(np.array(whole), np.array(reference), atol=1e-5)


class PackedCache:
    """The engine's packed step in miniature: the model sees ``(T, 1)`` one-token rows,
    sequence after sequence; the context regroups them per sequence (each its own
    ``DenseCache``) for attention and for ``recur``."""

    def __init__(self, caches, lengths):
        self.caches, self.lengths = caches, lengths
        ends = np.cumsum(lengths).tolist()
        self.runs = list(zip([0, *ends[:-1]], ends))
        self.offsets = mx.concatenate([c.offsets + mx.arange(n) for c, n in zip(caches, lengths)])

    def attend(self, layer_idx, queries, keys, values, scale):
        per_seq = lambda x, s, e: x[s:e].transpose(2, 1, 0, 3)  # noqa: E731 - (l,H,1,D) -> (1,H,l,D)
        outs = [c.attend(layer_idx, per_seq(queries, s, e), per_seq(keys, s, e),
                         per_seq(values, s, e), scale).transpose(2, 1, 0, 3)
                for c, (s, e) in zip(self.caches, self.runs)]
        return mx.concatenate(outs)

    def recur(self, layer_idx, inputs, fn):
        outs = [c.recur(layer_idx, tuple(x[s:e].swapaxes(0, 1) for x in inputs), fn).swapaxes(0, 1)
                for c, (s, e) in zip(self.caches, self.runs)]
        return mx.concatenate(outs)

    def output_rows(self, layer_idx):
        return None


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next"])
def test_packed_one_token_rows_equal_separate_runs(hybrid_dirs, family):
    """A prefill chunk beside another sequence's chunk, then a chunk beside a one-token
    decode row: every row's logits equal that sequence's own run."""
    model = ours(hybrid_dirs(family))
    a, b = PROMPT[:45], [t + 3 for t in PROMPT[:21]]
    steps = [(a[:33], b[:20]), (a[33:45], b[20:21])]
    caches = [dense_cache(model), dense_cache(model)]
    packed = []
    for ids_a, ids_b in steps:
        ctx = PackedCache(caches, [len(ids_a), len(ids_b)])
        rows = model(mx.array(ids_a + ids_b)[:, None], ctx)  # (T, 1, vocab)
        for c, n in zip(caches, ctx.lengths):
            c.advance(n)
        packed.append(np.array(rows[:, 0]))
    alone_a, alone_b = trace(model, [a[:33], a[33:45]]), trace(model, [b[:20], b[20:21]])
    for step, (x, y) in enumerate(zip(alone_a, alone_b)):
        np.testing.assert_allclose(packed[step], np.concatenate([x, y]), atol=1e-4, rtol=1e-4)


class PrunedCache(DenseCache):
    """A context that asks the last attention layer for only ``rows`` (as the engine does)."""

    def __init__(self, model, rows):
        super().__init__(len(model.kv_layers), model.state_layers)
        self.rows, self.last = mx.array(rows), len(model.kv_layers) - 1
        self.asked = []

    def output_rows(self, layer_idx):
        self.asked.append(layer_idx)
        return self.rows if layer_idx == self.last else None

    def attend(self, layer_idx, queries, keys, values, scale):
        out = super().attend(layer_idx, queries, keys, values, scale)
        return out[self.rows] if layer_idx == self.last else out


def test_last_attention_layer_prunes_to_the_sampled_rows(hybrid_dirs):
    model = ours(hybrid_dirs("qwen3_5"))
    ids = mx.array([PROMPT[:5], PROMPT[5:10], PROMPT[10:15]])  # three one-row sequences
    full = model.hidden_states(ids, dense_cache(model))
    cache = PrunedCache(model, [2, 0])
    pruned = model.hidden_states(ids, cache)
    assert cache.asked == [1]  # only the last layer asks, with its attention index
    np.testing.assert_allclose(np.array(pruned), np.array(full[mx.array([2, 0])]), atol=1e-5)


def test_a_last_linear_layer_never_prunes(tmp_path, qwen_tokenizer_dir):
    types = ["linear_attention", "full_attention"] * 3 + ["full_attention", "linear_attention"]
    path = write_hybrid_checkpoint(tmp_path / "m", qwen_tokenizer_dir, "qwen3_5",
                                   config_overrides={"layer_types": types})
    model = ours(path)
    cache = PrunedCache(model, [0])
    out = model.hidden_states(mx.array([PROMPT[:9]]), cache)
    assert cache.asked == [] and out.shape == (1, 9, 64)
    assert len(model.kv_layers) == 4 and len(model.state_layers) == 4


def test_mtp_and_vision_tensors_are_dropped_with_one_log_line(hybrid_dirs, caplog):
    with caplog.at_level(logging.INFO, logger="nano_qwen3_mlx.models.hybrid"):
        ours(hybrid_dirs("qwen3_5"))
    lines = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert lines == ["ignoring 16 checkpoint tensors not used for text generation "
                     "(multi-token prediction, vision), e.g. model.visual.patch_embed.proj.weight"]


def test_an_unknown_text_tensor_still_fails_the_load(tmp_path, hybrid_dirs):
    import shutil

    path = shutil.copytree(hybrid_dirs("qwen3_next"), tmp_path / "extra")
    weights = mx.load(str(path / "model.safetensors"))
    weights["model.layers.0.linear_attn.bogus.weight"] = mx.zeros((2,))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(ModelLoadError, match="unexpected tensor model.layers.0.linear_attn.bogus"):
        load(str(path))


def test_dtype_cast_keeps_A_log_float32(hybrid_dirs):
    model = ours(hybrid_dirs("qwen3_5", "mlx"), dtype="bfloat16")
    attn = model.layers[0].linear_attn
    assert (attn.A_log.dtype, attn.dt_bias.dtype, model.dtype) == (mx.float32, mx.bfloat16, mx.bfloat16)
    assert model.state_layers[0].dtypes == (mx.bfloat16, mx.float32)
    logits = trace(model, PIECES)
    assert all(np.isfinite(x).all() for x in logits)


def test_parameter_counts(hybrid_dirs):
    for family in FAMILIES:
        model = ours(hybrid_dirs(family, "mlx"))
        weights = mx.load(str(hybrid_dirs(family, "mlx") / "model.safetensors"))
        counts = model.num_parameters()
        assert counts["total"] == sum(w.size for w in weights.values()) == count_parameters(model)
        experts = [count_parameters(layer.mlp.switch_mlp) for layer in model.layers
                   if isinstance(layer.mlp, SharedExpertMoeBlock)]
        assert counts["active"] == counts["total"] - sum(e * 6 // 8 for e in experts)
        assert (counts["active"] < counts["total"]) == (family != "qwen3_5")


def test_chat_template_and_generation_config_come_from_the_checkpoint(tmp_path, qwen_tokenizer_dir):
    path = write_hybrid_checkpoint(tmp_path / "m", qwen_tokenizer_dir, "qwen3_5")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_k": 20}))
    loaded = load(str(path))
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<<hi>>"
    assert loaded.generation_config == {"temperature": 0.6, "top_k": 20}


def test_bad_hybrid_configs_fail_with_the_field(tmp_path, qwen_tokenizer_dir):
    path = write_hybrid_checkpoint(tmp_path / "m", qwen_tokenizer_dir, "qwen3_next")
    config = json.loads((path / "config.json").read_text())
    for bad, message in (({"linear_num_value_heads": 3}, "linear_num_value_heads=3"),
                         ({"layer_types": ["full_attention"]}, "layer_types")):
        (path / "config.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(ModelLoadError, match=message):
            load(str(path))


def test_registered_model_types():
    assert {f: MODEL_TYPES[f].__name__.rsplit(".", 1)[1] for f in FAMILIES} == {f: f for f in FAMILIES}


def test_bench_hybrid_shape_writes_a_checkpoint_both_engines_load(tmp_path, monkeypatch):
    """The ``hybrid`` bench row (flat Qwen3.5 config, our module paths), at tiny widths."""
    tiny = {**SHAPES["hybrid"], "hidden_size": 64, "intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "linear_key_head_dim": 32, "linear_value_head_dim": 16}
    monkeypatch.setitem(SHAPES, "hybrid-test", tiny)
    path = random_checkpoint("hybrid-test", "float32", tmp_path)
    mine, ref = ours(path), oracle(path)
    assert_parity(mine, ref)
    assert parameter_counts(path) == mine.num_parameters()
    assert len(mine.kv_layers) == 2 and len(mine.state_layers) == 6


def test_aliases_for_the_published_hybrid_models():
    from nano_qwen3_mlx.models.loader import MODEL_ALIASES

    assert MODEL_ALIASES["qwen3.5-0.8b"] == "Qwen/Qwen3.5-0.8B"
    assert MODEL_ALIASES["qwen3.5-0.8b-4bit"] == "mlx-community/Qwen3.5-0.8B-4bit"
    assert MODEL_ALIASES["qwen3.5-397b-a17b"] == "Qwen/Qwen3.5-397B-A17B"
    assert MODEL_ALIASES["qwen3-next-80b-a3b-thinking-4bit"] == "mlx-community/Qwen3-Next-80B-A3B-Thinking-4bit"
    assert sum(k.startswith(("qwen3.5-", "qwen3-next-")) for k in MODEL_ALIASES) == 8 * 2 + 2 * 2
