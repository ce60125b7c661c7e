"""The prefix cache's disk tier on the real engine (engine/disk_tier.py): exact hits, cached
tokens, keys that never match another model or layout, damaged files, a writer that never
blocks a step, configuration."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.async_llm import AsyncLLM
from nano_qwen3_mlx.config import EngineConfig
from nano_qwen3_mlx.engine.disk_keys import DEFAULT_DISK_GB, block_key, resolve_location

from .checkpoints import write_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 100000) for _ in range(n)]


def run(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], int]]:
    """(generated ids, cached prompt tokens) per prompt, all batched together."""
    ids = [llm.engine.add_request(p, GREEDY) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    cached: dict[str, int] = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                cached[out.request_id] = out.num_cached_tokens
    return [(tokens[i], cached[i]) for i in ids]


def make(model: Path, cache: Path | None, **options) -> LLM:
    disk = {"prefix_cache_dir": str(cache), "prefix_cache_disk_gb": 0.5} if cache else {}
    options.setdefault("block_size", 16)  # the block counts below are in 16-token blocks
    return LLM(str(model), device="cpu", **disk, **options)


def session(model: Path, cache: Path | None, prompts: list[list[int]], **options):
    llm = make(model, cache, **options)
    try:
        results = run(llm, prompts)
    finally:
        llm.close()  # waits for the queued writes
    return results, llm.get_stats().get("disk_cache")


@pytest.mark.parametrize("checkpoint", ["tiny_qwen3_dir", "tiny_moe_dir"])
def test_hits_after_a_restart_are_exact_and_reported_as_cached(request, tmp_path: Path,
                                                               checkpoint: str) -> None:
    model = request.getfixturevalue(checkpoint)
    first, other = prompt(300), prompt(200, seed=1)
    (cold, _), = session(model, None, [first])[0]
    (warm, cached), = session(model, None, [first])[0]  # no tier: nothing survives
    assert warm == cold and cached == 0
    results, stats = session(model, tmp_path / "c", [first, other])
    assert results[0] == (cold, 0) and stats["writes"] >= 18 + 12
    # After the restart, the first 18 blocks (288 tokens) come from disk, exactly.
    branch = first[:200] + prompt(60, seed=2)  # shares 12 whole blocks, then differs
    resumed = first + cold + prompt(40, seed=3)  # the answer's block was written too
    results, stats = session(model, tmp_path / "c", [first, branch, resumed])
    expected = session(model, None, [first, branch, resumed])[0]
    assert [r[0] for r in results] == [r[0] for r in expected]
    # branch: 12 blocks, then 8 tokens copied from RAM (first's 13th block, loaded just now);
    # resumed: the 19 full blocks of the first session's prompt and answer.
    assert [r[1] for r in results] == [288, 200, 304]
    assert stats["hits"] >= 18 and stats["corrupt"] == 0
    assert stats["tokens_loaded"] >= 288


def test_ram_hits_read_nothing_from_disk(tmp_path: Path, tiny_qwen3_dir: Path) -> None:
    llm = make(tiny_qwen3_dir, tmp_path / "c")
    try:
        (cold, _), = run(llm, [prompt(300)])
        # Idle now: every block of the request is handed to the writer without another step
        # (19 = the prompt's 18 and one of prompt and answer; the last token never ran).
        assert llm.engine.disk.store.flush() and llm.get_stats()["disk_cache"]["writes"] == 19
        (again, cached), = run(llm, [prompt(300)])
        assert again == cold and cached == 299  # RAM: whole blocks and the partial one
        assert llm.get_stats()["disk_cache"]["hits"] == 0
    finally:
        llm.close()


def test_files_of_another_model_or_layout_never_match(tmp_path: Path, qwen_tokenizer_dir: Path,
                                                      tiny_qwen3_dir: Path) -> None:
    cache, p = tmp_path / "c", prompt(200)
    session(tiny_qwen3_dir, cache, [p])
    other = write_checkpoint(tmp_path / "other", qwen_tokenizer_dir, seed=1)  # same shapes
    for model, options in [(other, {}), (tiny_qwen3_dir, {"dtype": "float16"}),
                           (tiny_qwen3_dir, {"block_size": 32})]:
        (tokens, cached), = session(model, cache, [p], **options)[0]
        assert cached == 0
        assert tokens == session(model, None, [p], **options)[0][0][0]


def test_damaged_files_are_misses_deleted_and_never_change_a_token(
        tmp_path: Path, tiny_qwen3_dir: Path) -> None:
    cache, p = tmp_path / "c", prompt(300)
    llm = make(tiny_qwen3_dir, cache)
    try:
        (cold, _), = run(llm, [p])
        root = llm.engine.disk.root
    finally:
        llm.close()
    key = root
    for i in range(6):  # the 6th block of the chain: a flipped byte in its payload
        key = block_key(key, p[i * 16:(i + 1) * 16])
    victim = cache / f"{key.hex()}.kvb"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    ((tokens, cached),), stats = session(tiny_qwen3_dir, cache, [p])
    assert tokens == cold
    assert cached == 5 * 16  # the chain stopped at the damaged block
    assert stats["corrupt"] == 1  # deleted, then written again when recomputed:
    assert victim.read_bytes() != bytes(data)
    ((tokens, cached),), stats = session(tiny_qwen3_dir, cache, [p])
    assert (tokens, cached, stats["corrupt"]) == (cold, 288, 0)


def test_the_writer_never_blocks_a_step_and_skips_under_pressure(
        tmp_path: Path, tiny_qwen3_dir: Path) -> None:
    llm = make(tiny_qwen3_dir, tmp_path / "c")
    store = llm.engine.disk.store
    release = threading.Event()
    write = store._write
    store._queue.maxsize = 2  # a tiny queue ...
    store._write = lambda k, p: (release.wait(30), write(k, p))  # ... and a disk that hangs
    try:
        results = run(llm, [prompt(300, seed=s) for s in range(4)])
        assert all(len(tokens) == 6 for tokens, _ in results)  # every step ran meanwhile
        stats = llm.get_stats()["disk_cache"]
        assert stats["writes_skipped"] > 0 and stats["writes_pending"] <= 2
    finally:
        release.set()
        llm.close()


async def test_stats_of_an_idle_server_follow_the_writes_to_the_end(
        tmp_path: Path, tiny_qwen3_dir: Path) -> None:
    config = EngineConfig(model=str(tiny_qwen3_dir), device="cpu", block_size=16,
                          prefix_cache_dir=str(tmp_path / "c"), prefix_cache_disk_gb=0.5)
    async with AsyncLLM(config=config) as llm:
        store, release = llm.engine.disk.store, threading.Event()
        write = store._write
        store._write = lambda k, p: (release.wait(30), write(k, p))  # a slow disk
        await llm.generate(prompt(300), GREEDY)
        await asyncio.sleep(0.3)  # the engine is idle; its writes wait
        assert llm.get_stats()["disk_cache"]["writes"] == 0
        release.set()
        for _ in range(100):  # the snapshot moves on without another request
            if (disk := llm.get_stats()["disk_cache"])["writes"] == 19:
                break
            await asyncio.sleep(0.05)
        assert (disk["writes"], disk["writes_pending"], disk["blocks"]) == (19, 0, 19)


def test_settings_flags_environment_and_default_folder(monkeypatch, tmp_path: Path) -> None:
    assert resolve_location(None, None) == (None, 0)
    assert resolve_location(str(tmp_path), None) == (tmp_path, int(DEFAULT_DISK_GB * 1e9))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path, cap = resolve_location(None, 2.5)
    assert cap == 2_500_000_000 and path.is_relative_to(tmp_path / "xdg")
    monkeypatch.setenv("PREFIX_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("PREFIX_CACHE_DISK_GB", "3")
    config = EngineConfig.load()
    assert (config.prefix_cache_dir, config.prefix_cache_disk_gb) == (str(tmp_path / "env"), 3.0)
    assert EngineConfig.load(prefix_cache_disk_gb=1).prefix_cache_disk_gb == 1.0
    with pytest.raises(ValueError, match="prefix_cache_disk_gb"):
        EngineConfig.load(prefix_cache_disk_gb=0)


def test_a_request_aborted_while_its_blocks_are_read(tmp_path: Path, tiny_qwen3_dir: Path) -> None:
    cache, p = tmp_path / "c", prompt(300)
    (cold, _), = session(tiny_qwen3_dir, cache, [p])[0]
    llm = make(tiny_qwen3_dir, cache)
    try:
        engine = llm.engine
        request_id = engine.add_request(p, GREEDY)
        assert engine.disk.num_parked == 1  # waiting for the reader, not in the scheduler
        assert engine.abort_request(request_id)
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step()
        assert [(o.request_id, o.finish_reason) for o in outputs] == [(request_id, "abort")]
        assert engine.disk.num_parked == 0 and not engine.disk._loaded
        assert engine.block_manager.num_used_blocks == 0
        (tokens, cached), = run(llm, [p])  # the next one still loads and matches
        assert (tokens, cached) == (cold, 288)
    finally:
        llm.close()


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
def test_a_quantized_kv_cache_persists_every_part_exactly(tmp_path: Path, tiny_qwen3_dir: Path,
                                                         kv_cache_dtype: str) -> None:
    cache, p = tmp_path / "c", prompt(300)
    options = {"kv_cache_dtype": kv_cache_dtype}
    (cold, _), = session(tiny_qwen3_dir, None, [p], **options)[0]
    _, stats = session(tiny_qwen3_dir, cache, [p], **options)
    assert stats["writes"] == 19
    ((tokens, cached),), stats = session(tiny_qwen3_dir, cache, [p], **options)
    assert (tokens, cached) == (cold, 288) and stats["hits"] == 18 and stats["corrupt"] == 0
    # Files of the other quantization (or of the float pool) never match.
    for other in ({"kv_cache_dtype": "int4" if kv_cache_dtype == "int8" else "int8"}, {}):
        (_, cached), = session(tiny_qwen3_dir, cache, [p], **other)[0]
        assert cached == 0
