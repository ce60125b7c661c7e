"""Per-layer paged K/V pools in MLX and the attention context that reads/writes them."""

from __future__ import annotations

import mlx.core as mx


class PagedKVCache:
    """One K and one V pool per layer, ``((num_blocks + 1) * block_size, n_kv_heads, head_dim)``.

    The extra last block is a scratch block: padded positions of a batch write there, so
    padding never touches a real sequence's blocks. Each pool has exactly one reference
    (the list slot), so ``pool[slots] = x`` updates in place instead of copying the pool.
    """

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int,
        num_kv_heads: int, head_dim: int, dtype: mx.Dtype,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        shape = ((num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.k_pools = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        self.v_pools = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        mx.eval(self.k_pools, self.v_pools)

    def grow(self, num_new_blocks: int) -> None:
        """Add ``num_new_blocks`` blocks; existing blocks keep their ids and contents.

        One layer at a time, so the peak is the old pool plus one layer's new pool.
        """
        n = self.num_blocks * self.block_size
        extra = (num_new_blocks * self.block_size, self.num_kv_heads, self.head_dim)
        for pools in (self.k_pools, self.v_pools):
            for i, pool in enumerate(pools):
                # The scratch block stays last.
                pools[i] = mx.concatenate([pool[:n], mx.zeros(extra, self.dtype), pool[n:]])
                mx.eval(pools[i])
        self.num_blocks += num_new_blocks

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

    def write(self, layer: int, slot_mapping: mx.array, keys: mx.array, values: mx.array) -> None:
        """Store ``keys``/``values`` (T, n_kv, D) at flat ``slot_mapping`` (T,)."""
        self.k_pools[layer][slot_mapping] = keys.astype(self.dtype)
        self.v_pools[layer][slot_mapping] = values.astype(self.dtype)

    def gather(self, layer: int, block_tables: mx.array) -> tuple[mx.array, mx.array]:
        """Dense keys/values ``(B, n_kv, num_blocks_per_seq * block_size, D)`` by block table."""
        B, nb = block_tables.shape
        view = (self.num_blocks + 1, self.block_size, self.num_kv_heads, self.head_dim)
        out_shape = (B, nb * self.block_size, self.num_kv_heads, self.head_dim)
        k = self.k_pools[layer].reshape(view)[block_tables].reshape(out_shape)
        v = self.v_pools[layer].reshape(view)[block_tables].reshape(out_shape)
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


class PagedAttention:
    """The ``AttentionContext`` for one batched forward pass over the paged cache."""

    def __init__(
        self, cache: PagedKVCache, slot_mapping: mx.array, block_tables: mx.array,
        offsets: mx.array, mask: mx.array | None,
    ) -> None:
        self.cache = cache
        self.slot_mapping = slot_mapping  # (B * L,) flat slot of every input position
        self.block_tables = block_tables  # (B, max_blocks), padded with the scratch block
        self.offsets = offsets  # (B,) position of each row's first input token
        self.mask = mask  # (B, 1, L, S) bool, or None when no position needs masking

    def attend(self, layer_idx: int, queries, keys, values, scale: float) -> mx.array:
        B, n_kv, L, D = keys.shape
        flat_k = keys.transpose(0, 2, 1, 3).reshape(B * L, n_kv, D)
        flat_v = values.transpose(0, 2, 1, 3).reshape(B * L, n_kv, D)
        self.cache.write(layer_idx, self.slot_mapping, flat_k, flat_v)
        k, v = self.cache.gather(layer_idx, self.block_tables)
        if k.dtype != queries.dtype:
            k, v = k.astype(queries.dtype), v.astype(queries.dtype)
        return mx.fast.scaled_dot_product_attention(queries, k, v, scale=scale, mask=self.mask)
