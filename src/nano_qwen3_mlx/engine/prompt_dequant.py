"""Quantized linear layers that multiply a prompt chunk through their dequantized weight, on
a CPU where MLX's quantized matmul is a scalar loop.

MLX's CPU ``quantized_matmul`` vectorises only through its SIMD layer (Accelerate/NEON); on
x86 it runs one multiply at a time, for every row. A 212-row prompt chunk through a 4-bit
1536 x 576 projection (SmolLM2-135M's MLP) took 127 ms, the weight dequantized then multiplied
by the BLAS 4.6 ms; a 12288 x 4096 one 7.3 s vs 0.57 s. Below ~16 rows the scalar loop wins
(it reads a quarter of the bytes and writes no float copy): decode keeps it. The engine swaps
the class of the model's ``nn.QuantizedLinear`` instances (``dequantize_prompt_products``), as
``split_linear.py`` does for plain ones: names, weights and the model's code stay as they
are. A float copy is needed only by its own product, so MLX frees it once that ran (peak
memory of a 4-bit model's 512- and 2,048-token prompts: 1.08x and 0.91x mlx-lm's).
"""

from __future__ import annotations

import platform

import mlx.core as mx
import mlx.nn as nn

from .split_linear import swap_classes

# Rows from which a product dequantizes first (measured on this 2-core x86: int4 12288 x 4096
# at 8 rows 288 vs 543 ms, at 32 rows 1082 vs 515 ms; 1536 x 576 even at 8 rows 4.9 vs 2.9 ms).
MIN_ROWS = 16


class PromptDequantLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` whose products of ``MIN_ROWS`` rows or more (float32) go
    through the dequantized weight and the BLAS."""

    def __call__(self, x: mx.array) -> mx.array:
        # Older MLX releases have no ``mode``: their quantization is always affine.
        if (x.dtype != mx.float32 or x.size // x.shape[-1] < MIN_ROWS
                or getattr(self, "mode", "affine") != "affine"):
            return super().__call__(x)
        weight = mx.dequantize(self["weight"], self["scales"], self.get("biases"),
                               self.group_size, self.bits)
        out = x @ weight.astype(mx.float32).T
        return out + self["bias"] if "bias" in self else out


def scalar_quantized_matmul() -> bool:
    """Does MLX multiply quantized weights here with its scalar CPU loop (the CPU device of
    an x86 machine)?"""
    machine = platform.machine().lower()
    return mx.default_device() == mx.cpu and machine in ("x86_64", "amd64")


def dequantize_prompt_products(model: nn.Module) -> int:
    """Make every ``nn.QuantizedLinear`` of ``model`` a ``PromptDequantLinear`` where MLX's
    quantized matmul is scalar; the number swapped (other quantized classes, such as experts
    and sharded layers, stay; modes other than affine keep ``quantized_matmul``)."""
    if not isinstance(model, nn.Module) or not scalar_quantized_matmul():
        return 0
    return swap_classes(model, {nn.QuantizedLinear: PromptDequantLinear})
