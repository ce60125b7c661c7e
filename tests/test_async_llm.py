"""AsyncLLM: the engine thread, streaming, cancellation, queue limit, submit/retrieve."""

from __future__ import annotations

import asyncio

import pytest

from nano_qwen3_mlx import LLM, AsyncLLM, QueueFullError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = ["Hello", "The weather today", "def main():", "One two three four"]


@pytest.fixture(scope="module")
def expected(tiny_qwen3_dir):
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=64) as llm:
        return [llm.generate_single(p, GREEDY)["token_ids"] for p in PROMPTS]


async def wait_idle(llm: AsyncLLM) -> dict:
    for _ in range(100):
        await asyncio.sleep(0.05)
        stats = llm.get_stats()
        if stats["requests"]["running"] == 0 and stats["requests"]["waiting"] == 0:
            return stats
    raise AssertionError("engine did not go idle")


async def test_concurrent_generate_matches_sync(tiny_qwen3_dir, expected):
    async with AsyncLLM(str(tiny_qwen3_dir), num_kv_blocks=64) as llm:
        results = await llm.generate_batch(PROMPTS, GREEDY)
        streamed = []
        async for chunk in llm.generate_stream(PROMPTS[0], GREEDY):
            streamed.extend(chunk["token_ids"])
    assert [r["token_ids"] for r in results] == expected
    assert streamed == expected[0]


async def test_cancelling_the_task_aborts_and_frees_blocks(tiny_qwen3_dir):
    async with AsyncLLM(str(tiny_qwen3_dir), num_kv_blocks=64) as llm:
        long = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
        task = asyncio.create_task(llm.generate("Tell me everything", long))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = await wait_idle(llm)
    assert stats["kv_cache"]["num_used_blocks"] == 0
    assert stats["requests"]["aborted"] == 1


async def test_full_queue_raises_at_once(tiny_qwen3_dir):
    async with AsyncLLM(str(tiny_qwen3_dir), num_kv_blocks=64, max_queue_size=2) as llm:
        long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        tasks = [asyncio.create_task(llm.generate("x", long)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError):
            await llm.generate("y", GREEDY)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await wait_idle(llm)


async def test_submit_retrieve_and_priority(tiny_qwen3_dir, expected):
    async with AsyncLLM(str(tiny_qwen3_dir), num_kv_blocks=64) as llm:
        ids = [await llm.submit(p, GREEDY, priority=i) for i, p in enumerate(PROMPTS)]
        results = [await llm.retrieve(i, timeout=60) for i in ids]
    assert [r["token_ids"] for r in results] == expected


async def test_bad_prompt_fails_only_that_request(tiny_qwen3_dir, expected):
    async with AsyncLLM(str(tiny_qwen3_dir), num_kv_blocks=64) as llm:
        good = asyncio.create_task(llm.generate(PROMPTS[0], GREEDY))
        with pytest.raises(ValueError, match="empty"):
            await llm.generate([], GREEDY)
        with pytest.raises(ValueError, match="context length"):
            await llm.generate(list(range(5000)), GREEDY)
        assert (await good)["token_ids"] == expected[0]


async def test_chat_splits_reasoning(tiny_qwen3_dir):
    async with AsyncLLM(str(tiny_qwen3_dir), num_kv_blocks=64) as llm:
        result = await llm.chat([{"role": "user", "content": "hi"}], GREEDY, enable_thinking=False)
    assert "reasoning_content" in result and isinstance(result["generated_text"], str)
