"""
Signed tokens that say whom a callback is for, carried in the callback URL itself.

A token is ``<kid>.<payload>.<grant>.<tag>``: the id of the key that signed it, then three
base64url parts without padding. The payload is a compact JSON array (version, purpose,
connection id, expiry, then the purpose's own fields). Both other parts are HMAC-SHA256 with the
key named by ``kid``:

* the *grant* signs every field but the slot: it is the same for all the requests of one task
  instance (expiries are rounded up to 10 minutes), so a task registers one secret with the
  secrets masker however many requests it sends (the masker's cost grows with each pattern);
* the *tag* (128 bits) signs the key id, the payload and the grant.

**Keys.** Tokens are signed with keys of the provider's own (:class:`TokenKeyring`), never with
anything the vendor knows: ``[imagecb] callback_signing_keys`` (``kid1:secret1,kid2:secret2``; the
first signs, all verify), or, when that is unset, keys derived (HKDF) from Airflow's
``[core] fernet_key``, which every component of a deployment already shares and the vendor never
sees. Every process that mints or verifies tokens (workers, triggerer, API server, the standalone
receiver, the ``url`` command) must see the same setting.

**Verification** reads nothing of a token before its tag verifies: the key id picks a key from
memory, the tag is checked in constant time over the token's bytes as received, and only then is
the payload decoded. A forged token therefore costs one HMAC, and every refusal carries the same
text (:data:`TOKEN_REFUSED`), whatever the reason; the reason is kept for the server's log only.
An authentic but expired token is refused with 410: only a holder of a real token can tell it
apart, and the vendor stops retrying on it.

**Rotation**: add the new key after the old one on every component, then put it first (it now
signs), and drop the old one once the tokens it signed have expired (30 days for asset URLs, or
reissue them). **Revocation**: ``[imagecb] revoked_asset_labels`` (comma-separated) refuses every
asset URL of those labels at once; hand out URLs for a new label instead. Dropping a key revokes
everything it signed.

Version 1 tokens (signed with a key derived from the connection's API key) are refused: the vendor
holds that API key and could mint them, and verifying them needs a connection lookup steered by
the unverified token. Waits that were pending at the upgrade end by their safety-net poll; asset
URLs must be made again.

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
import functools
import hashlib
import hmac
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow.sdk.log import mask_secret

from imagecb_provider.exceptions import ImageCbConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

log = logging.getLogger(__name__)

TOKEN_VERSION = 2
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
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")
#: What a token looks like (version 1 had no key id): a 256-bit grant and a 128-bit tag, base64url.
TOKEN_SHAPE = re.compile(r"(?:[A-Za-z0-9_-]{1,32}\.)?[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}\.[A-Za-z0-9_-]{22}")
#: Shortest secret accepted in ``callback_signing_keys`` (``openssl rand -base64 32`` gives 44).
MIN_SECRET_LENGTH = 32

#: The one text of every refused token, whatever the reason, so a refusal tells a stranger nothing.
TOKEN_REFUSED = "callback token is not valid"
CONFIG_SECTION = "imagecb"
SIGNING_KEYS_OPTION = "callback_signing_keys"
REVOKED_LABELS_OPTION = "revoked_asset_labels"
SIGNING_KEYS_ENV = "AIRFLOW__IMAGECB__CALLBACK_SIGNING_KEYS"

_CONFIGURED_KEY_INFO = b"imagecb callback token v2 key "
_FERNET_KEY_INFO = b"imagecb callback token v2 key from [core] fernet_key"
_KEY_ID_INFO = b"imagecb callback token key id"
_GRANT_PREFIX = b"imagecb-grant."
_TAG_PREFIX = b"imagecb-tag."
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_TEMPLATE = re.compile(r"\{[A-Z_]+\}")
#: Grants already registered with the secrets masker by this process (each costs a regex rebuild).
_MASKED: set[str] = set()
#: ``callback_base_url`` values whose receiver prefix was dropped and logged by this process.
_NORMALIZED: set[str] = set()
_FIELD_COUNTS = {PURPOSE_TI: 9, PURPOSE_WATCH: 4, PURPOSE_ASSET: 5}
_SLOT_INDEX = 8


class CallbackTokenError(Exception):
    """
    A token that cannot be trusted: malformed, forged, revoked, of the wrong purpose, or unknown connection.

    Its text is always :data:`TOKEN_REFUSED`, safe to return to a client; ``reason`` says what was
    wrong, for the server's own log. Neither ever contains the token or a key. ``status_code`` is
    the HTTP status the receiver answers with.

    :param reason: what was wrong (never returned to the client).
    """

    status_code = 403

    def __init__(self, reason: str = "refused", message: str = TOKEN_REFUSED) -> None:
        super().__init__(message)
        self.reason = reason


class ExpiredCallbackToken(CallbackTokenError):
    """An authentic token past its expiry (checked only once the tag verified)."""

    status_code = 410

    def __init__(self) -> None:
        super().__init__("expired", "callback token has expired")


# --------------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class TokenKeyring:
    """
    The keys that sign and verify callback tokens: the first signs, every one verifies.

    :param keys: ``(key id, key)`` pairs, the signing key first.
    :param revoked_labels: asset labels whose tokens are refused.
    """

    keys: tuple[tuple[str, bytes], ...] = field(repr=False)
    revoked_labels: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        ids = [kid for kid, _ in self.keys]
        if not ids:
            raise ImageCbConfigurationError(_missing_keys_message())
        if len(set(ids)) != len(ids) or not all(KEY_ID_PATTERN.fullmatch(kid) for kid in ids):
            raise ImageCbConfigurationError(
                f"[{CONFIG_SECTION}] {SIGNING_KEYS_OPTION}: key ids must be unique, 1 to 32 letters, "
                "digits, _ or -"
            )

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The key ids, the signing one first."""
        return tuple(kid for kid, _ in self.keys)

    @property
    def signing(self) -> tuple[str, bytes]:
        """The key id and key that sign new tokens."""
        return self.keys[0]

    def key(self, kid: str) -> bytes | None:
        """Return the key of ``kid``, or ``None`` when this keyring has no such key."""
        return next((key for known, key in self.keys if known == kid), None)

    @classmethod
    def from_secrets(cls, spec: str, *, revoked_labels: Iterable[str] = ()) -> TokenKeyring:
        """
        Build a keyring from ``kid1:secret1,kid2:secret2`` (the ``callback_signing_keys`` form).

        :param spec: comma-separated ``key id:secret`` pairs, the signing one first.
        :param revoked_labels: asset labels whose tokens are refused.
        :raises ImageCbConfigurationError: an entry without a key id, or a secret shorter than
            :data:`MIN_SECRET_LENGTH` (the message never contains a secret).
        """
        keys = []
        for position, entry in enumerate(e.strip() for e in spec.split(",") if e.strip()):
            kid, sep, secret = (part.strip() for part in entry.partition(":"))
            if not sep or len(secret) < MIN_SECRET_LENGTH:
                raise ImageCbConfigurationError(
                    f"[{CONFIG_SECTION}] {SIGNING_KEYS_OPTION}: entry {position + 1} is not "
                    f"'key id:secret' with a secret of at least {MIN_SECRET_LENGTH} characters "
                    "(make one with: openssl rand -base64 32)"
                )
            keys.append((kid, _derive(secret.encode(), _CONFIGURED_KEY_INFO + kid.encode())))
        return cls(tuple(keys), frozenset(revoked_labels))

    @classmethod
    def from_fernet_key(cls, fernet_key: str, *, revoked_labels: Iterable[str] = ()) -> TokenKeyring:
        """
        Derive a keyring from Airflow's ``[core] fernet_key`` (one key per comma-separated part).

        Each key id is derived from its key, so it names the key without revealing it.

        :param fernet_key: the setting's value.
        :param revoked_labels: asset labels whose tokens are refused.
        :raises ImageCbConfigurationError: a part is not a Fernet key (the message never shows it).
        """
        keys = []
        for part in (p.strip() for p in fernet_key.split(",") if p.strip()):
            if not _is_fernet_key(part):
                raise ImageCbConfigurationError(
                    "[core] fernet_key is not a list of Fernet keys (32 url-safe base64-encoded bytes "
                    f"each), so no callback signing key is derived from it: fix it or set [{CONFIG_SECTION}] "
                    f"{SIGNING_KEYS_OPTION}"
                )
            key = _derive(part.encode(), _FERNET_KEY_INFO)
            kid = "f" + _b64encode(hmac.new(key, _KEY_ID_INFO, hashlib.sha256).digest())[:5]
            keys.append((kid, key))
        return cls(tuple(keys), frozenset(revoked_labels))

    @classmethod
    def from_config(cls) -> TokenKeyring:
        """
        Return the keyring Airflow's configuration sets (read each call; parsed once per value).

        :raises ImageCbConfigurationError: neither ``[imagecb] callback_signing_keys`` nor
            ``[core] fernet_key`` is set, or the former is malformed.
        """
        conf = _airflow_conf()
        return _keyring_of(
            conf.get(CONFIG_SECTION, SIGNING_KEYS_OPTION, fallback="") or "",
            conf.get("core", "fernet_key", fallback="") or "",
            conf.get(CONFIG_SECTION, REVOKED_LABELS_OPTION, fallback="") or "",
        )


