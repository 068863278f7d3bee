"""
Hooks for the image API: ``ImageCbHook`` for workers, ``ImageCbAsyncHook`` for triggers.

They own every byte that goes to the API. Both read the ``imagecb`` connection through one
:class:`ImageCbConnectionSettings`, speak through :func:`~.protocol.parse_envelope` and retry
through one :class:`~.protocol.RetryPolicy`, so the two never disagree about what an answer
means. File downloads go through :func:`~.downloads.download`, which fetches only from the hosts
the connection allows.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import aiohttp
import requests
from airflow.sdk import BaseHook
from airflow.sdk.log import mask_secret
from asgiref.sync import sync_to_async
from requests import PreparedRequest, Session
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.exceptions import ConnectTimeoutError

from imagecb_provider.exceptions import (
    ImageCbApiError,
    ImageCbConfigurationError,
    ImageCbConnectionError,
    ImageCbProtocolError,
    ImageCbSubmissionUncertain,
)
from imagecb_provider.hooks.downloads import FileHost, allowed_file_hosts, download, parse_file_hosts
from imagecb_provider.hooks.protocol import (
    CREDIT_PATH,
    DEFAULT_BASE_URL,
    DEFAULT_RETRY_POLICY,
    DEFAULT_SUBMISSIONS_PER_10S,
    DEFAULT_TIMEOUT,
    DOWNLOAD_URL_PATH,
    GENERATE_PATH,
    RECORD_INFO_PATH,
    RETRYABLE_ERRORS,
    USER_AGENT,
    RetryPolicy,
    parse_envelope,
    record_from_answer,
    record_from_error,
    without_query,
)
from imagecb_provider.hooks.uploads import UploadedFile, parse_upload_base_url, stream_upload
from imagecb_provider.models import GenerationRequest, TaskRecord, remote_task_id

CONN_TYPE = "imagecb"
DEFAULT_CONN_ID = "imagecb_default"
MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ImageCbConnectionSettings:
    """
    What an ``imagecb`` connection says, read once per hook.

    The keys are excluded from ``repr`` and registered with Airflow's secrets masker, so a log
    line or a traceback that happens to include them shows ``***``.

    Where files are downloaded from (:meth:`download_hosts`), for every link and every redirect:

    * the connection's own API host (any port), over https, and over plain http when the
      connection itself uses http (the simulator serves its files from its own host);
    * when the connection uses the vendor's API (host empty or ``https://api.kie.ai``), the
      vendor's file hosts, :data:`~imagecb_provider.hooks.downloads.VENDOR_FILE_HOSTS`
      (``tempfile.aiquickdraw.com``, ``*.r2.cloudflarestorage.com``);
    * the hosts of the ``file_hosts`` extra, added to those: a list, or a comma-separated
      string, of ``host``, ``host:port`` or ``*.domain`` (any subdomain), https only; prefix an
      entry with ``http://`` to allow plain http for it.

    Uploads go to the ``upload_base_url`` extra (``http(s)://host[:port]``, no credentials, query
    or fragment); without it to the vendor's upload host when the connection uses the vendor's
    API, else to the connection's own host (see :func:`~.uploads.upload_base_url`).

    A host's addresses must be public (not loopback, private, link-local, multicast, reserved or
    unspecified) unless the connection names that exact host: its own API host or a ``file_hosts``
    entry without ``*``. A wildcard or a vendor host that resolves to such an address is refused.
    """

    conn_id: str
    base_url: str
    api_key: str = field(repr=False)
    callback_base_url: str | None = None
    webhook_hmac_key: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    submissions_per_10s: float = DEFAULT_SUBMISSIONS_PER_10S
    #: The slots of the pool the submitting tasks run in; each task paces at its share of the limit.
    submission_slots: int = 1
    file_hosts: tuple[FileHost, ...] = ()
    upload_base_url: str | None = None

    @classmethod
    def from_connection(cls, conn: Any) -> ImageCbConnectionSettings:
        extra = conn.extra_dejson or {}
        api_key = conn.password or ""
        if not api_key:
            raise ImageCbConfigurationError(
                f"Connection {conn.conn_id!r} has no API key: put the key in the connection's password field"
            )
        hmac_key = extra.get("webhook_hmac_key") or None
        try:
            file_hosts = parse_file_hosts(extra.get("file_hosts"))
        except ValueError as error:
            raise ImageCbConfigurationError(
                f"Connection {conn.conn_id!r} has an invalid file_hosts extra: {error}; give hosts such as "
                '"files.example.com", "files.example.com:8443", "*.example.com" or "http://10.0.0.5:8080"'
            ) from None
        try:
            upload_base = parse_upload_base_url(extra.get("upload_base_url"))
        except ValueError as error:
            raise ImageCbConfigurationError(
                f"Connection {conn.conn_id!r} has an invalid upload_base_url extra: {error}; give a URL "
                'such as "https://kieai.redpandaai.co", or leave it out for the default'
            ) from None
        per_10s = _positive(
            conn.conn_id, "submissions_per_10s", extra.get("submissions_per_10s"), DEFAULT_SUBMISSIONS_PER_10S
        )
        slots = _submission_slots(conn.conn_id, extra.get("submission_slots"), per_10s)
        mask_secret(api_key)
        if hmac_key:
            mask_secret(hmac_key)
        return cls(
            conn_id=conn.conn_id,
            base_url=_base_url(conn),
            api_key=api_key,
            callback_base_url=(extra.get("callback_base_url") or "").rstrip("/") or None,
            webhook_hmac_key=hmac_key,
            timeout=_positive(conn.conn_id, "timeout", extra.get("timeout"), DEFAULT_TIMEOUT),
            submissions_per_10s=per_10s,
            submission_slots=slots,
            file_hosts=file_hosts,
            upload_base_url=upload_base,
        )

    @property
    def share_per_10s(self) -> float:
        """One submitting task's share of the account's limit (see :mod:`~imagecb_provider.utils.pacing`)."""
        return self.submissions_per_10s / self.submission_slots

    def download_hosts(self) -> tuple[FileHost, ...]:
        """Every host this connection downloads files from (see the class docstring)."""
        return allowed_file_hosts(self.base_url, self.file_hosts)

    def headers(self) -> dict[str, str]:
        """Every header a call sends but the key (that one travels through :class:`BearerAuth`)."""
        return {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": USER_AGENT}

    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def scrubbed(self, error: ImageCbApiError) -> ImageCbApiError:
        """
        The same error with the keys blanked out of the vendor's message.

        The message is the vendor's text, shown as is; a proxy or a misbehaving API could echo
        the request into it, and exception texts reach task logs and the UI. The query of any
        link it quotes goes too (a pre-signed file link sent to download-url).
        """
        secrets = [s for s in (self.api_key, self.webhook_hmac_key) if s]
        msg = without_query(error.msg)
        if msg == error.msg and not any(secret in msg for secret in secrets):
            return error
        for secret in secrets:
            msg = msg.replace(secret, "***")
        return type(error)(error.code, msg, error.endpoint, retry_after=error.retry_after)


class BearerAuth(AuthBase):
    """Put the API key on each request as it is sent, so no hook attribute changes per call."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def __call__(self, request: PreparedRequest) -> PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._api_key}"
        return request


