"""
``ImageCallbackEventTrigger``: an asset watcher that fires once per callback of an external submission.

Images submitted outside Airflow with a callback URL from
:func:`~imagecb_provider.callbacks.tokens.asset_callback_url` (or ``python -m
imagecb_provider.callbacks url --label X``) are recorded by the receiver under their label. This
trigger turns each of them into one asset event, for DAGs scheduled on an
``Asset(..., watchers=[AssetWatcher(name=..., trigger=ImageCallbackEventTrigger(...))])``.

Restarts neither re-emit nor miss events. The receiver keeps a durable cursor per connection and
label (``asset:<label>``, ``asset:*`` without a label), and the trigger runs as an Airflow shared
stream in *ack mode*: the triggerer hands an event's position back to
:meth:`AssetCallbackProducer.advance` only after the asset event derived from it was stored in the
metadata database, and only then does the cursor move. A triggerer that stops before that reads
the event again (at least once, never lost); one that restarts after it starts past it. A trigger
watching a label for the first time starts at the beginning of that label's record, so callbacks
that arrived before the DAG was deployed are not missed. All triggers of one connection and label
in a triggerer share one long-poll.

An event says only that a callback *claiming* to be about a remote task arrived: an asset callback
URL is handed to systems outside Airflow and valid for 30 days, so whoever holds one can post any
body to it. :func:`result_from_event` therefore reads the task's outcome and file links from the
API (one record-info call), never from the event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from airflow.triggers.base import BaseEventTrigger, TriggerEvent
from airflow.triggers.shared_stream import AdvanceItem, SharedStreamProducer

from imagecb_provider.callbacks.client import Backoff, CallbackItem, ReceiverClient, ReceiverUnavailable
from imagecb_provider.callbacks.tokens import LABEL_PATTERN, PURPOSE_ASSET, receiver_url
from imagecb_provider.exceptions import (
    ImageCbError,
    ImageCbNotFound,
    ImageCbProtocolError,
    ImageCbValidationError,
    InvalidRemoteTaskId,
)
from imagecb_provider.hooks.imagecb import DEFAULT_CONN_ID, ImageCbAsyncHook, ImageCbHook
from imagecb_provider.models import build_result, remote_task_id, to_iso

if TYPE_CHECKING:
    from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

STREAM_NAME = "imagecb-callback-assets"
DEFAULT_WAIT = 25.0
#: Without ack mode (``run()``), seconds an event's position waits before the cursor moves past
#: it: the triggerer stores the asset event well within this.
PERSIST_GRACE = 10.0


def cursor_name(label: str | None) -> str:
    """Name the receiver-side cursor of the consumers of ``label`` (all labels when ``None``)."""
    return f"asset:{label}" if label else "asset:*"


def event_payload(item: CallbackItem) -> dict[str, Any]:
    """Build the small, JSON-safe payload of the asset event fired for one callback."""
    record = item.record()
    return {
        "remote_task_id": item.remote_task_id,
        "label": item.label,
        "code": record.code,
        "outcome": record.outcome.value if record.outcome else None,
        "message": record.message,
        "result_image_url": record.result_image_url,
        "origin_image_url": record.origin_image_url,
        "received_at": to_iso(item.received_at),
        "signed": item.signed,
        "callback_id": item.id,
    }


class AssetCallbackProducer(SharedStreamProducer):
    """
    Read the ``asset`` callbacks of one connection and label from the receiver, and advance its cursor.

    Never raises: an unavailable receiver or connection is retried with backoff, and a cursor
    update that fails is sent again with the next one (the cursor is cumulative).

    :param imagecb_conn_id: the ``imagecb`` connection.
    :param label: only callbacks recorded under this label; all when ``None``.
    :param wait: seconds each long-poll may be held open.
    :param backoff_first: the first delay after a failure, in seconds.
    :param backoff_cap: the longest delay between two attempts.
    """

    def __init__(
        self,
        imagecb_conn_id: str = DEFAULT_CONN_ID,
        label: str | None = None,
        *,
        wait: float = DEFAULT_WAIT,
        backoff_first: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        self.imagecb_conn_id = imagecb_conn_id
        self.label = label
        self.wait = wait
        self._backoff = (backoff_first, backoff_cap)
        self._http: aiohttp.ClientSession | None = None
        self._client: ReceiverClient | None = None
        self._advanced = 0
        self._unsent: int | None = None
        self._held = False

    @property
    def cursor_name(self) -> str:
        return cursor_name(self.label)

    async def open_stream(self) -> AsyncIterator[tuple[dict[str, Any], int]]:
        """Yield ``(payload, callback id)`` for every callback past the stored cursor, forever."""
        client = await self._connect()
        position = await self._retrying(lambda: client.cursor(self.cursor_name), "read the cursor")
        after = self._advanced = position or 0
        log.info(
            "Watching %s callbacks of %s from position %d", self.cursor_name, self.imagecb_conn_id, after
        )
        backoff = Backoff(*self._backoff)
        while True:
            try:
                items, cursor = await client.events(
                    after, wait=self.wait, purpose=PURPOSE_ASSET, label=self.label
                )
            except ReceiverUnavailable as error:
                await _pause(backoff, f"long-poll ({error})")
                continue
            backoff.reset()
            for item in items:
                yield event_payload(item), item.id
            after = max(after, cursor)

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        """Move the cursor past the clean prefix of ``batch``; stop at an event not stored."""
        position = None
        for item in batch:
            if self._held or not item.outcome.is_clean:
                if not self._held:
                    log.warning(
                        "Callback %s was not confirmed stored as an asset event; the %s cursor stays "
                        "before it and it is read again after the next restart",
                        item.broker_payload,
                        self.cursor_name,
                    )
                self._held = True
                break
            position = item.broker_payload
        if position is not None:
            await self.advance_to(position)

    async def advance_to(self, position: int) -> None:
        """Store ``position`` as the cursor (a few attempts; a failure is retried with the next advance)."""
        target = max(position, self._unsent or 0)
        if target <= self._advanced or self._client is None:
            return
        for attempt in range(3):
            try:
                self._advanced = await self._client.advance_cursor(self.cursor_name, target)
                self._unsent = None
                return
            except ReceiverUnavailable as error:
                if attempt == 2:
                    log.warning(
                        "Could not store the %s cursor (%s); will send it again", self.cursor_name, error
                    )
                else:
                    await asyncio.sleep(0.5 * 2**attempt)
        self._unsent = target

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _connect(self) -> ReceiverClient:
        settings = await self._retrying(self._settings, "read the connection")
        self._http = self._http or aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2))
        self._client = ReceiverClient(settings, self._http)
        return self._client

    async def _settings(self) -> ImageCbConnectionSettings:
        settings = await ImageCbAsyncHook(imagecb_conn_id=self.imagecb_conn_id).settings()
        receiver_url(settings)  # a connection without callback_base_url is refused here, loudly
        return settings

    async def _retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        backoff = Backoff(*self._backoff)
        while True:
            try:
                return await call()
            except ReceiverUnavailable as error:
                await _pause(backoff, f"{what} ({error})")
            except Exception as error:  # a missing or incomplete connection: keep trying, loudly
                await _pause(backoff, f"{what} ({type(error).__name__}: {error})", always_warn=True)


async def _pause(backoff: Backoff, what: str, *, always_warn: bool = False) -> None:
    delay = backoff.next()
    level = logging.WARNING if always_warn or backoff.failures == 1 else logging.DEBUG
    log.log(level, "Could not %s; trying again in %.1f s", what, delay)
    await asyncio.sleep(delay)


class ImageCallbackEventTrigger(BaseEventTrigger):
    """
    Fire one event per callback recorded for ``asset`` callback URLs, optionally of one label.

    The event payload (the asset event's ``extra["payload"]``) is small: ``remote_task_id``,
    ``label``, ``code``, ``outcome``, ``message``, ``result_image_url``, ``origin_image_url``,
    ``received_at``, ``signed`` and ``callback_id``. Its outcome and URLs are what the callback
    body claimed, unconfirmed: turn it into a result with :func:`result_from_event`, which reads
    them from the API.

    :param imagecb_conn_id: the ``imagecb`` connection; its ``callback_base_url`` is where the
        receiver is reached and its API key signs the watch token (only the id is serialized).
    :param label: only callbacks of URLs made for this label; every ``asset`` callback when ``None``.
    """

    def __init__(self, imagecb_conn_id: str = DEFAULT_CONN_ID, label: str | None = None) -> None:
        super().__init__()
        if label is not None and not LABEL_PATTERN.fullmatch(label):
            raise ValueError(
                f"label={label!r}: use 1 to 100 letters, digits or _.:- (starting with a letter or digit)"
            )
        self.imagecb_conn_id = imagecb_conn_id
        self.label = label

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"imagecb_conn_id": self.imagecb_conn_id, "label": self.label},
        )

    def shared_stream_key(self) -> Hashable:
        """Key the shared stream (and the receiver cursor) by connection and label."""
        return (STREAM_NAME, self.imagecb_conn_id, self.label or "*")

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> AssetCallbackProducer:
        """Build the producer of the shared stream (ack mode)."""
        return AssetCallbackProducer(kwargs.get("imagecb_conn_id") or DEFAULT_CONN_ID, kwargs.get("label"))

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        """Fire one event per raw callback payload of the shared stream."""
        async for payload in shared_stream:
            yield TriggerEvent(payload)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """
        Fire events without the shared stream (a triggerer that does not use it, or a test).

        Without persistence confirmations, the cursor moves past an event :data:`PERSIST_GRACE`
        seconds after it was handed to the triggerer.
        """
        producer = self.create_shared_stream_producer(self.serialize()[1])
        pending: set[asyncio.Task[None]] = set()
        try:
            async for payload, position in producer.open_stream():
                yield TriggerEvent(payload)
                task = asyncio.create_task(_advance_later(producer, position, PERSIST_GRACE))
                pending.add(task)
                task.add_done_callback(pending.discard)
        finally:
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                await producer.aclose()


async def _advance_later(producer: AssetCallbackProducer, position: int, delay: float) -> None:
    await asyncio.sleep(delay)
    await producer.advance_to(position)


def result_from_event(
    payload: dict[str, Any], imagecb_conn_id: str = DEFAULT_CONN_ID
) -> dict[str, Any] | None:
    """
    Build the provider's result dict (what ``ImageArchiveOperator`` takes) for the task an event names.

    The event is only a claim: its outcome and URLs come from a callback body that anyone holding
    the asset callback URL could have written. The result is built from one record-info call for
    the remote task id instead, so the archive downloads only what the API says the task made.
    A task the API does not know (a forged callback), or an id of another form, gives ``None``
    (the archive passes it over) and a warning; a task the API still reports generating raises a
    retryable :class:`~imagecb_provider.exceptions.ImageCbError`, so the task retries later.

    :param payload: the ``extra["payload"]`` of an asset event this trigger fired.
    :param imagecb_conn_id: the ``imagecb`` connection the watching trigger uses.
    """
    try:
        remote_id = remote_task_id(payload.get("remote_task_id"), "an asset callback event")
    except InvalidRemoteTaskId as error:
        log.warning("Ignored an asset callback event: %s", error)
        return None
    try:
        record = ImageCbHook(imagecb_conn_id=imagecb_conn_id).get_task(remote_id)
    except (ImageCbNotFound, ImageCbValidationError) as error:
        # Only 404 and 422 say "no such task"; other errors (key, credits, network) are raised.
        log.warning(
            "Ignored the asset callback event of remote task %s: the API does not confirm it (%s)",
            remote_id,
            error,
        )
        return None
    if record.task_id and record.task_id != remote_id:
        raise ImageCbProtocolError(
            f"The API answered record-info for remote task {remote_id} with the record of another task"
        )
    if not record.is_terminal:
        raise ImageCbError(
            f"The API still reports remote task {remote_id} generating, though a callback said it ended; "
            "its result is read again when this task retries"
        )
    return build_result(
        remote_task_id=remote_id,
        outcome=record.outcome,
        record=record,
        request={},
        submitted_at=None,
        polls=1,
        via="callback",
    )
