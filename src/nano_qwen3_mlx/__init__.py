"""nano-qwen3-mlx: an MLX-native Qwen3 inference engine and OpenAI-compatible server."""

# First, before anything imports MLX: on Linux CPU, an optimised BLAS (see blas.py).
from .blas import load_optimised_blas

load_optimised_blas()

from .sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "QueueFullError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so `import nano_qwen3_mlx` stays cheap (the CLI imports it before parsing flags).
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "AsyncLLM":
        from .async_llm import AsyncLLM

        return AsyncLLM
    if name == "QueueFullError":
        from .errors import QueueFullError

        return QueueFullError
    raise AttributeError(name)
