"""
Signed tokens that say whom a callback is for, carried in the callback URL itself.

A token is ``<payload>.<grant>.<tag>``, all base64url without padding. The payload is a compact
JSON array (version, purpose, connection id, expiry, then the purpose's own fields). Both other
parts are HMAC-SHA256 with a key derived from the connection's API key
(``HMAC(api_key, "imagecb callback token v1")``), so the API server verifies a token with nothing
but the connection both sides already share, and a token never carries a secret:

* the *grant* signs every field but the slot: it is the same for all the requests of one task
  instance (expiries are rounded up to 10 minutes), so a task registers one secret with the
  secrets masker however many requests it sends (the masker's cost grows with each pattern);
* the *tag* (128 bits) signs the whole payload, slot included.

Three purposes:

* ``ti``: a waiting task instance (dag, run, task, map index) and the request *slot* (the index
  of the request in that task's submission ledger); its URL is the request's ``callBackUrl``.
* ``watch``: the short-lived bearer token a triggerer mints for itself to read the events
  endpoints; it is never sent to the vendor.
* ``asset``: a submission made outside Airflow, named by a label, for event-driven DAGs.

The token is a capability: whoever holds a ``ti`` or ``asset`` URL can post a callback to it
(the receiver still checks the vendor's signature when a webhook key is configured, and binds a
``ti`` callback to the remote task ids in the ledger). Its grant is therefore masked in the logs
of the process that makes it, the token is kept out of exception text, XCom and trigger kwargs,
and it is redacted from the access log of the server that receives it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow.sdk.log import mask_secret

from imagecb_provider.exceptions import ImageCbConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

TOKEN_VERSION = 1
PURPOSE_TI = "ti"
PURPOSE_WATCH = "watch"
PURPOSE_ASSET = "asset"
PURPOSES = (PURPOSE_TI, PURPOSE_WATCH, PURPOSE_ASSET)

#: Where the receiver is mounted on the Airflow API server (the plugin's ``url_prefix``) and
#: served by the standalone process.
MOUNT_PREFIX = "/imagecb"
CALLBACKS_PATH = f"{MOUNT_PREFIX}/callbacks"

#: The vendor retries a failed delivery after about 1, 5 and 15 minutes: a ``ti`` token must
#: outlive the wait by this much for the last retry to be accepted.
VENDOR_RETRY_WINDOW = 30 * 60.0
DEFAULT_TI_TTL = 24 * 3600.0
DEFAULT_WATCH_TTL = 15 * 60.0
DEFAULT_ASSET_TTL = 30 * 24 * 3600.0
#: ``ti`` expiries are rounded up to this many seconds, so the requests of a task share a grant.
EXPIRY_STEP = 600
MAX_TOKEN_LENGTH = 2048
TAG_BYTES = 16
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")

_KEY_CONTEXT = b"imagecb callback token v1"
_GRANT_PREFIX = b"imagecb-grant."
_TAG_PREFIX = b"imagecb-tag."
#: Grants already registered with the secrets masker by this process (each costs a regex rebuild).
_MASKED: set[str] = set()
_FIELD_COUNTS = {PURPOSE_TI: 9, PURPOSE_WATCH: 4, PURPOSE_ASSET: 5}
_SLOT_INDEX = 8


class CallbackTokenError(Exception):
    """
    A token that cannot be trusted: malformed, forged, of the wrong purpose, or unknown connection.

    The message is a fixed reason, safe to return to a client and to log: it never contains the
    token or any key. ``status_code`` is the HTTP status the receiver answers with.
    """

    status_code = 403


class ExpiredCallbackToken(CallbackTokenError):
    """An authentic token past its expiry."""

    status_code = 410


@dataclass(frozen=True)
class TaskInstanceRef:
    """The task instance a ``ti`` token names: the key of its ``task_state_store`` entries."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1


