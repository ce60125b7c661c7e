"""``nano-qwen3 serve``: run the OpenAI-compatible server until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
from typing import Annotated, Any

import typer
from aiohttp import web

from ..config import (
    DRAFT_MODEL_HELP,
    KV_DTYPE_HELP,
    PIPELINE_HELP,
    SPECULATIVE_HELP,
    EngineConfig,
    ServerConfig,
)
from ..engine_thread import exit_process
from ..errors import exit_with_error, first_line
from ..progress import Spinner
from .app import create_app
from .management.pool import ModelPool, ModelSpec
from .management.specs import model_entries, model_specs
from .shutdown import drain
from .state import STATE_KEY, ServerState

log = logging.getLogger("nano_qwen3_mlx.server")

# After the drain (server/shutdown.py) only closing is left: what aiohttp still waits for.
CLOSE_TIMEOUT_S = 1.0
WORKERS_REFUSED = (
    "--workers above 1 is not supported: one engine batches all requests on the accelerator; "
    "to scale out, run replicas behind a load balancer"
)

Opt = typer.Option
PREFIX_CACHE_DIR_HELP = ("keep full KV blocks in this folder too: a prefix cache that survives "
                         "restarts and outgrows RAM (env PREFIX_CACHE_DIR)")
PREFIX_CACHE_GB_HELP = ("cap of the --prefix-cache-dir folder in GB (default 10); alone: a "
                        "folder under the user cache dir (env PREFIX_CACHE_DISK_GB)")


def serve(
    model: Annotated[list[str] | None, Opt("--model", "-m", help="alias, local dir, .gguf or HF repo id; repeat it for several models (NAME=MODEL names one)")] = None,
    model_ttl: Annotated[float | None, Opt(help="several models: unload one idle this many seconds (0 = never)")] = None,
    host: Annotated[str | None, Opt(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, Opt(help="port (default 8000)")] = None,
    config: Annotated[str | None, Opt("--config", help="TOML config, e.g. configs/production.toml")] = None,
    max_num_seqs: Annotated[int | None, Opt(help="sequences decoded together")] = None,
    kv_cache_gb: Annotated[float | None, Opt(help="KV cache cap in GB: the pool starts small and grows on demand up to it")] = None,
    max_memory_gb: Annotated[float | None, Opt(help="cap on weights + KV cache in GB")] = None,
    max_tokens_default: Annotated[int | None, Opt(help="max_tokens of a request that leaves it out (default 2048)")] = None,
    max_queue_size: Annotated[int | None, Opt(help="requests held before 429")] = None,
    max_model_len: Annotated[int | None, Opt(help="context length cap")] = None,
    max_itl_ratio: Annotated[float | None, Opt(help="while streams decode, size prompt chunks so a step takes at most this many decode steps (e.g. 2: even token gaps, slower first tokens for arriving prompts)")] = None,
    max_num_batched_tokens: Annotated[int | None, Opt(help="tokens one engine step may carry (prompt chunks + decodes; default 2048)")] = None,
    prefix_cache_dir: Annotated[str | None, Opt(help=PREFIX_CACHE_DIR_HELP)] = None,
    prefix_cache_disk_gb: Annotated[float | None, Opt(help=PREFIX_CACHE_GB_HELP)] = None,
    device: Annotated[str | None, Opt(help="gpu or cpu (mps = gpu)")] = None,
    dtype: Annotated[str | None, Opt(help="auto, float16, bfloat16, float32")] = None,
    quantize: Annotated[int | None, Opt(help="quantize on load: 4 or 8")] = None,
    kv_cache_dtype: Annotated[str | None, Opt(help=KV_DTYPE_HELP)] = None,
    speculative: Annotated[str | None, Opt(help=SPECULATIVE_HELP)] = None,
    num_speculative_tokens: Annotated[int | None, Opt(help="most tokens a sequence drafts per step with --speculative (default 4; adaptive below)")] = None,
    draft_model: Annotated[str | None, Opt(help=DRAFT_MODEL_HELP)] = None,
    pipeline: Annotated[bool | None, Opt("--pipeline/--tensor", help=PIPELINE_HELP)] = None,
    api_key: Annotated[str | None, Opt(help="require Authorization: Bearer <key> or x-api-key: <key> (env API_KEY)")] = None,
    served_model_name: Annotated[str | None, Opt(help="model name shown to clients")] = None,
    log_level: Annotated[str | None, Opt(help="debug, info, warning, error")] = None,
    log_prompts: Annotated[bool | None, Opt("--log-prompts/--no-log-prompts", help="log prompt text")] = None,
    cors_origin: Annotated[list[str] | None, Opt("--cors-origin", help="allowed CORS origin (repeatable)")] = None,
    request_timeout: Annotated[float | None, Opt(help="server-wide request deadline, seconds")] = None,
    shutdown_grace: Annotated[float | None, Opt(help="on SIGTERM/SIGINT, seconds running requests get to finish before they end with an error (default 30)")] = None,
    workers: Annotated[int | None, Opt(help="must be 1: one engine serves all requests")] = None,
) -> None:
    """Serve the OpenAI-compatible API (chat, completions, models, health, stats, metrics)."""
    if workers is not None and workers > 1:
        exit_with_error(WORKERS_REFUSED)
    entries = _call(model_entries, model, config)
    engine_config = _load(EngineConfig, config, model=entries[0].get("model") if entries else None,
                          max_num_seqs=max_num_seqs,
                          kv_cache_gb=kv_cache_gb, max_memory_gb=max_memory_gb,
                          max_tokens_default=max_tokens_default, max_queue_size=max_queue_size,
                          max_model_len=max_model_len, max_itl_ratio=max_itl_ratio,
                          max_num_batched_tokens=max_num_batched_tokens,
                          device=device, dtype=dtype, quantize=quantize,
                          kv_cache_dtype=kv_cache_dtype, prefix_cache_dir=prefix_cache_dir,
                          prefix_cache_disk_gb=prefix_cache_disk_gb, speculative=speculative,
                          num_speculative_tokens=num_speculative_tokens, draft_model=draft_model,
                          pipeline=pipeline)
    for entry in entries or [{"model": engine_config.model}]:
        _check_model(entry.get("model", engine_config.model))
    if engine_config.draft_model:
        _check_model(engine_config.draft_model)
    server_config = _load(ServerConfig, config, host=host, port=port, api_key=api_key,
                          model_ttl=model_ttl,
                          served_model_name=served_model_name, log_level=log_level,
                          log_prompts=log_prompts, cors_origins=cors_origin or None,
                          request_timeout=request_timeout, workers=workers,
                          shutdown_grace=shutdown_grace)
    if server_config.workers > 1:
        exit_with_error(WORKERS_REFUSED)
    _setup_logging(server_config.log_level)
    if not _is_loopback(server_config.host) and not server_config.api_key:
        typer.echo(f"warning: binding {server_config.host} without --api-key: anyone who can "
                   "reach this port can use the model", err=True)
    # The pool: several models, a [[models]] list, or one model named NAME=MODEL.
    several = len(entries) > 1 or (not model and bool(entries)) or "alias" in entries[0] \
        if entries else False
    if several and server_config.served_model_name:
        exit_with_error("--served-model-name names the one model; with several, name each "
                        "NAME=MODEL (or `alias` in [[models]])")
    _distributed(engine_config, several)
    specs = _call(model_specs, engine_config, entries, server_config.model_ttl) if several else None
    code = asyncio.run(run_server(engine_config, server_config, **({"specs": specs} if specs else {})))
    if code:
        raise typer.Exit(code)


def _distributed(engine_config: EngineConfig, several: bool) -> None:
    """Under ``mlx.launch``: one model, served by rank 0; any other rank loads its shard
    and follows rank 0's steps (no port, no output) until rank 0 stops, then exits."""
    from ..distributed.world import exit_now, get_world, report

    world = get_world()
    if not world.distributed:
        return
    if several:
        exit_with_error("serving several models is not supported under mlx.launch "
                        "(distributed): serve one model")
    if not world.is_follower:
        return
    from ..engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(engine_config)
    except Exception as exc:  # noqa: BLE001  (rank 0 then loses this rank and ends too)
        report(f"error: the model failed to load: {first_line(exc)}")
        exit_now(1)
    engine.dist.follow()


