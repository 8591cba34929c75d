"""The ASGI middleware in front of every route: host, origin, credentials and body size."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers


def is_loopback(host: str | None) -> bool:
    """True for 'localhost' and loopback addresses (a Host header's port and brackets are allowed)."""
    name = urlsplit(f"//{host}").hostname if host else None
    if name is None:
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware, before every route: a loopback server answers only to loopback host names (DNS
    rebinding), cross-origin requests are refused unless allowed, --api-auth is checked, and the body
    is read up to the size limit (then handed on)."""

    def __init__(self, app, host: str, origins: list[str], api_auth: str | None, max_body: int) -> None:
        self.app = app
        self.loopback = is_loopback(host)  # the address the server listens on
        self.origins = set(origins)
        self.credentials = api_auth.encode() if api_auth else None
        self.max_body = max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self.refusal(headers)
        body = b""
        if refusal is None:
            body, refusal = await self.read_body(headers, receive)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # after the body: the disconnect, when it comes
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def refusal(self, headers: Headers) -> Response | None:
        host, origin = headers.get("host"), headers.get("origin")
        if self.loopback and not is_loopback(host):
            return refuse(403, f"host {host!r} refused: this server answers on loopback names only")
        if origin is not None and origin not in self.origins and origin not in (f"http://{host}", f"https://{host}"):
            return refuse(403, f"cross-origin request from {origin!r} refused; allow it with --cors-allow-origin")
        if self.credentials is not None and not self.authorized(headers.get("authorization", "")):
            return refuse(401, "authentication required", {"WWW-Authenticate": 'Basic realm="latentforge"'})
        return None

    def authorized(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return scheme.lower() == "basic" and hmac.compare_digest(given, self.credentials)

    async def read_body(self, headers: Headers, receive) -> tuple[bytes, Response | None]:
        too_large = refuse(413, f"request body over the limit of {self.max_body} bytes")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return b"", too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client has gone
                return b"", Response(status_code=499)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return b"", too_large
            if not message.get("more_body", False):
                return b"".join(chunks), None


def refuse(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)
