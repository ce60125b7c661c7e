"""``nano-qwen3 bench``: this engine vs mlx-lm on the same checkpoint, prompts and machine.

Modules: ``shapes`` (random checkpoints), ``metrics`` (all the arithmetic), ``engines`` (the
two engines behind one interface), ``suites`` (prompt lengths x batches, mixed arrival),
``chat`` (multi-turn and shared system prompt, against ``mlx_lm.server``), ``report``.
"""

from .metrics import time_stream
from .shapes import SHAPES, make_prompts, random_checkpoint

__all__ = ["SHAPES", "make_prompts", "random_checkpoint", "time_stream"]