def _base_url(conn: Any) -> str:
    host = (conn.host or "").strip().rstrip("/")
    if not host:
        return DEFAULT_BASE_URL
    if "://" not in host:
        host = f"{conn.schema or 'https'}://{host}"
    return f"{host}:{conn.port}" if conn.port else host


def _positive(conn_id: str, name: str, value: Any, default: float) -> float:
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if number <= 0:
        raise ImageCbConfigurationError(
            f"Connection {conn_id!r} has extra {name}={value!r}: it must be a positive number; "
            f"leave it out for the default ({default:g})"
        )
    return number


#: Each pool slot keeps at least this many submissions per 10 s (one a second), so a task's start
#: (over a second) separates its slot's last submission from the next task's first.
MIN_SHARE_PER_10S = 10.0


def _submission_slots(conn_id: str, value: Any, per_10s: float) -> int:
    if value in (None, ""):
        return 1
    most = max(1, int(per_10s // MIN_SHARE_PER_10S))
    fix = (
        "give the number of slots of the pool imagecb_submissions (an integer from 1 to "
        f"{most} at submissions_per_10s={per_10s:g}), or leave it out for 1"
    )
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().isdigit():
        raise ImageCbConfigurationError(f"Connection {conn_id!r} has extra submission_slots={value!r}: {fix}")
    slots = int(value)
    if slots < 1:
        raise ImageCbConfigurationError(f"Connection {conn_id!r} has extra submission_slots={value!r}: {fix}")
    if per_10s / slots < MIN_SHARE_PER_10S and slots > 1:
        raise ImageCbConfigurationError(
            f"Connection {conn_id!r} has extra submission_slots={value!r}: each slot must keep at least "
            f"{MIN_SHARE_PER_10S:g} submissions per 10 s of the account's {per_10s:g}; {fix}"
        )
    return slots


def _never_reached_server(error: requests.RequestException) -> bool:
    """Whether ``requests`` failed before the request left this machine (then a resend is safe)."""
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return True
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return isinstance(reason, ConnectTimeoutError)  # NewConnectionError (refused, DNS) derives from it


class ImageCbHook(BaseHook):
    """
    Talk to the image API from a worker.

    Calls are stateless: each builds its own request, with the key added by :class:`BearerAuth`
    and a session per thread, so one hook may serve a pool of download threads. Its public
    methods are its own paths only: based on ``BaseHook`` rather than ``HttpHook``, it has no
    generic ``run()`` that could send a connection extra (the HMAC key) anywhere.

    :param imagecb_conn_id: the ``imagecb`` connection: host = base URL (empty means
        ``https://api.kie.ai``), password = API key, extras ``timeout`` (seconds per request),
        ``submissions_per_10s`` (the account's rate limit), ``submission_slots`` (the slots of
        the pool ``imagecb_submissions``: each submitting task paces at its share), ``callback_base_url`` and
        ``webhook_hmac_key`` (callback mode), ``file_hosts`` (where files may be downloaded
        from besides the API host and the vendor's file hosts) and ``upload_base_url`` (where
        :meth:`upload_file` sends files): see :class:`ImageCbConnectionSettings`.
    :param retry_policy: how transient errors (429, 455, 5xx, network) are retried.
    """

    conn_name_attr = "imagecb_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = CONN_TYPE
    hook_name = "Kie.ai Flux Kontext images"

    def __init__(
        self, imagecb_conn_id: str = DEFAULT_CONN_ID, retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY
    ) -> None:
        super().__init__()
        self.imagecb_conn_id = imagecb_conn_id
        self.retry_policy = retry_policy
        self._sessions = threading.local()

    @cached_property
    def settings(self) -> ImageCbConnectionSettings:
        return ImageCbConnectionSettings.from_connection(self.get_connection(self.imagecb_conn_id))

    def get_conn(self) -> Session:
        """Return a session with the bearer key and no other value from the connection."""
        settings = self.settings
        session = Session()
        session.headers.update(settings.headers())
        session.auth = BearerAuth(settings.api_key)
        adapter = HTTPAdapter(pool_maxsize=32)  # one hook serves a pool of download threads
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def _session(self) -> Session:
        session = getattr(self._sessions, "session", None)
        if session is None:
            session = self._sessions.session = self.get_conn()
        return session

    # ----------------------------------------------------------------------- API calls
    def submit(self, request: GenerationRequest, *, retry: bool = True) -> str:
        """
        Submit one generation and return the remote task id.

        Transient errors are retried only when the API provably did not take the request (an
        error answer, or a connection that never opened); a request sent without an answer
        raises :class:`ImageCbSubmissionUncertain` rather than risk paying twice. An answer that
        says how the generation ended (501, or 408 to a submission) raises an
        :class:`~imagecb_provider.exceptions.ImageCbOutcomeAnswer` at once, never retried: nothing
        was created, and resending it would meet the same answer.

        :param request: what to generate.
        :param retry: ``False`` makes one attempt, for a caller that retries itself (and records
            between attempts that nothing is in flight).
        """
        policy = None if retry else replace(self.retry_policy, max_attempts=1)
        data = self._call("POST", GENERATE_PATH, json=request.to_payload(), idempotent=False, policy=policy)
        task_id = data.get("taskId") if isinstance(data, dict) else None
        if not task_id:
            raise ImageCbProtocolError(
                f"imagecb API accepted a submission on {GENERATE_PATH} but gave no taskId"
            )
        # The id becomes a file name, a URL part and a key: one of any other form is refused
        # (InvalidRemoteTaskId) before it is logged or used.
        task_id = remote_task_id(task_id, "the submit answer")
        self.log.info("Submitted image task %s (%s)", task_id, request.model or "default model")
        return task_id

    def get_task(self, task_id: str) -> TaskRecord:
        """
        Return the task's current record (state, outcome, URLs).

        A task the API does not know, in any of the forms it answers so (404; 200 with code 422
        "The record does not exist"; ``data: null``), raises
        :class:`~imagecb_provider.exceptions.ImageCbTaskUnknown` naming the task; a 501 answer is the
        task's record, ended ``generation_failed``; 408 is retried like any transient error.

        :param task_id: the remote task id.
        """
        try:
            data = self._call("GET", RECORD_INFO_PATH, params={"taskId": task_id})
        except ImageCbApiError as error:
            return record_from_error(error, task_id)
        return record_from_answer(data, task_id)

    def get_credits(self) -> float:
        """Credits left on the account."""
        return float(self._call("GET", CREDIT_PATH))

    def get_download_url(self, url: str) -> str:
        """A fresh direct link (valid about 20 minutes) for a file URL the service generated."""
        data = self._call("POST", DOWNLOAD_URL_PATH, json={"url": url})
        if not isinstance(data, str) or not data:
            raise ImageCbProtocolError(f"imagecb API gave no URL on {DOWNLOAD_URL_PATH}")
        return data

    def fetch_file(self, url: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """
        Download a generated file; returns its bytes and content type.

        Sent without the API key: file links are pre-signed and may live on another host, which
        must never see the key. Only the hosts the connection allows are fetched from, on every
        redirect too (see :class:`ImageCbConnectionSettings`); any other link raises
        :class:`~imagecb_provider.exceptions.ImageCbDownloadRefused` at once. A refused or expired link raises
        :class:`ImageCbLinkExpired` at once (ask for a fresh link instead); network errors and
        5xx are retried.

        :param url: the file's link.
        :param max_bytes: refuse a larger file while it downloads (default :data:`MAX_FILE_BYTES`).
        """
        limit = MAX_FILE_BYTES if max_bytes is None else max_bytes
        settings = self.settings
        return self.retry_policy.retrying(RETRYABLE_ERRORS)(
            download,
            url,
            settings.download_hosts(),
            conn_id=settings.conn_id,
            timeout=settings.timeout,
            max_bytes=limit,
        )

    def upload_file(self, data: bytes, *, file_name: str, upload_path: str) -> UploadedFile:
        """
        Upload a file through the vendor's free File Upload API; return it with its temporary link.

        A stream (multipart) upload to the connection's upload host (see
        :class:`ImageCbConnectionSettings`); 429, 5xx and network errors are retried through the
        hook's retry policy (an upload is free, so a resend costs nothing). The vendor deletes
        uploaded files after about 24 hours. See :func:`~.uploads.stream_upload`.

        :param data: the file's bytes.
        :param file_name: the name to store it under; the same name in the same path overwrites.
        :param upload_path: the folder to store it in (the vendor's ``uploadPath``).
        """
        uploaded = stream_upload(
            self._session(),
            self.settings,
            self.retry_policy,
            data,
            file_name=file_name,
            upload_path=upload_path,
        )
        self.log.info(
            "Uploaded %s (%d bytes, sha256 %s) to %s",
            uploaded.file_name,
            uploaded.size,
            uploaded.sha256[:12],
            without_query(uploaded.download_url),
        )
        return uploaded

    def test_connection(self) -> tuple[bool, str]:
        """What the UI's Test button calls: one authenticated, free call (the credit balance), no retries."""
        try:
            credits = float(self._call("GET", CREDIT_PATH, policy=replace(self.retry_policy, max_attempts=1)))
        except Exception as error:
            return False, str(error)
        return True, f"Connected to {self.settings.base_url}: {credits:g} credits left"

    # ------------------------------------------------------------------------ plumbing
    def _call(
        self,
        method: str,
        endpoint: str,
        *,
        params: dict[str, Any] | None = None,
        json: dict[str, Any] | None = None,
        idempotent: bool = True,
        policy: RetryPolicy | None = None,
    ) -> Any:
        retrying = (policy or self.retry_policy).retrying(RETRYABLE_ERRORS)
        return retrying(self._request_once, method, endpoint, params, json, idempotent)

    def _request_once(
        self, method: str, endpoint: str, params: dict | None, json: dict | None, idempotent: bool
    ) -> Any:
        url = self.settings.base_url + endpoint
        try:
            response = self._session().request(
                method, url, params=params, json=json, timeout=self.settings.timeout
            )
        except requests.RequestException as error:
            if idempotent or _never_reached_server(error):
                raise ImageCbConnectionError(
                    f"Could not reach the imagecb API on {endpoint}: {error}"
                ) from error
            raise ImageCbSubmissionUncertain(
                f"The submission to {endpoint} was sent but no answer came back ({type(error).__name__}); "
                "the API may have accepted and charged it. It is not resent automatically, so the image "
                "is never paid twice: check the account, then clear the task to submit again."
            ) from error
        try:
            return parse_envelope(response.status_code, response.content, response.headers, endpoint)
        except ImageCbApiError as error:
            raise self.settings.scrubbed(error) from None


class _SharedSessions:
    """
    One ``aiohttp`` session per event loop, shared by the async hooks of every trigger in it.

    A triggerer runs all its triggers in one loop: a thousand waits then reuse a few pooled
    connections instead of opening one per status call. A trigger holds the session while it
    runs (:meth:`use`); the last one out closes it. A call outside any ``use`` gets its own
    one-off session.
    """

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list] = (
            weakref.WeakKeyDictionary()
        )

    @asynccontextmanager
    async def use(self) -> AsyncIterator[aiohttp.ClientSession]:
        loop = asyncio.get_running_loop()
        held = self._by_loop.get(loop)
        if held is None or held[0].closed:
            held = self._by_loop[loop] = [aiohttp.ClientSession(trust_env=False), 0]
        held[1] += 1
        try:
            yield held[0]
        finally:
            held[1] -= 1
            if held[1] == 0:
                self._by_loop.pop(loop, None)
                await held[0].close()

    def current(self) -> aiohttp.ClientSession | None:
        held = self._by_loop.get(asyncio.get_running_loop())
        return held[0] if held is not None and not held[0].closed else None


SHARED_SESSIONS = _SharedSessions()


class ImageCbAsyncHook(BaseHook):
    """
    The async twin of :class:`ImageCbHook` for triggers: same connection, answers and retries.

    The connection is read in a worker thread (``sync_to_async``): ``aget_connection`` cannot
    read connections stored in the database under ``airflow dags test``. Requests go through
    the event loop's shared session.
    """

    conn_name_attr = "imagecb_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = CONN_TYPE
    hook_name = "Kie.ai Flux Kontext images"

    def __init__(
        self, imagecb_conn_id: str = DEFAULT_CONN_ID, retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY
    ) -> None:
        super().__init__()
        self.imagecb_conn_id = imagecb_conn_id
        self.retry_policy = retry_policy
        self._settings: ImageCbConnectionSettings | None = None

    async def settings(self) -> ImageCbConnectionSettings:
        if self._settings is None:
            conn = await sync_to_async(self.get_connection)(self.imagecb_conn_id)
            self._settings = ImageCbConnectionSettings.from_connection(conn)
        return self._settings

    async def get_task(self, task_id: str) -> TaskRecord:
        """
        Return the task's current record; transient errors are retried without blocking the loop.

        Answers mean what they mean to :meth:`ImageCbHook.get_task`.

        :param task_id: the remote task id.
        """
        retrying = self.retry_policy.async_retrying(RETRYABLE_ERRORS)
        try:
            data = await retrying(self._request_once, "GET", RECORD_INFO_PATH, params={"taskId": task_id})
        except ImageCbApiError as error:
            return record_from_error(error, task_id)
        return record_from_answer(data, task_id)

    async def _request_once(self, method: str, endpoint: str, params: dict | None = None) -> Any:
        settings = await self.settings()
        try:
            async with AsyncExitStack() as stack:
                session = SHARED_SESSIONS.current() or await stack.enter_async_context(SHARED_SESSIONS.use())
                response = await stack.enter_async_context(
                    session.request(
                        method,
                        settings.base_url + endpoint,
                        params=params,
                        headers={**settings.headers(), **settings.auth_header()},
                        timeout=aiohttp.ClientTimeout(total=settings.timeout),
                    )
                )
                body = await response.read()
        except (TimeoutError, aiohttp.ClientError) as error:
            raise ImageCbConnectionError(
                f"Could not reach the imagecb API on {endpoint}: {type(error).__name__}: {error}"
            ) from error
        try:
            return parse_envelope(response.status, body, response.headers, endpoint)
        except ImageCbApiError as error:
            raise settings.scrubbed(error) from None