def _bound_distributed_shutdown(grace: float) -> None:
    """Under mlx.launch, a step blocked on a rank that is gone would hold the drain for
    good: past the grace and the followers' stop, the process ends with an error."""
    from ..distributed.leader import STOP_TIMEOUT_S
    from ..distributed.world import exit_after, get_world

    if get_world().distributed:
        exit_after(grace + 2 * STOP_TIMEOUT_S, "the distributed engine did not stop (a rank "
                   "is gone?)")


def _load(cls: Any, config_file: str | None, **flags: Any) -> Any:
    return _call(cls.load, config_file, **flags)


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(...)``; a ``ValueError`` (bad input) becomes the CLI's one ``error:`` line."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        exit_with_error(str(exc))


def _check_model(name: str) -> None:
    """An unknown model is bad input: refused before the port opens or anything loads."""
    from ..models.loader import ModelLoadError, check_model_name

    try:
        check_model_name(name)
    except ModelLoadError as exc:
        exit_with_error(str(exc))


def _setup_logging(level: str) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("nano_qwen3_mlx").setLevel(level.upper())


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(config: ServerConfig, port: int) -> str:
    host = config.host
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _banner(state: ServerState, url: str) -> None:
    """Model, memory (KV pool and its cap), sampling defaults and URL, once ready; sizes in
    MiB, as the engine's log writes them."""
    from ..engine.stats import mib

    engine = state.engine
    stats = engine.get_stats() if engine is not None else {}
    kv, mem = stats.get("kv_cache", {}), stats.get("memory", {})
    params = stats.get("parameters") or {"total": 0, "active": 0}
    active = "" if params["active"] == params["total"] else f", {params['active'] / 1e9:.2f}B active"
    lines = [
        f"model        {state.model_name} (context {engine.max_model_len} tokens, "
        f"{params['total'] / 1e9:.2f}B parameters{active})",
        f"memory       {mib(mem.get('active_bytes', 0))} in use; KV pool {mib(kv.get('bytes', 0))} "
        f"({kv.get('num_blocks', '?')} blocks of {kv.get('block_size', '?')} tokens, "
        f"{kv.get('dtype', '?')}, {kv.get('bytes_per_token', '?')} B/token), "
        + (f"grows on demand up to {mib(kv.get('cap_bytes', 0))} (--kv-cache-gb)"
           if kv.get("cap_blocks", 0) > kv.get("num_blocks", 0) else "fixed"),
        f"defaults     {_defaults_line(getattr(engine, 'sampling_defaults', {}))}",
        f"listening    {url}/v1  (health {url}/health, metrics {url}/metrics)",
    ]
    if "disk_cache" in stats:  # the prefix cache's disk tier (engine/disk_tier.py)
        disk = stats["disk_cache"]
        lines.insert(2, f"prefix cache {disk['dir']}: {mib(disk['bytes'])} of "
                        f"{mib(disk['cap_bytes'])}" + ("" if disk["writable"] else
                                                        " (read-only: another process owns it)"))
    if "blas" in stats:  # Linux CPU: which BLAS MLX's matmuls use (blas.py)
        lines.insert(2, f"blas         {stats['blas']['name']} ({stats['blas']['reason']})")
    typer.echo("\n".join(lines), err=True)


