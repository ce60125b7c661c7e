"""Per-layer paged K/V pools in MLX, laid out for attention that reads blocks in place,
stored in a float dtype or quantized (group-wise affine, as ``mx.quantize``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..models.contract import uniform_kv
from . import cpu_attention

READ_PATHS = ("gather_mm", "gather", "gather_qmm", "cpu_kernel")
KV_CACHE_DTYPES = ("int8", "int4", "float16", "bfloat16", "float32")
QUANT_BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True, slots=True)
class KVLayout:
    """How one token's K (or V) row of one head is stored.

    ``dtype`` is the float dtype of the row, or for a quantized layout (``bits`` set) the
    dtype of its scales and biases and of the attention that reads it (the model's dtype).
    A quantized row of ``head_dim`` values is ``head_dim * bits / 32`` uint32 words plus one
    scale and one bias per ``group_size`` values, quantized per token (no re-quantization
    when a block fills up).
    """

    dtype: mx.Dtype
    bits: int | None = None
    group_size: int = 64

    @classmethod
    def parse(cls, name: str | None, model_dtype: mx.Dtype, head_dim: int) -> KVLayout:
        """The layout for ``--kv-cache-dtype name`` (None: the model's dtype, unquantized).

        Quantized groups run along ``head_dim``: int8 in groups of 64 where 64 divides it
        (Qwen3's 128, the demo model's 64), else 32; int4 in groups of 32 (on the demo model,
        perplexity +5% against +18% with groups of 64, for 0.19x instead of 0.16x of float32
        bytes: ``scripts/kv_quality.py``); a ``ValueError`` where 32 does not divide it.
        """
        if name is None:
            return cls(model_dtype)
        if name not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {name!r}")
        if name not in QUANT_BITS:
            return cls(getattr(mx, name))
        sizes = (64, 32) if name == "int8" else (32,)
        group = next((g for g in sizes if head_dim % g == 0), None)
        if group is None:
            raise ValueError(f"kv_cache_dtype {name} needs a head_dim divisible by 32, got {head_dim}")
        return cls(model_dtype, QUANT_BITS[name], group)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def name(self) -> str:
        """``int8`` / ``int4`` or the float dtype's name (``float32``), as ``/stats`` shows it."""
        return f"int{self.bits}" if self.quantized else str(self.dtype).removeprefix("mlx.core.")

    def parts(self, head_dim: int) -> list[tuple[int, mx.Dtype]]:
        """(last-axis width, dtype) of each array a row is stored in: the values, and for a
        quantized layout the scales and the biases."""
        if not self.quantized:
            return [(head_dim, self.dtype)]
        groups = head_dim // self.group_size
        return [(head_dim * self.bits // 32, mx.uint32), (groups, self.dtype), (groups, self.dtype)]

    def row_bytes(self, head_dim: int) -> int:
        return sum(width * dtype.size for width, dtype in self.parts(head_dim))


class PagedKVCache:
    """One K and one V pool per layer, ``(num_blocks + 1, n_kv_heads, block_size, head_dim)``.

    Axis 0 indexes blocks, so the pool grows by appending. Each (block, head) is a
    contiguous ``(block_size, head_dim)`` matrix that decode attention multiplies where it
    lies (``mx.gather_mm``). K is not stored transposed: that made decode scores ~10% faster
    at 2K contexts but every K write a strided scatter ~5x slower, a loss at short contexts.

    Quantized (``bits`` set): ``k_pools``/``v_pools`` hold the packed uint32 words and
    ``k_scales``/``k_biases``/``v_scales``/``v_biases`` the per-group affine parameters, each
    ``(num_blocks + 1, n_kv_heads, block_size, width)``: decode multiplies them in place with
    ``mx.gather_qmm``; nothing dequantizes the whole context.

    The extra last block is a scratch block: block tables are padded with it, and the
    padded positions are masked, so padding never reads a real sequence's blocks. Each pool
    has exactly one reference (the list slot), so ``pool[idx] = x`` updates in place.

    ``read_path`` is ``"gather_mm"`` (decode reads blocks where they lie) where the backend
    supports ``mx.gather_mm`` in this dtype (CPU: float32 only), else ``"gather"`` (copy the
    sequence's blocks head-major, then SDPA); quantized: ``"cpu_kernel"`` (in place, by
    ``cpu_attention``'s kernel: the CPU with numba and float32 scales), ``"gather_qmm"`` (in
    place, elsewhere), or ``"gather"`` (copy and dequantize the sequence's blocks: a
    reference path for tests).
    ``None`` picks at run time.
    """

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
        head_dim: int, dtype: mx.Dtype, read_path: str | None = None, bits: int | None = None,
        group_size: int = 64,
    ) -> None:
        self.layout = KVLayout(dtype, bits, group_size)
        self.read_path = read_path or self._default_read_path()
        allowed = ("cpu_kernel", "gather_qmm", "gather") if bits else ("gather_mm", "gather")
        if self.read_path not in allowed:
            raise ValueError(f"read_path must be one of {allowed}, not {read_path!r}")
        if bits and head_dim % group_size:
            raise ValueError(f"head_dim {head_dim} is not a multiple of the group size {group_size}")
        if self.read_path == "cpu_kernel" and not cpu_attention.warm_up():
            raise ValueError("read_path cpu_kernel: the kernel did not compile here")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.bits, self.group_size = bits, group_size
        # Per stored part (values; scales; biases): one list of per-layer pools for K, one for V.
        self.k_parts: list[list[mx.array]] = []
        self.v_parts: list[list[mx.array]] = []
        for width, part_dtype in self.layout.parts(head_dim):
            for parts in (self.k_parts, self.v_parts):
                parts.append([mx.zeros(self._shape(num_blocks + 1, width), part_dtype)
                              for _ in range(num_layers)])
        self.k_pools, self.v_pools = self.k_parts[0], self.v_parts[0]
        if bits:
            (self.k_scales, self.k_biases), (self.v_scales, self.v_biases) = self.k_parts[1:], self.v_parts[1:]
        mx.eval(self.k_parts, self.v_parts)

    def _default_read_path(self) -> str:
        if self.layout.quantized:
            return "cpu_kernel" if cpu_attention.supports(self.layout.bits, self.layout.dtype) else "gather_qmm"
        return "gather_mm" if gather_mm_supports(self.layout.dtype) else "gather"

    def _shape(self, blocks: int, width: int) -> tuple[int, ...]:
        return (blocks, self.num_kv_heads, self.block_size, width)

    @property
    def scratch_block(self) -> int:
        return self.num_blocks

    @property
    def kv_dtype(self) -> str:
        """What ``--kv-cache-dtype`` names this layout: ``int8``, ``int4``, ``float32``, ..."""
        return self.layout.name

    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.layout, len(self.k_pools), self.num_kv_heads, self.head_dim)

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token * (self.num_blocks + 1) * self.block_size

    def _all_pools(self) -> list[list[mx.array]]:
        return [*self.k_parts, *self.v_parts]

    def grow(self, num_new_blocks: int) -> None:
        """Add ``num_new_blocks`` blocks; existing blocks keep their ids and contents.

        The new blocks go where the scratch block was and the scratch block moves to the
        new end. Padding only ever reads the scratch block (masked), so its contents never
        matter; the old scratch block, never written, becomes an ordinary zeroed block.
        """
        if num_new_blocks <= 0:
            return
        for pools in self._all_pools():
            for i, pool in enumerate(pools):
                new = mx.zeros((num_new_blocks, *pool.shape[1:]), pool.dtype)
                pools[i] = mx.concatenate([pool, new])
        self.num_blocks += num_new_blocks
        mx.eval(self._all_pools())

    def write(self, layer: int, blocks: mx.array, offsets: mx.array, keys: mx.array,
              values: mx.array) -> None:
        """Store ``keys``/``values`` (T, n_kv, D) at block ``blocks[t]``, row ``offsets[t]``
        (quantized first, each token's row on its own, where the layout is quantized)."""
        b, o = blocks[:, None], offsets[:, None]
        heads = mx.arange(self.num_kv_heads)[None]
        for parts, rows in ((self.k_parts, keys), (self.v_parts, values)):
            for pools, part in zip(parts, self._encode(rows)):
                pools[layer][b, heads, o] = part

    def _encode(self, rows: mx.array) -> tuple[mx.array, ...]:
        rows = rows.astype(self.dtype)
        if not self.bits:
            return (rows,)
        return tuple(mx.quantize(rows, group_size=self.group_size, bits=self.bits))

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy block ``src[i]`` over block ``dst[i]`` in every layer's K and V pool (and,
        quantized, their scales and biases: the copy stays quantized, bit for bit).

        Copy-on-write for a reused prefix that ends inside a block, queued before a step's
        writes. The source rows are evaluated first: MLX updates a pool in place only if
        nothing else holds its buffer when the update runs, and a lazy gather of the source
        rows does, so the update copied the whole pool (every layer's: 1-2 s for a 16K-token
        pool of the bench's kv shape on a loaded 2-core CPU, whatever the block size; with
        the rows evaluated first 3 ms for 16-token blocks, 7 ms for 64, 40 ms for 256).
        The cost: the rows wait for the step in flight.
        """
        if not src:
            return
        s, d = mx.array(src, mx.int32), mx.array(dst, mx.int32)
        pools = self._all_pools()
        rows = [[pool[s] for pool in layers] for layers in pools]
        mx.eval(rows)
        for layers, parts in zip(pools, rows):
            for i, part in enumerate(parts):
                layers[i][d] = part

    def gather(self, layer: int, block_tables: mx.array) -> tuple[mx.array, mx.array]:
        """Contiguous keys/values ``(B, n_kv, blocks_per_seq * block_size, D)`` by block table,
        in ``self.dtype`` (dequantized where the layout is quantized).

        A copy of every listed block: only for prefill chunks and the ``gather`` read path.
        """
        B, nb = block_tables.shape
        shape = (B, self.num_kv_heads, nb * self.block_size, self.head_dim)
        out = []
        for parts in (self.k_parts, self.v_parts):
            rows = [pools[layer][block_tables] for pools in parts]  # (B, nb, n_kv, bs, width)
            if self.bits:
                rows = [mx.dequantize(*rows, group_size=self.group_size, bits=self.bits)]
            out.append(rows[0].transpose(0, 2, 1, 3, 4).reshape(shape))
        return out[0], out[1]

    def dequantized(self, layer: int) -> tuple[mx.array, mx.array]:
        """The whole K and V pools of ``layer`` in ``self.dtype``: for tests and tools."""
        if not self.bits:
            return self.k_pools[layer], self.v_pools[layer]
        return tuple(mx.dequantize(*(pools[layer] for pools in parts), group_size=self.group_size,
                                   bits=self.bits) for parts in (self.k_parts, self.v_parts))


def kv_bytes_per_token(layout: KVLayout, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes one token's K and V take in every layer (the memory cap counts blocks of these)."""
    return 2 * num_layers * num_kv_heads * layout.row_bytes(head_dim)


def pool_for(model: Any, num_blocks: int, block_size: int, layout: KVLayout) -> PagedKVCache:
    """A pool of ``num_blocks`` blocks for every attention layer of ``model`` (a target, a
    draft model or an MTP head: anything with alike ``kv_layers``), stored in ``layout``."""
    kv = uniform_kv(model)
    return PagedKVCache(len(model.kv_layers), num_blocks, block_size, kv.num_kv_heads,
                        kv.head_dim, layout.dtype, bits=layout.bits, group_size=layout.group_size)


def block_bytes_for(model: Any, block_size: int, layout: KVLayout) -> int:
    """Bytes one block of ``pool_for(model, ..., block_size, layout)`` takes."""
    kv = uniform_kv(model)
    return kv_bytes_per_token(layout, len(model.kv_layers), kv.num_kv_heads, kv.head_dim) * block_size


def gather_mm_supports(dtype: mx.Dtype) -> bool:
    """Whether ``mx.gather_mm`` runs in ``dtype`` on the default device (CPU: float32 only)."""
    a = mx.zeros((1, 1, 1), dtype)
    idx = mx.zeros((1,), mx.uint32)
    try:
        mx.eval(mx.gather_mm(a, a, idx, idx))
    except (RuntimeError, ValueError):
        return False
    return True
