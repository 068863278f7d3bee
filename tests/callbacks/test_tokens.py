"""Callback tokens and the vendor's webhook signature, checked as the receiver checks them."""

from __future__ import annotations

import base64
import json
import time

import pytest
from cbhelpers import OTHER_SIGNING_KEYS, SIGNING_KEYS, keyring

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
    TOKEN_REFUSED,
    CallbackToken,
    CallbackTokenError,
    ExpiredCallbackToken,
    TaskInstanceRef,
    TokenKeyring,
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


KEYS = keyring()
OTHER_KEYS = keyring(OTHER_SIGNING_KEYS)


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
    claims = CallbackToken.verify(token, KEYS)
    assert claims.purpose == PURPOSE_TI
    assert claims.conn_id == "imagecb_default"
    assert claims.ti == TaskInstanceRef("d", "manual__2026-01-01T00:00:00+00:00", "image.generate", 7)
    assert claims.slot == 3
    assert len(url) < 250


def test_asset_and_watch_tokens_round_trip():
    asset = CallbackToken.verify(_token_of(asset_callback_url(SETTINGS, "studio")), KEYS)
    assert (asset.purpose, asset.label) == (PURPOSE_ASSET, "studio")
    watch = CallbackToken.verify(watch_token(SETTINGS), KEYS, purposes=[PURPOSE_WATCH])
    assert watch.purpose == PURPOSE_WATCH


def test_a_token_signed_with_other_keys_is_forged():
    token = _token_of(callback_url(SETTINGS, dag_id="d", run_id="r", task_id="t"))
    with pytest.raises(CallbackTokenError) as refused:
        CallbackToken.verify(token, OTHER_KEYS)
    assert refused.value.status_code == 403
    assert token not in str(refused.value)
    assert token not in refused.value.reason


def test_a_changed_payload_no_longer_verifies():
    token = _token_of(callback_url(SETTINGS, dag_id="d", run_id="r", task_id="t", slot=0))
    kid, payload, grant, tag = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields[-1] = 1  # point the same signature at another slot
    forged = (
        base64.urlsafe_b64encode(json.dumps(fields, separators=(",", ":")).encode()).rstrip(b"=").decode()
    )
    with pytest.raises(CallbackTokenError):
        CallbackToken.verify(f"{kid}.{forged}.{grant}.{tag}", KEYS)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "x",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "a.b.c.d.e",
        "t1.not base64!.g.t",
        "W10.g.t",
        "WzEsInRpIl0.g.t",
        "x" * 5000,
        "eyJhIjoxfQ.g.t",
    ],
)
def test_malformed_tokens_are_refused_without_echoing_them(token):
    with pytest.raises(CallbackTokenError) as refused:
        CallbackToken.verify(token, KEYS)
    assert refused.value.status_code == 403
    assert str(refused.value) == TOKEN_REFUSED
    assert not token or token not in refused.value.reason


def test_an_expired_token_is_gone_but_only_once_authentic():
    # 1000 + 60 s, rounded up to the 10-minute step: valid until 1200
    token = _token_of(callback_url(SETTINGS, dag_id="d", run_id="r", task_id="t", expires_in=60, now=1000.0))
    assert CallbackToken.verify(token, KEYS, now=1199.0).slot == 0
    with pytest.raises(ExpiredCallbackToken) as expired:
        CallbackToken.verify(token, KEYS, now=1201.0)
    assert expired.value.status_code == 410
    with pytest.raises(CallbackTokenError) as forged:
        CallbackToken.verify(token, OTHER_KEYS, now=1201.0)
    assert not isinstance(forged.value, ExpiredCallbackToken)


def test_a_token_is_only_good_for_its_purpose():
    with pytest.raises(CallbackTokenError):
        CallbackToken.verify(watch_token(SETTINGS), KEYS, purposes=(PURPOSE_TI, PURPOSE_ASSET))
    ti_token = _token_of(callback_url(SETTINGS, dag_id="d", run_id="r", task_id="t"))
    with pytest.raises(CallbackTokenError):
        CallbackToken.verify(ti_token, KEYS, purposes=(PURPOSE_WATCH,))


