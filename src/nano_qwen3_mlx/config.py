"""Engine and server settings: CLI flags > environment > a TOML config > defaults.

The TOML presets (``default``, ``production``) ship inside the package (``configs/``);
``--config`` takes a preset name or a path.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict

from .errors import InvalidRequestError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KV_DTYPE_HELP = ("KV cache storage: int8, int4 (group-wise quantized, read in place), float16, "
                 "bfloat16, float32 (default: the model's dtype)")
SPECULATIVE_HELP = ("speculative decoding: ngram (prompt lookup: drafts what followed the text's "
                    "last tokens earlier) or draft (a smaller model of the same tokenizer, "
                    "--draft-model) or mtp (the checkpoint's multi-token prediction head, "
                    "Qwen3.5 / Qwen3-Next with mtp.* weights); drafts are verified in the same "
                    "step, output unchanged at any temperature")
PIPELINE_HELP = ("under mlx.launch: split the model by layers across the ranks (pipeline parallel, "
                 "for a slow link such as Ethernet) instead of within every layer (tensor "
                 "parallel, the default, for a fast link such as Thunderbolt)")
DRAFT_MODEL_HELP = ("with --speculative draft: the draft model (alias, directory, .gguf), "
                    "loaded like the model; it must share the model's tokenizer")
PRESETS_DIR = Path(__file__).resolve().parent / "configs"
# Default thinking budgets (tokens) per reasoning effort level.
EFFORT_BUDGETS = {"minimal": 128, "low": 512, "medium": 2048, "high": 8192, "xhigh": 16384}


def preset_names() -> list[str]:
    """The config presets shipped with the package."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def read_toml(path: str | Path | None, section: str) -> dict[str, Any]:
    """Top-level keys plus the keys of ``[section]`` from a TOML file or preset name."""
    path = Path(path) if path is not None else PRESETS_DIR / "default.toml"
    if not path.is_file() and (PRESETS_DIR / f"{path}.toml").is_file():
        path = PRESETS_DIR / f"{path}.toml"
    if not path.is_file():
        raise ValueError(f"config file not found: {path} (presets: {', '.join(preset_names())})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    _check_keys(data, path)
    flat = {k: v for k, v in data.items() if not isinstance(v, dict) and k != "models"}
    flat.update(data.get(section, {}))
    return flat


def read_models(path: str | Path | None) -> list[dict[str, Any]]:
    """The ``[[models]]`` entries of a config file (several models behind one server)."""
    if path is None:
        return []
    read_toml(path, "engine")  # the same checks and errors as the settings
    path = Path(path) if Path(path).is_file() else PRESETS_DIR / f"{path}.toml"
    models = tomllib.loads(path.read_text()).get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ValueError(f"config file {path}: `models` must be a list of tables ([[models]])")
    return models


def _check_keys(data: dict[str, Any], path: Path) -> None:
    """Raise ``InvalidRequestError`` naming the first key of a config file that is no engine
    or server setting (a misspelt key would otherwise be ignored)."""
    sections = {"engine": EngineConfig.option_names(), "server": ServerConfig.option_names()}
    for key, value in data.items():
        if key == "models" and isinstance(value, list):  # [[models]]: read_models checks it
            continue
        if isinstance(value, dict):
            _check_name(key, set(sections), f"config file {path}: unknown section")
            for name in value:
                _check_name(name, sections[key], f"config file {path}: unknown key in [{key}]")
        else:
            _check_name(key, sections["engine"] | sections["server"],
                        f"config file {path}: unknown key")


def _check_name(name: str, known: set[str], what: str) -> None:
    """``InvalidRequestError`` ``"<what> 'name'"`` (with the closest known name) unless known."""
    if name in known:
        return
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise InvalidRequestError(f"{what} {name!r}{hint}", field=name)


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, case_sensitive=False)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **flags: Any):
        """Build settings; ``flags`` whose value is None are treated as not given.

        Raises ``ValueError`` with a one-line message for a bad value or config file.
        """
        given = {k: v for k, v in flags.items() if v is not None}
        for name in given:
            _check_name(name, cls.option_names(), f"unknown {cls.section} option")
        toml = read_toml(config_file, cls.section)

        class _WithToml(cls):  # type: ignore[valid-type, misc]
            @classmethod
            def settings_customise_sources(cls_, settings_cls, init_settings, env_settings, **_):
                return (init_settings, env_settings, InitSettingsSource(settings_cls, toml))

        try:
            return cls.model_validate(_WithToml(**given).model_dump())
        except ValidationError as exc:  # one line a CLI can print as it is
            err = exc.errors()[0]
            loc, msg = ".".join(map(str, err["loc"])), err["msg"].removeprefix("Value error, ")
            # A check across fields has no loc: its message starts with the field it names.
            raise ValueError(f"invalid {loc}: {msg}" if loc else f"invalid {msg}") from None

    @classmethod
    def option_names(cls) -> set[str]:
        """Every name a setting may be given by (field names and their aliases)."""
        names = set(cls.model_fields)
        for info in cls.model_fields.values():
            alias = info.validation_alias
            if isinstance(alias, AliasChoices):
                names |= {a for a in alias.choices if isinstance(a, str)}
        return names


