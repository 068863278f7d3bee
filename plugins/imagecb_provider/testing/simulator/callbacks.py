"""
Completion callbacks, sent the way the vendor sends them: signed, retried, sometimes twice.

Each callback is a timer on the server's own event loop (``call_later`` at the task's completion
time) and an ``httpx.AsyncClient`` POST, so thousands of pending callbacks cost one timer each
and a slow receiver never stalls the API the simulator is serving.

With ``hold_callbacks`` on, a callback that comes due is kept instead of sent, until a test
releases it: the test decides that the receiver sees it only after, say, the ledger is written.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httpx

from imagecb_provider.testing.simulator.markers import SUCCESS
from imagecb_provider.testing.simulator.state import NULL_STRING, SimState, Task

EMPTY_INFO = {"originImageUrl": "", "resultImageUrl": ""}
#: Deliveries in flight at once. httpx's pool slows down badly with thousands of queued
#: requests, and a real receiver would not want them all at once either.
MAX_IN_FLIGHT = 32


def sign(key: str, task_id: str, timestamp: str) -> str:
    """base64(HMAC-SHA256(key, taskId + "." + timestamp)), the vendor's webhook signature."""
    digest = hmac.new(key.encode(), f"{task_id}.{timestamp}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def callback_payload(task: Task, urls: dict[str, str], *, null_strings: bool = False) -> dict[str, Any]:
    """
    Build the vendor's callback body; failures carry the same shape with empty URLs.

    :param task: the ended task.
    :param urls: its file links.
    :param null_strings: write the empty URLs as the string ``"null"`` (config ``null_strings``).
    """
    outcome = task.outcome
    info = dict(urls) if outcome is SUCCESS else dict(EMPTY_INFO)
    if null_strings:
        info = {key: value or NULL_STRING for key, value in info.items()}
    return {
        "code": outcome.callback_code,
        "msg": outcome.callback_msg,
        "data": {"taskId": task.task_id, "info": info},
    }


class CallbackSender:
    """Schedules, sends, retries and records the callbacks of one simulator."""

    def __init__(self, state: SimState) -> None:
        self.state = state
        self._client: httpx.AsyncClient | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._held: dict[str, Task] = {}  # due while hold_callbacks was on, in the order they came due
        self._running: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None

    def schedule(self, task: Task) -> None:
        """Arm a timer for the task's completion; tasks without a URL or an end need none."""
        if not task.callback_url or task.complete_at is None:
            return
        delay = max(0.0, task.complete_at - time.time())
        loop = asyncio.get_running_loop()
        self._timers[task.task_id] = loop.call_later(delay, self._start, task)

    def pending(self) -> int:
        """Count the deliveries armed or under way: completion timers, chains sending or awaiting a retry."""
        return len(self._timers) + len(self._running)

    def held(self) -> list[str]:
        """List the task ids whose callback is held (``hold_callbacks``), in the order they came due."""
        return list(self._held)

    def held_matching(self, task_id: str | None, prompt: str | None) -> list[Task]:
        """
        Find the held callbacks of this task, or of every task with exactly this prompt, or all.

        :param task_id: one task's id.
        :param prompt: the exact prompt (used when ``task_id`` is ``None``; both ``None``: all).
        """
        if task_id is not None:
            return [self._held[task_id]] if task_id in self._held else []
        return [t for t in self._held.values() if prompt is None or t.prompt == prompt]

    def release(self, tasks: list[Task]) -> None:
        """
        Send the held callbacks of ``tasks`` now, each with its usual retries and duplicate.

        :param tasks: tasks from :meth:`held_matching`.
        """
        for task in tasks:
            if self._held.pop(task.task_id, None) is not None:
                self._deliver(task)

    def cancel_all(self) -> None:
        """Forget every pending, held and running delivery (``/_sim/reset`` and shutdown)."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._held.clear()
        for running in list(self._running):
            running.cancel()
        self._running.clear()

    async def aclose(self) -> None:
        self.cancel_all()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------------ internals
    def _start(self, task: Task) -> None:
        self._timers.pop(task.task_id, None)
        if self.state.config.hold_callbacks:
            self._held[task.task_id] = task
            return
        self._deliver(task)

    def _deliver(self, task: Task) -> None:
        payload = callback_payload(
            task, self.state.file_urls(task, task.base_url), null_strings=self.state.config.null_strings
        )
        duplicate = self._spawn_duplicate(task, payload) if task.duplicate_callback else None
        self._spawn(self._chain(task, payload, duplicate=False, after_first=duplicate))

    def _spawn_duplicate(self, task: Task, payload: dict[str, Any]) -> Callable[[], None]:
        return lambda: self._spawn(self._chain(task, payload, duplicate=True))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        running = asyncio.ensure_future(coro)
        self._running.add(running)
        running.add_done_callback(self._running.discard)

    async def _chain(
        self,
        task: Task,
        payload: dict[str, Any],
        *,
        duplicate: bool,
        after_first: Callable[[], None] | None = None,
    ) -> None:
        """First attempt, then one retry per configured delay (scaled), until a 2xx answer."""
        delays = self.state.config.callback_retry_delays
        for attempt in range(1, len(delays) + 2):
            delivered = await self._attempt(task, payload, attempt, duplicate)
            if attempt == 1 and after_first is not None:
                after_first()
            if delivered or attempt > len(delays):
                return
            await asyncio.sleep(delays[attempt - 1] * self.state.config.time_factor)

    async def _attempt(self, task: Task, payload: dict[str, Any], attempt: int, duplicate: bool) -> bool:
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        async with self._slots:
            sent_at = time.time()
            status, error = await self._post(task, payload)
        self.state.counters.callbacks.append(
            {
                "taskId": task.task_id,
                "url": task.callback_url,
                "attempt": attempt,
                "status": status,
                "error": error,
                "duplicate": duplicate,
                "sent_at": sent_at,
            }
        )
        return status is not None and 200 <= status < 300

    async def _post(self, task: Task, payload: dict[str, Any]) -> tuple[int | None, str | None]:
        """POST once; the receiver's HTTP status, or the transport error as text."""
        try:
            answer = await self._http().post(
                task.callback_url or "",
                content=json.dumps(payload).encode(),
                headers=self._headers(task.task_id),
                timeout=self.state.config.callback_timeout,
            )
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return answer.status_code, None

    def _headers(self, task_id: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = self.state.config.webhook_hmac_key
        if key:
            timestamp = str(int(time.time()))
            headers["X-Webhook-Timestamp"] = timestamp
            headers["X-Webhook-Signature"] = sign(key, task_id, timestamp)
        return headers

    def _http(self) -> httpx.AsyncClient:
        # trust_env=False: a proxy set in the environment must not swallow callbacks to localhost
        if self._client is None:
            limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
            self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False, limits=limits)
        return self._client