def test_the_helpers_sign_with_the_configured_keys():
    """conftest.py configures ``[imagecb] callback_signing_keys``; its first key signs."""
    assert TokenKeyring.from_config() == KEYS
    token = watch_token(SETTINGS)
    assert token.split(".")[0] == "t1"
    assert CallbackToken.verify(token, purposes=[PURPOSE_WATCH]).conn_id == "imagecb_default"


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
    grant = _token_of(url).split(".")[2]
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
    grants = {_token_of(url).split(".")[2] for url in urls}
    assert len(grants) == 1
    assert len({_token_of(url).split(".")[3] for url in urls}) == 1000
    assert CallbackToken.verify(_token_of(urls[999]), KEYS, now=5000.0).slot == 999


def test_a_tag_from_another_slot_does_not_verify():
    first = _token_of(callback_url(SETTINGS, dag_id="d", run_id="r", task_id="t", slot=0, now=5000.0))
    second = _token_of(callback_url(SETTINGS, dag_id="d", run_id="r", task_id="t", slot=1, now=5000.0))
    spliced = ".".join([*second.split(".")[:2], *first.split(".")[2:]])
    with pytest.raises(CallbackTokenError):
        CallbackToken.verify(spliced, KEYS, now=5000.0)


def test_verify_refuses_an_api_key_for_a_keyring():
    token = watch_token(SETTINGS)
    with pytest.raises(TypeError, match="TokenKeyring"):
        CallbackToken.verify(token, "key-one")  # type: ignore[arg-type]


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


# ----------------------------------------------------------------------------------- keys
FERNET_NEW = "jF-nhPPcsvlJVShptdpbiPpqxpn7Rw99OXIbeRQ5zf8="
FERNET_OLD = "Yk2hX1lG1pbvX3sGzYkQmJ8lYp3rT0cN9uWq4eRtZ5A="


def test_without_signing_keys_the_keys_derive_from_the_fernet_key(monkeypatch):
    monkeypatch.setenv("AIRFLOW__IMAGECB__CALLBACK_SIGNING_KEYS", "")
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", FERNET_NEW)
    derived = TokenKeyring.from_config()
    assert derived == TokenKeyring.from_fernet_key(FERNET_NEW)
    (kid,) = derived.key_ids
    assert kid.startswith("f")
    assert FERNET_NEW not in kid
    assert derived.signing[1] not in (FERNET_NEW.encode(), base64.urlsafe_b64decode(FERNET_NEW))
    token = watch_token(SETTINGS)
    assert token.split(".")[0] == kid
    assert CallbackToken.verify(token, purposes=[PURPOSE_WATCH]).conn_id == "imagecb_default"
    # Airflow's fernet rotation ("new,old"): the new key signs, what the old one signed verifies
    old = watch_token(SETTINGS, keyring=TokenKeyring.from_fernet_key(FERNET_OLD))
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", f"{FERNET_NEW},{FERNET_OLD}")
    assert CallbackToken.verify(old, purposes=[PURPOSE_WATCH]).purpose == PURPOSE_WATCH
    assert watch_token(SETTINGS).split(".")[0] == kid
    # configured keys take precedence over the fernet key
    monkeypatch.setenv("AIRFLOW__IMAGECB__CALLBACK_SIGNING_KEYS", "mine:" + "m" * 40)
    assert TokenKeyring.from_config().key_ids == ("mine",)
    with pytest.raises(CallbackTokenError):
        CallbackToken.verify(token, purposes=[PURPOSE_WATCH])


