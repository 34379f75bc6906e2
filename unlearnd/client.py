"""One HTTP client of a running unlearnd server: the OpenAI calls, scoring, classification and the admin API.

The CLI (`--url`), the served model under test and the benchmarks all talk to a server through it.
Transport errors and 5xx answers are retried with backoff; a 4xx raises at once with the server's
OpenAI-style error message (it is the caller's fault, retrying will not help).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx


class ServerError(RuntimeError):
    """The server answered with an error, or a forget request failed to become active."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def error_message(response: httpx.Response) -> str:
    """The `error.message` of an OpenAI-style error body, else the raw text."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


class UnlearndClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 2,
        transport: httpx.BaseTransport | None = None,
        headers: dict[str, str] | None = None,
    ):
        """`headers` go with every request (the evidence battery's `x-unlearnd-priority: background`)."""
        self.base_url = base_url.rstrip("/")
        self.admin_key = admin_key
        self.retries = retries
        headers = {**(headers or {}), **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s, headers=headers, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> UnlearndClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------

    def send(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> httpx.Response:
        """One call, retried on transport errors and 5xx; a 4xx raises `ServerError` at once."""
        headers = dict(kwargs.pop("headers", {}) or {})
        if admin and self.admin_key:
            headers["Authorization"] = f"Bearer {self.admin_key}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                last = exc
            else:
                if response.status_code < 400:
                    return response
                hint = " (no admin key given: --admin-key / UNLEARND_ADMIN_KEY)" if admin and not self.admin_key else ""
                error = ServerError(
                    f"{method} {path}: HTTP {response.status_code}: {error_message(response)}{hint}",
                    response.status_code,
                )
                if response.status_code < 500:
                    raise error
                last = error
            if attempt < self.retries:
                time.sleep(0.5 * 2**attempt)
        raise ServerError(str(last), getattr(last, "status", None)) from last

    def json(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> Any:
        response = self.send(method, path, admin=admin, **kwargs)
        return response.json() if response.content else {}

    # -- serving ---------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The server's health; the forget-request counts are in it only for the admin key."""
        return self.json("GET", "/health", admin=True)

    def models(self) -> list[str]:
        return [str(card["id"]) for card in self.json("GET", "/v1/models").get("data") or []]

    def metrics_text(self) -> str:
        return self.send("GET", "/metrics", admin=True).text

    def metrics(self, *names: str) -> dict[str, float]:
        """The values of unlabelled samples on /metrics (`name value`), by name; a name not there is left out."""
        wanted, found = set(names), {}
        for line in self.metrics_text().splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                found[name] = float(value.split()[0])
        return found

    def chat(self, model: str, messages: Sequence[dict], **params: Any) -> tuple[dict[str, Any], httpx.Headers]:
        """One chat completion: (response body, response headers, which carry the route)."""
        response = self.send(
            "POST", "/v1/chat/completions", json={"model": model, "messages": list(messages), **params}
        )
        return response.json(), response.headers

    def score(
        self,
        continuation: str,
        messages: Sequence[dict] | None = None,
        prompt: str | None = None,
        model: str | None = None,
        route_from: str | None = None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"continuation": continuation}
        if route_from is not None:
            payload["route_from"] = route_from
        payload.update({"messages": list(messages)} if messages is not None else {"prompt": prompt})
        if model:
            payload["model"] = model
        return self.json("POST", "/v1/unlearning/score", admin=True, json=payload)  # admin-only by default

    def classify(self, inputs: Sequence[str | Sequence[dict]]) -> list[dict[str, Any]]:
        """Flagged, score and route per input (and the matched requests, with the admin key)."""
        headers = {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}
        return self.json("POST", "/v1/unlearning/classify", json={"input": list(inputs)}, headers=headers)["data"]

    def engine_input(self, model: str, messages: Sequence[dict], **params: Any) -> dict[str, Any]:
        """What the engine would be given for this chat request (admin): route, token ids, prompt
        embeddings or LoRA adapter; nothing is generated."""
        body = {"model": model, "messages": list(messages), **params}
        return self.json("POST", "/v1/unlearning/engine-input", admin=True, json=body)

    # -- forget requests (admin) -------------------------------------------------------------------

    def add_request(self, spec: dict[str, Any]) -> dict[str, Any]:
        data = self.json("POST", "/v1/unlearning/requests", admin=True, json=spec)
        if not data.get("id"):
            raise ServerError(f"forget request answer has no id: {str(data)[:300]}")
        return data

    def list_requests(self) -> list[dict[str, Any]]:
        return self.json("GET", "/v1/unlearning/requests", admin=True)["data"]

    def get_request(self, request_id: str) -> dict[str, Any]:
        return self.json("GET", f"/v1/unlearning/requests/{request_id}", admin=True)

    def retrain_request(self, request_id: str) -> dict[str, Any]:
        return self.json("POST", f"/v1/unlearning/requests/{request_id}/retrain", admin=True)

    def evidence(self, request_id: str, format: str = "json") -> Any:
        """The request's evidence: JSON (a dict), markdown (text) or png (bytes)."""
        path = f"/v1/unlearning/requests/{request_id}/evidence"
        response = self.send("GET", path, admin=True, params={"format": format})
        return response.json() if format == "json" else response.text if format == "markdown" else response.content

    def rerun_evidence(self, request_id: str) -> dict[str, Any]:
        return self.json("POST", f"/v1/unlearning/requests/{request_id}/evidence", admin=True)

    def remove_request(self, request_id: str, purge: bool = False) -> dict[str, Any]:
        return self.json(
            "DELETE", f"/v1/unlearning/requests/{request_id}", admin=True, params={"purge": str(purge).lower()}
        )

    def wait_active(
        self,
        request_id: str,
        timeout_s: float = 1800.0,
        poll_s: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> dict[str, Any]:
        """Poll until the request is active; a failed (or inactive) request raises with its error text."""
        deadline = time.monotonic() + timeout_s
        while True:
            data = self.get_request(request_id)
            status = data.get("status")
            if status == "active":
                return data
            if status in ("failed", "inactive"):
                raise ServerError(f"forget request {request_id} is {status}: {data.get('error')}")
            if time.monotonic() > deadline:
                raise ServerError(f"forget request {request_id} still {status!r} after {timeout_s:.0f}s")
            sleep(poll_s)