def _pool_banner(state: ServerState, url: str) -> None:
    """Several models: each with its state, the budget, and the URL (the page at /)."""
    pool = state.models
    budget = f"{pool.budget_bytes / 1e9:g} GB (--max-memory-gb)" if pool.budget_bytes else "none"
    lines = [f"model        {s.id} ({'pinned, ' if s.pinned else ''}"
             f"{'loaded' if s.id in pool.loaded else 'loads on first request'}"
             f"{f', unloads after {s.ttl_s:g} s idle' if s.ttl_s and not s.pinned else ''})"
             for s in pool.specs.values()]
    lines += [f"memory       budget {budget}",
              f"listening    {url}/v1  (chat page {url}/, health {url}/health)"]
    typer.echo("\n".join(lines), err=True)


def _defaults_line(defaults: dict[str, Any]) -> str:
    shown = ", ".join(f"{k} {v}" for k, v in defaults.items() if k != "max_tokens")
    return (f"max_tokens {defaults.get('max_tokens')} (--max-tokens-default), {shown} "
            "(for fields a request leaves out)")


BIND_FAILED = 2  # run_server's code when the port could not be bound (nothing started)


async def run_server(engine_config: EngineConfig, server_config: ServerConfig,
                     specs: list[ModelSpec] | None = None) -> int:
    """Serve until a signal, then end the process with ``_serve``'s exit code (the
    code alone where the server never started: its port was busy)."""
    code = await _serve(engine_config, server_config, specs)
    if code != BIND_FAILED:
        exit_process(code)  # the engines are stopped and their files closed
    return code