def _airflow_conf() -> Any:
    try:
        from airflow.configuration import conf
    except ImportError:  # a worker with the Task SDK only
        from airflow.sdk.configuration import conf
    return conf


@functools.lru_cache(maxsize=8)
def _keyring_of(signing_keys: str, fernet_key: str, revoked: str) -> TokenKeyring:
    labels = frozenset(label.strip() for label in revoked.split(",") if label.strip())
    if signing_keys.strip():
        return TokenKeyring.from_secrets(signing_keys, revoked_labels=labels)
    # The Task SDK's parser answers an unset fernet_key with its template, "{FERNET_KEY}": a key
    # derived from that public text would let anyone mint tokens.
    if fernet_key.strip() and not _TEMPLATE.fullmatch(fernet_key.strip()):
        return TokenKeyring.from_fernet_key(fernet_key, revoked_labels=labels)
    raise ImageCbConfigurationError(_missing_keys_message())


def _missing_keys_message() -> str:
    return (
        f"Callback tokens need a signing key: set [{CONFIG_SECTION}] {SIGNING_KEYS_OPTION} "
        f"({SIGNING_KEYS_ENV}=kid1:secret1,kid2:secret2; the first signs) or Airflow's [core] "
        "fernet_key, the same on every Airflow component"
    )


