#!/usr/bin/env python3
"""Resident memory of `nano-qwen3 serve` beside `mlx_lm.server` on the demo model (SmolLM2-135M
Q4_1): ready, under load (N concurrent chat requests), and after the load (idle again).

mlx-lm cannot read GGUF, so the demo model is first exported as an MLX checkpoint (the same
quantized tensors, tokenizer.json and chat template) that both servers could load; ours serves
the GGUF itself.

    python scripts/memory_report.py [--concurrency 8] [--max-tokens 64] [--context-words 0]
                                    [--idle-wait 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import nano_qwen3_mlx  # noqa: F401  (first: it loads the optimised BLAS before MLX)

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten

from nano_qwen3_mlx.models.loader import load

BIN = Path(sys.executable).parent


def export_demo(folder: Path) -> Path:
    """The demo GGUF as an mlx-community style checkpoint."""
    loaded = load("smollm2-135m")
    weights = dict(tree_flatten(loaded.model.parameters()))
    w, s = weights["model.layers.0.self_attn.q_proj.weight"], weights["model.layers.0.self_attn.q_proj.scales"]
    group = w.shape[1] * 32 // 4 // s.shape[1]
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    config = {**loaded.config, "quantization": {"group_size": group, "bits": 4}}
    (folder / "config.json").write_text(json.dumps(config))
    tok = loaded.tokenizer
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tok.chat_template,
        "bos_token": tok.bos_token, "eos_token": tok.eos_token}))
    return folder


def rss_mb(pid: int) -> float:
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(out.stdout.strip() or 0) / 1024


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=2)
            return time.monotonic() - start
        except OSError:
            time.sleep(0.2)
    raise SystemExit("server not ready")


def chat(url: str, max_tokens: int, i: int, context_words: int) -> None:
    notes = " ".join(f"note{i}-{j}" for j in range(context_words))  # a long document
    body = {"max_tokens": max_tokens, "temperature": 0, "messages": [
        {"role": "user", "content": f"{notes}\nTell story number {i} about a dragon."}]}
    req = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=600).read()


def measure(name: str, cmd: list[str], url: str, args, env: dict) -> dict:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready_s = wait_ready(url, proc)
        time.sleep(2)
        idle = rss_mb(proc.pid)
        threads = [threading.Thread(target=chat, args=(url, args.max_tokens, i, args.context_words))
                   for i in range(args.concurrency)]
        for t in threads:
            t.start()
        peak = idle
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_mb(proc.pid))
            time.sleep(0.1)
        time.sleep(args.idle_wait)
        after = rss_mb(proc.pid)
        return {"server": name, "ready_s": round(ready_s, 1), "rss_ready_mb": round(idle),
                "rss_load_peak_mb": round(peak), "rss_after_mb": round(after)}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--context-words", type=int, default=0, help="words of padding per prompt")
    parser.add_argument("--idle-wait", type=float, default=40.0, help="seconds after the load")
    args = parser.parse_args()
    env = {**os.environ, "KV_SHRINK_IDLE_S": "30"}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_demo(Path(tmp))
        rows = [
            measure("nano-qwen3 serve", [str(BIN / "nano-qwen3"), "serve", "-m", "smollm2-135m",
                                         "--port", "8391"], "http://127.0.0.1:8391", args, env),
            measure("mlx_lm.server", [str(BIN / "mlx_lm.server"), "--model", str(model_dir),
                                      "--port", "8392"], "http://127.0.0.1:8392", args, env),
        ]
    print(f"concurrency {args.concurrency}, max_tokens {args.max_tokens}, context words "
          f"{args.context_words}, idle wait {args.idle_wait:g} s")
    print("| server | ready (s) | RSS ready (MB) | RSS peak under load (MB) | RSS after load (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['ready_s']} | {r['rss_ready_mb']} | {r['rss_load_peak_mb']} "
              f"| {r['rss_after_mb']} |")


if __name__ == "__main__":
    main()
