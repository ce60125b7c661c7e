"""``LLMEngine``: add requests, ``step()`` them all together, abort, report stats."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from typing import Any

import mlx.core as mx

from ..blas import blas_info
from ..config import EngineConfig
from ..distributed.attach import attach, load_share, share_loaded
from ..distributed.world import World, get_world
from ..errors import InvalidRequestError
from ..models.contract import CausalLM
from ..models.loader import LoadedModel
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams, merge_defaults
from .block_manager import BlockManager
from .disk_keys import make_disk_tier
from .disk_tier import DiskTier
from .draft_model import DraftModel, DraftSpeculator
from .engine_pools import EnginePools
from .grammar import GRAMMAR_FAILED, GrammarCompiler
from .model_runner import ModelRunner, StepOutput
from .mtp import MTPDrafter, MTPSpeculator
from .output_processor import OutputProcessor
from .prefill_pacer import PrefillPacer, StepClock
from .sampler import Sampler
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence
from .speculative import Speculator
from .split_linear import release_threads
from .stats import EngineStats, memory_stats, percentiles

log = logging.getLogger(__name__)


class LLMEngine(EnginePools):
    """One model, one paged KV cache, many requests. Not thread-safe: one thread drives it."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None,
                 world: World | None = None) -> None:
        """``loaded``: a model loaded already (else ``config.model`` is loaded). ``world``:
        the job this engine belongs to (default: the one ``mlx.launch`` started, or a single
        process); under a distributed job each rank keeps its share of the model."""
        self.config = config
        if config.device == "cpu":
            mx.set_default_device(mx.cpu)
        # Under mlx.launch every rank keeps its share of the model (before the pools are
        # sized: each rank's KV heads or layers are its own): tensor parallel, or by layers
        # with --pipeline; distributed/. The parameter counts ({"total", "active"},
        # quantized weights counted unpacked) are the whole model's, taken before the split.
        self.world = (world or get_world()).with_mode(config.pipeline)
        mtp = self._mtp_allowed()
        if loaded is None:
            self.loaded, self.num_parameters = load_share(config, self.world, mtp=mtp)
        else:
            self.loaded, self.num_parameters = loaded, share_loaded(loaded, self.world)
        self.model: CausalLM = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        # speculative="draft": the draft model; "mtp": the checkpoint's MTP head (engine/mtp.py).
        # Either keeps a KV pool on the target's block ids and follows every step.
        self.drafter: DraftModel | MTPDrafter | None = None
        if self._draft_allowed():
            self.drafter = DraftModel.load(config, self.loaded)
        elif mtp:
            self.drafter = MTPDrafter(self.loaded, config.block_size, config.kv_cache_dtype)
        # A hybrid model's recurrent states (None: attention only, nothing changes).
        self.state_cache, self.states = self._make_states()
        self.cache = self._make_cache()
        self.block_manager = BlockManager(
            self.cache.num_blocks, config.block_size, config.enable_prefix_caching,
            on_reset=self.states.block_reset if self.states else None,
        )
        self.pacer = PrefillPacer(config.max_itl_ratio)
        max_num_seqs = self.states.max_num_seqs if self.states else config.max_num_seqs
        self.scheduler = Scheduler(self.block_manager, max_num_seqs,
                                   config.max_num_batched_tokens,
                                   self._grow_pool if self.pool.grows else None,
                                   self.pacer.prefill_limit, self.states)
        self.disk = self._make_disk()  # the prefix cache's disk tier; None when off
        self.sampling_defaults = merge_defaults(self.loaded.generation_config,
                                                config.sampling_defaults, config.max_tokens_default)
        self.sampler = Sampler(self.tokenizer.eos_token_ids, catch_up=self._catch_up)
        self.grammars = GrammarCompiler(self.tokenizer, self.model.vocab_size)
        self.runner = ModelRunner(self.model, self.cache, self.sampler, self.state_cache,
                                  keep_hidden=isinstance(self.drafter, MTPDrafter))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats = EngineStats()
        self.speculator = self._make_speculator()
        self._seqs: dict[str, Sequence] = {}
        self._early_outputs: list[RequestOutput] = []
        # The step queued on the device whose sampled tokens are not read yet (pipelining).
        self._in_flight: StepOutput | None = None
        self._caught_up: list[RequestOutput | None] | None = None  # _in_flight, read early
        self._clock = StepClock()
        self._seq_ids = itertools.count()
        # Rank 0 plans every step for the other ranks, which follow; None: one process.
        self.dist = attach(self, self.world)

    # ---- set-up -------------------------------------------------------------------------
    def _draft_allowed(self) -> bool:
        return self.config.speculative == "draft" and self._drafter_allowed()

    def _mtp_allowed(self) -> bool:
        return self.config.speculative == "mtp" and self._drafter_allowed()

    def _drafter_allowed(self) -> bool:
        if self.world.distributed:
            # Its KV pool and steps would run on rank 0 alone, outside the plans the other
            # ranks follow, next to a target split across them: not supported (yet).
            log.warning("speculative decoding with a draft model or MTP head is off under "
                        "mlx.launch (distributed); --speculative ngram works there")
            return False
        return True

    def _make_disk(self) -> DiskTier | None:
        if self.world.distributed and (self.config.prefix_cache_dir or
                                       self.config.prefix_cache_disk_gb):
            # Its loads write into the pool outside the step plans the followers see.
            log.warning("the prefix cache disk tier is off under mlx.launch (distributed)")
            return None
        return make_disk_tier(self)

    def _make_speculator(self) -> Speculator | None:
        if self.config.speculative is None:
            return None
        options = {"vocab_size": self.model.vocab_size, "states": self.states}
        if isinstance(self.drafter, MTPDrafter):
            return MTPSpeculator(self.config.num_speculative_tokens, self.drafter, **options)
        if self.drafter is not None:
            return DraftSpeculator(self.config.num_speculative_tokens, self.drafter, **options)
        if self.config.speculative in ("draft", "mtp"):  # off across ranks (_drafter_allowed)
            return None
        return Speculator(self.config.num_speculative_tokens, **options)

    # ---- requests -----------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None,
        request_id: str | None = None, priority: int = 0, pooling: bool = False,
    ) -> str:
        """Queue a request; returns its id. Raises ``ValueError`` for a prompt that cannot run
        or a grammar (``json_schema``, ``regex``, ...) that is invalid or unsupported.

        ``pooling=True`` makes it an embedding request: prefill only, and its one output
        carries the last prompt token's final-norm hidden state, L2-normalised.
        """
        params = (params or SamplingParams()).with_defaults(self.sampling_defaults)
        token_ids = self._prompt_ids(prompt)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use",
                                      field="request_id")
        grammar = self.grammars.new_state(params, token_ids)
        seq = Sequence(next(self._seq_ids), request_id, token_ids, params, priority=priority,
                       pooling=pooling)
        seq.grammar = grammar
        seq.output_state = self.output_processor.new_state(params)
        self._seqs[request_id] = seq
        if self.disk is None or not self.disk.park(seq):  # parked: its blocks are read first
            self.scheduler.add(seq)
        self.stats.num_prompt_tokens += len(token_ids)
        return request_id

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = [int(t) for t in prompt]
            vocab = self.model.vocab_size
            if any(t < 0 or t >= vocab for t in token_ids):
                raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})",
                                          field="prompt")
        if not token_ids:
            raise InvalidRequestError("prompt is empty", field="prompt")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens; the context length is {self.max_model_len} "
                "(prompt plus at least one new token must fit)", field="prompt",
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
        outputs = self._fail(list(self._seqs.values()), error)
        self._seqs.clear()
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._in_flight is not None \
            or bool(self._early_outputs) or (self.disk is not None and self.disk.num_parked > 0)

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule -> run (lazily, on the device) -> postprocess the previous step.

        If anything in the step raises, only the requests of this step and of the step in
        flight fail (``finish_reason='error'``, blocks freed); the engine keeps serving.
        """
        outputs, self._early_outputs = self._early_outputs, []
        self.pool.idle_since = None  # busy: the idle clock starts again when work ends
        batch = None
        try:
            if self.disk is not None:  # requests whose disk blocks are read join the queue
                idle = not self.scheduler.num_unfinished and self._in_flight is None
                for seq in self.disk.ready(idle):
                    self.scheduler.add(seq)
            if self._in_flight is not None and self._deliver_first():
                outputs += self._deliver_in_flight()
            else:
                batch = self.scheduler.schedule()
                outputs += self._run_batch(batch)
            if self.disk is not None:  # every KV write of this step is queued now
                self.disk.after_step(idle=not self.has_unfinished_requests())
        except Exception as exc:
            if self.dist is not None:  # the ranks' next collectives may no longer match
                self.dist.fatal(exc)
            log.exception("engine step failed; failing the requests of this step")
            outputs += self._fail_step(batch, f"engine error: {type(exc).__name__}: {exc}")
        self.stats.num_steps += 1
        if not self.has_unfinished_requests():  # the process's other BLAS users get it back
            release_threads()
        return [o for o in outputs if o is not None]

    def _run_batch(self, batch: ScheduledBatch | None) -> list[RequestOutput | None]:
        outputs = []
        speculate = batch is not None and self.speculator is not None and self.speculator.wants(batch)
        if batch and self._in_flight is not None and (speculate or self._read_first(batch)):
            outputs += self._postprocess(self._in_flight)
            self._in_flight, batch = None, batch.without_finished()
        if batch and speculate:  # every token is known now: the drafts continue them
            self.speculator.draft(batch, self.block_manager, self.max_model_len,
                                  self.config.max_num_batched_tokens)
        if batch:
            self.stats.num_computed_prompt_tokens += batch.num_prefill_tokens
        prev, start = self._in_flight, time.perf_counter()
        out = self.runner.run(batch, prev) if batch else None
        if batch and self.drafter is not None:  # the draft's KV follows every step
            self.drafter.follow(batch, prev, out)
        if self.states is not None:  # the step's rows' states (and snapshots) are queued
            self.states.commit(batch)
        queued = time.perf_counter()
        outputs += self._take_in_flight_outputs()
        self._time_step(prev, out, start, queued)
        if out is not None:
            for row, seq in enumerate(out.seqs):
                seq.pending_row = None if seq.is_finished else row
        self._in_flight = out
        if out is not None and out.drafts:  # verified now: the next step continues the result
            outputs += self._postprocess(out)
            self._in_flight = None
        return outputs

    def _catch_up(self) -> None:
        """Read the step in flight now (the sampler needs its tokens for grammar masks)."""
        if self._in_flight is not None and self._caught_up is None:
            self._caught_up = self._postprocess(self._in_flight)

    def _take_in_flight_outputs(self) -> list[RequestOutput | None]:
        caught, self._caught_up = self._caught_up, None
        return caught if caught is not None else self._postprocess(self._in_flight)

    def _fail_step(self, batch: ScheduledBatch | None, error: str) -> list[RequestOutput]:
        in_flight = [*self._in_flight.seqs, *self._in_flight.pooled_seqs] if self._in_flight \
            else []
        return self._fail((batch.seqs if batch else []) + in_flight, error)

    def _fail(self, seqs: list[Sequence], error: str) -> list[RequestOutput]:
        """End ``seqs`` with ``finish_reason='error'``; the step in flight is dropped.
        Outputs read before the failure (requests that finished then) still go out."""
        self._in_flight, outputs, self._caught_up = None, self._caught_up or [], None
        for seq in self._seqs.values():
            seq.pending_row = None  # the step that would have produced it is gone
            self._drop_drafts(seq)
        for seq in dict.fromkeys(seqs):
            if not seq.is_finished:
                self._finish(seq, "error")
                outputs.append(self._output(seq, "", [], None, error=error))
        # Blocks this step was filling may hold garbage: no later request may match them.
        self.block_manager.reset_prefix_cache()
        if self.states is not None:  # nor any snapshot this step was taking
            self.states.drop_snapshots()
        return outputs

    def _time_step(self, prev: StepOutput | None, out: StepOutput | None, start: float,
                   queued: float) -> None:
        """Tell the prefill pacer how long the step this engine step waited on took."""
        timed = self._clock.tick(prev, out, start, queued, time.perf_counter())
        if timed is not None:
            step, seconds = timed
            self.pacer.observe(step.num_decode_rows, step.num_chunk_tokens, seconds)

    def _read_first(self, batch: ScheduledBatch) -> bool:
        """Read the step in flight before queueing ``batch``: penalties need every earlier
        token, the one still being sampled included."""
        return self._in_flight is not None and any(s.params.uses_penalties for s in batch.seqs)

    def _deliver_first(self) -> bool:
        """Should this engine step only read the step in flight (and schedule next time)?

        On the CPU backend queueing a step computes most of it before the step in flight
        can be read, so pipelining delays every token by one step. Two cases skip that wait:
        nothing will decode next (prompts only: no step needs the tokens in flight, which
        should not wait behind prompt chunks), or the step in flight samples a request's
        first token (time to first token is what a client waits on). On Metal the cost is
        the short host gap before the next step is queued.
        """
        if not self.scheduler.has_decodes():
            return True
        return any(seq.first_token_time is None for seq in self._in_flight.seqs)

    def _deliver_in_flight(self) -> list[RequestOutput | None]:
        """Only read the step in flight; the next engine step schedules."""
        outputs, self._in_flight = self._take_in_flight_outputs(), None
        return outputs

    def _postprocess(self, prev: StepOutput | None) -> list[RequestOutput | None]:
        if prev is None:
            return []
        pooled, outputs = self._postprocess_pooled(prev), []
        sampled = prev.sampled
        ids = sampled.token_ids.tolist()
        lps = _tolist(sampled.logprobs), _tolist(sampled.top_ids), _tolist(sampled.top_logprobs)
        now, row = time.monotonic(), 0
        while row < len(prev.seqs):
            seq, drafts = prev.seqs[row], prev.drafts.get(row, [])
            rows, row = range(row, row + 1 + len(drafts)), row + 1 + len(drafts)
            if seq.is_finished:
                self._drop_drafts(seq)
                continue  # finished a step earlier: this token is the one extra, dropped
            seq.pending_row = None
            outputs.append(self._append_tokens(seq, rows, drafts, ids, lps, now))
            ready = min(seq.num_computed_tokens, len(seq.token_ids))
            self.block_manager.seal_full_blocks(seq, ready)
        self.stats.record_tokens(sum(len(o.token_ids) for o in outputs), now)
        return pooled + outputs

    def _append_tokens(self, seq: Sequence, rows: range, drafts: list[int], ids: list[int],
                       lps: tuple, now: float) -> RequestOutput:
        """The row's sampled token, or a speculating row's: each accepted draft, then the
        correction or bonus token (the first sampled token that is no draft), in one output."""
        self._record_timing(seq, now)
        if drafts and self.states is not None:  # before a finish snapshots the state
            accepted = next((j for j, (d, r) in enumerate(zip(drafts, rows)) if ids[r] != d),
                            len(drafts))
            self.states.keep_accepted(seq, accepted)
        text, tokens, logprobs, reason = "", [], None, None
        for j, r in enumerate(rows):
            token = ids[r]
            record = self.output_processor.logprobs(seq, r, token, *lps)
            if record is not None:
                logprobs = (logprobs or []) + record
            piece, reason = self._take_token(seq, token)
            text, tokens = text + piece, tokens + [token]
            if reason or j == len(drafts) or token != drafts[j]:
                break
        if drafts:
            self._verified(seq, drafts, tokens)
        error = GRAMMAR_FAILED + seq.grammar.failed if reason == "error" else None
        return self._output(seq, text, tokens, logprobs, error=error)

    def _verified(self, seq: Sequence, drafts: list[int], tokens: list[int]) -> None:
        """A speculating row was read: the accepted drafts' KV is the sequence's, the
        rejected ones' slots are past its length (blocks past its need are freed)."""
        accepted = sum(1 for d, t in zip(drafts, tokens) if d == t)
        if not seq.is_finished:
            seq.num_computed_tokens = len(seq.token_ids) - 1
            self.block_manager.trim(seq, len(seq.token_ids))
        seq.draft_ids, seq.draft_masks, seq.draft_accepting = [], None, []
        self.speculator.verified(seq, len(drafts), accepted, len(tokens))

    def _drop_drafts(self, seq: Sequence) -> None:
        """Forget a row's drafts that will not be verified (its sequence ended or failed)."""
        seq.draft_ids, seq.draft_masks, seq.draft_accepting = [], None, []
        if seq.draft_slots and self.states is not None:
            self.states.drop_draft_slots(seq)

    def _postprocess_pooled(self, prev: StepOutput) -> list[RequestOutput | None]:
        """Embedding requests end with their prompt: one output with the pooled vector."""
        if prev.pooled is None:
            return []
        outputs: list[RequestOutput | None] = []
        for seq, vector in zip(prev.pooled_seqs, prev.pooled.tolist()):
            if not seq.is_finished:  # else aborted while its last chunk ran
                self._finish(seq, "stop")
                outputs.append(self._output(seq, "", [], None, embedding=vector))
        return outputs

    def _take_token(self, seq: Sequence, token: int) -> tuple[str, str | None]:
        """Append one sampled token; (its new text, the finish reason or None)."""
        text, reason = self.output_processor.append(seq, token, self.max_model_len)
        if reason:
            # The token just sampled may never run (a step that reads its step in flight
            # first drops the rows of sequences that finished): keep no KV claim on it. A
            # hybrid sequence knows: its state (and KV) has every token of a queued step.
            # (After a speculating row that stopped at an accepted draft, the state has run
            # further than the tokens kept: at most these have KV.)
            kv = len(seq.token_ids) - 1 if seq.state_slot is None else \
                min(seq.state_tokens, len(seq.token_ids))
            self._finish(seq, reason, num_kv_tokens=kv)
        return text, reason

    def _record_timing(self, seq: Sequence, now: float) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.stats.ttft.append(now - seq.arrival_time)
        elif seq.last_token_time is not None:
            self.stats.itl.append(now - seq.last_token_time)
        seq.last_token_time = now

    def _finish(self, seq: Sequence, reason: str, num_kv_tokens: int | None = None) -> None:
        self.scheduler.finish(seq, reason, num_kv_tokens)
        self.stats.record_finish(reason, time.monotonic() - seq.arrival_time)

    def _output(self, seq: Sequence, text: str, token_ids: list[int], logprobs,
                error: str | None = None, embedding: list[float] | None = None) -> RequestOutput:
        if seq.is_finished:
            self._seqs.pop(seq.request_id, None)
        prompt_ids = seq.token_ids[:seq.num_prompt_tokens] if seq.is_finished else None
        return RequestOutput(
            seq.request_id, text, token_ids, seq.is_finished, seq.finish_reason,
            seq.num_prompt_tokens, len(seq.token_ids) - seq.num_prompt_tokens, logprobs, error,
            prompt_ids, getattr(seq.output_state, "stop_reason", None) if seq.is_finished else None,
            embedding, seq.num_cached_tokens or 0,
        )

    def close(self) -> None:
        """Finish the disk tier's queued writes and release its directory (if any); on rank 0
        of an mlx.launch job, stop the other ranks."""
        release_threads()
        if self.disk is not None:
            self.disk.close()
        if self.dist is not None:  # the other ranks exit
            self.dist.stop()

    # ---- stats --------------------------------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        s, bm = self.stats, self.block_manager
        kv = bm.stats() | {"dtype": self.cache.kv_dtype,  # --kv-cache-dtype (default: the model's)
                           "bytes": self.cache.nbytes, "cap_blocks": self.pool.cap_blocks,
                           "cap_bytes": self.kv_cap_bytes, "bytes_per_token": self.cache.bytes_per_token,
                           "used_bytes": bm.num_used_blocks * bm.block_size * self.cache.bytes_per_token}
        disk = {"disk_cache": self.disk.stats()} if self.disk is not None else {}
        return {
            "model": self.config.model,
            "parameters": self.num_parameters,
            "uptime_s": time.monotonic() - s.started,
            "requests": {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                         "finished": s.num_finished, "aborted": s.num_aborted, "errors": s.num_errors,
                         "preemptions": self.scheduler.num_preemptions},
            "tokens": {"prompt": s.num_prompt_tokens, "generated": s.num_generated_tokens,
                       "prefill_computed": s.num_computed_prompt_tokens},
            "throughput": {"decode_tokens_per_s": s.decode_tokens_per_s(), "steps": s.num_steps},
            "latency": {"ttft_s": percentiles(s.ttft), "itl_s": percentiles(s.itl), "e2e_s": percentiles(s.e2e)},
            "kv_cache": kv,
            **({"state_cache": self.states.stats() | {"bytes": self.state_cache.nbytes,
                                                      "cap_bytes": self.state_cap_bytes}}
               if self.states is not None else {}),
            "prefill_pacing": {"max_itl_ratio": self.pacer.max_itl_ratio,
                               "decode_step_s": {rows: self.pacer.decode_s(rows)
                                                 for rows in self.pacer.decode_times},
                               "prefill_token_s": self.pacer.token_s},
            **({"speculative": {"method": self.config.speculative,
                                "num_speculative_tokens": self.config.num_speculative_tokens,
                                **({"draft_model": self.config.draft_model} if self.config.draft_model else {})}
                | self.speculator.stats.as_dict()} if self.speculator is not None else {}),
            "memory": memory_stats() | {"weights_bytes": self.weights_nbytes},
            "blas": blas_info().as_dict(),
            "distributed": self.world.as_dict() | (self.dist.stats() if self.dist else {}),
        } | disk


def _tolist(array: mx.array | None) -> list | None:
    return None if array is None else array.tolist()
