"""What every endpoint does first: parse the body, check readiness and the model name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from aiohttp import web
from pydantic import BaseModel

from ..state import STATE_KEY, AsyncLLMLike, ServerState
from .params import parse_body

Body = TypeVar("Body", bound=BaseModel)


class ClientGone(Exception):
    """The client closed the connection; its requests are aborted."""


@dataclass(slots=True)
class RunRecord:
    """What the access log and response headers report about a request's generation."""

    sampling: str  # the effective settings of its first choice (X-Sampling-Params)
    tokens: int = 0  # tokens generated, also for aborted and timed-out requests
    client_gone: bool = False  # the client left mid-stream (logged as 499)


RUN_KEY = web.RequestKey("run", RunRecord) if hasattr(web, "RequestKey") else "run"


@dataclass(slots=True)
class ApiCall(Generic[Body]):
    """One HTTP API request after its common checks: its body, the engine, the model name."""

    http: web.Request
    state: ServerState
    engine: AsyncLLMLike
    body: Body
    model: str  # the served model name the response reports

    @property
    def client_gone(self) -> bool:
        transport = self.http.transport
        return transport is None or transport.is_closing()


async def open_call(http: web.Request, body_type: type[Body]) -> ApiCall[Body]:
    """Parse and validate the body (400), then 503 unless ready, then 404 for another model."""
    state = http.app[STATE_KEY]
    body = await parse_body(http, body_type)
    model, engine = await state.engine_for(getattr(body, "model", None))
    return ApiCall(http, state, engine, body, model)