def _is_fernet_key(text: str) -> bool:
    try:
        return len(base64.b64decode(text, altchars=b"-_", validate=True)) == 32
    except ValueError:  # binascii.Error included
        return False


def _derive(secret: bytes, info: bytes) -> bytes:
    """Derive a 256-bit token key from ``secret`` (HKDF-SHA256, RFC 5869)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


# ------------------------------------------------------------------------------- tokens
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
    :param conn_id: the ``imagecb`` connection the callback is for.
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
    def encode(self, keyring: TokenKeyring | None = None) -> str:
        """
        Sign and encode the token with the keyring's signing key.

        :param keyring: the keys (Airflow's configuration by default).
        :raises ValueError: the token would be longer than :data:`MAX_TOKEN_LENGTH`.
        """
        kid, key = (keyring or TokenKeyring.from_config()).signing
        payload = _b64encode(_canonical(self._fields()))
        grant = self._grant(kid, key)
        token = f"{kid}.{payload}.{grant}.{_tag(key, kid, payload, grant)}"
        if len(token) > MAX_TOKEN_LENGTH:
            raise ValueError(
                f"the callback token would be {len(token)} characters, more than the receiver accepts "
                f"({MAX_TOKEN_LENGTH}): use shorter ids"
            )
        return token

    def grant(self, keyring: TokenKeyring | None = None) -> str:
        """
        Return the grant: the part of the token signing every field but the slot.

        :param keyring: the keys (Airflow's configuration by default).
        """
        return self._grant(*(keyring or TokenKeyring.from_config()).signing)

    def _grant(self, kid: str, key: bytes) -> str:
        fields = self._fields()
        if self.purpose == PURPOSE_TI:
            fields = fields[:_SLOT_INDEX]
        message = _GRANT_PREFIX + kid.encode() + b"." + _canonical(fields)
        return _b64encode(hmac.new(key, message, hashlib.sha256).digest())

    def _fields(self) -> list[Any]:
        head: list[Any] = [TOKEN_VERSION, self.purpose, self.conn_id, self.expires_at]
        if self.purpose == PURPOSE_TI and self.ti is not None:
            return [*head, self.ti.dag_id, self.ti.run_id, self.ti.task_id, self.ti.map_index, self.slot]
        if self.purpose == PURPOSE_ASSET:
            return [*head, self.label]
        return head

    # ------------------------------------------------------------------ decoding
    @classmethod
    def verify(
        cls,
        token: str,
        keyring: TokenKeyring | None = None,
        *,
        purposes: Iterable[str] = PURPOSES,
        now: float | None = None,
    ) -> CallbackToken:
        """
        Check a token's tag (in constant time), then its purpose, label and expiry; return its content.

        Nothing of the token but its key id is read before the tag verifies.

        :param token: the token as received.
        :param keyring: the keys (Airflow's configuration by default).
        :param purposes: the purposes acceptable where the token was presented.
        :param now: the current Unix time (for tests).
        :raises CallbackTokenError: malformed, forged, revoked or of another purpose (403).
        :raises ExpiredCallbackToken: authentic but expired (410).
        :raises ImageCbConfigurationError: no keyring given and none configured.
        """
        if isinstance(keyring, str):
            raise TypeError("verify() takes a TokenKeyring: tokens are no longer signed with an API key")
        keyring = keyring or TokenKeyring.from_config()
        kid, payload, grant, tag = _split(token)
        key = keyring.key(kid)
        if key is None:
            raise CallbackTokenError("unknown key id")
        if not hmac.compare_digest(_tag(key, kid, payload, grant), tag):
            raise CallbackTokenError("tag does not verify")
        # Authentic from here on: only now is the payload decoded.
        parsed = cls._from_fields(_payload_fields(payload))
        if not hmac.compare_digest(parsed._grant(kid, key), grant):
            raise CallbackTokenError("grant does not verify")
        if parsed.purpose not in tuple(purposes):
            raise CallbackTokenError(f"a {parsed.purpose} token where it is not accepted")
        if parsed.label is not None and parsed.label in keyring.revoked_labels:
            raise CallbackTokenError("revoked asset label")
        if parsed.expires_at < (time.time() if now is None else now):
            raise ExpiredCallbackToken()
        return parsed

    @classmethod
    def _from_fields(cls, fields: list[Any]) -> CallbackToken:
        version, purpose = fields[0], fields[1]
        supported = _is_int(version) and version == TOKEN_VERSION and isinstance(purpose, str)
        if not supported or purpose not in _FIELD_COUNTS or len(fields) != _FIELD_COUNTS[purpose]:
            raise CallbackTokenError("unsupported version or purpose")
        try:
            if purpose == PURPOSE_TI:
                ti = TaskInstanceRef(*fields[4:8])
                return cls(purpose, fields[2], fields[3], ti=ti, slot=fields[8])
            if purpose == PURPOSE_ASSET:
                return cls(purpose, fields[2], fields[3], label=fields[4])
            return cls(purpose, fields[2], fields[3])
        except (TypeError, ValueError):
            raise CallbackTokenError("malformed fields") from None


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
        ok = ok and isinstance(token.label, str) and bool(LABEL_PATTERN.fullmatch(token.label))
    elif token.purpose != PURPOSE_WATCH:
        ok = False
    if not ok:
        raise ValueError(f"invalid fields for a {token.purpose!r} callback token")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _split(token: Any) -> tuple[str, str, str, str]:
    """Split a token into its four parts, checking only their shape (no decoding)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 3:
        raise CallbackTokenError("malformed")
    kid, payload, grant, tag = token.split(".")
    if not KEY_ID_PATTERN.fullmatch(kid) or not all(_SEGMENT.fullmatch(p) for p in (payload, grant, tag)):
        raise CallbackTokenError("malformed")
    return kid, payload, grant, tag


def _payload_fields(payload: str) -> list[Any]:
    try:
        fields = json.loads(_b64decode(payload))
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise CallbackTokenError("malformed payload") from None
    if not isinstance(fields, list) or len(fields) < 4:
        raise CallbackTokenError("malformed payload")
    return fields


def _tag(key: bytes, kid: str, payload: str, grant: str) -> str:
    message = _TAG_PREFIX + f"{kid}.{payload}.{grant}".encode()
    return _b64encode(hmac.new(key, message, hashlib.sha256).digest()[:TAG_BYTES])


def _canonical(fields: list[Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode()


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    if not _SEGMENT.fullmatch(text):
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

    A ``callback_base_url`` that already ends with the receiver's prefix (``/imagecb`` or
    ``/imagecb/callbacks``, with or without a final ``/``) is taken without it, so the prefix is
    never added twice; this is logged once per process and URL.

    :param settings: the ``imagecb`` connection.
    :raises ImageCbConfigurationError: the connection has no ``callback_base_url`` extra.
    """
    if not settings.callback_base_url:
        raise ImageCbConfigurationError(
            f"Connection {settings.conn_id!r} has no callback_base_url extra: set it to the public URL of "
            "the Airflow API server (e.g. https://airflow.example.com) to receive callbacks"
        )
    given = settings.callback_base_url.rstrip("/")
    base = given
    for suffix in (CALLBACKS_PATH, MOUNT_PREFIX):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    if base != given and given not in _NORMALIZED:
        _NORMALIZED.add(given)
        log.info(
            "Connection %r: callback_base_url %s ends with %s, which the provider adds itself; "
            "using %s, so callbacks go to %s%s/...",
            settings.conn_id,
            given,
            given[len(base) :],
            base,
            base,
            CALLBACKS_PATH,
        )
    return f"{base}{CALLBACKS_PATH}"


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
    keyring: TokenKeyring | None = None,
) -> str:
    """
    Make the ``callBackUrl`` of request ``slot`` of a task instance.

    The token's grant is registered with Airflow's secrets masker (once per task instance and
    expiry), so the URL is unusable as this process's logs show it. Pass the wait's timeout plus
    :data:`VENDOR_RETRY_WINDOW` as ``expires_in`` so that the vendor's last retry is still
    accepted; the expiry is rounded up to :data:`EXPIRY_STEP`.

    :param settings: the ``imagecb`` connection the callback is for.
    :param dag_id: the waiting task instance's DAG id.
    :param run_id: its run id.
    :param task_id: its task id.
    :param map_index: its map index (-1 when not mapped).
    :param slot: the index of the request in the task's submission ledger.
    :param expires_in: seconds the URL is accepted for.
    :param now: the current Unix time (for tests).
    :param keyring: the keys that sign (Airflow's configuration by default).
    :raises ImageCbConfigurationError: no ``callback_base_url``, or no signing key configured.
    """
    claims = CallbackToken(
        PURPOSE_TI,
        settings.conn_id,
        _expiry(expires_in, now, step=EXPIRY_STEP),
        ti=TaskInstanceRef(dag_id, run_id, task_id, int(map_index)),
        slot=int(slot),
    )
    base = receiver_url(settings)
    keyring = keyring or TokenKeyring.from_config()
    _mask_once(claims.grant(keyring))
    return f"{base}/{claims.encode(keyring)}"


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
    keyring: TokenKeyring | None = None,
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
    :param keyring: the keys that sign (Airflow's configuration by default).
    :raises ValueError: a malformed label, or one listed in ``[imagecb] revoked_asset_labels``.
    """
    if not isinstance(label, str) or not LABEL_PATTERN.fullmatch(label):
        raise ValueError(
            f"label={label!r}: use 1 to 100 letters, digits or _.:- (starting with a letter or digit)"
        )
    keyring = keyring or TokenKeyring.from_config()
    if label in keyring.revoked_labels:
        # a URL the receiver refuses is worth nothing: say so now, not at the first callback
        raise ValueError(
            f"label={label!r} is revoked ([{CONFIG_SECTION}] {REVOKED_LABELS_OPTION}): use another"
        )
    token = CallbackToken(PURPOSE_ASSET, settings.conn_id, _expiry(expires_in, now), label=label)
    return f"{receiver_url(settings)}/{token.encode(keyring)}"


def watch_token(
    settings: ImageCbConnectionSettings,
    *,
    expires_in: float = DEFAULT_WATCH_TTL,
    now: float | None = None,
    keyring: TokenKeyring | None = None,
) -> str:
    """
    Mint the bearer token a triggerer sends to the events endpoints.

    Short-lived and kept in memory only; it is not registered with the secrets masker (a
    long-running triggerer mints one every few minutes and the masker's patterns would grow
    without bound), so it must never be logged: the watcher sends it in a header only.

    :param settings: the ``imagecb`` connection.
    :param expires_in: seconds the token is accepted for.
    :param now: the current Unix time (for tests).
    :param keyring: the keys that sign (Airflow's configuration by default).
    """
    return CallbackToken(PURPOSE_WATCH, settings.conn_id, _expiry(expires_in, now)).encode(keyring)
