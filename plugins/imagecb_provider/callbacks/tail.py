"""
``Tail``: wake long-polls when a callback is recorded, at a cost independent of how many wait.

One per server process and event loop. While at least one long-poll waits, a single task asks the
database for the largest callback id a few times a second (callbacks recorded by other API-server
replicas show up this way); a callback recorded by this process wakes its waiters at once. A
waiter only queries its own rows when the largest id moved past its cursor. The tail carries ids,
never rows: a waiter woken by a row of another connection, purpose or label reads nothing of it
(its query is filtered) and waits again from the new cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.25


class Tail:
    """
    The largest callback id this process knows of, and a way to wait for it to grow.

    :param fetch_latest: reads the largest recorded id from the database.
    :param interval: seconds between two reads while someone waits.
    """

    def __init__(
        self, fetch_latest: Callable[[], Awaitable[int]], interval: float = DEFAULT_INTERVAL
    ) -> None:
        self._fetch_latest = fetch_latest
        self.interval = interval
        self.latest = 0
        self._changed = asyncio.Event()
        self._waiters = 0
        self._refresher: asyncio.Task[None] | None = None

    def bump(self, value: int) -> None:
        """Record that ids up to ``value`` exist and wake the waiters if that is news."""
        if value > self.latest:
            self.latest = value
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def wait_beyond(self, position: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an id above ``position``; return whether one is known."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._waiters += 1
        self._ensure_refresher()
        try:
            while self.latest <= position:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
            return True
        finally:
            self._waiters -= 1

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh(), name="imagecb-callbacks-tail")

    async def _refresh(self) -> None:
        while self._waiters > 0:
            try:
                self.bump(await self._fetch_latest())
            except Exception as error:
                log.warning("Could not read the latest callback id: %s", type(error).__name__)
            await asyncio.sleep(self.interval)
