"""``ModelPool``: several models behind one server, loaded on demand, unloaded when idle.

Every model has its own engine (``AsyncLLM``: KV pool, prefix cache, scheduler); all of them
run on one shared ``EngineThread``, the only thread that calls MLX, which interleaves their
steps. A model is loaded for the first request that names it (concurrent first requests share
one load): a worker thread finds it (downloading it if need be) and reads its weight files once
so the OS caches them, then the engine is built on the MLX thread, where the other models'
steps wait only while the weights are copied from memory and the KV pool is made. ``--model-ttl`` unloads a model idle that long; ``--max-memory-gb`` is the
budget of all models together: a load first unloads the least recently used idle, unpinned
models, and a model that still does not fit is refused with a 503 naming the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import EngineConfig
from ...engine_thread import EngineThread
from ...errors import EngineDeadError, ModelMemoryError, ModelNotFoundError, first_line
from ..state import AsyncLLMLike

log = logging.getLogger("nano_qwen3_mlx.server")


@dataclass(slots=True)
class ModelSpec:
    """One configured model: the id clients name, its engine settings, how it may unload."""

    id: str
    config: EngineConfig
    ttl_s: float = 0.0  # idle seconds before it is unloaded; 0 = never
    pinned: bool = False  # loaded at start, never unloaded by the TTL or the budget


@dataclass(slots=True)
class Loaded:
    engine: AsyncLLMLike
    last_used: float


EngineFactory = Callable[[ModelSpec, EngineThread], AsyncLLMLike]


def _async_llm(spec: ModelSpec, thread: EngineThread) -> AsyncLLMLike:
    from ...async_llm import AsyncLLM  # heavy (MLX): only when a model loads

    return AsyncLLM(config=spec.config, thread=thread)


def engine_memory(engine: AsyncLLMLike) -> int:
    """Bytes a loaded model holds now: weights, KV pool and recurrent-state pool."""
    stats = engine.get_stats()
    return int(stats.get("memory", {}).get("weights_bytes", 0)
               + stats.get("kv_cache", {}).get("bytes", 0)
               + stats.get("state_cache", {}).get("bytes", 0))


def estimate_bytes(config: EngineConfig) -> int:
    """The weights' size on disk (scaled for ``quantize``): a model's need before it loads;
    0 when the files are not here yet (a hub id still to download)."""
    from ...models.loader import resolve_model

    try:
        path = resolve_model(config.model, download=False)
    except Exception:  # not downloaded, or not found: the load itself reports it
        return 0
    files = [path] if path.is_file() else list(Path(path).glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    return size * config.quantize // 16 if config.quantize and path.is_dir() else size


def prefetch_weights(config: EngineConfig) -> None:
    """Off the MLX thread: find (download if need be) the model and read its weight files
    once, so the OS caches them and the engine build on the MLX thread reads from memory."""
    from ...models.loader import resolve_model

    path = resolve_model(config.model)
    files = [path] if path.is_file() else sorted(Path(path).glob("*.safetensors"))
    for file in files:
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass


class ModelPool:
    """The configured models and the loaded ones; see the module doc."""

    def __init__(self, specs: list[ModelSpec], *, budget_gb: float | None = None,
                 factory: EngineFactory | None = None) -> None:
        self.specs: dict[str, ModelSpec] = {s.id: s for s in specs}
        self.budget_bytes = int(budget_gb * 1e9) if budget_gb else None
        self.loaded: dict[str, Loaded] = {}
        self.load_counts: Counter[str] = Counter()  # loads started per model (tests, /stats)
        self._factory = factory or _async_llm
        self._thread = EngineThread()
        self._loading: dict[str, asyncio.Task] = {}
        self._lock = asyncio.Lock()  # one load (and its eviction decisions) at a time
        self._reaper: asyncio.Task | None = None
        self.started = False  # the pinned models are loaded
        self.prefetch = factory is None  # read the weights on a worker thread first

    @property
    def default_id(self) -> str:
        return next(iter(self.specs))

    @property
    def is_alive(self) -> bool:
        return self._thread.error is None

    def spec(self, name: str | None) -> ModelSpec:
        """The model a request names (None: the first); 404 listing the served ids."""
        spec = self.specs.get(self.default_id if name is None else name)
        if spec is None:
            raise ModelNotFoundError(str(name), list(self.specs))
        return spec

    # ---- lifetime -----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine thread, load the pinned models, start the TTL reaper."""
        self._thread.start()
        for spec in self.specs.values():
            if spec.pinned:
                await self.load(spec.id)
        self.started = True
        self._reaper = asyncio.create_task(self._reap_forever())

    async def close(self) -> None:
        """Unload everything and stop the engine thread."""
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for task in list(self._loading.values()):
            await asyncio.gather(task, return_exceptions=True)
        for model_id in list(self.loaded):
            await self.unload(model_id)
        self._thread.stop()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # ---- loading ------------------------------------------------------------------------
    async def engine(self, name: str | None) -> tuple[str, AsyncLLMLike]:
        """The engine of the model ``name`` (loaded first if need be) and its id."""
        spec = self.spec(name)
        entry = self.loaded.get(spec.id)
        engine = entry.engine if entry is not None else await self.load(spec.id)
        self.touch(spec.id)
        return spec.id, engine

    def touch(self, model_id: str) -> None:
        if (entry := self.loaded.get(model_id)) is not None:
            entry.last_used = time.monotonic()

    async def load(self, model_id: str) -> AsyncLLMLike:
        """Load a model once, however many requests wait for it."""
        spec = self.spec(model_id)
        if (entry := self.loaded.get(spec.id)) is not None:
            return entry.engine
        task = self._loading.get(spec.id)
        if task is None:
            task = asyncio.create_task(self._load(spec))
            self._loading[spec.id] = task
            task.add_done_callback(lambda _: self._loading.pop(spec.id, None))
        return await asyncio.shield(task)

    async def _load(self, spec: ModelSpec) -> AsyncLLMLike:
        async with self._lock:
            await self._make_room(spec, estimate_bytes(spec.config))
            self.load_counts[spec.id] += 1
            engine = self._factory(spec, self._thread)
            started = time.monotonic()
            try:
                if self.prefetch:
                    await asyncio.to_thread(prefetch_weights, spec.config)
                await engine.start()
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await engine.close()
                log.error("model %s failed to load: %s", spec.id, first_line(exc))
                raise EngineDeadError(f"the model {spec.id} failed to load: "
                                      f"{type(exc).__name__}") from exc
            self.loaded[spec.id] = Loaded(engine, time.monotonic())
        log.info("loaded %s in %.1f s (%.2f GB)", spec.id, time.monotonic() - started,
                 engine_memory(engine) / 1e9)
        return engine

    async def unload(self, model_id: str) -> bool:
        """Unload a model (its running requests are aborted); False if it was not loaded."""
        entry = self.loaded.pop(self.spec(model_id).id, None)
        if entry is None:
            return False
        await entry.engine.close()
        log.info("unloaded %s", model_id)
        return True

    # ---- memory and idle time -----------------------------------------------------------
    def memory_used(self) -> int:
        return sum(engine_memory(e.engine) for e in self.loaded.values())

    def _idle(self, model_id: str) -> bool:
        return getattr(self.loaded[model_id].engine, "num_requests", 0) == 0

    async def _make_room(self, spec: ModelSpec, need: int) -> None:
        """Unload least recently used idle, unpinned models until ``need`` fits the budget."""
        if self.budget_bytes is None:
            return
        if need > self.budget_bytes:  # unloading the others would not help: keep them
            raise ModelMemoryError(f"the model {spec.id} needs about {need / 1e9:.2f} GB, more "
                                   f"than the memory budget (--max-memory-gb "
                                   f"{self.budget_bytes / 1e9:g}) holds")
        while self.memory_used() + need > self.budget_bytes:
            victims = sorted((e.last_used, mid) for mid, e in self.loaded.items()
                             if not self.specs[mid].pinned and self._idle(mid))
            if not victims:
                used = self.memory_used()
                raise ModelMemoryError(
                    f"the model {spec.id} needs about {need / 1e9:.2f} GB but the memory budget "
                    f"(--max-memory-gb {self.budget_bytes / 1e9:g}) has "
                    f"{max(self.budget_bytes - used, 0) / 1e9:.2f} GB free, and the models "
                    f"holding it are pinned or busy ({', '.join(self.loaded) or 'none'})")
            log.info("unloading %s to make room for %s", victims[0][1], spec.id)
            await self.unload(victims[0][1])

    async def _reap_forever(self) -> None:
        ttls = [s.ttl_s for s in self.specs.values() if s.ttl_s > 0 and not s.pinned]
        if not ttls:
            return
        period = min(1.0, max(0.05, min(ttls) / 4))
        while True:
            await asyncio.sleep(period)
            await self.reap()

    async def reap(self) -> list[str]:
        """Unload the models idle longer than their TTL; returns their ids."""
        now, gone = time.monotonic(), []
        for model_id, entry in list(self.loaded.items()):
            spec = self.specs[model_id]
            if not self._idle(model_id):
                entry.last_used = now  # idle time counts from the last request's end
            elif spec.ttl_s > 0 and not spec.pinned and now - entry.last_used > spec.ttl_s \
                    and model_id not in self._loading:
                await self.unload(model_id)
                gone.append(model_id)
        return gone

    def describe(self, model_id: str) -> dict[str, Any]:
        """``/v1/models`` fields of one model: loaded, memory, ttl, pinned."""
        spec, entry = self.specs[model_id], self.loaded.get(model_id)
        stats = entry.engine.get_stats() if entry is not None else {}
        return {"loaded": entry is not None,
                "memory_bytes": engine_memory(entry.engine) if entry is not None else 0,
                "kv_bytes": stats.get("kv_cache", {}).get("bytes", 0),
                "estimated_bytes": estimate_bytes(spec.config) if entry is None else None,
                "ttl_s": spec.ttl_s, "pinned": spec.pinned}