@dataclass(frozen=True)
class CallbackToken:
    """
    The verified content of a token.

    :param purpose: ``ti``, ``watch`` or ``asset``.
    :param conn_id: the ``imagecb`` connection whose API key signs the token.
    :param expires_at: Unix time (whole seconds) after which the token is refused.
    :param ti: the waiting task instance (``ti`` tokens only).
    :param slot: the index of the request in that task's ledger (``ti`` tokens only).
    :param label: the name of an external submission stream (``asset`` tokens only).
    """

    purpose: str
    conn_id: str
    expires_at: int
    ti: TaskInstanceRef | None = None
    slot: int | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        _check_fields(self)

    # ------------------------------------------------------------------ encoding
    def encode(self, api_key: str) -> str:
        """Sign and encode the token with the key derived from ``api_key``."""
        key = token_key(api_key)
        payload = _b64encode(_canonical(self._fields()))
        return f"{payload}.{self.grant(key)}.{_tag(key, payload)}"

    def grant(self, key: bytes) -> str:
        """Return the grant: the part of the token signing every field but the slot."""
        fields = self._fields()
        if self.purpose == PURPOSE_TI:
            fields = fields[:_SLOT_INDEX]
        return _b64encode(hmac.new(key, _GRANT_PREFIX + _canonical(fields), hashlib.sha256).digest())

    def _fields(self) -> list[Any]:
        head: list[Any] = [TOKEN_VERSION, self.purpose, self.conn_id, self.expires_at]
        if self.purpose == PURPOSE_TI and self.ti is not None:
            return [*head, self.ti.dag_id, self.ti.run_id, self.ti.task_id, self.ti.map_index, self.slot]
        if self.purpose == PURPOSE_ASSET:
            return [*head, self.label]
        return head

    # ------------------------------------------------------------------ decoding
    @staticmethod
    def connection_of(token: str) -> str:
        """
        Read the connection id a token claims, before it is verified.

        The receiver needs it to find the key that verifies the rest; nothing else in the
        payload may be used until :meth:`verify` succeeds.
        """
        conn_id = _payload_fields(token)[2]
        if not isinstance(conn_id, str) or not conn_id:
            raise CallbackTokenError("malformed callback token")
        return conn_id

    @classmethod
    def verify(
        cls,
        token: str,
        api_key: str,
        *,
        purposes: Iterable[str] = PURPOSES,
        now: float | None = None,
    ) -> CallbackToken:
        """
        Check a token's signature (in constant time), purpose and expiry, and return its content.

        :param token: the token as received.
        :param api_key: the API key of the connection the token names.
        :param purposes: the purposes acceptable where the token was presented.
        :param now: the current Unix time (for tests).
        :raises CallbackTokenError: malformed, forged, or of another purpose (403).
        :raises ExpiredCallbackToken: authentic but expired (410).
        """
        fields = _payload_fields(token)
        payload, grant, tag = token.split(".")
        parsed = cls._from_fields(fields)
        key = token_key(api_key)
        grant_ok = hmac.compare_digest(parsed.grant(key).encode(), grant.encode())
        tag_ok = hmac.compare_digest(_tag(key, payload).encode(), tag.encode())
        if not (grant_ok and tag_ok):
            raise CallbackTokenError("callback token signature does not verify")
        if parsed.purpose not in tuple(purposes):
            raise CallbackTokenError("callback token is not valid for this endpoint")
        if parsed.expires_at < (time.time() if now is None else now):
            raise ExpiredCallbackToken("callback token has expired")
        return parsed

    @classmethod
    def _from_fields(cls, fields: list[Any]) -> CallbackToken:
        version, purpose = fields[0], fields[1]
        if version != TOKEN_VERSION or purpose not in _FIELD_COUNTS or len(fields) != _FIELD_COUNTS[purpose]:
            raise CallbackTokenError("unsupported callback token")
        try:
            if purpose == PURPOSE_TI:
                ti = TaskInstanceRef(*fields[4:8])
                return cls(purpose, fields[2], fields[3], ti=ti, slot=fields[8])
            if purpose == PURPOSE_ASSET:
                return cls(purpose, fields[2], fields[3], label=fields[4])
            return cls(purpose, fields[2], fields[3])
        except (TypeError, ValueError):
            raise CallbackTokenError("malformed callback token") from None


def _check_fields(token: CallbackToken) -> None:
    """Refuse a token whose fields do not fit its purpose (at creation and at decoding)."""
    ok = isinstance(token.conn_id, str) and 0 < len(token.conn_id) <= 250
    ok = ok and isinstance(token.expires_at, int) and not isinstance(token.expires_at, bool)
    if token.purpose == PURPOSE_TI:
        ti = token.ti
        ok = ok and ti is not None and _is_int(token.slot) and (token.slot or 0) >= 0
        ok = (
            ok
            and ti is not None
            and all(isinstance(v, str) and v for v in (ti.dag_id, ti.run_id, ti.task_id))
        )
        ok = ok and ti is not None and _is_int(ti.map_index) and ti.map_index >= -1
    elif token.purpose == PURPOSE_ASSET:
        ok = ok and isinstance(token.label, str) and bool(LABEL_PATTERN.match(token.label))
    elif token.purpose != PURPOSE_WATCH:
        ok = False
    if not ok:
        raise ValueError(f"invalid fields for a {token.purpose!r} callback token")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _payload_fields(token: str) -> list[Any]:
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
        raise CallbackTokenError("malformed callback token")
    try:
        fields = json.loads(_b64decode(token.partition(".")[0]))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise CallbackTokenError("malformed callback token") from None
    if not isinstance(fields, list) or len(fields) < 4:
        raise CallbackTokenError("malformed callback token")
    return fields


def token_key(api_key: str) -> bytes:
    """Derive the token signing key from a connection's API key (the key itself never signs)."""
    return hmac.new(api_key.encode(), _KEY_CONTEXT, hashlib.sha256).digest()


def _tag(key: bytes, payload: str) -> str:
    return _b64encode(hmac.new(key, _TAG_PREFIX + payload.encode(), hashlib.sha256).digest()[:TAG_BYTES])


