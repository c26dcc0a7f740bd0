"""The browser demo: `GET /demo` on the WebSocket port (docs/streaming.md, "Browser demo").

One self-contained page, `demo.html` (package data: inline CSS and JS, its AudioWorklet
built from inline source through a Blob URL), read once and served with a
Content-Security-Policy that lets it run exactly its own inline script and style (named
by their SHA-256), the blob: worklet module, and connect to its own origin only (CSP
Level 3 'self' covers ws:/wss: of the page's host and port). Nothing else loads.
"""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Response

DEMO_PATH = "/demo"


def _hashes(html: str, tag: str) -> str:
    """CSP hash sources of every attribute-less `<tag>` block (the executed script and the
    style; the worklet's source is a `<script type="text/plain">` data block, never run)."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                    for b in blocks)


@dataclass(frozen=True)
class DemoPage:
    html: str
    csp: str


@cache
def demo_page() -> DemoPage:
    html = files(__package__).joinpath("demo.html").read_text("utf-8")
    csp = "; ".join((
        "default-src 'none'",
        f"script-src {_hashes(html, 'script')} blob:",  # blob: the AudioWorklet module
        f"style-src {_hashes(html, 'style')}",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ))
    return DemoPage(html, csp)


def demo_response(connection: ServerConnection) -> Response:
    """The page, 200, as HTML with its policy (no caching: a new server's page is seen
    at once; no referrer: a `?token=` in the page's address goes nowhere)."""
    page = demo_page()
    response = connection.respond(200, page.html)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "text/html; charset=utf-8"
    response.headers["Content-Security-Policy"] = page.csp
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response
