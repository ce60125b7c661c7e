"""Embeddings on the engine: equal to an independent mlx-lm computation on the same weights,
batched == one at a time, through chunked prefill and the prefix cache, no blocks kept."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import qwen3 as lm_qwen3

from nano_qwen3_mlx import LLM
from nano_qwen3_mlx.config import EngineConfig
from nano_qwen3_mlx.embeddings import embedding_ids, to_base64, truncate
from nano_qwen3_mlx.sampling_params import SamplingParams

TEXTS = ["Instruct: find the capital\nQuery:What is the capital of France?",
         "Paris is the capital of France.", "x", "a much longer text " * 12]


def oracle_embedding(path, ids: list[int]) -> np.ndarray:
    """mlx-lm's Qwen3 body on the same weights: last token after the final norm, unit length."""
    config = json.loads((path / "config.json").read_text())
    model = lm_qwen3.Model(lm_qwen3.ModelArgs.from_dict(config))
    model.load_weights(list(model.sanitize(mx.load(str(path / "model.safetensors"))).items()))
    hidden = np.array(model.model(mx.array([ids]))[0, -1], dtype=np.float64)
    return hidden / np.linalg.norm(hidden)


@pytest.fixture(scope="module")
def llm(tiny_qwen3_dir):
    # A small token budget so the long text is prefilled in several chunks.
    config = EngineConfig(model=str(tiny_qwen3_dir), num_kv_blocks=64, max_num_seqs=8,
                          max_model_len=256, max_num_batched_tokens=32)
    with LLM(config=config) as llm:
        yield llm


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_embeddings_equal_mlx_lm_oracle(llm, tiny_qwen3_dir):
    vectors = llm.embed(TEXTS)
    for text, vector in zip(TEXTS, vectors):
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-5
        expected = oracle_embedding(tiny_qwen3_dir, embedding_ids(llm.tokenizer, text))
        assert cosine(vector, expected) >= 0.9999


def test_batch_equals_one_at_a_time_and_no_blocks_kept(llm):
    batched = llm.embed(TEXTS)
    for text, vector in zip(TEXTS, batched):
        assert cosine(llm.embed(text)[0], vector) >= 0.9999  # the 2nd time from the prefix cache
    assert llm.get_stats()["kv_cache"]["num_used_blocks"] == 0


def test_embeddings_mixed_with_generation(llm):
    alone = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=8))[0]
    greedy = SamplingParams(temperature=0, max_tokens=8)
    ids = [llm.engine.add_request("Once upon a time", greedy)]
    ids += [llm.engine.add_request(embedding_ids(llm.tokenizer, t), greedy, pooling=True)
            for t in TEXTS]
    finals = {}
    text = []
    while len(finals) < len(ids):
        for out in llm.engine.step():
            text += [out.text] if out.request_id == ids[0] else []
            if out.finished:
                finals[out.request_id] = out
    assert "".join(text) == alone["generated_text"]
    for rid, expected in zip(ids[1:], llm.embed(TEXTS)):
        assert finals[rid].num_completion_tokens == 0 and not finals[rid].token_ids
        assert cosine(finals[rid].embedding, expected) >= 0.9999
    assert llm.get_stats()["kv_cache"]["num_used_blocks"] == 0


def test_abort_frees_blocks_and_bad_prompt_is_a_value_error(llm):
    rid = llm.engine.add_request(list(range(100, 180)), SamplingParams(max_tokens=1), pooling=True)
    llm.engine.step()
    assert llm.engine.abort_request(rid)
    llm._drain()
    assert llm.get_stats()["kv_cache"]["num_used_blocks"] == 0
    with pytest.raises(ValueError):
        llm.embed([[1, 2], [10**9]])
    assert llm.get_stats()["kv_cache"]["num_used_blocks"] == 0


def test_truncate_and_base64():
    vector = [0.6, 0.8, 0.0]
    assert truncate(vector, None) == vector and truncate(vector, 5) == vector
    assert truncate([3.0, 4.0, 1.0], 2) == pytest.approx([0.6, 0.8])
    decoded = np.frombuffer(__import__("base64").b64decode(to_base64(vector)), dtype="<f4")
    assert decoded.tolist() == pytest.approx(vector)


def test_headless_embedding_checkpoint_loads(tiny_qwen3_dir, tmp_path, llm):
    """Qwen3-Embedding ships the body alone (keys without ``model.``, tied embeddings)."""
    import shutil

    weights = mx.load(str(tiny_qwen3_dir / "model.safetensors"))
    headless = {k.removeprefix("model."): v for k, v in weights.items() if k != "lm_head.weight"}
    for f in tiny_qwen3_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), headless)
    config = json.loads((tiny_qwen3_dir / "config.json").read_text())
    config.update(tie_word_embeddings=True, architectures=["Qwen3Model"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with LLM(config=EngineConfig(model=str(tmp_path), num_kv_blocks=16, max_model_len=64)) as emb:
        assert cosine(emb.embed(TEXTS[1])[0], llm.embed(TEXTS[1])[0]) >= 0.9999
