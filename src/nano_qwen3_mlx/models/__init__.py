"""Model definitions (Qwen3, Llama family) and the loader."""
