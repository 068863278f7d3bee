"""
``CallbackReceiver``: what the routes do, kept apart from FastAPI so each step is small.

A callback is checked in this order, and the first failure answers and changes nothing:

1. the token: its tag, with keys held in memory, before anything the token says is read or
   looked up; then its purpose, label, connection (403, one text for every reason) and expiry
   (410);
2. the content type (415) and the size, refused before the body is read whole (413);
3. the body: JSON that can be stored (400: not JSON, too deep, NUL or unpaired surrogates), with
   a task id in ``data.taskId`` or ``data.task_id`` (422 none; 400 not of the strict form) and a
   ``code`` and ``data.info`` of the callback's form (422);
4. the vendor's signature when the connection has a webhook key (401 missing, stale or wrong);
5. for a task instance token, the binding of the task id to the token's ledger slot (409);
6. then it is recorded, and committed, before the 200 answer (503 if the database fails, so
   the vendor retries).

No download, no status call and no waking of work happens in the request: waiters read the
recorded row through the events endpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from imagecb_provider import models
from imagecb_provider.callbacks.signing import (
    DEFAULT_REPLAY_WINDOW,
    WebhookSignatureError,
    check_webhook_signature,
)
from imagecb_provider.callbacks.store import MAX_LOOKUP, MAX_PAGE, CallbackStore, NewCallback
from imagecb_provider.callbacks.tail import DEFAULT_INTERVAL, Tail
from imagecb_provider.callbacks.tokens import (
    PURPOSE_ASSET,
    PURPOSE_TI,
    PURPOSE_WATCH,
    TOKEN_REFUSED,
    CallbackToken,
    CallbackTokenError,
    TaskInstanceRef,
    TokenKeyring,
)
from imagecb_provider.exceptions import ImageCbConfigurationError, InvalidRemoteTaskId
from imagecb_provider.utils.ledger import STATE_KEY, remote_ids_of_slot

if TYPE_CHECKING:
    from starlette.requests import Request

    from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A callback body is a few hundred bytes; anything above this is refused unread.
MAX_BODY_BYTES = 64 * 1024
MAX_LOOKUP_BODY_BYTES = 256 * 1024
MAX_WAIT = 55.0
CURSOR_NAME = re.compile(r"[A-Za-z0-9_.:*-]{1,250}")
#: Nesting a callback body may have (the vendor's have 3 levels); deeper is refused (400) before
#: anything recurses over it.
MAX_JSON_DEPTH = 32
#: A ``code`` is stored in a 32-bit column.
_CODE_RANGE = range(-(2**31), 2**31)
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


class ReceiverError(Exception):
    """
    A request the receiver refuses, with the HTTP status and a fixed reason safe to return and log.

    :param status_code: the HTTP status to answer.
    :param detail: the reason (never contains a token, a key or the body).
    :param headers: extra response headers.
    :param reason: what the server's log says instead of ``detail``, when the client must not
        learn it (why a token was refused); same rules as ``detail``.
    """

    def __init__(
        self,
        status_code: int,
        detail: str,
        headers: Mapping[str, str] | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = dict(headers or {})
        self.reason = reason or detail


# ------------------------------------------------------------------------- connections
class ConnectionCache:
    """
    The ``imagecb`` connections tokens name, read through Airflow's secrets backends and cached.

    Only ever asked for the connection of a token whose tag verified, so a stranger cannot steer a
    lookup; unknown connections (deleted while their URLs are out) are cached too. At most
    ``max_size`` entries, the least recently used dropped first. Blocking: call it from a thread.

    :param ttl: seconds a lookup (found or not) is reused.
    :param max_size: connections kept at most.
    """

    def __init__(self, ttl: float = 30.0, max_size: int = 256) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self._entries: OrderedDict[str, tuple[float, ImageCbConnectionSettings | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, conn_id: str) -> ImageCbConnectionSettings:
        """
        Return the settings of ``conn_id``, reading the connection when the cache has none fresh.

        :raises ReceiverError: 403 when the connection does not exist, is not of type ``imagecb``
            or has no API key; 503 when it cannot be read now.
        """
        found = self.cached(conn_id)
        if found is not None:
            return found
        settings = self._load(conn_id)
        with self._lock:
            self._entries[conn_id] = (time.monotonic(), settings)
            self._entries.move_to_end(conn_id)
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
        return self._known(settings)

    def cached(self, conn_id: str) -> ImageCbConnectionSettings | None:
        """
        Return the cached settings of ``conn_id`` without blocking, or ``None`` when not fresh.

        :raises ReceiverError: 403 when the connection is known not to exist.
        """
        with self._lock:
            entry = self._entries.get(conn_id)
            if entry is not None and time.monotonic() - entry[0] > self.ttl:
                del self._entries[conn_id]
                entry = None
            if entry is not None:
                self._entries.move_to_end(conn_id)
        if entry is None:
            return None
        return self._known(entry[1])

    @staticmethod
    def _known(settings: ImageCbConnectionSettings | None) -> ImageCbConnectionSettings:
        if settings is None:
            # the same answer as a forged token: a URL holder learns nothing about connections
            raise ReceiverError(403, TOKEN_REFUSED, reason="the token names an unknown connection")
        return settings

    @staticmethod
    def _load(conn_id: str) -> ImageCbConnectionSettings | None:
        # The server-side lookup (environment, secrets backends, then the metadata database), as
        # the API server itself reads connections: the Task SDK's lookup skips the database in a
        # process Airflow did not mark as a server, such as the standalone receiver.
        from airflow.exceptions import AirflowNotFoundException
        from airflow.models.connection import Connection

        from imagecb_provider.hooks.imagecb import CONN_TYPE, ImageCbConnectionSettings

        try:
            conn = Connection.get_connection_from_secrets(conn_id)
        except AirflowNotFoundException:
            return None
        except Exception as error:
            log.warning("Could not read connection %r: %s", conn_id, type(error).__name__)
            raise ReceiverError(503, "connection store unavailable") from None
        if conn.conn_type != CONN_TYPE:
            return None
        try:
            return ImageCbConnectionSettings.from_connection(conn)
        except ImageCbConfigurationError:
            return None


# ---------------------------------------------------------------------------- binding
class LedgerBinding:
    """Read the remote task ids a task instance's ledger binds to a slot, through Airflow's state store."""

    def remote_ids(self, ti: TaskInstanceRef, slot: int) -> frozenset[str] | None:
        """
        Return the ids bound to ``slot``, or ``None`` when the slot is not bound yet.

        A slot whose submission is still in flight (``sending``: its answer, the new id, is not
        stored yet) counts as unbound, so a callback that races ahead of the ledger write is
        accepted rather than refused with 409. Blocking: call it from a thread.
        """
        from airflow.state import TaskScope, get_state_backend

        scope = TaskScope(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, map_index=ti.map_index)
        raw = get_state_backend().get(scope, STATE_KEY)
        return remote_ids_of_slot(_json_or_none(raw), slot)


def _json_or_none(raw: str | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        log.warning("A task_state_store ledger entry is not JSON; treating its slot as unbound")
        return None


# ---------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Accepted:
    """What the receiver answers a callback it accepted: recorded now, or a duplicate."""

    remote_task_id: str
    recorded: bool

    def to_json(self) -> dict[str, Any]:
        return {"status": "recorded" if self.recorded else "duplicate"}


def check_json_content_type(headers: Mapping[str, str]) -> None:
    """Refuse (415) a request whose body is not declared as JSON."""
    media = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise ReceiverError(415, "the body must be application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """
    Read a request body of at most ``limit`` bytes.

    A declared ``Content-Length`` above the limit is refused before any of the body is read; a
    body sent without one (chunked) is counted while it streams and refused as soon as it passes
    the limit.

    :raises ReceiverError: 413 too large, 400 unreadable length.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        # ASCII digits only: str.isdigit() is also true of "²", on which int() raises
        if not _CONTENT_LENGTH.fullmatch(declared.strip()):
            raise ReceiverError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise ReceiverError(413, f"the body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ReceiverError(413, f"the body is larger than {limit} bytes")
    return bytes(body)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """
    Parse a body that must be a JSON object that can be stored as it is (400 otherwise).

    Refused: not JSON (or not UTF-8), ``NaN`` and ``Infinity``, numbers of more than 4300
    digits, nesting deeper than :data:`MAX_JSON_DEPTH`, and text with NUL characters or unpaired
    surrogates (which no database column takes).
    """
    try:
        parsed = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise ReceiverError(400, "the body is nested too deeply") from None
    except ValueError:  # UnicodeDecodeError, JSONDecodeError and int()'s digit limit included
        raise ReceiverError(400, "the body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise ReceiverError(400, "the body is not a JSON object")
    _check_tree(parsed)
    return parsed


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_tree(value: Any) -> None:
    """Walk a parsed body without recursion; refuse it if too deep or if it holds unstorable text."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ReceiverError(400, "the body is nested too deeply")
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            _check_text(item)


def _check_text(text: str) -> None:
    if text.isascii() and "\x00" not in text:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ReceiverError(400, "the body has an unpaired surrogate") from None
    if "\x00" in text:
        raise ReceiverError(400, "the body has a NUL character")


def remote_task_id_of(body: Mapping[str, Any]) -> str:
    """
    Return the task id of a callback body, from ``data.taskId`` or ``data.task_id``.

    :raises ReceiverError: 422 when there is none, 400 when it is not of the one strict form
        (:func:`imagecb_provider.models.remote_task_id`).
    """
    data = body.get("data")
    if not isinstance(data, Mapping):
        raise ReceiverError(422, "the body has no data object")
    for key in ("taskId", "task_id"):
        value = data.get(key)
        if value is None or value == "":
            continue
        try:
            return models.remote_task_id(value, "a callback body")
        except InvalidRemoteTaskId:
            # the field's name only: the value is the sender's, and is neither echoed nor logged
            raise ReceiverError(
                400, f"data.{key} is not a task id (1 to 128 letters, digits, _ or -)"
            ) from None
    raise ReceiverError(422, "the body has no data.taskId")


def check_callback_fields(body: Mapping[str, Any]) -> None:
    """Refuse (422) a body whose ``code`` or ``data.info`` cannot be read as a callback's (``TaskRecord``)."""
    try:
        code = models.TaskRecord.from_callback(body).code
    except (AttributeError, TypeError, ValueError, OverflowError):
        raise ReceiverError(422, "the body's code or data.info is not of the callback's form") from None
    if code is not None and code not in _CODE_RANGE:
        raise ReceiverError(422, "the body's code is out of range")


def bearer_token(headers: Mapping[str, str]) -> str:
    """Return the token of an ``Authorization: Bearer`` header (401 when absent)."""
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ReceiverError(401, "a watch bearer token is required", {"WWW-Authenticate": "Bearer"})
    return token.strip()


# ---------------------------------------------------------------------------- receiver
class CallbackReceiver:
    """
    Authenticate, check, record and serve callbacks.

    :param store: where callbacks are recorded (Airflow's metadata database by default).
    :param connections: how connections are read (cached Airflow lookups by default).
    :param binding: how a task instance's ledger is read (Airflow's state store by default).
    :param max_body_bytes: the largest callback body accepted.
    :param replay_window: seconds a signed callback's timestamp may be off.
    :param poll_interval: seconds between two reads of the latest id while long-polls wait.
    :param db_threads: threads for database work (the event loop never blocks on it).
    :param clock: returns the current Unix time (for tests).
    :param keyring: the keys tokens are verified with (Airflow's configuration, read at each
        request, by default).
    """

    def __init__(
        self,
        store: CallbackStore | None = None,
        *,
        connections: ConnectionCache | None = None,
        binding: LedgerBinding | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        replay_window: float = DEFAULT_REPLAY_WINDOW,
        poll_interval: float = DEFAULT_INTERVAL,
        db_threads: int = 8,
        clock: Callable[[], float] = time.time,
        keyring: TokenKeyring | None = None,
    ) -> None:
        self.store = store or CallbackStore()
        self.connections = connections or ConnectionCache()
        self.binding = binding or LedgerBinding()
        self.max_body_bytes = max_body_bytes
        self.replay_window = replay_window
        self.poll_interval = poll_interval
        self.clock = clock
        self.keyring = keyring
        self._keyring_missing_logged = False
        self._executor = ThreadPoolExecutor(db_threads, thread_name_prefix="imagecb-callbacks")
        self._tails: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Tail] = weakref.WeakKeyDictionary()

    async def in_thread(self, func: Callable[..., T], *args: Any) -> T:
        """Run blocking ``func`` in the receiver's threads; database errors become 503."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)
        except SQLAlchemyError as error:
            # the driver's message ("no such table: imagecb_callback", "connection refused"), not
            # the statement or its parameters
            reason = getattr(error, "orig", None) or error
            log.error(
                "The metadata database failed (%s: %s); if the imagecb tables are missing, run "
                "`airflow db migrate`",
                type(error).__name__,
                str(reason).splitlines()[0] if str(reason) else "",
            )
            raise ReceiverError(503, "database unavailable") from None

    def tail(self) -> Tail:
        """Return the :class:`Tail` of the running event loop."""
        loop = asyncio.get_running_loop()
        tail = self._tails.get(loop)
        if tail is None:
            tail = self._tails[loop] = Tail(lambda: self.in_thread(self.store.latest_id), self.poll_interval)
        return tail

    # ------------------------------------------------------------------ tokens
    async def authenticate(
        self, token: str, purposes: tuple[str, ...]
    ) -> tuple[CallbackToken, ImageCbConnectionSettings]:
        """
        Verify a token for one of ``purposes``, then read the connection it names.

        The tag is checked first, with keys held in memory: a forged token costs one HMAC and
        no lookup. Every refusal answers 403 with the same text (410 for an authentic token past
        its expiry); 503 when no signing key is configured or the connection cannot be read.
        """
        keyring = self.signing_keys()
        try:
            claims = CallbackToken.verify(token, keyring, purposes=purposes, now=self.clock())
        except CallbackTokenError as error:
            raise ReceiverError(error.status_code, str(error), reason=f"{error} ({error.reason})") from None
        settings = self.connections.cached(claims.conn_id) or await self.in_thread(
            self.connections.get, claims.conn_id
        )
        return claims, settings

    def signing_keys(self) -> TokenKeyring:
        """Return the keyring tokens are verified with (503 when none is configured)."""
        if self.keyring is not None:
            return self.keyring
        try:
            return TokenKeyring.from_config()
        except ImageCbConfigurationError as error:
            if not self._keyring_missing_logged:  # once: every request would say it again
                self._keyring_missing_logged = True
                log.error("Refusing every callback token: %s", error)
            raise ReceiverError(503, "the receiver cannot verify callback tokens now") from None

    async def authenticate_watcher(self, headers: Mapping[str, str]) -> CallbackToken:
        """Verify the ``watch`` bearer token of an events request (401 otherwise)."""
        try:
            claims, _ = await self.authenticate(bearer_token(headers), (PURPOSE_WATCH,))
        except ReceiverError as error:
            if error.status_code == 503:
                raise
            raise ReceiverError(
                401,
                "the watch bearer token is not valid",
                {"WWW-Authenticate": "Bearer"},
                reason=f"the watch bearer token is not valid ({error.reason})",
            ) from None
        return claims

    # ------------------------------------------------------------------ callbacks
    async def receive(self, token: str, request: Request) -> Accepted:
        """Check and record one callback; see the module docstring for the order of the checks."""
        claims, settings = await self.authenticate(token, (PURPOSE_TI, PURPOSE_ASSET))
        check_json_content_type(request.headers)
        body = parse_json_object(await read_body(request, self.max_body_bytes))
        remote_task_id = remote_task_id_of(body)
        check_callback_fields(body)
        signed = self._check_signature(settings, remote_task_id, request.headers)
        callback = self._new_callback(claims, body, remote_task_id, signed)
        new_id = await self.in_thread(self._bind_and_record, claims, callback)
        if new_id is not None:
            self.tail().bump(new_id)
            log.info(
                "Recorded the callback of image task %s (%s, connection %s, signed=%s)",
                remote_task_id,
                claims.purpose,
                claims.conn_id,
                signed,
            )
        return Accepted(remote_task_id, recorded=new_id is not None)

    def _check_signature(
        self, settings: ImageCbConnectionSettings, remote_task_id: str, headers: Mapping[str, str]
    ) -> bool:
        if not settings.webhook_hmac_key:
            return False
        try:
            check_webhook_signature(
                settings.webhook_hmac_key,
                remote_task_id,
                headers,
                now=self.clock(),
                window=self.replay_window,
            )
        except WebhookSignatureError as error:
            raise ReceiverError(error.status_code, str(error)) from None
        return True

    def _bind_and_record(self, claims: CallbackToken, callback: NewCallback) -> int | None:
        """Check a ``ti`` callback against its ledger slot (409), then record it (429 over quota); one hop."""
        from imagecb_provider.callbacks.store import AssetQuotaExceeded

        if claims.purpose == PURPOSE_TI:
            self._check_binding(claims, callback.remote_task_id)
        try:
            return self.store.record(callback)
        except AssetQuotaExceeded as error:
            # the vendor retries a 429; the label names the URL its holder already has
            raise ReceiverError(429, str(error), {"Retry-After": str(error.retry_after)}) from None

    def _check_binding(self, claims: CallbackToken, remote_task_id: str) -> None:
        if claims.ti is None or claims.slot is None:
            raise ReceiverError(403, "callback token names no task instance")
        try:
            bound = self.binding.remote_ids(claims.ti, claims.slot)
        except (ReceiverError, SQLAlchemyError):
            raise
        except Exception as error:
            log.error("Could not read the submission ledger: %s", type(error).__name__)
            raise ReceiverError(503, "task state store unavailable") from None
        if bound is not None and remote_task_id not in bound:
            raise ReceiverError(409, "the task id is not the one this callback URL was issued for")

    def _new_callback(
        self, claims: CallbackToken, body: dict[str, Any], remote_task_id: str, signed: bool
    ) -> NewCallback:
        ti = claims.ti
        return NewCallback(
            remote_task_id=remote_task_id,
            conn_id=claims.conn_id,
            purpose=claims.purpose,
            body=body,
            signed=signed,
            received_at=datetime.fromtimestamp(self.clock(), tz=UTC),
            dag_id=ti.dag_id if ti else None,
            run_id=ti.run_id if ti else None,
            task_id=ti.task_id if ti else None,
            map_index=ti.map_index if ti else None,
            slot=claims.slot,
            label=claims.label,
        )

    # ------------------------------------------------------------------ waiters
    async def events(
        self,
        claims: CallbackToken,
        *,
        after: int | None,
        wait: float,
        purpose: str | None = None,
        label: str | None = None,
        limit: int = MAX_PAGE,
    ) -> dict[str, Any]:
        """
        Long-poll the callbacks of the token's connection recorded after ``after``.

        Answers as soon as there is at least one, or with an empty list after ``wait`` seconds.
        Without ``after``, answers at once with no items and the current end of the log (where a
        new waiter starts).
        """
        if after is None:
            return {"items": [], "cursor": await self.in_thread(self.store.latest_id)}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait, 0.0), MAX_WAIT)
        tail = self.tail()
        while True:
            query = partial(
                self.store.after, claims.conn_id, after, limit=limit, purpose=purpose, label=label
            )
            items, cursor = await self.in_thread(query)
            tail.bump(cursor)
            if items:
                return {"items": [item.to_json() for item in items], "cursor": cursor}
            after = cursor
            remaining = deadline - loop.time()
            if remaining <= 0 or not await tail.wait_beyond(cursor, remaining):
                return {"items": [], "cursor": cursor}

    async def lookup(self, claims: CallbackToken, request: Request) -> dict[str, Any]:
        """
        Return the callbacks already recorded for some remote task ids (``{"remote_task_ids": [...]}``).

        Only ``ti`` callbacks, what waiting tasks look up, unless the body asks for ``"purpose":
        "asset"``: a task id an ``asset`` URL recorded never reaches a waiting task.
        """
        check_json_content_type(request.headers)
        body = parse_json_object(await read_body(request, MAX_LOOKUP_BODY_BYTES))
        ids = body.get("remote_task_ids")
        if not isinstance(ids, list) or len(ids) > MAX_LOOKUP or not all(isinstance(i, str) for i in ids):
            raise ReceiverError(422, f"remote_task_ids must be a list of at most {MAX_LOOKUP} strings")
        purpose = body.get("purpose", PURPOSE_TI)
        if purpose not in (PURPOSE_TI, PURPOSE_ASSET):
            raise ReceiverError(422, "purpose must be ti or asset")
        # an id of another form is never recorded: it matches nothing and need not reach the database
        ids = [i for i in ids if models.REMOTE_TASK_ID.fullmatch(i)]
        items = await self.in_thread(partial(self.store.lookup, claims.conn_id, ids, purpose=purpose))
        return {"items": [item.to_json() for item in items]}

    async def cursor(self, claims: CallbackToken, name: str) -> dict[str, Any]:
        """Return a consumer's stored position (``null`` when it never advanced)."""
        _check_cursor_name(name)
        return {"name": name, "position": await self.in_thread(self.store.cursor, claims.conn_id, name)}

    async def advance_cursor(self, claims: CallbackToken, name: str, request: Request) -> dict[str, Any]:
        """Move a consumer's position forward (``{"position": n}``): never back, nor past its stream's end."""
        _check_cursor_name(name)
        check_json_content_type(request.headers)
        position = parse_json_object(await read_body(request, 1024)).get("position")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ReceiverError(422, "position must be a whole number >= 0")
        stored = await self.in_thread(self.store.advance_cursor, claims.conn_id, name, position)
        return {"name": name, "position": stored}

    async def health(self) -> dict[str, Any]:
        """Check that the callback table can be read (503 otherwise)."""
        await self.in_thread(self.store.latest_id)
        return {"status": "ok"}


def _check_cursor_name(name: str) -> None:
    if not CURSOR_NAME.fullmatch(name):
        raise ReceiverError(422, "a cursor name is 1 to 250 letters, digits or _.:*-")
