"""Model definitions (Qwen3, Qwen3-MoE, Qwen3.5, Qwen3-Next, Llama family) and the loader."""

from types import ModuleType

from . import llama, qwen3, qwen3_5, qwen3_5_moe, qwen3_moe, qwen3_next

# ``model_type`` (config.json) or ``general.architecture`` (GGUF) -> the module with
# ``Model`` and ``ModelArgs``. The one table both loaders read.
MODEL_TYPES: dict[str, ModuleType] = {
    "qwen3": qwen3,
    "qwen3_moe": qwen3_moe,
    "qwen3moe": qwen3_moe,  # llama.cpp's architecture name
    "qwen3_5": qwen3_5,
    "qwen3_5_moe": qwen3_5_moe,
    "qwen3_next": qwen3_next,
    "llama": llama,
    "mistral": llama,
    "smollm": llama,
    "smollm2": llama,
}
