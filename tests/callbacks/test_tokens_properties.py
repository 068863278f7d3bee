"""
Properties of the callback token codec, for any input hypothesis finds.

* any fields a token can carry come back unchanged from its encoding;
* any change to a token's text (a character replaced, added or removed) is refused;
* verifying any text raises :class:`CallbackTokenError` and nothing else, even a payload signed
  with the real key (what only a bug of ours could produce).
"""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from cbhelpers import keyring
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imagecb_provider.callbacks import tokens
from imagecb_provider.callbacks.tokens import (
    LABEL_PATTERN,
    PURPOSE_ASSET,
    PURPOSE_TI,
    PURPOSE_WATCH,
    TOKEN_REFUSED,
    CallbackToken,
    CallbackTokenError,
    TaskInstanceRef,
)

KEYS = keyring()
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_ids = st.text(min_size=1, max_size=60)
_expiry = st.integers(min_value=0, max_value=2**53)


@st.composite
def claims(draw: st.DrawFn) -> CallbackToken:
    purpose = draw(st.sampled_from([PURPOSE_TI, PURPOSE_ASSET, PURPOSE_WATCH]))
    conn_id, expires_at = draw(_ids), draw(_expiry)
    if purpose == PURPOSE_TI:
        ti = TaskInstanceRef(draw(_ids), draw(_ids), draw(_ids), draw(st.integers(min_value=-1)))
        return CallbackToken(purpose, conn_id, expires_at, ti=ti, slot=draw(st.integers(min_value=0)))
    if purpose == PURPOSE_ASSET:
        label = draw(st.from_regex(LABEL_PATTERN, fullmatch=True))
        return CallbackToken(purpose, conn_id, expires_at, label=label)
    return CallbackToken(purpose, conn_id, expires_at)


def _encoded(token: CallbackToken) -> str:
    try:
        return token.encode(KEYS)
    except ValueError:  # longer than the receiver accepts: refused when made, never handed out
        assume(False)
        return ""


@FAST
@given(claims())
def test_any_fields_round_trip(token):
    encoded = _encoded(token)
    assert CallbackToken.verify(encoded, KEYS, now=token.expires_at) == token


@FAST
@given(claims(), st.data())
def test_any_change_to_a_token_is_refused(token, data):
    encoded = _encoded(token)
    position = data.draw(st.integers(min_value=0, max_value=len(encoded)), label="position")
    edit = data.draw(st.sampled_from(["replace", "insert", "delete"]), label="edit")
    char = data.draw(st.characters(), label="char")
    if edit == "replace" and position < len(encoded):
        assume(char != encoded[position])
        changed = encoded[:position] + char + encoded[position + 1 :]
    elif edit == "delete" and position < len(encoded):
        changed = encoded[:position] + encoded[position + 1 :]
    else:
        changed = encoded[:position] + char + encoded[position:]
    with pytest.raises(CallbackTokenError) as refused:
        CallbackToken.verify(changed, KEYS, now=token.expires_at)
    assert str(refused.value) == TOKEN_REFUSED  # not "expired": a change never passes the tag


_token_like = st.from_regex(
    r"[A-Za-z0-9_-]{0,34}\.[A-Za-z0-9_-]{0,200}\.[A-Za-z0-9_-]{0,60}\.[A-Za-z0-9_-]{0,30}", fullmatch=True
)


@FAST
@given(st.one_of(st.text(), _token_like, st.binary().map(lambda b: b.decode("latin-1"))))
def test_verifying_any_text_only_ever_refuses(text):
    with pytest.raises(CallbackTokenError) as refused:
        CallbackToken.verify(text, KEYS)
    assert (refused.value.status_code, str(refused.value)) == (403, TOKEN_REFUSED)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=10) | st.dictionaries(st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=30,
)


def _signed(payload: str) -> str:
    """A token whose payload is ``payload``, signed with the real key: what only a bug could mint."""
    kid, key = KEYS.signing
    grant = "g"
    return f"{kid}.{payload}.{grant}.{tokens._tag(key, kid, payload, grant)}"


@FAST
@given(
    st.one_of(
        _json.map(lambda value: json.dumps(value).encode()),
        st.lists(_json, min_size=2, max_size=10).map(lambda fields: json.dumps([2, *fields]).encode()),
        st.binary(max_size=300),
        st.integers(min_value=1, max_value=5000).map(lambda depth: b"[" * depth + b"]" * depth),
    )
)
def test_a_signed_payload_of_any_content_only_ever_refuses(raw):
    token = _signed(base64.urlsafe_b64encode(raw).rstrip(b"=").decode())
    # whatever else it may raise fails the test
    with contextlib.suppress(CallbackTokenError):
        CallbackToken.verify(token, KEYS, now=0)
