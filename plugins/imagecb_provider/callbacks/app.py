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

:func:`create_app` also moves the token out of the request path before anything logs it: the
path becomes ``.../callbacks/***`` in place, which Airflow's access log (and uvicorn's) then
print, and the route reads the token from the request scope.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from imagecb_provider.callbacks.receiver import CallbackReceiver, ReceiverError
from imagecb_provider.callbacks.store import MAX_PAGE

log = logging.getLogger(__name__)

#: Where :class:`RedactCallbackTokens` puts the token it took out of the path.
TOKEN_SCOPE_KEY = "imagecb.callback_token"
REDACTED = "***"
#: Attribute of ``app.state`` holding the app's receiver.
RECEIVER_STATE = "imagecb_callback_receiver"
_RESERVED = frozenset({"lookup", "events", "health", "cursors", REDACTED})
_TOKEN_PATH = re.compile(r"^(?P<head>.*/callbacks/)(?P<token>[^/]+)$")

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
        log.log(level, "Refused %s with HTTP %d: %s", what, error.status_code, error.detail)
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
    after: Annotated[int | None, Query(ge=0)] = None,
    wait: Annotated[float, Query(ge=0)] = 0.0,
    purpose: Annotated[str | None, Query(pattern="^(ti|asset)$")] = None,
    label: Annotated[str | None, Query(max_length=100)] = None,
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
    ASGI middleware that takes the token out of a callback request's path before it is logged.

    The scope is changed in place, so middleware wrapping the mounted app (Airflow's access log)
    sees ``.../callbacks/***`` too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            match = _TOKEN_PATH.match(scope.get("path", ""))
            if match and match["token"] not in _RESERVED:
                scope[TOKEN_SCOPE_KEY] = match["token"]
                scope["path"] = match["head"] + REDACTED
                raw = scope.get("raw_path")
                if isinstance(raw, bytes) and b"/callbacks/" in raw:
                    scope["raw_path"] = raw[: raw.rindex(b"/callbacks/")] + f"/callbacks/{REDACTED}".encode()
        await self.app(scope, receive, send)


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
    app.add_middleware(RedactCallbackTokens)
    return app
