"""Callback tokens and the vendor's webhook signature, checked as the receiver checks them."""

from __future__ import annotations

import base64
import json
import time

import pytest

from imagecb_provider.callbacks.signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookSignatureError,
    check_webhook_signature,
    webhook_signature,
)
from imagecb_provider.callbacks.tokens import (
    PURPOSE_ASSET,
    PURPOSE_TI,
    PURPOSE_WATCH,
    CallbackToken,
    CallbackTokenError,
    ExpiredCallbackToken,
    TaskInstanceRef,
    asset_callback_url,
    callback_url,
    watch_token,
)
from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings
from imagecb_provider.testing.simulator.callbacks import sign

SETTINGS = ImageCbConnectionSettings(
    conn_id="imagecb_default",
    base_url="http://sim",
    api_key="key-one",
    callback_base_url="https://airflow.example.com",
)


def _token_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def test_a_task_instance_url_round_trips_and_names_the_slot():
    url = callback_url(
        SETTINGS,
        dag_id="d",
        run_id="manual__2026-01-01T00:00:00+00:00",
        task_id="image.generate",
        map_index=7,
        slot=3,
    )
    assert url.startswith("https://airflow.example.com/imagecb/callbacks/")
    token = _token_of(url)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    claims = CallbackToken.verify(token, "key-one")
    assert claims.purpose == PURPOSE_TI
    assert claims.conn_id == "imagecb_default"
    assert claims.ti == TaskInstanceRef("d", "manual__2026-01-01T00:00:00+00:00", "image.generate", 7)
    assert claims.slot == 3
    assert len(url) < 250


def test_asset_and_watch_tokens_round_trip():
    asset = CallbackToken.verify(_token_of(asset_callback_url(SETTINGS, "studio")), "key-one")
    assert (asset.purpose, asset.label) == (PURPOSE_ASSET, "studio")
    watch = CallbackToken.verify(watch_token(SETTINGS), "key-one", purposes=[PURPOSE_WATCH])
    assert watch.purpose == PURPOSE_WATCH


def test_a_token_signed_with_another_key_is_forged():
    token = _token_of(callback_url(SETTINGS, dag_id="d", run_id="r", task_id="t"))
    with pytest.raises(CallbackTokenError) as refused:
        CallbackToken.verify(token, "key-two")
    assert refused.value.status_code == 403
    assert token not in str(refused.value)


def test_a_changed_payload_no_longer_verifies():
    token = _token_of(callback_url(SETTINGS, dag_id="d", run_id="r", task_id="t", slot=0))
    payload, grant, tag = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields[-1] = 1  # point the same signature at another slot
    forged = (
        base64.urlsafe_b64encode(json.dumps(fields, separators=(",", ":")).encode()).rstrip(b"=").decode()
    )
    with pytest.raises(CallbackTokenError):
        CallbackToken.verify(f"{forged}.{grant}.{tag}", "key-one")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "x",
        "a.b",
        "a.b.c.d",
        "not base64!.g.t",
        "W10.g.t",
        "WzEsInRpIl0.g.t",
        "x" * 5000,
        "eyJhIjoxfQ.g.t",
    ],
)
def test_malformed_tokens_are_refused_without_echoing_them(token):
    with pytest.raises(CallbackTokenError) as refused:
        CallbackToken.verify(token, "key-one")
    assert refused.value.status_code == 403
    assert not token or token not in str(refused.value)


def test_an_expired_token_is_gone_but_only_once_authentic():
    # 1000 + 60 s, rounded up to the 10-minute step: valid until 1200
    token = _token_of(callback_url(SETTINGS, dag_id="d", run_id="r", task_id="t", expires_in=60, now=1000.0))
    assert CallbackToken.verify(token, "key-one", now=1199.0).slot == 0
    with pytest.raises(ExpiredCallbackToken) as expired:
        CallbackToken.verify(token, "key-one", now=1201.0)
    assert expired.value.status_code == 410
    with pytest.raises(CallbackTokenError) as forged:
        CallbackToken.verify(token, "key-two", now=1201.0)
    assert not isinstance(forged.value, ExpiredCallbackToken)


