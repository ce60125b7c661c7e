"""What the disk tier's files are keyed by, where the tier lives, and ``make_disk_tier``.

A block's file key is ``sha256(parent key + its tokens as uint32)``, chained from a root
that hashes the checkpoint's identity (config.json, weight file names, sizes and mtimes),
the quantization, the KV layout (layers, KV heads, head_dim, dtype, quantized bits and
group size), the block size and, for a hybrid model, its recurrent states' shapes and
dtypes: a file can only ever match the same model, layout and token prefix.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..paths import user_prefix_cache_dir
from .disk_cache import DiskStore
from .disk_state import DiskSnapshots

if TYPE_CHECKING:
    from ..models.contract import LayerState
    from .disk_tier import DiskTier
    from .kv_cache import PagedKVCache

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the payload layout changes: every old file then simply misses
DEFAULT_DISK_GB = 10.0  # the cap when only --prefix-cache-dir is given
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".npz", ".bin")


def resolve_location(directory: str | None, disk_gb: float | None) -> tuple[Path | None, int]:
    """Where the tier lives and its cap in bytes; ``(None, 0)`` when it is off."""
    if directory is None and disk_gb is None:
        return None, 0
    path = Path(directory).expanduser() if directory else user_prefix_cache_dir()
    return path, int((disk_gb or DEFAULT_DISK_GB) * 1e9)


def checkpoint_identity(path: Path) -> bytes:
    """A digest of what makes a checkpoint itself: config.json's bytes and each weight
    file's name, size and mtime (a re-written or re-downloaded file is a new identity)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if f.name == "config.json":
            h.update(f.read_bytes())
    return h.digest()


def block_bytes(kv: PagedKVCache) -> int:
    """One block's file payload: every part of every layer's K and V rows."""
    return kv.bytes_per_token * kv.block_size


def block_key(parent: bytes, tokens: tuple[int, ...] | list[int]) -> bytes:
    """The chained key of a full block: its parent's key and its tokens."""
    return hashlib.sha256(parent + np.asarray(tokens, dtype="<u4").tobytes()).digest()


def root_key(checkpoint: Path, quantize: object, kv: PagedKVCache,
             state_layers: Sequence[LayerState] | None) -> bytes:
    """The chain's root: everything besides the tokens that a block's bytes depend on."""
    desc = {"format": FORMAT, "checkpoint": checkpoint_identity(checkpoint).hex(),
            "quantize": quantize, "layers": len(kv.k_pools), "kv_heads": kv.num_kv_heads,
            "head_dim": kv.head_dim, "dtype": str(kv.dtype), "block_size": kv.block_size,
            "kv_bits": kv.bits, "kv_group_size": kv.group_size if kv.bits else None,
            "states": [[list(s) for s in layer.shapes] + [str(d) for d in layer.dtypes]
                       for layer in state_layers or ()]}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).digest()


def make_disk_tier(engine: Any) -> DiskTier | None:
    """The engine's disk tier, or None when ``prefix_cache_dir``/``prefix_cache_disk_gb``
    are unset (or prefix caching is off)."""
    config = engine.config
    directory, cap = resolve_location(config.prefix_cache_dir, config.prefix_cache_disk_gb)
    if directory is None:
        return None
    if not config.enable_prefix_caching:
        log.warning("the prefix cache disk tier needs prefix caching: it is off")
        return None
    kv = engine.cache
    root = root_key(engine.loaded.path, config.quantize, kv, engine.model.state_layers)
    from .disk_tier import WRITE_QUEUE_BYTES, DiskTier  # here: disk_tier imports the keys

    store = DiskStore(directory, cap, max_pending=max(8, WRITE_QUEUE_BYTES // block_bytes(kv)))
    snapshots = DiskSnapshots(store, engine.states, lambda: engine.state_cache,
                              kv.block_size) if engine.states is not None else None
    return DiskTier(store, root, engine.block_manager, lambda: engine.cache,
                    engine._grow_pool if engine.pool.grows else None, snapshots)
