"""
The vendor's optional webhook signature, checked in constant time within a replay window.

With a ``webhook_hmac_key`` on the connection, every callback must carry
``X-Webhook-Timestamp`` (Unix seconds) and ``X-Webhook-Signature`` =
``base64(HMAC-SHA256(key, taskId + "." + timestamp))``. A timestamp outside the window is
refused even with a valid signature, so a captured callback cannot be replayed later (a replay
inside the window is a duplicate, which the store records once).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping

TIMESTAMP_HEADER = "X-Webhook-Timestamp"
SIGNATURE_HEADER = "X-Webhook-Signature"
#: Seconds a signed callback's timestamp may differ from this server's clock, either way.
DEFAULT_REPLAY_WINDOW = 300.0
#: Unix seconds in ASCII digits: ``str.isdigit()`` is also true of "²" and "١٢٣", on which
#: ``int()`` raises or reads another script's digits.
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")


class WebhookSignatureError(Exception):
    """A missing, stale or wrong webhook signature; the message is a fixed, safe reason (HTTP 401)."""

    status_code = 401


def webhook_signature(key: str, task_id: str, timestamp: str) -> str:
    """Compute the vendor's signature of a callback for ``task_id`` sent at ``timestamp``."""
    digest = hmac.new(key.encode(), f"{task_id}.{timestamp}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def check_webhook_signature(
    key: str,
    task_id: str,
    headers: Mapping[str, str],
    *,
    now: float,
    window: float = DEFAULT_REPLAY_WINDOW,
) -> None:
    """
    Verify a callback's signature headers against the connection's webhook key.

    :param key: the connection's ``webhook_hmac_key``.
    :param task_id: the task id read from the callback body.
    :param headers: the request headers (a case-insensitive mapping).
    :param now: the current Unix time.
    :param window: seconds the timestamp may be off, either way.
    :raises WebhookSignatureError: missing headers, a timestamp outside the window, or a
        signature that does not match.
    """
    timestamp = (headers.get(TIMESTAMP_HEADER) or "").strip()
    signature = (headers.get(SIGNATURE_HEADER) or "").strip()
    if not timestamp or not signature:
        raise WebhookSignatureError("callback is not signed but the connection has a webhook key")
    if not _UNIX_SECONDS.fullmatch(timestamp):
        raise WebhookSignatureError("callback timestamp is not Unix seconds")
    if abs(now - int(timestamp)) > window:
        raise WebhookSignatureError("callback timestamp is outside the accepted window")
    expected = webhook_signature(key, task_id, timestamp)
    if not hmac.compare_digest(expected.encode(), signature.encode(errors="replace")):
        raise WebhookSignatureError("callback signature does not verify")
