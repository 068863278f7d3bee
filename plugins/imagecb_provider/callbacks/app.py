"""
The callback receiver over HTTP: :data:`router` and :func:`create_app`.

Routes (under ``/imagecb`` once mounted; see ``docs/callbacks.md``):

* ``POST /callbacks/{token}``: a vendor callback (the token is the capability; see
  :mod:`~imagecb_provider.callbacks.receiver` for every check and its status code);
* ``GET /callbacks/events?after=&wait=&purpose=&label=&limit=``: long-poll for recorded callbacks;
* ``POST /callbacks/lookup``: the callbacks already recorded for a list of remote task ids;
* ``GET|PUT /callbacks/cursors/{name}``: a consumer's durable position (the event trigger's);
* ``GET /callbacks/health``: whether the callback table can be read.

The events, lookup and cursor routes need a ``watch`` bearer token. Airflow does not
authenticate plugin apps, so every route authenticates itself.

:func:`create_app` also moves the token out of the request path before anything logs it, for
every method and shape of path (:class:`RedactCallbackTokens`): the path becomes
``.../callbacks/***`` in place, which Airflow's access log (and uvicorn's) then print, and the
route reads the token from the request scope.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from imagecb_provider.callbacks.receiver import CallbackReceiver, ReceiverError
from imagecb_provider.callbacks.store import MAX_PAGE
from imagecb_provider.callbacks.tokens import LABEL_PATTERN, TOKEN_SHAPE

log = logging.getLogger(__name__)

#: Where :class:`RedactCallbackTokens` puts the token it took out of the path.
TOKEN_SCOPE_KEY = "imagecb.callback_token"
REDACTED = "***"
#: Attribute of ``app.state`` holding the app's receiver.
RECEIVER_STATE = "imagecb_callback_receiver"
#: The routes beside ``/{token}``, and how many path segments each has after ``/callbacks``.
_ROUTES = {"lookup": 1, "events": 1, "health": 1, "cursors": 2}
#: The largest id a cursor can hold (a 64-bit column).
MAX_CURSOR = 2**63 - 1

router = APIRouter(prefix="/callbacks", tags=["imagecb callbacks"])

_default_receiver: CallbackReceiver | None = None


def default_receiver() -> CallbackReceiver:
    """Return the receiver used when the router is included in an app that did not set one."""
    global _default_receiver
    if _default_receiver is None:
        _default_receiver = CallbackReceiver()
    return _default_receiver


def get_receiver(request: Request) -> CallbackReceiver:
    """Return the app's receiver (a FastAPI dependency)."""
    return getattr(request.app.state, RECEIVER_STATE, None) or default_receiver()


Receiver = Annotated[CallbackReceiver, Depends(get_receiver)]


async def _respond(work: Callable[[], Awaitable[dict[str, Any]]], what: str) -> JSONResponse:
    """Run ``work`` and answer its JSON, or the status and reason of the :class:`ReceiverError` it raised."""
    try:
        return JSONResponse(await work())
    except ReceiverError as error:
        # what an operator should look at: a wrong webhook key, an unbound task id, expired URLs,
        # failures; forged or malformed requests from strangers stay at INFO
        notable = error.status_code >= 500 or error.status_code in (409, 410)
        notable = notable or (what == "a callback" and error.status_code == 401)
        level = logging.WARNING if notable else logging.INFO
        log.log(level, "Refused %s with HTTP %d: %s", what, error.status_code, error.reason)
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)


# --------------------------------------------------------------------------- routes
@router.get("/health")
async def health(receiver: Receiver) -> JSONResponse:
    """Answer 200 when the callback table can be read, else 503."""
    return await _respond(receiver.health, "a health check")


