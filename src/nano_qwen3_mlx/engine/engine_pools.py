"""``EnginePools``: the memory half of ``LLMEngine``: its KV pool (and a hybrid model's state
pool) sized to the memory budget, grown when an allocation would fail, given back when idle.

A mixin, so the engine keeps its public names (``cache``, ``pool``, ``kv_cap_bytes``,
``shrink_if_idle``, ...); the policy itself (sizes, cap, growth step) is ``kv_pool.py``'s.
A drafter's pool (draft model, MTP head) is built, grown and rebuilt with the target's.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..models.contract import uniform_kv
from .kv_cache import KVLayout, PagedKVCache, block_bytes_for, pool_for
from .kv_pool import KVPoolPolicy, memory_budget, size_pool
from .speculative import MAX_SPEC_ROWS
from .state_cache import StateCache, build_state_pool
from .state_manager import StateManager
from .stats import mib

if TYPE_CHECKING:
    from ..config import EngineConfig
    from ..models.contract import CausalLM
    from .block_manager import BlockManager
    from .drafter import Drafter
    from .model_runner import ModelRunner

log = logging.getLogger(__name__)


class EnginePools:
    """Pool sizing, growth and idle shrink for ``LLMEngine`` (which sets these attributes)."""

    config: EngineConfig
    model: CausalLM
    tokenizer: Any
    drafter: Drafter | None
    pool: KVPoolPolicy
    cache: PagedKVCache
    block_manager: BlockManager
    runner: ModelRunner
    state_cache: StateCache | None
    states: StateManager | None
    dist: object | None

    @property
    def model_max_len(self) -> int:
        return self.config.max_model_len or self.model.max_position_embeddings

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + output) a request may reach (the pool may grow to it)."""
        pool_tokens = self.pool.cap_blocks * self.config.block_size
        return min(self.model_max_len, pool_tokens)

    @property
    def weights_nbytes(self) -> int:
        draft = self.drafter.weights_nbytes if self.drafter is not None else 0
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters())) + draft

    @property
    def kv_layout(self) -> KVLayout:
        """``--kv-cache-dtype`` (default: the model's dtype) for this model's head_dim."""
        return KVLayout.parse(self.config.kv_cache_dtype, self.model.dtype,
                              uniform_kv(self.model).head_dim)

    def _block_bytes(self) -> int:
        draft = self.drafter.block_bytes if self.drafter is not None else 0
        return block_bytes_for(self.model, self.config.block_size, self.kv_layout) + draft

    @property
    def kv_cap_bytes(self) -> int:
        """The most the KV pool may ever take (its scratch block included)."""
        return (self.pool.cap_blocks + 1) * self._block_bytes()

    @property
    def state_cap_bytes(self) -> int:
        """The most the state pool may take (0 for an attention-only model)."""
        return 0 if self.states is None else (self.states.cap_slots + 1) * self.states.bytes_per_slot

    def _make_states(self) -> tuple[StateCache | None, StateManager | None]:
        if not self.model.state_layers:
            return None, None
        budget = memory_budget(self.config, self._block_bytes(), self.weights_nbytes)
        cache, states = build_state_pool(self.model.state_layers, self.config, budget)
        if self.config.speculative is not None:  # each draft of a row keeps its state
            states.reserve_draft_slots(MAX_SPEC_ROWS * self.config.num_speculative_tokens)
        # A chat turn starts with <|im_start|>: snapshot before the generation prompt too.
        turn = self.tokenizer.backend.token_to_id("<|im_start|>") \
            if hasattr(self.tokenizer, "backend") else None
        states.turn_tokens = {turn} if turn is not None else set()
        return cache, states

    def _make_cache(self) -> PagedKVCache:
        self.pool = size_pool(self.config, self._block_bytes(), self.weights_nbytes,
                              self.model_max_len, self.state_cap_bytes)
        cache = self._new_cache(self.pool.initial_blocks)
        if self.drafter is not None:
            self.drafter.attach(cache.num_blocks)
        log.info("KV pool: %d blocks x %d tokens (%s); cap %d blocks (%s)", cache.num_blocks,
                 cache.block_size, mib(cache.nbytes), self.pool.cap_blocks, mib(self.kv_cap_bytes))
        return cache

    def _new_cache(self, num_blocks: int) -> PagedKVCache:
        return pool_for(self.model, num_blocks, self.config.block_size, self.kv_layout)

    def _grow_pool(self, shortfall: int) -> int:
        """Add blocks (at least ``shortfall``, usually double) up to the cap; 0 at the cap."""
        added = self.pool.growth(self.cache.num_blocks, shortfall)
        if added:
            t0 = time.monotonic()
            self.cache.grow(added)
            if self.drafter is not None:
                self.drafter.grow(added)
            self.block_manager.add_blocks(added)
            log.info("KV pool grew to %d blocks (%s) in %.2f s", self.cache.num_blocks,
                     mib(self.cache.nbytes), time.monotonic() - t0)
        return added

    def shrink_if_idle(self, now: float | None = None) -> bool:
        """Give a grown pool back once the engine has been idle long enough; True if shrunk."""
        now = time.monotonic() if now is None else now
        if self.dist is not None:  # the ranks' pools stay the same size (they only grow)
            return False
        if not self.pool.should_shrink(self.cache.num_blocks, self.has_unfinished_requests(), now):
            return False
        # Rebuilt rather than cut, so this works whatever the pool's layout; the prefix cache
        # (idle blocks only) goes with it.
        self.cache = self.runner.cache = None
        mx.clear_cache()
        self.cache = self.runner.cache = self._new_cache(self.pool.initial_blocks)
        if self.drafter is not None:
            self.drafter.attach(self.pool.initial_blocks)
        self.block_manager.reset_pool(self.pool.initial_blocks)
        if self.states is not None:  # its snapshots needed the KV just dropped
            self.state_cache = self.runner.states = None
            self.state_cache = self.runner.states = StateCache(self.model.state_layers,
                                                               self.states.initial_slots)
            self.states.reset(self.state_cache)
        log.info("KV pool shrank to %d blocks (%s) after %.0f s idle", self.cache.num_blocks,
                 mib(self.cache.nbytes), now - (self.pool.idle_since or now))
        return True

    def has_unfinished_requests(self) -> bool:
        """Is any request still queued, running or in flight? (``LLMEngine``'s.)"""
        raise NotImplementedError
