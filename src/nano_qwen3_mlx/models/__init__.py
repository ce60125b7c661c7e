"""Model definitions (Qwen3, Llama family) and the loader."""

from types import ModuleType

from . import llama, qwen3

# ``model_type`` (config.json) or ``general.architecture`` (GGUF) -> the module with
# ``Model`` and ``ModelArgs``. The one table both loaders read.
MODEL_TYPES: dict[str, ModuleType] = {
    "qwen3": qwen3,
    "llama": llama,
    "mistral": llama,
    "smollm": llama,
    "smollm2": llama,
}