class EngineConfig(_Settings):
    """Everything the engine needs: model, dtype, KV cache and scheduler limits."""

    section: ClassVar[str] = "engine"

    model: str = Field("qwen3-0.6b", validation_alias=AliasChoices("model", "model_name"))
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantize: Literal[4, 8] | None = None
    device: Literal["gpu", "cpu", "auto"] = "auto"
    # Tokens per KV block; None: default_block_size() for the device (64 on CPU, 16 on a GPU).
    block_size: int | None = Field(None, ge=1, le=1024)
    # How the KV cache stores K/V: None = the model's dtype; int8/int4 = group-wise affine
    # quantized (as mx.quantize, groups along head_dim), read in place by decode attention.
    kv_cache_dtype: Literal["int8", "int4", "float16", "bfloat16", "float32"] | None = None
    # A fixed pool of this many blocks (no growth); None: the pool grows on demand up to a cap.
    num_kv_blocks: int | None = Field(None, ge=2)
    # Hard cap on the KV pool; it starts small and grows on demand up to here, never beyond.
    kv_cache_gb: float | None = Field(None, gt=0)
    # Hard cap on weights + KV pool (the KV cap is what is left after the weights).
    max_memory_gb: float | None = Field(None, gt=0)
    # Share of the memory left after weights that the KV cap may take when no cap is given.
    kv_cache_fraction: float = Field(0.25, gt=0, le=0.95)
    # Seconds the engine must be idle before a grown pool is shrunk back to its start size.
    kv_shrink_idle_s: float = Field(30.0, ge=0)
    # max_tokens when a request leaves it out (the context length still stops it earlier).
    max_tokens_default: int = Field(2048, ge=1)
    # Sampling defaults that override the model's generation_config.json (e.g. temperature).
    sampling_defaults: dict[str, int | float] = Field(default_factory=dict)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16)
    # While streams decode, prompt chunks are sized so a step takes at most this many times
    # a decode-only step (inter-token p99 <= about this x p50); None: the whole budget.
    max_itl_ratio: float | None = Field(None, gt=1.0)
    max_model_len: int | None = Field(None, ge=16)
    enable_prefix_caching: bool = True
    # Hybrid models (Qwen3.5, Qwen3-Next): tokens between snapshots of the recurrent states
    # taken while a prompt is prefilled (a multiple of block_size); a shared prefix is reused
    # up to its last snapshot. 256: see engine/state_manager.py for the measurement.
    state_snapshot_interval: int = Field(256, ge=1)
    # Hybrid models: most snapshots kept (each one sequence's whole state); None: a quarter of
    # the cache memory budget's worth.
    max_state_snapshots: int | None = Field(None, ge=0)
    # The prefix cache's disk tier (engine/disk_tier.py): full KV blocks persisted here, at
    # most prefix_cache_disk_gb GB; only the size given: a folder under the user cache dir.
    prefix_cache_dir: str | None = None
    prefix_cache_disk_gb: float | None = Field(None, gt=0)
    max_queue_size: int = Field(1024, ge=1)
    # Speculative decoding: "ngram" drafts tokens by prompt lookup (the sequence's last
    # tokens matched against its earlier text), "draft" by a smaller model of the same
    # tokenizer (draft_model; engine/draft_model.py), "mtp" by the checkpoint's multi-token
    # prediction head (Qwen3.5 / Qwen3-Next with mtp.* weights; engine/mtp.py); all are
    # verified inside the packed step. None: off. See engine/speculative.py.
    speculative: Literal["ngram", "draft", "mtp"] | None = None
    # The most tokens one sequence drafts per step (adaptive below this).
    num_speculative_tokens: int = Field(4, ge=1, le=16)
    # speculative="draft": the draft model (alias, directory, .gguf, hub id), loaded as the
    # target is (same dtype and quantize).
    draft_model: str | None = None
    # Under mlx.launch: split the model by layers (pipeline parallel: one hidden-state
    # transfer per rank and step, for a slow link) instead of within every layer (tensor
    # parallel: sums every layer over the ranks, for a fast link); one process: ignored.
    pipeline: bool = False

    @field_validator("sampling_defaults")
    @classmethod
    def _known_fields(cls, value: dict[str, int | float]) -> dict[str, int | float]:
        allowed = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r} (allowed: {', '.join(allowed)})")
        return value

    @model_validator(mode="after")
    def _draft_model_given(self) -> EngineConfig:
        if self.speculative == "draft" and not self.draft_model:
            raise ValueError("draft_model: speculative='draft' needs a draft model")
        if self.draft_model and self.speculative != "draft":
            raise ValueError("draft_model: only used with speculative='draft'")
        return self

    @field_validator("device", mode="before")
    @classmethod
    def _mps_is_gpu(cls, value: Any) -> Any:
        return "gpu" if isinstance(value, str) and value.lower() in ("mps", "metal", "cuda") else value

    @model_validator(mode="after")
    def _block_size_for_device(self) -> EngineConfig:
        if self.block_size is None:
            self.block_size = default_block_size(self.device)
        return self