@router.get("/events")
async def events(
    request: Request,
    receiver: Receiver,
    after: Annotated[int | None, Query(ge=0, le=MAX_CURSOR)] = None,
    wait: Annotated[float, Query(ge=0, allow_inf_nan=False)] = 0.0,
    purpose: Annotated[str | None, Query(pattern="^(ti|asset)$")] = None,
    label: Annotated[str | None, Query(max_length=100, pattern=LABEL_PATTERN.pattern)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
) -> JSONResponse:
    """Long-poll the callbacks recorded after ``after`` (watch token)."""

    async def work() -> dict[str, Any]:
        claims = await receiver.authenticate_watcher(request.headers)
        return await receiver.events(
            claims, after=after, wait=wait, purpose=purpose, label=label, limit=limit
        )

    return await _respond(work, "an events request")


@router.post("/lookup")
async def lookup(request: Request, receiver: Receiver) -> JSONResponse:
    """Return the callbacks already recorded for some remote task ids (watch token)."""

    async def work() -> dict[str, Any]:
        return await receiver.lookup(await receiver.authenticate_watcher(request.headers), request)

    return await _respond(work, "a lookup")


@router.get("/cursors/{name}")
async def get_cursor(name: str, request: Request, receiver: Receiver) -> JSONResponse:
    """Return a consumer's stored position (watch token)."""

    async def work() -> dict[str, Any]:
        return await receiver.cursor(await receiver.authenticate_watcher(request.headers), name)

    return await _respond(work, "a cursor read")


@router.put("/cursors/{name}")
async def put_cursor(name: str, request: Request, receiver: Receiver) -> JSONResponse:
    """Move a consumer's position forward (watch token)."""

    async def work() -> dict[str, Any]:
        claims = await receiver.authenticate_watcher(request.headers)
        return await receiver.advance_cursor(claims, name, request)

    return await _respond(work, "a cursor update")


@router.post("/{token}")
async def receive_callback(token: str, request: Request, receiver: Receiver) -> JSONResponse:
    """Record a vendor callback posted to a callback URL."""
    token = request.scope.get(TOKEN_SCOPE_KEY, token)

    async def work() -> dict[str, Any]:
        return (await receiver.receive(token, request)).to_json()

    return await _respond(work, "a callback")


# ------------------------------------------------------------------------- the app
class RedactCallbackTokens:
    """
    ASGI middleware that takes a callback token out of the request path before anything logs it.

    Every method and every shape of path under ``{prefix}/callbacks/``: one segment that is not
    one of the other routes is a token, whatever surrounds it (a trailing slash, repeated or
    percent-encoded slashes, ``.`` and ``..``). It moves to the request scope and the path becomes
    ``{prefix}/callbacks/***``, so a POST is served as is (no redirect, whose ``Location`` would
    carry the token) and any other method gets its 405 with the redacted path. Longer unknown
    paths are redacted whole, and a segment of a token's shape anywhere else too. The scope is
    changed in place, so what wraps the app (Airflow's access log, uvicorn's) prints the redacted
    path; a response header that would still carry the token is scrubbed too.

    Mounted by the plugin, it sees only requests the API server routed to ``/imagecb``; as a root
    middleware of the API server (``prefix="/imagecb"``) it also covers paths that never reach the
    mount, such as ``//imagecb/callbacks/{token}``.

    :param app: the app to wrap.
    :param prefix: the path the routes are under, below the scope's ``root_path``: empty when
        mounted by the plugin (``/imagecb`` is then the root path), ``/imagecb`` when standalone
        or in front of the whole API server.
    """

    def __init__(self, app: ASGIApp, prefix: str = "") -> None:
        self.app = app
        self.head = [segment for segment in prefix.split("/") if segment] + ["callbacks"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = self.redact(scope) if scope["type"] == "http" else None
        # only what looks like a token: scrubbing a stranger's "1" would mangle every header
        if not token or not TOKEN_SHAPE.fullmatch(token):
            await self.app(scope, receive, send)
            return
        needle = token.encode()

        async def scrubbing_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    (name, value.replace(needle, REDACTED.encode())) for name, value in message["headers"]
                ]
            await send(message)

        await self.app(scope, receive, scrubbing_send)

    def redact(self, scope: Scope) -> str | None:
        """
        Redact ``scope``'s path in place when it may hold a token; return what was taken out.

        :return: the token (the one segment after ``/callbacks``), ``""`` when a longer path or
            a token-shaped segment elsewhere was redacted, ``None`` when the path was left alone.
        """
        path, root = scope.get("path", ""), scope.get("root_path", "") or ""
        under_root = bool(root) and path.startswith(root)
        base = root if under_root else ""
        segments = _resolved(path[len(base) :].split("/"))
        size = len(self.head)
        rest = segments[size:] if segments[:size] == self.head else []
        if rest and _ROUTES.get(rest[0]) != len(rest):  # not one of the other routes: a token
            canonical = "/" + "/".join([*self.head, REDACTED])
            if rest == [REDACTED] and path.endswith(canonical):
                return None  # redacted already (by this middleware in front of the API server)
            _set_path(scope, base + canonical)
            if len(rest) != 1:
                return ""
            scope[TOKEN_SCOPE_KEY] = rest[0]
            return rest[0]
        if not any(TOKEN_SHAPE.fullmatch(segment) for segment in segments):
            return None
        # a token somewhere else (a mistyped or rewritten URL): kept out of the log all the same
        shown = (REDACTED if TOKEN_SHAPE.fullmatch(segment) else segment for segment in segments)
        _set_path(scope, base + "/" + "/".join(shown))
        return ""


def _resolved(segments: list[str]) -> list[str]:
    """The non-empty path segments once ``.`` and ``..`` are resolved, as a client would have."""
    resolved: list[str] = []
    for segment in segments:
        if segment == "..":
            if resolved:
                resolved.pop()
        elif segment and segment != ".":
            resolved.append(segment)
    return resolved


def _set_path(scope: Scope, path: str) -> None:
    scope["path"] = path
    scope["raw_path"] = quote(path).encode()


def create_app(receiver: CallbackReceiver | None = None, *, prefix: str = "") -> FastAPI:
    """
    Build the receiver's FastAPI app.

    Mounted by the provider's plugin on the Airflow API server under ``/imagecb`` (``prefix``
    empty); the standalone server passes ``prefix="/imagecb"`` so both serve the same URLs.
    Nothing here touches the database: it is reached at the first request.

    :param receiver: the receiver to serve (a new one on Airflow's metadata database by default).
    :param prefix: a path the routes are served under, inside the app.
    """
    app = FastAPI(title="imagecb callbacks", docs_url=None, redoc_url=None, openapi_url=None)
    setattr(app.state, RECEIVER_STATE, receiver or CallbackReceiver())
    app.include_router(router, prefix=prefix)
    app.add_middleware(RedactCallbackTokens, prefix=prefix)
    return app
