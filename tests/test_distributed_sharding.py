"""Tensor and pipeline parallelism (``distributed/sharding.py``, ``distributed/pipeline.py``)
on two local ranks: ``mlx.launch -n 2 --backend ring`` runs
``tests/distributed_sharding_worker.py`` once for every case; each rank compares its split
model with the whole one (same seed) and writes what it saw.

Per case: the logits (chunked prefill, one-token steps, a batch) equal the whole model's at
float32 (exactly, for a pipeline), the weights per rank are about half (a pipeline: half the
layers), the KV heads and recurrent states the engine pools are the rank's, and where the
engine runs, its greedy tokens equal one rank's. In this process (a stand-in group: splitting
communicates nothing): the KV heads a rank keeps, clear errors, a pipeline rank's layers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from nano_qwen3_mlx.distributed.pipeline import pipeline_model
from nano_qwen3_mlx.distributed.sharding import kv_heads_for, shard_model
from tests.checkpoints import TINY_QWEN3
from tests.checkpoints import build_tiny_model as dense
from tests.distributed_sharding_worker import CASES, build, small

ROOT = Path(__file__).resolve().parents[1]
RANKS = 2
# Replicated per rank: norms, the router, the shared-expert gate, and for one KV head k/v_proj.
MAX_BYTES_RATIO = 0.52


def launcher() -> Path:
    """``mlx.launch`` of the interpreter running the tests (the venv's)."""
    path = Path(sys.executable).parent / "mlx.launch"
    assert path.exists(), f"mlx.launch is not beside {sys.executable}"
    return path


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, qwen_tokenizer_dir) -> list[dict]:
    """Both ranks' results (one launch for every case)."""
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [str(launcher()), "-n", str(RANKS), "--backend", "ring", "--python", sys.executable,
           str(ROOT / "tests" / "distributed_sharding_worker.py"), str(out), str(qwen_tokenizer_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(RANKS)]
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, RANKS), (1, RANKS)]
    return results


TENSOR = [name for name, case in CASES.items() if not case.pipeline]
PIPELINE = [name for name, case in CASES.items() if case.pipeline]


def results_of(ranks: list[dict], name: str) -> list[dict]:
    """One case's result on each rank (a worker error fails with its traceback)."""
    results = [r["cases"][name] for r in ranks]
    for r in results:
        assert "error" not in r, r["error"]
    return results


@pytest.fixture(params=TENSOR)
def case(request, ranks) -> list[dict]:
    return results_of(ranks, request.param)


@pytest.fixture(params=PIPELINE)
def pipeline_case(request, ranks) -> list[dict]:
    return results_of(ranks, request.param)


def test_sharded_logits_equal_the_whole_model(case):
    for r in case:
        assert r["logit_shapes_equal"]  # the full vocabulary on every rank
        # float32; the ranks' partial sums only reassociate additions
        assert r["max_abs_diff"] <= 2e-5 * r["max_abs_logit"], r


def test_each_rank_holds_about_half_the_weights(case):
    for r in case:
        assert 0.5 <= r["bytes_rank"] / r["bytes_full"] <= MAX_BYTES_RATIO, r


def test_pipelined_logits_are_the_whole_models(pipeline_case):
    for r in pipeline_case:
        assert r["logit_shapes_equal"] and r["max_abs_diff"] == 0.0, r  # the same arithmetic


def test_a_pipeline_splits_the_layers_and_keeps_the_rest(pipeline_case):
    first, second = pipeline_case
    assert first["layer_bytes_rank"] + second["layer_bytes_rank"] == first["layer_bytes_full"]
    for r in pipeline_case:
        assert 0 < r["layer_bytes_rank"] < r["layer_bytes_full"]
        assert r["bytes_rank"] - r["layer_bytes_rank"] == r["bytes_full"] - r["layer_bytes_full"]
    # each rank pools only its own attention and recurrent layers
    assert first["kv_heads_rank"] + second["kv_heads_rank"] == first["kv_heads_full"]
    assert first["states_rank"] + second["states_rank"] == first["states_full"]


def test_a_rank_sharding_while_loading_never_holds_the_whole_model(ranks):
    """``load(prepare=shard_model)`` shards before the weights are read, layer by layer:
    a rank's peak is its share plus the largest full tensor (here the embedding table)."""
    for r in (rank["cases"]["qwen3_moe_loaded"] for rank in ranks):
        assert "error" not in r, r["error"]
        assert r["load_peak_bytes"] <= r["bytes_rank"] + r["largest_tensor_full"] * 1.05, r
        assert r["load_peak_bytes"] < 0.95 * r["bytes_full"], r


