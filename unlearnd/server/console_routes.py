"""The admin console at `/admin`: one server-rendered page, a small script and a style sheet, no CDN.

The page and its files hold no data, so they load without a key; the script asks for the admin key and
calls the admin API with it (the key stays in the page's memory). A strict Content-Security-Policy
allows only these files, so nothing injected into a request's name could run."""

from __future__ import annotations

import html
from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from unlearnd.methods import METHODS

router = APIRouter(include_in_schema=False)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@cache
def _asset(name: str) -> str:
    return resources.files("unlearnd.server").joinpath(f"console/{name}").read_text("utf-8")


@router.get("/admin")
async def console_page() -> HTMLResponse:
    """The page: no data in it (the model's name too is read after logging in)."""
    methods = sorted(METHODS, key=_first_refuse)
    options = "".join(f'<option value="{html.escape(m)}">{html.escape(m)}</option>' for m in methods)
    return HTMLResponse(_asset("index.html").replace("{{METHOD_OPTIONS}}", options), headers=SECURITY_HEADERS)


def _first_refuse(method: str) -> tuple[bool, str]:
    return method != "refuse", method  # the default method first


@router.get("/admin/console.js")
async def console_script() -> Response:
    return Response(_asset("console.js"), media_type="text/javascript", headers=SECURITY_HEADERS)


@router.get("/admin/console.css")
async def console_style() -> Response:
    return Response(_asset("console.css"), media_type="text/css", headers=SECURITY_HEADERS)
