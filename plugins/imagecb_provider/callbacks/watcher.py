"""
``CallbackWatcher``: one shared long-poll per triggerer event loop, fanned out to waiting triggers.

A thousand triggers waiting for callbacks cost one HTTP long-poll (and, briefly, one batched
lookup when they subscribe), not a thousand: every trigger of a connection in the same event loop
shares the watcher registered for the receiver's URL. Usage from a trigger::

    watcher = CallbackWatcher.for_connection(settings)
    async with watcher.subscribe([remote_task_id]) as inbox:
        items = await inbox.get(timeout=poll_interval)  # [] at the timeout

Nothing is lost between the pieces:

* **Before the wait.** Subscribing registers the ids first, then looks up what the receiver
  already recorded for them (a callback that arrived before the task deferred, or while this
  triggerer was down). The lookup runs only once the long-poll knows where the log ends, and the
  receiver's ids commit in order, so every callback is either in the lookup or after the cursor.
* **Receiver down.** The loop backs off (0.5 s doubling to 30 s, jittered) and keeps its cursor;
  the vendor retries its deliveries, and once the receiver is back the loop reads everything
  recorded since. It never raises into a trigger, which keeps a slow safety-net poll of the API
  for a callback that was lost for good.
* **Nobody waiting.** The loop stops a few seconds after the last subscriber leaves.
* **Only ``ti`` callbacks.** The long-poll and the lookup ask for callbacks of ``ti`` URLs only,
  and an inbox drops any other: a task id recorded through an ``asset`` URL, which is handed to
  systems outside Airflow, never wakes a waiting task.

Watch tokens are minted in memory from the connection and sent only in a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING

import aiohttp

from imagecb_provider.callbacks.client import Backoff, CallbackItem, ReceiverClient, ReceiverUnavailable
from imagecb_provider.callbacks.tokens import PURPOSE_TI, receiver_url

if TYPE_CHECKING:
    from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

log = logging.getLogger(__name__)

DEFAULT_WAIT = 25.0
DEFAULT_IDLE_GRACE = 5.0

_REGISTRY: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], CallbackWatcher]] = (
    weakref.WeakKeyDictionary()
)


class CallbackInbox:
    """
    The callbacks that arrived for one subscription's remote task ids.

    Each remote task id is delivered at most once per inbox, whether it came from the lookup or
    the long-poll.
    """

    def __init__(self, remote_task_ids: Iterable[str]) -> None:
        self.remote_task_ids = frozenset(remote_task_ids)
        self.received: dict[str, CallbackItem] = {}
        self._unread: list[CallbackItem] = []
        self._arrived = asyncio.Event()

    def put(self, item: CallbackItem) -> None:
        """Deliver ``item`` unless this inbox already has a callback for its task id, or it is not ``ti``."""
        if item.purpose != PURPOSE_TI:
            return  # a receiver that ignored the purpose filter: never hand an asset row to a task
        if item.remote_task_id in self.received or item.remote_task_id not in self.remote_task_ids:
            return
        self.received[item.remote_task_id] = item
        self._unread.append(item)
        self._arrived.set()

    async def get(self, timeout: float | None = None) -> list[CallbackItem]:
        """
        Return the callbacks that arrived since the last call, waiting up to ``timeout`` seconds for one.

        :param timeout: seconds to wait when none is pending; ``None`` waits for as long as it takes.
        :return: the new callbacks, possibly empty at the timeout.
        """
        if not self._unread:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)
        items, self._unread = self._unread, []
        self._arrived.clear()
        return items


class _Subscription:
    """The ``async with`` of :meth:`CallbackWatcher.subscribe`."""

    def __init__(self, watcher: CallbackWatcher, remote_task_ids: Iterable[str]) -> None:
        self._watcher = watcher
        self._inbox = CallbackInbox(remote_task_ids)

    async def __aenter__(self) -> CallbackInbox:
        self._watcher._add(self._inbox)
        return self._inbox

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._watcher._remove(self._inbox)


class CallbackWatcher:
    """
    The shared long-poll of one receiver URL and connection, in one event loop.

    Get it with :meth:`for_connection` rather than building one, so that triggers share it.

    :param settings: the ``imagecb`` connection (its API key signs the watch tokens).
    :param base_url: the receiver's ``.../imagecb/callbacks`` URL.
    :param wait: seconds each long-poll may be held open by the receiver.
    :param idle_grace: seconds the loop lingers after the last subscriber leaves.
    :param backoff_first: the first delay after the receiver failed, in seconds.
    :param backoff_cap: the longest delay between two attempts.
    """

    def __init__(
        self,
        settings: ImageCbConnectionSettings,
        base_url: str,
        *,
        wait: float = DEFAULT_WAIT,
        idle_grace: float = DEFAULT_IDLE_GRACE,
        backoff_first: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        self.settings = settings
        self.base_url = base_url
        self.wait = wait
        self.idle_grace = idle_grace
        self._backoff = (backoff_first, backoff_cap)
        self._inboxes: dict[str, set[CallbackInbox]] = {}
        self._pending_lookup: set[str] = set()
        self._lookup_wanted = asyncio.Event()
        self._ready = asyncio.Event()
        self._cursor: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._stop_timer: asyncio.TimerHandle | None = None

    @classmethod
    def for_connection(
        cls, settings: ImageCbConnectionSettings, *, base_url: str | None = None, **options: float
    ) -> CallbackWatcher:
        """
        Return the watcher of this event loop for the connection's receiver, creating it once.

        :param settings: the ``imagecb`` connection; the newest settings win (a rotated key).
        :param base_url: the receiver URL to watch; by default ``{callback_base_url}/imagecb/callbacks``.
        :param options: :class:`CallbackWatcher` keyword arguments, used when it is created.
        :raises ImageCbConfigurationError: no ``base_url`` and no ``callback_base_url`` extra.
        """
        url = (base_url or receiver_url(settings)).rstrip("/")
        watchers = _REGISTRY.setdefault(asyncio.get_running_loop(), {})
        watcher = watchers.get((url, settings.conn_id))
        if watcher is None:
            watcher = watchers[(url, settings.conn_id)] = cls(settings, url, **options)
        watcher.settings = settings
        return watcher

    def subscribe(self, remote_task_ids: Iterable[str]) -> _Subscription:
        """Wait for the callbacks of ``remote_task_ids``: ``async with watcher.subscribe(ids) as inbox``."""
        return _Subscription(self, remote_task_ids)

    @property
    def subscriber_count(self) -> int:
        return len({id(inbox) for inboxes in self._inboxes.values() for inbox in inboxes})

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # ------------------------------------------------------------------ subscribers
    def _add(self, inbox: CallbackInbox) -> None:
        for remote_task_id in inbox.remote_task_ids:
            self._inboxes.setdefault(remote_task_id, set()).add(inbox)
        self._pending_lookup |= inbox.remote_task_ids
        self._lookup_wanted.set()
        if self._stop_timer is not None:
            self._stop_timer.cancel()
            self._stop_timer = None
        if not self.running:
            self._task = asyncio.create_task(self._run(), name=f"imagecb-callback-watcher {self.base_url}")

    def _remove(self, inbox: CallbackInbox) -> None:
        for remote_task_id in inbox.remote_task_ids:
            inboxes = self._inboxes.get(remote_task_id)
            if inboxes is not None:
                inboxes.discard(inbox)
                if not inboxes:
                    del self._inboxes[remote_task_id]
        if not self._inboxes and self.running and self._stop_timer is None:
            self._stop_timer = asyncio.get_running_loop().call_later(self.idle_grace, self._stop_if_idle)

    def _stop_if_idle(self) -> None:
        self._stop_timer = None
        if not self._inboxes and self._task is not None:
            # Forget the task before it has finished stopping: a subscriber arriving meanwhile
            # starts a fresh loop instead of joining one that is going away.
            task, self._task = self._task, None
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    def _deliver(self, items: Iterable[CallbackItem]) -> None:
        for item in items:
            for inbox in tuple(self._inboxes.get(item.remote_task_id, ())):
                inbox.put(item)

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        # A new loop starts from the end of the log: what came before is for the lookups.
        self._cursor = None
        self._ready = asyncio.Event()
        # Two pools of one connection each: the long-poll keeps its connection for itself, and
        # the occasional batched lookup never waits behind a held long-poll.
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as poll_http,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as lookup_http,
        ):
            poll_client = ReceiverClient(self.settings, poll_http, base_url=self.base_url)
            lookup_client = ReceiverClient(self.settings, lookup_http, base_url=self.base_url)
            lookups = asyncio.create_task(self._lookup_loop(lookup_client), name="imagecb-callback-lookups")
            try:
                await self._poll_loop(poll_client)
            finally:
                lookups.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lookups

    async def _poll_loop(self, client: ReceiverClient) -> None:
        backoff = Backoff(*self._backoff)
        while True:
            client.settings = self.settings
            try:
                if self._cursor is None:
                    self._cursor = await client.tail()
                    self._ready.set()
                items, cursor = await client.events(self._cursor, wait=self.wait, purpose=PURPOSE_TI)
            except ReceiverUnavailable as error:
                await self._pause(backoff, "long-poll", error)
                continue
            if backoff.failures:
                log.info("The callback receiver answers again; reading from position %d", self._cursor)
                backoff.reset()
            self._cursor = max(self._cursor, cursor)
            self._deliver(items)

    async def _lookup_loop(self, client: ReceiverClient) -> None:
        backoff = Backoff(*self._backoff)
        while True:
            client.settings = self.settings
            await self._lookup_wanted.wait()
            await self._ready.wait()
            self._lookup_wanted.clear()
            wanted, self._pending_lookup = self._pending_lookup & self._inboxes.keys(), set()
            if not wanted:
                continue
            try:
                self._deliver(await client.lookup(wanted))
                backoff.reset()
            except ReceiverUnavailable as error:
                self._pending_lookup |= wanted
                self._lookup_wanted.set()
                await self._pause(backoff, "lookup", error)

    @staticmethod
    async def _pause(backoff: Backoff, what: str, error: ReceiverUnavailable) -> None:
        delay = backoff.next()
        level = logging.WARNING if backoff.failures == 1 else logging.DEBUG
        log.log(level, "The callback receiver failed a %s (%s); trying again in %.1f s", what, error, delay)
        await asyncio.sleep(delay)
