"""The disk tier as a user runs it: ``nano-qwen3 serve`` subprocesses on a tiny random
checkpoint, killed with SIGKILL while writing, restarted, two on one folder, a load on a cap."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nano_qwen3_mlx.bench.servers import free_port, healthy, serve_command
from nano_qwen3_mlx.blas import subprocess_env
from nano_qwen3_mlx.engine.disk_cache import HEADER, SUFFIX, _verify

BLOCK = 16
# The tiny checkpoint's block file: 2 layers x K,V x 2 heads x 16 tokens x 32 dims x 4 bytes.
BLOCK_BYTES = 2 * 2 * 2 * BLOCK * 32 * 4


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 100000) for _ in range(n)]


@contextmanager
def server(model: Path, cache: Path, gb: float = 0.05) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    cmd = serve_command(str(model), port, ["--device", "cpu", "--served-model-name", "m",
                                           "--prefix-cache-dir", str(cache),
                                           "--prefix-cache-disk-gb", str(gb)])
    # 16-token blocks (the block counts below; the CPU default is 64), through the environment.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**subprocess_env(), "BLOCK_SIZE": str(BLOCK)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not healthy(url):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
        proc.stderr.close()


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def complete(url: str, ids: list[int]) -> tuple[str, int]:
    """(greedy text, cached prompt tokens) for a token prompt."""
    out = post(url, {"model": "m", "prompt": ids, "max_tokens": 8, "temperature": 0,
                     "ignore_eos": True})
    return out["choices"][0]["text"], out["usage"]["prompt_tokens_details"]["cached_tokens"]


def stats(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/stats", timeout=30) as resp:
        return json.loads(resp.read())["disk_cache"]


def wait_written(url: str) -> None:
    """Until the writer is done: nothing pending, the folder's size steady (/stats is a
    snapshot up to 0.25 s old, refreshed while an idle server still writes)."""
    deadline, last = time.monotonic() + 60, None
    while (disk := stats(url))["writes_pending"] or disk["bytes"] != last:
        assert time.monotonic() < deadline, f"the disk writes never finished: {disk}"
        last = disk["bytes"]
        time.sleep(0.3)


def check_folder(cache: Path, cap_bytes: int) -> int:
    """Every block file is whole and verifies, the folder is within its cap (temporary
    files of a killed writer aside: the next start deletes them); returns the file count."""
    files = list(cache.glob(f"*{SUFFIX}"))
    assert sum(f.stat().st_size for f in files) <= cap_bytes
    for f in files:
        assert _verify(f.read_bytes(), bytes.fromhex(f.name[:-len(SUFFIX)]), BLOCK_BYTES) is not None
    return len(files)


def test_kill_9_while_writing_then_restart_gives_exact_cached_hits(
        tmp_path: Path, tiny_qwen3_dir: Path) -> None:
    cache = tmp_path / "cache"
    prompts = [prompt(400, seed) for seed in range(3)]
    with server(tiny_qwen3_dir, cache) as (url, proc):
        cold = [complete(url, p) for p in prompts]
        assert all(cached == 0 for _, cached in cold)
        wait_written(url)
        # More prompts, then SIGKILL at once: their blocks are being written.
        late = [prompt(1500, 100 + s) for s in range(3)]
        cold_late = [complete(url, p) for p in late]
        os.kill(proc.pid, 9)
        proc.wait(30)
    check_folder(cache, int(0.05e9))  # no partial file survived the kill
    with server(tiny_qwen3_dir, cache) as (url, _):
        assert stats(url)["writable"] and not list(cache.glob("*.tmp"))
        warm = [complete(url, p) for p in prompts]
        warm_late = [complete(url, p) for p in late]
        assert [t for t, _ in warm] == [t for t, _ in cold]  # exact: the same greedy tokens
        assert [c for _, c in warm] == [384] * 3  # 24 whole blocks; the last 16 tokens run
        assert [t for t, _ in warm_late] == [t for t, _ in cold_late]
        assert all(c % BLOCK == 0 for _, c in warm_late)  # what was written before the kill
        disk = stats(url)
        assert disk["hits"] >= 3 * 24 and disk["tokens_loaded"] >= 3 * 384 \
            and disk["corrupt"] == 0
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
        assert "nano_qwen3_prefix_cache_disk_tokens_loaded" in metrics


def test_the_cap_holds_under_load(tmp_path: Path, tiny_qwen3_dir: Path) -> None:
    cache, gb = tmp_path / "cache", 0.002  # room for about 120 blocks
    cap = int(gb * 1e9)
    with server(tiny_qwen3_dir, cache, gb) as (url, _):
        for seed in range(12):  # about 12 x 31 blocks written
            complete(url, prompt(500, seed))
            assert stats(url)["bytes"] <= cap
        wait_written(url)
        disk = stats(url)
        assert disk["evictions"] > 0 and disk["bytes"] <= cap
    assert 0 < check_folder(cache, cap) <= cap // (HEADER.size + BLOCK_BYTES)


def test_two_servers_on_one_folder_do_not_corrupt_it(tmp_path: Path, tiny_qwen3_dir: Path) -> None:
    cache, p = tmp_path / "cache", prompt(300, 7)
    with server(tiny_qwen3_dir, cache) as (first, _), server(tiny_qwen3_dir, cache) as (second, _):
        assert stats(first)["writable"] and not stats(second)["writable"]
        text, _ = complete(first, p)
        wait_written(first)
        # The second server reads what the first wrote; it writes nothing itself.
        assert complete(second, p) == (text, 288)
        for seed in range(4):
            assert complete(second, prompt(200, seed))[0] == complete(first, prompt(200, seed))[0]
        assert stats(second)["writes"] == 0
    check_folder(cache, int(0.05e9))
