"""``LLMEngine``: add requests, ``step()`` them all together, abort, report stats."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import EngineConfig
from ..models.loader import LoadedModel, load
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .kv_cache import PagedKVCache
from .model_runner import ModelRunner, StepOutput
from .output_processor import OutputProcessor
from .sampler import Sampler
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence
from .stats import EngineStats, memory_stats, percentiles, total_memory_bytes

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestOutput:
    """The news about one request after a step: the new text/tokens, and whether it ended."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_completion_tokens: int
    logprobs: list[dict[str, Any]] | None = None
    error: str | None = None
    prompt_token_ids: list[int] | None = None  # on the final output only

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": self.num_completion_tokens,
            "total_tokens": self.num_prompt_tokens + self.num_completion_tokens,
        }


class LLMEngine:
    """One model, one paged KV cache, many requests. Not thread-safe: one thread drives it."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        if config.device == "cpu":
            mx.set_default_device(mx.cpu)
        t0 = time.monotonic()
        self.loaded = loaded or load(config.model, dtype=config.dtype, quantize=config.quantize)
        self.load_time_s = time.monotonic() - t0
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.cache = self._make_cache()
        self.block_manager = BlockManager(
            self.cache.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler(self.tokenizer.eos_token_ids)
        self.runner = ModelRunner(self.model, self.cache, self.sampler)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats = EngineStats()
        self._seqs: dict[str, Sequence] = {}
        self._early_outputs: list[RequestOutput] = []
        self._prev: StepOutput | None = None
        self._seq_ids = itertools.count()

    # ---- set-up -------------------------------------------------------------------------
    @property
    def model_max_len(self) -> int:
        args = self.model.args
        return self.config.max_model_len or args.max_position_embeddings

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + output) a request may reach."""
        pool_tokens = self.cache.num_blocks * self.cache.block_size
        return min(self.model_max_len, pool_tokens)

    def _make_cache(self) -> PagedKVCache:
        args, cfg = self.model.args, self.config
        dtype = self.model.model.norm.weight.dtype
        probe = PagedKVCache(args.num_hidden_layers, 0, cfg.block_size, args.num_key_value_heads,
                             args.head_dim, dtype)
        num_blocks = self._num_kv_blocks(probe.bytes_per_token * cfg.block_size)
        cache = PagedKVCache(args.num_hidden_layers, num_blocks, cfg.block_size,
                             args.num_key_value_heads, args.head_dim, dtype)
        log.info("KV cache: %d blocks x %d tokens, %.1f MB (%d bytes/token)", num_blocks,
                 cfg.block_size, cache.nbytes / 1e6, cache.bytes_per_token)
        return cache

    def _num_kv_blocks(self, block_bytes: int) -> int:
        cfg = self.config
        if cfg.num_kv_blocks:
            return cfg.num_kv_blocks
        if cfg.kv_cache_gb:
            return max(2, int(cfg.kv_cache_gb * 1e9 // block_bytes))
        # Default: a fraction of the memory left after the weights, but no more than
        # max_num_seqs full-length sequences could ever use.
        left = max(total_memory_bytes() - self.weights_nbytes, 0)
        budget_blocks = int(cfg.kv_cache_fraction * left // block_bytes)
        seq_blocks = -(-self.model_max_len // cfg.block_size)
        return max(2, min(budget_blocks, cfg.max_num_seqs * seq_blocks))

    @property
    def weights_nbytes(self) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))

    # ---- requests -----------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None,
        request_id: str | None = None, priority: int = 0,
    ) -> str:
        """Queue a request; returns its id. Raises ``ValueError`` for a prompt that cannot run."""
        params = params or SamplingParams()
        token_ids = self._prompt_ids(prompt)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(next(self._seq_ids), request_id, token_ids, params, priority=priority)
        seq.state = self.output_processor.new_state(params)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        self.stats.num_prompt_tokens += len(token_ids)
        return request_id

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = [int(t) for t in prompt]
            vocab = self.model.args.vocab_size
            if any(t < 0 or t >= vocab for t in token_ids):
                raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if not token_ids:
            raise ValueError("prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; the context length is {self.max_model_len} "
                "(prompt plus at least one new token must fit)"
            )
        return token_ids

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; returns False if it is unknown or done."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.is_finished:
            return False
        self._finish(seq, "abort")
        self._early_outputs.append(self._output(seq, "", [], None))
        return True

    def abort_all(self) -> None:
        """Abort every unfinished request (their final outputs come with the next step)."""
        for request_id in list(self._seqs):
            self.abort_request(request_id)

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every request with ``finish_reason='error'`` (used after a step raised)."""
        self._prev = None
        outputs = []
        for seq in list(self._seqs.values()):
            if not seq.is_finished:
                self._finish(seq, "error")
                outputs.append(self._output(seq, "", [], None, error=error))
        self._seqs.clear()
        self.block_manager.reset_prefix_cache()
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._prev is not None or bool(self._early_outputs)

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule -> run (lazily, on the device) -> postprocess the previous step.

        If anything in the step raises, only the requests of this step and of the step in
        flight fail (``finish_reason='error'``, blocks freed); the engine keeps serving.
        """
        outputs, self._early_outputs = self._early_outputs, []
        batch = None
        try:
            batch = self.scheduler.schedule()
            outputs += self._run_batch(batch)
        except Exception as exc:
            log.exception("engine step failed; failing the requests of this step")
            outputs += self._fail_step(batch, f"engine error: {type(exc).__name__}: {exc}")
        self.stats.num_steps += 1
        return [o for o in outputs if o is not None]

    def _run_batch(self, batch: ScheduledBatch | None) -> list[RequestOutput | None]:
        outputs = []
        if batch and self._needs_sync(batch):
            outputs += self._postprocess(self._prev)
            self._prev, batch = None, batch.without_finished()
        if batch:
            self.stats.num_computed_prompt_tokens += batch.num_prefill_tokens
        out = self.runner.run(batch, self._prev) if batch else None
        outputs += self._postprocess(self._prev)
        if out is not None:
            for row, seq in enumerate(out.seqs):
                seq.pending_row = None if seq.is_finished else row
        self._prev = out
        return outputs

    def _fail_step(self, batch: ScheduledBatch | None, error: str) -> list[RequestOutput]:
        seqs = (batch.seqs if batch else []) + (self._prev.seqs if self._prev else [])
        self._prev, outputs = None, []
        for seq in self._seqs.values():
            seq.pending_row = None  # the step that would have produced it is gone
        for seq in dict.fromkeys(seqs):
            if not seq.is_finished:
                self._finish(seq, "error")
                outputs.append(self._output(seq, "", [], None, error=error))
        # Blocks this step was filling may hold garbage: no later request may match them.
        self.block_manager.reset_prefix_cache()
        return outputs

    @staticmethod
    def _needs_sync(batch: ScheduledBatch) -> bool:
        # Penalties need every earlier token, including the one still being sampled.
        return any(s.params.uses_penalties for s in batch.seqs)

    def _postprocess(self, prev: StepOutput | None) -> list[RequestOutput | None]:
        if prev is None:
            return []
        sampled = prev.sampled
        ids = sampled.token_ids.tolist()
        lps = _tolist(sampled.logprobs), _tolist(sampled.top_ids), _tolist(sampled.top_logprobs)
        now, outputs = time.monotonic(), []
        for row, seq in enumerate(prev.seqs):
            if seq.is_finished:
                continue  # finished a step earlier: this token is the one extra, dropped
            seq.pending_row = None
            logprobs = self.output_processor.logprobs(seq, row, ids[row], *lps)
            outputs.append(self._append_token(seq, ids[row], logprobs, now))
            ready = min(seq.num_computed_tokens, len(seq.token_ids))
            self.block_manager.seal_full_blocks(seq, ready)
        self.stats.record_tokens(len(outputs), now)
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprobs, now: float) -> RequestOutput:
        self._record_timing(seq, now)
        text, reason = self.output_processor.append(seq, token, self.max_model_len)
        if reason:
            self._finish(seq, reason)
        return self._output(seq, text, [token], logprobs)

    def _record_timing(self, seq: Sequence, now: float) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.stats.ttft.append(now - seq.arrival_time)
        elif seq.last_token_time is not None:
            self.stats.itl.append(now - seq.last_token_time)
        seq.last_token_time = now

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.stats.record_finish(reason, time.monotonic() - seq.arrival_time)

    def _output(self, seq: Sequence, text: str, token_ids: list[int], logprobs,
                error: str | None = None) -> RequestOutput:
        if seq.is_finished:
            self._seqs.pop(seq.request_id, None)
        prompt_ids = seq.token_ids[:seq.num_prompt_tokens] if seq.is_finished else None
        return RequestOutput(
            seq.request_id, text, token_ids, seq.is_finished, seq.finish_reason,
            seq.num_prompt_tokens, len(seq.token_ids) - seq.num_prompt_tokens, logprobs, error,
            prompt_ids,
        )

    # ---- stats --------------------------------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        s, bm = self.stats, self.block_manager
        kv = bm.stats() | {"bytes": self.cache.nbytes, "bytes_per_token": self.cache.bytes_per_token,
                           "used_bytes": bm.num_used_blocks * bm.block_size * self.cache.bytes_per_token}
        return {
            "model": self.config.model,
            "uptime_s": time.monotonic() - s.started,
            "requests": {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                         "finished": s.num_finished, "aborted": s.num_aborted, "errors": s.num_errors,
                         "preemptions": self.scheduler.num_preemptions},
            "tokens": {"prompt": s.num_prompt_tokens, "generated": s.num_generated_tokens,
                       "prefill_computed": s.num_computed_prompt_tokens},
            "throughput": {"decode_tokens_per_s": s.decode_tokens_per_s(), "steps": s.num_steps},
            "latency": {"ttft_s": percentiles(s.ttft), "itl_s": percentiles(s.itl), "e2e_s": percentiles(s.e2e)},
            "kv_cache": kv,
            "memory": memory_stats(),
        }


def _tolist(array: mx.array | None) -> list | None:
    return None if array is None else array.tolist()