def default_block_size(device: str = "auto") -> int:
    """Tokens per KV block where none is given: 64 where MLX runs on the CPU, 16 on a GPU.

    On the CPU, decode attention is one BLAS call per (sequence, KV head, block) for the
    scores and one for the values: 64-token blocks make a layer's decode attention at
    2K x 8 ~1.3x faster than 16 and are as fast at 512, where bigger blocks pay for their
    padding (README, "Decode attention and the KV block size"). On a GPU the block
    products run in one kernel and 16 keeps the padding and the copy-on-write of a
    reused prefix's last block small (not re-measured there).
    """
    import mlx.core as mx  # here, not at the top: the package loads its BLAS first

    cpu = device == "cpu" or (device == "auto" and mx.default_device() == mx.cpu)
    return 64 if cpu else 16


def engine_config(config: EngineConfig | None, model: str | None,
                  options: dict[str, Any]) -> EngineConfig:
    """The ``EngineConfig`` of ``LLM(...)`` / ``AsyncLLM(...)``: ``config`` as given, or built
    from ``model`` and ``options`` (an unknown option raises ``InvalidRequestError``)."""
    if config is None:
        try:
            return EngineConfig.load(model=model, **options)
        except InvalidRequestError:
            raise
        except ValueError as exc:  # a bad value: the same error a bad request gets
            field = str(exc).removeprefix("invalid ").split(":")[0]
            raise InvalidRequestError(str(exc), field=field or None) from None
    if options or model is not None:
        given = sorted(options) + (["model"] if model is not None else [])
        raise InvalidRequestError(f"give config or engine options, not both (got config and "
                                  f"{', '.join(given)})", field=given[0])
    return config


class ServerConfig(_Settings):
    """HTTP server settings."""

    section: ClassVar[str] = "server"

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    served_model_name: str | None = None
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    workers: int = Field(1, ge=1)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    request_timeout: float | None = Field(600.0, gt=0)
    # Seconds a shutdown (SIGTERM/SIGINT) lets running requests finish (server/shutdown.py).
    shutdown_grace: float = Field(30.0, ge=0)
    cors_origins: list[str] = Field(default_factory=list)
    log_prompts: bool = False
    # Several models: seconds a model may stay idle before it is unloaded (0 = never).
    model_ttl: float = Field(0.0, ge=0)
    # Thinking tokens per reasoning effort (chat reasoning_effort, Responses reasoning.effort),
    # capped at half of a request's max_tokens; "none" is always 0.
    reasoning_effort_budgets: dict[str, int] = Field(default_factory=lambda: dict(EFFORT_BUDGETS))

    @field_validator("reasoning_effort_budgets")
    @classmethod
    def _known_efforts(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(EFFORT_BUDGETS))
        if unknown:
            raise ValueError(f"unknown effort {unknown[0]!r} (allowed: {', '.join(EFFORT_BUDGETS)})")
        if any(v < 0 for v in value.values()):
            raise ValueError("budgets must be >= 0")
        return {**EFFORT_BUDGETS, **value}

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value
