"""``nano-qwen3 bench``: this engine vs mlx-lm on the same checkpoint, prompts and machine.

mlx-lm is the peer (a dev dependency): ``stream_generate`` for one stream and
``BatchGenerator`` for batches. Both run in this process, one after the other, each after
a warm-up, with the same random prompts of ``prompt_len`` tokens and ``gen_len`` new tokens
(EOS ignored where the API allows it, so both produce the same number of tokens).
"""

from __future__ import annotations

import gc
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .engine.stats import StreamTimer

# Random-weight checkpoints with real shapes: speed does not depend on the weights' values.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32},
    "small": {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1536,
              "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64},
    "qwen3-0.6b": {"hidden_size": 1024, "num_hidden_layers": 28, "intermediate_size": 3072,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128},
}


@dataclass
class Result:
    engine: str
    single_decode_tok_s: float = 0.0
    single_ttft_s: float = 0.0
    batch_tok_s: dict[int, float] = field(default_factory=dict)
    batch_ttft_s: dict[int, float] = field(default_factory=dict)
    kv_bytes_per_token: int = 0
    peak_memory_gb: float = 0.0


def random_checkpoint(shape: str, dtype: str, folder: Path) -> Path:
    """A Qwen3 checkpoint with random weights and the real Qwen3 tokenizer files."""
    from mlx.utils import tree_flatten

    from .config import PROJECT_ROOT
    from .models.qwen3 import Model, ModelArgs

    config = {"model_type": "qwen3", "vocab_size": 151936, "rms_norm_eps": 1e-6,
              "rope_theta": 1e6, "max_position_embeddings": 40960, "tie_word_embeddings": True,
              "eos_token_id": 151645, "torch_dtype": dtype, **SHAPES[shape]}
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    weights = {k: (v * 0.5).astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_dir = PROJECT_ROOT / "weights" / "qwen3-tokenizer"
    if not tokenizer_dir.exists():
        raise SystemExit("run `just fetch` first (the benchmark uses the real Qwen3 tokenizer)")
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def make_prompts(n: int, length: int, vocab: int = 100000, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab) for _ in range(length)] for _ in range(n)]


# ---- this engine --------------------------------------------------------------------------
def bench_ours(path: Path, prompts: list[list[int]], gen_len: int, batch_sizes: list[int]) -> Result:
    from .llm import LLM
    from .sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    need = (len(prompts[0]) + gen_len) * max(batch_sizes + [1])
    llm = LLM(str(path), max_num_seqs=max(batch_sizes + [1]), num_kv_blocks=need // 16 + 64,
              max_num_batched_tokens=4096, enable_prefix_caching=False)
    res = Result("nano-qwen3-mlx", kv_bytes_per_token=llm.engine.cache.bytes_per_token)
    llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    mx.reset_peak_memory()
    res.single_ttft_s, res.single_decode_tok_s = time_stream(llm, prompts[0], params)
    for b in batch_sizes:
        res.batch_tok_s[b], res.batch_ttft_s[b] = _ours_batch(llm, prompts[:b], params)
    res.peak_memory_gb = mx.get_peak_memory() / 1e9
    llm.close()
    return res


def time_stream(llm, prompt, params) -> tuple[float, float]:
    """(TTFT seconds, decode tok/s) of one streamed ``LLM`` request."""
    timer = StreamTimer()
    for chunk in llm.generate_stream(prompt, params):
        timer.tick(len(chunk["token_ids"]))
    return timer.ttft_s, timer.decode_tok_s


def _ours_batch(llm, prompts, params) -> tuple[float, float]:
    engine, firsts, total = llm.engine, {}, 0
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished_requests():
        for out in engine.step():
            firsts.setdefault(out.request_id, time.perf_counter())
            total += len(out.token_ids)
    elapsed = time.perf_counter() - start
    return total / elapsed, sum(firsts[i] - start for i in ids) / len(ids)


# ---- mlx-lm -------------------------------------------------------------------------------
def bench_mlx_lm(path: Path, prompts: list[list[int]], gen_len: int, batch_sizes: list[int]) -> Result:
    try:
        from mlx_lm import load, stream_generate
        from mlx_lm.generate import BatchGenerator
    except ImportError as exc:
        raise SystemExit("mlx-lm is not installed: pip install -e '.[dev]'") from exc
    model, tokenizer = load(str(path))
    args = model.args
    res = Result("mlx-lm")
    res.kv_bytes_per_token = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim \
        * model.model.norm.weight.dtype.size
    for _ in stream_generate(model, tokenizer, prompts[0], max_tokens=4):
        pass  # warm-up
    mx.reset_peak_memory()
    timer = StreamTimer()
    for _ in stream_generate(model, tokenizer, prompts[0], max_tokens=gen_len):
        timer.tick()
    res.single_ttft_s, res.single_decode_tok_s = timer.ttft_s, timer.decode_tok_s
    for b in batch_sizes:
        res.batch_tok_s[b], res.batch_ttft_s[b] = _mlx_lm_batch(BatchGenerator, model, prompts[:b], gen_len)
    res.peak_memory_gb = mx.get_peak_memory() / 1e9
    return res