def test_kv_heads_and_states_are_per_rank(case):
    for r in case:
        for full, rank in zip(r["kv_heads_full"], r["kv_heads_rank"], strict=True):
            # split where the ranks divide the KV heads; else the ones a rank's queries read:
            # the one KV head, or (6 query heads on 3) 3 of them, one per local query head
            assert rank == (full // RANKS if full % RANKS == 0 else {1: 1, 3: 3}[full])
        for full, rank in zip(r["states_full"], r["states_rank"], strict=True):
            (k, conv_full), (k2, conv_rank) = full[0], rank[0]
            assert (k2, conv_rank * RANKS) == (k, conv_full)  # convolution channels
            assert [rank[1][0] * RANKS, *rank[1][1:]] == full[1]  # value heads


def test_uneven_kv_heads_are_kept_by_query_group():
    """6 query heads on 3 KV heads over 2 ranks: each rank keeps the 3 KV heads its 3 query
    heads read (some twice), so its local groups are even (1 query head per KV head)."""
    assert kv_heads_for(6, 3, range(0, 3)) == [0, 0, 1]
    assert kv_heads_for(6, 3, range(3, 6)) == [1, 2, 2]
    assert kv_heads_for(8, 2, range(4, 8)) == [1]  # divisible: an even split
    assert kv_heads_for(8, 1, range(2, 4)) == [0]  # fewer KV heads than ranks: one each
    assert kv_heads_for(16, 4, range(12, 16)) == [3]
    assert kv_heads_for(16, 8, range(8, 12)) == [4, 5]


def test_the_engine_on_sharded_ranks_generates_what_one_rank_does(ranks):
    ran = [name for name, case in CASES.items() if case.engine]
    assert ran
    for name in ran:
        for r in (rank["cases"][name] for rank in ranks):
            assert "error" not in r, r["error"]
            assert r["engine_rank"] == r["engine_full"], name
            assert all(len(tokens) == 8 for tokens in r["engine_rank"])
            # the paged pool holds this rank's KV heads only
            assert r["pool_heads_rank"] == r["kv_heads_rank"][0]


class RankOf:
    """A stand-in for one rank of an ``mx.distributed`` group: sharding itself communicates
    nothing, so its slicing (and its errors) can be checked in this process."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@pytest.mark.parametrize(("name", "overrides", "bits", "message"), [
    ("qwen3", {"num_attention_heads": 3, "num_key_value_heads": 1},
     None, "num_attention_heads=3 cannot be split across 2 ranks"),
    ("qwen3_moe_4bit", {"moe_intermediate_size": 63}, None, "moe_intermediate_size=63 cannot be split"),
    # 64 input features of the experts' down_proj are one group of 64: no half group per rank
    ("qwen3_moe_4bit", {}, 4, "switch_mlp.down_proj.scales columns"),
])
def test_a_size_the_ranks_do_not_divide_is_a_clear_error(name, overrides, bits, message):
    case = CASES[name]
    model = case.builder(small(case.config, **overrides), seed=0)
    if bits:
        nn.quantize(model, group_size=64, bits=bits,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized"))
    with pytest.raises(ValueError, match=message):
        shard_model(model, RankOf(0, 2))


def test_one_rank_changes_nothing():
    model = build(CASES["qwen3"])
    before = dict(tree_flatten(model.parameters()))
    shard_model(model, mx.distributed.init())  # a single process: size 1
    assert all(v is before[k] for k, v in tree_flatten(model.parameters()))


def test_a_pipeline_needs_a_layer_per_rank():
    model = build(CASES["qwen3"])  # 2 layers
    with pytest.raises(ValueError, match="2 layers cannot be split across 3 ranks"):
        pipeline_model(model, RankOf(0, 3))


@pytest.mark.parametrize(("rank", "layers", "kv_indices"), [(0, 2, [0, 1]), (1, 1, [0]), (2, 1, [0])])
def test_a_pipeline_rank_keeps_its_run_of_layers_renumbered(rank, layers, kv_indices):
    """4 layers on 3 ranks: 2 + 1 + 1, the first ranks taking the extra one."""
    model = dense(small(TINY_QWEN3, num_hidden_layers=4), seed=0)
    whole = [id(layer) for layer in model.layers]
    pipeline_model(model, RankOf(rank, 3))
    first = [0, 2, 3][rank]
    assert [id(layer) for layer in model.layers] == whole[first:first + layers]
    assert [layer.self_attn.layer_idx for layer in model.layers] == kv_indices  # pool indices
    assert len(model.kv_layers) == layers
