"""What the routers share: the running server's settings, engine, registry and pipeline."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from unlearnd.engine.base import Engine
from unlearnd.guardrail.pipeline import GuardrailPipeline
from unlearnd.registry import Registry
from unlearnd.server.settings import ServerSettings


@dataclass
class ServerState:
    settings: ServerSettings
    engine: Engine
    registry: Registry
    pipeline: GuardrailPipeline


def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the state the lifespan built (routers are only reached after start-up)."""
    return request.app.state.unlearnd
