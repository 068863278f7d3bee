"""
Properties of the receiver for any request hypothesis finds: whatever the body, the headers and the
token, the answer is a 2xx or a 4xx, never a 5xx and never an exception out of the app.

The app runs in this process (``TestClient``, which re-raises anything the app raises) on Airflow's
test database, with its connections given, not looked up.
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import pytest
from cbhelpers import OTHER_SIGNING_KEYS, keyring
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from imagecb_provider.callbacks.app import create_app
from imagecb_provider.callbacks.receiver import CallbackReceiver, ConnectionCache
from imagecb_provider.callbacks.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, webhook_signature
from imagecb_provider.callbacks.tokens import asset_callback_url, callback_url, watch_token
from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings
from imagecb_provider.models import REMOTE_TASK_ID

pytestmark = pytest.mark.timeout(600)

KEYS = keyring()
WEBHOOK_KEY = "property-webhook-key"
PLAIN = ImageCbConnectionSettings(
    conn_id="prop_plain", base_url="http://sim", api_key="k", callback_base_url="http://receiver"
)
SIGNED = ImageCbConnectionSettings(
    conn_id="prop_signed",
    base_url="http://sim",
    api_key="k",
    callback_base_url="http://receiver",
    webhook_hmac_key=WEBHOOK_KEY,
)
EXAMPLES = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class GivenConnections(ConnectionCache):
    """The two connections of these tests; any other is unknown."""

    def _load(self, conn_id):
        return {PLAIN.conn_id: PLAIN, SIGNED.conn_id: SIGNED}.get(conn_id)


@pytest.fixture(scope="module")
def client(callback_db):
    receiver = CallbackReceiver(connections=GivenConnections(), keyring=KEYS, poll_interval=0.05)
    with TestClient(create_app(receiver), raise_server_exceptions=True) as http:
        yield http


def _path(url: str) -> str:
    return "/callbacks/" + url.rsplit("/", 1)[1]


def _ti(conn: ImageCbConnectionSettings, **kwargs) -> str:
    return _path(
        callback_url(conn, dag_id="prop_dag", run_id="prop_run", task_id="t", keyring=KEYS, **kwargs)
    )


PATHS = [
    _path(asset_callback_url(PLAIN, "prop-label", keyring=KEYS)),
    _path(asset_callback_url(SIGNED, "prop-label", keyring=KEYS)),
    _ti(PLAIN),
    _ti(SIGNED, slot=1),
    _ti(PLAIN, expires_in=1, now=time.time() - 3600),
    "/callbacks/" + watch_token(PLAIN, keyring=KEYS),
    _path(asset_callback_url(PLAIN, "prop-label", keyring=keyring(OTHER_SIGNING_KEYS))),
    "/callbacks/not-a-token",
]

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
_task_ids = st.one_of(st.from_regex(REMOTE_TASK_ID, fullmatch=True), _json)


@st.composite
def callbacks(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A body shaped like the vendor's, any of its values arbitrary; and its task id if a string."""
    task_id = draw(_task_ids)
    data = draw(st.dictionaries(st.sampled_from(["info", "extra"]), _json, max_size=2))
    data[draw(st.sampled_from(["taskId", "task_id"]))] = task_id
    body = {"code": draw(st.one_of(st.just(200), _json)), "msg": draw(_json), "data": data}
    encoded = json.dumps(body, allow_nan=draw(st.booleans())) if _finite(body) else json.dumps(body)
    return encoded.encode(), task_id if isinstance(task_id, str) else None


def _finite(value) -> bool:
    return "NaN" not in json.dumps(value) and "Infinity" not in json.dumps(value)


_bodies = st.one_of(
    callbacks(),
    callbacks(),
    callbacks(),
    st.binary(max_size=500).map(lambda raw: (raw, None)),
    st.integers(min_value=1, max_value=30_000).map(lambda n: (b"[" * n + b"]" * n, None)),
    _json.map(lambda value: (json.dumps(value).encode(), None)),
)
_header_names = st.sampled_from(
    [
        "content-type",
        "content-length",
        TIMESTAMP_HEADER.lower(),
        SIGNATURE_HEADER.lower(),
        "authorization",
        "transfer-encoding",
        "content-encoding",
        "x-forwarded-for",
    ]
)
_headers = st.lists(st.tuples(_header_names, st.binary(max_size=40)), max_size=6)
# mostly what gets past the first checks: the later ones are where a body can do harm
_content_types = st.sampled_from(
    [b"application/json"] * 6 + [b"application/problem+json; charset=utf-8", b"text/plain", b"", b"\xff\xfe"]
)


def _send(client, method: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]], **params):
    request = client.build_request(method, path, content=body, params=params or None)
    request.headers = request.headers.__class__([(name.encode(), value) for name, value in headers])
    return client.send(request)


@settings(EXAMPLES, max_examples=400)
@given(
    path=st.sampled_from(PATHS[:4] * 4 + PATHS[4:]),
    body=_bodies,
    content_type=_content_types,
    headers=_headers,
    signed=st.booleans(),
)
def test_any_callback_request_is_answered_2xx_or_4xx(client, path, body, content_type, headers, signed):
    raw, task_id = body
    sent = [("content-type", content_type), *headers]
    if signed and task_id is not None:
        stamp = str(int(time.time()))
        sent += [
            (TIMESTAMP_HEADER, stamp.encode()),
            (SIGNATURE_HEADER, webhook_signature(WEBHOOK_KEY, task_id, stamp).encode()),
        ]
    answer = _send(client, "POST", path, raw, sent)
    event(f"HTTP {answer.status_code}")
    assert 200 <= answer.status_code < 500, answer.text


_watch = [("authorization", f"Bearer {watch_token(PLAIN, keyring=KEYS)}".encode())]
_params = st.dictionaries(
    st.sampled_from(["after", "wait", "purpose", "label", "limit"]),
    st.one_of(
        st.text(max_size=30),
        st.integers().map(str),
        st.sampled_from(["0", "0.01", "-1", "nan", "inf", "1e309", "99999999999999999999999"]),
    ),
    max_size=5,
)


@EXAMPLES
@given(
    route=st.sampled_from(["events", "lookup", "cursor get", "cursor put", "health"]),
    name=st.text(max_size=40),
    params=_params,
    body=_bodies,
    headers=_headers,
    authorized=st.booleans(),
)
def test_any_request_to_the_other_routes_is_answered_2xx_or_4xx(
    client, route, name, params, body, headers, authorized
):
    if params.get("wait") not in (None, "0", "0.01", "-1", "nan", "inf", "1e309"):
        params["wait"] = "0"  # a long-poll would wait it out: what it waits for is not under test
    sent = [("content-type", b"application/json"), *(_watch if authorized else []), *headers]
    raw = body[0]
    if route == "events":
        answer = _send(client, "GET", "/callbacks/events", b"", sent, **params)
    elif route == "lookup":
        answer = _send(client, "POST", "/callbacks/lookup", raw, sent)
    elif route == "health":
        answer = _send(client, "GET", "/callbacks/health", b"", sent)
    else:
        method = "GET" if route == "cursor get" else "PUT"
        quoted = quote(name.encode("utf-8", "surrogatepass"), safe="")
        answer = _send(client, method, f"/callbacks/cursors/{quoted}", raw, sent)
    event(f"HTTP {answer.status_code}")
    assert 200 <= answer.status_code < 500, answer.text
