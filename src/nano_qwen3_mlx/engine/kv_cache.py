"""Per-layer paged K/V pools in MLX, laid out for attention that reads blocks in place."""

from __future__ import annotations

import mlx.core as mx

READ_PATHS = ("gather_mm", "gather")


class PagedKVCache:
    """One K and one V pool per layer, ``(num_blocks + 1, n_kv_heads, block_size, head_dim)``.

    Axis 0 indexes blocks, so the pool grows by appending. Each (block, head) is a
    contiguous ``(block_size, head_dim)`` matrix that decode attention multiplies where it
    lies (``mx.gather_mm``). K is not stored transposed: that made decode scores ~10% faster
    at 2K contexts but every K write a strided scatter ~5x slower, a loss at short contexts.

    The extra last block is a scratch block: block tables are padded with it, and the
    padded positions are masked, so padding never reads a real sequence's blocks. Each pool
    has exactly one reference (the list slot), so ``pool[idx] = x`` updates in place.

    ``read_path`` is ``"gather_mm"`` (decode reads blocks where they lie) where the backend
    supports ``mx.gather_mm`` in this dtype (CPU: float32 only), else ``"gather"`` (copy the
    sequence's blocks head-major, then SDPA). ``None`` picks at run time.
    """

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int,
        num_kv_heads: int, head_dim: int, dtype: mx.Dtype, read_path: str | None = None,
    ) -> None:
        if read_path not in (None, *READ_PATHS):
            raise ValueError(f"read_path must be one of {READ_PATHS}, not {read_path!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.read_path = read_path or ("gather_mm" if gather_mm_supports(dtype) else "gather")
        self.k_pools = [mx.zeros(self._shape(num_blocks + 1), dtype) for _ in range(num_layers)]
        self.v_pools = [mx.zeros(self._shape(num_blocks + 1), dtype) for _ in range(num_layers)]
        mx.eval(self.k_pools, self.v_pools)

    def _shape(self, blocks: int) -> tuple[int, ...]:
        return (blocks, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def scratch_block(self) -> int:
        return self.num_blocks

    @property
    def bytes_per_token(self) -> int:
        per_layer = 2 * self.num_kv_heads * self.head_dim * self.dtype.size
        return per_layer * len(self.k_pools)

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token * (self.num_blocks + 1) * self.block_size

    def grow(self, num_new_blocks: int) -> None:
        """Add ``num_new_blocks`` blocks; existing blocks keep their ids and contents.

        The new blocks go where the scratch block was and the scratch block moves to the
        new end. Padding only ever reads the scratch block (masked), so its contents never
        matter; the old scratch block, never written, becomes an ordinary zeroed block.
        """
        if num_new_blocks <= 0:
            return
        for pools in (self.k_pools, self.v_pools):
            for i, pool in enumerate(pools):
                pools[i] = mx.concatenate([pool, mx.zeros(self._shape(num_new_blocks), self.dtype)])
        self.num_blocks += num_new_blocks
        mx.eval(self.k_pools, self.v_pools)

    def write(self, layer: int, blocks: mx.array, offsets: mx.array, keys: mx.array,
              values: mx.array) -> None:
        """Store ``keys``/``values`` (T, n_kv, D) at block ``blocks[t]``, row ``offsets[t]``."""
        b, o = blocks[:, None], offsets[:, None]
        heads = mx.arange(self.num_kv_heads)[None]
        self.k_pools[layer][b, heads, o] = keys.astype(self.dtype)
        self.v_pools[layer][b, heads, o] = values.astype(self.dtype)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy block ``src[i]`` over block ``dst[i]`` in every layer's K and V pool.

        Copy-on-write for a reused prefix that ends inside a block. One indexed update per
        pool, lazy like ``write``: queued before a step's writes, it is ordered before them.
        As for ``write``, MLX updates a pool in place only if nothing else holds its buffer
        when the update is scheduled; the gather of the source rows does until it has run
        (seen on the CPU backend), so a copy step may cost a copy of the pool.
        """
        if not src:
            return
        s, d = mx.array(src, mx.int32), mx.array(dst, mx.int32)
        for pools in (self.k_pools, self.v_pools):
            for i in range(len(pools)):
                pools[i][d] = pools[i][s]

    def gather(self, layer: int, block_tables: mx.array) -> tuple[mx.array, mx.array]:
        """Contiguous keys/values ``(B, n_kv, blocks_per_seq * block_size, D)`` by block table.

        A copy of every listed block: only for prefill chunks and the ``gather`` read path.
        """
        B, nb = block_tables.shape
        shape = (B, self.num_kv_heads, nb * self.block_size, self.head_dim)
        k = self.k_pools[layer][block_tables].transpose(0, 2, 1, 3, 4).reshape(shape)
        v = self.v_pools[layer][block_tables].transpose(0, 2, 1, 3, 4).reshape(shape)
        return k, v


def gather_mm_supports(dtype: mx.Dtype) -> bool:
    """Whether ``mx.gather_mm`` runs in ``dtype`` on the default device (CPU: float32 only)."""
    a = mx.zeros((1, 1, 1), dtype)
    idx = mx.zeros((1,), mx.uint32)
    try:
        mx.eval(mx.gather_mm(a, a, idx, idx))
    except (RuntimeError, ValueError):
        return False
    return True
