"""Error responses: every error the server sends is OpenAI's error JSON, counted by status."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from unlearnd.guardrail import prometheus
from unlearnd.server.protocol import openai_error


def error_response(
    status: int, message: str, type_: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    prometheus.ERRORS.labels(status=str(status)).inc()
    return JSONResponse(openai_error(message, type_, code, param), status_code=status)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request: " + str(first.get("msg", "")), None
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param
