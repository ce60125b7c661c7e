"""One rank of ``tests/test_distributed_sharding.py``, started by ``mlx.launch -n 2``.

Every case builds the same tiny random model twice (same seed), shards one copy with
``shard_model`` and runs both on the same prompts: through ``DenseCache`` (logits, chunked
and step by step, batched) and, for some cases, through the engine (greedy tokens on the
paged KV cache and state pool); two cases go through ``loader.load(prepare=shard_model)``
from a checkpoint on disk (the rank's peak memory while loading). Each rank writes what it saw to ``OUT/rank{r}.json``; the
test asserts on it. Usage: ``distributed_sharding_worker.py OUT TOKENIZER_DIR``.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nano_qwen3_mlx  # noqa: F401  (first: it loads the optimised BLAS before MLX)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from nano_qwen3_mlx.config import EngineConfig
from nano_qwen3_mlx.distributed.pipeline import pipeline_model
from nano_qwen3_mlx.distributed.sharding import shard_model
from nano_qwen3_mlx.distributed.world import World
from nano_qwen3_mlx.engine.llm_engine import LLMEngine
from nano_qwen3_mlx.models.base import DenseCache
from nano_qwen3_mlx.models.loader import LoadedModel, load, load_model_dir, quantize_model
from nano_qwen3_mlx.sampling_params import SamplingParams
from nano_qwen3_mlx.tokenizer import Tokenizer
from tests.checkpoints import HYBRID_CONFIGS, TINY_QWEN3, TINY_QWEN3_MOE, write_checkpoint
from tests.checkpoints import build_tiny_hybrid as hybrid
from tests.checkpoints import build_tiny_model as dense

VOCAB = 8192  # small, so the cases run in seconds; every id below is under it
PROMPT = [9707 % VOCAB, 11, 847, 829, 374, 1207, 6948, 13, 358, 1075, 311, 3270] * 4  # 48 tokens
PIECES = (PROMPT[:36], PROMPT[36:39], PROMPT[39:])  # chunked (>= 32), step by step, chunked
BATCH = [PROMPT[5:17], PROMPT[20:32]]
ENGINE_PROMPTS = [PROMPT[:30], PROMPT[:30] + [42, 43], PROMPT[7:11]]  # a shared prefix
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def small(config: dict, **overrides) -> dict:
    """``config`` with ``VOCAB`` and ``overrides`` (in ``text_config`` where it has one)."""
    config = json.loads(json.dumps(config))
    config.get("text_config", config).update({"vocab_size": VOCAB, **overrides})
    return config


LINEAR_LAST = ["linear_attention", "linear_attention", "full_attention"] * 2 + ["linear_attention"] * 2


@dataclass(frozen=True)
class Case:
    config: dict
    builder: Callable = dense  # in memory, seed 0 (unless from_disk)
    bits: int | None = None  # quantized: in memory at group size 32, or on load (64)
    engine: bool = False  # also run the engine on both models
    from_disk: bool = False  # written as a checkpoint, loaded by load(prepare=split)
    split: Callable = shard_model  # or pipeline_model

    @property
    def pipeline(self) -> bool:
        return self.split is pipeline_model


CASES = {
    "qwen3": Case(small(TINY_QWEN3)),
    # One KV head (each rank keeps it), tied embeddings, a vocabulary 2 ranks do not divide.
    "qwen3_tied_1kv": Case(small(TINY_QWEN3, num_key_value_heads=1, tie_word_embeddings=True,
                                 vocab_size=VOCAB + 1), engine=True),
    # 6 query heads on 3 KV heads: rank 0 reads KV heads 0, 0, 1 and rank 1 reads 1, 2, 2.
    "qwen3_6q_3kv": Case(small(TINY_QWEN3, num_attention_heads=6, num_key_value_heads=3)),
    "qwen3_5": Case(small(HYBRID_CONFIGS["qwen3_5"]), hybrid),  # separate projections
    "qwen3_5_moe": Case(small(HYBRID_CONFIGS["qwen3_5_moe"]), hybrid, engine=True),  # shared expert
    "qwen3_next": Case(small(HYBRID_CONFIGS["qwen3_next"]), hybrid),  # fused projections
    "qwen3_moe_4bit": Case(small(TINY_QWEN3_MOE), bits=4, engine=True),
    "qwen3_next_8bit": Case(small(HYBRID_CONFIGS["qwen3_next"]), hybrid, bits=8),
    # Through the loader (HF layout: experts stacked on load), sharded before the weights are
    # read (the rank's peak memory).
    "qwen3_moe_loaded": Case(small(TINY_QWEN3_MOE), from_disk=True),
    "qwen3_loaded_4bit": Case(small(TINY_QWEN3), bits=4, from_disk=True),  # quantize, then shard
    # Pipeline parallel: layers split, hidden states sent rank to rank.
    "qwen3_moe_pipeline_loaded": Case(small(TINY_QWEN3_MOE), engine=True, from_disk=True,
                                      split=pipeline_model),
    # A last layer that is linear attention (the last rank never prunes, nor may the first).
    "qwen3_5_pipeline": Case(small(HYBRID_CONFIGS["qwen3_5"], layer_types=LINEAR_LAST), hybrid,
                             engine=True, split=pipeline_model),
}


def build(case: Case) -> nn.Module:
    model = case.builder(case.config, seed=0)
    if case.bits:
        nn.quantize(model, group_size=32, bits=case.bits,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized"))
    mx.eval(model.parameters())
    return model


def models(case: Case, group, checkpoint: Path) -> tuple[nn.Module, nn.Module, int | None]:
    """The whole model, the sharded one, and for a loaded one the sharded load's peak bytes."""
    if not case.from_disk:
        sharded = build(case)
        case.split(sharded, group)
        return build(case), sharded, None
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    sharded = load(str(checkpoint), quantize=case.bits,
                   prepare=lambda model: case.split(model, group)).model
    peak = mx.get_peak_memory() - base
    # The whole model without its tokenizer (parsing it takes a second per load).
    quantize = (lambda model: quantize_model(model, case.bits)) if case.bits else None
    return load_model_dir(checkpoint, prepare=quantize)[0], sharded, peak


def nbytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def layer_bytes(model: nn.Module) -> int:
    """The decoder layers' weights (a pipeline splits these, and keeps the rest whole)."""
    return sum(v.nbytes for _, v in tree_flatten([layer.parameters() for layer in model.layers]))


def traces(model: nn.Module) -> list[np.ndarray]:
    """Logits of one prompt in three passes on one cache, then a batch of two and a step."""
    out = []
    for calls in ([[p] for p in PIECES], [BATCH, [[5], [6]]]):
        cache = DenseCache(len(model.kv_layers), model.state_layers)
        for rows in calls:
            ids = mx.array(rows[0]) if len(rows) == 1 else mx.array(rows)
            logits = model(ids.reshape(len(rows), -1), cache)
            cache.advance(ids.reshape(len(rows), -1).shape[1])
            out.append(np.array(logits.astype(mx.float32)))
    return out


def engine_tokens(model: nn.Module, tokenizer: Tokenizer) -> tuple[list[list[int]], int]:
    """Greedy tokens of ``ENGINE_PROMPTS`` batched on the engine, and its pool's KV heads."""
    config = EngineConfig(model="tiny", device="cpu", num_kv_blocks=64, block_size=8,
                          state_snapshot_interval=8)
    # Every rank runs the same requests on its own engine (World(): no leader, no follower),
    # the model split (or not) already: the collectives inside the model keep them in step.
    engine = LLMEngine(config, LoadedModel(model, tokenizer, {}, Path("."), "tiny"), world=World())
    ids = {engine.add_request(p, GREEDY): i for i, p in enumerate(ENGINE_PROMPTS)}
    got = [[] for _ in ENGINE_PROMPTS]
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.finish_reason != "error", out.error
            got[ids[out.request_id]] += out.token_ids
    return got, engine.cache.num_kv_heads


@functools.cache
def tokenizer_of(path: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(path)


def run_case(name: str, group, tokenizer_dir: Path, out: Path) -> dict:
    case = CASES[name]
    checkpoint = out / f"rank{group.rank()}-{name}"
    if case.from_disk:
        write_checkpoint(checkpoint, tokenizer_dir, base=case.config)
    full, sharded, peak = models(case, group, checkpoint)
    want, got = traces(full), traces(sharded)
    result = {
        "load_peak_bytes": peak,
        "largest_tensor_full": max(v.nbytes for _, v in tree_flatten(full.parameters())),
        "layer_bytes_full": layer_bytes(full), "layer_bytes_rank": layer_bytes(sharded),
        "bytes_full": nbytes(full), "bytes_rank": nbytes(sharded),
        "kv_heads_full": [kv.num_kv_heads for kv in full.kv_layers],
        "kv_heads_rank": [kv.num_kv_heads for kv in sharded.kv_layers],
        "states_full": [[list(s) for s in st.shapes] for st in full.state_layers],
        "states_rank": [[list(s) for s in st.shapes] for st in sharded.state_layers],
        "logit_shapes_equal": all(w.shape == g.shape for w, g in zip(want, got)),
        "max_abs_diff": max(float(np.abs(w - g).max()) for w, g in zip(want, got)),
        "max_abs_logit": max(float(np.abs(w).max()) for w in want),
    }
    if case.engine:
        tokenizer = tokenizer_of(tokenizer_dir)
        result["engine_full"], result["pool_heads_full"] = engine_tokens(full, tokenizer)
        result["engine_rank"], result["pool_heads_rank"] = engine_tokens(sharded, tokenizer)
    return result


def main() -> None:
    out, tokenizer_dir = Path(sys.argv[1]), Path(sys.argv[2])
    mx.set_default_device(mx.cpu)
    group = mx.distributed.init()
    results = {"world_size": group.size(), "rank": group.rank(), "cases": {}}
    for name in CASES:
        start = time.perf_counter()
        try:
            results["cases"][name] = run_case(name, group, tokenizer_dir, out)
        except Exception:  # recorded for the test; the ranks stay in step (same code path)
            results["cases"][name] = {"error": traceback.format_exc()}
        results["cases"][name]["seconds"] = round(time.perf_counter() - start, 2)
    (out / f"rank{group.rank()}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
