"""Thinking budgets on the OpenAI APIs: chat ``reasoning_effort``, Responses
``reasoning.effort`` and the explicit ``thinking_budget`` extension, as the engine's
``SamplingParams.thinking_budget`` (the engine forces ``</think>`` once it is spent).

An effort level takes its budget from ``ServerConfig.reasoning_effort_budgets``, capped at
half of ``max_tokens`` so the answer (and any forced structure) keeps the other half. An
explicit budget must be below ``max_tokens``, as Anthropic requires of ``budget_tokens``.
"""

from __future__ import annotations

from typing import Any

from ..errors import bad_request


def thinking_budget(*, effort: str | None, explicit: int | None, max_tokens: int | None,
                    budgets: dict[str, int], effort_field: str) -> int | None:
    """The thinking budget of a request (None: unbounded); 400 for a conflict or an explicit
    budget that leaves no room for the answer.

    ``effort`` ``"none"`` is a zero budget (the block closes at once); ``max_tokens`` is the
    most new tokens the request may take (the client's or the server's default).
    """
    if explicit is not None and effort is not None:
        raise bad_request(f"give {effort_field} or thinking_budget, not both", "thinking_budget")
    if explicit is not None:
        if max_tokens is not None and explicit >= max_tokens:
            raise bad_request(f"thinking_budget ({explicit}) must be less than max_tokens "
                              f"({max_tokens}): the answer needs room", "thinking_budget")
        return explicit
    if effort is None:
        return None
    if effort == "none":
        return 0
    if effort not in budgets:
        raise bad_request(f"{effort_field} {effort!r} has no budget on this server "
                          f"(configured: {', '.join(sorted(budgets))})", effort_field)
    budget = budgets[effort]
    return budget if max_tokens is None else min(budget, max_tokens // 2)


def default_max_tokens(engine: Any, requested: int | None) -> int | None:
    """``requested``, else the engine's default ``max_tokens`` (None when it has none)."""
    if requested is not None:
        return requested
    return (getattr(engine, "sampling_defaults", None) or {}).get("max_tokens")


def budget_fields(call: Any, explicit: int | None, max_tokens: int | None,
                  effort: str | None = None, effort_field: str = "reasoning_effort") -> dict[str, Any]:
    """``{"thinking_budget": n}`` for an API call's body (``{}`` when it sets no budget)."""
    budget = thinking_budget(effort=effort, explicit=explicit,
                             max_tokens=default_max_tokens(call.engine, max_tokens),
                             budgets=call.state.config.reasoning_effort_budgets,
                             effort_field=effort_field)
    return {} if budget is None else {"thinking_budget": budget}