async def _serve(engine_config: EngineConfig, server_config: ServerConfig,
                 specs: list[ModelSpec] | None = None) -> int:
    """Serve until a signal; 1 if the engine failed to start, else 0. A signal starts the
    drain (``server/shutdown.py``): new requests get 503, running ones have
    ``shutdown_grace`` seconds to finish, then end with their API's error event; a second
    signal ends the wait at once. ``specs``: several models (``server/management/pool.py``)."""
    try:
        # Bind before the engine starts loading, so a busy port fails fast and cleanly.
        family = socket.AF_INET6 if ":" in server_config.host else socket.AF_INET
        sock = socket.create_server((server_config.host, server_config.port), family=family)
    except OSError as exc:
        typer.echo(f"error: cannot listen on {server_config.host}:{server_config.port}: "
                   f"{exc.strerror or exc}", err=True)
        return BIND_FAILED
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal, stop, hurry)
    url = _url(server_config, sock.getsockname()[1])
    spinner = Spinner(f"loading {engine_config.model if specs is None else 'pinned models'} ...",
                      plain=True)

    def on_ready(state: ServerState) -> None:
        spinner.stop()
        (_banner if specs is None else _pool_banner)(state, url)

    models = None if specs is None else ModelPool(specs, budget_gb=engine_config.max_memory_gb)
    app = create_app(engine_config, server_config, on_ready=on_ready, models=models)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                           shutdown_timeout=CLOSE_TIMEOUT_S)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        if not app[STATE_KEY].is_ready:  # a pool without pinned models is ready at once
            spinner.start()
        code = await _wait(app, stop)
        spinner.stop()
        if code == 0:
            _bound_distributed_shutdown(server_config.shutdown_grace)
            typer.echo(f"shutting down: running requests get {server_config.shutdown_grace:g} s "
                       "(a second signal ends them now) ...", err=True)
            await drain(app[STATE_KEY].drain, server_config.shutdown_grace, hurry)
        return code
    finally:
        spinner.stop()
        await runner.cleanup()  # stops listening, closes connections, stops the engine


def _on_signal(stop: asyncio.Event, hurry: asyncio.Event) -> None:
    (hurry if stop.is_set() else stop).set()


async def _wait(app: web.Application, stop: asyncio.Event) -> int:
    state = app[STATE_KEY]
    failed = asyncio.create_task(state.start_failed.wait())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({failed, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for task in (failed, stopped):
        task.cancel()
    if state.start_error is None:
        return 0
    from ..models.loader import ModelLoadError  # the engine has imported it by now

    err = state.start_error
    typer.echo(f"error: the model failed to load: {first_line(err)}", err=True)
    # A model that cannot be found or read is bad input (2); anything else failed here (1).
    return 2 if isinstance(err, ModelLoadError) else 1
