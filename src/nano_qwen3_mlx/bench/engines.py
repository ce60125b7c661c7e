"""The two engines behind one small interface: load, warm up, run timed requests.

Each driver takes a list of ``Req`` (a request may arrive once the streams already running
have produced some tokens, for the mixed-arrival run) and returns the token timestamps.
This engine is driven through ``LLMEngine.step()``; mlx-lm through ``stream_generate`` for a
single stream and ``BatchGenerator`` otherwise. EOS is ignored by both, so both produce
exactly ``gen_len`` tokens per request. Greedy sampling.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .metrics import StreamTimes


@dataclass(slots=True)
class Req:
    name: str
    prompt: list[int]
    gen_len: int
    after_tokens: int = 0  # arrives once this many tokens were generated in the run


@dataclass(slots=True)
class Footprint:
    """Memory an engine held during a run, above what the process held before it loaded."""

    peak_bytes: int = 0
    kv_bytes_per_token: int = 0


class Engine:
    name = ""

    def run(self, reqs: list[Req]) -> StreamTimes:
        raise NotImplementedError

    def close(self) -> None:
        """Drop the model and everything it allocated."""
        gc.collect()
        mx.clear_cache()


def _due(pending: list[Req], emitted: int, idle: bool) -> list[Req]:
    """Requests whose arrival point is reached (the next one at once when nothing runs)."""
    due = [r for r in pending if r.after_tokens <= emitted]
    if not due and idle and pending:
        due = [min(pending, key=lambda r: r.after_tokens)]
    for r in due:
        pending.remove(r)
    return due


class Ours(Engine):
    name = "nano-qwen3-mlx"

    def __init__(self, path: Path, max_num_seqs: int, max_tokens: int, **options) -> None:
        from ..config import default_block_size
        from ..llm import LLM

        options.setdefault("block_size", default_block_size())
        blocks = -(-max_tokens // options["block_size"]) + 2 * max_num_seqs + 8
        self.llm = LLM(str(path), max_num_seqs=max_num_seqs, num_kv_blocks=blocks, **options)
        self.engine = self.llm.engine
        self.kv_bytes_per_token = self.engine.cache.bytes_per_token
        self.run([Req("warm-up", list(range(1000, 1016)), 4)])

    def _params(self, gen_len: int):
        from ..sampling_params import SamplingParams

        return SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)

    def run(self, reqs: list[Req]) -> StreamTimes:
        engine, st, pending, emitted = self.engine, StreamTimes(), list(reqs), 0
        start = time.perf_counter()
        while pending or engine.has_unfinished_requests():
            for r in _due(pending, emitted, not engine.has_unfinished_requests()):
                st.arrive(r.name, time.perf_counter() - start)
                engine.add_request(r.prompt, self._params(r.gen_len), request_id=r.name)
            for out in engine.step():
                st.record(out.request_id, time.perf_counter() - start, len(out.token_ids))
                emitted += len(out.token_ids)
        return st

    def prefill_computed(self) -> int:
        return self.engine.stats.num_computed_prompt_tokens

    def close(self) -> None:
        self.llm.close()
        del self.llm, self.engine
        super().close()


class MlxLm(Engine):
    name = "mlx-lm"

    def __init__(self, path: Path, max_num_seqs: int, prefill_step_size: int = 2048) -> None:
        try:
            from mlx_lm import load
        except ImportError as exc:
            raise SystemExit("mlx-lm is not installed: pip install -e '.[dev]'") from exc
        self.model, self.tokenizer = load(str(path))
        self.max_num_seqs, self.prefill_step_size = max_num_seqs, prefill_step_size
        self.kv_bytes_per_token = _mlx_lm_kv_bytes_per_token(self.model)
        self.run([Req("warm-up", list(range(1000, 1016)), 4)])
        self.run([Req("warm-up-a", list(range(1000, 1016)), 4), Req("warm-up-b", list(range(1000, 1016)), 4)])

    def run(self, reqs: list[Req]) -> StreamTimes:
        if len(reqs) == 1:
            return self._stream(reqs[0])
        return self._batch(reqs)

    def _stream(self, req: Req) -> StreamTimes:
        from mlx_lm import stream_generate

        st, start = StreamTimes(), time.perf_counter()
        st.arrive(req.name, 0.0)
        for _ in stream_generate(self.model, self.tokenizer, req.prompt, max_tokens=req.gen_len):
            st.record(req.name, time.perf_counter() - start)
        return st

    def _batch(self, reqs: list[Req]) -> StreamTimes:
        from mlx_lm.generate import BatchGenerator

        gen = BatchGenerator(self.model, completion_batch_size=self.max_num_seqs,
                             prefill_batch_size=min(8, self.max_num_seqs),
                             prefill_step_size=self.prefill_step_size)
        st, pending, names, emitted, live = StreamTimes(), list(reqs), {}, 0, 0
        start = time.perf_counter()
        while pending or live:
            for r in _due(pending, emitted, not live):
                (uid,) = gen.insert([r.prompt], [r.gen_len])
                names[uid], live = r.name, live + 1
                st.arrive(r.name, time.perf_counter() - start)
            for resp in gen.next_generated():
                st.record(names[resp.uid], time.perf_counter() - start)
                emitted += 1
                live -= resp.finish_reason is not None
        gen.close()
        return st

    def close(self) -> None:
        del self.model, self.tokenizer
        super().close()


def _mlx_lm_kv_bytes_per_token(model) -> int:
    """K and V bytes per token of an mlx-lm model's attention layers (a hybrid model's
    recurrent layers keep a fixed-size state instead)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import KVCache

    text = getattr(model, "language_model", model)  # Qwen3.5 nests the text model
    args = text.args
    num_attention = sum(isinstance(c, KVCache) for c in model.make_cache()) \
        if hasattr(model, "make_cache") else args.num_hidden_layers
    dtype = next(v.dtype for k, v in tree_flatten(text.parameters()) if k.endswith("norm.weight"))
    return 2 * num_attention * args.num_key_value_heads * args.head_dim * dtype.size


def measure(make, reqs: list[Req]) -> tuple[StreamTimes, Footprint]:
    """Load an engine, run ``reqs`` once, and read its memory footprint; then drop it."""
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    engine = make()
    try:
        st = engine.run(reqs)
        return st, Footprint(mx.get_peak_memory() - base, engine.kv_bytes_per_token)
    finally:
        engine.close()
