"""Which models a server serves: ``--model`` given several times (``NAME=MODEL`` names one) or
a ``[[models]]`` list in the config file, each entry ``model`` plus optional ``alias``,
``ttl``, ``pinned`` and any engine setting (``quantize``, ``max_model_len``, ...)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ...config import EngineConfig, _check_name, read_models
from .pool import ModelSpec

ENTRY_KEYS = {"model", "alias", "ttl", "pinned"}


def model_entries(flags: list[str] | None, config_file: str | None) -> list[dict[str, Any]]:
    """The model entries of ``--model`` flags (these win) or of the config's ``[[models]]``."""
    if flags:
        return [_flag_entry(flag) for flag in flags]
    return read_models(config_file)


def _flag_entry(flag: str) -> dict[str, Any]:
    """``NAME=MODEL`` -> alias NAME; a plain value (which may hold ``=`` in a path) as is."""
    name, sep, target = flag.partition("=")
    if sep and name and "/" not in name and target:
        return {"model": target, "alias": name}
    return {"model": flag}


def model_specs(base: EngineConfig, entries: list[dict[str, Any]], ttl_s: float) -> list[ModelSpec]:
    """One ``ModelSpec`` per entry: ``base`` with the entry's engine settings; raises
    ``ValueError`` with a one-line message for a bad entry or a repeated id."""
    specs: list[ModelSpec] = []
    for number, entry in enumerate(entries, 1):
        where = f"[[models]] entry {number}"
        if "model" not in entry:
            raise ValueError(f"{where}: `model` is required")
        for key in entry:
            _check_name(key, ENTRY_KEYS | EngineConfig.option_names(), f"{where}: unknown key")
        overrides = {k: v for k, v in entry.items() if k not in ENTRY_KEYS - {"model"}}
        try:
            config = EngineConfig.model_validate(base.model_dump() | overrides)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(f"{where}: invalid {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        spec = ModelSpec(str(entry.get("alias") or entry["model"]), config,
                         ttl_s=float(entry.get("ttl", ttl_s)), pinned=bool(entry.get("pinned", False)))
        if spec.ttl_s < 0:
            raise ValueError(f"{where}: ttl must be >= 0 seconds")
        if any(s.id == spec.id for s in specs):
            raise ValueError(f"model id {spec.id!r} is given twice (give one an alias: NAME=MODEL)")
        specs.append(spec)
    return specs