def test_without_any_key_minting_says_what_to_set(monkeypatch):
    from imagecb_provider.exceptions import ImageCbConfigurationError

    monkeypatch.setenv("AIRFLOW__IMAGECB__CALLBACK_SIGNING_KEYS", "")
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", "")
    with pytest.raises(ImageCbConfigurationError, match=r"\[imagecb\] callback_signing_keys") as missing:
        callback_url(SETTINGS, dag_id="d", run_id="r", task_id="t")
    assert "AIRFLOW__IMAGECB__CALLBACK_SIGNING_KEYS" in str(missing.value)
    assert "fernet_key" in str(missing.value)


@pytest.mark.parametrize("fernet_key", ["{FERNET_KEY}", "not-a-fernet-key", "c2hvcnQ=", FERNET_NEW + ",oops"])
def test_no_key_is_derived_from_a_fernet_key_that_is_no_fernet_key(fernet_key):
    """The Task SDK's parser answers an unset fernet_key with "{FERNET_KEY}": public text, no key."""
    from imagecb_provider.callbacks.tokens import _keyring_of
    from imagecb_provider.exceptions import ImageCbConfigurationError

    with pytest.raises(ImageCbConfigurationError, match="fernet_key") as refused:
        _keyring_of("", fernet_key, "")
    assert "oops" not in str(refused.value)


@pytest.mark.parametrize(
    "spec",
    [
        "no-separator-" + "s" * 40,
        "short:too-short-a-secret",
        "ok:" + "s" * 40 + ",short:abc",
        "bad kid!:" + "s" * 40,
        "dup:" + "s" * 40 + ",dup:" + "t" * 40,
        ":" + "s" * 40,
    ],
)
def test_malformed_signing_keys_are_refused_without_showing_a_secret(spec):
    from imagecb_provider.exceptions import ImageCbConfigurationError

    with pytest.raises(ImageCbConfigurationError, match="callback_signing_keys") as refused:
        TokenKeyring.from_secrets(spec)
    assert "s" * 20 not in str(refused.value)
    assert "too-short" not in str(refused.value)
    assert "abc" not in str(refused.value)


def test_a_keyring_never_shows_its_keys():
    assert repr(KEYS) == "TokenKeyring(revoked_labels=frozenset())"
    assert "imagecb-test-signing-secret" not in repr(KEYS)


def test_a_revoked_label_is_refused_like_a_forgery_and_never_minted():
    revoking = keyring(revoked_labels={"leaked"})
    leaked = _token_of(asset_callback_url(SETTINGS, "leaked", keyring=KEYS))
    with pytest.raises(CallbackTokenError) as refused:
        CallbackToken.verify(leaked, revoking)
    assert (refused.value.status_code, str(refused.value)) == (403, TOKEN_REFUSED)
    assert refused.value.reason == "revoked asset label"
    assert CallbackToken.verify(_token_of(asset_callback_url(SETTINGS, "kept", keyring=KEYS)), revoking)
    with pytest.raises(ValueError, match="revoked"):
        asset_callback_url(SETTINGS, "leaked", keyring=revoking)


def test_nothing_of_a_token_is_decoded_before_its_tag_verifies(monkeypatch):
    from imagecb_provider.callbacks import tokens

    def never(payload):
        raise AssertionError("decoded a payload whose tag did not verify")

    token = watch_token(SETTINGS)
    kid, payload, grant, tag = token.split(".")
    monkeypatch.setattr(tokens, "_payload_fields", never)
    for forged in (
        f"{kid}.{payload}.{grant}.{'A' * 22}",
        f"t9.{payload}.{grant}.{tag}",
        f"{kid}.e30.{grant}.{tag}",
    ):
        with pytest.raises(CallbackTokenError):
            CallbackToken.verify(forged, KEYS)


def test_a_token_too_long_for_the_receiver_is_never_minted():
    with pytest.raises(ValueError, match="more than the receiver accepts"):
        callback_url(SETTINGS, dag_id="d" * 250, run_id="r" * 1500, task_id="t")


def test_spaces_around_key_ids_and_secrets_do_not_change_the_keys():
    kid, secret = SIGNING_KEYS.split(":", 1)
    assert keyring(f" {kid} : {secret} , ") == KEYS