def _mlx_lm_batch(batch_generator, model, prompts, gen_len) -> tuple[float, float]:
    gen = batch_generator(model, max_tokens=gen_len, completion_batch_size=len(prompts),
                          prefill_batch_size=min(8, len(prompts)))
    start = time.perf_counter()
    uids = gen.insert(prompts, [gen_len] * len(prompts))
    firsts, done, total = {}, set(), 0
    while len(done) < len(uids):
        for r in gen.next_generated():
            firsts.setdefault(r.uid, time.perf_counter())
            total += 1
            if r.finish_reason is not None:
                done.add(r.uid)
    elapsed = time.perf_counter() - start
    gen.close()
    return total / elapsed, sum(firsts[u] - start for u in uids) / len(uids)


# ---- report -------------------------------------------------------------------------------
def run(model: str | None, shape: str, dtype: str, prompt_len: int, gen_len: int,
        batch_sizes: list[int], out: Path | None) -> dict[str, Any]:
    """Run both engines and return (and optionally write) the JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(model) if model else random_checkpoint(shape, dtype, Path(tmp))
        prompts = make_prompts(max(batch_sizes + [1]), prompt_len)
        peer = bench_mlx_lm(path, prompts, gen_len, batch_sizes)
        gc.collect()
        mx.clear_cache()
        ours = bench_ours(path, prompts, gen_len, batch_sizes)
    report = {"model": model or f"random {shape} ({dtype})", "prompt_len": prompt_len,
              "gen_len": gen_len, "device": str(mx.default_device()),
              "ours": asdict(ours), "mlx_lm": asdict(peer), "ratios": ratios(ours, peer)}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def ratios(ours: Result, peer: Result) -> dict[str, float]:
    r = {"single_decode": ours.single_decode_tok_s / peer.single_decode_tok_s,
         "single_ttft": ours.single_ttft_s / peer.single_ttft_s,
         "kv_bytes_per_token": ours.kv_bytes_per_token / peer.kv_bytes_per_token}
    for b in ours.batch_tok_s:
        r[f"batch{b}_throughput"] = ours.batch_tok_s[b] / peer.batch_tok_s[b]
        r[f"batch{b}_ttft"] = ours.batch_ttft_s[b] / peer.batch_ttft_s[b]
    return r


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    ours, peer, ratio = report["ours"], report["mlx_lm"], report["ratios"]
    table = Table(title=f"{report['model']}, prompt {report['prompt_len']} + {report['gen_len']} "
                        f"new tokens, {report['device']}")
    for col in ("metric", "nano-qwen3-mlx", "mlx-lm", "ratio (ours / mlx-lm)"):
        table.add_column(col, justify="right")
    table.add_row("single-stream decode tok/s", f"{ours['single_decode_tok_s']:.1f}",
                  f"{peer['single_decode_tok_s']:.1f}", f"{ratio['single_decode']:.2f}x")
    table.add_row("single-stream TTFT s", f"{ours['single_ttft_s']:.3f}",
                  f"{peer['single_ttft_s']:.3f}", f"{ratio['single_ttft']:.2f}x (lower is better)")
    for b in ours["batch_tok_s"]:
        table.add_row(f"{b} requests: aggregate tok/s", f"{ours['batch_tok_s'][b]:.1f}",
                      f"{peer['batch_tok_s'][b]:.1f}", f"{ratio[f'batch{b}_throughput']:.2f}x")
        table.add_row(f"{b} requests: mean TTFT s", f"{ours['batch_ttft_s'][b]:.2f}",
                      f"{peer['batch_ttft_s'][b]:.2f}", f"{ratio[f'batch{b}_ttft']:.2f}x (lower is better)")
    table.add_row("KV bytes per token", str(ours["kv_bytes_per_token"]),
                  str(peer["kv_bytes_per_token"]), f"{ratio['kv_bytes_per_token']:.2f}x")
    table.add_row("peak memory GB", f"{ours['peak_memory_gb']:.2f}", f"{peer['peak_memory_gb']:.2f}", "")
    Console().print(table)
