"""
The receiver's clients.

``ReceiverClient``: the triggerer's side of the receiver's events endpoints (aiohttp). It
authenticates with a ``watch`` bearer token it mints itself from the connection (no secret
travels in trigger kwargs) and renews before expiry. Every failure (network, timeout, non-2xx)
is one :class:`ReceiverUnavailable` whose message names the method, path and status, never a
token, so callers can back off and retry without special cases.

:func:`check_receiver`: a task's check, before it submits anything in callback mode, that the
connection's ``callback_base_url`` leads to the receiver (its health route answers), so a URL
that leads nowhere fails the task naming it instead of leaving every wait to the safety-net poll.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import requests
from requests.exceptions import InvalidSchema, InvalidURL, MissingSchema

from imagecb_provider.callbacks.tokens import CALLBACKS_PATH, DEFAULT_WATCH_TTL, receiver_url, watch_token
from imagecb_provider.exceptions import ImageCbConfigurationError, ImageCbReceiverUnreachable
from imagecb_provider.models import TaskRecord, parse_timestamp

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

#: Remote task ids per lookup request (the receiver takes up to 1000).
LOOKUP_CHUNK = 500
T = TypeVar("T")
USER_AGENT = "airflow-provider-imagecb-watcher"
#: Seconds a receiver that answered its health check is trusted by this process, per URL: a batch
#: of a thousand tasks in one worker checks once every few minutes, not once per task.
RECEIVER_CHECK_TTL = 300.0
RECEIVER_CHECK_TIMEOUT = 10.0
#: Health URL -> monotonic time until which its last good answer holds.
_HEALTHY_UNTIL: dict[str, float] = {}
_HEALTHY_LOCK = threading.Lock()


class ReceiverUnavailable(Exception):
    """The receiver could not be reached or refused a request; the message holds no secret."""


@dataclass(frozen=True)
class CallbackItem:
    """
    One recorded callback, as the receiver serves it.

    :param id: its position in the receiver's log (the cursor).
    :param remote_task_id: the vendor's task id.
    :param body: the callback body as the vendor sent it.
    :param received_at: when the receiver recorded it.
    :param signed: whether the vendor's webhook signature was verified.
    :param code: the body's ``code``.
    :param purpose: ``ti`` (a waiting task) or ``asset`` (an external submission).
    :param label: the label of an ``asset`` callback.
    """

    id: int
    remote_task_id: str
    body: dict[str, Any] = field(repr=False)
    received_at: datetime
    signed: bool
    code: int | None = None
    purpose: str = "ti"
    label: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CallbackItem:
        return cls(
            id=int(data["id"]),
            remote_task_id=str(data["remote_task_id"]),
            body=dict(data.get("body") or {}),
            received_at=parse_timestamp(data.get("received_at")) or datetime.now(UTC),
            signed=bool(data.get("signed")),
            code=data.get("code"),
            purpose=str(data.get("purpose") or "ti"),
            label=data.get("label"),
        )

    def record(self) -> TaskRecord:
        """Return the callback as a :class:`TaskRecord` (completed at its reception time)."""
        return TaskRecord.from_callback(self.body, received_at=self.received_at)


class Backoff:
    """
    Exponential delays with jitter, for retrying an unavailable receiver.

    :param first: the first delay in seconds.
    :param cap: the longest delay.
    """

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        """Return the delay before the next attempt (half to all of the exponential step)."""
        step = min(self.cap, self.first * 2**self.failures)
        self.failures += 1
        return random.uniform(step / 2, step)

    def reset(self) -> None:
        self.failures = 0


class ReceiverClient:
    """
    Call the receiver's events, lookup and cursor endpoints.

    :param settings: the ``imagecb`` connection (the watch token names it; the keys of
        ``[imagecb] callback_signing_keys`` sign it).
    :param http: the aiohttp session to use (its connection pool is the caller's).
    :param base_url: the receiver's ``.../imagecb/callbacks`` URL; by default from the
        connection's ``callback_base_url``.
    :param token_ttl: seconds each minted watch token is valid.
    """

    def __init__(
        self,
        settings: ImageCbConnectionSettings,
        http: aiohttp.ClientSession,
        *,
        base_url: str | None = None,
        token_ttl: float = DEFAULT_WATCH_TTL,
    ) -> None:
        self.settings = settings
        self.http = http
        self.base_url = (base_url or receiver_url(settings)).rstrip("/")
        self.token_ttl = token_ttl
        self._token: tuple[float, str] | None = None

    def _authorization(self, *, renew: bool = False) -> str:
        now = time.time()
        if renew or self._token is None or self._token[0] - now < self.token_ttl / 3:
            self._token = (
                now + self.token_ttl,
                watch_token(self.settings, expires_in=self.token_ttl, now=now),
            )
        return f"Bearer {self._token[1]}"

    async def _request(
        self,
        method: str,
        path: str,
        parse: Callable[[dict[str, Any]], T],
        *,
        timeout: float,
        params: dict[str, Any] | None = None,
        body: Any = None,
    ) -> T:
        """Send one request and ``parse`` its JSON answer; any failure is :class:`ReceiverUnavailable`."""
        answer = await self._send(method, path, timeout=timeout, params=params, body=body)
        try:
            return parse(answer)
        except (KeyError, TypeError, ValueError):
            raise ReceiverUnavailable(f"{method} {path}: unexpected answer") from None

    async def _send(
        self, method: str, path: str, *, timeout: float, params: dict[str, Any] | None, body: Any
    ) -> Any:
        for renew in (False, True):
            headers = {"Authorization": self._authorization(renew=renew), "User-Agent": USER_AGENT}
            try:
                async with self.http.request(
                    method,
                    f"{self.base_url}{path}",
                    params=params,
                    json=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as response:
                    if response.status == 401 and not renew:
                        continue
                    if response.status != 200:
                        raise ReceiverUnavailable(f"{method} {path}: HTTP {response.status}")
                    return await response.json()
            except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                raise ReceiverUnavailable(f"{method} {path}: {type(error).__name__}") from None
        raise ReceiverUnavailable(f"{method} {path}: HTTP 401")

    async def tail(self) -> int:
        """Return the current end of the receiver's log: where a new reader starts."""
        return await self._request("GET", "/events", lambda answer: int(answer["cursor"]), timeout=30.0)

    async def events(
        self, after: int, *, wait: float, purpose: str | None = None, label: str | None = None
    ) -> tuple[list[CallbackItem], int]:
        """Long-poll the callbacks recorded after ``after``; return them and the next cursor."""
        params: dict[str, Any] = {"after": after, "wait": wait}
        if purpose:
            params["purpose"] = purpose
        if label:
            params["label"] = label
        return await self._request("GET", "/events", _page, params=params, timeout=wait + 30.0)

    async def lookup(self, remote_task_ids: Iterable[str]) -> list[CallbackItem]:
        """Return the callbacks already recorded for these remote task ids."""
        ids = sorted(set(remote_task_ids))
        found: list[CallbackItem] = []
        for start in range(0, len(ids), LOOKUP_CHUNK):
            chunk = {"remote_task_ids": ids[start : start + LOOKUP_CHUNK]}
            found += await self._request("POST", "/lookup", _items, body=chunk, timeout=30.0)
        return found

    async def cursor(self, name: str) -> int | None:
        """Return a consumer's stored position, or ``None`` when it never advanced."""
        return await self._request("GET", f"/cursors/{name}", _position, timeout=30.0)

    async def advance_cursor(self, name: str, position: int) -> int:
        """Move a consumer's stored position forward; return the stored position."""
        body = {"position": position}
        return await self._request("PUT", f"/cursors/{name}", _stored_position, body=body, timeout=30.0)


def _items(answer: dict[str, Any]) -> list[CallbackItem]:
    return [CallbackItem.from_json(item) for item in answer["items"]]


def _page(answer: dict[str, Any]) -> tuple[list[CallbackItem], int]:
    return _items(answer), int(answer["cursor"])


def _position(answer: dict[str, Any]) -> int | None:
    return None if answer["position"] is None else int(answer["position"])


def _stored_position(answer: dict[str, Any]) -> int:
    return int(answer["position"])


# --------------------------------------------------------------------------- the task's check
def check_receiver(
    settings: ImageCbConnectionSettings,
    *,
    timeout: float = RECEIVER_CHECK_TIMEOUT,
    ttl: float = RECEIVER_CHECK_TTL,
) -> str:
    """
    Check that the connection's ``callback_base_url`` leads to the receiver; return the receiver's URL.

    It sends ``GET {callback_base_url}/imagecb/callbacks/health``, which the receiver answers 200
    with ``{"status": "ok"}``.

    A good answer is trusted for ``ttl`` seconds by this process; a bad one is never kept, so a
    fixed setting takes effect at the next task.

    :param settings: the ``imagecb`` connection (its ``callback_base_url`` extra).
    :param timeout: seconds the health check may take.
    :param ttl: seconds a good answer holds for this process and URL.
    :raises ImageCbConfigurationError: no ``callback_base_url``, or an answer that is not the
        receiver's (404, another status, a redirect, a page that is not its JSON): the message
        names the URL and what came back.
    :raises ImageCbReceiverUnreachable: no answer, or 5xx (retryable).
    """
    base = receiver_url(settings)
    url = f"{base}/health"
    now = time.monotonic()
    with _HEALTHY_LOCK:
        if _HEALTHY_UNTIL.get(url, 0.0) > now:
            return base
    shown = _without_userinfo(url)
    fix = (
        f"set the extra callback_base_url of connection {settings.conn_id!r} to the public URL of the "
        "Airflow API server (or of the standalone receiver) as the vendor reaches it, e.g. "
        f"https://airflow.example.com, under which {CALLBACKS_PATH}/health answers"
    )
    try:
        # Not through proxies from the environment, like the triggerer's watcher, which reads
        # the receiver at the same URL.
        with requests.Session() as http:
            http.trust_env = False
            response = http.get(
                url,
                timeout=timeout,
                allow_redirects=False,
                headers={"Accept": "application/json", "User-Agent": USER_AGENT},
            )
    except (InvalidURL, InvalidSchema, MissingSchema) as error:
        raise ImageCbConfigurationError(
            f"Callback mode: GET {shown} is not a usable URL ({type(error).__name__}): {fix}; "
            "nothing was submitted"
        ) from None
    except requests.RequestException as error:
        raise ImageCbReceiverUnreachable(
            f"Callback mode: the callback receiver's health check GET {shown} got no answer "
            f"({type(error).__name__}): is the API server up, and is this the URL workers and the "
            f"vendor reach it at? If not, {fix}; nothing was submitted"
        ) from None
    status = response.status_code
    if status >= 500:
        detail = _detail(response)
        hint = " (if its tables are missing, run `airflow db migrate`)" if status == 503 else ""
        raise ImageCbReceiverUnreachable(
            f"Callback mode: the callback receiver's health check GET {shown} answered {status}{detail}"
            f"{hint}; nothing was submitted"
        )
    if 300 <= status < 400:
        where = _without_userinfo(response.headers.get("Location", "elsewhere"))
        raise ImageCbConfigurationError(
            f"Callback mode: GET {shown} answered {status}, a redirect to {where}: the vendor's callbacks "
            f"are POSTs and are not redirected, so {fix} (the one it redirects to); nothing was submitted"
        )
    if status != 200:
        raise ImageCbConfigurationError(
            f"Callback mode: GET {shown} answered {status}{_detail(response)}, so every callback would be "
            f"refused the same way and each wait left to its safety-net poll: {fix}; nothing was submitted"
        )
    if not _is_health_answer(response):
        kind = response.headers.get("Content-Type", "no content type")
        raise ImageCbConfigurationError(
            f"Callback mode: GET {shown} answered 200 but not the receiver's health JSON ({kind}): "
            f"something else serves that URL: {fix}; nothing was submitted"
        )
    with _HEALTHY_LOCK:
        _HEALTHY_UNTIL[url] = time.monotonic() + ttl
    return base


def _is_health_answer(response: requests.Response) -> bool:
    """Whether an answer is the receiver's health JSON, ``{"status": "ok"}``."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") == "ok"


def _detail(response: requests.Response) -> str:
    """The answer's ``detail`` (FastAPI's error text), shortened, or its first characters."""
    try:
        body = response.json()
        text = body.get("detail") if isinstance(body, dict) else None
        text = text if isinstance(text, str) else json.dumps(body)
    except ValueError:
        text = response.text
    text = " ".join((text or "").split())[:200]
    return f" ({text})" if text else ""


def _without_userinfo(url: str) -> str:
    """The URL without a ``user:password@`` part, to show in a message."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def forget_receiver_checks() -> None:
    """Forget every good health check of this process (for tests)."""
    with _HEALTHY_LOCK:
        _HEALTHY_UNTIL.clear()
