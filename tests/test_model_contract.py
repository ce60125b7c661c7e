"""The engine talks to a model through ``models.contract.CausalLM`` and nothing else."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import pytest

from nano_qwen3_mlx import SamplingParams
from nano_qwen3_mlx.config import EngineConfig
from nano_qwen3_mlx.engine.llm_engine import LLMEngine
from nano_qwen3_mlx.models import llama, qwen3
from nano_qwen3_mlx.models.contract import CausalLM, LayerKV, uniform_kv
from nano_qwen3_mlx.models.loader import load

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SMALL = {"hidden_size": 32, "num_hidden_layers": 3, "intermediate_size": 64,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}


class ContractOnly:
    """A model seen only through the protocol: any other attribute is an AttributeError."""

    __slots__ = ("_model",)

    def __init__(self, model: CausalLM) -> None:
        self._model = model

    model_type = property(lambda self: self._model.model_type)
    dtype = property(lambda self: self._model.dtype)
    vocab_size = property(lambda self: self._model.vocab_size)
    max_position_embeddings = property(lambda self: self._model.max_position_embeddings)
    kv_layers = property(lambda self: self._model.kv_layers)
    state_layers = property(lambda self: self._model.state_layers)

    def hidden_states(self, input_ids, ctx):
        return self._model.hidden_states(input_ids, ctx)

    def compute_logits(self, hidden):
        return self._model.compute_logits(hidden)

    def num_parameters(self):
        return self._model.num_parameters()

    def parameters(self):
        return self._model.parameters()


@pytest.mark.parametrize("family", [qwen3, llama])
def test_families_declare_the_contract(family):
    model = family.Model(family.ModelArgs(**SMALL))
    assert isinstance(model, CausalLM)
    assert model.model_type == family.ModelArgs().model_type
    assert model.vocab_size == 100 and model.dtype == mx.float32
    assert model.kv_layers == [LayerKV(num_kv_heads=2, head_dim=8)] * 3
    assert uniform_kv(model) == LayerKV(2, 8)
    assert ("q_norm" in model.layers[0].self_attn) == (family is qwen3)


def test_mixed_kv_layers_are_refused_by_the_paged_cache():
    class Mixed:  # e.g. a model whose layers alternate two head layouts
        kv_layers = [LayerKV(2, 8), LayerKV(4, 8)]

    with pytest.raises(ValueError, match="identical attention layers"):
        uniform_kv(Mixed())


def _generate(engine: LLMEngine, prompt: str) -> list[int]:
    request_id, tokens = engine.add_request(prompt, GREEDY), []
    while engine.has_unfinished_requests():
        tokens += [t for out in engine.step() if out.request_id == request_id
                   for t in out.token_ids]
    return tokens


def test_engine_runs_a_model_through_the_contract_only(tiny_qwen3_dir):
    config = EngineConfig(model=str(tiny_qwen3_dir), num_kv_blocks=32, block_size=16)
    loaded = load(str(tiny_qwen3_dir))
    full = _generate(LLMEngine(config, loaded), "The quick brown fox")
    narrow = LLMEngine(config, dataclasses.replace(loaded, model=ContractOnly(loaded.model)))
    assert _generate(narrow, "The quick brown fox") == full
    assert len(full) == GREEDY.max_tokens
