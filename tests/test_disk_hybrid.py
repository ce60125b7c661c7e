"""The disk tier on hybrid models (engine/disk_state.py): a restarted engine resumes a prompt
from the KV blocks and the recurrent-state snapshot on disk, exactly; a missing or damaged
snapshot file falls back to an earlier one, or to computing, never to a wrong token."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.engine.disk_keys import block_key
from nano_qwen3_mlx.engine.disk_state import state_key
from tests.checkpoints import write_hybrid_checkpoint
from tests.toy_hybrid import ToyHybridLM, toy_engine

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
OPTIONS = {"block_size": 16, "state_snapshot_interval": 64, "device": "cpu"}


def prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab // 100, vocab) for _ in range(n)]


@pytest.fixture(scope="module")
def qwen35_dir(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    return write_hybrid_checkpoint(tmp_path_factory.mktemp("qwen35"), qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def toy() -> ToyHybridLM:
    return ToyHybridLM()


def engine_of(kind: str, path: Path, toy: ToyHybridLM, tokenizer: Path, cache: Path | None):
    disk = {"prefix_cache_dir": str(cache), "prefix_cache_disk_gb": 0.5} if cache else {}
    if kind == "toy":
        return toy_engine(toy, tokenizer, **OPTIONS, **disk), None
    llm = LLM(str(path), **OPTIONS, **disk)
    return llm.engine, llm


def session(kind, path, toy, tokenizer, cache, p):
    """(greedy tokens, cached prompt tokens, disk stats) of one engine's life."""
    engine, llm = engine_of(kind, path, toy, tokenizer, cache)
    try:
        request_id, tokens, cached = engine.add_request(p, GREEDY), [], 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.finish_reason != "error", out.error
                tokens += out.token_ids
                cached = out.num_cached_tokens if out.finished else cached
        assert out.request_id == request_id
    finally:
        (llm or engine).close()  # waits for the queued writes
    return tokens, cached, engine.disk.stats() if engine.disk else None


def snapshot_file(cache: Path, root: bytes, p: list[int], position: int) -> Path:
    key = root
    for i in range(position // 16):
        key = block_key(key, p[i * 16:(i + 1) * 16])
    return cache / f"{state_key(key).hex()}.kvb"


@pytest.mark.parametrize("kind", ["qwen3_5", "toy"])
def test_a_restart_resumes_a_hybrid_prompt_from_disk_exactly(
        kind, tmp_path: Path, qwen35_dir: Path, toy, qwen_tokenizer_dir: Path) -> None:
    args = (kind, qwen35_dir, toy, qwen_tokenizer_dir)
    cache, p = tmp_path / "c", prompt(300, 256 if kind == "toy" else 100000)
    cold, cached, _ = session(*args, None, p)
    assert cached == 0
    _, _, stats = session(*args, cache, p)
    # Snapshots at 64, 128, 192, 256 (the prompt's end, 300, is inside a block: not stored).
    assert stats["snapshots_written"] == 4
    tokens, cached, stats = session(*args, cache, p)
    assert (tokens, cached) == (cold, 256)  # the state and the KV up to the last snapshot
    assert stats["snapshots_loaded"] == 1 and stats["tokens_loaded"] == 256
    assert stats["corrupt"] == 0 and stats["snapshots_written"] == 0  # all there already

    # Damaged or missing snapshot files: the last good one earlier, or nothing; exact anyway.
    root = _root(kind, qwen35_dir, toy, qwen_tokenizer_dir, cache)
    victim = snapshot_file(cache, root, p, 256)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    snapshot_file(cache, root, p, 192).unlink()
    tokens, cached, stats = session(*args, cache, p)
    assert (tokens, cached, stats["corrupt"]) == (cold, 128, 1)
    for position in (64, 128, 192, 256):  # 192 and 256 were written again when recomputed
        snapshot_file(cache, root, p, position).unlink()
    tokens, cached, stats = session(*args, cache, p)
    assert (tokens, cached) == (cold, 0)  # KV alone cannot resume a recurrent state


def _root(kind, path, toy, tokenizer, cache) -> bytes:
    engine, llm = engine_of(kind, path, toy, tokenizer, cache)
    try:
        return engine.disk.root
    finally:
        (llm or engine).close()