def _canonical(fields: list[Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode()


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------- the helpers
def _expiry(expires_in: float, now: float | None, *, step: int = 1) -> int:
    if expires_in <= 0:
        raise ValueError(f"expires_in={expires_in!r}: must be a positive number of seconds")
    return math.ceil(((time.time() if now is None else now) + expires_in) / step) * step


def _mask_once(secret: str) -> None:
    """Register ``secret`` with Airflow's secrets masker, once per process."""
    if secret not in _MASKED:
        mask_secret(secret)
        _MASKED.add(secret)


def receiver_url(settings: ImageCbConnectionSettings) -> str:
    """
    Return the receiver's base URL (``{callback_base_url}/imagecb/callbacks``) for a connection.

    :raises ImageCbConfigurationError: the connection has no ``callback_base_url`` extra.
    """
    if not settings.callback_base_url:
        raise ImageCbConfigurationError(
            f"Connection {settings.conn_id!r} has no callback_base_url extra: set it to the public URL of "
            "the Airflow API server (e.g. https://airflow.example.com) to receive callbacks"
        )
    return f"{settings.callback_base_url}{CALLBACKS_PATH}"


def callback_url(
    settings: ImageCbConnectionSettings,
    *,
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int = -1,
    slot: int = 0,
    expires_in: float = DEFAULT_TI_TTL,
    now: float | None = None,
) -> str:
    """
    Make the ``callBackUrl`` of request ``slot`` of a task instance.

    The token's grant is registered with Airflow's secrets masker (once per task instance and
    expiry), so the URL is unusable as this process's logs show it. Pass the wait's timeout plus
    :data:`VENDOR_RETRY_WINDOW` as ``expires_in`` so that the vendor's last retry is still
    accepted; the expiry is rounded up to :data:`EXPIRY_STEP`.

    :param settings: the ``imagecb`` connection (its API key signs the token).
    :param dag_id: the waiting task instance's DAG id.
    :param run_id: its run id.
    :param task_id: its task id.
    :param map_index: its map index (-1 when not mapped).
    :param slot: the index of the request in the task's submission ledger.
    :param expires_in: seconds the URL is accepted for.
    :param now: the current Unix time (for tests).
    """
    claims = CallbackToken(
        PURPOSE_TI,
        settings.conn_id,
        _expiry(expires_in, now, step=EXPIRY_STEP),
        ti=TaskInstanceRef(dag_id, run_id, task_id, int(map_index)),
        slot=int(slot),
    )
    base = receiver_url(settings)
    _mask_once(claims.grant(token_key(settings.api_key)))
    return f"{base}/{claims.encode(settings.api_key)}"


def callback_url_for_context(
    settings: ImageCbConnectionSettings,
    context: Any,
    *,
    slot: int = 0,
    expires_in: float = DEFAULT_TI_TTL,
) -> str:
    """
    Make the ``callBackUrl`` of request ``slot`` of the task instance running ``context``.

    :param settings: the ``imagecb`` connection.
    :param context: the task's Airflow context (its ``ti`` names the task instance).
    :param slot: the index of the request in the task's submission ledger.
    :param expires_in: seconds the URL is accepted for.
    """
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    return callback_url(
        settings,
        dag_id=ti.dag_id,
        run_id=ti.run_id,
        task_id=ti.task_id,
        map_index=-1 if map_index is None else map_index,
        slot=slot,
        expires_in=expires_in,
    )


def asset_callback_url(
    settings: ImageCbConnectionSettings,
    label: str,
    *,
    expires_in: float = DEFAULT_ASSET_TTL,
    now: float | None = None,
) -> str:
    """
    Make a ``callBackUrl`` for a submission made outside Airflow, for event-driven DAGs.

    Every callback posted to it is recorded under ``label`` and fires the
    :class:`~imagecb_provider.triggers.callback_event.ImageCallbackEventTrigger` watching that
    label (or all labels). It is meant to be handed to another system, so it is not masked.

    :param settings: the ``imagecb`` connection.
    :param label: letters, digits and ``_.:-``, up to 100 characters.
    :param expires_in: seconds the URL is accepted for (30 days by default).
    :param now: the current Unix time (for tests).
    """
    if not isinstance(label, str) or not LABEL_PATTERN.match(label):
        raise ValueError(
            f"label={label!r}: use 1 to 100 letters, digits or _.:- (starting with a letter or digit)"
        )
    token = CallbackToken(PURPOSE_ASSET, settings.conn_id, _expiry(expires_in, now), label=label)
    return f"{receiver_url(settings)}/{token.encode(settings.api_key)}"


def watch_token(
    settings: ImageCbConnectionSettings, *, expires_in: float = DEFAULT_WATCH_TTL, now: float | None = None
) -> str:
    """
    Mint the bearer token a triggerer sends to the events endpoints.

    Short-lived and kept in memory only; it is not registered with the secrets masker (a
    long-running triggerer mints one every few minutes and the masker's patterns would grow
    without bound), so it must never be logged: the watcher sends it in a header only.

    :param settings: the ``imagecb`` connection.
    :param expires_in: seconds the token is accepted for.
    :param now: the current Unix time (for tests).
    """
    return CallbackToken(PURPOSE_WATCH, settings.conn_id, _expiry(expires_in, now)).encode(settings.api_key)