def test_a_token_is_only_good_for_its_purpose():
    with pytest.raises(CallbackTokenError):
        CallbackToken.verify(watch_token(SETTINGS), "key-one", purposes=(PURPOSE_TI, PURPOSE_ASSET))
    ti_token = _token_of(callback_url(SETTINGS, dag_id="d", run_id="r", task_id="t"))
    with pytest.raises(CallbackTokenError):
        CallbackToken.verify(ti_token, "key-one", purposes=(PURPOSE_WATCH,))


def test_the_connection_is_read_before_verification_and_nothing_else():
    token = watch_token(SETTINGS)
    assert CallbackToken.connection_of(token) == "imagecb_default"


def test_bad_labels_and_a_missing_base_url_are_refused():
    with pytest.raises(ValueError, match="label"):
        asset_callback_url(SETTINGS, "has space")
    from imagecb_provider.exceptions import ImageCbConfigurationError

    bare = ImageCbConnectionSettings(conn_id="c", base_url="http://sim", api_key="k")
    with pytest.raises(ImageCbConfigurationError, match="callback_base_url"):
        callback_url(bare, dag_id="d", run_id="r", task_id="t")


def test_the_callback_url_is_unusable_as_logs_show_it():
    from airflow.sdk._shared.secrets_masker import redact

    url = callback_url(SETTINGS, dag_id="d", run_id="r", task_id="mask-me")
    logged = str(redact(f"submitting with {url}"))
    assert _token_of(url) not in logged
    grant = _token_of(url).split(".")[1]
    assert grant not in logged


def test_the_requests_of_one_task_share_one_masked_grant():
    """A task with many requests registers one secret: the masker's cost grows with each pattern."""
    from airflow.sdk._shared.secrets_masker import _secrets_masker

    masker = _secrets_masker()
    before = len(masker.patterns)
    urls = [
        callback_url(SETTINGS, dag_id="d", run_id="r", task_id="many-slots", slot=slot, now=5000.0)
        for slot in range(1000)
    ]
    assert len(masker.patterns) - before == 1
    grants = {_token_of(url).split(".")[1] for url in urls}
    assert len(grants) == 1
    assert len({_token_of(url).split(".")[2] for url in urls}) == 1000
    assert CallbackToken.verify(_token_of(urls[999]), "key-one", now=5000.0).slot == 999


def test_a_tag_from_another_slot_does_not_verify():
    first = _token_of(callback_url(SETTINGS, dag_id="d", run_id="r", task_id="t", slot=0, now=5000.0))
    second = _token_of(callback_url(SETTINGS, dag_id="d", run_id="r", task_id="t", slot=1, now=5000.0))
    spliced = ".".join([second.split(".")[0], *first.split(".")[1:]])
    with pytest.raises(CallbackTokenError):
        CallbackToken.verify(spliced, "key-one", now=5000.0)


def test_the_derived_key_is_not_the_api_key():
    from imagecb_provider.callbacks.tokens import token_key

    assert b"key-one" not in token_key("key-one")
    assert len(token_key("key-one")) == 32


# ----------------------------------------------------------------------- webhook signature
def _headers(key: str, task_id: str, timestamp: int) -> dict[str, str]:
    return {
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: webhook_signature(key, task_id, str(timestamp)),
    }


def test_our_signature_is_the_simulators():
    assert webhook_signature("k", "task1", "1700000000") == sign("k", "task1", "1700000000")


def test_a_fresh_valid_signature_passes():
    now = time.time()
    check_webhook_signature("k", "task1", _headers("k", "task1", int(now)), now=now)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "not signed"),
        ({TIMESTAMP_HEADER: "1700000000"}, "not signed"),
        ({TIMESTAMP_HEADER: "yesterday", SIGNATURE_HEADER: "x"}, "Unix seconds"),
        (_headers("other", "task1", 1700000000), "does not verify"),
        (_headers("k", "task2", 1700000000), "does not verify"),
        (_headers("k", "task1", 1700000000 - 301), "outside"),
        (_headers("k", "task1", 1700000000 + 301), "outside"),
    ],
)
def test_bad_signatures_are_refused(headers, reason):
    with pytest.raises(WebhookSignatureError, match=reason) as refused:
        check_webhook_signature("k", "task1", headers, now=1700000000)
    assert refused.value.status_code == 401
