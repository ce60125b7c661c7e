"""Qwen3 parity with the mlx-lm oracle, paged == dense, and the loader's checkpoint formats."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as lm_cache
from mlx_lm.models import qwen3 as lm_qwen3

from nano_qwen3_mlx.models.base import DenseCache
from nano_qwen3_mlx.models.loader import ModelLoadError, load, load_model_dir
from nano_qwen3_mlx.models.qwen3 import ModelArgs
from tests.checkpoints import copy_without, quantize_checkpoint, write_checkpoint

PROMPT = [9707, 11, 847, 829, 374, 1207, 16948, 13, 358, 1075, 311, 3270]


def oracle(path):
    config = json.loads((path / "config.json").read_text())
    model = lm_qwen3.Model(lm_qwen3.ModelArgs.from_dict(config))
    weights = mx.load(str(path / "model.safetensors"))
    model.load_weights(list(model.sanitize(weights).items()))
    return model


def ours(path):
    model, _ = load_model_dir(path)
    return model


def decode_logits(model, cache, step, prompt, steps, ours_api: bool):
    """Prompt logits, then logits of `steps` greedy decode steps (cached)."""
    x = mx.array([prompt])
    all_logits = []
    for _ in range(steps + 1):
        logits = model(x, cache) if ours_api else model(x, cache=cache)
        step(cache, x.shape[1])
        all_logits.append(np.array(logits[0, -1]))
        x = mx.argmax(logits[:, -1:], axis=-1)
    return all_logits


def test_logits_match_mlx_lm_prompt_and_16_cached_steps(tiny_qwen3_dir):
    mine, ref = ours(tiny_qwen3_dir), oracle(tiny_qwen3_dir)
    a = decode_logits(mine, DenseCache(2), lambda c, n: c.advance(n), PROMPT, 16, True)
    b = decode_logits(ref, lm_cache.make_prompt_cache(ref), lambda c, n: None, PROMPT, 16, False)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)


def greedy(model, prompt, n, ours_api=True):
    cache = DenseCache(len(model.layers)) if ours_api else lm_cache.make_prompt_cache(model)
    x, out = mx.array([prompt]), []
    for _ in range(n):
        logits = model(x, cache) if ours_api else model(x, cache=cache)
        if ours_api:
            cache.advance(x.shape[1])
        x = mx.argmax(logits[:, -1:], axis=-1)
        out.append(x.item())
    return out


def test_greedy_32_tokens_identical_to_mlx_lm(tiny_qwen3_dir):
    assert greedy(ours(tiny_qwen3_dir), PROMPT, 32) == greedy(oracle(tiny_qwen3_dir), PROMPT, 32, False)


def test_tied_embeddings_and_nested_rope_parameters(tmp_path, qwen_tokenizer_dir):
    path = write_checkpoint(tmp_path / "tied", qwen_tokenizer_dir, {
        "tie_word_embeddings": True, "rope_theta": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    })
    config = json.loads((path / "config.json").read_text())
    assert ModelArgs.from_dict(config).rope_theta == 1000000.0
    config["rope_theta"] = 1000000.0
    (path / "config.json").write_text(json.dumps(config))
    a = np.array(ours(path)(mx.array([PROMPT]), DenseCache(2)))
    b = np.array(oracle(path)(mx.array([PROMPT])))
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits, tol", [(8, 0.05), (4, 0.35)])
def test_quantized_checkpoint_reloads_close_to_fp32(tiny_qwen3_dir, tmp_path, bits, tol):
    qdir = quantize_checkpoint(tiny_qwen3_dir, tmp_path / f"q{bits}", bits)
    assert "scales" in " ".join(mx.load(str(qdir / "model.safetensors")))
    full = np.array(ours(tiny_qwen3_dir)(mx.array([PROMPT]), DenseCache(2)))
    quant = np.array(ours(qdir)(mx.array([PROMPT]), DenseCache(2)))
    rel = np.abs(full - quant).mean() / np.abs(full).mean()
    assert rel < tol, rel


def test_quantize_on_load(tiny_qwen3_dir):
    loaded = load(str(tiny_qwen3_dir), quantize=8)
    assert loaded.config["quantization"]["bits"] == 8
    layer = loaded.model.layers[0].mlp.gate_proj
    assert type(layer).__name__ == "QuantizedLinear"


def test_sharded_checkpoint(tiny_qwen3_dir, tmp_path):
    path = tmp_path / "sharded"
    shutil.copytree(tiny_qwen3_dir, path)
    weights = mx.load(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    keys = sorted(weights)
    half = len(keys) // 2
    index = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        mx.save_safetensors(str(path / name), {k: weights[k] for k in part})
        index.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    a = np.array(ours(path)(mx.array([PROMPT]), DenseCache(2)))
    b = np.array(ours(tiny_qwen3_dir)(mx.array([PROMPT]), DenseCache(2)))
    np.testing.assert_array_equal(a, b)


def test_bf16_dtype_override(tiny_qwen3_dir):
    model, _ = load_model_dir(tiny_qwen3_dir, dtype="bfloat16")
    assert model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16


def test_missing_and_unexpected_tensors_are_named(tiny_qwen3_dir, tmp_path):
    path = tmp_path / "broken"
    weights = copy_without(tiny_qwen3_dir, path, "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(ModelLoadError, match="missing tensor model.layers.1.mlp.down_proj.weight"):
        load_model_dir(path)
    weights["model.layers.1.mlp.down_proj.weight"] = mx.zeros((64, 128))
    weights["model.extra.weight"] = mx.zeros((2,))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(ModelLoadError, match="unexpected tensor model.extra.weight"):
        load_model_dir(path)


def test_corrupt_config_is_one_clear_line(tiny_qwen3_dir, tmp_path):
    path = tmp_path / "bad"
    shutil.copytree(tiny_qwen3_dir, path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as info:
        load_model_dir(path)
    assert "config.json" in str(info.value) and "\n" not in str(info.value)


def test_hub_offline_error_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not cached.*smollm2-135m"):
        load("Qwen/Qwen3-0.6B")


def test_hub_cache_layout_is_used_offline(monkeypatch, tmp_path, tiny_qwen3_dir):
    """A model in the HF cache layout loads with HF_HUB_OFFLINE=1 (no network)."""
    repo = tmp_path / "models--acme--tiny-qwen3"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_qwen3_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded = load("acme/tiny-qwen3")
    assert loaded.path == snap


@pytest.mark.parametrize("tied", [True, False])
def test_one_row_logits_are_the_blas_sgemv_and_equal_the_matmul(tmp_path, qwen_tokenizer_dir,
                                                                monkeypatch, tied):
    """Batch-1 decode's output layer runs as ``blas.matvec`` where an optimised BLAS is
    loaded (MLX's one-row sgemm is ~3x slower there); several rows keep MLX's matmul."""
    from nano_qwen3_mlx import blas
    from nano_qwen3_mlx.engine.split_linear import split_linears
    from nano_qwen3_mlx.models import decoder

    model = ours(write_checkpoint(tmp_path / "m", qwen_tokenizer_dir, {"tie_word_embeddings": tied}))
    split_linears(model)  # as the engine does: an untied head becomes a StreamSplitLinear
    weight = model.model.embed_tokens.weight if tied else model.lm_head.weight
    calls = []
    monkeypatch.setattr(decoder, "matvec", lambda w, x: calls.append(x.shape) or blas.matvec(w, x))
    hidden = mx.random.normal((3, weight.shape[1]), key=mx.random.key(0))
    for rows in (hidden[:1], hidden):
        np.testing.assert_allclose(np.array(model.compute_logits(rows)), np.array(rows @ weight.T),
                                   rtol=1e-4, atol=1e-4)
    assert calls == [(1, weight.shape[1]), (3, weight.shape[1])]
    if blas.blas_info().path is not None:
        assert blas.matvec(weight, hidden[:1]) is not None  # the one row took the sgemv
