"""What a quantized KV cache costs in quality: perplexity and greedy agreement against the
unquantized cache, on real text (this repository's README by default).

usage: python scripts/kv_quality.py [MODEL=smollm2-135m] [TOKENS=512] [DTYPES=int8,int4]

- Perplexity, teacher-forced: the first ``PREFILL`` tokens run as one prefill chunk (its
  attention reads the dequantized copy of the sequence's blocks), every later token as a
  decode step (attention reads the quantized blocks in place: the CPU kernel of
  ``engine/cpu_attention.py`` on the CPU, ``gather_qmm`` elsewhere); the
  perplexity of the decode positions is printed on its own. Also the mean KL divergence
  of each position's next-token distribution from the unquantized cache's, and how often
  the two caches' top-1 tokens agree there (teacher-forced greedy agreement).
- Free-running greedy agreement: ``GEN`` tokens generated (batched, temperature 0) from
  four prompts cut from the text: the share of tokens generated before the first token
  that differs from the unquantized cache's, and the share equal position by position.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import nano_qwen3_mlx  # noqa: F401  (first: it loads the optimised BLAS before MLX)

# isort: split
import mlx.core as mx
import numpy as np

from nano_qwen3_mlx.engine.model_runner import packed_order
from nano_qwen3_mlx.engine.scheduler import ScheduledBatch
from nano_qwen3_mlx.engine.sequence import Sequence
from nano_qwen3_mlx.llm import LLM
from nano_qwen3_mlx.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
PREFILL, GEN, BLOCK = 64, 64, 16


def next_token_logprobs(llm: LLM, tokens: list[int]) -> np.ndarray:
    """(len(tokens) - 1, vocab) float32 log-probabilities of each next token, teacher-forced."""
    engine = llm.engine
    seq = Sequence(0, "quality", tokens, SamplingParams(temperature=0))
    seq.block_table = list(range(-(-len(tokens) // BLOCK)))
    rows, start = [], 0
    for n in [PREFILL] + [1] * (len(tokens) - PREFILL - 1):
        seq.num_computed_tokens = start
        batch = ScheduledBatch()
        batch.add(seq, n)
        ctx = engine.runner.attention_context(batch, packed_order(batch))
        ctx.sampled = None  # every row's output, not only the sampled ones
        ids = mx.array(tokens[start:start + n], mx.int32)[:, None]
        logits = engine.model.compute_logits(engine.model.hidden_states(ids, ctx)[:, 0])
        rows.append(np.array(logits.astype(mx.float32) - mx.logsumexp(logits, axis=-1, keepdims=True)))
        start += n
    return np.concatenate(rows)


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=GEN, ignore_eos=True)
    return [out["token_ids"] for out in llm.generate(prompts, params)]


def evaluate(model: str, kv_cache_dtype: str | None, tokens: list[int], prompts: list[list[int]]):
    blocks = -(-len(tokens) // BLOCK) + len(prompts) * -(-(max(map(len, prompts)) + GEN) // BLOCK) + 4
    with LLM(model, num_kv_blocks=blocks, block_size=BLOCK, max_num_seqs=len(prompts),
             kv_cache_dtype=kv_cache_dtype) as llm:
        name = llm.engine.cache.kv_dtype
        return name, llm.engine.cache.bytes_per_token, next_token_logprobs(llm, tokens), greedy(llm, prompts)


def perplexity(logprobs: np.ndarray, targets: np.ndarray) -> float:
    return math.exp(-float(logprobs[np.arange(len(targets)), targets].mean()))


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    num_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    dtypes = (sys.argv[3] if len(sys.argv) > 3 else "int8,int4").split(",")
    with LLM(model, num_kv_blocks=4) as llm:
        ids = llm.tokenizer.encode((ROOT / "README.md").read_text())
    tokens = ids[:num_tokens]
    prompts = [ids[k:k + 48] for k in (0, 400, 800, 1200)]
    targets = np.array(tokens[1:])
    ref_name, ref_bytes, ref_lp, ref_gen = evaluate(model, None, tokens, prompts)
    print(f"{model}: {len(tokens)} tokens of README.md ({PREFILL} as a prefill chunk, the rest "
          f"decoded one by one); greedy: 4 prompts x {GEN} tokens\n")
    print("| KV cache | bytes/token | ratio | perplexity | decode-only ppl | mean KL | top-1 agree "
          "| greedy before 1st diff | greedy same position |\n|---|" + "---:|" * 8)
    print(f"| {ref_name} (reference) | {ref_bytes} | 1.00x | {perplexity(ref_lp, targets):.3f} | "
          f"{perplexity(ref_lp[PREFILL:], targets[PREFILL:]):.3f} | 0 | 100% | 100% | 100% |")
    ref_p = np.exp(ref_lp)
    for kv_dtype in dtypes:
        name, nbytes, lp, gen = evaluate(model, kv_dtype, tokens, prompts)
        kl = float((ref_p * (ref_lp - lp)).sum(axis=-1).mean())
        top1 = float((ref_lp.argmax(-1) == lp.argmax(-1)).mean())
        first = sum(next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), len(r))
                    for r, g in zip(ref_gen, gen))
        same = sum(a == b for r, g in zip(ref_gen, gen) for a, b in zip(r, g))
        total = sum(map(len, ref_gen))
        print(f"| {name} | {nbytes} | {nbytes / ref_bytes:.2f}x | {perplexity(lp, targets):.3f} | "
              f"{perplexity(lp[PREFILL:], targets[PREFILL:]):.3f} | {kl:.4f} | {top1:.1%} | "
              f"{first / total:.0%} | {same / total:.0%} |")


if __name__ == "__main__":
    main()
